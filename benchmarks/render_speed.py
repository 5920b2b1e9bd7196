"""Frames per second of the procedural face renderer (trainer.corpus.face) at a given size.

For each batch size: random identities and factors from the corpus ranges, one warm-up call, then the
median of several timed calls (wall clock; the process CPU time is recorded too, since a shared machine
makes wall time noisy). Eager always; `--compile` adds torch.compile (its compile time is reported).

    python benchmarks/render_speed.py                      # 256x256, batches 1, 8, 32, eager
    python benchmarks/render_speed.py --compile            # also the compiled renderer
    python benchmarks/render_speed.py --threads 2,1        # per thread count

On a machine shared with other jobs the wall-clock numbers are noisy (the load average is recorded);
cpu_s_per_frame (process CPU time) is steadier, though OpenMP threads spinning while the other core is
taken inflate it with more than one thread.

Writes benchmarks/results/render_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.corpus import factors as F  # noqa: E402
from trainer.corpus.face import FaceRenderer, sample_identity  # noqa: E402


def _batch(rng: np.random.Generator, n: int):
    ids = np.stack([sample_identity(rng) for _ in range(n)])

    def rnd(g):
        lo, hi = F.ranges(g)
        return rng.uniform(lo, hi, (n, len(lo))).astype(np.float32)

    return ids, rnd("pose"), rnd("eyes"), rnd("mouth"), rnd("expression")


def _measure(renderer: FaceRenderer, batches, repeats: int) -> dict:
    t0 = time.perf_counter()
    renderer.render(*batches[0])  # warm-up (compiles when compiled)
    first = time.perf_counter() - t0
    walls, cpus, paths = [], [], set()
    for i in range(repeats):
        args = batches[i % len(batches)]
        w, c = time.perf_counter(), time.process_time()
        renderer.render(*args)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        paths.add(renderer.last_path)
    n = batches[0][0].shape[0]
    wall = float(np.median(walls))
    cpu = float(np.median(cpus))
    return {"batch": n, "first_call_s": round(first, 3), "median_wall_s": round(wall, 5),
            "fps": round(n / wall, 2), "median_cpu_s": round(cpu, 5),
            "cpu_s_per_frame": round(cpu / n, 5), "paths": sorted(paths),
            "walls_s": [round(x, 5) for x in walls]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--compile", action="store_true", help="also measure the torch.compile'd renderer")
    ap.add_argument("--threads", default="0",
                    help="comma-separated torch thread counts to measure (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "render_speed.json")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.batches.split(",") if x]
    default_threads = torch.get_num_threads()
    results: dict = {"size": a.size, "device": a.device, "torch": torch.__version__,
                     "default_threads": default_threads, "cpu_count": os.cpu_count(),
                     "machine": platform.processor() or platform.machine(),
                     "date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_before": os.getloadavg(), "runs": []}
    for threads in [int(x) for x in a.threads.split(",") if x]:
        torch.set_num_threads(threads or default_threads)
        print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
              f"os.cpu_count() = {os.cpu_count()}, device {a.device}, size {a.size}, "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        modes = [("eager", False)] + ([("compiled", True)] if a.compile else [])
        for mode, comp in modes:
            renderer = FaceRenderer(a.size, device=a.device, compile=comp)
            rng = np.random.default_rng(0)
            for n in sizes:
                batches = [_batch(rng, n) for _ in range(3)]
                r = _measure(renderer, batches, a.repeats)
                r.update(mode=mode, threads=torch.get_num_threads(), load_avg=os.getloadavg()[0])
                results["runs"].append(r)
                print(f"{mode:8s} threads {r['threads']} batch {n:3d}: {r['fps']:8.1f} frames/s (median of "
                      f"{a.repeats}; first call {r['first_call_s']:.1f} s; cpu {1000 * r['cpu_s_per_frame']:.1f} "
                      f"ms/frame; rendered {'/'.join(r['paths'])})", flush=True)
    results["load_avg_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
