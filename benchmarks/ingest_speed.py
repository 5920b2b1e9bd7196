"""Speed of `marionette ingest`: source frames per wall second and per CPU second, at two source sizes.

    .venv/bin/python benchmarks/ingest_speed.py [--seconds 20] [--sizes 640x360,1280x720]

Each video is a real photograph (scikit-image's astronaut) swaying and drifting like a talking head, at
30 fps (so the 25 fps resampling is exercised), with real speech (LibriVox from pocketsphinx-testdata when
installed, else a tone) as AAC. Writes benchmarks/results/ingest_speed.json (or --out) with the load
average before and after: on a shared machine the wall figures are only as clean as the load says.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def _speech(seconds: float) -> np.ndarray:
    parts = []
    for p in sorted(LIBRIVOX.glob("*.wav")):
        with wave.open(str(p)) as w:
            if w.getframerate() == 16000 and w.getnchannels() == 1:
                parts.append(np.frombuffer(w.readframes(w.getnframes()), "<i2"))
    x = np.concatenate(parts) if parts else (np.sin(np.arange(16000) / 16000 * 2 * np.pi * 200) * 8000).astype(np.int16)
    reps = int(math.ceil(seconds * 16000 / len(x)))
    return np.tile(x, reps)[: int(seconds * 16000)].astype(np.int16)


def make_video(path: Path, width: int, height: int, seconds: float, fps: int = 30) -> None:
    import av
    from skimage import data as skdata

    from engine import face as F

    astro = np.ascontiguousarray(skdata.astronaut())
    eyes_mid = np.array([224.25, 102.0])
    face_scale = 0.45 * height / 100.0  # the astronaut's eye-to-eye distance is ~44 px: face ~0.45 of the height
    n = int(round(seconds * fps))
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        v.options = {"preset": "veryfast", "crf": "20"}
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(n):
            ang = math.radians(3.0 * math.sin(i / 11))
            s = face_scale * (1 + 0.03 * math.sin(i / 40))
            A = s * np.array([[math.cos(ang), math.sin(ang)], [-math.sin(ang), math.cos(ang)]])
            centre = np.array([width / 2 + 0.02 * width * math.sin(i / 17), height * 0.42])
            m = np.concatenate([A, (centre - A @ eyes_mid)[:, None]], 1)
            img = F.warp_affine(astro, F._invert(m), width, height, fill=(40, 60, 80))
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, fps)
            for p in v.encode(f):
                c.mux(p)
        pcm = _speech(seconds)
        for i in range(0, len(pcm), 1024):
            fr = av.AudioFrame.from_ndarray(pcm[None, i:i + 1024], format="s16", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = 16000, i, Fraction(1, 16000)
            for p in a.encode(fr):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        for p in a.encode(None):
            c.mux(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--sizes", default="640x360,1280x720")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest_speed.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from trainer.ingest import IngestConfig, ingest

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.sizes.split(","):
            w, h = (int(x) for x in spec.split("x"))
            video = Path(tmp) / f"talk_{w}x{h}.mp4"
            make_video(video, w, h, a.seconds)
            load0 = os.getloadavg()
            c0, t0 = time.process_time(), time.perf_counter()
            s = ingest(IngestConfig(videos=(video,), out=Path(tmp) / f"out_{w}x{h}", progress=False))
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            load1 = os.getloadavg()
            rep = json.loads((Path(tmp) / f"out_{w}x{h}" / "ingest_report.json").read_text())["videos"][0]
            results.append({"source": f"{w}x{h} 30 fps, {a.seconds:g} s", "frames_in_25fps": s.frames_in,
                            "frames_kept": s.frames_out, "clips": s.clips, "wall_s": round(wall, 2),
                            "cpu_s": round(cpu, 2), "frames_per_wall_s": round(s.frames_in / wall, 1),
                            "frames_per_cpu_s": round(s.frames_in / cpu, 1),
                            "realtime_factor": round(a.seconds / wall, 2), "detections": rep.get("detections"),
                            "loadavg_1min_before": round(load0[0], 2), "loadavg_1min_after": round(load1[0], 2)})
            print(json.dumps(results[-1]))
    doc = {"command": "benchmarks/ingest_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "detector": "dlib (HOG + 68 landmarks), full detection every 10 frames",
           "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
