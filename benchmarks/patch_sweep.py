"""The local generators alone, on the renderer's own frames: how far each checkpoint's mouth net opens a
neutral mouth for a commanded jaw (the `patch` stage's own setting: the source drawn by the renderer, the true
anchors, the ground-truth source state), read by the factor oracle and shown as a PNG strip per identity.

    .venv/bin/python benchmarks/patch_sweep.py --checkpoints shipped=engine/assets/builtin run=runs/x/checkpoint \
        [--identities 5] [--seed 100] [--out benchmarks/results/patch_sweep]

Writes OUT.json (the oracle's jaw reading per commanded jaw, per checkpoint, and the renderer's own) and OUT.png
(rows: checkpoint x the first two identities; columns: commanded jaw 0, 0.2, 0.4, 0.8, then the renderer at 0.8).
G is not involved, so a mouth that does not open here is the mouth net's, not G's or the anchors'
(`benchmarks/mouth_opening.py` measures the whole run-time path).
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

from engine.checkpoint import load_checkpoint  # noqa: E402
from trainer import oracle as O  # noqa: E402
from trainer.corpus import factors as F  # noqa: E402
from trainer.corpus.face import FaceRenderer, anchor_points, sample_identity  # noqa: E402
from trainer.synthetic import latents_from_factors  # noqa: E402

JAWS = (0.0, 0.2, 0.4, 0.8)
GROUPS = ("pose", "eyes", "mouth", "expression")


def sweep(model, orc, renderer, identities: int, seed: int, jaws=JAWS):
    """-> (mean oracle jaw of the net's frames per jaw, of the renderer's, crops (identities, jaws+1, 3, h, w))."""
    P = model.generator.patch
    jaw_col = O.group_slices()["mouth"].start
    size = model.cfg.image_size
    y0, y1, x0, x1 = int(0.5 * size), int(0.875 * size), int(0.3125 * size), int(0.6875 * size)  # the mouth
    read_m, read_r, crops = [], [], []
    with torch.no_grad():
        for i in range(identities):
            ident = np.asarray(sample_identity(np.random.default_rng(seed + i)), np.float32)[None]
            neutral = {g: np.asarray(F.neutral(g), np.float32)[None].copy() for g in GROUPS}
            src = renderer.render(ident)[0:1] * 2 - 1  # (1,3,S,S) in [-1,1]
            z_s = torch.from_numpy(latents_from_factors(neutral, model.cfg))
            a = anchor_points(ident, neutral["pose"])
            outs, gts = [], []
            for v in jaws:
                fac = {g: x.copy() for g, x in neutral.items()}
                fac["mouth"][0, 0] = v
                z_t = torch.from_numpy(latents_from_factors(fac, model.cfg))
                outs.append((P.apply(src, z_t, z_s, a)[0] * 0.5 + 0.5).clamp(0, 1))
                gts.append(renderer.render(ident, mouth=fac["mouth"])[0])
            read_m.append(np.asarray(O.read_factors(orc, torch.stack(outs)))[:, jaw_col])
            read_r.append(np.asarray(O.read_factors(orc, torch.stack(gts)))[:, jaw_col])
            crops.append(torch.stack([o[:, y0:y1, x0:x1] for o in outs + [gts[-1]]]))
    return np.mean(read_m, 0), np.mean(read_r, 0), torch.stack(crops)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoints", nargs="+", required=True, help="NAME=DIR ...")
    ap.add_argument("--oracle", type=Path, default=ROOT / "engine" / "assets" / "builtin" / "oracle")
    ap.add_argument("--identities", type=int, default=5)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "patch_sweep")
    a = ap.parse_args(argv)
    orc, _ = O.load_oracle(a.oracle)
    res = {"jaw_commanded": list(JAWS), "identities": a.identities, "seed": a.seed, "oracle": str(a.oracle),
           "checkpoints": {}}
    rows = []
    renderer = None
    for spec in a.checkpoints:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--checkpoints takes NAME=DIR, got {spec!r}")
        model, _ = load_checkpoint(Path(path))
        model.eval()
        if not model.cfg.patches:
            ap.error(f"{path}: the model has no local generators")
        renderer = renderer or FaceRenderer(model.cfg.image_size)
        m, r, crops = sweep(model, orc, renderer, a.identities, a.seed)
        res["checkpoints"][name] = {"path": path, "oracle_jaw": [round(float(x), 3) for x in m]}
        res["renderer_oracle_jaw"] = [round(float(x), 3) for x in r]
        print(f"{name:>12}: oracle jaw {res['checkpoints'][name]['oracle_jaw']} (renderer {res['renderer_oracle_jaw']})")
        for c in crops[:2]:
            rows.append(torch.cat(list(c), dim=2))  # (3,h,(jaws+1)*w)
    res["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    from PIL import Image

    im = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(im).save(a.out.with_suffix(".png"))
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
