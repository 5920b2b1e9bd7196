"""The webcam track is face-tracked (streaming.webcam.WebcamFramer): the same FaceTracker as driving videos
and `marionette ingest`, on a thread of its own (never the event loop, never the scheduler's rounds), the
newest frame winning. Real photograph: scikit-image's astronaut, moved like a person in front of a camera."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dlib", reason="the default face detector (dlib-bin) is not installed")
skimage_data = pytest.importorskip("skimage.data")

from engine import face as F  # noqa: E402
from streaming.webcam import WebcamFramer, centre_crop  # noqa: E402

ASTRO = Path(skimage_data.__file__).parent / "astronaut.png"
ASTRO_EYES = np.array([[202.5, 101.0], [246.0, 103.0]])  # tests/test_face.py's hand reference


def _frame(photo, i: int, w: int = 640, h: int = 480) -> np.ndarray:
    a = math.radians(3.0 * math.sin(i / 4))
    s = 1.3
    A = s * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    t = np.array([w / 2 + 20 * math.sin(i / 6), h * 0.4]) - A @ ASTRO_EYES.mean(0)
    m = np.concatenate([A, t[:, None]], 1)
    return F.warp_affine(photo, F._invert(m), w, h, fill=(70, 80, 90))


def test_framer_gives_the_trackers_crops_off_the_calling_thread():
    photo = F.load_photo(ASTRO)
    frames = [_frame(photo, i) for i in range(14)]
    fr = WebcamFramer(256)
    try:
        crops = []
        for f in frames:  # one at a time: every frame is framed
            fr.submit(f)
            assert fr.wait_idle(10)
            crops.append(fr.take())
            assert fr.take() is None  # taken once
        # exactly what the tracker of driving videos gives (the same FaceTracker, same settings)
        ref = [c for c, _ in F.track_crops(frames, 256)]
        for a, b in zip(crops, ref):
            np.testing.assert_array_equal(a, b)
        assert fr.tracked == len(frames) and fr.untracked == 0
        # in the corpus framing: the eyes where the template puts them (within the dead zone's slack)
        face = F.get_detector().detect(crops[-1])[0]
        np.testing.assert_allclose(face.eyes, F.TEMPLATE_256[:2], atol=0.08 * 256 + 6)
        # latest wins, and submitting never waits for a detection: the first frame of a new tracker detects
        fr2 = WebcamFramer(256)
        try:
            big = [_frame(photo, i, 1280, 960) for i in range(6)]
            t0 = time.perf_counter()
            for f in big:
                fr2.submit(f)
            submit_s = time.perf_counter() - t0
            assert fr2.wait_idle(20)
            assert submit_s < 0.05, submit_s  # a detection at 1280x960 takes far longer
            assert fr2.tracked < len(big)  # frames that waited were replaced by newer ones
            assert fr2._seq_out == len(big) and fr2.take() is not None  # the newest frame was framed
        finally:
            fr2.close()
    finally:
        fr.close()
    assert not fr._thread.is_alive()


def test_framer_without_a_face_centre_crops():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    fr = WebcamFramer(128)
    try:
        fr.submit(noise)
        assert fr.wait_idle(10)
        np.testing.assert_array_equal(fr.take(), centre_crop(noise, 128))
        assert fr.untracked == 1 and fr.tracked == 0
    finally:
        fr.close()


def test_a_session_webcam_is_face_tracked(tmp_path):
    """Through the server: a webcam showing a real face drives the pose, its frames face-tracked."""
    pytest.importorskip("aiortc")
    from streaming.client import SyntheticCamera
    from streaming.fixtures import ServerThread, responsive_checkpoint, run_session
    from streaming.server import ServeConfig

    photo = F.load_photo(ASTRO)
    pics = [_frame(photo, i, 320, 240) for i in range(8)]
    cam = SyntheticCamera(lambda t: pics[int(t * 25) % len(pics)])
    ck = responsive_checkpoint(tmp_path / "tiny", "tiny")
    cfg = ServeConfig(checkpoint=ck, config="tiny", ice_hosts=("127.0.0.1",), max_sessions=2, align="off")
    with ServerThread(cfg) as st:
        r = asyncio.run(run_session(st.url, np.zeros(48000 * 3, np.int16), 2.5, webcam=cam,
                                    controls=[{"type": "source", "factor": "pose", "from": "webcam"}]))
    stats = r["stats"]
    assert stats["sources"]["pose"] == "webcam"
    assert stats["webcam_frames_in"] > 20 and stats["webcam_face_tracked"] > 10, stats
    assert len(r["frames"]) > 20
