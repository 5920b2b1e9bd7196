"""ICE host-candidate restriction and ICE server parsing.

aioice gathers host candidates from `aioice.ice.get_host_addresses`, which lists every interface
address except 127.0.0.1. `--ice-host ADDR` replaces that function (the seam aioice offers) with
one returning exactly the named addresses, loopback included, so a server started with
`--ice-host 127.0.0.1` only ever binds and advertises 127.0.0.1. The replacement is process-wide
(aioice has no per-connection hook); `restrict_host_candidates` returns a handle that removes it.

When every allowed address is loopback the server cannot reach any other address anyway, so
`filter_remote_candidates` also strips non-loopback candidates from a remote offer: no
connectivity check is ever sent off the loopback interface.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Iterable, Sequence

log = logging.getLogger(__name__)


def _norm(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr.strip().strip("[]")))
    except ValueError:
        raise ValueError(f"--ice-host expects an IP address, got {addr!r}") from None


def local_addresses() -> set[str]:
    """Every address of this machine's interfaces (loopback included)."""
    import ifaddr

    out = {"127.0.0.1", "::1"}
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            out.add(ip.ip if isinstance(ip.ip, str) else ip.ip[0])
    return out


class HostRestriction:
    """Handle of an installed restriction; `restore()` removes it (aioice's own function comes back
    when no restriction is left). Several servers in one process each hold one; the host addresses
    gathered are the union of the live ones."""

    def __init__(self, addresses: tuple[str, ...], hook: "_RestrictedHosts"):
        self.addresses = addresses
        self._hook = hook

    @property
    def active(self) -> bool:
        return self._hook is not None

    @property
    def loopback_only(self) -> bool:
        return all(ipaddress.ip_address(a).is_loopback for a in self.addresses)

    def restore(self) -> None:
        import aioice.ice

        hook, self._hook = self._hook, None
        if hook is None:
            return
        hook.handles.remove(self)
        if not hook.handles and aioice.ice.get_host_addresses is hook:
            aioice.ice.get_host_addresses = hook.original


class _RestrictedHosts:
    """What replaces `aioice.ice.get_host_addresses` while restrictions are live. It carries the
    state (the live handles and aioice's original function), so this module keeps none."""

    def __init__(self, original):
        self.original = original
        self.handles: list[HostRestriction] = []

    def __call__(self, use_ipv4: bool, use_ipv6: bool) -> list[str]:
        out: list[str] = []
        for h in self.handles:
            for a in h.addresses:
                v6 = ipaddress.ip_address(a).version == 6
                if ((v6 and use_ipv6) or (not v6 and use_ipv4)) and a not in out:
                    out.append(a)
        return out


def restrict_host_candidates(addresses: Iterable[str], check_local: bool = True) -> HostRestriction:
    """Make aioice gather host candidates only on `addresses` (process-wide, until restored)."""
    import aioice.ice

    addrs = tuple(dict.fromkeys(_norm(a) for a in addresses))
    if not addrs:
        raise ValueError("restrict_host_candidates needs at least one address")
    if check_local:
        missing = [a for a in addrs if a not in local_addresses()]
        if missing:
            raise ValueError(f"--ice-host {', '.join(missing)}: not an address of this machine")
    hook = aioice.ice.get_host_addresses
    if not isinstance(hook, _RestrictedHosts):
        hook = _RestrictedHosts(aioice.ice.get_host_addresses)
        aioice.ice.get_host_addresses = hook
    h = HostRestriction(addrs, hook)
    hook.handles.append(h)
    log.info("ICE host candidates restricted to %s", ", ".join(addrs))
    return h


_CAND = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) \d+ typ \S+", re.IGNORECASE)


def filter_remote_candidates(sdp: str, loopback_only: bool) -> str:
    """Drop `a=candidate` lines of a remote description whose address is not loopback (only when
    the server itself is restricted to loopback: such candidates are unreachable from it)."""
    if not loopback_only:
        return sdp
    out = []
    for line in sdp.splitlines():
        m = _CAND.match(line)
        if m:
            try:
                if not ipaddress.ip_address(m.group(1)).is_loopback:
                    continue
            except ValueError:  # an mDNS name (xxx.local): not resolvable on loopback only
                continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def ice_servers(urls: Sequence[str]):
    """["stun:host:port", "turn:user:pass@host:port", ...] -> [RTCIceServer]; empty by default."""
    from aiortc import RTCIceServer

    servers = []
    for url in urls:
        url = url.strip()
        m = re.match(r"^(turns?|stuns?):(?:([^:@]+):([^@]+)@)?(.+)$", url)
        if not m:
            raise ValueError(f"--ice-server {url!r}: expected stun:HOST:PORT or turn:USER:PASS@HOST:PORT")
        scheme, user, pwd, rest = m.groups()
        servers.append(RTCIceServer(urls=f"{scheme}:{rest}", username=user, credential=pwd))
    return servers
