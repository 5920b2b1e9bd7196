"""`marionette live`: the avatar without a browser. Speech from the microphone, a file or a network
stream; the talking head out to RTMP/SRT, WHIP and/or a virtual camera; controls from the keyboard
and over HTTP.

It is the server's own machinery with a different front door: `AvatarServer.start()` loads the
model, warms it up, starts the media clock and the scheduler and sets the pipeline latency; one
`LiveSession` (a `Session` with no WebRTC peer) takes the audio input where a peer's microphone
would be, and its two paced tracks (`AvatarVideoTrack`, `DelayedAudioTrack`) are pulled by a pump
instead of aiortc. Every frame they release goes to the outputs (`streaming.outputs`, taps on the
session), audio and video stamped from the one media clock. The server's HTTP app runs too (on
`control_port`), so the same control messages reach the avatar as on `serve`:

    POST /sessions/live/controls   (or POST /controls)   {"type": "expression", "preset": "happy"}
    GET  /sessions/live            (or GET /stats)       stats, outputs included
    POST /sessions/live/outputs    {"url": "rtmp://..."} another output while running

and a browser can still watch at http://HOST:PORT/ (a WebRTC session of its own).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import InputError, MissingDependency
from streaming.outputs import OutputConfig, parse_output

log = logging.getLogger(__name__)

LIVE_ID = "live"
RATE = 48000
CHUNK = 960  # 20 ms
LIVE_SCHEMES = ("rtmp", "rtmps", "srt", "udp", "rtp", "rtsp", "tcp")  # sources that pace themselves


@dataclass(frozen=True)
class LiveConfig:
    audio_in: str  # "mic", "mic:DEVICE", a file path, or a URL PyAV opens
    outputs: tuple[str, ...]
    serve: object = None  # streaming.server.ServeConfig: model, backend, fps, avatar, ICE (control host/port too)
    output: OutputConfig = field(default_factory=OutputConfig)
    control: bool = True  # the HTTP control endpoint on serve.host:serve.port
    keyboard: bool | None = None  # None: when stdin is a terminal
    loop: bool = False  # a file input starts over at its end
    duration_s: float | None = None  # stop after this long (None: until Ctrl-C / the file ends)
    tail_s: float = 0.5  # after a file ends: keep streaming this long past the pipeline latency
    initial_controls: tuple = ()  # control messages (dicts) applied at start, e.g. an expression


# ====================================================================================== session
def _live_session_class():
    from streaming.session import Session

    class LiveSession(Session):
        """A session whose speech comes from a local source and whose tracks feed only taps."""

        def start(self) -> None:
            self._spawn(self._pump(self.video_track), "pump-video")
            self._spawn(self._pump(self.audio_track), "pump-audio")
            self._spawn(self._monitor_local(), "stats")

        async def _pump(self, track) -> None:
            from aiortc.mediastreams import MediaStreamError

            while not self.closed:
                try:
                    await track.recv()  # paced by the media clock; the frame goes to the taps
                except MediaStreamError:
                    return

        async def _monitor_local(self) -> None:
            while not self.closed:
                await asyncio.sleep(10)
                s = self.stats()
                log.info("live: %.0f fps, A/V %s ms, %d dropped, outputs: %s", s["fps"], s["av_offset_ms"],
                         s["frames_dropped"], ", ".join(f"{o['name']} {o['state']}" for o in s["outputs"]))

        def push_pcm(self, pcm: np.ndarray, at: float | None = None) -> None:
            """int16 mono 48 kHz samples that arrived at clock time `at` (default: now; event loop)."""
            import av

            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, np.int16).reshape(1, -1), format="s16",
                                           layout="mono")
            f.sample_rate = RATE
            self.audio.push(f, self.clock.now() if at is None else at)

        def stats(self) -> dict:
            out = super().stats()
            out["outputs"] = [o.stats() for o in self.taps]
            out["input"] = getattr(self, "input_stats", lambda: None)()
            return out

    return LiveSession


# ======================================================================================== inputs
class FileInput:
    """Audio from anything PyAV opens (a file, an http(s) URL, an RTMP/SRT/RTSP stream), decoded on
    a thread to 48 kHz mono int16 and pushed in 20 ms chunks. Files and http are paced in real time
    by sample count against the media clock; live network sources are pushed as they arrive (they
    pace themselves; the session's inbound audio absorbs their jitter and clock rate)."""

    def __init__(self, source: str, loop: bool = False):
        self.source = source
        self.loop = loop
        scheme = source.split("://", 1)[0].lower() if "://" in source else ""
        self.is_url = bool(scheme)
        self.paced = scheme not in LIVE_SCHEMES
        if not self.is_url and not Path(source).is_file():
            raise InputError(f"--audio-in {source!r}: no such file (give a file, a URL, or 'mic')")
        self._q: queue.Queue = queue.Queue(maxsize=50)  # 1 s of 20 ms chunks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0
        self.passes = 0
        self.error: str | None = None
        self.finished = asyncio.Event()

    def check(self) -> None:
        """Open the source once (InputError when it has no audio or cannot be opened)."""
        import av

        try:
            with av.open(self.source, timeout=10) as c:
                if not c.streams.audio:
                    raise InputError(f"--audio-in {self.source}: no audio stream")
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - av raises many kinds
            raise InputError(f"--audio-in {self.source}: cannot open ({type(e).__name__}: {e})") from None

    def _decode(self) -> None:
        import av

        buf = np.zeros(0, np.int16)
        try:
            while not self._stop.is_set():
                with av.open(self.source, timeout=10) as c:
                    stream = c.streams.audio[0]
                    rs = av.AudioResampler(format="s16", layout="mono", rate=RATE)
                    for frame in c.decode(stream):
                        for g in rs.resample(frame):
                            buf = np.concatenate([buf, g.to_ndarray().reshape(-1)])
                        while len(buf) >= CHUNK:
                            if not self._put(buf[:CHUNK].copy()):
                                return
                            buf = buf[CHUNK:]
                    for g in rs.resample(None):
                        buf = np.concatenate([buf, g.to_ndarray().reshape(-1)])
                self.passes += 1
                if not self.loop:
                    break
            if len(buf):
                self._put(np.concatenate([buf, np.zeros(CHUNK - len(buf), np.int16)]))
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {e}"
            log.error("audio input %s: %s", self.source, self.error)
        finally:
            self._put(None)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    async def run(self, session) -> None:
        self._thread = threading.Thread(target=self._decode, name="marionette-audio-in", daemon=True)
        self._thread.start()
        clock = session.clock
        t_start = None
        n = 0
        try:
            while True:
                try:
                    x = self._q.get_nowait()
                except queue.Empty:
                    await asyncio.sleep(0.005)
                    continue
                if x is None:
                    break
                if self.paced:
                    if t_start is None:
                        t_start = clock.now()
                    # chunk n arrives when its last sample is due (the pace of a microphone), and is
                    # stamped with that nominal time, from the sample count: an event-loop stall delays
                    # the push, never the sound's place on the media clock (the pipeline latency covers it)
                    due = t_start + (n + 1) * CHUNK / RATE
                    await clock.sleep_until(due)
                    session.push_pcm(x, at=due)
                else:
                    session.push_pcm(x)
                n += 1
                self.samples += len(x)
        finally:
            self.finished.set()

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        return {"source": self.source, "seconds": round(self.samples / RATE, 2), "passes": self.passes,
                "error": self.error}


class MicInput:
    """The default (or a named) microphone through PortAudio (sounddevice), 48 kHz mono, 20 ms blocks."""

    def __init__(self, device: str | None = None):
        self.device = device
        self.samples = 0
        self.overflows = 0
        self.finished = asyncio.Event()  # never set: a microphone does not end
        self._stream = None

    @staticmethod
    def _sd():
        try:
            import sounddevice
        except ImportError:
            raise MissingDependency("the microphone needs the `mic` extra: pip install 'marionette[mic]' "
                                    "(sounddevice, a PortAudio binding)") from None
        except OSError as e:  # the wheel is there, the PortAudio library is not (Linux)
            raise MissingDependency(f"the microphone needs the PortAudio library ({e}): "
                                    "apt-get install libportaudio2 (Debian/Ubuntu)") from None
        return sounddevice

    def check(self) -> None:
        sd = self._sd()
        dev = int(self.device) if self.device and self.device.isdigit() else self.device
        try:
            sd.check_input_settings(device=dev, channels=1, samplerate=RATE, dtype="int16")
        except Exception as e:  # noqa: BLE001 - PortAudioError / ValueError
            raise InputError(f"--audio-in mic{':' + self.device if self.device else ''}: no usable input "
                             f"device ({e}); list them with: python -m sounddevice") from None

    async def run(self, session) -> None:
        sd = self._sd()
        loop = asyncio.get_running_loop()
        dev = int(self.device) if self.device and self.device.isdigit() else self.device

        def callback(indata, frames, t, status):
            if status.input_overflow:
                self.overflows += 1
            loop.call_soon_threadsafe(self._push, session, indata[:, 0].copy())

        self._stream = sd.InputStream(samplerate=RATE, blocksize=CHUNK, channels=1, dtype="int16",
                                      device=dev, callback=callback, latency="low")
        self._stream.start()
        log.info("microphone: %s", self._stream.device if hasattr(self._stream, "device") else dev)
        try:
            await asyncio.Event().wait()
        finally:
            self.stop()

    def _push(self, session, pcm) -> None:
        if not session.closed:
            session.push_pcm(pcm)
            self.samples += len(pcm)

    def stop(self) -> None:
        s, self._stream = self._stream, None
        if s is not None:
            s.stop()
            s.close()

    def stats(self) -> dict:
        return {"source": "mic" + (f":{self.device}" if self.device else ""),
                "seconds": round(self.samples / RATE, 2), "overflows": self.overflows}


def open_input(spec: str, loop: bool = False):
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("--audio-in needs 'mic', a file or a URL")
    spec = spec.strip()
    if spec == "mic" or spec.startswith("mic:"):
        return MicInput(spec[4:] or None)
    return FileInput(spec, loop=loop)


# ===================================================================================== keyboard
KEY_HELP = """keys: 1-7 expression (neutral happy sad angry surprised disgusted fearful)  + / - intensity
      a d  yaw   w s  pitch   q e  roll   (10 degrees a press)     r  head back to idle motion
      i j k l  gaze                                                   o  eyes back to idle
      b  blink      space  interrupt (silence what is pending)      h  this help      Ctrl-C  quit"""


class KeyControls:
    """Terminal keys -> the same control messages as the data channel / HTTP (dicts)."""

    STEP = {"yaw": 10.0, "pitch": 10.0, "roll": 10.0}

    def __init__(self, presets):
        from streaming import controls as C

        names = [p for p in ("neutral", "happy", "sad", "angry", "surprised", "disgusted", "fearful") if p in presets]
        names += sorted(set(presets) - set(names))
        self.presets = names[:9]
        self.pose = {"yaw": 0.0, "pitch": 0.0, "roll": 0.0}
        self.gaze = [0.0, 0.0]
        self.expression = None
        self.intensity = 1.0
        self._lim = C.POSE_RANGE

    def _pose(self, axis: str, sign: float) -> list:
        v = self.pose[axis] + sign * self.STEP[axis]
        self.pose[axis] = max(-self._lim[axis], min(self._lim[axis], v))
        return [{"type": "source", "factor": "pose", "from": "controls"},
                {"type": "pose", **self.pose, "transition_ms": 200}]

    def _gaze(self, dx: float, dy: float) -> list:
        self.gaze = [max(-1.0, min(1.0, self.gaze[0] + dx)), max(-1.0, min(1.0, self.gaze[1] + dy))]
        return [{"type": "source", "factor": "eye", "from": "controls"},
                {"type": "gaze", "x": self.gaze[0], "y": self.gaze[1], "transition_ms": 150}]

    def messages(self, key: str) -> list | None:
        """The control messages one key press sends ([] for help, None for an unbound key)."""
        if key.isdigit() and key != "0":
            i = int(key) - 1
            if i >= len(self.presets):
                return None
            self.expression = self.presets[i]
            return [{"type": "expression", "preset": self.expression, "intensity": self.intensity,
                     "transition_ms": 300}]
        if key in "+=-" and key:
            self.intensity = max(0.0, min(2.0, self.intensity + (0.25 if key in "+=" else -0.25)))
            if self.expression is None:
                return []
            return [{"type": "expression", "preset": self.expression, "intensity": self.intensity,
                     "transition_ms": 200}]
        table = {"a": ("yaw", 1.0), "d": ("yaw", -1.0), "w": ("pitch", 1.0), "s": ("pitch", -1.0),
                 "q": ("roll", 1.0), "e": ("roll", -1.0)}
        if key in table:
            return self._pose(*table[key])
        gz = {"j": (0.25, 0.0), "l": (-0.25, 0.0), "i": (0.0, 0.25), "k": (0.0, -0.25)}
        if key in gz:
            return self._gaze(*gz[key])
        if key == "r":
            self.pose = {"yaw": 0.0, "pitch": 0.0, "roll": 0.0}
            return [{"type": "source", "factor": "pose", "from": "idle"}]
        if key == "o":
            self.gaze = [0.0, 0.0]
            return [{"type": "source", "factor": "eye", "from": "idle"}]
        if key == "b":
            return [{"type": "blink"}]
        if key == " ":
            return [{"type": "interrupt"}]
        if key in ("h", "?"):
            return []
        return None


class _Terminal:
    """stdin in cbreak mode (keys without Enter, Ctrl-C still a signal) read on the event loop."""

    def __init__(self, on_key):
        self.on_key = on_key
        self._old = None

    def __enter__(self):
        import termios
        import tty

        fd = sys.stdin.fileno()
        self._old = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        asyncio.get_running_loop().add_reader(fd, self._read)
        return self

    def _read(self) -> None:
        import os

        data = os.read(sys.stdin.fileno(), 64)
        for ch in data.decode("utf-8", "ignore"):
            self.on_key(ch)

    def __exit__(self, *exc):
        import termios

        fd = sys.stdin.fileno()
        try:
            asyncio.get_running_loop().remove_reader(fd)
        except Exception:  # noqa: BLE001
            pass
        if self._old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, self._old)


# =========================================================================================== run
class LiveHandle:
    """What `run_live(ready=...)` hands back: the server, the session, the outputs, the control port."""

    def __init__(self, server, session, outputs, port, source):
        self.server, self.session, self.outputs, self.port, self.source = server, session, outputs, port, source

    @property
    def url(self) -> str | None:
        return None if self.port is None else f"http://{self.server.cfg.host}:{self.port}"


def validate(cfg: LiveConfig) -> None:
    """Everything checkable before the model loads: outputs, input, fps (InputError)."""
    if not cfg.outputs:
        raise InputError("give at least one --out (rtmp://..., whip://..., vcam)")
    for u in cfg.outputs:
        parse_output(u)
    if cfg.duration_s is not None and not cfg.duration_s > 0:
        raise InputError("--duration must be positive")


async def run_live(cfg: LiveConfig, stop: asyncio.Event | None = None, ready=None) -> dict:
    """Run `marionette live` until `stop`, SIGINT/SIGTERM, `duration_s`, or the end of a file input.
    Returns the session's final stats."""
    from streaming import controls as C
    from streaming.outputs import attach
    from streaming.server import AvatarServer, ServeConfig, listen

    validate(cfg)
    source = open_input(cfg.audio_in, loop=cfg.loop)
    await asyncio.to_thread(source.check)
    # broadcast and call outputs hold seconds (RTMP) or their own buffers: `balanced`, and lips centred on their
    # sound; a 15 ms margin would buy nothing there and drop frames on a busy machine
    scfg = cfg.serve or ServeConfig(latency="balanced")
    if scfg.lip_lag_ms is None:
        scfg = dataclasses.replace(scfg, lip_lag_ms=0.0)
    server = AvatarServer(scfg)
    stop = stop or asyncio.Event()
    runner = None
    session = None
    tasks = []
    loop = asyncio.get_running_loop()
    try:
        await server.start()
        cls = _live_session_class()
        session = cls(LIVE_ID, None, clock=server.clock, scheduler=server.scheduler, pipeline=server.pipeline,
                      metrics=server.metrics, avatar_id=server.avatars.DEFAULT_ID,
                      avatar=server.avatars.get(server.avatars.DEFAULT_ID).state, latency_s=server.latency_s,
                      lead_s=server.lead_s, lip_lag_s=server.lip_lag_s, margin_s=server.audio_margin_s,
                      margin_adapt_s=scfg.margin_adapt_ms / 1000, seed=scfg.seed, grace_s=scfg.grace_ms / 1000,
                      on_closed=server._session_closed)
        session.input_stats = source.stats
        if cfg.initial_controls:
            session.apply_controls(C.parse_controls(list(cfg.initial_controls), session.control_context()))
        server.sessions[LIVE_ID] = session
        outs = await attach(session, cfg.outputs, cfg.output)
        port = None
        if cfg.control:
            app = server.app()
            app.router.add_post("/controls", _alias(server, "post_controls"))
            app.router.add_get("/stats", _alias(server, "get_session"))
            runner, port = await listen(app, scfg.host, scfg.port, "control endpoint",
                                        " (choose another --control-port, or --no-control)")
            log.info("controls: POST http://%s:%d/controls (the data channel's JSON); stats: GET /stats",
                     scfg.host, port)
        session.start()
        tasks.append(asyncio.ensure_future(source.run(session)))
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
                pass
        log.info("live: %s -> %s (pipeline latency %.0f ms)", cfg.audio_in,
                 ", ".join(o.spec.describe() for o in outs), server.latency_s * 1000)
        if ready is not None:
            ready(LiveHandle(server, session, outs, port, source))
        keyboard = cfg.keyboard if cfg.keyboard is not None else (sys.stdin.isatty() and sys.platform != "win32")
        term = None
        if keyboard:
            keys = KeyControls(server.pipeline.presets)

            def on_key(ch):
                msgs = keys.messages(ch)
                if msgs == []:
                    log.info(KEY_HELP)
                if msgs:
                    try:
                        session.apply_controls(C.parse_controls(msgs, session.control_context()))
                    except C.ControlError as e:
                        log.warning("key %r: %s", ch, e)

            term = _Terminal(on_key).__enter__()
            log.info(KEY_HELP)
        try:
            await _wait(stop, source, cfg, lambda: session.latency_s)
        finally:
            if term is not None:
                term.__exit__(None, None, None)
        # the final figures once everything has stopped: an output thread may still be sending its last frame
        await _stop_session(source, tasks, session)
        stats = session.stats()
        stats["outputs"] = [o.stats() for o in outs]  # closing detached them from the session
        return stats
    finally:
        await _stop_session(source, tasks, session)  # (idempotent: a second call finds everything stopped)
        if runner is not None:
            await runner.cleanup()
        await server.stop()


async def _stop_session(source, tasks, session) -> None:
    """The input stopped, its tasks ended, the session and its outputs closed."""
    if hasattr(source, "stop"):
        source.stop()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if session is not None:
        await session.close("live stopped")


def _alias(server, name):
    async def handler(request):
        request.match_info["id"] = LIVE_ID
        return await getattr(server, name)(request)

    return handler


async def _wait(stop: asyncio.Event, source, cfg: LiveConfig, latency_s) -> None:
    t0 = time.monotonic()
    ended = asyncio.ensure_future(source.finished.wait())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        timeout = cfg.duration_s
        done, _ = await asyncio.wait({ended, stopped}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if ended in done and not stop.is_set():
            # the file's last sample plays `latency` after it was pushed: let it out, then stop
            rest = latency_s() + cfg.tail_s  # the session's latency now (its margin adapts)
            if cfg.duration_s is not None:
                rest = min(rest, max(0.0, cfg.duration_s - (time.monotonic() - t0)))
            log.info("live: the audio input ended; stopping in %.1f s", rest)
            try:
                await asyncio.wait_for(stop.wait(), rest)
            except asyncio.TimeoutError:
                pass
    finally:
        ended.cancel()
        stopped.cancel()


def live(cfg: LiveConfig) -> dict:
    """Blocking entry point of `marionette live` (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        uvloop = None
    if uvloop is not None:
        return uvloop.run(run_live(cfg))
    return asyncio.run(run_live(cfg))  # pragma: no cover
