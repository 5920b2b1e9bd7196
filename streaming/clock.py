"""The one media clock every outbound track and the scheduler pace against.

aiortc does not pace tracks: a track's `recv()` returns when it wants the frame sent. Two tracks
that each sleep against their own start time drift apart, so the server has exactly one clock,
started once; video tick k is due at `t0 + k / fps`, audio frame j (20 ms) at `t0 + j * 0.02`,
and both tracks derive their pts (video: 90 kHz, audio: samples at 48 kHz) from those indices.
Integer indices, no accumulated floating error: the offset between the two stays what the
scheduler put there, for ever.

Times are `time.monotonic()` seconds (the scheduler thread and the event loop share them).
"""

from __future__ import annotations

import asyncio
import math
import time
from fractions import Fraction

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = Fraction(1, VIDEO_CLOCK_RATE)
AUDIO_RATE = 48000
AUDIO_TIME_BASE = Fraction(1, AUDIO_RATE)
AUDIO_PTIME = 0.020
AUDIO_SAMPLES = int(AUDIO_RATE * AUDIO_PTIME)  # 960 samples per outbound audio frame


class MediaClock:
    """`t0` plus integer tick arithmetic for one video rate and the 20 ms / 48 kHz audio frames."""

    def __init__(self, fps: int, t0: float | None = None, time_fn=time.monotonic):
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = int(fps)
        self._time = time_fn
        self.t0 = self._time() if t0 is None else float(t0)

    # ----- wall time
    def now(self) -> float:
        """Seconds since the clock started."""
        return self._time() - self.t0

    def monotonic(self) -> float:
        return self._time()

    # ----- video ticks
    @property
    def period(self) -> float:
        return 1.0 / self.fps

    def video_time(self, k: int) -> float:
        """Clock time (seconds since t0) at which video tick k is due."""
        return k / self.fps

    def video_tick_at(self, t: float) -> int:
        """The last tick due at or before clock time t."""
        return math.floor(t * self.fps + 1e-9)

    def next_video_tick(self, t: float | None = None) -> int:
        """The first tick due strictly after clock time t (default: now)."""
        t = self.now() if t is None else t
        return self.video_tick_at(t) + 1

    def video_pts(self, k: int, k0: int = 0) -> int:
        """90 kHz pts of tick k in a stream whose first tick was k0 (exact for fps dividing 90000)."""
        return (k - k0) * VIDEO_CLOCK_RATE // self.fps

    # ----- audio frames
    def audio_time(self, j: int) -> float:
        """Clock time at which outbound audio frame j (covering [j*960, (j+1)*960) samples) is due."""
        return j * AUDIO_SAMPLES / AUDIO_RATE

    def audio_frame_at(self, t: float) -> int:
        return math.floor(t * AUDIO_RATE / AUDIO_SAMPLES + 1e-9)

    def audio_pts(self, j: int, j0: int = 0) -> int:
        return (j - j0) * AUDIO_SAMPLES

    # ----- waiting
    async def sleep_until(self, t: float) -> float:
        """Sleep on the event loop until clock time t; returns the lateness (>= 0) on waking."""
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        return max(0.0, self.now() - t)

    def wait_until(self, t: float, event=None) -> bool:
        """Block a thread until clock time t, or until `event` (threading.Event) is set; True if the event fired."""
        while True:
            delay = t - self.now()
            if delay <= 0:
                return False
            if event is not None:
                if event.wait(delay):
                    return True
            else:
                time.sleep(delay)
