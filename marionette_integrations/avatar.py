"""`TalkingHead`: TTS speech in, lip-synced avatar frames out, each with the audio it shows, on one clock.

What it reuses (nothing of the model path is re-implemented here):

* the model and the avatar: `streaming.pipeline.Pipeline` (`Pipeline.load` = `engine.checkpoint.load_model`
  + `engine.runtimes.backend.open_backend`; `prepare_avatar`, `encode_audio`, `generate`), as `serve` and
  `live` run it;
* lips as `marionette render` makes them: the speech at 16 kHz -> `engine.audio.MelStream` (identical to the
  offline `log_mel`) -> the lip window of each video frame at `engine.audio.window_starts` -> E_aud, gated
  to the closed mouth (zeros) where the frame is silent;
* pose, eyes and expression as `live` makes them: `streaming.motion.SessionMotion` (the engine's
  `IdleSource` or the checkpoint's learned idle model, `FixedSource` / `PresetSource` for the commanded
  pose, gaze and expression, blinks), steered by the control messages of `streaming.controls`.

Timeline. Video frame k is due at k / fps on one clock. Audio arriving when no segment is open opens one;
once `prebuffer_s` of it has arrived (or the utterance is complete) it is placed at the first frame not
yet handed to the model (`k0`); its sample n (at the speech's own
rate R) plays at k0 / fps + n / R, and video frame k0 + i carries exactly the samples
[floor(i R / fps), floor((i + 1) R / fps)): audio and video leave together, in the same `AvatarFrame`, and
cannot drift. Frame k0 + i's lips are E_aud of the window `window_starts(i)` of the segment's mel, as an
offline render of that audio would give. A segment ends when `end_segment()` says so (the TTS stopped) or
when the audio runs dry before a frame needs it (an underrun: the frames after it are silent and the next
audio opens a new segment); after its last frame the mouth is shut and the head goes on idling.

Pacing (pull-based, one clock): `frames()` is an async iterator that releases frame k at its due time;
rendering runs on one worker thread (never on the event loop), as many frames ahead of the frame being
released as a frame's render time needs (2 at 40 ms or less), at most `max_ahead`. `realtime=True` (the
default, for live transports): a frame the worker did not finish by its due time is skipped (the previous
picture is repeated, the audio is never dropped) and the worker never starts a frame it cannot finish in
time. `realtime=False`: every frame is rendered and waited for (when the machine is slower than real time
the clock slips instead): for offline pipelines and for tests on a loaded machine.

Interruption: `interrupt()` drops the pending speech (audio not yet released and the frames rendered ahead
with it) at once: the next frame released carries no more of that speech and shows the mouth shut (a fresh
render, or the latest closed-mouth picture when the fresh one is not ready by its due time).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np

log = logging.getLogger(__name__)

RATE16 = 16000
_NOT_READY = object()  # TalkingHead._inputs: the speech a frame needs has not arrived yet


@dataclass(frozen=True)
class TalkingHeadConfig:
    """How to load the model and the avatar, and how to pace."""

    avatar: Any = None  # a portrait (path, bytes, PIL image); None: the built-in avatar (or a drawn stand-in)
    checkpoint: Path | None = None  # None: the built-in checkpoint when installed, else random weights
    config: str = "lite"
    backend: str = "auto"  # as `marionette serve`: onnxruntime on a CPU, torch on an NVIDIA GPU
    threads: int | None = None
    align: str = "auto"  # real photographs: find and align the face ("require" | "auto" | "off")
    output_size: str = "crop"  # aligned photos: the model's crop, or N / WxH around the face
    fps: int = 25
    seed: int = 0
    realtime: bool = True  # skip frames that miss their time (live) | render every frame (offline, tests)
    expression: str | None = None  # an initial expression, e.g. "happy:0.6"
    controls: tuple = ()  # control messages applied from the first frame, e.g. {"type": "source", ...}
    max_ahead: int = 25  # frames handed to the worker ahead of the clock at most (the bounded queue; 1 s)
    silence_db: float = -45.0  # a video frame whose speech is below this level (dBFS) shows the mouth shut
    underrun_s: float = 0.3  # realtime=False: how long a frame waits past its due time for late speech
    prebuffer_s: float = 0.1  # a speech segment starts once this much of it has arrived (or it is complete)


@dataclass
class AvatarFrame:
    """One video frame and the speech it shows."""

    index: int  # frame k of the clock: due at k / fps
    fps: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    audio: np.ndarray | None  # int16 (samples, channels): the original speech of this frame; None when silent
    sample_rate: int | None
    channels: int
    speaking: bool  # the frame carries speech
    lips_open: bool  # the model was given an open-mouth lip latent for this picture
    repeated: bool = False  # the worker missed this frame: the picture is an earlier one
    segment_end: bool = False  # the last frame of an utterance (after `end_segment`)
    rendered_index: int = -1  # which frame the picture was rendered for

    @property
    def time(self) -> float:
        """Media time of the frame (seconds from the first frame)."""
        return self.index / self.fps

    @property
    def pts_ns(self) -> int:
        return self.index * 1_000_000_000 // self.fps


class _Grow:
    """An append-only array addressed by absolute row index, whose oldest rows can be dropped (`drop_before`),
    so a long utterance keeps only the rows still needed."""

    def __init__(self, tail: tuple[int, ...], dtype):
        self.buf = np.zeros((1024, *tail), dtype)
        self.n = 0  # rows appended so far (absolute)
        self.base = 0  # absolute index of buf[0]

    def append(self, rows: np.ndarray) -> None:
        k = len(rows)
        if not k:
            return
        used = self.n - self.base
        if used + k > len(self.buf):
            new = np.zeros((max(2 * len(self.buf), used + k), *self.buf.shape[1:]), self.buf.dtype)
            new[:used] = self.buf[:used]
            self.buf = new
        self.buf[used:used + k] = rows
        self.n += k

    def view(self, lo: int, hi: int) -> np.ndarray:
        lo, hi = max(lo, self.base), min(hi, self.n)
        return self.buf[lo - self.base:max(lo, hi) - self.base]

    def drop_before(self, i: int) -> None:
        """Forget rows before absolute index i (amortised: the buffer is compacted when half of it is stale)."""
        i = min(i, self.n)
        if i - self.base > len(self.buf) // 2:
            used = self.n - i
            self.buf[:used] = self.buf[i - self.base:self.n - self.base].copy()
            self.base = i


class _Segment:
    """One stretch of speech placed on the clock from frame k0 on."""

    def __init__(self, rate: int, channels: int, audio_cfg, fps: int):
        import av

        from engine.audio import MelStream

        self.k0: int | None = None  # placed on the clock once enough of it has arrived (`TalkingHead._place`)
        self.rate = int(rate)
        self.channels = int(channels)
        self.fps = fps
        self.pcm = _Grow((self.channels,), np.int16)  # the original speech (what is released)
        self.s16 = _Grow((), np.float32)  # mono 16 kHz (mel, gate)
        self.mel = _Grow((audio_cfg.n_mels,), np.float32)
        self._mel_stream = MelStream(audio_cfg)
        # the 16 kHz copy: mono and stereo through FFmpeg's resampler as they are, more channels averaged first
        self._layout = "stereo" if self.channels == 2 else "mono"
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE16)
        self.closed = False
        self.ends_utterance = False  # closed by end_segment (not by an underrun or an interrupt)
        self.cut: int | None = None  # interrupt: frames >= cut are not part of it
        self.last_push = time.monotonic()

    # samples of local frame i at the original rate
    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.rate // self.fps, (i + 1) * self.rate // self.fps

    def n_frames(self) -> int:
        """Frames the speech received so far covers (the last one may be partial)."""
        n = -(-self.pcm.n * self.fps // self.rate)
        if self.cut is not None:
            n = min(n, max(0, self.cut - self.k0))
        return n

    def push(self, pcm: np.ndarray) -> None:
        import av

        self.pcm.append(pcm)
        if self.channels > 2:
            pcm = pcm.mean(axis=1).astype(np.int16)
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm).reshape(1, -1), format="s16", layout=self._layout)
        f.sample_rate = self.rate
        self._feed16([g.to_ndarray().reshape(-1) for g in self._resampler.resample(f)])
        self.last_push = time.monotonic()

    def trim(self, i: int, mcfg) -> None:
        """Drop what frames before local frame i no longer need (the worker only renders later frames)."""
        if i <= 0:
            return
        from engine.audio import window_starts

        self.pcm.drop_before(self.bounds(i)[0])
        self.s16.drop_before(i * RATE16 // self.fps)
        self.mel.drop_before(int(window_starts(mcfg, 1, self.fps, start=i)[0]))

    def close(self, ends_utterance: bool = False) -> None:
        if self.closed:
            self.ends_utterance = self.ends_utterance or ends_utterance
            return
        self.closed = True
        self.ends_utterance = ends_utterance
        self._feed16([g.to_ndarray().reshape(-1) for g in self._resampler.resample(None)])

    def _feed16(self, chunks) -> None:
        for c in chunks:
            c = np.asarray(c, np.float32)
            self.s16.append(c)
            self.mel.append(self._mel_stream.push(c).numpy())


def check_pipeline(p) -> None:
    if p.cfg.audio.sample_rate != RATE16:
        raise ValueError(f"the model expects {p.cfg.audio.sample_rate} Hz audio; only 16 kHz is supported")


def avatar_source(cfg: TalkingHeadConfig, p) -> tuple:
    """The arguments of `Pipeline.prepare_avatar` for cfg.avatar: (source, align)."""
    src = cfg.avatar
    if src is None:
        from engine.image import BUILTIN_AVATAR
        from streaming.pipeline import placeholder_portrait

        return (BUILTIN_AVATAR if BUILTIN_AVATAR.is_file() else placeholder_portrait(p.cfg.image_size)), "off"
    return (Path(src).read_bytes() if isinstance(src, (str, Path)) else src), cfg.align


class ControlMethods:
    """set_expression / set_pose / set_gaze / blink as `control(message)` calls (the JSON of `serve`'s data
    channel); shared by TalkingHead and the remote head (marionette_integrations.remote)."""

    def control(self, msg: dict) -> None:  # pragma: no cover - defined by the classes using this
        raise NotImplementedError

    def set_expression(self, preset: str | None = "neutral", intensity: float = 1.0, vector=None,
                       transition_ms: float | None = None) -> None:
        msg = {"type": "expression", "intensity": intensity}
        if vector is not None:
            msg["vector"] = [float(v) for v in vector]
        else:
            msg["preset"] = preset
        if transition_ms is not None:
            msg["transition_ms"] = transition_ms
        self.control(msg)

    def set_pose(self, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, transition_ms: float | None = None,
                 hold: bool = False) -> None:
        """Head pose in degrees around which the idle motion sways (hold=True: exactly this pose, no sway)."""
        self.control({"type": "source", "factor": "pose", "from": "controls" if hold else "idle"})
        msg = {"type": "pose", "yaw": yaw, "pitch": pitch, "roll": roll}
        if transition_ms is not None:
            msg["transition_ms"] = transition_ms
        self.control(msg)

    def set_gaze(self, x: float = 0.0, y: float = 0.0, transition_ms: float | None = None, hold: bool = False) -> None:
        """Gaze in [-1, 1] (hold=True: exactly there, no idle saccades or blinks)."""
        self.control({"type": "source", "factor": "eye", "from": "controls" if hold else "idle"})
        msg = {"type": "gaze", "x": x, "y": y}
        if transition_ms is not None:
            msg["transition_ms"] = transition_ms
        self.control(msg)

    def blink(self) -> None:
        self.control({"type": "blink"})



class TalkingHead(ControlMethods):
    """See the module doc. Create, `await start()`, then `push_audio` / `end_segment` / `interrupt` /
    controls from the event loop and iterate `frames()`; `await aclose()` at the end."""

    def __init__(self, cfg: TalkingHeadConfig = TalkingHeadConfig(), *, pipeline=None, pool=None):
        self.cfg = cfg
        self.fps = int(cfg.fps)
        self.pool = pool  # a TalkingHeadPool: its shared model and scheduler thread render this head's frames
        if pool is not None:
            if pipeline is not None and pipeline is not pool.pipeline:
                raise ValueError("a pooled TalkingHead uses its pool's pipeline")
            if self.fps != pool.fps:
                raise ValueError(f"fps {self.fps}: the pool runs at {pool.fps} fps")
            pipeline = pool.pipeline
        self.pipeline = pipeline
        self.avatar = None
        self.motion = None
        self._executor = None if pool is not None else \
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="marionette-avatar")
        self._member = None  # the pool's scheduler participant (marionette_integrations.pool)
        self._lock = threading.Condition()
        self._segments: list[_Segment] = []  # in order; the last may be open
        self._controls: collections.deque = collections.deque()
        self._futs: dict[int, concurrent.futures.Future] = {}
        self._next_job = 0  # the first frame not yet handed to the worker
        self._next_out = 0  # the next frame `frames()` releases
        self._epoch = 0
        self._anchor = (0, 0.0)  # (frame, clock time) the due times count from
        self._t0: float | None = None
        self._last: tuple[np.ndarray, int] | None = None  # the latest picture released (image, rendered index)
        self._rest: tuple[np.ndarray, int] | None = None  # the latest closed-mouth picture rendered
        self._utterance_end_pending = False
        self._interrupted_at: int | None = None  # frames before this were rendered before the interrupt
        self.last_interrupt_frame: int | None = None
        self.est_render = 0.04  # EWMA of one frame's render time (s)
        self.closed = False
        self.stats = {"frames": 0, "rendered": 0, "repeated": 0, "speech_frames": 0,
                      "underruns": 0, "interrupts": 0, "segments": 0}

    # ------------------------------------------------------------------------------------ set up
    async def start(self) -> "TalkingHead":
        """Load the model (unless given) and the avatar and warm up, on the worker thread."""
        if self.pool is not None:
            await self.pool.attach(self)  # the avatar prepared on the pool's scheduler thread, between rounds
            return self
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        return self

    def _load(self) -> None:
        from streaming.pipeline import Pipeline

        cfg = self.cfg
        if self.pipeline is None:
            self.pipeline = Pipeline.load(cfg.checkpoint, config=cfg.config, backend=cfg.backend, seed=cfg.seed,
                                          threads=cfg.threads)
        p = self.pipeline
        check_pipeline(p)
        p.face_align = cfg.align
        p.output_size = cfg.output_size
        self.avatar = p.prepare_avatar(*avatar_source(cfg, p))
        self._setup_motion()
        times = p.warmup(self.avatar, batch_sizes=(1,), repeats=3)
        self.est_render = float(times[1])
        log.info("marionette avatar ready: %s, %d fps, %.0f ms a frame", p.rt.describe().get("name"), self.fps,
                 1000 * self.est_render)

    def _setup_motion(self) -> None:
        from streaming.motion import SessionMotion

        p, cfg = self.pipeline, self.cfg
        self.motion = SessionMotion(p.cfg, p.presets, self.fps, seed=cfg.seed,
                                    idle_model=p.idle_model_for(self.fps))
        if cfg.expression:
            self.control({"type": "expression", "preset": cfg.expression})
        for msg in cfg.controls:
            self.control(dict(msg))

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        face = getattr(self.avatar, "face", None)
        if face is not None and face.compositor is not None:
            return tuple(face.output_size)
        s = self.pipeline.cfg.image_size
        return (s, s)

    # ------------------------------------------------------------------------------------ speech
    def push_audio(self, pcm, sample_rate: int, channels: int = 1) -> None:
        """Speech (int16 samples: bytes or an array, interleaved when there are several channels; float arrays
        in [-1, 1] are converted) at any sample rate (event loop)."""
        x = np.frombuffer(pcm, np.int16) if isinstance(pcm, (bytes, bytearray, memoryview)) else np.asarray(pcm)
        if x.dtype != np.int16:
            x = (np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype(np.int16)
        x = x.reshape(-1, int(channels))
        if not len(x):
            return
        with self._lock:
            seg = self._segments[-1] if self._segments and not self._segments[-1].closed else None
            if seg is not None and (seg.rate != int(sample_rate) or seg.channels != int(channels)):
                seg.close()
                self._place(seg)
                seg = None
            if seg is None:
                seg = _Segment(sample_rate, channels, self.pipeline.cfg.audio, self.fps)
                self._segments.append(seg)
                self.stats["segments"] += 1
            seg.push(x)
            if seg.pcm.n >= self.cfg.prebuffer_s * seg.rate:
                self._place(seg)
            self._lock.notify_all()

    def _place(self, seg: _Segment) -> None:
        """Put a segment on the clock at the first frame not yet handed to the worker (lock held)."""
        if seg.k0 is None:
            seg.k0 = max(self._next_job, self._next_out)

    def end_segment(self) -> None:
        """The utterance is complete (the TTS stopped): its last frames need not wait for more audio, and
        the frame after its last sample is flagged `segment_end`."""
        with self._lock:
            seg = self._segments[-1] if self._segments else None
            if seg is not None and not seg.closed:
                seg.close(ends_utterance=True)
                self._place(seg)
            else:
                self._utterance_end_pending = True
            self._lock.notify_all()

    def interrupt(self) -> None:
        """Drop the pending speech now: the next frame released is silent with the mouth shut."""
        with self._lock:
            cut = self._next_out
            self._segments = [s for s in self._segments if s.k0 is not None]  # not started yet: dropped
            for seg in self._segments:
                c = max(seg.k0, cut)
                seg.cut = c if seg.cut is None else min(seg.cut, c)
                seg.close()
            self._segments = [s for s in self._segments if s.cut is None or s.cut > s.k0]
            self._utterance_end_pending = False
            self._epoch += 1
            self._interrupted_at = cut
            self.last_interrupt_frame = cut  # the first frame without the dropped speech
            self.stats["interrupts"] += 1
            self._lock.notify_all()
            self._resubmit_from(cut)

    def _resubmit_from(self, k: int) -> None:
        """Forget frames >= k already handed to the worker (lock held): they are submitted again."""
        for j in [j for j in self._futs if j >= k]:
            self._futs.pop(j).cancel()
        self._next_job = min(self._next_job, max(k, self._next_out))

    # ---------------------------------------------------------------------------------- controls
    def control(self, msg: dict) -> None:
        """A control message as `serve` takes them ({"type": "expression", "preset": "happy", ...}, pose,
        gaze, blink, source, interrupt); validated (streaming.controls.ControlError on a bad one), applied
        from the next frame rendered."""
        from streaming import controls as C

        ctx = C.ControlContext(presets=self.pipeline.presets, exp_dim=self.pipeline.cfg.latents.exp)
        ctl = C.parse_control(msg, ctx)
        if isinstance(ctl, C.Interrupt):
            self.interrupt()
        elif not isinstance(ctl, C.StatsRequest):
            self._controls.append(ctl)

    # ------------------------------------------------------------------------------------ timing
    def _clock(self) -> float:
        return time.monotonic()

    def due(self, k: int) -> float:
        """Monotonic time at which frame k is released."""
        ka, ta = self._anchor
        return ta + (k - ka) / self.fps

    def _lead_frames(self) -> int:
        return max(2, min(self.cfg.max_ahead, math.ceil(1.3 * self.est_render * self.fps) + 1))

    def _fill(self) -> None:
        """Hand the worker the frames up to `lead` ahead of the next one released (lock held)."""
        lead = self._lead_frames() if self.cfg.realtime else 2
        while self._next_job <= self._next_out + lead and len(self._futs) < self.cfg.max_ahead:
            k = self._next_job
            if self._member is not None:  # pooled: the shared scheduler renders it in its next round
                self._futs[k] = self._member.queue(k, self._epoch)
            else:
                self._futs[k] = self._executor.submit(self._render, k, self._epoch)
            self._next_job += 1

    # ------------------------------------------------------------------------------------ worker
    def _segment_at(self, k: int) -> _Segment | None:
        for seg in reversed(self._segments):
            if seg.k0 is not None and seg.k0 <= k and (seg.cut is None or k < seg.cut):
                if not seg.closed or k - seg.k0 < seg.n_frames():
                    return seg
                return None
        return None

    def _render(self, k: int, epoch: int):
        """Frame k on the worker thread -> (image, lips_open, epoch) or None (skipped / superseded)."""
        cfg, p = self.cfg, self.pipeline
        if cfg.realtime and self._clock() + self.est_render > self.due(k):
            return None  # it would be late: never work on a frame that is lost (a later one can still make it)
        got = self._inputs(k, epoch, wait=True)
        if got is None:
            return None
        t = time.perf_counter()
        z, mel, lips_open = self._latents(k, *got)
        if mel is not None:
            z[0, p.cfg.latents.slices()["lip"]] = p.encode_audio(mel[None])[0]
        image = np.ascontiguousarray(p.generate([self.avatar], z)[0])
        self._rendered(k, image, lips_open, time.perf_counter() - t)
        return image, lips_open, epoch

    def _rendered(self, k: int, image: np.ndarray, lips_open: bool, dt: float) -> None:
        self.est_render = 0.8 * self.est_render + 0.2 * dt
        self.stats["rendered"] += 1
        if not lips_open:
            self._rest = (image, k)

    def _inputs(self, k: int, epoch: int, wait: bool = True, first_try: float | None = None):
        """What frame k's lips need: (mel window, gate, energy, the frame's own mel row); None when superseded
        (an interrupt); `_NOT_READY` when `wait` is False and the speech the window needs has not arrived yet
        but may still arrive in time (`first_try`: when this frame was first tried, for realtime=False)."""
        cfg, mcfg = self.cfg, self.pipeline.cfg
        w = mcfg.mel_window
        from engine.audio import window_starts

        window, gate, energy, frame_mel = None, False, 0.0, None
        with self._lock:
            if epoch != self._epoch:
                return None
            seg = self._segment_at(k)
            if seg is not None:
                i = k - seg.k0
                ws = int(window_starts(mcfg, 1, self.fps, start=i)[0])
                start = self._clock() if first_try is None else first_try
                deadline = (self.due(k) - 1.1 * self.est_render) if cfg.realtime else \
                    max(self.due(k), start) + cfg.underrun_s
                # wait for the speech the window needs (a TTS usually runs ahead of real time)
                while (not seg.closed and seg.mel.n < ws + w and epoch == self._epoch
                       and self._clock() < deadline):
                    if not wait:
                        return _NOT_READY
                    self._lock.wait(max(0.001, min(0.05, deadline - self._clock())))
                if epoch != self._epoch:
                    return None
                silence = math.log(mcfg.audio.log_floor)
                window = np.full((w, mcfg.audio.n_mels), silence, np.float32)
                got = seg.mel.view(ws, ws + w)
                if len(got):
                    off = max(0, -ws)
                    window[off:off + len(got)] = got
                # the gate: this frame or a neighbour louder than the silence floor (at 16 kHz, the frame's samples)
                n16 = RATE16 // self.fps
                lv = []
                for j in (i - 1, i, i + 1):
                    x = seg.s16.view(j * n16, (j + 1) * n16) if j >= 0 else np.zeros(0, np.float32)
                    lv.append(float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0)
                energy = lv[1]
                gate = max(lv) > 10 ** (cfg.silence_db / 20)
                hpf = max(1, round(mcfg.audio.sample_rate / mcfg.audio.hop_length / self.fps))
                own = seg.mel.view(ws + mcfg.mel_past - hpf, ws + mcfg.mel_past)
                frame_mel = own.mean(0) if len(own) else None
        return window, gate, energy, frame_mel

    def _latents(self, k: int, window, gate: bool, energy: float, frame_mel):
        """-> (z (1, total) with pose/eye/exp set, the (n_mels, w) mel for E_aud or None, lips_open): the
        controls applied and the idle model stepped to frame k (on the thread that renders)."""
        m, mcfg = self.motion, self.pipeline.cfg
        while self._controls:
            m.apply(self._controls.popleft())
        self._push_idle(k, energy, frame_mel)
        z = np.zeros((1, mcfg.latents.total), np.float32)
        sl = mcfg.latents.slices()
        lips_open = bool(gate and m.lip_mode() == "audio")
        rest = m.compose_rest(k)
        for f in ("pose", "eye", "exp"):
            z[0, sl[f]] = rest[f]
        return z, (np.ascontiguousarray(window.T) if lips_open else None), lips_open

    def _push_idle(self, k: int, energy: float, frame_mel) -> None:
        """Give the idle source the speech of every frame up to k (frames skipped meanwhile: silence)."""
        m = self.motion
        if k < m.idle_pushed:
            return
        n = k + 1 - m.idle_pushed
        if m.learned_idle:
            silent = np.full(self.pipeline.cfg.audio.n_mels, math.log(self.pipeline.cfg.audio.log_floor), np.float32)
            rows = np.stack([silent] * (n - 1) + [silent if frame_mel is None else frame_mel])
            m.idle.push_frame_mel(rows)
        else:
            m.idle.push_energy(np.r_[np.zeros(n - 1), energy])
        m.idle_pushed = k + 1

    # ------------------------------------------------------------------------------------ output
    async def frames(self) -> AsyncIterator[AvatarFrame]:
        """The avatar's frames, each released at its due time (see the module doc), until `aclose()`."""
        while not self.closed:
            f = await self.next_frame()
            if f is None:
                return
            yield f

    async def next_frame(self) -> AvatarFrame | None:
        if self.closed:
            return None
        if self._t0 is None:
            self._t0 = self._clock()
            self._anchor = (self._next_out, self._t0 + self.est_render * 1.3 + 1 / self.fps)
        k = self._next_out
        with self._lock:
            self._fill()
        fut = self._futs.get(k)
        # wait for the frame's due time (realtime) or for the frame itself (realtime=False)
        if self.cfg.realtime:
            delay = self.due(k) - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            # a frame the worker is finishing right now may still make it (2 ms of grace)
            fut = self._futs.get(k)
            if fut is not None and not fut.done():
                await asyncio.wait([asyncio.wrap_future(fut)], timeout=0.002)
        else:
            while not self.closed:
                with self._lock:
                    self._fill()
                    fut = self._futs.get(k)
                if fut is None:
                    await asyncio.sleep(0.005)
                    continue
                # asyncio.wait: cancelling this task must not cancel the render (and a render superseded by
                # new speech or an interrupt, then submitted again, must not end this task)
                await asyncio.wait([asyncio.wrap_future(fut)])
                if self._futs.get(k) is fut and not fut.cancelled():
                    break
            delay = self.due(k) - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1 / self.fps:
                self._anchor = (k, self._clock())  # the clock slips: the machine is slower than real time
        if self.closed:
            return None
        return self._release(k)

    def _release(self, k: int) -> AvatarFrame:
        with self._lock:
            fut = self._futs.pop(k, None)
            res = None
            if fut is not None and fut.done() and not fut.cancelled():
                try:
                    res = fut.result()
                except Exception:  # noqa: BLE001 - a failed render repeats the previous picture
                    log.exception("rendering frame %d failed", k)
            if res is not None and res[2] != self._epoch:
                res = None
            seg = self._segment_at(k)
            audio, rate, channels, speaking, seg_end = None, None, 1, False, False
            if seg is not None:
                i = k - seg.k0
                a, b = seg.bounds(i)
                if not seg.closed and seg.pcm.n < b:
                    # underrun: the speech has not arrived in time; the segment ends with what there is
                    seg.close()
                    self.stats["underruns"] += 1
                    self._lock.notify_all()
                got = seg.pcm.view(a, b)
                if len(got):
                    audio = np.zeros((b - a, seg.channels), np.int16)
                    audio[:len(got)] = got
                    rate, channels, speaking = seg.rate, seg.channels, True
                if seg.closed and i == seg.n_frames() - 1 and seg.ends_utterance:
                    seg_end = True
                seg.trim(i - 2, self.pipeline.cfg)  # frames before i - 1 are never read again
            elif self._utterance_end_pending:
                seg_end = True
            if seg_end:
                self._utterance_end_pending = False
            # forget the segments whose frames have all been released
            self._segments = [s for s in self._segments
                              if not s.closed or s.k0 is None or s.k0 + s.n_frames() > k]
            self._next_out = k + 1
            if self._next_job < self._next_out:
                self._next_job = self._next_out
            self._fill()
        if res is not None:
            image, lips_open, _ = res
            rendered = k
            self._last = (image, k)
            if self._interrupted_at is not None and k >= self._interrupted_at:
                self._interrupted_at = None
        else:
            # the worker missed this frame: repeat the latest picture; after an interrupt or in silence the
            # latest closed-mouth one (a picture of speech must not outlive its speech)
            interrupted = self._interrupted_at is not None and k >= self._interrupted_at
            pick = self._rest if (interrupted or not speaking) and self._rest is not None else self._last
            if pick is None:
                pick = self._rest
            if pick is None:  # nothing rendered yet
                w, h = self.frame_size
                pick = (np.zeros((h, w, 3), np.uint8), -1)
            image, rendered, lips_open = pick[0], pick[1], False
            self.stats["repeated"] += 1
        self.stats["frames"] += 1
        self.stats["speech_frames"] += int(speaking)
        self.stats["render_ms"] = round(1000 * self.est_render, 1)
        return AvatarFrame(index=k, fps=self.fps, image=image, audio=audio, sample_rate=rate, channels=channels,
                           speaking=speaking, lips_open=bool(lips_open), repeated=res is None,
                           segment_end=seg_end, rendered_index=rendered)

    @property
    def idle(self) -> bool:
        """No speech pending or playing."""
        with self._lock:
            return self._segment_at(self._next_out) is None and not (
                self._segments and not self._segments[-1].closed)

    async def aclose(self) -> None:
        self.closed = True
        with self._lock:
            for f in self._futs.values():
                f.cancel()
            self._futs.clear()
            self._epoch += 1
            self._lock.notify_all()
        if self.pool is not None:
            self.pool.detach(self)
        else:
            self._executor.shutdown(wait=False, cancel_futures=True)
