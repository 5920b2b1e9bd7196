"""Per-stage cost of the engine's networks: MACs, per-avatar cache bytes and median CPU time (torch eager).

    python benchmarks/engine_cost.py                       # lite and base at 256^2, batch 1 and 8
    python benchmarks/engine_cost.py --configs lite --repeats 50 --threads 2

Stages:
  per avatar         e_app                      E_app on the portrait (cached in the AvatarState)
  per frame          e_aud                      E_aud on one mel window
                     g.flow / g.warp / g.refine the generator's three stages
                     g.patch                    the local mouth / eye generators (models with patches)
                     generator                  G end to end
                     frame = e_aud + generator  what every output frame costs
  per driving frame  e_mot, heads, motion       E_mot, the four factor heads, both

MACs are counted with torch.utils.flop_counter.FlopCounterMode at batch 1 (MACs = FLOPs / 2, grid_sample
and bilinear upsampling added by hand; see engine.networks.count_macs). Times are medians over --repeats
calls after --warmup calls, per call (ms) and per item (ms / batch); the minimum is kept too (ms_min_b*:
a hint of what a quiet machine gives when the median is noisy). Writes benchmarks/results/engine_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.config import ModelConfig  # noqa: E402
from engine.model import Marionette  # noqa: E402
from engine.networks import count_macs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "engine_cost.json"


def _inputs(model: Marionette, batch: int) -> dict[str, Any]:
    cfg = model.cfg
    s = cfg.image_size
    g = torch.Generator().manual_seed(0)
    img = torch.rand(batch, 3, s, s, generator=g) * 2 - 1
    with torch.inference_mode():
        hi, lo, app = model.encode_avatar(img[:1])  # relative models: app carries the portrait's state
        hi, lo, app = (t.expand(batch, *t.shape[1:]).contiguous() for t in (hi, lo, app))
        z = torch.randn(batch, cfg.latents.total, generator=g) * 0.3
        flow, occ, m = model.generator.flow(z, lo, app)
        w_lo, w_hi, w_src = model.generator.warp(flow, occ, img, hi, lo)
        mot = model.e_mot(img)
    mel = torch.randn(batch, cfg.audio.n_mels, cfg.mel_window, generator=g) - 5.0
    return dict(img=img, hi=hi, lo=lo, app=app, z=z, flow=flow, occ=occ, m=m, w_lo=w_lo, w_hi=w_hi,
                w_src=w_src, mot=mot, mel=mel)


def _stages(model: Marionette, x: dict[str, Any]) -> dict[str, tuple[str, Callable[[], Any]]]:
    g = model.generator
    patch = {}
    if g.patch is not None:  # the local generators on G's frame (here: the portrait as a stand-in frame)
        k = g.app_dim + g.z_total
        z_src, a_s = x["app"][:, g.app_dim:k], x["app"][:, k:].reshape(-1, 3, 2)
        patch["g.patch"] = ("per_frame", lambda: g.patch(x["img"], x["z"], z_src, x["flow"], a_s, x["w_src"]))
    return {
        "e_app": ("per_avatar", lambda: model.encode_avatar(x["img"])),
        "e_aud": ("per_frame", lambda: model.encode_audio(x["mel"])),
        "g.flow": ("per_frame", lambda: g.flow(x["z"], x["lo"], x["app"])),
        "g.warp": ("per_frame", lambda: g.warp(x["flow"], x["occ"], x["img"], x["hi"], x["lo"])),
        "g.refine": ("per_frame", lambda: g.refine(x["m"], x["w_lo"], x["w_hi"], x["w_src"])),
        **patch,
        "generator": ("per_frame", lambda: g(x["z"], x["img"], x["hi"], x["lo"], x["app"])),
        "frame": ("per_frame", lambda: (model.encode_audio(x["mel"]), g(x["z"], x["img"], x["hi"], x["lo"], x["app"]))),
        "e_mot": ("per_driving_frame", lambda: model.e_mot(x["img"])),
        "heads": ("per_driving_frame", lambda: model.heads(x["mot"])),
        "motion": ("per_driving_frame", lambda: model.encode_motion(x["img"])),
    }


def _times_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) milliseconds per call."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return 1000 * statistics.median(ts), 1000 * min(ts)


def measure(name: str, batch_sizes: list[int], repeats: int, warmup: int, timing: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(name)
    model = Marionette(cfg).eval()
    x1 = _inputs(model, 1)
    out: dict[str, Any] = {
        "image_size": cfg.image_size, "mel_window": cfg.mel_window,
        "params": {k: sum(p.numel() for p in getattr(model, k).parameters())
                   for k in ("e_app", "e_mot", "e_lip", "e_pose", "e_eye", "e_exp", "e_aud", "generator")},
        "avatar_cache_bytes": sum(x1[k].numel() * x1[k].element_size() for k in ("img", "hi", "lo", "app")),
        "stages": {},
    }
    for stage, (kind, fn) in _stages(model, x1).items():
        out["stages"][stage] = {"kind": kind, "macs": count_macs(fn)}
    if timing:
        for b in batch_sizes:
            xb = x1 if b == 1 else _inputs(model, b)
            for stage, (_, fn) in _stages(model, xb).items():
                ms, ms_min = _times_ms(fn, repeats, warmup)
                out["stages"][stage][f"ms_b{b}"] = round(ms, 3)
                out["stages"][stage][f"ms_min_b{b}"] = round(ms_min, 3)
                out["stages"][stage][f"ms_per_item_b{b}"] = round(ms / b, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["talk", "lite", "base"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-timing", action="store_true", help="MACs and bytes only")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {
        "benchmark": "engine_cost",
        "provisional": True,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "settings": {"batch_sizes": a.batch_sizes, "repeats": a.repeats, "warmup": a.warmup,
                     "timing": not a.no_timing, "mode": "torch eager, inference_mode, float32, CPU"},
        "configs": {},
    }
    for name in a.configs:
        result["configs"][name] = measure(name, a.batch_sizes, a.repeats, a.warmup, not a.no_timing)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")

    for name, r in result["configs"].items():
        print(f"\n{name} @ {r['image_size']}^2  (avatar cache {r['avatar_cache_bytes'] / 2**20:.2f} MiB, "
              f"mel window {r['mel_window']})")
        cols = [f"ms b{b}" for b in a.batch_sizes] + [f"ms/item b{b}" for b in a.batch_sizes]
        head = [] if a.no_timing else cols
        print(f"  {'stage':<11} {'kind':<18} {'GMAC':>7} " + " ".join(f"{c:>12}" for c in head))
        for stage, s in r["stages"].items():
            vals = [] if a.no_timing else ([s[f"ms_b{b}"] for b in a.batch_sizes]
                                           + [s[f"ms_per_item_b{b}"] for b in a.batch_sizes])
            print(f"  {stage:<11} {s['kind']:<18} {s['macs'] / 1e9:7.3f} " + " ".join(f"{v:12.2f}" for v in vals))
    print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
