"""The avatar rendered by a running `marionette serve` (another machine, a GPU box): `RemoteTalkingHead` has
TalkingHead's interface (push_audio / end_segment / interrupt / controls in, `frames()` out), so the
framework adapters take it as they take an in-process head:

    head = await RemoteTalkingHead("http://gpu-box:8080", token="...").start()
    avatar = MarionetteVideoService(talking_head=head)        # or MarionetteVideoService(remote=url, token=...)

What travels where. It is a WebRTC client of the server (`streaming.client.AvatarClient`: the offer with the
server's bearer token, a data channel for the controls): the speech given to `push_audio` (any rate, mono or
stereo) is resampled to 48 kHz mono and sent as the client's microphone (`streaming.client.PcmSource`, paced in
real time); the server returns the avatar's video and the same speech delayed by its pipeline latency, both
on its one media clock. `interrupt()` clears what the microphone has not sent yet and sends
{"type": "interrupt"} on the data channel (the server flushes its pending audio and frames within a tick); the
acknowledgement is awaited in the background (`interrupt_acks`). The server flushes the speech it has taken
in; what it had received but not yet taken in (tens of ms, more on a loaded server) still comes back a pipeline
latency later, so from the interrupt on the returned audio is muted until speech given after it can come back
(given at t, it returns at t + the server's latency, from /info). The video of such a tail is the server's:
a loaded server may show a few frames of it. Controls are the data channel's messages.

Alignment. The frames this head gives pair each received video frame with the server's *returned* audio of
the same instant (not the original speech: the server delays its audio to match its video). The instant is
the server's send time, estimated per track from the arrival of its RTP packets: for each track, the
earliest (arrival - RTP time) seen so far maps its RTP clock to this machine's (network delay and the
encoder's time at their minimum); a video frame at server time t gets the returned audio [t, t + 1/fps).
Consecutive frames take consecutive audio (no sample lost or repeated) unless the estimate moves by more than
10 ms. Each frame waits for its audio (at most `audio_wait_s` after the picture arrived). Audio is handed
out only while the returned speech is audible (from the first audible frame to `hangover` silent frames
after the last), so a transport's "bot speaking" follows the speech; `segment_end` marks the frame where
the speech ended.

Not covered: packet loss concealment beyond placing audio at its RTP time (missing audio is silence), and
renegotiation: a closed connection ends `frames()`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

import numpy as np

from marionette_integrations.avatar import ControlMethods

log = logging.getLogger(__name__)

RATE = 48000  # what the server's audio track and our microphone carry


@dataclass
class RemoteFrame:
    """One video frame from the server and the returned audio it shows (AvatarFrame's fields)."""

    index: int
    fps: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    audio: np.ndarray | None  # int16 (samples, 1) at 48 kHz; None when not speaking
    sample_rate: int | None
    channels: int
    speaking: bool
    pts_ns: int  # the server's media time of the frame (its video RTP time), ns
    segment_end: bool = False
    server_time: float = 0.0  # estimated server send time (this machine's monotonic clock)
    level: float = 0.0  # RMS of the frame's returned audio (int16 units)

    @property
    def lips_open(self) -> bool:  # unknown at the client; speaking is the best guess
        return self.speaking


class _AudioBuffer:
    """Returned audio at absolute RTP sample positions (48 kHz), the oldest dropped."""

    def __init__(self):
        self.base = None  # absolute sample index of buf[0]
        self.buf = np.zeros(0, np.int16)
        self.end = None  # one past the last sample written

    def write(self, pos: int, x: np.ndarray) -> None:
        if self.base is None:
            self.base = pos
        if pos + len(x) <= self.base:
            return
        if pos < self.base:
            x, pos = x[self.base - pos:], self.base
        need = pos + len(x) - self.base
        if need > len(self.buf):
            self.buf = np.concatenate([self.buf, np.zeros(need - len(self.buf), np.int16)])
        self.buf[pos - self.base:pos - self.base + len(x)] = x
        self.end = max(self.end or 0, pos + len(x))

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.zeros(b - a, np.int16)
        if self.base is None:
            return out
        lo, hi = max(a, self.base), min(b, self.base + len(self.buf))
        if hi > lo:
            out[lo - a:hi - a] = self.buf[lo - self.base:hi - self.base]
        return out

    def silence_from(self, a: int) -> None:
        if self.base is not None and a < self.base + len(self.buf):
            self.buf[max(0, a - self.base):] = 0

    def drop_before(self, a: int) -> None:
        if self.base is not None and a - self.base > RATE:
            k = min(a - self.base, len(self.buf))
            self.buf = self.buf[k:]
            self.base += k


class RemoteTalkingHead(ControlMethods):
    """See the module doc. `url`: the server's base URL; `token`: its bearer token (`serve --token`);
    `avatar`: an avatar id the server knows (an upload's id), None for its default; `controls`: control
    messages applied from the session's first frame (e.g. streaming.fixtures.STATIC_HEAD)."""

    def __init__(self, url: str, *, token: str | None = None, avatar: str | None = None, controls=(),
                 fps: int | None = None, audio_wait_s: float = 0.12, silence_rms: float = 100.0, hangover: int = 8,
                 connect_timeout_s: float = 20.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"remote {url!r}: give the server's base URL, e.g. http://gpu-box:8080")
        self.url = url.rstrip("/")
        self.token = token
        self.avatar_id = avatar
        self.initial_controls = [dict(c) for c in controls]
        self.fps = int(fps) if fps else None  # None: the server's (from /info)
        self.audio_wait_s = float(audio_wait_s)
        self.silence_rms = float(silence_rms)  # int16 RMS under which a frame's returned audio is silence
        self.hangover = int(hangover)
        self.connect_timeout_s = float(connect_timeout_s)
        self.server_latency_s = 0.2  # from the server's /info at start()
        self.client = None
        self.mic = None
        self.info: dict = {}
        self.closed = False
        self._video: asyncio.Queue | None = None
        self._audio = _AudioBuffer()
        self._off = {"video": None, "audio": None}  # min(arrival - rtp time) per track
        self._resamplers: dict = {}
        self._prev = None  # (video pts, audio end) of the previous frame
        self._speaking = False
        self._silent_run = 0
        self._mute_until_t = 0.0  # returned audio sent (server time, our clock) before this is silenced (interrupt)
        self._new_speech_t: float | None = None  # when speech was first given after the latest interrupt
        self._mic_drained_at: float | None = None
        self._size: tuple[int, int] | None = None
        self._index = 0
        self.interrupt_acks: list[tuple[float, float | None]] = []  # (sent, acknowledged) monotonic times
        self._tasks: set = set()
        # the latest frames: (pts ns, estimated server send time, audio [start, end), muted before, RMS, speaking)
        self.timeline: collections.deque = collections.deque(maxlen=500)
        self.stats = {"frames": 0, "speech_frames": 0, "interrupts": 0, "resyncs": 0, "audio_waits_expired": 0}

    # what MarionetteVideoService checks to know the head is ready
    @property
    def ready(self) -> bool:
        return self.client is not None

    @property
    def frame_size(self) -> tuple[int, int]:
        if self._size is None:
            raise RuntimeError("the frame size is known once the first frame arrived (await head.wait_first_frame())")
        return self._size

    # ------------------------------------------------------------------------------------ set up
    async def start(self) -> "RemoteTalkingHead":
        import aiohttp

        from streaming.client import AvatarClient, PcmSource

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession() as http:
            async with http.get(self.url + "/info", headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{self.url}/info: {r.status} {await r.text()}")
                self.info = await r.json()
        if self.fps is None:
            self.fps = int(self.info.get("fps") or 25)
        # how long the server holds the speech before returning it (its pipeline latency; minus a margin for
        # our estimate of its send times)
        self.server_latency_s = max(0.0, float(self.info.get("latency_ms") or 200.0) / 1000 - 0.05)
        self._video = asyncio.Queue()
        self.client = AvatarClient(self.url, token=self.token, keep_frames=False, audio_prefetch=0,
                                   on_video=self._on_video,
                                   on_audio=self._on_audio)
        self.mic = PcmSource()
        pc = self.client.pc

        @pc.on("connectionstatechange")
        def _state():  # the server went away (or closed the session): frames() ends
            if pc.connectionState in ("failed", "closed") and self._video is not None:
                log.warning("the connection to %s is %s", self.url, pc.connectionState)
                self._video.put_nowait((0.0, 0, None))

        await self.client.connect(mic=self.mic, avatar=self.avatar_id,
                                  controls=self.initial_controls or None, timeout=self.connect_timeout_s)
        await self.wait_first_frame(self.connect_timeout_s)  # the frame size is the first frame's
        return self

    async def wait_first_frame(self, timeout: float = 20.0) -> None:
        await self.client.wait_first_frame(timeout)
        t0 = time.monotonic()
        while self._size is None and time.monotonic() - t0 < timeout:
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------------------ media in
    def _offset(self, kind: str, t: float, pts: int, rate: int) -> None:
        arrived = self.client.first_packet_time(kind, pts) or t
        off = arrived - pts / rate
        cur = self._off[kind]
        self._off[kind] = off if cur is None else min(cur, off)

    def _on_video(self, t: float, pts: int, arr) -> None:
        if arr is None or self.closed:
            return
        self._offset("video", t, pts, 90000)
        self._size = (arr.shape[1], arr.shape[0])
        self._video.put_nowait((t, int(pts), arr))

    def _on_audio(self, t: float, pts: int, mono, rate: int) -> None:
        if rate != RATE:  # aiortc's Opus decoder gives 48 kHz
            log.warning("returned audio at %d Hz: ignored", rate)
            return
        self._offset("audio", t, pts, RATE)
        x = np.clip(np.asarray(mono, np.float32) * 32768.0, -32768, 32767).astype(np.int16)
        self._audio.write(int(pts), x)

    # ------------------------------------------------------------------------------ speech out
    def push_audio(self, pcm, sample_rate: int, channels: int = 1) -> None:
        """Speech (int16 bytes or array, interleaved; float in [-1, 1]) at any rate -> the server."""
        import av

        x = np.frombuffer(pcm, np.int16) if isinstance(pcm, (bytes, bytearray, memoryview)) else np.asarray(pcm)
        if x.dtype != np.int16:
            x = (np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype(np.int16)
        channels = int(channels)
        x = x.reshape(-1, channels)
        if not len(x) or self.mic is None:
            return
        if channels > 2:
            x, channels = x.mean(axis=1, keepdims=True).astype(np.int16), 1
        key = (int(sample_rate), channels)
        rs = self._resamplers.get(key)
        if rs is None:
            rs = self._resamplers[key] = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x).reshape(1, -1), format="s16",
                                       layout="stereo" if channels == 2 else "mono")
        f.sample_rate = int(sample_rate)
        for g in rs.resample(f):
            self.mic.append(g.to_ndarray().reshape(-1))
        self._mic_drained_at = None
        if self._new_speech_t is None and self.stats["interrupts"]:
            self._new_speech_t = time.monotonic()  # sent from now on, returned a latency later
            self._mute_until_t = self._new_speech_t + self.server_latency_s

    def end_segment(self) -> None:
        """The utterance is complete: what the resamplers hold goes out."""
        for rs in self._resamplers.values():
            for g in rs.resample(None):
                self.mic.append(g.to_ndarray().reshape(-1))
        self._resamplers.clear()

    def interrupt(self) -> None:
        """Stop the pending speech: the microphone's queue is cleared, the server told to flush (its ack
        awaited in the background, `interrupt_acks`); the returned audio is muted until new speech can come back."""
        if self.mic is None:
            return
        self.mic.clear()
        self._resamplers.clear()
        self.stats["interrupts"] += 1
        # the server flushes the speech it has taken in; what it had received but not yet taken in (a loaded
        # server: tens to hundreds of ms) still comes back, a pipeline latency later. Nothing audible the
        # server returns from now on can be ours until new speech is given, so the returned audio stays muted
        # until new speech given after this interrupt can come back (given at t, it returns at t + latency)
        self._mute_until_t = float("inf")
        self._new_speech_t = None
        self._speaking, self._silent_run = False, 0
        if self._prev is not None:
            self._audio.silence_from(self._prev[1])
        entry = [time.monotonic(), None]
        self.interrupt_acks.append(entry)

        async def ack():
            try:
                # until_sample: the server also drops what the microphone sent before this and is still
                # on its way (or not yet taken in), so none of the cut speech comes back
                await self.client.request({"type": "interrupt", "until_sample": self.mic.position}, timeout=5.0)
                entry[1] = time.monotonic()
            except (asyncio.TimeoutError, ConnectionError, RuntimeError) as e:
                log.warning("interrupt not acknowledged: %s", e)

        t = asyncio.ensure_future(ack())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def control(self, msg: dict) -> None:
        """A control message (the JSON of `serve`'s data channel); the server answers errors on the channel."""
        if not isinstance(msg, dict) or "type" not in msg:
            raise ValueError(f"a control message is a JSON object with a \"type\": {msg!r}")
        if msg.get("type") == "interrupt":
            self.interrupt()
        else:
            self.client.send(msg)

    @property
    def idle(self) -> bool:
        """Nothing left to send, and the returned speech over (the server's latency allowed for)."""
        if self.mic is None:
            return True
        if len(self.mic._buf):
            self._mic_drained_at = None
            return False
        now = time.monotonic()
        if self._mic_drained_at is None:
            self._mic_drained_at = now
        return not self._speaking and now - self._mic_drained_at > 0.6

    # ------------------------------------------------------------------------------ frames out
    async def frames(self):
        while not self.closed:
            f = await self.next_frame()
            if f is None:
                return
            yield f

    async def next_frame(self) -> RemoteFrame | None:
        if self.closed or self._video is None:
            return None
        t, pv, image = await self._video.get()
        if image is None:
            return None
        fps = self.fps
        n = RATE // fps
        ov, oa = self._off["video"], self._off["audio"]
        server_t = pv / 90000 + ov
        ideal = round(pv * RATE / 90000 + (ov - (oa if oa is not None else ov)) * RATE)
        start = ideal
        if self._prev is not None and pv - self._prev[0] == 90000 // fps:
            start = self._prev[1]  # consecutive: the audio right after the previous frame's
            if abs(start - ideal) > RATE // 100:
                start = ideal
                self.stats["resyncs"] += 1
        end = start + n
        # wait for the returned audio of this instant (it is sent without the video's encode time: usually here)
        deadline = t + self.audio_wait_s
        while (self._audio.end is None or self._audio.end < end) and time.monotonic() < deadline and not self.closed:
            await asyncio.sleep(0.005)
        if self._audio.end is None or self._audio.end < end:
            self.stats["audio_waits_expired"] += 1
        chunk = self._audio.read(start, end)
        oa = self._off["audio"]
        mute_t = self._mute_until_t
        mute_before = (end if mute_t == float("inf") else round((mute_t - oa) * RATE)) if oa is not None else 0
        if start < mute_before:
            chunk[:mute_before - start] = 0
        self._audio.drop_before(start)
        self._prev = (pv, end)
        level = float(np.sqrt(np.mean(np.square(chunk, dtype=np.float64)))) if len(chunk) else 0.0
        audible = level > self.silence_rms
        seg_end = False
        if audible:
            self._speaking, self._silent_run = True, 0
        elif self._speaking:
            self._silent_run += 1
            if self._silent_run >= self.hangover:
                self._speaking, seg_end = False, True
        speaking = self._speaking or seg_end
        audio = chunk.reshape(-1, 1) if speaking else None
        f = RemoteFrame(index=self._index, fps=fps, image=image, audio=audio, sample_rate=RATE if speaking else None,
                        channels=1, speaking=speaking, pts_ns=pv * 1_000_000_000 // 90000, segment_end=seg_end,
                        server_time=server_t, level=level)
        self._index += 1
        self.timeline.append((f.pts_ns, round(server_t, 4), start, end, mute_before, round(level, 1), speaking))
        self.stats["frames"] += 1
        self.stats["speech_frames"] += int(speaking)
        return f

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._video is not None:
            self._video.put_nowait((0.0, 0, None))
        for t in list(self._tasks):
            t.cancel()
        if self.client is not None:
            await self.client.close()
