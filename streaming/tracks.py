"""The two outbound tracks of a session, both paced by the one `MediaClock`.

`AvatarVideoTrack.recv()` sleeps until video tick k is due and returns the frame the scheduler made
for tick k, stamped pts = 90 kHz ticks since the session's first tick. If that frame is not there
(the scheduler was late, or an interrupt flushed it) the tick is dropped and counted: latest wins,
nothing ever queues. `DelayedAudioTrack.recv()` sleeps until 20 ms audio frame j is due and returns
the inbound speech positioned for that time (see `audio_in`), pts = 48 kHz samples since its first
frame. Because both read the same clock and the same stream offset, the frame shown at tick k and
the audio played at that instant are the same moment of the speaker's audio.
"""

from __future__ import annotations

import logging
import time

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.clock import AUDIO_RATE, AUDIO_SAMPLES, AUDIO_TIME_BASE, VIDEO_TIME_BASE

log = logging.getLogger(__name__)


class AvatarVideoTrack(MediaStreamTrack):
    kind = "video"

    def __init__(self, session):
        super().__init__()
        self._s = session
        self._clock = session.clock
        self.k0: int | None = None
        self._next: int | None = None
        self.frames_sent = 0
        self.frames_dropped = 0

    async def recv(self) -> av.VideoFrame:
        s = self._s
        if self.readyState != "live":
            raise MediaStreamError
        if self._next is None:
            self.k0 = self._next = s.start_video()
        while True:
            k = self._next
            await self._clock.sleep_until(self._clock.video_time(k))
            if self.readyState != "live":
                raise MediaStreamError
            # an event-loop stall longer than a tick: skip to the current tick, never catch up in a burst
            current = self._clock.video_tick_at(self._clock.now())
            if current > k:
                s.count_drop("stall", current - k)
                self.frames_dropped += current - k
                k = current
            self._next = k + 1
            frame = s.take_frame(k, count=False)
            if frame is None and s.grace_s > 0:
                # the round for this tick may be finishing: wait a few ms (bounded, well inside the
                # A/V tolerance) rather than drop it; past that, the tick is lost
                frame = await s.wait_frame(k, s.grace_s)
            if frame is None:
                s.count_drop_for(k)
                self.frames_dropped += 1
                continue
            frame.pts = self._clock.video_pts(k, self.k0)
            frame.time_base = VIDEO_TIME_BASE
            self.frames_sent += 1
            s.note_video_sent(k, time.monotonic())
            if s.taps:
                s.tap_video(k, frame)
            return frame


class DelayedAudioTrack(MediaStreamTrack):
    kind = "audio"

    def __init__(self, session):
        super().__init__()
        self._s = session
        self._clock = session.clock
        self.j0: int | None = None
        self._next: int | None = None
        self.frames_sent = 0
        self._silence = np.zeros((1, AUDIO_SAMPLES), np.int16)

    async def recv(self) -> av.AudioFrame:
        s = self._s
        if self.readyState != "live":
            raise MediaStreamError
        if self._next is None:
            self.j0 = self._next = self._clock.audio_frame_at(self._clock.now()) + 1
        j = self._next
        await self._clock.sleep_until(self._clock.audio_time(j))
        if self.readyState != "live":
            raise MediaStreamError
        # never skip audio frames: the Opus encoder numbers samples itself, a gap would shift sync
        self._next = j + 1
        pcm = s.audio_for_frame(j)
        data = self._silence if pcm is None else pcm.reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._clock.audio_pts(j, self.j0)
        frame.time_base = AUDIO_TIME_BASE
        self.frames_sent += 1
        s.note_audio_sent(j, time.monotonic())
        if s.taps:
            s.tap_audio(j, frame)
        return frame
