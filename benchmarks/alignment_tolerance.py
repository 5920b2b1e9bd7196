"""How far off the corpus framing a portrait may be before the model stops animating it well.

A real photo is aligned to the framing the model was trained on (engine/face.py: eye line, face size and
centre as in the corpus). This measures what an alignment error costs: rendered identities (held out,
seeds 500+) at the corpus framing are moved off it by one similarity transform at a time (scale, shift,
roll), the same transform applied to the source portrait and to the ground-truth target frame, and the
model animates the moved portrait to a target state (the jaw open 0.5; the head turned 15 degrees).

Reported per perturbation, mean over identities:
  gain_db     PSNR(model, target) - PSNR(source, target): what the animation adds over copying the
              portrait (at the corpus framing this is the model's own figure)
  change      how much of the ground truth's change the model's frame makes, in the region the target
              changes (|model - source| / |target - source| there; 1 = all of it)
  kept        gain_db as a share of its value at the corpus framing

    .venv/bin/python benchmarks/alignment_tolerance.py [--checkpoint DIR] [--identities 6]

Writes benchmarks/results/alignment_tolerance.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir, load_checkpoint  # noqa: E402
from trainer.corpus.face import FaceRenderer, sample_identity  # noqa: E402

# one transform at a time: (what, scale, shift x, shift y (fractions of the width), roll degrees)
PERTURBATIONS = [("corpus framing", 1.0, 0.0, 0.0, 0.0)]
PERTURBATIONS += [(f"scale {s:g}", s, 0.0, 0.0, 0.0) for s in (0.8, 0.9, 1.1, 1.25)]
PERTURBATIONS += [(f"shift x {d:+g}", 1.0, d, 0.0, 0.0) for d in (-0.1, -0.05, 0.05, 0.1)]
PERTURBATIONS += [(f"shift y {d:+g}", 1.0, 0.0, d, 0.0) for d in (-0.1, -0.05, 0.05, 0.1)]
PERTURBATIONS += [(f"roll {r:+g}°", 1.0, 0.0, 0.0, r) for r in (-20, -10, -5, 5, 10, 20)]


def move(img: torch.Tensor, scale: float, dx: float, dy: float, roll_deg: float) -> torch.Tensor:
    """(B,3,S,S) -> the picture scaled about its centre, rolled and shifted (border pixels repeated)."""
    a = math.radians(roll_deg)
    # grid_sample maps output -> input: the inverse of "scale, rotate, then shift"
    c, s = math.cos(a) / scale, math.sin(a) / scale
    theta = torch.tensor([[c, s, -(c * 2 * dx + s * 2 * dy)], [-s, c, -(-s * 2 * dx + c * 2 * dy)]],
                         dtype=img.dtype).expand(img.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / F.mse_loss(a, b).clamp_min(1e-10)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    ap.add_argument("--identities", type=int, default=6)
    ap.add_argument("--seed", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "alignment_tolerance.json")
    a = ap.parse_args(argv)
    ck = a.checkpoint or builtin_checkpoint_dir()
    if ck is None:
        ap.error("no --checkpoint and no built-in checkpoint installed")
    model, _ = load_checkpoint(ck)
    model.eval()
    if not model.cfg.relative:
        ap.error("this benchmark drives the relative (talk) design")
    size = model.cfg.image_size
    renderer = FaceRenderer(size)
    k = model.generator.app_dim + model.cfg.latents.total
    pose_sl = model.cfg.latents.slices()["pose"]
    targets = {"jaw 0.5": {"mouth": np.array([[0.5, 0.0, 0.0]], np.float32)},
               "yaw 15°": {"pose": np.array([[15.0, 0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)}}
    rows = {name: {t: {"gain_db": [], "change": []} for t in targets} for name, *_ in PERTURBATIONS}
    with torch.no_grad():
        for i in range(a.identities):
            ident = np.asarray(sample_identity(np.random.default_rng(a.seed + i)), np.float32)[None]
            src0 = renderer.render(ident)[0:1].cpu()
            gts = {t: renderer.render(ident, **kw)[0:1].cpu() for t, kw in targets.items()}
            for name, sc, dx, dy, roll in PERTURBATIONS:
                src = move(src0, sc, dx, dy, roll)
                hi, lo, app = model.encode_avatar(src * 2 - 1)
                z_src = app[:, model.generator.app_dim:k]
                for t, gt0 in gts.items():
                    gt = move(gt0, sc, dx, dy, roll)
                    z = z_src.clone()
                    if t.startswith("jaw"):
                        z[:, 0] = 0.5
                    else:
                        z[:, pose_sl.start] = z_src[:, pose_sl.start] + 15.0 / 30.0  # yaw latent unit = 30 degrees
                    out = (model.generator(z, src * 2 - 1, hi, lo, app) * 0.5 + 0.5).clamp(0, 1)
                    region = (gt - src).abs().mean(1, keepdim=True) > 0.03  # where the target changes
                    want = ((gt - src).abs() * region).sum()
                    got = ((out - src).abs() * region).sum()
                    rows[name][t]["gain_db"].append(psnr(out, gt) - psnr(src, gt))
                    rows[name][t]["change"].append(float(got / want.clamp_min(1e-6)))
    res = {"checkpoint": str(ck), "identities": a.identities, "seed": a.seed,
           "perturbations": [], "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    base = {t: float(np.mean(rows["corpus framing"][t]["gain_db"])) for t in targets}
    for name, sc, dx, dy, roll in PERTURBATIONS:
        entry = {"perturbation": name, "scale": sc, "shift_x": dx, "shift_y": dy, "roll_deg": roll}
        for t in targets:
            g = float(np.mean(rows[name][t]["gain_db"]))
            entry[t] = {"gain_db": round(g, 2), "change": round(float(np.mean(rows[name][t]["change"])), 3),
                        "kept": round(g / base[t], 2) if base[t] > 0 else None}
        res["perturbations"].append(entry)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Alignment tolerance (`benchmarks/alignment_tolerance.py`)", "",
             f"Checkpoint `{ck}`, {a.identities} held-out rendered identities; one similarity transform at a time "
             "applied to the portrait and the ground-truth target. gain = PSNR(model, target) - PSNR(portrait, "
             "target); change = share of the target's change the model makes; kept = gain / gain at the corpus "
             "framing.", "",
             "| perturbation | " + " | ".join(f"{t}: gain dB, change, kept" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for e in res["perturbations"]:
        lines.append(f"| {e['perturbation']} | " + " | ".join(
            f"{e[t]['gain_db']:+.2f}, {e[t]['change']:.2f}, {e[t]['kept']}" for t in targets) + " |")
    lines += ["", f"Load average {res['machine']['load_avg']} (timing-free: the figures do not depend on it)."]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
