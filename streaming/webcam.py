"""The webcam track's frames -> face-tracked crops in the model's framing, for E_mot.

`engine.face.FaceTracker` (the tracker `render`'s driving videos and `marionette ingest` use): a full
detection on the first frame, every `detect_every` frames and after a loss, the landmark model in
between, smoothed, the crop held still inside a dead zone so head motion stays in the crop (E_mot reads
it as pose). Until a face is seen, and when none is found at all, frames are centre-cropped as before.

Where it runs: on its own thread per session, never on the event loop and never inside the scheduler's
rounds. A full dlib detection on a 640x480 webcam frame costs tens of milliseconds on a CPU (more than a
25 fps frame period under load), so on the scheduler thread it would make every session's frame late
each time it ran; here it only delays that session's webcam latents by one tracking step. Latest wins:
`submit` (event loop, cheap) replaces a frame not yet started; `take` (scheduler thread) returns the
newest crop once.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)


def centre_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """The centre square of `rgb` resized to size x size (the framing without a face)."""
    from engine.face import FaceTransform, crop_with

    h, w = rgb.shape[:2]
    return crop_with(rgb, FaceTransform.identity_square(w, h, size))


class WebcamFramer:
    """Per session: av.VideoFrame / HxWx3 uint8 frames in (`submit`), aligned (S, S, 3) uint8 crops out (`take`)."""

    def __init__(self, size: int, *, detector=None, detect_every: int = 10, name: str = "webcam-framer"):
        self.size = int(size)
        self._detector = detector
        self._detect_every = detect_every
        self._cond = threading.Condition()
        self._frame = None  # the newest frame not yet started
        self._seq_in = 0
        self._crop = None
        self._seq_out = 0  # the frame the newest crop came from
        self._seq_done = 0  # the newest frame handled (a crop or an error)
        self._taken = 0
        self._stop = False
        self.tracked = 0  # frames framed around a face
        self.untracked = 0  # frames centre-cropped (no face yet / tracking unavailable)
        self.errors = 0
        self._tracker = None
        self._tracker_failed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def submit(self, frame) -> None:
        """A new webcam frame (latest wins: one waiting since the last one started is dropped)."""
        with self._cond:
            self._frame = frame
            self._seq_in += 1
            self._cond.notify()

    def take(self) -> np.ndarray | None:
        """The newest crop not yet taken, or None."""
        with self._cond:
            if self._seq_out == self._taken or self._crop is None:
                return None
            self._taken = self._seq_out
            return self._crop

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once every submitted frame has been framed (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: (self._frame is None and self._seq_done == self._seq_in)
                                       or self._stop, timeout)

    def close(self, timeout: float = 2.0) -> None:
        with self._cond:
            self._stop = True
            self._frame = None
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the framing thread
    def _rgb(self, frame) -> np.ndarray:
        if isinstance(frame, np.ndarray):
            return np.ascontiguousarray(frame[..., :3])
        return frame.to_ndarray(format="rgb24")

    def frame(self, rgb: np.ndarray) -> np.ndarray:
        """One frame -> its crop (on the calling thread; `_run` calls it)."""
        if self._tracker is None and not self._tracker_failed:
            try:
                from engine.face import FaceTracker

                self._tracker = FaceTracker(self._detector, crop_size=self.size, detect_every=self._detect_every)
            except Exception as e:  # noqa: BLE001 - no detector installed: centre crops, as before
                self._tracker_failed = True
                log.warning("webcam: no face tracking (%s); frames are centre-cropped", e)
        tf = self._tracker.update(rgb) if self._tracker is not None else None
        if tf is None:
            self.untracked += 1
            return centre_crop(rgb, self.size)
        from engine.face import crop_with

        self.tracked += 1
        return crop_with(rgb, tf)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._frame is not None or self._stop)
                if self._stop:
                    return
                frame, seq = self._frame, self._seq_in
                self._frame = None
            try:
                crop = self.frame(self._rgb(frame))
            except Exception:  # noqa: BLE001 - one bad frame must not end the session's webcam
                self.errors += 1
                log.exception("webcam: framing a frame failed")
                crop = None
            with self._cond:
                if crop is not None:
                    self._crop, self._seq_out = crop, seq
                self._seq_done = seq
                self._cond.notify_all()


__all__ = ["WebcamFramer", "centre_crop"]
