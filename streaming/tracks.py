"""The two outbound tracks of a session, both paced by the one `MediaClock`.

`AvatarVideoTrack.recv()` sleeps until video tick k is due and returns the frame the scheduler made
for tick k, stamped pts = 90 kHz ticks since the session's first tick. If that frame is not there
(the scheduler was late, or an interrupt flushed it) the tick is dropped and counted: latest wins,
nothing ever queues. With `fill_gaps` (the default) the last picture goes out again for a dropped
tick, stamped with that tick (counted as repeated, not as sent), so every tick carries a frame and
consecutive frames have consecutive timestamps: a receiver sees a steady 25 fps, and the sender can
announce the next frame's timestamp the moment a frame is out (`streaming.rtc.hint_frame_end`), which
lets an aiortc receiver release each frame at once instead of one frame period later. `DelayedAudioTrack.recv()` sleeps until 20 ms audio frame j is due and returns
the inbound speech positioned for that time (see `audio_in`), pts = 48 kHz samples since its first
frame. Because both read the same clock and the same stream offset, the frame shown at tick k and
the audio played at that instant are the same moment of the speaker's audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.clock import AUDIO_RATE, AUDIO_SAMPLES, AUDIO_TIME_BASE, VIDEO_TIME_BASE

log = logging.getLogger(__name__)


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, session, fill_gaps: bool = True):
        super().__init__()
        self._s = session
        self._clock = session.clock
        self.k0: int | None = None
        self._next: int | None = None
        self._fill_before: int | None = None  # ticks below this were lost to a stall: repeat for each
        self._last = None  # the last picture sent (what a repeat shows)
        self.fill_gaps = fill_gaps
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_repeated = 0
        self.frames_cut = 0  # ticks whose frame went out early, at an interrupt, showing the mouth at rest
        self._cut_pending = False
        self._waiter: asyncio.Future | None = None  # resolved when the tick is due (False) or cut short (True)

    def cut_now(self) -> None:
        """An interrupt (on the event loop): the tick being waited for goes out now, with the latest silent
        picture, instead of when it is due (0-40 ms later). Its timestamp stays the tick's, so the frame
        after it and the frame-end hint are unchanged; a receiver that shows frames as they come (aiortc, a
        browser asked for zero playout delay) sees the mouth shut about a tick sooner."""
        if not self.fill_gaps:
            return
        self._cut_pending = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    async def _sleep_until_tick(self, k: int) -> bool:
        """Sleep until tick k is due (one timer, as asyncio.sleep); True if an interrupt cut the wait short."""
        delay = self._clock.video_time(k) - self._clock.now()
        cut, self._cut_pending = self._cut_pending, False
        if delay <= 0 or cut:
            return cut and delay > 0
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        timer = loop.call_later(delay, lambda: w.done() or w.set_result(False))
        try:
            cut = await w
        finally:
            timer.cancel()
            self._waiter = None
        if cut:
            self._cut_pending = False
        return cut

    def next_timestamp(self) -> int | None:
        """The 90 kHz timestamp the next frame will carry, when it is certain (None otherwise)."""
        if not self.fill_gaps or self._next is None or self.k0 is None or self.readyState != "live":
            return None
        return self._clock.video_pts(self._next, self.k0)

    def _repeat(self, k: int, picture=None) -> av.VideoFrame:
        if picture is not None:
            self._last = picture  # what the viewer now sees: later repeats must not bring back the old one
        last = self._last
        frame = av.VideoFrame.from_ndarray(last.to_ndarray(), format=last.format.name)
        frame.pts = self._clock.video_pts(k, self.k0)
        frame.time_base = VIDEO_TIME_BASE
        self._s.note_video_repeated(k, time.monotonic())
        self.frames_repeated += 1
        return frame

    async def recv(self) -> av.VideoFrame:
        s = self._s
        if self.readyState != "live":
            raise MediaStreamError
        if self._next is None:
            self.k0 = self._next = s.start_video()
        while True:
            k = self._next
            if self._fill_before is not None and k < self._fill_before:
                # a stall skipped this tick (already counted): its repeat goes out at once
                self._next = k + 1
                return self._repeat(k)
            cut = await self._sleep_until_tick(k)
            if self.readyState != "live":
                raise MediaStreamError
            if cut and self._last is not None and s.rest_picture is not None:
                self._next = k + 1
                s.take_frame(k, count=False)  # made before the interrupt (the flush cleared it) or being remade
                s.count_drop("flush")
                self.frames_dropped += 1
                self.frames_cut += 1
                s.note_interrupt_frame_sent(time.monotonic())
                return self._repeat(k, s.rest_picture)
            # an event-loop stall longer than a tick: skip to the current tick, never catch up in a burst
            # of generated frames (repeats of the last picture, with gaps filled, cost an encode each)
            current = self._clock.video_tick_at(self._clock.now())
            if current > k:
                s.count_drop("stall", current - k)
                self.frames_dropped += current - k
                if self.fill_gaps and self._last is not None:
                    self._fill_before = current
                    continue
                k = current
            self._next = k + 1
            frame = s.take_frame(k, count=False)
            if frame is None and s.grace_s > 0:
                # the round for this tick may be finishing: wait a few ms (bounded, well inside the
                # A/V tolerance) rather than drop it; past that, the tick is lost
                frame = await s.wait_frame(k, s.grace_s)
            if frame is None:
                reason = s.count_drop_for(k)
                self.frames_dropped += 1
                if self.fill_gaps and self._last is not None:
                    # an interrupt discarded the frame: show the mouth at rest (the latest silent frame),
                    # never the speech that was cut off
                    return self._repeat(k, s.rest_picture if reason == "flush" else None)
                continue
            frame.pts = self._clock.video_pts(k, self.k0)
            frame.time_base = VIDEO_TIME_BASE
            self._last = frame
            self.frames_sent += 1
            s.note_video_sent(k, time.monotonic())
            if s.taps:
                s.tap_video(k, frame)
            return frame


class DelayedAudioTrack(MediaStreamTrack):
    """The inbound speech, delayed by the pipeline latency, in 20 ms frames on the media clock.

    With `packet_ms` set (WebRTC sessions: `Session.attach_outbound`), `recv()` returns Opus packets of
    that duration, encoded here and each sent when its first sample is due, instead of 20 ms frames for
    aiortc's encoder. A receiver's jitter buffer counts packets (aiortc's holds 4 before releasing one:
    80 ms of 20 ms packets, 20 ms of 5 ms ones), so shorter packets shorten what every receiver holds
    and bring its audio level with the video (each packet is a whole Opus frame; libopus at 5 ms frames
    is its low-delay CELT mode)."""

    kind = "audio"

    def __init__(self, session, packet_ms: float | None = None):
        super().__init__()
        self._s = session
        self._clock = session.clock
        self.j0: int | None = None
        self._next: int | None = None
        self.frames_sent = 0
        self._silence = np.zeros((1, AUDIO_SAMPLES), np.int16)
        self.packet_ms = packet_ms
        self._encoder = None
        self._encoder_ms: float | None = None
        self._sub = 0  # the next packet's place in frame `_next` (packets of `_frame_ms`)
        self._frame_ms: float | None = None  # the packet length of the frame being sent
        self._pcm = np.zeros((1, AUDIO_SAMPLES), np.int16)  # the frame being sent (for taps)
        self._packets: deque = deque()  # (clock time due, av.Packet) of the frame being sent
        # send each frame this long before its media time (its RTP timestamps unchanged): set where the
        # receiver holds its audio longer than its video (a browser asked for no video playout delay)
        self.lead_s = 0.0

    async def recv(self):
        if not self.packet_ms:
            return await self._recv_frame()
        while not self._packets:
            await self._recv_packet()
        due, packet = self._packets.popleft()
        await self._clock.sleep_until(due)
        if self.readyState != "live":
            raise MediaStreamError
        return packet

    async def _recv_packet(self) -> None:
        """The next packet's samples, read when that packet is due (`lead_s` before its own media time), and
        encoded. Each packet is read on its own, not with the rest of its 20 ms frame: read with its frame at
        the frame's start, the last 5 ms packet's samples had to be in 15 ms earlier than they are played. With
        `--lip-lag-ms` taking half a frame out of the pipeline latency, that left the outbound audio less slack
        than the arrival margin, and it underran (in 2026-12-02's 50 fps runs, 14-19 s of 184)."""
        s = self._s
        if self.readyState != "live":
            raise MediaStreamError
        if self._next is None:
            self.j0 = self._next = self._clock.audio_frame_at(self._clock.now()) + 1
            self._sub = 0
        if self._sub == 0:  # the packet length changes between frames only (the network's jitter)
            self._frame_ms = self.packet_ms
            self._pcm = np.zeros((1, AUDIO_SAMPLES), np.int16)
        n = int(round(AUDIO_RATE * self._frame_ms / 1000))
        j, start = self._next, self._sub * n
        await self._clock.sleep_until(self._clock.audio_time(j) + start / AUDIO_RATE - self.lead_s)
        if self.readyState != "live":
            raise MediaStreamError
        if start == 0:
            self.frames_sent += 1
            s.note_audio_sent(j, time.monotonic())
        pcm = s.audio_for_frame(j, start, n)
        if pcm is not None:
            self._pcm[0, start:start + n] = pcm
        # a 5 ms Opus packet encodes in ~35 us here (7 ms of the loop a second): inline, as a hop to an executor
        # per packet would cost more and add its own jitter to the send time
        self._encode(j, self._pcm[:, start:start + n], start)
        self._sub += 1
        if start + n >= AUDIO_SAMPLES:
            self._next, self._sub = j + 1, 0
            if s.taps:
                s.tap_audio(j, self._frame(j, self._pcm))

    def _encode(self, j: int, pcm: np.ndarray, start: int) -> None:
        """One packet of `pcm` ((1, n) int16: frame j's samples from `start`) onto the send queue, due `lead_s`
        before its own media time and stamped with it."""
        if self._encoder is not None and self._encoder_ms != self._frame_ms:
            self._encoder = None  # the packet length changed (the network's jitter): a new encoder
        if self._encoder is None:
            c = av.CodecContext.create("libopus", "w")
            c.sample_rate = AUDIO_RATE
            c.layout = "mono"
            c.format = "s16"
            c.bit_rate = 64000
            c.time_base = AUDIO_TIME_BASE
            c.options = {"frame_duration": f"{self._frame_ms:g}", "application": "lowdelay"}
            c.open()
            self._encoder, self._encoder_ms = c, self._frame_ms
        pts = self._clock.audio_pts(j, self.j0) + start
        sub = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="s16", layout="mono")
        sub.sample_rate = AUDIO_RATE
        sub.pts = pts
        for packet in self._encoder.encode(sub):
            # stamped with its own samples' place on the media clock (libopus's pts lead by its pre-skip): the
            # sound and the picture of one instant keep one time
            packet.pts = pts
            packet.time_base = AUDIO_TIME_BASE
            self._packets.append((self._clock.audio_time(j) + start / AUDIO_RATE - self.lead_s, packet))

    def _frame(self, j: int, data: np.ndarray) -> av.AudioFrame:
        """Audio frame j ((1, 960) int16) stamped with its place on the media clock."""
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._clock.audio_pts(j, self.j0)
        frame.time_base = AUDIO_TIME_BASE
        return frame

    async def _recv_frame(self) -> av.AudioFrame:
        s = self._s
        if self.readyState != "live":
            raise MediaStreamError
        if self._next is None:
            self.j0 = self._next = self._clock.audio_frame_at(self._clock.now()) + 1
        j = self._next
        await self._clock.sleep_until(self._clock.audio_time(j) - self.lead_s)
        if self.readyState != "live":
            raise MediaStreamError
        # never skip audio frames: the Opus encoder numbers samples itself, a gap would shift sync
        self._next = j + 1
        pcm = s.audio_for_frame(j)
        frame = self._frame(j, self._silence if pcm is None else pcm.reshape(1, -1))
        self.frames_sent += 1
        s.note_audio_sent(j, time.monotonic())
        if s.taps:
            s.tap_audio(j, frame)
        return frame
