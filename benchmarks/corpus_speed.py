"""End-to-end speed of `marionette corpus`: video seconds rendered per wall second, frames per second, and
where the time goes (speech + trajectories, rendering, encoding, file writing).

    .venv/bin/python benchmarks/corpus_speed.py [--identities 2] [--clips-per-identity 2] [--seconds 3]
                                                [--size 256] [--workers 1] [--device cpu]

Writes benchmarks/results/corpus_speed.json (or --out). Stage times are summed over clips in whichever
process rendered them, so with --workers > 1 they add up to more than the wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.corpus.generate import CorpusConfig, generate_corpus_with_stats  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", type=int, default=2)
    p.add_argument("--clips-per-identity", type=int, default=2)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "corpus_speed.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="corpus_speed-") as tmp:
        cfg = CorpusConfig(out=Path(tmp) / "corpus", identities=a.identities, clips_per_identity=a.clips_per_identity,
                           seconds=a.seconds, size=a.size, fps=a.fps, seed=a.seed, workers=a.workers,
                           device=a.device)
        t0 = time.perf_counter()
        _, st = generate_corpus_with_stats(cfg)
        wall = time.perf_counter() - t0
    t = st.timings
    frames = max(st.frames, 1)
    result = {
        "what": "marionette corpus end to end (speech, trajectories, render, H.264+AAC encode, wav/npz/json)",
        "command": "benchmarks/corpus_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "out"},
        "clips": st.clips, "frames": st.frames, "video_seconds": round(st.video_seconds, 3),
        "wall_seconds": round(wall, 3),
        "video_seconds_per_wall_second": round(st.video_seconds / wall, 4),
        "frames_per_second": round(st.frames / wall, 3),
        "stage_seconds": {"speech_and_trajectories": round(t.speech + t.trajectory, 3), "speech": round(t.speech, 3),
                          "trajectories": round(t.trajectory, 3), "render": round(t.render, 3),
                          "encode": round(t.encode, 3), "write": round(t.write, 3)},
        "stage_ms_per_frame": {"speech_and_trajectories": round(1000 * (t.speech + t.trajectory) / frames, 3),
                               "render": round(1000 * t.render / frames, 3),
                               "encode": round(1000 * t.encode / frames, 3),
                               "write": round(1000 * t.write / frames, 3)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "device": (torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "note": "provisional: measured while other work shared the machine (see load averages)",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
