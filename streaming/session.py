"""One WebRTC peer: its inbound audio (and optional webcam), its two outbound tracks, its control
channel, and its lifecycle (cleanup when the peer leaves, fails, or goes silent on the wire).

Threads: everything here runs on the event loop except `wants_tick`, `build_job`, `deliver`,
`set_webcam_latents` and `fail_from_thread`, which the scheduler thread calls; `_lock` guards the
frame slot and the epoch they share with the loop. Webcam frames are face-tracked on a thread of their own
(`streaming.webcam.WebcamFramer`); `build_job` takes its newest crop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque

import numpy as np

from streaming import controls as C
from streaming.audio_in import HOP16, RATE16, RATE48, InboundAudio
from streaming.clock import AUDIO_SAMPLES
from streaming.motion import SessionMotion
from streaming.rtc import hint_frame_end, iter_frames, shorten_audio_jitter_buffer, time_encoder
from streaming.scheduler import FrameJob
from streaming.tracks import AvatarVideoTrack, DelayedAudioTrack

log = logging.getLogger(__name__)


class Session:
    def __init__(self, sid: str, pc, *, clock, scheduler, pipeline, metrics, avatar_id: str, avatar,
                 latency_s: float, lead_s: float, lip_lag_s: float = 0.0, margin_s: float = 0.0,
                 margin_adapt_s: float = 0.0, seed: int = 0, peer_timeout_s: float = 5.0,
                 connect_timeout_s: float = 20.0, stats_interval_s: float = 1.0, audio_prefetch: int | None = 0,
                 grace_s: float = 0.012, frame_end_hint: bool = True, audio_packet_ms: float | None = 5.0,
                 on_closed=None):
        self.id = sid
        self.pc = pc
        self.clock = clock
        self.scheduler = scheduler
        self.pipeline = pipeline
        self.metrics = metrics
        self.avatar_id = avatar_id
        self.avatar = avatar
        self.lead_s = lead_s
        self.lip_lag48 = int(round(lip_lag_s * RATE48))  # a frame's audio sits this far before its tick
        self.fps = clock.fps
        self.peer_timeout_s = peer_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.stats_interval_s = stats_interval_s
        self.audio_prefetch = audio_prefetch
        self.grace_s = grace_s
        self.frame_end_hint = frame_end_hint  # streaming.rtc.hint_frame_end on the video sender
        self.audio_packet_ms = audio_packet_ms  # outbound Opus packet duration (None: aiortc's 20 ms)
        self._on_closed = on_closed
        self.video_sender = self.video_mid = None  # the avatar video's RTCRtpSender and its m-section (attach_outbound)
        self.playout_delay_ms: tuple[int, int] | None = None  # what the receiver was asked to hold (None: not asked)
        self.loop = asyncio.get_running_loop()
        self.created = time.monotonic()
        self.closed = False
        self.close_reason: str | None = None
        self.client: str | None = None  # the client's address key (the server's rate limiters' and ghost reaping's)
        self.last_rx_at = self.created  # when anything last arrived from the peer (the monitor's view)
        self._closed_event = asyncio.Event()

        # the pipeline latency (latency_s) starts as the server's and moves with the inbound jitter: its arrival
        # margin (margin_s) grows by up to margin_adapt_s where audio arrives late (InboundAudio, adaptive margin)
        self.audio = InboundAudio(latency_s, margin_s=margin_s, adapt_max_s=margin_adapt_s)
        self.motion = SessionMotion(pipeline.cfg, pipeline.presets, clock.fps, seed=seed,
                                    idle_model=pipeline.idle_model_for(clock.fps))
        self.video_track = AvatarVideoTrack(self)
        self.audio_track = DelayedAudioTrack(self)
        self.channel = None
        self._tasks: set[asyncio.Task] = set()
        self._controls: deque = deque()

        # shared with the scheduler thread
        self._lock = threading.Lock()
        self._slot: dict[int, object] = {}
        self._waiter = None  # (tick, future) of a video track waiting for a late frame
        self._interrupt_at: float | None = None
        self._interrupt_tick: int | None = None
        self.interrupts = 0
        self.interrupt_latencies: deque = deque(maxlen=100)  # interrupt -> first flushed-state frame sent (s)
        self.interrupt_rest_latencies: deque = deque(maxlen=100)  # interrupt -> the rest picture sent early (s)
        self.epoch = 0
        self.k_start: int | None = None
        self._last_built = -1  # the latest tick a frame request was built for (rounds may run ahead)
        self._last_flush = -math.inf
        self._webcam = None  # streaming.webcam.WebcamFramer: face-tracked crops, made at the first frame used
        self.speaking = False
        self.lip_energy = 0.0
        self._audio_lip = None  # the last frame's lip from audio: the next body's provisional lip
        self._lag_energy = False  # the idle motion hears the frame before (set by the two-phase rounds)
        self._onsets_pending: dict[int, float] = {}
        self.onset_latencies: deque = deque(maxlen=2000)  # speech onset arrival -> its first open-mouth frame sent (s)
        # (arrival, tick, sent) of each speech onset, clock seconds: a benchmark splits the latency with them
        self.onset_events: deque = deque(maxlen=2000)
        self.encode_times: deque = deque(maxlen=2000)  # seconds from a video frame leaving the track to encoded
        self._last_video_sent = 0.0

        # stats
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_late = 0  # sent within the grace period after their tick
        self.frames_repeated = 0  # the last picture sent again for a dropped tick (not counted as sent)
        self.frames_mouth_only = 0  # made from an earlier tick's body and their own mouth (lanes; counted as sent)
        self._mouth_only_ticks: set[int] = set()  # delivered, not yet sent
        self._mouth_only_sent: deque = deque(maxlen=128)
        self.rest_picture = None  # the latest frame made without speech (av.VideoFrame)
        self._discard_before_pts = 0  # inbound audio ending before this (48 kHz, the sender's clock) is dropped
        self._audio_sender = None
        self._jittery_since: float | None = None  # when the peer last reported jitter (its RTCP receiver reports)
        self.peer_audio_jitter_ms: float | None = None
        self.audio_discarded_samples = 0
        self.drops: dict[str, int] = {}
        self._sent_times: deque = deque(maxlen=128)
        self._audio_sent: dict[int, float] = {}
        self._video_pending: dict[int, float] = {}
        self.av_offset_last: float | None = None
        self.av_offsets: deque = deque(maxlen=20000)  # (monotonic, video minus audio send time) per tick
        self.av_offset_max = 0.0
        self.av_offset_n = 0
        self.av_offset_sum = 0.0
        self.underrun_samples = 0
        self.controls_applied = 0
        self.control_errors = 0
        self.webcam_frames_in = 0

        # extra consumers of the outbound media (streaming.outputs: RTMP, WHIP, a virtual camera): each
        # gets every frame the tracks send, stamped with its tick / audio frame index (`tap_*`)
        self.taps: list = []

        if pc is not None:  # None: a session without a WebRTC peer (`marionette live`)
            pc.on("track", self._on_track)
            pc.on("datachannel", self._on_datachannel)
            pc.on("connectionstatechange", self._on_connection_state)

    # ========================================================================= peer connection
    def _spawn(self, coro, name: str) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        t.set_name(f"session-{self.id}-{name}")
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def start(self) -> None:
        self._spawn(self._monitor(), "monitor")

    def _on_track(self, track) -> None:
        if track.kind == "audio":
            if self.audio_prefetch is not None:
                shorten_audio_jitter_buffer(self.pc, track, self.audio_prefetch)
            self._spawn(self._consume_audio(track), "audio-in")
        elif track.kind == "video":
            self._spawn(self._consume_webcam(track), "webcam-in")

    def _on_datachannel(self, channel) -> None:
        if channel.label != "control":
            return
        self.channel = channel

        @channel.on("message")
        def on_message(data):
            self.handle_channel_message(data)

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.debug("session %s: connection %s", self.id, state)
        if state in ("failed", "closed"):
            await self.close(f"connection {state}")

    def attach_outbound(self) -> None:
        """Put the avatar video and the delayed audio on the offer's transceivers that can send."""
        from aiortc.rtcpeerconnection import or_direction

        placed = {"audio": False, "video": False}
        for tr in self.pc.getTransceivers():
            offer_dir = getattr(tr, "_offerDirection", None)
            if tr.kind not in placed or placed[tr.kind] or offer_dir not in ("sendonly", "sendrecv"):
                continue
            tr.sender.replaceTrack(self.video_track if tr.kind == "video" else self.audio_track)
            if tr.kind == "audio":
                self.audio_track.packet_ms = self.audio_packet_ms
                self._audio_sender = tr.sender
            if tr.kind == "video":
                self.video_sender, self.video_mid = tr.sender, tr.mid
                time_encoder(tr.sender, self._note_video_encoded)
                if self.frame_end_hint:
                    hint_frame_end(tr.sender, self.video_track.next_timestamp)
            tr.direction = or_direction(tr.direction, "sendonly")
            placed[tr.kind] = True
        if not placed["video"]:
            raise ValueError("the offer has no video transceiver that can receive the avatar "
                             "(add a recvonly or sendrecv video transceiver)")

    # =============================================================================== inbound
    async def _consume_audio(self, track) -> None:
        async for frame in iter_frames(track):
            if self.closed:
                return
            if self._discard_before_pts and frame.pts is not None and frame.time_base is not None and \
                    int(frame.pts * frame.time_base * RATE48) + frame.samples <= self._discard_before_pts:
                self.audio_discarded_samples += frame.samples  # sent before an interrupt that covered it
                continue
            try:
                self.audio.push(frame, self.clock.now())
            except Exception:  # noqa: BLE001 - a broken frame must not end the session
                log.exception("session %s: bad inbound audio frame", self.id)

    async def _consume_webcam(self, track) -> None:
        """Keep only the latest webcam frame (converted on the scheduler thread when a factor uses it)."""
        async for frame in iter_frames(track):
            if self.closed:
                return
            self.webcam_frames_in += 1
            if self.motion.wants_webcam():
                if self._webcam is None:  # face tracking on its own thread: never the loop, never the rounds
                    from streaming.webcam import WebcamFramer

                    self._webcam = WebcamFramer(self.pipeline.cfg.image_size, name=f"webcam-{self.id}")
                self._webcam.submit(frame)

    # ============================================================================== controls
    def handle_channel_message(self, data) -> None:
        msg = None
        try:
            msg = C.decode_message(data)
            ctl = C.parse_control(msg, self.control_context())
        except C.ControlError as e:
            self.control_errors += 1
            self.metrics.controls.inc(type=_type_of(msg), result="error")
            self.send({"type": "error", "error": str(e), "id": C.message_id(msg)})
            return
        self.apply_controls([ctl])
        if isinstance(ctl, C.StatsRequest):
            self.send(self.stats(), id=C.message_id(msg))
        elif C.message_id(msg) is not None:
            self.send({"type": "ack", "id": C.message_id(msg)})

    def control_context(self) -> C.ControlContext:
        return C.ControlContext(presets=self.pipeline.presets, exp_dim=self.pipeline.cfg.latents.exp)

    def apply_controls(self, ctls: list) -> None:
        """Validated controls: interrupt now (on the loop); the rest on the scheduler's next round."""
        for c in ctls:
            self.metrics.controls.inc(type=type(c).__name__.lower(), result="ok")
            self.controls_applied += 1
            if isinstance(c, C.Interrupt):
                self.interrupt(c.until_sample)
            elif isinstance(c, C.StatsRequest):
                pass
            else:
                self._controls.append(c)

    def interrupt(self, until_sample: int | None = None) -> None:
        """Flush pending audio (silenced from now on) and pending frames (discarded, including one
        being generated); the next frame made shows the mouth closed. `until_sample`: the client's
        microphone position when it interrupted (48 kHz samples from its first): inbound audio stamped
        before it that arrives later is dropped as well."""
        self.audio.flush()
        if until_sample is not None:
            self._discard_before_pts = max(self._discard_before_pts, int(until_sample))
        with self._lock:
            self.epoch += 1
            n = len(self._slot)
            self._slot.clear()
            self._last_flush = self.clock.now()
            self._interrupt_at, self._interrupt_tick = time.monotonic(), None
            self._audio_lip = None  # bodies made from now on start from a shut mouth
            self._onsets_pending.clear()  # their frames are flushed: no frame will show them
        self.interrupts += 1
        if self.k_start is not None:  # remake the flushed ticks' frames now rather than lose them
            nxt = self.clock.video_tick_at(self.clock.now()) + 1
            for k in range(nxt, max(nxt, self._last_built) + 1):
                self.scheduler.request_redo(self, k)
        if self.video_track is not None:
            self.video_track.cut_now()  # the tick being waited for shows the mouth at rest now
        log.debug("session %s: interrupt (%d pending frames flushed)", self.id, n)

    def send(self, obj: dict, **extra) -> bool:
        ch = self.channel
        if ch is None or ch.readyState != "open":
            return False
        if extra:
            obj = {**obj, **{k: v for k, v in extra.items() if v is not None}}
        if obj.get("id", 0) is None:
            obj = {k: v for k, v in obj.items() if k != "id"}
        try:
            ch.send(json.dumps(obj))
            return True
        except Exception:  # noqa: BLE001 - channel closing under us
            return False

    # ========================================================================= scheduler side
    def start_video(self) -> int:
        """Called by the video track's first recv(): the first tick this session gets frames for."""
        k = self.clock.video_tick_at(self.clock.now() + self.scheduler.start_lead_s + 0.002) + 1
        with self._lock:
            self.k_start = k
        self.scheduler.add(self)
        return k

    @property
    def latency_s(self) -> float:
        """The session's pipeline latency now (the server's, plus what the adaptive margin added)."""
        return self.audio.latency_s

    def wants_tick(self, k: int) -> bool:
        ks = self.k_start
        return not self.closed and ks is not None and k >= ks

    def _p48(self, k: int, off: int) -> int:
        return k * RATE48 // self.fps + off

    def frame_hops(self, k: int, off: int) -> tuple[int, int, int]:
        """(first hop, hops, end hop) of the audio tick k shows, in 10 ms hops of the 16 kHz stream.

        Tick k is due when stream sample p48(k) plays; the frame shows the frame period of audio
        centred there, so a sound's first frame is never more than half a period off the sound; or, with a
        lip lag (LatencyLevel.lip_lag_ms), centred that far before it: the lips trail the voice by the lag,
        and the pipeline latency is that much shorter."""
        q16 = (self._p48(k, off) - RATE48 / self.fps / 2 - self.lip_lag48) / 3.0
        h0 = int(round(q16 / HOP16))
        end = int(round((q16 + RATE16 / self.fps) / HOP16))
        return h0, max(1, end - h0), end

    def build_job(self, k: int) -> FrameJob | None:
        """Everything tick k's frame needs, at once (a round in one piece: redos, runtimes without phases)."""
        return self.finish_job(self.begin_job(k, lag_energy=self._lag_energy))

    def begin_job(self, k: int, lag_energy: bool = True) -> FrameJob:
        """What tick k needs before its audio is in (the body phase of the scheduler's two-phase round):
        controls applied, pose / eye / expression composed, and the lip the body is made with: the webcam's
        or none (controls), or for lips from audio the last frame's (`finish_job` sets the real one, which
        only the mouth net reads). lag_energy: the idle motion hears the audio of the frame before (this
        frame's is not in yet): head motion that follows speech 40 ms late, where nothing can see it."""
        self._last_built = max(self._last_built, k)
        self._lag_energy = lag_energy
        m = self.motion
        while self._controls:
            m.apply(self._controls.popleft())
        m.push_audio(self.audio.take_pending_16k())
        i = k - self.k_start
        with self._lock:
            epoch = self.epoch
        cam = self._webcam.take() if self._webcam is not None and m.wants_webcam() else None  # newest crop
        off = self.audio.offset48
        job = FrameJob(session=self, tick=k, epoch=epoch, avatar=self.avatar, rest={})
        lip_mode = job.extra["lip_mode"] = m.lip_mode()
        if off is not None:
            lag = 1 if lag_energy else 0

            def rms_of(idx: int) -> float:
                if idx < lag:
                    return 0.0
                a, n, _ = self.frame_hops(self.k_start + idx - lag, off)
                return self.audio.rms(a, n)

            def hops_of(idx: int) -> tuple[int, int] | None:
                if idx < lag:
                    return None
                a, n, _ = self.frame_hops(self.k_start + idx - lag, off)
                return a, n

            m.push_energy_until(i, rms_of, hops_of)
        else:
            m.push_energy_until(i, lambda idx: 0.0)
        job.rest = m.compose_rest(i)
        if lip_mode == "webcam":
            job.lip = m.webcam_latents["lip"]
        elif lip_mode == "audio":
            job.lip = self._audio_lip  # provisional: the last frame's
        if cam is not None:
            job.webcam = cam  # (S, S, 3) uint8 in the model's framing (streaming.webcam)
        return job

    def finish_job(self, job: FrameJob) -> FrameJob:
        """The audio part of tick `job.tick`'s request: the lip gate, the mel window E_aud reads (lips from
        audio), the onset timing. Called as late as the audio allows (the mouth phase)."""
        k = job.tick
        self.motion.push_audio(self.audio.take_pending_16k())
        off = self.audio.offset48
        if job.extra.get("lip_mode") == "audio":
            job.lip = None  # zeros (closed) unless E_aud fills it from `mel`
            if off is not None:
                h0, nh, end = self.frame_hops(k, off)
                job.gate = self.audio.gate(h0, nh)
                if job.gate > 0:
                    job.mel, _complete = self.motion.mel_window(end - self.motion.cfg.mel_past)
                    if not self.speaking:  # a speech onset: time it from arrival to the frame leaving
                        arrived = self.audio.first_speech_arrival(h0 - self.audio.hangover_hops,
                                                                  nh + self.audio.hangover_hops)
                        if arrived is not None:
                            with self._lock:
                                self._onsets_pending[k] = arrived
        elif job.extra.get("lip_mode") == "controls":
            job.lip = None
        self.speaking = job.gate > 0
        return job

    def set_webcam_latents(self, lat: dict) -> None:
        self.motion.webcam_latents = lat

    def deliver(self, k: int, frame, epoch: int, z_lip=None, mouth_only: bool = False) -> None:
        """Tick k's frame (the scheduler thread); mouth_only: its body is an earlier tick's (see the scheduler)."""
        with self._lock:
            if self.closed or epoch != self.epoch:
                return
            self._slot[k] = frame
            for old in [t for t in self._slot if t < k - 2]:
                del self._slot[old]
            if mouth_only:
                self._mouth_only_ticks.add(k)
            for old in [t for t in self._mouth_only_ticks if t < k - 2]:
                self._mouth_only_ticks.discard(old)
            if self._interrupt_at is not None and self._interrupt_tick is None:
                self._interrupt_tick = k  # the first frame made after the flush
            if z_lip is None:
                self.rest_picture = frame  # the latest silent frame: what a flushed tick shows
            w = self._waiter
        if w is not None and w[0] == k:
            self.loop.call_soon_threadsafe(_wake, w[1])
        self.lip_energy = 0.0 if z_lip is None else float(np.abs(z_lip).mean())
        self._audio_lip = z_lip  # the next body's provisional lip (scheduler thread)

    def fail_from_thread(self, reason: str) -> None:
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.close(reason)))

    # =========================================================================== track side
    def take_frame(self, k: int, count: bool = True):
        with self._lock:
            f = self._slot.pop(k, None)
            for old in [t for t in self._slot if t < k]:
                del self._slot[old]
        if f is None and count:
            self.count_drop_for(k)
        return f

    async def wait_frame(self, k: int, timeout: float):
        """Wait up to `timeout` for tick k's frame (the scheduler may be finishing it)."""
        fut = self.loop.create_future()
        with self._lock:
            f = self._slot.pop(k, None)
            if f is not None:
                return f
            self._waiter = (k, fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiter = None
                f = self._slot.pop(k, None)
        if f is not None:
            self.frames_late += 1
        return f

    def count_drop_for(self, k: int) -> str:
        """Count tick k as dropped; returns why: "flush" (an interrupt discarded it) or "late"."""
        flushed = self.clock.now() - self._last_flush < 3 * self.clock.period
        reason = "flush" if flushed else "late"
        self.count_drop(reason)
        return reason

    def count_drop(self, reason: str, n: int = 1) -> None:
        self.frames_dropped += n
        self.drops[reason] = self.drops.get(reason, 0) + n
        self.metrics.frames_dropped.inc(n, reason=reason)

    def audio_for_frame(self, j: int, start: int = 0, n: int = AUDIO_SAMPLES):
        """Outbound audio frame j's samples [start, start + n) (int16), None before the stream has begun."""
        off = self.audio.offset48
        if off is None:
            return None
        pcm, missing = self.audio.read48(j * AUDIO_SAMPLES + off + start, n)
        last = self.audio.last_arrival
        if missing and last is not None and self.clock.now() - last < 0.1:
            self.underrun_samples += missing
            self.metrics.audio_underruns.inc(missing)
        return pcm

    def note_interrupt_frame_sent(self, t: float) -> None:
        """The track sent the rest picture early at an interrupt (AvatarVideoTrack.cut_now)."""
        if self._interrupt_at is not None:
            lat = t - self._interrupt_at
            self.interrupt_rest_latencies.append(lat)
            self.metrics.stage_latency.observe(lat, stage="interrupt_to_rest_sent")

    def note_video_sent(self, k: int, t: float) -> None:
        self.frames_sent += 1
        if self._mouth_only_ticks:
            with self._lock:
                mouth_only = k in self._mouth_only_ticks
                self._mouth_only_ticks.discard(k)
            if mouth_only:
                self.frames_mouth_only += 1
                self._mouth_only_sent.append(t)
                self.metrics.frames_mouth_only.inc()
        if self._interrupt_tick is not None and k >= self._interrupt_tick:
            lat = t - self._interrupt_at
            self.interrupt_latencies.append(lat)
            self.metrics.stage_latency.observe(lat, stage="interrupt_to_frame_sent")
            self._interrupt_at = self._interrupt_tick = None
        if self._onsets_pending:
            # an onset whose own tick was dropped (sent as a repeat) is timed to the first frame sent after it,
            # which shows it too: leaving it out hid exactly the onsets a busy machine made slow
            with self._lock:
                due = sorted(x for x in self._onsets_pending if x <= k)
                shown = [(x, self._onsets_pending.pop(x)) for x in due]
            for k_on, arrived in shown:
                lat = (t - self.clock.t0) - arrived
                self.onset_latencies.append(lat)
                self.onset_events.append((arrived, k, t - self.clock.t0))
                self.metrics.stage_latency.observe(lat, stage="speech_onset_to_frame_sent")
                # the designed part of it: the onset's arrival -> the tick that first showed it was due
                self.metrics.stage_latency.observe(self.clock.video_time(k_on) - arrived, stage="speech_onset_to_tick")
        # pacing: the tick due -> the frame handed to the encoder (grace waits, event-loop delay)
        self.metrics.stage_latency.observe(max(0.0, t - self.clock.t0 - self.clock.video_time(k)), stage="tick_to_sent")
        self._last_video_sent = t
        self._sent_times.append(t)
        self.metrics.frames_sent.inc()
        # the audio frame playing the same instant: tick k is due at k/fps = (k*48000/fps)/48000
        num = k * RATE48
        j, rem = divmod(num // self.fps, AUDIO_SAMPLES)
        t_media = t - rem / RATE48
        if j in self._audio_sent:
            self._record_offset(t_media - self._audio_sent[j])
        else:
            self._video_pending[j] = t_media
            if len(self._video_pending) > 16:
                for old in sorted(self._video_pending)[:-16]:
                    del self._video_pending[old]

    def note_video_repeated(self, k: int, t: float) -> None:
        """Tick k went out as a repeat of an earlier picture (its own frame was dropped)."""
        self.frames_repeated += 1
        self.metrics.frames_repeated.inc()
        self._last_video_sent = t

    def _note_video_encoded(self, t: float) -> None:
        dt = t - self._last_video_sent
        if 0.0 <= dt < 1.0:
            self.encode_times.append(dt)
            self.metrics.stage_latency.observe(dt, stage="encode")

    def tap_video(self, k: int, frame) -> None:
        """Tick k's frame leaves (the video track): hand it to every tap (read-only for them)."""
        for tap in self.taps:
            try:
                tap.on_video(k, frame)
            except Exception:  # noqa: BLE001 - an output's failure must not stop the session
                log.exception("session %s: output %s failed on a video frame", self.id, tap)

    def tap_audio(self, j: int, frame) -> None:
        """Audio frame j (20 ms at 48 kHz) leaves (the audio track): hand it to every tap."""
        for tap in self.taps:
            try:
                tap.on_audio(j, frame)
            except Exception:  # noqa: BLE001
                log.exception("session %s: output %s failed on an audio frame", self.id, tap)

    async def close_taps(self) -> None:
        taps, self.taps = list(self.taps), []
        for tap in taps:
            try:
                await tap.aclose()
            except Exception:  # noqa: BLE001
                log.exception("session %s: closing output %s failed", self.id, tap)

    def note_audio_sent(self, j: int, t: float) -> None:
        self.metrics.audio_frames_sent.inc()
        self._audio_sent[j] = t
        if len(self._audio_sent) > 64:
            for old in sorted(self._audio_sent)[:-64]:
                del self._audio_sent[old]
        tv = self._video_pending.pop(j, None)
        if tv is not None:
            self._record_offset(tv - t)

    def _record_offset(self, off: float) -> None:
        self.av_offsets.append((time.monotonic(), off))
        self.av_offset_last = off
        self.av_offset_n += 1
        self.av_offset_sum += off
        self.av_offset_max = max(self.av_offset_max, abs(off))
        self.metrics.av_offset.observe(off)
        self.metrics.av_offset_last.set(off, session=self.id)

    # =============================================================================== stats
    def fps_now(self) -> float:
        now = time.monotonic()
        recent = [t for t in self._sent_times if now - t <= 1.0]
        return float(len(recent))

    def body_fps_now(self) -> float:
        """Pictures sent in the last second with a body of their own (fps_now less the mouth-only ones)."""
        now = time.monotonic()
        return self.fps_now() - float(sum(1 for t in self._mouth_only_sent if now - t <= 1.0))

    def stats(self) -> dict:
        sch = self.scheduler
        return {
            "type": "stats",
            "session": self.id,
            "uptime_s": round(time.monotonic() - self.created, 3),
            "fps": self.fps_now(),
            "target_fps": self.fps,
            "frames_sent": self.frames_sent,
            "frames_dropped": self.frames_dropped,
            "frames_late": self.frames_late,
            "frames_repeated": self.frames_repeated,
            "frames_mouth_only": self.frames_mouth_only,
            "body_fps": self.body_fps_now(),
            "audio_discarded_ms": round(self.audio_discarded_samples / 48.0, 1),
            "audio_packet_ms": self.audio_track.packet_ms,
            "playout_delay_ms": None if self.playout_delay_ms is None else list(self.playout_delay_ms),
            "audio_lead_ms": round(self.audio_track.lead_s * 1000, 2),
            "peer_audio_jitter_ms": None if self.peer_audio_jitter_ms is None else round(self.peer_audio_jitter_ms, 1),
            "drops": dict(self.drops),
            "latency_ms": round(self.latency_s * 1000, 1),
            "arrival_margin_ms": round(self.audio.effective_margin_s() * 1000, 1),
            "latency_steps": self.audio.steps_taken,
            "lip_lag_ms": round(self.lip_lag48 / 48, 1),
            "round_ms": round(sch.est_round * 1000, 2),
            "batch": sch.last_batch,
            "av_offset_ms": None if self.av_offset_last is None else round(self.av_offset_last * 1000, 2),
            "av_offset_mean_ms": round(self.av_offset_sum / self.av_offset_n * 1000, 3) if self.av_offset_n else None,
            "av_offset_max_ms": round(self.av_offset_max * 1000, 2),
            "speaking": self.speaking,
            "onset_latency_ms": _percentiles_ms(self.onset_latencies),
            "interrupts": self.interrupts,
            "interrupt_latency_ms": _percentiles_ms(self.interrupt_latencies),
            "interrupt_rest_sent_ms": _percentiles_ms(self.interrupt_rest_latencies),
            "lip": round(self.lip_energy, 4),
            "sources": dict(self.motion.modes),
            "audio_frames_in": self.audio.frames_in,
            "audio_underrun_ms": round(self.underrun_samples / RATE48 * 1000, 1),
            "audio_gap_ms": round(self.audio.inserted_samples / RATE48 * 1000, 1),
            "webcam_frames_in": self.webcam_frames_in,
            "webcam_face_tracked": self._webcam.tracked if self._webcam is not None else 0,
            "controls": self.controls_applied,
            "control_errors": self.control_errors,
            "avatar": self.avatar_id,
        }

    # ============================================================================ lifecycle
    async def _rx_packets(self) -> int | None:
        total = None
        seen = set()
        for tr in self.pc.getTransceivers():
            for t in (tr.receiver.transport, tr.sender.transport):
                if t is None or id(t) in seen:
                    continue
                seen.add(id(t))
                try:
                    for st in t._get_stats().values():
                        if getattr(st, "type", None) == "transport":
                            total = (total or 0) + int(st.packetsReceived)
                except Exception:  # noqa: BLE001
                    pass
        return total

    def silent_s(self) -> float:
        """Seconds since anything last arrived from the peer (since the session began, if nothing has)."""
        return time.monotonic() - self.last_rx_at

    async def _monitor(self) -> None:
        last_rx, last_change = None, time.monotonic()
        next_stats = time.monotonic() + self.stats_interval_s
        while not self.closed:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            state = self.pc.connectionState
            if state == "connected":
                rx = await self._rx_packets()
                if rx != last_rx:
                    last_rx, last_change = rx, now
                    self.last_rx_at = now
                elif now - last_change > self.peer_timeout_s:
                    log.info("session %s: nothing received for %.1f s; closing", self.id, now - last_change)
                    await self.close("peer timed out")
                    return
            elif state in ("new", "connecting") and now - self.created > self.connect_timeout_s:
                await self.close("connection did not establish")
                return
            if now >= next_stats:
                next_stats = now + self.stats_interval_s
                await self._adapt_audio_packets(now)
                self.send(self.stats())

    async def _adapt_audio_packets(self, now: float) -> None:
        """Short outbound audio packets keep a receiver's buffer short only on a calm network: a receiver
        holds a fixed number of packets, so on a jittery one (the peer's RTCP reports, > 4 ms) they are
        20 ms long (aiortc's 4 packets then cover 80 ms of jitter) until 10 s without it."""
        sender, want = self._audio_sender, self.audio_packet_ms
        if sender is None or not want or want >= 20:
            return
        try:
            report = await sender.getStats()
        except Exception:  # noqa: BLE001 - stats are advisory
            return
        jit = [getattr(st, "jitter", None) for st in report.values() if getattr(st, "type", "") == "remote-inbound-rtp"]
        jit = [j for j in jit if j is not None]
        if not jit:
            return
        self.peer_audio_jitter_ms = max(jit) / 48.0  # RTP timestamp units at 48 kHz
        if self.peer_audio_jitter_ms > 4.0:
            self._jittery_since = now
        calm = self._jittery_since is None or now - self._jittery_since > 10.0
        packet = want if calm else 20.0
        if packet != self.audio_track.packet_ms:
            log.info("session %s: outbound audio in %g ms packets (peer jitter %.1f ms)", self.id, packet,
                     self.peer_audio_jitter_ms)
            self.audio_track.packet_ms = packet

    async def close(self, reason: str = "closed") -> None:
        if self.closed:
            await self._closed_event.wait()
            return
        self.closed = True
        self.close_reason = reason
        log.info("session %s closed: %s", self.id, reason)
        self.scheduler.remove(self)
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t is not current:
                t.cancel()
        self.video_track.stop()
        self.audio_track.stop()
        try:
            if self.pc is not None:
                await self.pc.close()
        except Exception:  # noqa: BLE001
            log.exception("session %s: closing the peer connection failed", self.id)
        await self.close_taps()
        others = [t for t in self._tasks if t is not current]
        if others:
            await asyncio.gather(*others, return_exceptions=True)
        with self._lock:
            self._slot.clear()
        if self._webcam is not None:
            self._webcam.close(timeout=0)  # stops after the frame in hand; the loop never waits on it
        self.metrics.av_offset_last.remove(session=self.id)
        self.channel = None
        if self._on_closed is not None:
            self._on_closed(self)
        self._closed_event.set()


def _wake(fut) -> None:
    if not fut.done():
        fut.set_result(None)


def _percentiles_ms(values) -> dict | None:
    if not values:
        return None
    a = np.asarray(values, np.float64) * 1000
    return {"n": int(len(a)), "p50": round(float(np.percentile(a, 50)), 1),
            "p95": round(float(np.percentile(a, 95)), 1), "last": round(float(a[-1]), 1)}


def _type_of(msg) -> str:
    t = msg.get("type") if isinstance(msg, dict) else None
    return t if isinstance(t, str) and t in ("pose", "gaze", "blink", "expression", "source", "interrupt", "stats") \
        else "invalid"
