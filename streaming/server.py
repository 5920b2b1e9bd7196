"""`marionette serve`: aiohttp signaling + aiortc media on uvloop.

Routes
  GET  /                          the demo page
  GET  /info                      model, presets, fps, latency (what the page needs)
  POST /offer                     {"sdp", "type": "offer", "avatar"?, "controls"?}
                                  -> {"sdp", "type": "answer", "session", "session_key"}
  GET  /sessions, GET /sessions/{id}                         stats
  POST /sessions/{id}/controls    one control object or a list (same JSON as the data channel)
  GET|POST /sessions/{id}/outputs, DELETE /sessions/{id}/outputs/{name}
                                  the session's avatar also to RTMP / WHIP / a virtual camera
                                  ({"url": ...}; see streaming.outputs and docs/live.md)
  DELETE /sessions/{id}
  POST /avatars                   a portrait (raw image body or multipart), size-limited -> {"id"}
  GET  /avatars
  GET  /healthz, GET /metrics     (Prometheus text; on its own address with metrics_port)

Security (docs/security.md). With a token set, every route but / and /healthz needs
`Authorization: Bearer TOKEN`, and the /sessions/{id}... routes need that session's own key (the
"session_key" of its /offer answer) instead: a session's controls answer only to whoever made it.
Uploads are checked for bytes, type (PNG/JPEG/WebP by content) and pixel count (from the header, before
any pixel is decoded). Offers and uploads are rate-limited per client address (token buckets, a bounded
table). Cross-origin browsers: no CORS headers unless origins are allowed, and state-changing requests
from another origin are refused (403).

Pipeline latency. Stream sample n (arriving at nominal time a(n)) is played, and shown as lips, at
a(n) + L, with
  L = 1/(2 fps) (the second half of the frame's own audio, centred on its tick) - the lip lag (--lip-lag-ms:
      the frame's audio moved before its tick; 0 at balanced and safe, half a frame at low)
      + lookahead (the lip encoder's future context) + the mel window's overhang
      + an arrival margin (jitter) + the scheduler lead (time reserved to compute a round),
  rounded up to 10 ms by the stream offset; the arrival margin then grows per session, 10 ms at a time in
  pauses, where that session's audio arrives later than it allows (streaming.audio_in, adaptive margin).
The lead is a multiple of the measured 90th-percentile time of the mouth phase (or of the whole round, when
frames are made in one piece), with a floor and a ceiling per level: a machine that computes slowly or
unevenly (a busy one) buys smooth video with latency.
`--latency low|balanced|safe` (LATENCY_LEVELS) moves the margin, the lead and the lip lag together: low (the
default) at their floors, safe for a loaded machine.

Operations (docs/operations.md).
* Admission control: an offer is refused (503, Retry-After, {"reason": "overloaded"}) when the round
  one more session would make, predicted from the scheduler's measured round times per batch size, would
  not fit the round budget (the frame period minus a margin): the running sessions keep their frame
  rate instead of all slowing down. The first session is always admitted; `max_sessions` stays a hard
  cap ({"reason": "full"}). /info, /healthz and /metrics (marionette_load, marionette_admitting) show it.
* Dead peers: a connected session from which nothing has arrived for `peer_timeout_s` is closed, one that
  never connects after `connect_timeout_s` too; and an offer that would be refused first closes the
  sessions of the same client address whose media has been silent for `ghost_silence_s` (a user who
  reconnects is never refused because of the session they just lost).
* Shutdown: the first SIGTERM/SIGINT drains (offers refused with {"reason": "draining"}, every session
  sent {"type": "goodbye", ...} on its data channel, up to `drain_timeout_s` for them to leave); a second
  one closes everything at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import signal
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from engine.errors import InputError, MarionetteError
from streaming import controls as C
from streaming.ice import filter_remote_candidates, ice_servers, restrict_host_candidates
from streaming.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
# --fps auto at --latency low (ServeConfig.fps None), where the runtime can make a mouth on every tick (_auto_fps)
FAST_FPS = 50
# lanes auto: two where one two-phase frame (body + mouth), timed in the warm-up on an idle machine, takes more
# than this share of the frame period. Served, the same frame takes ~1.5x its idle time (the encoder, the event
# loop, Opus and a client on the same cores preempt ONNX Runtime's two threads: 42.2 ms a round served against
# 27.7 ms in the warm-up, 2026-12-02 20:30), so one lane is kept only where 1.5x the idle frame fits 90 % of the
# period. With 0.9 here, that hour's server kept one lane and dropped 31 % of its ticks (14 fps sent); two lanes
# dropped 2.5 % (25 fps, the mouth fresh on every tick): benchmarks/glass_to_glass.py --server process --lanes 1|2
LANES_AUTO_SHARE = 0.6
# ServeConfig.browser_playout. "asap" asks browsers for a playout delay of (min, max) ms and sends the avatar's
# sound up to ASAP_AUDIO_LEAD_MS ahead of its picture (Chromium's audio buffer: 20-40 ms at 2 ms of jitter).
# It was `low`'s default until 2026-12-02: headless Chromium then presented the open mouth p50 55 / p95 107 ms
# after the onset reached the server, but by its own estimatedPlayoutTimestamp the picture led the sound by
# 61 ms (p50; -68 .. -48 p5 .. p95); with "sync" 89 / 138 ms and -11 ms (-24 .. -5):
# benchmarks/glass_to_glass.py --client chromium [--browser-playout asap], docs/latency.md
BROWSER_PLAYOUTS = ("sync", "asap")
ASAP_PLAYOUT_DELAY_MS = (0, 0)
ASAP_AUDIO_LEAD_MS = 28.0


@dataclass(frozen=True)
class LatencyLevel:
    """What `--latency` trades: the arrival margin for inbound audio (network jitter the mouth can absorb
    without a stall) and the scheduler lead (how early a round starts before its tick, from the measured
    90th-percentile round time p90: lead = clamp(factor * p90 + add, lo, hi x frame period))."""

    audio_margin_ms: float
    lead_factor: float
    lead_add_ms: float
    lead_min_ms: float
    lead_max_periods: float
    # how far the audio a frame shows sits before its tick (ms, 0 .. half a frame period): 0 shows the frame
    # period of audio centred on the tick (the lips never more than half a frame off the voice, either way);
    # 20 at 25 fps shows the period that ends at the tick: the pipeline latency is 20 ms shorter, and the lips
    # trail the voice by 0-40 ms (20 on average) where they were -20..+20, inside the ~45 ms by which lips
    # must trail before viewers notice (ITU-R BT.1359 puts detectability at 45 ms of sound lead)
    lip_lag_ms: float = 0.0
    # lanes: size the lead on the mouth phase measured beside the lanes' bodies (about twice its time alone on 2
    # cores) rather than alone: fewer frames late and dropped, ~10-15 ms more pipeline latency
    lead_beside_bodies: bool = False
    # the microphone packet length asked of senders that take it from the answer (`a=ptime`: browsers; aiortc
    # always sends 20 ms): a voice onset waits up to a packet at the sender before it can leave. None: not asked
    browser_ptime_ms: int | None = None

    def lead_for(self, p90_s: float, period_s: float) -> float:
        """The scheduler lead (s) for work whose 90th-percentile time is p90_s."""
        return min(self.lead_max_periods * period_s,
                   max(self.lead_min_ms / 1000, self.lead_factor * p90_s + self.lead_add_ms / 1000))


LATENCY_LEVELS: dict[str, LatencyLevel] = {
    # the default: every margin near its floor, the lips from the frame period before the tick; a session's arrival
    # margin grows where its network or client makes audio arrive late (ServeConfig.margin_adapt_ms)
    "low": LatencyLevel(audio_margin_ms=15.0, lead_factor=1.2, lead_add_ms=3.0, lead_min_ms=10.0, lead_max_periods=1.5,
                        lip_lag_ms=20.0, browser_ptime_ms=10),
    # the default until 2026-12-01 (when the adaptive arrival margin made `low` safe on a jittery network)
    "balanced": LatencyLevel(audio_margin_ms=30.0, lead_factor=1.5, lead_add_ms=5.0, lead_min_ms=15.0,
                             lead_max_periods=2.0, lead_beside_bodies=True),
    # a loaded machine or a jittery network: a frame period more of both
    "safe": LatencyLevel(audio_margin_ms=60.0, lead_factor=2.0, lead_add_ms=10.0, lead_min_ms=40.0,
                         lead_max_periods=3.0, lead_beside_bodies=True),
}


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    avatar: Path | None = None
    checkpoint: Path | None = None
    config: str = "lite"
    backend: str = "torch"
    # None (serve's default, "auto"): FAST_FPS at --latency low where the runtime can make a mouth every tick of
    # it (a GPU, or ONNX Runtime in two phases with lanes on 2+ cores), else 25 (see Server._auto_fps)
    fps: int | None = 25
    ice_hosts: tuple[str, ...] = ()
    ice_servers: tuple[str, ...] = ()
    max_sessions: int = 8
    max_upload_bytes: int = 8 * 1024 * 1024
    exported: Path | None = None  # a `marionette export` directory (onnxruntime / tensorrt)
    precision: str = "fp32"
    kernels: bool = False  # torch on CUDA: the fused Triton warp kernels (opt-in)
    seed: int = 0
    lead_ms: float | None = None  # scheduler lead; None: from the warmup measurement and the latency level
    latency: str = "low"  # low | balanced | safe (LATENCY_LEVELS): margins traded for robustness to load
    threads: int | None = None  # inference threads; None: all cores but one
    # security (docs/security.md). token: required as "Authorization: Bearer" on every route but / and /healthz
    token: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()  # "scheme://host[:port]" or "*"; (): same-origin only, no CORS headers
    offer_rate: tuple[int, float] | None = None  # (requests, per seconds) per client address; None: unlimited
    upload_rate: tuple[int, float] | None = None
    max_upload_pixels: int = 50_000_000  # width x height of an uploaded image, read from its header
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # /metrics on its own site (0: any free port) and not on the main one
    # not on the command line
    rate_limit_clients: int = 4096  # client addresses each rate limiter remembers (least recently seen evicted)
    audio_margin_ms: float | None = None  # arrival margin for inbound audio; None: the latency level's
    lip_lag_ms: float | None = None  # how far a frame's audio sits before its tick; None: the level's (LatencyLevel)
    # how much a session's arrival margin may grow, 10 ms at a time in pauses, where its audio arrives later than
    # the margin allows (streaming.audio_in, adaptive margin); 0: fixed at the level's
    margin_adapt_ms: float = 60.0
    peer_timeout_s: float = 4.0  # a connected peer from which nothing (media, RTCP, consent) arrived this long
    connect_timeout_s: float = 10.0  # a session whose ICE/DTLS never completes
    # overload and lifecycle (docs/operations.md)
    admission: bool = True  # False: only max_sessions limits the sessions
    round_budget_ms: float | None = None  # a round for one more session must fit; None: frame period - margin
    admission_margin_ms: float = 4.0
    retry_after_s: int = 5  # Retry-After of a 503 (full, overloaded)
    ghost_silence_s: float = 2.0  # an offer that would be refused reaps its own address's sessions silent so long
    drain_timeout_s: float = 10.0  # SIGTERM: how long sessions may take to leave after their goodbye
    stats_interval_s: float = 1.0
    max_avatars: int = 32
    max_offer_bytes: int = 128 * 1024
    audio_prefetch: int | None = 0  # inbound audio packets held for reordering (aiortc's default: 4; 0: none)
    grace_ms: float = 12.0  # how long a video tick waits for a frame still being made before dropping
    # what receivers hold (docs/latency.md): an empty RTP packet with the next frame's timestamp after each
    # frame (aiortc receivers release it at once, not a frame later), and Opus packets this long (ms; a
    # receiver holds packets, not ms: aiortc's 4 packets are 80 ms of 20 ms ones, 20 ms of 5 ms ones)
    frame_end_hint: bool = True
    audio_packet_ms: float | None = 5.0
    # what browsers (libwebrtc) do with the picture: "sync" (the default) leaves them their own playout delay,
    # which holds each frame until its sound plays (their audio buffer and output path: ~60-70 ms at headless
    # Chromium), so the lips stay on the voice; "asap" asks them, through the playout-delay RTP header extension,
    # to show each frame as it is decoded (~30-35 ms sooner) and sends the sound ahead as far as its samples
    # allow: the picture then leads the sound by ~50-60 ms at Chromium. aiortc receivers ignore both.
    browser_playout: str = "sync"
    # make each frame in two phases where the runtime can (streaming.scheduler): the body ahead of the audio,
    # the mouth net last, so the pipeline latency holds the mouth's ~3 ms lead instead of the whole round's
    late_mouth: bool = True
    # bodies in flight at once (streaming.scheduler, "Lanes"), each on its own thread with one inference thread:
    # None (auto) takes 2 where the two-phase frame does not fit LANES_AUTO_SHARE of the frame period on a CPU
    # with 2+ cores (ONNX Runtime), else 1
    lanes: int | None = None
    # real photos (engine.face), for --avatar and uploads: "require" (the CLI's default) finds and aligns the
    # face, 400 without one; "auto" aligns when a face is found; "off" (the library default) uses images as
    # they are. Aligned avatars stream output_size frames around the face ("512": 512x512; "crop": the
    # model's own crop; "WxH"; "original": the whole photo)
    align: str = "off"
    output_size: str = "512"


def _error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _unauthorized(message: str, invalid: bool) -> web.Response:
    challenge = 'Bearer realm="marionette"' + (', error="invalid_token"' if invalid else "")
    return web.json_response({"error": message}, status=401, headers={"WWW-Authenticate": challenge})


def _bearer(request: web.Request) -> str | None:
    scheme, _, cred = request.headers.get("Authorization", "").strip().partition(" ")
    cred = cred.strip()
    return cred if scheme.lower() == "bearer" and cred else None


def _matches(given: str | None, secret: str) -> bool:
    """Constant-time comparison (the time taken says nothing about how much of the secret was right)."""
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def client_key(addr: str | None) -> str:
    """The rate limiters' key for a peer address: IPv4 as it is, IPv6 by its /64 (one host's share)."""
    try:
        ip = ipaddress.ip_address((addr or "").split("%", 1)[0])
    except ValueError:
        return addr or "unknown"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class RateLimiter:
    """A token bucket per client address: `count` requests per `per_s` seconds, bursts up to `count`.
    The table is bounded: past `max_clients` addresses the least recently seen is forgotten (a forgotten
    address starts again with a full bucket, which it would have after `per_s` idle seconds anyway)."""

    def __init__(self, count: int, per_s: float, max_clients: int = 4096, clock=time.monotonic):
        if count < 1 or not per_s > 0 or max_clients < 1:
            raise ValueError(f"rate {count}/{per_s}s: need at least 1 request per a positive period")
        self.capacity = float(count)
        self.rate = count / per_s  # tokens per second
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, addr: str | None) -> float:
        """Spend one token for `addr`: 0.0 when allowed, else the seconds until one is available."""
        key = client_key(addr)
        now = self._clock()
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def _normalise_origin(origin: str) -> str:
    """ "https://Example.com:8443/" -> "https://example.com:8443"; InputError for anything but an origin."""
    from yarl import URL

    o = origin.strip()
    if o == "*":
        return o
    try:
        u = URL(o)
    except ValueError:
        u = None
    if u is None or u.scheme not in ("http", "https") or not u.host or u.path not in ("", "/") \
            or u.query_string or u.fragment or u.user:
        raise InputError(f"CORS origin {origin!r}: expected scheme://host[:port] (e.g. https://example.com) or *")
    port = "" if u.explicit_port is None or u.is_default_port() else f":{u.port}"
    host = f"[{u.host}]" if ":" in u.host else u.host
    return f"{u.scheme}://{host.lower()}{port}"


# who may call a route when a token is set: "public" anyone, "session" the session's own key, else the token
_PUBLIC_ROUTES = frozenset({"/", "/healthz"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AvatarServer:
    def __init__(self, cfg: ServeConfig, pipeline=None):
        self.cfg = cfg
        self.pipeline = pipeline
        self.sessions: dict = {}
        self._reserved = 0
        self.metrics = ServerMetrics(sessions_fn=lambda: len(self.sessions))
        self.clock = None
        self.scheduler = None
        self.avatars = None
        self.latency_s = None
        self.lead_s = None
        self.lip_lag_s = 0.0
        self.warmup_times: dict[int, float] = {}
        self.lanes = 1  # bodies in flight at once (set by start: ServeConfig.lanes or auto)
        self.fps = cfg.fps or 25  # frames a second (start sets it: ServeConfig.fps, or auto)
        self._ice = None
        try:
            self._ice_servers = ice_servers(cfg.ice_servers)
        except ValueError as e:
            raise InputError(str(e)) from None
        self.started = None
        if cfg.token is not None and (not cfg.token or cfg.token != cfg.token.strip() or " " in cfg.token):
            raise InputError("the token must be a non-empty string without spaces")
        self._session_keys: dict[str, str] = {}  # session id -> its key (sessions made by /offer)
        self._cors = frozenset(_normalise_origin(o) for o in cfg.cors_origins)
        self._limits: dict[tuple[str, str], RateLimiter] = {}
        for route, rate, what in (("/offer", cfg.offer_rate, "offer"), ("/avatars", cfg.upload_rate, "upload")):
            if rate is not None:
                try:
                    self._limits[("POST", route)] = RateLimiter(int(rate[0]), float(rate[1]), cfg.rate_limit_clients)
                except (ValueError, TypeError, IndexError) as e:
                    raise InputError(f"{what} rate {rate!r}: {e}") from None
        if cfg.max_upload_pixels < 1:
            raise InputError(f"max_upload_pixels must be positive, got {cfg.max_upload_pixels}")
        self.metrics_port: int | None = None  # where the separate /metrics site listens (metrics_port)
        self._metrics_runner = None
        self.draining = False
        self.round_budget_s: float | None = None  # set by start()
        self._loop = None
        self._collect_handle = None
        self._add_operations_metrics()

    # =============================================================================== lifecycle
    async def start(self) -> None:
        cfg = self.cfg
        self._loop = asyncio.get_running_loop()
        if cfg.fps is not None and (cfg.fps <= 0 or 90000 % cfg.fps):
            raise InputError(f"--fps {cfg.fps}: must divide 90000 (e.g. 20, 24, 25, 30, 50)")
        if cfg.latency not in LATENCY_LEVELS:
            raise InputError(f"--latency {cfg.latency!r}: valid: {', '.join(LATENCY_LEVELS)}")
        if cfg.browser_playout not in BROWSER_PLAYOUTS:
            raise InputError(f"--browser-playout {cfg.browser_playout!r}: valid: {', '.join(BROWSER_PLAYOUTS)}")
        if not 0 <= cfg.margin_adapt_ms <= 1000:
            raise InputError(f"--margin-adapt-ms {cfg.margin_adapt_ms:g}: must be between 0 and 1000")
        # half a frame period (with --fps auto, of 25 fps': at 50 a longer lag is held to half of its period)
        max_lag = 500 / (cfg.fps or 25)
        if cfg.lip_lag_ms is not None and not 0 <= cfg.lip_lag_ms <= max_lag:
            raise InputError(f"--lip-lag-ms {cfg.lip_lag_ms:g}: must be between 0 and half a frame period "
                             f"({max_lag:g} ms at {cfg.fps or 25} fps)")
        if cfg.ice_hosts:
            try:
                self._ice = restrict_host_candidates(cfg.ice_hosts)
            except ValueError as e:
                raise InputError(str(e)) from None
        try:
            await self._start_pipeline()
        except BaseException:  # a start that fails leaves nothing behind (the ICE patch, the scheduler thread)
            await self.stop()
            raise

    async def _start_pipeline(self) -> None:
        from streaming.avatars import AvatarStore
        from streaming.clock import MediaClock
        from streaming.pipeline import Pipeline
        from streaming.scheduler import Scheduler

        cfg = self.cfg
        if self.pipeline is None:
            self.pipeline = await asyncio.to_thread(Pipeline.load, cfg.checkpoint, cfg.config, cfg.backend,
                                                    cfg.seed, cfg.threads, cfg.exported, cfg.precision,
                                                    cfg.kernels)
        p = self.pipeline
        if p.random_weights:
            log.warning("serving a RANDOMLY initialised model: the avatar will not look like a talking head")
        await self._setup_faces(p)
        self.fps = cfg.fps or self._auto_fps(p)
        self.clock = MediaClock(self.fps)
        self.scheduler = Scheduler(p, self.clock, self.metrics, lead_s=self.clock.period).start()
        self.avatars = AvatarStore(self.scheduler, p, max_items=cfg.max_avatars)
        src, source = self._builtin_avatar_source()
        try:
            if source in ("built-in", "placeholder"):  # corpus framing already: used as it is
                state = await asyncio.wrap_future(self.scheduler.submit(p.prepare_avatar, src, "off"))
            else:
                portrait = await asyncio.to_thread(p.align_portrait, src, None, False)
                state = await asyncio.wrap_future(self.scheduler.submit(
                    p.prepare_avatar, src if portrait is None else portrait, "off" if portrait is None else None))
        except InputError as e:
            raise InputError(f"avatar {source}: {e}") from None
        self.avatars.set_builtin(state, source)
        self.warmup_times = await asyncio.wrap_future(self.scheduler.submit(p.warmup, state))
        self.scheduler.round_times.seed(self.warmup_times)
        period = self.clock.period
        if cfg.round_budget_ms is not None:
            if not cfg.round_budget_ms > 0:
                raise InputError(f"round budget {cfg.round_budget_ms} ms: must be positive")
            self.round_budget_s = cfg.round_budget_ms / 1000
        else:
            self.round_budget_s = max(period * 0.5, period - cfg.admission_margin_ms / 1000)
        level = LATENCY_LEVELS[cfg.latency]
        phases = p.phase_times.get(1) if cfg.late_mouth and p.late_mouth else None
        if cfg.lead_ms is not None:
            lead = cfg.lead_ms / 1000
        else:
            # two phases: the lead covers the mouth phase (E_aud, the mouth net, the conversion) only
            p90 = phases[1] if phases else self.warmup_times.get(1, period)
            lead = level.lead_for(p90, period)
        self.lead_s = lead
        self.scheduler.lead_s = lead
        lanes = await self._choose_lanes(phases, state)
        if lanes > 1:
            phases = p.phase_times.get(1)
            self.scheduler.round_times.seed(self.warmup_times)
            if cfg.round_budget_ms is None:  # each lane has `lanes` periods for its frame
                self.round_budget_s = max(period * 0.5, lanes * period - cfg.admission_margin_ms / 1000)
            if cfg.lead_ms is None and phases and level.lead_beside_bodies:
                # the mouth phase shares the cores with the lanes' bodies: its lead is sized on its time beside them
                from streaming.pipeline import mouth_time_beside_bodies

                mouth = await asyncio.wrap_future(self.scheduler.submit(mouth_time_beside_bodies, p, state, lanes))
                lead = level.lead_for(mouth, period)
                log.info("the mouth phase beside %d bodies: %.1f ms (p90; %.1f ms alone) -> lead %.0f ms", lanes,
                         1000 * mouth, 1000 * phases[1], 1000 * lead)
                self.lead_s = lead
                self.scheduler.lead_s = lead
        self.lanes = lanes
        self.scheduler.lanes = lanes  # (before body_lead_s: setting that switches the scheduler to two phases)
        if phases:  # the body starts this long before the mouth phase (the same rule, on the body's time)
            self.scheduler.body_lead_s = level.lead_factor * phases[0] + level.lead_add_ms / 1000
        mc = p.cfg
        overhang = mc.audio.right_overhang / mc.audio.sample_rate
        margin = level.audio_margin_ms if cfg.audio_margin_ms is None else cfg.audio_margin_ms
        self.audio_margin_s = margin / 1000
        lag = level.lip_lag_ms if cfg.lip_lag_ms is None else cfg.lip_lag_ms
        self.lip_lag_s = min(lag / 1000, period / 2)
        if cfg.lip_lag_ms is not None and lag / 1000 > period / 2:
            log.info("--lip-lag-ms %g held to half the %d fps period: %g ms", lag, self.fps, 1000 * self.lip_lag_s)
        self.latency_s = period / 2 - self.lip_lag_s + mc.lookahead_ms / 1000 + overhang + margin / 1000 + lead
        self.metrics.pipeline_latency.set(self.latency_s)
        self.metrics.avatars.set(len(self.avatars))
        if cfg.metrics_port is not None:
            await self._start_metrics_site()
        self.started = time.time()
        log.info("model %s (%dpx, lookahead %d ms%s), %d fps, round %.1f ms%s -> lead %.0f ms, pipeline latency %.0f ms",
                 mc.name, mc.image_size, mc.lookahead_ms, ", random weights" if p.random_weights else "",
                 self.fps, 1000 * self.warmup_times.get(1, 0),
                 f" (body {1000 * phases[0]:.1f} ms ahead, mouth {1000 * phases[1]:.1f} ms last)" if phases else "",
                 1000 * lead, 1000 * self.latency_s)

    def _auto_fps(self, p) -> int:
        """--fps auto: FAST_FPS at --latency low where a mouth can be made on every tick of it, else 25.

        A frame shows the audio of its own period, and an onset waits for the next tick that can show it: on
        average half a period, up to a whole one (20 / 40 ms at 25 fps, 10 / 20 at 50). At 50 fps the mouth phase
        (E_aud, the mouth net, the paste: ~6 ms on 2 CPU cores) runs on every tick while the bodies (the head,
        the eyes) come at the rate the lanes make them (~25 a second there: the other ticks are mouth-only). That
        needs two phases and lanes (ONNX Runtime on 2+ cores), or a GPU, which makes whole frames at 50 fps."""
        cfg = self.cfg
        if cfg.latency != "low":
            return 25
        name = getattr(p.rt, "name", "")
        dev = getattr(p.rt, "device", None)
        if name == "tensorrt" or (dev is not None and getattr(dev, "type", str(dev)) == "cuda"):
            return FAST_FPS
        lanes_ok = cfg.lanes is None or cfg.lanes > 1
        if (name == "onnxruntime" and cfg.late_mouth and p.late_mouth and p.can_reopen and lanes_ok
                and (os.cpu_count() or 1) >= 2):
            return FAST_FPS
        return 25

    async def _choose_lanes(self, phases, state) -> int:
        """ServeConfig.lanes, or (auto) 2 where one two-phase frame takes more than LANES_AUTO_SHARE of the
        frame period with ONNX Runtime on 2+ cores; with more than one lane, the runtime is reopened with one
        inference thread per lane and warmed up again (its phase times are the lanes')."""
        cfg, p, period = self.cfg, self.pipeline, self.clock.period
        lanes = cfg.lanes
        if lanes is not None and lanes < 1:
            raise InputError(f"--lanes {lanes}: must be 1 or more")
        if lanes is None:
            frame = sum(phases) if phases else 0.0
            lanes = 2 if (phases and getattr(p.rt, "name", "") == "onnxruntime" and (os.cpu_count() or 1) >= 2
                          and frame > LANES_AUTO_SHARE * period and p.can_reopen) else 1
            if lanes > 1:
                log.info("one frame takes %.1f ms of the %.0f ms period: %d lanes (bodies in flight at once, one "
                         "inference thread each; --lanes 1 turns this off)", 1000 * frame, 1000 * period, lanes)
        if lanes > 1:
            if not phases:
                raise InputError(f"--lanes {lanes} needs the frame in two phases: an ONNX Runtime export with the "
                                 "body / mouth graphs (a patch model) and late mouth on")
            if p.can_reopen and p.threads != 1:
                await asyncio.wrap_future(self.scheduler.submit(p.reopen, 1))
                self.warmup_times = await asyncio.wrap_future(self.scheduler.submit(p.warmup, state))
                if not p.phase_times.get(1):
                    raise InputError("the reopened runtime has no two-phase frame")
        return lanes

    async def _start_metrics_site(self) -> None:
        """/metrics alone on metrics_host:metrics_port (a private address a scraper reaches, not the public one)."""
        cfg = self.cfg
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        self._metrics_runner, self.metrics_port = await listen(app, cfg.metrics_host, cfg.metrics_port, "/metrics")
        host = f"[{cfg.metrics_host}]" if ":" in cfg.metrics_host else cfg.metrics_host
        log.info("metrics on http://%s:%d/metrics (not on the main address)", host, self.metrics_port)

    async def _setup_faces(self, p) -> None:
        """Face alignment settings onto the pipeline; the detector loaded once, off the event loop."""
        from engine.face import parse_output_size

        if self.cfg.align not in ("require", "auto", "off"):
            raise InputError(f"align must be require, auto or off, got {self.cfg.align!r}")
        parse_output_size(self.cfg.output_size)
        p.face_align, p.output_size = self.cfg.align, self.cfg.output_size
        if self.cfg.align != "off":
            from engine.face import get_detector

            det = await asyncio.to_thread(get_detector)
            log.info("face alignment %s with the %s detector; aligned avatars stream %s frames", self.cfg.align,
                     det.name, self.cfg.output_size)

    def _builtin_avatar_source(self):
        if self.cfg.avatar is not None:
            return Path(self.cfg.avatar), str(self.cfg.avatar)
        try:
            from engine.image import BUILTIN_AVATAR
        except ImportError:  # pragma: no cover
            BUILTIN_AVATAR = Path(__file__).resolve().parents[1] / "engine" / "assets" / "avatar.png"
        if Path(BUILTIN_AVATAR).is_file():
            return Path(BUILTIN_AVATAR), "built-in"
        from streaming.pipeline import placeholder_portrait

        log.warning("no built-in avatar at %s: showing a drawn placeholder portrait (pass --avatar IMG)",
                    BUILTIN_AVATAR)
        return placeholder_portrait(self.pipeline.cfg.image_size), "placeholder"

    async def stop(self) -> None:
        if self._collect_handle is not None:
            self._collect_handle.cancel()
            self._collect_handle = None
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self.avatars is not None:
            self.avatars.close()
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        if self._ice is not None:
            self._ice.restore()
            self._ice = None
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    # ==================================================================================== app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_upload_bytes + 256 * 1024,
                              middlewares=[self._middleware])
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/info", self.info)
        r.add_get("/healthz", self.healthz)
        if self.cfg.metrics_port is None:  # else on its own site (_start_metrics_site)
            r.add_get("/metrics", self.metrics_handler)
        r.add_post("/offer", self.offer)
        r.add_get("/sessions", self.list_sessions)
        r.add_get("/sessions/{id}", self.get_session)
        r.add_delete("/sessions/{id}", self.delete_session)
        r.add_post("/sessions/{id}/controls", self.post_controls)
        r.add_get("/sessions/{id}/outputs", self.get_outputs)
        r.add_post("/sessions/{id}/outputs", self.post_outputs)
        r.add_delete("/sessions/{id}/outputs/{name}", self.delete_output)
        r.add_post("/avatars", self.post_avatar)
        r.add_get("/avatars", self.get_avatars)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        resource = request.match_info.route.resource
        route = resource.canonical if resource else "unmatched"
        origin = request.headers.get("Origin")
        allowed = self._cors_allows(origin)
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
            resp = self._preflight(origin, allowed)
        else:
            resp = self._guard(request, route if resource else None, origin, allowed)
            if resp is None:
                try:
                    resp = await handler(request)
                except web.HTTPRequestEntityTooLarge as e:
                    resp = _error(413, f"request body too large (limit {e.max_size} bytes)")
                except web.HTTPException as e:
                    if e.status >= 400 and e.content_type != "application/json":
                        resp = _error(e.status, e.reason or e.text or "error")
                    else:
                        raise
                except Exception:  # noqa: BLE001
                    log.exception("%s %s failed", request.method, request.path)
                    resp = _error(500, "internal server error")
        if allowed:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "Retry-After, WWW-Authenticate"
        if self._cors:
            resp.headers.add("Vary", "Origin")
        self.metrics.http_requests.inc(route=route, status=str(resp.status))
        return resp

    # ------------------------------------------------------------------------------ security
    def _cors_allows(self, origin: str | None) -> bool:
        if origin is None or not self._cors:
            return False
        if "*" in self._cors:
            return True
        try:
            return _normalise_origin(origin) in self._cors
        except InputError:
            return False

    def _preflight(self, origin: str, allowed: bool) -> web.Response:
        if not allowed:
            return _error(403, f"cross-origin requests from {origin} are not allowed "
                               "(the server's --cors-origin lists the origins that are)")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"})

    def _guard(self, request: web.Request, route: str | None, origin: str | None,
               allowed: bool) -> web.Response | None:
        """None when the request may go on; else the 403 / 429 / 401 that answers it."""
        # a page on another origin can still send a "simple" POST (a form, multipart): refuse state changes
        # unless the origin is this server's own or an allowed one (browsers always send Origin on a POST)
        if origin is not None and request.method not in _SAFE_METHODS and not allowed \
                and origin.partition("://")[2].lower() != request.host.lower():
            return _error(403, f"cross-origin {request.method} from {origin} refused (same-origin only; "
                               "the server's --cors-origin allows others)")
        if route is None:  # no such route: its 404 / 405
            return None
        limiter = self._limits.get((request.method, route))
        if limiter is not None:
            wait = limiter.take(request.remote)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                if route == "/offer":
                    self.metrics.sessions_rejected.inc(reason="429")
                log.info("rate limit: %s %s from %s (retry in %d s)", request.method, route, request.remote, retry)
                return web.json_response(
                    {"error": f"too many requests to {request.method} {route} from your address; retry in {retry} s",
                     "retry_after_s": retry}, status=429, headers={"Retry-After": str(retry)})
        if self.cfg.token is None or route in _PUBLIC_ROUTES:
            return None
        given = _bearer(request)
        sid = request.match_info.get("id") if route.startswith("/sessions/") else None
        key = self._session_keys.get(sid) if sid is not None else None
        if key is not None:  # a session made by /offer: its own key, and only that, reaches it
            if _matches(given, key):
                return None
            return _unauthorized(f"session {sid!r} answers only to its own key: send \"Authorization: Bearer "
                                 "SESSION_KEY\" with the session_key of its /offer answer", given is not None)
        if sid is not None and sid not in self.sessions:
            return None  # its 404
        if _matches(given, self.cfg.token):
            return None
        if given is None:
            return _unauthorized("this server requires a token: send \"Authorization: Bearer TOKEN\" "
                                 "(the web page: open it as /?token=TOKEN)", False)
        return _unauthorized("wrong token", True)

    async def _json_body(self, request: web.Request, limit: int):
        if request.content_type != "application/json":
            raise _HttpError(415, f"expected Content-Type application/json, got {request.content_type or 'none'}")
        if request.content_length is not None and request.content_length > limit:
            raise _HttpError(413, f"request body too large ({request.content_length} > {limit} bytes)")
        data = await request.content.read(limit + 1)
        if len(data) > limit:
            raise _HttpError(413, f"request body too large (limit {limit} bytes)")
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _HttpError(400, f"body is not valid JSON: {e}") from None

    # ================================================================================ routes
    async def index(self, request):
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache",
                                                                "Referrer-Policy": "no-referrer"})

    async def info(self, request):
        p = self.pipeline
        return web.json_response({
            "model": p.cfg.name, "image_size": p.cfg.image_size, "fps": self.fps,
            "lookahead_ms": p.cfg.lookahead_ms, "latency_ms": round(self.latency_s * 1000, 1),
            "latency_level": self.cfg.latency, "lead_ms": round(self.lead_s * 1000, 1),
            "late_mouth": self.scheduler.phased, "lanes": self.lanes, "threads": p.threads,
            "body_lead_ms": round(self.scheduler.body_lead_s * 1000, 1) if self.scheduler.phased else None,
            "audio_margin_ms": round(self.audio_margin_s * 1000, 1), "lip_lag_ms": round(self.lip_lag_s * 1000, 1),
            "browser_playout": self.cfg.browser_playout,
            "browser_ptime_ms": LATENCY_LEVELS[self.cfg.latency].browser_ptime_ms,
            "random_weights": p.random_weights, "presets": sorted(p.presets),
            "exp_dim": p.cfg.latents.exp, "max_sessions": self.cfg.max_sessions,
            "admission": self.admission(),
            "avatars": self.avatars.list(),
            "ice_servers": [{k: v for k, v in (("urls", s.urls), ("username", s.username),
                                               ("credential", s.credential)) if v}
                            for s in self._ice_servers],
            "controls": ["pose", "gaze", "blink", "expression", "source", "interrupt", "stats"],
        })

    async def healthz(self, request):
        """200 "ok" while the server takes sessions or is merely full; 503 "draining" (shutting down: a
        load balancer should stop sending) or "degraded" (the scheduler thread died)."""
        sch = self.scheduler
        ok = sch is not None and sch.alive
        adm = self.admission()
        status = "draining" if self.draining else ("ok" if ok else "degraded")
        return web.json_response({
            "status": status, "sessions": len(self.sessions),
            "max_sessions": self.cfg.max_sessions, "scheduler_alive": ok,
            "round_ms": round(sch.est_round * 1000, 2) if sch else None,
            "admitting": adm["admitting"], "load": adm["load"],
            "uptime_s": round(time.time() - self.started, 1) if self.started else 0.0,
        }, status=200 if status == "ok" else 503)

    async def metrics_handler(self, request):
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def offer(self, request):
        from aiortc import RTCSessionDescription

        from streaming.rtc import answer_with_ptime, peer_connection

        from streaming.session import Session

        try:
            body = await self._json_body(request, self.cfg.max_offer_bytes)
            if not isinstance(body, dict):
                raise _HttpError(400, "the offer must be a JSON object with \"sdp\" and \"type\"")
            unknown = sorted(set(body) - {"sdp", "type", "avatar", "controls"})
            if unknown:
                raise _HttpError(400, f"unknown field(s) {', '.join(map(repr, unknown))} "
                                      "(allowed: sdp, type, avatar, controls)")
            sdp, typ = body.get("sdp"), body.get("type")
            if typ != "offer":
                raise _HttpError(400, f"\"type\" must be \"offer\", got {typ!r}")
            if not isinstance(sdp, str) or not sdp.strip():
                raise _HttpError(400, "\"sdp\" must be a non-empty string")
            if not sdp.lstrip().startswith("v=0") or "\nm=" not in sdp.replace("\r\n", "\n"):
                raise _HttpError(400, "malformed SDP: expected a session description starting with v=0 "
                                      "and holding at least one m= section")
            avatar_id = body.get("avatar") or self.avatars.DEFAULT_ID
            if not isinstance(avatar_id, str):
                raise _HttpError(400, "\"avatar\" must be a string id (see GET /avatars)")
            try:
                entry = self.avatars.get(avatar_id)
            except KeyError:
                raise _HttpError(404, f"unknown avatar {avatar_id!r}; upload one with POST /avatars "
                                      "or list them with GET /avatars") from None
            initial = []
            if body.get("controls") is not None:
                try:
                    initial = C.parse_controls(body["controls"], self._control_context())
                except C.ControlError as e:
                    raise _HttpError(400, f"controls: {e}") from None
        except _HttpError as e:
            if e.status != 503:
                self.metrics.sessions_rejected.inc(reason=str(e.status))
            return _error(e.status, e.message)
        client = client_key(request.remote)
        adm = self.admission()
        if not adm["admitting"] and adm["reason"] != "draining" and await self._reap_ghosts(client):
            adm = self.admission()  # the same client's silent sessions are gone: ask again
        if not adm["admitting"]:
            return self._refuse(adm)

        self._reserved += 1  # (no await since the admission check: offers cannot both take the last place)
        session = None
        try:
            pc = peer_connection(self._ice_servers)
            sid = secrets.token_urlsafe(16)  # 128 random bits
            key = secrets.token_urlsafe(32)  # the session's own credential for /sessions/{id}... (with a token)
            session = Session(
                sid, pc, clock=self.clock, scheduler=self.scheduler, pipeline=self.pipeline,
                metrics=self.metrics, avatar_id=entry.id, avatar=entry.state, latency_s=self.latency_s,
                lead_s=self.lead_s, lip_lag_s=self.lip_lag_s, margin_s=self.audio_margin_s,
                margin_adapt_s=self.cfg.margin_adapt_ms / 1000, seed=self.cfg.seed, peer_timeout_s=self.cfg.peer_timeout_s,
                connect_timeout_s=self.cfg.connect_timeout_s, stats_interval_s=self.cfg.stats_interval_s,
                audio_prefetch=self.cfg.audio_prefetch, grace_s=self.cfg.grace_ms / 1000,
                frame_end_hint=self.cfg.frame_end_hint, audio_packet_ms=self.cfg.audio_packet_ms,
                on_closed=self._session_closed)
            session.client = client
            loopback_only = self._ice is not None and self._ice.loopback_only
            try:
                await pc.setRemoteDescription(RTCSessionDescription(
                    sdp=filter_remote_candidates(sdp, loopback_only), type="offer"))
                session.attach_outbound()
                await pc.setLocalDescription(await pc.createAnswer())
                answer_sdp = self._with_playout_delay(session, sdp, pc.localDescription.sdp)
                ptime = LATENCY_LEVELS[self.cfg.latency].browser_ptime_ms
                if ptime:
                    answer_sdp = answer_with_ptime(answer_sdp, ptime)
            except Exception as e:  # noqa: BLE001 - aiortc raises many kinds on bad SDP
                await session.close("bad offer")
                self.metrics.sessions_rejected.inc(reason="400")
                return _error(400, f"malformed or unsupported SDP offer: {type(e).__name__}: {e}")
            if self.draining:  # shutdown began while this offer was being answered
                await session.close("server shutting down")
                return self._refuse(self.admission())
            if initial:
                session.apply_controls(initial)
            self.sessions[sid] = session
            self._session_keys[sid] = key
            entry.uses += 1
            self.metrics.sessions_total.inc()
            session.start()
            return web.json_response({"sdp": answer_sdp, "type": pc.localDescription.type,
                                      "session": sid, "session_key": key})
        except BaseException:
            if session is not None and not session.closed:
                await session.close("error while answering")
            raise
        finally:
            self._reserved -= 1

    # ------------------------------------------------------------------------- admission, drain
    def admission(self) -> dict:
        """Whether one more session is admitted now, why not, and the load figure a dispatcher balances on:
        load = max(predicted round time of the current sessions / round budget, sessions / max_sessions)
        (1.0 and above: full)."""
        sch, budget = self.scheduler, self.round_budget_s
        open_ = [s for s in self.sessions.values() if not s.closed]  # (closing ones are leaving)
        n = len(open_) + self._reserved
        # in the rounds: sessions in the batch, and those connecting that may still join it (a session whose
        # ICE has not completed for ghost_silence_s costs no round, and will likely never connect)
        batch = set(sch.sessions) if sch is not None else set()
        n_rounds = sum(1 for s in open_ if s in batch or s.silent_s() <= self.cfg.ghost_silence_s) + self._reserved
        cap = self.cfg.max_sessions
        now_s = sch.round_times.predict(n_rounds) if sch is not None else 0.0
        next_s = sch.round_times.predict(n_rounds + 1) if sch is not None else 0.0
        reason = None
        if self.draining:
            reason = "draining"
        elif sch is None or budget is None:
            reason = "starting"
        elif n >= cap:
            reason = "full"
        elif self.cfg.admission and n_rounds >= 1 and next_s > budget:
            reason = "overloaded"
        load = max(now_s / budget if budget else 0.0, n / cap)
        return {"admitting": reason is None, "reason": reason, "sessions": n, "max_sessions": cap,
                "load": round(load, 4), "round_budget_ms": round(budget * 1000, 2) if budget else None,
                "predicted_round_ms": round(now_s * 1000, 2), "predicted_round_next_ms": round(next_s * 1000, 2),
                "enabled": self.cfg.admission}

    def _with_playout_delay(self, session, offer_sdp: str, answer_sdp: str) -> str:
        """The answer, with the playout-delay extension negotiated on the avatar video when the offer has it
        and the latency level asks for one (the sender then writes it on every packet)."""
        from streaming.rtc import PLAYOUT_DELAY_URI, answer_with_extmap, offered_extmap_id, request_playout_delay

        sender, mid = session.video_sender, session.video_mid
        if self.cfg.browser_playout != "asap" or sender is None or mid is None:
            return answer_sdp
        ext = offered_extmap_id(offer_sdp, mid, PLAYOUT_DELAY_URI)
        if ext is None or not request_playout_delay(sender, ext, *ASAP_PLAYOUT_DELAY_MS):
            return answer_sdp
        session.playout_delay_ms = ASAP_PLAYOUT_DELAY_MS
        # the browser now holds its sound and not its picture: send the sound ahead by as much as the samples allow
        room = self.latency_s - session.clock.period / 2 - self.audio_margin_s - 0.002
        session.audio_track.lead_s = max(0.0, min(ASAP_AUDIO_LEAD_MS / 1000, room))
        return answer_with_extmap(answer_sdp, mid, ext, PLAYOUT_DELAY_URI)

    def _refuse(self, adm: dict) -> web.Response:
        reason = adm["reason"]
        retry = self.cfg.retry_after_s
        if reason == "draining":
            msg = "server shutting down: not accepting new sessions (try another server, or again shortly)"
            retry = max(retry, int(math.ceil(self.cfg.drain_timeout_s)))
        elif reason == "full":
            msg = f"server full ({adm['max_sessions']} sessions)"
        elif reason == "overloaded":
            msg = (f"server at capacity: one more session would slow the {adm['sessions']} open session(s) below "
                   f"the frame rate (predicted round {adm['predicted_round_next_ms']:.1f} ms > budget "
                   f"{adm['round_budget_ms']:.1f} ms)")
        else:
            msg = "server starting"
        self.metrics.sessions_rejected.inc(reason=reason)
        log.info("offer refused: %s", msg)
        return web.json_response({"error": msg, "reason": reason, "retry_after_s": retry,
                                  "load": adm["load"]}, status=503, headers={"Retry-After": str(retry)})

    async def _reap_ghosts(self, client: str) -> int:
        """Close `client`'s sessions whose media has been silent for ghost_silence_s (its own ghosts: a peer
        that vanished and is reconnecting); returns how many."""
        ghosts = [s for s in list(self.sessions.values())
                  if getattr(s, "client", None) == client and s.silent_s() > self.cfg.ghost_silence_s]
        if not ghosts:
            return 0
        log.info("reaping %d silent session(s) of %s to admit its new offer", len(ghosts), client)
        await asyncio.gather(*(s.close("replaced: silent while its client made a new offer") for s in ghosts),
                             return_exceptions=True)
        self.metrics.sessions_reaped.inc(len(ghosts), reason="ghost")
        return len(ghosts)

    async def drain(self, timeout: float | None = None, force: asyncio.Event | None = None) -> dict:
        """Refuse new offers, send every session a goodbye, and wait up to `timeout` (drain_timeout_s) for
        them to leave, or until `force` is set. Returns {"left", "remaining", "forced", "waited_s"}; the
        sessions still open are the caller's to close (stop())."""
        timeout = self.cfg.drain_timeout_s if timeout is None else timeout
        self.draining = True
        t0 = time.monotonic()
        n0 = len(self.sessions)
        for s in list(self.sessions.values()):
            s.send({"type": "goodbye", "reason": "server shutting down", "drain_s": timeout})
        log.info("draining: %d session(s) told goodbye; waiting up to %.0f s for them to leave", n0, timeout)
        forced = False
        while self.sessions or self._reserved:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                break
            if force is not None and force.is_set():
                forced = True
                break
            try:
                await asyncio.wait_for((force or asyncio.Event()).wait(), min(0.1, left))
            except asyncio.TimeoutError:
                pass
        out = {"left": n0 - len(self.sessions), "remaining": len(self.sessions), "forced": forced,
               "waited_s": round(time.monotonic() - t0, 2)}
        log.info("drain %s: %d session(s) left, %d still open (closed now), %.1f s",
                 "forced" if forced else ("timed out" if out["remaining"] else "complete"),
                 out["left"], out["remaining"], out["waited_s"])
        return out

    def _add_operations_metrics(self) -> None:
        from streaming.metrics import Counter, Gauge

        r = self.metrics.registry
        m = self.metrics
        m.sessions_reaped = r.add(Counter("marionette_sessions_reaped_total",
                                          "Sessions closed to admit their own client's new offer", ["reason"]))
        r.add(Gauge("marionette_load", "Worker load for a dispatcher: max(predicted round / budget, "
                                       "sessions / max_sessions); 1 and above is full",
                    fn=lambda: self.admission()["load"]))
        r.add(Gauge("marionette_admitting", "1 when one more session would be admitted now",
                    fn=lambda: float(self.admission()["admitting"])))
        r.add(Gauge("marionette_draining", "1 while shutting down", fn=lambda: float(self.draining)))
        r.add(Gauge("marionette_round_budget_seconds", "Round time one more session's round must fit",
                    fn=lambda: self.round_budget_s or 0.0))
        r.add(Gauge("marionette_round_predicted_seconds", "Predicted round time with the current sessions",
                    fn=lambda: self.admission()["predicted_round_ms"] / 1000))
        r.add(Gauge("marionette_round_predicted_next_seconds", "Predicted round time with one more session",
                    fn=lambda: self.admission()["predicted_round_next_ms"] / 1000))
        r.add(Gauge("marionette_scheduler_sessions", "Sessions in the scheduler's batch",
                    fn=lambda: len(self.scheduler.sessions) if self.scheduler else 0))
        r.add(Gauge("marionette_asyncio_tasks", "Tasks on the server's event loop",
                    fn=lambda: len(asyncio.all_tasks(self._loop)) if self._loop is not None else 0))
        r.add(Gauge("process_resident_memory_bytes", "Resident memory", fn=_rss_bytes))
        r.add(Gauge("process_open_fds", "Open file descriptors", fn=_open_fds))
        r.add(Gauge("process_threads", "OS threads of the process", fn=_os_threads))
        r.add(Gauge("marionette_executor_threads", "Pooled worker threads of the event loop's executors (they grow "
                                                   "on demand up to their bound)", fn=_pooled_threads))

    def _session_closed(self, session) -> None:
        if self.sessions.get(session.id) is session:
            self.sessions.pop(session.id, None)
            self._session_keys.pop(session.id, None)
        self._schedule_collect()

    def _schedule_collect(self, delay_s: float = 1.0) -> None:
        """A closed session leaves reference cycles (aiortc's peer connection, its tracks and codecs), and the
        codecs' native threads and buffers live until the cycle collector frees them, which on a heap the
        size of a loaded model runs rarely: without this, every session left ~6 threads and a few MB behind
        (issue 15's churn). With the startup heap frozen (`run_server`: gc.freeze), a full collection walks
        only what was made since and takes milliseconds, so one runs shortly after sessions close."""
        if self._collect_handle is not None or self._loop is None or gc.get_freeze_count() == 0:
            return
        self._collect_handle = self._loop.call_later(delay_s, self._collect)

    def _collect(self) -> None:
        self._collect_handle = None
        t0 = time.perf_counter()
        n = gc.collect()
        if not self.sessions:
            _malloc_trim()  # nothing streaming: hand the freed heap back to the OS (glibc keeps it otherwise)
        dt = time.perf_counter() - t0
        self.metrics.stage_latency.observe(dt, stage="gc")
        log.debug("collected %d objects after sessions closed (%.1f ms)", n, dt * 1000)

    def _control_context(self) -> C.ControlContext:
        return C.ControlContext(presets=self.pipeline.presets, exp_dim=self.pipeline.cfg.latents.exp)

    def _session(self, request):
        sid = request.match_info["id"]
        s = self.sessions.get(sid)
        if s is None:
            raise _HttpError(404, f"unknown session {sid!r}")
        return s

    async def list_sessions(self, request):
        return web.json_response({"sessions": [s.stats() for s in self.sessions.values()]})

    async def get_session(self, request):
        try:
            return web.json_response(self._session(request).stats())
        except _HttpError as e:
            return _error(e.status, e.message)

    async def delete_session(self, request):
        try:
            s = self._session(request)
        except _HttpError as e:
            return _error(e.status, e.message)
        await s.close("deleted by request")
        return web.json_response({"session": s.id, "closed": True})

    async def post_controls(self, request):
        try:
            s = self._session(request)
            body = await self._json_body(request, C.MAX_MESSAGE_BYTES * 4)
            try:
                ctls = C.parse_controls(body, s.control_context())
            except C.ControlError as e:
                s.control_errors += 1
                self.metrics.controls.inc(type="http", result="error")
                raise _HttpError(400, str(e)) from None
        except _HttpError as e:
            return _error(e.status, e.message)
        s.apply_controls(ctls)
        out = {"session": s.id, "applied": len(ctls)}
        if any(isinstance(c, C.StatsRequest) for c in ctls):
            out["stats"] = s.stats()
        return web.json_response(out)

    # outputs: the session's avatar also streamed to RTMP / WHIP / a virtual camera (streaming.outputs)
    async def get_outputs(self, request):
        try:
            s = self._session(request)
        except _HttpError as e:
            return _error(e.status, e.message)
        return web.json_response({"session": s.id, "outputs": [o.stats() for o in s.taps]})

    async def post_outputs(self, request):
        """{"url": "rtmp://..."} or {"urls": [...]} -> 201 {"outputs": [stats...]}"""
        from streaming.outputs import attach

        try:
            s = self._session(request)
            body = await self._json_body(request, 16 * 1024)
            urls = body.get("urls", [body["url"]] if "url" in body else None) if isinstance(body, dict) else None
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls) \
                    or set(body) - {"url", "urls"}:
                raise _HttpError(400, 'expected {"url": "rtmp://..."} or {"urls": ["rtmp://...", "whip://..."]}')
            if len(s.taps) + len(urls) > 8:
                raise _HttpError(409, "at most 8 outputs per session")
            try:
                outs = await attach(s, urls)
            except MarionetteError as e:  # a bad URL, or an output this machine cannot open
                raise _HttpError(400, str(e)) from None
        except _HttpError as e:
            return _error(e.status, e.message)
        return web.json_response({"session": s.id, "outputs": [o.stats() for o in outs]}, status=201)

    async def delete_output(self, request):
        from streaming.outputs import detach

        try:
            s = self._session(request)
        except _HttpError as e:
            return _error(e.status, e.message)
        name = request.match_info["name"]
        for o in list(s.taps):
            if o.name == name:
                await detach(s, o)
                return web.json_response({"session": s.id, "output": name, "closed": True})
        return _error(404, f"session {s.id!r} has no output {name!r}")

    async def post_avatar(self, request):
        limit = self.cfg.max_upload_bytes
        if request.content_length is not None and request.content_length > limit + 64 * 1024:
            return _error(413, f"upload too large ({request.content_length} bytes; limit {limit})")
        ctype = request.content_type
        data: bytes | None = None
        if ctype == "multipart/form-data":
            from aiohttp import BodyPartReader

            try:
                reader = await request.multipart()
                async for part in reader:
                    if not isinstance(part, BodyPartReader) or (
                            part.filename is None and part.name not in ("image", "file", "avatar")):
                        continue
                    buf = bytearray()
                    while True:
                        chunk = await part.read_chunk(65536)
                        if not chunk:
                            break
                        buf += chunk
                        if len(buf) > limit:
                            return _error(413, f"upload too large (limit {limit} bytes)")
                    data = bytes(buf)
                    break
            except (ValueError, AssertionError) as e:  # what aiohttp raises on a broken multipart body
                return _error(400, f"malformed multipart upload: {e}")
            if data is None:
                return _error(400, "multipart upload without an image part (name it \"image\")")
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            buf = bytearray()  # content.read(n) returns what has arrived, not n bytes: read to the end
            while True:
                chunk = await request.content.read(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    return _error(413, f"upload too large (limit {limit} bytes)")
            data = bytes(buf)
        else:
            return _error(415, f"send the portrait as image/png, image/jpeg, image/webp, application/octet-stream "
                               f"or multipart/form-data, not {ctype or 'no content type'}")
        if not data:
            return _error(400, "empty upload")
        # type and pixel count from the bytes' own header, before anything decodes a pixel; the image lives
        # in memory under its content hash (a multipart part's file name is never used)
        from streaming.avatars import UploadError, check_upload

        try:
            check_upload(data, self.cfg.max_upload_pixels)
        except UploadError as e:
            return _error(e.status, e.message)
        try:
            if self.pipeline.face_align != "off":
                try:
                    self.avatars.get(self.avatars.content_id(data))
                except KeyError:  # a new portrait: find and align its face on a worker thread
                    await asyncio.to_thread(self.pipeline.align_portrait, data)
            entry, created = await self.avatars.add(data)
        except InputError as e:
            return _error(400, f"not a usable portrait: {e}")
        self.metrics.avatars.set(len(self.avatars))
        return web.json_response({**entry.describe(), "created": created},
                                 status=201 if created else 200)

    async def get_avatars(self, request):
        return web.json_response({"avatars": self.avatars.list()})


class _HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ==================================================================================== serve
async def listen(app: web.Application, host: str, port: int | None, what: str,
                 hint: str = "") -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port) -> (its runner, the bound port); a port that cannot be
    had is an InputError naming `what` (plus `hint`), with nothing left running."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise InputError(f"{what}: cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    socks = site._server.sockets if site._server else None
    return runner, (socks[0].getsockname()[1] if socks else port)


async def run_server(cfg: ServeConfig, stop: asyncio.Event | None = None, ready=None) -> None:
    """Start the server, serve until `stop` is set (or SIGINT/SIGTERM), then shut down cleanly."""
    server = AvatarServer(cfg)
    await server.start()
    try:
        runner, port = await listen(server.app(), cfg.host, cfg.port, "the server")
    except InputError:
        await server.stop()
        raise
    # what start() made (the model, the avatar, the libraries) lives as long as the process: frozen, the cycle
    # collector no longer walks it, and the collections after sessions close (_schedule_collect) stay short
    gc.collect()
    gc.freeze()
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig) -> None:
        if not stop.is_set():
            log.info("%s: draining (up to %.0f s; send it again to close everything now)", sig.name,
                     cfg.drain_timeout_s)
            stop.set()
        else:
            log.warning("%s again: closing every session now", sig.name)
            force.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    if cfg.token is None and not _is_loopback(cfg.host):
        log.warning("listening on %s without a token: anyone who reaches it can start sessions, upload avatars "
                    "and control every session (set --token or MARIONETTE_TOKEN; docs/security.md)", cfg.host)
    log.info("serving on http://%s:%d/ (model %s, %d fps, pipeline latency %.0f ms)", host, port,
             server.pipeline.cfg.name, server.fps, server.latency_s * 1000)
    if ready is not None:
        ready(server, port)
    try:
        await stop.wait()
        await server.drain(cfg.drain_timeout_s, force)
    finally:
        await runner.cleanup()
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
        log.info("server stopped")


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return float("nan")


def _open_fds() -> float:
    try:
        return float(len(os.listdir("/proc/self/fd")))
    except OSError:
        return float("nan")


def _os_threads() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return float("nan")


_LIBC = None


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): freed memory of every arena back to the OS (codec threads allocate in arenas of
    their own, which otherwise keep what the closed sessions freed). Nothing where there is no glibc."""
    global _LIBC
    try:
        if _LIBC is None:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        _LIBC = False


def _pooled_threads() -> float:
    import threading

    return float(sum(1 for t in threading.enumerate() if t.name.startswith(_POOL_PREFIXES)))


_POOL_PREFIXES = ("uvloop_", "asyncio_", "ThreadPoolExecutor")  # default executors' worker names


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(cfg: ServeConfig) -> None:
    """Blocking entry point of `marionette serve` (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        uvloop = None
    if uvloop is not None:
        uvloop.run(run_server(cfg))
    else:  # pragma: no cover
        asyncio.run(run_server(cfg))


def config_from_dict(d: dict) -> ServeConfig:
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    return ServeConfig(**{k: v for k, v in d.items() if k in fields})
