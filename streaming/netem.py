"""A loopback UDP relay that impairs the packets between a WebRTC client and the server: loss (random and
bursty, seeded), delay, jitter and reordering, per direction, changeable while it runs. For tests and
benchmarks (`tests/test_server_operations.py`, `benchmarks/soak.py --loss`).

How it gets into the path. Both peers advertise one UDP host candidate on 127.0.0.1 (the server with
`ice_hosts=("127.0.0.1",)`; in the client's process `streaming.ice.restrict_host_candidates`). The relay
binds two sockets: `A` faces the client (it stands in for the server), `B` faces the server (it stands in
for the client). `offer(sdp)` rewrites the client's candidate to B's port and remembers the client's real
address; `answer(sdp)` rewrites the server's candidate to A's port and remembers the server's. A datagram
from the client arriving at A leaves from B to the server; one from the server arriving at B leaves from A
to the client. Every address each peer sees is one it was told about, so ICE pairs exactly these two and
everything (STUN checks and consent, DTLS, SRTP, SCTP) crosses the relay and its impairments.

    relay = await UdpRelay.create(seed=1)
    await client.connect(mic=..., relay=relay)           # streaming.client.AvatarClient
    relay.set(Impairment(loss=0.1, jitter_ms=30))        # both directions
    relay.set(up=Impairment(), down=Impairment(loss=0.2, burst_loss=0.02, burst_len=8))
    relay.close()

Loss: each packet is lost with probability `loss`; and a two-state (Gilbert) model adds bursts: from the
good state a packet starts a burst with probability `burst_loss`, and a burst loses every packet until it
ends, after `burst_len` packets on average. Delay: `delay_ms` plus a uniform draw in [0, jitter_ms) per
packet, so packets closer together than the jitter arrive out of order; `reorder` holds a share of packets
`reorder_ms` longer on top. All draws come from one `random.Random(seed)` per direction.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_CAND = re.compile(r"^(a=candidate:\S+ \d+ udp \d+ )(\S+) (\d+)( typ host.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class Impairment:
    loss: float = 0.0  # probability each packet is dropped
    burst_loss: float = 0.0  # probability a packet starts a loss burst (good -> bad state)
    burst_len: float = 0.0  # mean packets a burst loses (bad -> good with probability 1/burst_len)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0  # extra delay drawn uniformly in [0, jitter_ms) per packet
    reorder: float = 0.0  # probability a packet is held reorder_ms longer
    reorder_ms: float = 20.0

    def __post_init__(self):
        for name in ("loss", "burst_loss", "reorder"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        for name in ("burst_len", "delay_ms", "jitter_ms", "reorder_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass
class DirectionStats:
    received: int = 0
    sent: int = 0
    dropped: int = 0
    burst_dropped: int = 0
    reordered: int = 0  # left after a packet that arrived later

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Leg:
    imp: Impairment
    rng: random.Random
    stats: DirectionStats = field(default_factory=DirectionStats)
    in_burst: bool = False
    last_due: float = 0.0

    def verdict(self, now: float) -> float | None:
        """None: drop; else the delay (s) before the packet leaves."""
        imp, rng = self.imp, self.rng
        self.stats.received += 1
        if self.in_burst:
            if imp.burst_len <= 1 or rng.random() < 1.0 / imp.burst_len:
                self.in_burst = False
            self.stats.dropped += 1
            self.stats.burst_dropped += 1
            return None
        if imp.burst_loss > 0 and rng.random() < imp.burst_loss:
            self.in_burst = imp.burst_len > 1
            self.stats.dropped += 1
            self.stats.burst_dropped += 1
            return None
        if imp.loss > 0 and rng.random() < imp.loss:
            self.stats.dropped += 1
            return None
        d = imp.delay_ms / 1000
        if imp.jitter_ms > 0:
            d += rng.random() * imp.jitter_ms / 1000
        if imp.reorder > 0 and rng.random() < imp.reorder:
            d += imp.reorder_ms / 1000
        due = now + d
        if due < self.last_due:
            self.stats.reordered += 1
        self.last_due = max(self.last_due, due)
        return d


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, relay: "UdpRelay", side: str):
        self.relay, self.side = relay, side
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.relay._on_datagram(self.side, data, (addr[0], addr[1]))

    def error_received(self, exc) -> None:  # ICMP port unreachable after a peer left: nothing to do
        log.debug("relay socket %s: %s", self.side, exc)


class UdpRelay:
    """See the module doc. Create with `await UdpRelay.create(...)` on the loop the peers run on."""

    def __init__(self, up: Impairment | None = None, down: Impairment | None = None, seed: int = 0,
                 host: str = "127.0.0.1"):
        self.host = host
        self.up = _Leg(up or Impairment(), random.Random(seed * 2 + 1))  # client -> server
        self.down = _Leg(down or Impairment(), random.Random(seed * 2 + 2))  # server -> client
        self.client_addr: tuple[str, int] | None = None
        self.server_addr: tuple[str, int] | None = None
        self._a: _Socket | None = None  # faces the client
        self._b: _Socket | None = None  # faces the server
        self._loop = None
        self._handles: set = set()
        self.closed = False

    @classmethod
    async def create(cls, up: Impairment | None = None, down: Impairment | None = None, seed: int = 0,
                     host: str = "127.0.0.1") -> "UdpRelay":
        r = cls(up, down, seed, host)
        await r.start()
        return r

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        _, self._a = await loop.create_datagram_endpoint(lambda: _Socket(self, "a"), local_addr=(self.host, 0))
        _, self._b = await loop.create_datagram_endpoint(lambda: _Socket(self, "b"), local_addr=(self.host, 0))

    @property
    def port_a(self) -> int:
        return self._a.transport.get_extra_info("sockname")[1]

    @property
    def port_b(self) -> int:
        return self._b.transport.get_extra_info("sockname")[1]

    def set(self, both: Impairment | None = None, *, up: Impairment | None = None,
            down: Impairment | None = None) -> None:
        """Change the impairments now (both directions, or each): packets already delayed keep their times."""
        if both is not None:
            up = down = both
        if up is not None:
            self.up.imp = up
            self.up.in_burst = False
        if down is not None:
            self.down.imp = down
            self.down.in_burst = False

    def stats(self) -> dict:
        return {"up": self.up.stats.as_dict(), "down": self.down.stats.as_dict()}

    # ------------------------------------------------------------------------------- signaling
    def _rewrite(self, sdp: str, port: int, what: str) -> tuple[str, tuple[str, int]]:
        found: set[tuple[str, int]] = set()
        out = []
        for line in sdp.splitlines():
            m = _CAND.match(line)
            if m:
                addr = (m.group(2), int(m.group(3)))
                if addr[0] != self.host:
                    continue  # an address the relay does not stand in for: never offered to the other side
                found.add(addr)
                line = f"{m.group(1)}{self.host} {port}{m.group(4)}"
            out.append(line)
        if len(found) != 1:
            raise ValueError(f"the {what} must carry exactly one UDP host candidate on {self.host} (restrict "
                             f"ICE host candidates to it), found {sorted(found)}")
        return "\r\n".join(out) + "\r\n", found.pop()

    def offer(self, sdp: str) -> str:
        """The client's offer as the server should see it (its candidate replaced by the relay's B)."""
        sdp, self.client_addr = self._rewrite(sdp, self.port_b, "offer")
        return sdp

    def answer(self, sdp: str) -> str:
        """The server's answer as the client should see it (its candidate replaced by the relay's A)."""
        sdp, self.server_addr = self._rewrite(sdp, self.port_a, "answer")
        return sdp

    # ---------------------------------------------------------------------------------- relaying
    def _on_datagram(self, side: str, data: bytes, addr) -> None:
        if self.closed:
            return
        if side == "a":
            if addr != self.client_addr or self.server_addr is None:
                return
            leg, out, dest = self.up, self._b, self.server_addr
        else:
            if addr != self.server_addr or self.client_addr is None:
                return
            leg, out, dest = self.down, self._a, self.client_addr
        delay = leg.verdict(self._loop.time())
        if delay is None:
            return
        if delay <= 0:
            self._send(leg, out, data, dest)
            return
        h = self._loop.call_later(delay, self._send_later, leg, out, data, dest)
        self._handles.add(h)

    def _send_later(self, leg, out, data, dest) -> None:
        self._handles = {h for h in self._handles if not h.cancelled() and h.when() > self._loop.time()}
        self._send(leg, out, data, dest)

    def _send(self, leg: _Leg, out: _Socket, data: bytes, dest) -> None:
        if self.closed or out.transport is None or out.transport.is_closing():
            return
        out.transport.sendto(data, dest)
        leg.stats.sent += 1

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.cancel()
        self._handles.clear()
        for s in (self._a, self._b):
            if s is not None and s.transport is not None:
                s.transport.close()
