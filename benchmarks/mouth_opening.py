"""How far the mouth opens for a commanded jaw: the factor oracle's reading of the model's frames vs of the
renderer's own frames, on fresh identities (the built-in model's small-openings check; README "The model").

    .venv/bin/python benchmarks/mouth_opening.py [--checkpoint DIR] [--oracle DIR] [--identities 5]
    .venv/bin/python benchmarks/mouth_opening.py --calibrate [--install]

Writes benchmarks/results/mouth_opening.json. The model is read as it runs (with its jaw calibration, if
its config has one). `--calibrate` measures the uncalibrated G on a finer grid and derives
`ModelConfig.jaw_calibration`: for each commanded opening d (relative to the source's jaw), the d' at
which G's frames read as open as the renderer's frames at d (inverse interpolation of the mean curves,
made monotone and never below d); `--install` writes it into the checkpoint's config.json (identities from seeds 100+,
held out from training's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir, load_checkpoint  # noqa: E402
from trainer import oracle as O  # noqa: E402
from trainer.corpus.face import FaceRenderer, sample_identity  # noqa: E402

JAWS = (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
FINE = tuple(round(0.05 * i, 2) for i in range(19))  # 0 .. 0.9


def curves(model, orc, renderer, jaws, identities: int, seed: int):
    """Mean oracle jaw reading of G's frames and of the renderer's frames at each commanded jaw, and the
    mean source jaw (E_mot's reading of the neutral portraits)."""
    jaw_col = O.group_slices()["mouth"].start
    k = model.generator.app_dim + model.cfg.latents.total
    rows_m, rows_r, src = [], [], []
    with torch.no_grad():
        for i in range(identities):
            ident = np.asarray(sample_identity(np.random.default_rng(seed + i)), np.float32)[None]
            img = renderer.render(ident)[0:1]  # (1,3,S,S) in [0,1], neutral
            hi, lo, app = model.encode_avatar(img * 2 - 1)
            z_src = app[:, model.generator.app_dim:k]
            src.append(float(z_src[0, 0]))
            outs, gts = [], []
            for v in jaws:
                z = z_src.clone()
                z[:, 0] = v  # lip = [jaw_open, width, rounding]
                outs.append((model.generator(z, img * 2 - 1, hi, lo, app)[0] * 0.5 + 0.5).clamp(0, 1))
                gts.append(renderer.render(ident, mouth=np.array([[v, 0.0, 0.0]], np.float32))[0])
            rows_m.append(np.asarray(O.read_factors(orc, torch.stack(outs)))[:, jaw_col])
            rows_r.append(np.asarray(O.read_factors(orc, torch.stack(gts)))[:, jaw_col])
    return np.mean(rows_m, 0), np.mean(rows_r, 0), float(np.mean(src))


def derive_calibration(jaws, model_curve, renderer_curve, source_jaw: float) -> list[list[float]]:
    """Knots (d, d') with d = jaw - source jaw: G at source + d' reads like the renderer at source + d."""
    j = np.asarray(jaws, np.float64)
    m = np.maximum.accumulate(np.asarray(model_curve, np.float64))  # monotone for the inverse
    r = np.asarray(renderer_curve, np.float64)
    knots = [(0.0, 0.0)]
    for v, target in zip(j, r):
        d = v - source_jaw
        if d <= 0.02:
            continue
        if target <= m[0]:
            v2 = j[0]
        elif target >= m[-1]:
            v2 = j[-1]
        else:
            i = int(np.searchsorted(m, target))
            lo, hi = m[i - 1], m[i]
            v2 = j[i - 1] + (j[i] - j[i - 1]) * ((target - lo) / (hi - lo) if hi > lo else 0.0)
        # never falling, and never less open than commanded: where G opens too far for some faces and not far
        # enough for others (large openings), the commanded value stands
        d2 = max(v2 - source_jaw, d, knots[-1][1])
        if d2 > knots[-1][1] or not len(knots) > 1:
            knots.append((round(float(d), 4), round(float(d2), 4)))
    return [list(k) for k in knots]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    ap.add_argument("--oracle", type=Path, help="default: <checkpoint>/oracle")
    ap.add_argument("--identities", type=int, default=5)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--calibrate", action="store_true", help="derive ModelConfig.jaw_calibration (see above)")
    ap.add_argument("--install", action="store_true", help="with --calibrate: write it into the checkpoint")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mouth_opening.json")
    a = ap.parse_args(argv)
    ck = a.checkpoint or builtin_checkpoint_dir()
    if ck is None:
        ap.error("no --checkpoint and no built-in checkpoint installed")
    model, _ = load_checkpoint(ck)
    model.eval()
    orc, _ = O.load_oracle(a.oracle or Path(ck) / "oracle")
    renderer = FaceRenderer(model.cfg.image_size)
    res = {"checkpoint": str(ck), "identities": a.identities,
           "jaw_calibration": [list(k) for k in model.cfg.jaw_calibration]}
    if a.calibrate:
        import dataclasses

        from engine.model import Marionette

        raw = Marionette(dataclasses.replace(model.cfg, jaw_calibration=()))
        raw.load_state_dict(model.state_dict())
        raw.eval()
        cm, cr, src = curves(raw, orc, renderer, FINE, a.identities, a.seed)
        knots = derive_calibration(FINE, cm, cr, src)
        res["calibration"] = {"jaw_grid": list(FINE), "uncalibrated_model": cm.round(3).tolist(),
                              "renderer": cr.round(3).tolist(), "source_jaw": round(src, 4), "knots": knots}
        print("uncalibrated model", cm.round(3).tolist())
        print("renderer          ", cr.round(3).tolist())
        print("knots (d, d')     ", knots)
        if a.install:
            cfg_path = Path(ck) / "config.json"
            doc = json.loads(cfg_path.read_text())
            doc["model"]["jaw_calibration"] = knots
            tmp = cfg_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            tmp.replace(cfg_path)
            print(f"installed into {cfg_path}")
            model, _ = load_checkpoint(ck)
            model.eval()
            res["jaw_calibration"] = knots
    m, r, _ = curves(model, orc, renderer, JAWS, a.identities, a.seed)
    res.update({"jaw_commanded": list(JAWS), "oracle_on_model": m.round(3).tolist(),
                "oracle_on_renderer": r.round(3).tolist(),
                "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("jaw commanded     ", list(JAWS))
    print("oracle, model     ", res["oracle_on_model"])
    print("oracle, renderer  ", res["oracle_on_renderer"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
