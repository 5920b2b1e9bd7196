"""How far the portrait's state estimate limits G: self-driving reconstruction PSNR (what `marionette evaluate`
measures: the clip's first frame is the portrait, every driving frame read as `evaluate` reads it: `read_driving`,
the model's views; before 2026-12-02 one reading with the mirror image) with the
portrait read at 3 x 3 shifts of +-d px (`ModelConfig.portrait_jitter_px`) for several d, beside G told the
ground-truth states of portrait and frames (the estimator's ceiling) and copy-source.

    python benchmarks/portrait_jitter.py --data runs/exp12/eval_s31 runs/s17/eval_s67 --jitter 0 1 2 3 4 6

Writes benchmarks/results/portrait_jitter.json (per corpus and clip: mean PSNR in dB), with the machine's load.
Offline: the figures do not depend on the load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir, load_model  # noqa: E402
from trainer import evaluate as ev  # noqa: E402
from trainer.synthetic import latents_from_factors  # noqa: E402


def corpus_psnr(m: "ev._Model", data: Path, jitters: list[int], clips: int, frames: int) -> dict:
    cfg0 = m.rt.model.cfg
    S, tot, ad = cfg0.image_size, cfg0.latents.total, cfg0.net.app_dim
    rows = []
    for clip in ev.select_clips(data, "all", clips):
        cd = ev._load_clip(clip, frames)
        src, real = ev._resize(cd.source, S), ev._resize(cd.frames, S)
        z_est = ev._compose(cfg0, ev._batched_motion(m.rt, real, 16), len(real))
        row = {"clip": f"{clip.split}/{clip.identity}/{clip.name}",
               "copy_source": ev.psnr(src.expand(len(real), -1, -1, -1), real).mean().item()}
        for d in jitters:
            m.rt.model.cfg = dataclasses.replace(cfg0, portrait_jitter_px=d)
            av = m.rt.prepare_avatar(src)
            row[f"jitter_{d}"] = ev.psnr(ev._generate(m.rt, av, z_est, 16), real).mean().item()
        m.rt.model.cfg = cfg0
        fac = {k: cd.arrays[k] for k in ("pose", "eyes", "mouth", "expression")}
        z_gt = torch.as_tensor(latents_from_factors(fac, cfg0))
        av = m.rt.prepare_avatar(src)
        app = av.app.clone()
        app[:, ad:ad + tot] = z_gt[:1]
        av_gt = type(av)(source=av.source, feat_hi=av.feat_hi, feat_lo=av.feat_lo, app=app)
        row["ground_truth_states"] = ev.psnr(ev._generate(m.rt, av_gt, z_gt[torch.as_tensor(cd.window)], 16),
                                             real).mean().item()
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    """Per-clip rows {"clip", "copy_source", variant: mean PSNR} -> the corpus' mean PSNR per variant, its gain over
    copy-source, and the rows (also benchmarks/reading_views.py's)."""
    keys = [k for k in rows[0] if k != "clip"]
    mean = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in keys}
    return {"mean_psnr": mean, "gain_over_copy_source": {k: round(mean[k] - mean["copy_source"], 3) for k in keys},
            "clips": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", type=Path, required=True, help="corpus directories (marionette corpus)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the built-in")
    p.add_argument("--jitter", nargs="+", type=int, default=[0, 1, 2, 3, 4, 6])
    p.add_argument("--max-clips", type=int, default=6)
    p.add_argument("--max-frames", type=int, default=75)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "portrait_jitter.json")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    ck = a.checkpoint or builtin_checkpoint_dir()
    model, meta = load_model(ck)
    m = ev._Model("model", model, meta["expression_presets"], "cpu")
    load0 = os.getloadavg()
    t0 = time.time()
    out = {"benchmark": "portrait_jitter", "checkpoint": str(ck),
           "shipped_portrait_jitter_px": model.cfg.portrait_jitter_px, "jitter_px": a.jitter,
           "settings": {"max_clips": a.max_clips, "max_frames": a.max_frames},
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "corpora": {}}
    for d in a.data:
        out["corpora"][str(d)] = corpus_psnr(m, d, a.jitter, a.max_clips, a.max_frames)
        print(d, json.dumps(out["corpora"][str(d)]["gain_over_copy_source"]), flush=True)
    out["loadavg_start"], out["loadavg_end"] = load0, os.getloadavg()
    out["seconds"] = round(time.time() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
