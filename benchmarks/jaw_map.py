"""How far each avatar's mouth opens for a commanded jaw, with its per-avatar jaw map and without
(engine.jaw_map; README "The mouth per avatar").

    .venv/bin/python benchmarks/jaw_map.py [--checkpoint DIR] [--identities 20] [--seed 900] [--backend torch]

For the built-in avatar and `--identities` fresh renderer identities (seeds [seed, i], neutral portraits), the
factor oracle reads G's frames at openings of 0.1 / 0.15 / 0.2 / 0.3 over each portrait's own jaw, relative to its
reading at the portrait's own jaw, and the renderer's own frames of the same identity at the same openings. Reports
per identity and the median / 10th / 90th percentile of the error against the renderer's frames, with and without
the map, and the time `prepare_avatar` takes with it. Writes benchmarks/results/jaw_map.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPENINGS = (0.1, 0.15, 0.2, 0.3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    ap.add_argument("--identities", type=int, default=20)
    ap.add_argument("--seed", type=int, default=900)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "jaw_map.json")
    a = ap.parse_args(argv)
    from engine.checkpoint import builtin_checkpoint_dir
    from engine.image import BUILTIN_AVATAR
    from engine.jaw_map import JawCalibrated
    from engine.oracle import load_oracle, read_factors
    from engine.runtimes.backend import open_backend
    from trainer.corpus.face import FaceRenderer, sample_identity

    ck = a.checkpoint or builtin_checkpoint_dir()
    rt = open_backend(a.backend, checkpoint=ck)
    if not isinstance(rt, JawCalibrated):
        raise SystemExit("this model has no per-avatar jaw map (ModelConfig.avatar_jaw_map) or no oracle")
    orc = load_oracle(Path(ck) / "oracle")[0] if (Path(ck) / "oracle").is_dir() else rt.oracle
    jc = orc.column("mouth.jaw_open")
    ren = FaceRenderer(rt.cfg.image_size)
    d = np.asarray((0.0, *OPENINGS), np.float32)
    rows = []
    for i in range(-1, a.identities):
        if i < 0:
            name, ident, portrait = "built-in avatar", None, BUILTIN_AVATAR
        else:
            name = f"[{a.seed}, {i}]"
            ident = np.asarray(sample_identity(np.random.default_rng([a.seed, i])), np.float32)[None]
            portrait = ren.render(ident)[0:1]
        t0 = time.perf_counter()
        mapped = rt.prepare_avatar(portrait)
        prep_s = time.perf_counter() - t0
        plain = rt.backend.prepare_avatar(portrait)
        zs = rt.source_state(mapped)
        src = float(zs[0, rt.jaw_index])
        z = torch.from_numpy(np.repeat(zs, len(d), 0))
        z[:, rt.jaw_index] = torch.from_numpy(src + d)
        row = {"portrait": name, "source_jaw": src, "prepare_s": prep_s,
               "jaw_map": None if mapped.jaw_map is None else mapped.jaw_map.to_dict()}
        for key, av in (("with_map", mapped), ("without_map", plain)):
            x = read_factors(orc, rt.generate(av, z))[:, jc]
            row[key] = (x[1:] - x[0]).round(4).tolist()
        if ident is not None:  # the renderer's own frames of this identity, opened by the same amounts from shut
            f = torch.stack([ren.render(ident, mouth=np.array([[v, 0.0, 0.0]], np.float32))[0] for v in d])
            x = read_factors(orc, f)[:, jc]
            row["renderer"] = (x[1:] - x[0]).round(4).tolist()
        rows.append(row)
        print(f"{name:16s} with {row['with_map']}  without {row['without_map']}  renderer {row.get('renderer')}")
    ref = [r for r in rows if "renderer" in r]
    summary = {}
    for key in ("with_map", "without_map"):
        err = np.abs(np.asarray([r[key] for r in ref]) - np.asarray([r["renderer"] for r in ref]))
        summary[key] = {"median_abs_error": float(np.median(err)), "p90_abs_error": float(np.percentile(err, 90)),
                        "per_opening_median": np.median(err, 0).round(4).tolist()}
        at15 = np.asarray([r[key][1] for r in ref])
        summary[key]["reading_at_0.15"] = {"median": float(np.median(at15)), "p10": float(np.percentile(at15, 10)),
                                           "p90": float(np.percentile(at15, 90))}
    at15 = np.asarray([r["renderer"][1] for r in ref])
    summary["renderer_reading_at_0.15"] = {"median": float(np.median(at15)), "p10": float(np.percentile(at15, 10)),
                                           "p90": float(np.percentile(at15, 90))}
    summary["prepare_s_median"] = float(np.median([r["prepare_s"] for r in rows]))
    res = {"command": "python benchmarks/jaw_map.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "load": os.getloadavg(), "checkpoint": str(ck), "backend": a.backend, "openings": list(OPENINGS),
           "summary": summary, "rows": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    for key in ("with_map", "without_map"):
        s = summary[key]
        print(f"{key:12s}: |reading - renderer| median {s['median_abs_error']:.3f}, p90 {s['p90_abs_error']:.3f}; "
              f"at 0.15 reads {s['reading_at_0.15']['median']:.3f} ({s['reading_at_0.15']['p10']:.3f}-"
              f"{s['reading_at_0.15']['p90']:.3f})")
    r = summary["renderer_reading_at_0.15"]
    print(f"renderer    : at 0.15 reads {r['median']:.3f} ({r['p10']:.3f}-{r['p90']:.3f}); prepare_avatar "
          f"{summary['prepare_s_median']:.2f} s with the map; load {res['load']} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
