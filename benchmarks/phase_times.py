"""The late-bound mouth's two phases, timed: `generate_body`, `generate_mouth` and the whole `generate` of one
frame, ONNX Runtime on this CPU, for one or more checkpoints, calls interleaved round-robin across them (so load
from other processes hits all alike), medians over --rounds calls after --warmup calls.

    python benchmarks/phase_times.py                                   # the built-in checkpoint
    python benchmarks/phase_times.py --checkpoints old=DIR new=engine/assets/builtin --rounds 100
    python benchmarks/phase_times.py --exports before=EXPORT_DIR after=EXPORT_DIR   # two codes' exports (ONNX)

--exports compares exports made by two versions of the code (`marionette export --format onnx --out DIR`, run in
a checkout of each), where --checkpoints compares checkpoints exported by this one.

Writes benchmarks/results/phase_times.json, with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir  # noqa: E402
from engine.runtimes.backend import open_backend  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=None, metavar="NAME=DIR",
                   help="default: builtin=<the built-in checkpoint>")
    p.add_argument("--exports", nargs="+", default=None, metavar="NAME=DIR",
                   help="ONNX export directories instead of checkpoints")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "phase_times.json")
    a = p.parse_args(argv)
    if a.checkpoints and a.exports:
        p.error("give --checkpoints or --exports, not both")
    pairs = a.exports or a.checkpoints or [f"builtin={builtin_checkpoint_dir()}"]
    load0 = os.getloadavg()
    calls = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not path:
            p.error(f"--checkpoints / --exports take NAME=DIR, got {pair!r}")
        if a.exports:
            from engine.runtimes.ort import OrtRuntime  # noqa: PLC0415

            rt = OrtRuntime(Path(path), threads=a.threads)
        else:
            be = open_backend("onnxruntime", checkpoint=Path(path), config="talk", threads=a.threads)
            rt = getattr(be, "runtime", be)
        if not rt.late_mouth:
            p.error(f"{path}: its export has no body / mouth graphs (a patch model is needed)")
        av = rt.prepare_avatar(torch.rand(1, 3, rt.cfg.image_size, rt.cfg.image_size))
        z = torch.zeros(1, rt.cfg.latents.total)
        body = rt.generate_body(av, z)
        calls[name] = {"body": lambda rt=rt, av=av, z=z: rt.generate_body(av, z),
                       "mouth": lambda rt=rt, av=av, z=z, b=body: rt.generate_mouth(b, av, z),
                       "generate": lambda rt=rt, av=av, z=z: rt.generate(av, z)}
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in c} for n, c in calls.items()}
    for r in range(a.warmup + a.rounds):
        for name, c in calls.items():
            for k, fn in c.items():
                t0 = time.perf_counter()
                fn()
                if r >= a.warmup:
                    times[name][k].append(1000 * (time.perf_counter() - t0))
    load1 = os.getloadavg()
    res = {n: {k: round(statistics.median(v), 2) for k, v in t.items()} for n, t in times.items()}
    for n, v in res.items():
        print(f"{n}: " + "  ".join(f"{k} {ms:.2f} ms" for k, ms in v.items()))
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f} on {os.cpu_count()} cores")
    doc = {"benchmark": "phase_times", "what": "median ms per call, ONNX Runtime, batch 1, interleaved",
           ("exports" if a.exports else "checkpoints"): dict(x.partition("=")[::2] for x in pairs),
           "threads": a.threads, "rounds": a.rounds,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": load0,
           "loadavg_end": load1, "ms": res}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
