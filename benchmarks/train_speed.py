"""Training speed per stage: median seconds per optimiser step (steps/s, samples/s) of `trainer.train`.

    python benchmarks/train_speed.py --configs tiny lite [--data DIR] [--steps N] [--batch B] [--threads T]

Runs every stage in order into a temporary run directory (each stage starts from the previous one's
checkpoint), N steps each, and takes the median step time over steps 2..N (the first step pays for
start-up). Without --data it generates a small corpus (2 identities x 1 clip of 6 s at 64 px; clips are
resized to each config's image size). Prints a table and writes benchmarks/results/train_speed[_TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = {"tiny": 20, "lite": 4, "base": 3}


def _corpus(tmp: Path) -> Path:
    from trainer.corpus.generate import CorpusConfig, generate_corpus

    return generate_corpus(CorpusConfig(out=tmp / "corpus", identities=2, clips_per_identity=1, seconds=6.0,
                                        size=64, fps=25, seed=0))


def bench(config: str, data: Path, steps: int, batch: int | None, workers: int, device: str) -> dict:
    from trainer import config as C
    from trainer.train import TrainConfig, train

    out: dict = {}
    with tempfile.TemporaryDirectory() as td:
        run = Path(td) / "run"
        for stage in C.STAGES:
            t0 = time.perf_counter()
            train(TrainConfig(stage=stage, data=data, config=config, out=run, steps=steps, batch_size=batch,
                              workers=workers, log_every=1, ckpt_every=10 ** 9, progress=False, device=device))
            wall = time.perf_counter() - t0
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            dts = [1.0 / r["steps_per_s"] for r in recs if r["stage"] == stage][1:]
            b = batch or C.preset(config).stage(stage).batch_size
            med = statistics.median(dts) if dts else float("nan")
            out[stage] = {"batch": b, "steps": steps, "median_step_s": med, "steps_per_s": 1.0 / med,
                          "samples_per_s": b / med, "stage_wall_s": wall}
            print(f"{config:5s} {stage:10s} batch {b:3d}  {med * 1000:9.1f} ms/step  {1 / med:7.2f} steps/s  "
                  f"{b / med:8.1f} samples/s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "lite"])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=None, help="steps per stage (default: tiny 20, lite 4, base 3)")
    ap.add_argument("--batch", type=int, default=None, help="per-step batch (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="", help="suffix of the result file (train_speed_<tag>.json)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as td:
        data = a.data or _corpus(Path(td))
        res = {c: bench(c, data, a.steps or STEPS.get(c, 3), a.batch, a.workers, a.device) for c in a.configs}
    doc = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "load_avg_1min": os.getloadavg()[0],
           "torch": torch.__version__, "device": a.device, "batch_override": a.batch, "results": res,
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"train_speed_{a.tag}.json" if a.tag else "train_speed.json")
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
