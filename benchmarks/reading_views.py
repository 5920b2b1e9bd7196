"""How the views a driving frame is read at move G's reconstruction: self-driving PSNR over copy-source (what
`marionette evaluate` measures: the clip's first frame is the portrait) with every driving frame read by E_mot
(with its mirror image) at the views `engine.model.reading_views(d, zoom)` gives, each view's reading mapped back
and the views averaged (`engine.runtimes.backend.read_driving`: what `render --pose-from` and `evaluate` use,
`ModelConfig.driving_jitter_px` / `driving_zoom`), for several (d, zoom); the portrait is read as the checkpoint
says (`portrait_jitter_px`, `portrait_zoom`), or at `--portrait-zoom` values too.

    python benchmarks/reading_views.py --data runs/s21/eval_s31 runs/s21/eval_s53 \
        --views 0:0 3:0 0:0.04 3:0.04 --portrait-zoom 0 0.04

Writes benchmarks/results/reading_views.json (per corpus and clip: mean PSNR in dB), with the machine's load.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir, load_model  # noqa: E402
from portrait_jitter import summarise  # noqa: E402  (benchmarks/, this script's directory)
from trainer import evaluate as ev  # noqa: E402


def _spec(s: str) -> tuple[int, float]:
    d, z = s.split(":")
    return int(d), float(z)


def corpus_psnr(m: "ev._Model", data: Path, views: list[tuple[int, float]], portrait_zooms: list[float],
                clips: int, frames: int) -> dict:
    cfg0 = m.rt.model.cfg
    S = cfg0.image_size
    rows = []
    for clip in ev.select_clips(data, "all", clips):
        cd = ev._load_clip(clip, frames)
        src, real = ev._resize(cd.source, S), ev._resize(cd.frames, S)
        row = {"clip": f"{clip.split}/{clip.identity}/{clip.name}",
               "copy_source": ev.psnr(src.expand(len(real), -1, -1, -1), real).mean().item()}
        avatars = {}
        for pz in portrait_zooms:
            m.rt.model.cfg = dataclasses.replace(cfg0, portrait_zoom=pz)
            avatars[pz] = m.rt.prepare_avatar(src)
        for d, zoom in views:
            m.rt.model.cfg = dataclasses.replace(cfg0, driving_jitter_px=d, driving_zoom=zoom)
            z = ev._compose(cfg0, ev._batched_motion(m.rt, real, 16), len(real))
            for pz, av in avatars.items():
                key = f"driving_{d}px_zoom{zoom:g}" + (f"_portrait_zoom{pz:g}" if len(portrait_zooms) > 1 else "")
                row[key] = ev.psnr(ev._generate(m.rt, av, z, 16), real).mean().item()
        m.rt.model.cfg = cfg0
        rows.append(row)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return summarise(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", type=Path, required=True, help="corpus directories (marionette corpus)")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the built-in")
    p.add_argument("--views", nargs="+", type=_spec, default=[(0, 0.0), (3, 0.0), (0, 0.04), (3, 0.04)],
                   help="driving views as SHIFT_PX:ZOOM (0:0 = one reading)")
    p.add_argument("--portrait-zoom", nargs="+", type=float, default=None,
                   help="portrait zooms to compare (default: the checkpoint's portrait_zoom only)")
    p.add_argument("--max-clips", type=int, default=6)
    p.add_argument("--max-frames", type=int, default=75)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reading_views.json")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    ck = a.checkpoint or builtin_checkpoint_dir()
    model, meta = load_model(ck)
    m = ev._Model("model", model, meta["expression_presets"], "cpu")
    pz = a.portrait_zoom if a.portrait_zoom is not None else [model.cfg.portrait_zoom]
    load0 = os.getloadavg()
    t0 = time.time()
    out = {"benchmark": "reading_views", "checkpoint": str(ck),
           "shipped": {k: getattr(model.cfg, k) for k in ("portrait_jitter_px", "portrait_zoom", "driving_jitter_px",
                                                         "driving_zoom", "motion_mirror")},
           "views": [f"{d}:{z:g}" for d, z in a.views], "portrait_zooms": pz,
           "e_mot_passes_per_driving_frame": {f"{d}:{z:g}": (9 if d else 1) * (3 if z else 1)
                                              * (2 if model.cfg.motion_mirror else 1) for d, z in a.views},
           "max_clips": a.max_clips, "max_frames": a.max_frames, "corpora": {}}
    for data in a.data:
        out["corpora"][str(data)] = corpus_psnr(m, data, a.views, pz, a.max_clips, a.max_frames)
        print(str(data), json.dumps(out["corpora"][str(data)]["gain_over_copy_source"]), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    out["load"] = {"before": [round(x, 2) for x in load0], "after": [round(x, 2) for x in os.getloadavg()]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
