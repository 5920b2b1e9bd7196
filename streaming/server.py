"""`marionette serve`: aiohttp signaling + aiortc media on uvloop.

Routes
  GET  /                          the demo page
  GET  /info                      model, presets, fps, latency (what the page needs)
  POST /offer                     {"sdp", "type": "offer", "avatar"?, "controls"?}
                                  -> {"sdp", "type": "answer", "session"}
  GET  /sessions, GET /sessions/{id}                         stats
  POST /sessions/{id}/controls    one control object or a list (same JSON as the data channel)
  GET|POST /sessions/{id}/outputs, DELETE /sessions/{id}/outputs/{name}
                                  the session's avatar also to RTMP / WHIP / a virtual camera
                                  ({"url": ...}; see streaming.outputs and docs/live.md)
  DELETE /sessions/{id}
  POST /avatars                   a portrait (raw image body or multipart), size-limited -> {"id"}
  GET  /avatars
  GET  /healthz, GET /metrics     (Prometheus text)

Pipeline latency. Stream sample n (arriving at nominal time a(n)) is played, and shown as lips, at
a(n) + L, with
  L = 1/(2 fps) (the second half of the frame's own audio, centred on its tick)
      + lookahead (the lip encoder's future context) + the mel window's overhang
      + an arrival margin (jitter) + the scheduler lead (time reserved to compute a round),
  rounded up to 10 ms by the stream offset.
The lead defaults to 1.5 x the measured 90th-percentile round time for one session (+5 ms),
between 15 ms and two frame periods: a machine that computes slowly or unevenly (a busy one) buys
smooth video with up to one extra frame period of latency; rounds then run up to a tick ahead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from engine.errors import InputError, MarionetteError
from streaming import controls as C
from streaming.ice import filter_remote_candidates, ice_servers, restrict_host_candidates
from streaming.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    avatar: Path | None = None
    checkpoint: Path | None = None
    config: str = "lite"
    backend: str = "torch"
    fps: int = 25
    ice_hosts: tuple[str, ...] = ()
    ice_servers: tuple[str, ...] = ()
    max_sessions: int = 8
    max_upload_bytes: int = 8 * 1024 * 1024
    exported: Path | None = None  # a `marionette export` directory (onnxruntime / tensorrt)
    precision: str = "fp32"
    kernels: bool = False  # torch on CUDA: the fused Triton warp kernels (opt-in)
    seed: int = 0
    lead_ms: float | None = None  # scheduler lead; None: from the warmup measurement
    threads: int | None = None  # inference threads; None: all cores but one
    # not on the command line
    audio_margin_ms: float = 30.0
    peer_timeout_s: float = 5.0
    connect_timeout_s: float = 20.0
    stats_interval_s: float = 1.0
    max_avatars: int = 32
    max_offer_bytes: int = 128 * 1024
    audio_prefetch: int | None = 1  # inbound audio packets aiortc's jitter buffer holds (its default: 4)
    grace_ms: float = 12.0  # how long a video tick waits for a frame still being made before dropping
    # real photos (engine.face), for --avatar and uploads: "require" (the CLI's default) finds and aligns the
    # face, 400 without one; "auto" aligns when a face is found; "off" (the library default) uses images as
    # they are. Aligned avatars stream output_size frames around the face ("512": 512x512; "crop": the
    # model's own crop; "WxH"; "original": the whole photo)
    align: str = "off"
    output_size: str = "512"


def _error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


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
        self.warmup_times: dict[int, float] = {}
        self._ice = None
        try:
            self._ice_servers = ice_servers(cfg.ice_servers)
        except ValueError as e:
            raise InputError(str(e)) from None
        self.started = None

    # =============================================================================== lifecycle
    async def start(self) -> None:
        from streaming.avatars import AvatarStore
        from streaming.clock import MediaClock
        from streaming.pipeline import Pipeline
        from streaming.scheduler import Scheduler

        cfg = self.cfg
        if cfg.fps <= 0 or 90000 % cfg.fps:
            raise InputError(f"--fps {cfg.fps}: must divide 90000 (e.g. 20, 24, 25, 30)")
        if cfg.ice_hosts:
            try:
                self._ice = restrict_host_candidates(cfg.ice_hosts)
            except ValueError as e:
                raise InputError(str(e)) from None
        if self.pipeline is None:
            self.pipeline = await asyncio.to_thread(Pipeline.load, cfg.checkpoint, cfg.config, cfg.backend,
                                                    cfg.seed, cfg.threads, cfg.exported, cfg.precision,
                                                    cfg.kernels)
        p = self.pipeline
        if p.random_weights:
            log.warning("serving a RANDOMLY initialised model: the avatar will not look like a talking head")
        await self._setup_faces(p)
        self.clock = MediaClock(cfg.fps)
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
        period = self.clock.period
        if cfg.lead_ms is not None:
            lead = cfg.lead_ms / 1000
        else:
            lead = min(2 * period, max(0.015, 1.5 * self.warmup_times.get(1, period) + 0.005))
        self.lead_s = lead
        self.scheduler.lead_s = lead
        mc = p.cfg
        overhang = mc.audio.right_overhang / mc.audio.sample_rate
        self.latency_s = period / 2 + mc.lookahead_ms / 1000 + overhang + cfg.audio_margin_ms / 1000 + lead
        self.metrics.pipeline_latency.set(self.latency_s)
        self.metrics.avatars.set(len(self.avatars))
        self.started = time.time()
        log.info("model %s (%dpx, lookahead %d ms%s), %d fps, round %.1f ms -> lead %.0f ms, pipeline latency %.0f ms",
                 mc.name, mc.image_size, mc.lookahead_ms, ", random weights" if p.random_weights else "",
                 cfg.fps, 1000 * self.warmup_times.get(1, 0), 1000 * lead, 1000 * self.latency_s)

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
        await asyncio.gather(*(s.close("server shutting down") for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)
        if self._ice is not None:
            self._ice.restore()
            self._ice = None

    # ==================================================================================== app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_upload_bytes + 256 * 1024,
                              middlewares=[self._middleware])
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/info", self.info)
        r.add_get("/healthz", self.healthz)
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
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
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
        self.metrics.http_requests.inc(route=route, status=str(resp.status))
        return resp

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
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(self, request):
        p = self.pipeline
        return web.json_response({
            "model": p.cfg.name, "image_size": p.cfg.image_size, "fps": self.cfg.fps,
            "lookahead_ms": p.cfg.lookahead_ms, "latency_ms": round(self.latency_s * 1000, 1),
            "random_weights": p.random_weights, "presets": sorted(p.presets),
            "exp_dim": p.cfg.latents.exp, "max_sessions": self.cfg.max_sessions,
            "avatars": self.avatars.list(),
            "ice_servers": [{k: v for k, v in (("urls", s.urls), ("username", s.username),
                                               ("credential", s.credential)) if v}
                            for s in self._ice_servers],
            "controls": ["pose", "gaze", "blink", "expression", "source", "interrupt", "stats"],
        })

    async def healthz(self, request):
        sch = self.scheduler
        ok = sch is not None and sch.alive
        return web.json_response({
            "status": "ok" if ok else "degraded", "sessions": len(self.sessions),
            "max_sessions": self.cfg.max_sessions, "scheduler_alive": ok,
            "round_ms": round(sch.est_round * 1000, 2) if sch else None,
            "uptime_s": round(time.time() - self.started, 1) if self.started else 0.0,
        }, status=200 if ok else 503)

    async def metrics_handler(self, request):
        return web.Response(body=self.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    async def offer(self, request):
        from aiortc import RTCSessionDescription

        from streaming.rtc import peer_connection

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
            if len(self.sessions) + self._reserved >= self.cfg.max_sessions:
                self.metrics.sessions_rejected.inc(reason="full")
                return web.json_response({"error": f"server full ({self.cfg.max_sessions} sessions)"},
                                         status=503, headers={"Retry-After": "5"})
        except _HttpError as e:
            if e.status != 503:
                self.metrics.sessions_rejected.inc(reason=str(e.status))
            return _error(e.status, e.message)

        self._reserved += 1
        session = None
        try:
            pc = peer_connection(self._ice_servers)
            sid = secrets.token_urlsafe(9)
            session = Session(
                sid, pc, clock=self.clock, scheduler=self.scheduler, pipeline=self.pipeline,
                metrics=self.metrics, avatar_id=entry.id, avatar=entry.state, latency_s=self.latency_s,
                lead_s=self.lead_s, seed=self.cfg.seed, peer_timeout_s=self.cfg.peer_timeout_s,
                connect_timeout_s=self.cfg.connect_timeout_s, stats_interval_s=self.cfg.stats_interval_s,
                audio_prefetch=self.cfg.audio_prefetch, grace_s=self.cfg.grace_ms / 1000,
                on_closed=self._session_closed)
            loopback_only = self._ice is not None and self._ice.loopback_only
            try:
                await pc.setRemoteDescription(RTCSessionDescription(
                    sdp=filter_remote_candidates(sdp, loopback_only), type="offer"))
                session.attach_outbound()
                await pc.setLocalDescription(await pc.createAnswer())
            except Exception as e:  # noqa: BLE001 - aiortc raises many kinds on bad SDP
                await session.close("bad offer")
                self.metrics.sessions_rejected.inc(reason="400")
                return _error(400, f"malformed or unsupported SDP offer: {type(e).__name__}: {e}")
            if initial:
                session.apply_controls(initial)
            self.sessions[sid] = session
            entry.uses += 1
            self.metrics.sessions_total.inc()
            session.start()
            return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                      "session": sid})
        except BaseException:
            if session is not None and not session.closed:
                await session.close("error while answering")
            raise
        finally:
            self._reserved -= 1

    def _session_closed(self, session) -> None:
        self.sessions.pop(session.id, None)

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
            reader = await request.multipart()
            async for part in reader:
                if part.filename is None and part.name not in ("image", "file", "avatar"):
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
            return _error(415, f"send the portrait as image/png, image/jpeg, application/octet-stream or "
                               f"multipart/form-data, not {ctype or 'no content type'}")
        if not data:
            return _error(400, "empty upload")
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
async def run_server(cfg: ServeConfig, stop: asyncio.Event | None = None, ready=None) -> None:
    """Start the server, serve until `stop` is set (or SIGINT/SIGTERM), then shut down cleanly."""
    server = AvatarServer(cfg)
    await server.start()
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await server.stop()
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    port = site._server.sockets[0].getsockname()[1] if site._server and site._server.sockets else cfg.port
    log.info("serving on http://%s:%d/ (model %s, %d fps, pipeline latency %.0f ms)", host, port,
             server.pipeline.cfg.name, cfg.fps, server.latency_s * 1000)
    if ready is not None:
        ready(server, port)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await server.stop()


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
