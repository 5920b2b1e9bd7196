"""Backend throughput on this CPU: frames/s and ms/frame of `generate` per backend and batch size.

    python benchmarks/backends.py                          # lite 256^2, batch 1 4 16, all CPU variants
    python benchmarks/backends.py --batches 1 4 --rounds 30 --no-compile

Variants (all on the same inputs, per-item avatars: row i of a batch has its own avatar):
  torch           TorchRuntime, eager fp32 (the reference)
  torch.compile   the same with the generator under torch.compile (inductor; compiled once per batch size,
                  ~1 min each here; --no-compile skips it)
  ort             OrtRuntime fp32, the GridSample offload on, no spinning (the defaults)
  ort-spin        the same with ORT's pool threads busy-waiting between ops
  ort-nativegs    OrtRuntime fp32 with ONNX Runtime's own GridSample (what the offload is measured against)
  ort-int8        OrtRuntime on an int8 export (refine convs in QLinearConv)
Calls are interleaved round-robin across variants (so load from other processes hits all alike); each
number is the median over --rounds calls after --warmup calls. Also: encode_audio at batch 1 and 16, the
ORT/torch time ratio at batch 1 from the same run, and the PSNR of every variant's frames vs torch.
Random weights (no checkpoint) are perturbed like the parity tests so every layer of G contributes to the
frames (speed does not depend on the values). Writes benchmarks/results/backends.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.checkpoint import load_model  # noqa: E402
from engine.runtimes.export import ExportConfig, export_model  # noqa: E402
from engine.runtimes.torch_runtime import TorchRuntime  # noqa: E402
from engine.runtimes.ort import OrtRuntime, physical_cores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "backends.json"


def _perturb(model, seed: int = 1, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        model.generator.head.bias[12:16] = 0.0
    return model


def _portraits(n: int, s: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    out = []
    for _ in range(n):
        c = torch.rand(3, 1, 1, generator=g)
        img = 0.3 + 0.2 * x * c + 0.1 * y + 0.4 * ((x / 0.6) ** 2 + (y / 0.8) ** 2 < 1).float() * c
        out.append(img.clamp(0, 1).unsqueeze(0))
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    for f in calls.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="lite")
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: built-in, else random)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-int8", action="store_true", help="skip the int8 export and its variant")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)

    threads = a.threads or physical_cores()
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    model, meta = load_model(a.checkpoint, config=a.config)
    if meta.get("random_weights"):
        _perturb(model)
    cfg = model.cfg
    s = cfg.image_size

    variants: dict[str, Any] = {"torch": TorchRuntime(copy.deepcopy(model))}
    notes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="marionette-bench-") as tmp:
        t0 = time.perf_counter()
        fp32 = export_model(model, meta, ExportConfig(config=a.config, out=Path(tmp) / "fp32"))
        notes["export_fp32_s"] = round(time.perf_counter() - t0, 1)
        variants["ort"] = OrtRuntime(fp32, threads=threads)
        variants["ort-spin"] = OrtRuntime(fp32, threads=threads, spin=True)
        variants["ort-nativegs"] = OrtRuntime(fp32, threads=threads, grid_sample="onnxruntime")
        if not a.no_int8:
            try:
                int8 = export_model(model, meta, ExportConfig(config=a.config, out=Path(tmp) / "int8",
                                                              precision="int8"))
                variants["ort-int8"] = OrtRuntime(int8, threads=threads)
                v = json.loads((int8 / "manifest.json").read_text())["graphs"]["generator"]["validation"]
                notes["int8_export_psnr_db_vs_fp32"] = round(v["int8_psnr_db_vs_fp32"], 2)
            except Exception as e:  # noqa: BLE001 - a refused precision is a result, not a crash
                notes["int8"] = f"not kept: {e}"
        compiled: dict[int, TorchRuntime] = {}

        avatars_src = _portraits(max(a.batches), s)
        avatars = {k: [rt.prepare_avatar(im) for im in avatars_src] for k, rt in variants.items()}
        results: dict[str, Any] = {"generate": {}, "encode_audio": {}}
        g = torch.Generator().manual_seed(1)
        for b in a.batches:
            z = torch.randn(b, cfg.latents.total, generator=g) * 0.5
            calls = {k: (lambda rt=rt, av=avatars[k][:b]: rt.generate(av, z)) for k, rt in variants.items()}
            if not a.no_compile:
                rc = TorchRuntime(copy.deepcopy(model))
                rc.model.generator = torch.compile(rc.model.generator, dynamic=False)
                t0 = time.perf_counter()
                rc.generate(avatars["torch"][:b], z)
                notes[f"torch_compile_s_b{b}"] = round(time.perf_counter() - t0, 1)
                compiled[b] = rc
                calls["torch.compile"] = lambda rc=rc, av=avatars["torch"][:b]: rc.generate(av, z)
            ref = variants["torch"].generate(avatars["torch"][:b], z)
            psnrs = {k: _psnr(f(), ref) for k, f in calls.items()}
            times = _interleaved(calls, a.rounds, a.warmup)
            res = {}
            for k, ts in times.items():
                med = statistics.median(ts) * 1000
                res[k] = {"ms_per_call": round(med, 2), "ms_per_frame": round(med / b, 2),
                          "frames_per_s": round(1000 * b / med, 1), "ms_min_per_call": round(min(ts) * 1000, 2),
                          "psnr_db_vs_torch": None if math.isinf(psnrs[k]) else round(psnrs[k], 1)}
            results["generate"][f"batch_{b}"] = res
            print(f"generate batch {b}: " + "  ".join(f"{k} {v['ms_per_frame']:.1f} ms/frame "
                                                      f"({v['frames_per_s']:.0f} fps)" for k, v in res.items()),
                  flush=True)
            compiled.clear()

        for b in (1, 16):
            mel = torch.randn(b, cfg.audio.n_mels, cfg.mel_window, generator=g) * 2 - 5
            calls = {k: (lambda rt=variants[k]: rt.encode_audio(mel)) for k in ("torch", "ort")}
            times = _interleaved(calls, a.rounds * 2, a.warmup)
            results["encode_audio"][f"batch_{b}"] = {k: {"ms_per_call": round(statistics.median(ts) * 1000, 3)}
                                                     for k, ts in times.items()}
            print(f"encode_audio batch {b}: " + "  ".join(
                f"{k} {statistics.median(ts) * 1000:.2f} ms" for k, ts in times.items()), flush=True)

    b1 = results["generate"].get("batch_1")
    if b1:
        results["ort_over_torch_time_ratio_batch_1"] = round(b1["ort"]["ms_per_call"] / b1["torch"]["ms_per_call"], 3)
        print(f"ORT / torch time at batch 1: {results['ort_over_torch_time_ratio_batch_1']:.2f}")
    doc = {
        "what": "median ms per generate call / per frame, per backend variant, interleaved round-robin",
        "config": cfg.name, "image_size": s, "batches": a.batches, "rounds": a.rounds, "threads": threads,
        "checkpoint": meta.get("checkpoint"), "random_weights_perturbed": bool(meta.get("random_weights")),
        "cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(), "torch": torch.__version__,
        "onnxruntime": variants["ort"].describe()["onnxruntime"],
        "variants": {k: v.describe() if hasattr(v, "describe") else {"name": k} for k, v in variants.items()},
        "notes": notes, "results": results,
        "provisional": "measured on a machine shared with other jobs unless loadavg_start is near 0",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
