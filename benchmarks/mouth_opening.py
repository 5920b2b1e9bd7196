"""How far the mouth opens for a commanded jaw: the factor oracle's reading of the model's frames vs of the
renderer's own frames, on fresh identities (the built-in model's small-openings check; README "The model").

    .venv/bin/python benchmarks/mouth_opening.py [--checkpoint DIR] [--oracle DIR] [--identities 5]

Writes benchmarks/results/mouth_opening.json.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    ap.add_argument("--oracle", type=Path, help="default: <checkpoint>/oracle")
    ap.add_argument("--identities", type=int, default=5)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mouth_opening.json")
    a = ap.parse_args(argv)
    ck = a.checkpoint or builtin_checkpoint_dir()
    if ck is None:
        ap.error("no --checkpoint and no built-in checkpoint installed")
    model, _ = load_checkpoint(ck)
    model.eval()
    orc, _ = O.load_oracle(a.oracle or Path(ck) / "oracle")
    jaw_col = O.group_slices()["mouth"].start
    renderer = FaceRenderer(model.cfg.image_size)
    k = model.generator.app_dim + model.cfg.latents.total
    rows_m, rows_r = [], []
    with torch.no_grad():
        for i in range(a.identities):
            ident = np.asarray(sample_identity(np.random.default_rng(a.seed + i)), np.float32)[None]
            img = renderer.render(ident)[0:1]  # (1,3,S,S) in [0,1], neutral
            hi, lo, app = model.encode_avatar(img * 2 - 1)
            z_src = app[:, model.generator.app_dim:k]
            outs, gts = [], []
            for v in JAWS:
                z = z_src.clone()
                z[:, 0] = v  # lip = [jaw_open, width, rounding]
                outs.append((model.generator(z, img * 2 - 1, hi, lo, app)[0] * 0.5 + 0.5).clamp(0, 1))
                gts.append(renderer.render(ident, mouth=np.array([[v, 0.0, 0.0]], np.float32))[0])
            rows_m.append(np.asarray(O.read_factors(orc, torch.stack(outs)))[:, jaw_col])
            rows_r.append(np.asarray(O.read_factors(orc, torch.stack(gts)))[:, jaw_col])
    res = {"checkpoint": str(ck), "identities": a.identities, "jaw_commanded": list(JAWS),
           "oracle_on_model": np.mean(rows_m, 0).round(3).tolist(),
           "oracle_on_renderer": np.mean(rows_r, 0).round(3).tolist(),
           "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print("jaw commanded     ", list(JAWS))
    print("oracle, model     ", res["oracle_on_model"])
    print("oracle, renderer  ", res["oracle_on_renderer"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
