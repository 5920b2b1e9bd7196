"""Where a session's avatar goes besides its WebRTC peer: RTMP/SRT ingest, a WHIP endpoint, a
virtual camera (with a virtual microphone). Used by `marionette live` and by
`POST /sessions/{id}/outputs` on `serve`.

Every output is a *tap* on one session (`Session.taps`): the session's two paced tracks hand it
each video frame with its tick k and each 20 ms audio frame with its index j, at the instant the
media clock says they are due. Outputs never read a clock of their own: timestamps are
`(k - k0) / fps` for video and sample counts `j * 960 - origin` for audio, both from the one media
clock's integer indices, so audio and video cannot drift apart however long the stream runs (a
stream stamped from wall-clock reads drifts by the ratio of two clocks; this one cannot).

* `RtmpOutput` (rtmp://, rtmps://, srt:// where the FFmpeg build has it): H.264 (libx264,
  tune=zerolatency, no B-frames, a keyframe every `gop_s`) + AAC, muxed by PyAV (flv for RTMP,
  mpegts for SRT) on a writer thread fed by a bounded queue. When the writer falls behind, video
  frames are dropped (oldest first), audio never is; a tick with no frame (the scheduler was late,
  or the queue dropped it) repeats the previous picture, so the stream stays constant frame rate.
  When the ingest goes away (a write fails) the writer reconnects with exponential backoff
  (`reconnect_min_s` .. `reconnect_max_s`: 0.5 s, then every second) and starts a new stream at the
  current frame.
* `WhipOutput` (whip://, whips://, http(s)://.../whip): an aiortc peer connection with send-only
  audio and video, its offer POSTed as application/sdp (WHIP, RFC 9725), the answer applied; the
  resource is DELETEd on close. Reconnects with backoff if the connection fails.
* `VirtualCameraOutput` (vcam, v4l2:///dev/videoN): frames to pyvirtualcam (v4l2loopback on
  Linux, OBS's virtual camera on Windows/macOS), the voice to a PulseAudio/PipeWire null sink
  through `pacat` when one is there.

Threads: `on_video` / `on_audio` / `aclose` run on the event loop; encoders and devices on each
output's own thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from urllib.parse import urljoin, urlsplit, urlunsplit

import numpy as np

from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

AUDIO_RATE = 48000
AUDIO_FRAME = 960  # the session's outbound audio frames: 20 ms at 48 kHz


@dataclass(frozen=True)
class OutputConfig:
    """Encoder, queue and reconnection settings shared by every output of a run."""

    video_bitrate_kbps: int = 1000
    audio_bitrate_kbps: int = 128
    x264_preset: str = "veryfast"
    gop_s: float = 2.0  # keyframe interval (Twitch / YouTube ask for 2 s)
    size: tuple[int, int] | None = None  # scale the video to (width, height); None: the model's size
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 1.0  # retry at least every second: back within ~1 s of the ingest
    io_timeout_s: float = 5.0  # a write to the ingest blocked this long counts as a broken connection
    max_video_queue: int = 25  # frames waiting for the encoder; more: the oldest are dropped
    max_audio_backlog_s: float = 5.0  # audio waiting longer than this: the ingest stalls, reconnect
    fill_gaps_s: float = 5.0  # a picture after a gap: repeat the previous one over it up to this long
    video_lag_ticks: int = 3  # a tick this far behind the audio written gets the previous picture again
    whip_token: str | None = None  # Bearer token for WHIP endpoints that want one
    virtual_mic: str | None = "marionette"  # PulseAudio sink the virtual camera's voice goes to; None: none
    camera_backend: str | None = None  # a pyvirtualcam backend name (None: the platform's)

    def __post_init__(self):
        if self.video_bitrate_kbps <= 0 or self.audio_bitrate_kbps <= 0:
            raise InputError("bitrates must be positive")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise InputError("reconnect backoff: need 0 < min <= max")
        if self.size is not None and (len(self.size) != 2 or min(self.size) <= 0 or any(v % 2 for v in self.size)):
            raise InputError(f"video size {self.size}: width and height must be positive and even")


@dataclass(frozen=True)
class OutputSpec:
    kind: str  # rtmp | srt | whip | vcam
    url: str  # what the user gave
    target: str  # what is opened: the ingest URL, the WHIP endpoint (http/https), the camera device or ""

    def describe(self) -> str:
        return f"{self.kind} {redact(self.url)}"


def redact(url: str) -> str:
    """An ingest URL without its secret (RTMP stream keys, WHIP tokens in the query) for logs and stats."""
    try:
        u = urlsplit(url)
    except ValueError:
        return "<bad url>"
    if u.scheme in ("rtmp", "rtmps"):
        parts = u.path.split("/")
        if len(parts) > 2 and parts[-1]:
            parts[-1] = parts[-1][:2] + "***" if len(parts[-1]) > 8 else parts[-1]
        return urlunsplit((u.scheme, u.netloc, "/".join(parts), "", ""))
    return urlunsplit((u.scheme, u.netloc, u.path, "***" if u.query else "", ""))


def ffmpeg_output_protocols() -> set[str] | None:
    """The output protocols of the FFmpeg that PyAV loaded (None if it cannot be asked on this OS)."""
    try:
        import ctypes

        import av  # noqa: F401 - loads libavformat

        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libavformat" in ln and "/" in ln}
        if not paths:
            return None
        lib = ctypes.CDLL(sorted(paths)[0])
        fn = lib.avio_enum_protocols
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        opaque, out = ctypes.c_void_p(None), set()
        while True:
            name = fn(ctypes.byref(opaque), 1)
            if not name:
                return out
            out.add(name.decode())
    except Exception:  # noqa: BLE001 - not Linux, or FFmpeg changed: do not guess
        return None


def parse_output(url: str) -> OutputSpec:
    """An --out value -> OutputSpec (InputError with what is accepted when it is not usable)."""
    if not isinstance(url, str) or not url.strip():
        raise InputError("--out needs a URL")
    url = url.strip()
    if url in ("vcam", "vcam://", "virtualcam"):
        return OutputSpec("vcam", url, "")
    try:
        u = urlsplit(url)
    except ValueError as e:
        raise InputError(f"--out {url!r}: not a URL ({e})") from None
    scheme = u.scheme.lower()
    if scheme == "v4l2":
        dev = u.path or u.netloc
        if not dev.startswith("/dev/video"):
            raise InputError(f"--out {url!r}: a v4l2 camera is v4l2:///dev/videoN")
        return OutputSpec("vcam", url, dev)
    if scheme in ("rtmp", "rtmps", "srt"):
        if not u.hostname:
            raise InputError(f"--out {redact(url)}: no host")
        if scheme in ("rtmp", "rtmps") and len([p for p in u.path.split("/") if p]) < 1:
            raise InputError(f"--out {redact(url)}: an RTMP URL needs an application and stream key, "
                             "e.g. rtmp://host/live/KEY")
        protos = ffmpeg_output_protocols()
        if protos is not None and scheme not in protos:
            streaming = ", ".join(sorted(p for p in protos if p in ("rtmp", "rtmps", "srt", "rist")))
            raise InputError(f"--out {redact(url)}: the FFmpeg inside PyAV has no {scheme!r} protocol "
                             f"(it has: {streaming}). Use rtmp://, or install a PyAV built against an FFmpeg "
                             "with libsrt.")
        return OutputSpec("srt" if scheme == "srt" else "rtmp", url, url)
    if scheme in ("whip", "whips"):
        if not u.hostname:
            raise InputError(f"--out {url!r}: no host")
        target = urlunsplit(("http" if scheme == "whip" else "https", u.netloc, u.path or "/", u.query, ""))
        return OutputSpec("whip", url, target)
    if scheme in ("http", "https"):
        if not u.hostname:
            raise InputError(f"--out {url!r}: no host")
        return OutputSpec("whip", url, url)
    raise InputError(f"--out {url!r}: unsupported output; use rtmp://HOST/APP/KEY (or rtmps://), "
                     "whip://HOST/PATH or https://HOST/.../whip (WHIP), vcam or v4l2:///dev/videoN (virtual camera)")


def open_output(spec: OutputSpec, cfg: OutputConfig, fps: int, name: str | None = None):
    """An output object for `spec` (not started: `start(loop)` it, then add it to a session's taps)."""
    cls = {"rtmp": RtmpOutput, "srt": RtmpOutput, "whip": WhipOutput, "vcam": VirtualCameraOutput}[spec.kind]
    return cls(spec, cfg, fps, name=name)


def _percentiles_ms(values) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, np.float64) * 1000
    return {"n": int(len(a)), "p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2), "max": round(float(a.max()), 2)}


def _copy_video(frame, size: tuple[int, int] | None):
    """A private yuv420p copy of a tap's (shared, read-only) frame, scaled to `size` if given."""
    import av

    if frame.format.name == "yuv420p":
        out = av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
    else:
        out = frame.reformat(format="yuv420p")
    if size is not None and (out.width, out.height) != tuple(size):
        out = out.reformat(width=size[0], height=size[1], format="yuv420p")
    return out


def _pcm_of(frame) -> np.ndarray:
    """A tap's audio frame (s16 mono 48 kHz) -> int16 samples."""
    return frame.to_ndarray().reshape(-1).astype(np.int16, copy=False)


class Output:
    """Base: naming, counters, and the origin of this output's timestamps."""

    kind = "?"

    def __init__(self, spec: OutputSpec, cfg: OutputConfig, fps: int, name: str | None = None):
        self.spec, self.cfg, self.fps = spec, cfg, int(fps)
        self.name = name or spec.kind
        self.state = "new"
        self.last_error: str | None = None
        self.created = time.monotonic()
        self.connects = 0
        self.connected_at: list[float] = []  # monotonic times each (re)connection was made
        self.disconnected_at: list[float] = []
        self.frames_in = 0
        self.audio_in = 0
        self.frames_out = 0
        self.audio_out = 0
        self.frames_dropped = 0
        self.frames_repeated = 0
        # which pictures were repeats: frame numbers in the current connection's stream (pts in frames), last 512
        self.repeated_frames = collections.deque(maxlen=512)
        self.latency = collections.deque(maxlen=2000)  # tap -> written (s), per video frame
        self.closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.spec.describe()}>"

    async def start(self) -> None:  # pragma: no cover - overridden
        pass

    def on_video(self, k: int, frame) -> None:  # pragma: no cover - overridden
        pass

    def on_audio(self, j: int, frame) -> None:  # pragma: no cover - overridden
        pass

    async def aclose(self) -> None:  # pragma: no cover - overridden
        self.closed = True

    def stats(self) -> dict:
        return {"name": self.name, "kind": self.spec.kind, "url": redact(self.spec.url), "state": self.state,
                "connects": self.connects, "last_error": self.last_error,
                "frames_in": self.frames_in, "frames_out": self.frames_out, "frames_dropped": self.frames_dropped,
                "frames_repeated": self.frames_repeated, "repeated_frames": list(self.repeated_frames),
                "audio_frames_in": self.audio_in,
                "audio_frames_out": self.audio_out, "added_latency_ms": _percentiles_ms(self.latency)}


# =========================================================================================== RTMP
class _Origin:
    """Timestamps of one connection: video tick k0 is pts 0; audio sample (j * 960 + i) of the
    session's audio is at pts j * 960 + i - a0 samples, a0 = k0 * 48000 / fps (the same instant)."""

    def __init__(self, k0: int, fps: int):
        self.k0 = k0
        self.a0 = k0 * AUDIO_RATE // fps
        self.next_k = k0  # the next tick to encode
        self.next_a = self.a0  # the next audio sample (session sample index) to encode


class RtmpOutput(Output):
    """H.264 + AAC over RTMP (flv) or SRT (mpegts), one writer thread, reconnecting."""

    kind = "rtmp"

    def __init__(self, spec, cfg, fps, name=None):
        super().__init__(spec, cfg, fps, name)
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()  # ("v"|"a", index, frame, t_tap)
        self._n_video = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._container = None
        self.reconnect_times: list[float] = []  # seconds from a failure to the next successful connect

    async def start(self) -> None:
        import av  # noqa: F401 - fail here, not on the thread

        self._thread = threading.Thread(target=self._run, name=f"marionette-out-{self.name}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------- event loop side
    def on_video(self, k: int, frame) -> None:
        self.frames_in += 1
        with self._cond:
            if self._n_video >= self.cfg.max_video_queue:  # the writer is behind: drop the oldest picture
                for i, it in enumerate(self._items):
                    if it[0] == "v":
                        del self._items[i]
                        self._n_video -= 1
                        self.frames_dropped += 1
                        break
            self._items.append(("v", k, frame, time.monotonic()))
            self._n_video += 1
            self._cond.notify()

    def on_audio(self, j: int, frame) -> None:
        self.audio_in += 1
        with self._cond:
            self._items.append(("a", j, frame, time.monotonic()))
            if self.state != "streaming":  # no ingest: keep only the last moments (it restarts from now)
                while len(self._items) > 100:
                    if self._items.popleft()[0] == "v":
                        self._n_video -= 1
            self._cond.notify()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 15)

    # ----------------------------------------------------------------------------- writer thread
    def _take(self, timeout: float):
        with self._cond:
            if not self._items and not self._stop.is_set():
                self._cond.wait(timeout)
            if not self._items:
                return None
            it = self._items.popleft()
            if it[0] == "v":
                self._n_video -= 1
            return it

    def _clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._n_video = 0

    def _backlog_s(self) -> float:
        with self._cond:
            for it in self._items:
                if it[0] == "a":
                    return time.monotonic() - it[3]
        return 0.0

    def _open(self, width: int, height: int):
        import av

        fmt = "mpegts" if self.spec.kind == "srt" else "flv"
        opts = {"flvflags": "no_duration_filesize"} if fmt == "flv" else {}
        c = av.open(self.spec.target, mode="w", format=fmt, options=opts)
        try:
            gop = max(1, int(round(self.cfg.gop_s * self.fps)))
            kb = self.cfg.video_bitrate_kbps
            v = c.add_stream("libx264", rate=self.fps, options={
                "tune": "zerolatency", "preset": self.cfg.x264_preset, "g": str(gop), "keyint_min": str(gop),
                "sc_threshold": "0", "bf": "0", "maxrate": f"{kb}k", "bufsize": f"{2 * kb}k"})
            v.width, v.height = width, height
            v.bit_rate = kb * 1000
            v.pix_fmt = "yuv420p"
            v.time_base = Fraction(1, self.fps)
            a = c.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
            a.bit_rate = self.cfg.audio_bitrate_kbps * 1000
            return c, v, a
        except BaseException:
            c.close()
            raise

    def _run(self) -> None:
        backoff = self.cfg.reconnect_min_s
        while not self._stop.is_set():
            self.state = "connecting"
            try:
                self._stream()  # returns when stopped; raises when the connection breaks
                break
            except Exception as e:  # noqa: BLE001 - any failure of the ingest: reconnect
                self.last_error = f"{type(e).__name__}: {e}"
                now = time.monotonic()
                if self._container_ok:  # it was streaming: a fresh outage
                    self.disconnected_at.append(now)
                    backoff = self.cfg.reconnect_min_s
                if self._failed_at is None and self.connects:
                    self._failed_at = now
                log.warning("output %s: %s; reconnecting in %.1f s", self.name, self.last_error, backoff)
            finally:
                self._close_container()
            self.state = "reconnecting"
            if self._stop.wait(backoff):
                break
            backoff = min(self.cfg.reconnect_max_s, backoff * 2)
        self.state = "closed"

    _container_ok = False
    _failed_at: float | None = None

    def _close_container(self) -> None:
        c, self._container = self._container, None
        self._container_ok = False
        if c is not None:
            try:
                c.close()
            except Exception:  # noqa: BLE001 - a broken connection fails to close too
                pass

    def _first_picture(self):
        """Wait for a fresh video item (the start of this connection's stream); None when stopping.
        Returns (item, the audio item just before it, if any)."""
        last_audio = None
        while not self._stop.is_set():
            it = self._take(0.2)
            if it is None or time.monotonic() - it[3] > 0.5:
                continue  # nothing yet, or queued while (re)connecting: stale
            if it[0] == "a":
                last_audio = it
                continue
            return it, last_audio
        return None, None

    def _stream(self) -> None:
        import av

        first, last_audio = self._first_picture()
        if first is None:
            return
        pic = _copy_video(first[2], self.cfg.size)
        c, vs, as_ = self._open(pic.width, pic.height)
        size = (pic.width, pic.height)  # this connection's picture size: every frame is scaled to it
        self._container = c
        origin = _Origin(first[1], self.fps)
        tb = Fraction(1, self.fps)  # (the stream's own time base becomes the muxer's once the header is out)
        if last_audio is not None:  # the audio frame that straddles the first picture's instant
            self._write_audio(c, as_, origin, last_audio[1], last_audio[2])
        last_pic = None
        stop_after = None
        it = first

        def repeat_until(k_end: int) -> None:
            """Ticks before k_end that got no picture: the previous picture again (constant frame rate)."""
            while origin.next_k < k_end and last_pic is not None:
                rep = av.VideoFrame.from_ndarray(last_pic, format="yuv420p")
                rep.pts, rep.time_base = origin.next_k - origin.k0, tb
                self._mux(c, vs.encode(rep))
                self.frames_repeated += 1
                self.repeated_frames.append(origin.next_k - origin.k0)
                origin.next_k += 1

        while True:
            if it is not None:
                kind, idx, frame, t_tap = it
                if kind == "v" and idx < origin.next_k:
                    self.frames_dropped += 1  # too late: its tick went out as a repeat already
                elif kind == "v":
                    if idx - origin.next_k <= self.cfg.fill_gaps_s * self.fps:
                        repeat_until(idx)
                    if pic is None:
                        pic = _copy_video(frame, size)
                    pic.pts, pic.time_base = idx - origin.k0, tb
                    last_pic = pic.to_ndarray()
                    self._mux(c, vs.encode(pic))
                    pic = None
                    if not self._container_ok:
                        self._container_ok = True
                        self._connected()
                    origin.next_k = idx + 1
                    self.frames_out += 1
                    self.latency.append(time.monotonic() - t_tap)
                elif kind == "a":
                    self._write_audio(c, as_, origin, idx, frame)
                    # the audio has reached tick a_tick: a picture more than `video_lag` ticks older that
                    # has not come (the scheduler missed it, or the queue dropped it) will not come in time;
                    # repeat the previous one, so video never trails the audio however long a stall lasts
                    a_tick = origin.k0 + (origin.next_a - origin.a0) * self.fps // AUDIO_RATE
                    repeat_until(a_tick - self.cfg.video_lag_ticks)
                    if self._backlog_s() > self.cfg.max_audio_backlog_s:
                        raise ConnectionError(f"the ingest takes less than real time (audio waiting "
                                              f"{self._backlog_s():.1f} s)")
            if self._stop.is_set() and stop_after is None:
                stop_after = time.monotonic() + 0.5  # drain what is queued, briefly
            if stop_after is not None and time.monotonic() > stop_after:
                break
            it = self._take(0.2)
            if it is None and self._stop.is_set():
                break
        # end of stream: pictures up to where the audio ends, then flush the encoders and close cleanly
        repeat_until(origin.k0 + (origin.next_a - origin.a0) * self.fps // AUDIO_RATE)
        for s in (vs, as_):
            try:
                self._mux(c, s.encode(None))
            except av.error.EOFError:
                pass
        self._container = None
        c.close()

    def _connected(self) -> None:
        now = time.monotonic()
        self.connects += 1
        self.connected_at.append(now)
        self.repeated_frames.clear()  # frame numbers restart with each connection's stream
        self.state = "streaming"
        if self._failed_at is not None:
            self.reconnect_times.append(now - self._failed_at)
            log.info("output %s: reconnected %.2f s after the ingest went away", self.name, now - self._failed_at)
            self._failed_at = None
        else:
            log.info("output %s: streaming to %s", self.name, self.spec.describe())
        self.state = "streaming"

    def _write_audio(self, c, stream, origin: _Origin, j: int, frame) -> None:
        import av

        start = j * AUDIO_FRAME
        pcm = _pcm_of(frame)
        if start + len(pcm) <= origin.next_a:
            return  # before this connection's origin (or already written)
        if start > origin.next_a:  # a missing frame: silence keeps every later sample in its place
            pcm = np.concatenate([np.zeros(start - origin.next_a, np.int16), pcm])
            start = origin.next_a
        pcm = pcm[origin.next_a - start:]
        st = np.repeat(pcm[None, :], 2, axis=0).T.reshape(1, -1)  # mono -> packed stereo
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(st), format="s16", layout="stereo")
        af.sample_rate = AUDIO_RATE
        af.pts = origin.next_a - origin.a0
        af.time_base = Fraction(1, AUDIO_RATE)
        self._mux(c, stream.encode(af))
        origin.next_a += len(pcm)
        self.audio_out += 1

    def _mux(self, c, packets) -> None:
        for p in packets:
            c.mux(p)

    def stats(self) -> dict:
        out = super().stats()
        out["reconnect_s"] = [round(x, 3) for x in self.reconnect_times]
        out["audio_backlog_s"] = round(self._backlog_s(), 3)
        return out


# =========================================================================================== WHIP
class _FeedTrack:
    """Factory of aiortc tracks fed by an output (defined lazily: aiortc is the `serve` extra)."""

    @staticmethod
    def make(kind: str, fps: int, delivered: collections.deque | None = None):
        from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

        class FeedTrack(MediaStreamTrack):
            def __init__(self):
                super().__init__()
                self.kind = kind
                self._q: asyncio.Queue = asyncio.Queue()
                self.dropped = 0

            def put(self, item, t_tap: float | None = None) -> None:
                if kind == "video":
                    while self._q.qsize() >= 2:  # latest wins: the encoder takes what is newest
                        self._q.get_nowait()
                        self.dropped += 1
                self._q.put_nowait((item, t_tap))

            async def recv(self):
                if self.readyState != "live":
                    raise MediaStreamError
                item, t_tap = await self._q.get()
                if item is None:
                    raise MediaStreamError
                if delivered is not None and t_tap is not None:
                    delivered.append((item.pts, t_tap))  # what the encoder took, and when it was tapped
                return item

            def stop(self):
                super().stop()
                self._q.put_nowait((None, None))

        t = FeedTrack()
        t.fps = fps
        return t


class WhipOutput(Output):
    """Push to a WHIP endpoint with aiortc (send-only audio + video)."""

    kind = "whip"

    def __init__(self, spec, cfg, fps, name=None):
        super().__init__(spec, cfg, fps, name)
        self.pc = None
        self.resource: str | None = None
        self._v = self._a = None
        self._task: asyncio.Task | None = None
        self._failed: asyncio.Event | None = None
        self._k0: int | None = None
        self._j0: int | None = None
        # (video pts at 90 kHz, tap time) of each frame the encoder took, this connection
        self.sent: collections.deque = collections.deque(maxlen=3000)

    async def start(self) -> None:
        import aiohttp  # noqa: F401
        import aiortc  # noqa: F401

        self._task = asyncio.ensure_future(self._run())
        self._task.set_name(f"output-{self.name}")

    async def _connect(self) -> None:
        import aiohttp
        from aiortc import RTCSessionDescription

        from streaming.rtc import peer_connection

        self.sent.clear()
        self._v, self._a = _FeedTrack.make("video", self.fps, self.sent), _FeedTrack.make("audio", self.fps)
        self._k0 = self._j0 = None
        pc = peer_connection()
        self.pc = pc
        pc.addTransceiver(self._a, direction="sendonly")
        pc.addTransceiver(self._v, direction="sendonly")
        failed = asyncio.Event()
        self._failed = failed

        @pc.on("connectionstatechange")
        def _state():
            if pc.connectionState in ("failed", "closed"):
                failed.set()

        await pc.setLocalDescription(await pc.createOffer())  # gathers every candidate (no trickle)
        headers = {"Content-Type": "application/sdp"}
        if self.cfg.whip_token:
            headers["Authorization"] = f"Bearer {self.cfg.whip_token}"
        timeout = aiohttp.ClientTimeout(total=self.cfg.io_timeout_s * 2)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(self.spec.target, data=pc.localDescription.sdp, headers=headers) as r:
                body = await r.text()
                if r.status not in (200, 201):
                    raise ConnectionError(f"WHIP endpoint answered {r.status}: {body[:200]}")
                loc = r.headers.get("Location")
                self.resource = urljoin(self.spec.target, loc) if loc else None
        await pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))

    async def _run(self) -> None:
        backoff = self.cfg.reconnect_min_s
        while not self.closed:
            self.state = "connecting"
            try:
                await self._connect()
                t_wait = time.monotonic()
                while self.pc.connectionState != "connected":
                    if self._failed.is_set() or time.monotonic() - t_wait > 3 * self.cfg.io_timeout_s:
                        raise ConnectionError(f"ICE/DTLS did not connect ({self.pc.connectionState})")
                    await asyncio.sleep(0.05)
                now = time.monotonic()
                self.connects += 1
                self.connected_at.append(now)
                self.state = "streaming"
                log.info("output %s: WHIP session up (%s)", self.name, self.spec.describe())
                backoff = self.cfg.reconnect_min_s
                await self._failed.wait()
                self.last_error = f"connection {self.pc.connectionState}"
                self.disconnected_at.append(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                self.last_error = f"{type(e).__name__}: {e}"
            if self.closed:
                break
            await self._teardown()
            self.state = "reconnecting"
            log.warning("output %s: %s; reconnecting in %.1f s", self.name, self.last_error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(self.cfg.reconnect_max_s, backoff * 2)

    async def _teardown(self) -> None:
        pc, self.pc = self.pc, None
        for t in (self._v, self._a):
            if t is not None:
                t.stop()
        if self.resource:
            try:
                import aiohttp

                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
                    headers = {"Authorization": f"Bearer {self.cfg.whip_token}"} if self.cfg.whip_token else {}
                    async with http.delete(self.resource, headers=headers):
                        pass
            except Exception:  # noqa: BLE001 - the endpoint may be gone already
                pass
            self.resource = None
        if pc is not None:
            await pc.close()

    def on_video(self, k: int, frame) -> None:
        self.frames_in += 1
        if self.state != "streaming" or self._v is None:
            return
        from streaming.clock import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE

        if self._k0 is None:
            self._k0 = k
            self._j0 = -(-k * AUDIO_RATE // self.fps // AUDIO_FRAME)  # first audio frame at or after it
        pic = _copy_video(frame, self.cfg.size)
        pic.pts = (k - self._k0) * VIDEO_CLOCK_RATE // self.fps
        pic.time_base = VIDEO_TIME_BASE
        self._v.put(pic, time.monotonic())
        self.frames_out += 1

    def on_audio(self, j: int, frame) -> None:
        self.audio_in += 1
        if self.state != "streaming" or self._a is None or self._j0 is None or j < self._j0:
            return
        import av

        from streaming.clock import AUDIO_TIME_BASE

        af = av.AudioFrame.from_ndarray(_pcm_of(frame).reshape(1, -1), format="s16", layout="mono")
        af.sample_rate = AUDIO_RATE
        af.pts = (j - self._j0) * AUDIO_FRAME + (self._j0 * AUDIO_FRAME - self._k0 * AUDIO_RATE // self.fps)
        af.time_base = AUDIO_TIME_BASE
        self._a.put(af)
        self.audio_out += 1

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._teardown()
        self.state = "closed"


# ================================================================================= virtual camera
class PulseMic:
    """The camera's voice into a PulseAudio/PipeWire null sink (`pacat`); apps pick its monitor
    (or the remapped source "<sink>_mic") as their microphone. Creates the sink when missing."""

    def __init__(self, sink: str, latency_ms: int = 40):
        self.sink = sink
        self.latency_ms = latency_ms
        self.proc = None

    @staticmethod
    def available() -> bool:
        return shutil.which("pacat") is not None and shutil.which("pactl") is not None

    def open(self) -> None:
        try:
            sinks = subprocess.run(["pactl", "list", "short", "sinks"], capture_output=True, text=True,
                                   timeout=5, check=True).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise ConnectionError(f"no PulseAudio/PipeWire server ({e})") from None
        if self.sink not in {ln.split("\t")[1] for ln in sinks.splitlines() if "\t" in ln}:
            subprocess.run(["pactl", "load-module", "module-null-sink", f"sink_name={self.sink}",
                            f"sink_properties=device.description=Marionette"], capture_output=True, timeout=5)
            subprocess.run(["pactl", "load-module", "module-remap-source", f"master={self.sink}.monitor",
                            f"source_name={self.sink}_mic",
                            "source_properties=device.description=Marionette-Microphone"],
                           capture_output=True, timeout=5)
        self.proc = subprocess.Popen(["pacat", "--playback", f"--device={self.sink}", "--format=s16le",
                                      "--rate=48000", "--channels=1", f"--latency-msec={self.latency_ms}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def write(self, pcm: np.ndarray) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.write(pcm.astype("<i2").tobytes())
            self.proc.stdin.flush()

    def close(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                p.kill()


class VirtualCameraOutput(Output):
    """Frames to a pyvirtualcam camera as they come due; the voice to a virtual microphone."""

    kind = "vcam"

    def __init__(self, spec, cfg, fps, name=None, mic=None):
        super().__init__(spec, cfg, fps, name)
        self.cam = None
        self.mic = mic
        self._slot = None  # latest frame (latest wins)
        self._audio: collections.deque = collections.deque(maxlen=250)  # 5 s
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.device: str | None = None

    def _open_camera(self, size):
        try:
            import pyvirtualcam
        except ImportError:
            raise MissingDependency("a virtual camera needs pyvirtualcam: pip install 'marionette[vcam]' "
                                    "(and on Linux the v4l2loopback kernel module: "
                                    "sudo modprobe v4l2loopback exclusive_caps=1)") from None
        try:
            return pyvirtualcam.Camera(width=size[0], height=size[1], fps=self.fps, fmt=pyvirtualcam.PixelFormat.RGB,
                                       device=self.spec.target or None, backend=self.cfg.camera_backend)
        except Exception as e:  # noqa: BLE001 - pyvirtualcam raises RuntimeError listing each backend's failure
            raise InputError(f"cannot open the virtual camera{' ' + self.spec.target if self.spec.target else ''}: "
                             f"{e} (Linux: sudo modprobe v4l2loopback devices=1 exclusive_caps=1 "
                             "card_label=Marionette; Windows/macOS: install OBS and start its virtual camera once)"
                             ) from None

    async def start(self, size: tuple[int, int] | None = None) -> None:
        size = self.cfg.size or size or (256, 256)
        self.cam = await asyncio.to_thread(self._open_camera, size)
        self.device = self.cam.device
        if self.mic is None and self.cfg.virtual_mic and PulseMic.available():
            self.mic = PulseMic(self.cfg.virtual_mic)
        if self.mic is not None:
            try:
                await asyncio.to_thread(self.mic.open)
            except Exception as e:  # noqa: BLE001 - video without the voice is still useful
                log.warning("output %s: no virtual microphone (%s): video only", self.name, e)
                self.mic = None
        elif self.cfg.virtual_mic:
            log.warning("output %s: PulseAudio/PipeWire tools (pactl, pacat) not found: the camera has no voice",
                        self.name)
        self.state = "streaming"
        self.connects = 1
        self.connected_at.append(time.monotonic())
        log.info("output %s: virtual camera %s (%dx%d)%s", self.name, self.device, size[0], size[1],
                 f", voice to PulseAudio sink {self.mic.sink!r}" if isinstance(self.mic, PulseMic) else "")
        self._thread = threading.Thread(target=self._run, name=f"marionette-out-{self.name}", daemon=True)
        self._thread.start()

    def on_video(self, k: int, frame) -> None:
        self.frames_in += 1
        with self._cond:
            if self._slot is not None:
                self.frames_dropped += 1
            self._slot = (k, frame, time.monotonic())
            self._cond.notify()

    def on_audio(self, j: int, frame) -> None:
        self.audio_in += 1
        if self.mic is None:
            return
        with self._cond:
            self._audio.append(frame)
            self._cond.notify()

    def _run(self) -> None:
        w, h = self.cam.width, self.cam.height
        delay = self.mic.latency_ms / 1000 if isinstance(self.mic, PulseMic) else 0.0
        while True:
            with self._cond:
                while self._slot is None and not self._audio and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                item, self._slot = self._slot, None
                audio = list(self._audio)
                self._audio.clear()
            try:
                for a in audio:
                    self.mic.write(_pcm_of(a))
                    self.audio_out += 1
                if item is not None:
                    k, frame, t_tap = item
                    # the voice waits in the sound server's buffer: hold the picture as long, so they meet
                    wait = t_tap + delay - time.monotonic()
                    if wait > 0 and self._stop.wait(wait):
                        return
                    if (frame.width, frame.height) != (w, h) or frame.format.name != "rgb24":
                        frame = frame.reformat(width=w, height=h, format="rgb24")
                    self.cam.send(np.ascontiguousarray(frame.to_ndarray()))
                    self.frames_out += 1
                    self.latency.append(time.monotonic() - t_tap)
            except Exception as e:  # noqa: BLE001
                self.last_error = f"{type(e).__name__}: {e}"
                log.exception("output %s failed", self.name)
                self.state = "failed"
                return

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)
        for x in (self.cam, self.mic):
            if x is not None:
                try:
                    await asyncio.to_thread(x.close)
                except Exception:  # noqa: BLE001
                    pass
        self.state = "closed"

    def stats(self) -> dict:
        return {**super().stats(), "device": self.device,
                "virtual_mic": self.mic.sink if isinstance(self.mic, PulseMic) else (None if self.mic is None
                                                                                     else type(self.mic).__name__)}


# ===================================================================================== attaching
async def attach(session, urls, cfg: OutputConfig | None = None) -> list:
    """Open the outputs `urls` (validated first: InputError before anything starts) and tap them
    onto `session`; returns them. The session closes them when it closes."""
    cfg = cfg or OutputConfig()
    specs = [parse_output(u) for u in urls]
    outs = []
    try:
        for spec in specs:
            seq = getattr(session, "_output_seq", 0)
            session._output_seq = seq + 1
            o = open_output(spec, cfg, session.fps, name=f"{spec.kind}{seq}")
            if isinstance(o, VirtualCameraOutput):
                s = session.pipeline.cfg.image_size
                await o.start((s, s))
            else:
                await o.start()
            outs.append(o)
    except BaseException:
        await asyncio.gather(*(o.aclose() for o in outs), return_exceptions=True)
        raise
    session.taps.extend(outs)
    return outs


async def detach(session, output) -> None:
    if output in session.taps:
        session.taps.remove(output)
    await output.aclose()
