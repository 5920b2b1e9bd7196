"""Where the local generators' three anchors (both eyes, the mouth) land in a portrait, three ways, on fresh
rendered identities whose true anchors the renderer knows: G.patch's anchor head on E_app's features, E_mot's
keypoints, and E_mot's keypoints read with the mirror image too (`ModelConfig.anchors_from_keypoints`, what the
built-in uses). Error in px at the model's size: median / p90 / p99 / max per anchor.

    python benchmarks/anchor_error.py                                  # the built-in checkpoint
    python benchmarks/anchor_error.py --checkpoints shipped=engine/assets/builtin run=runs/x/talk/checkpoint

Writes benchmarks/results/anchor_error.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import builtin_checkpoint_dir, load_checkpoint  # noqa: E402
from engine.config import LANDMARK_ANCHORS  # noqa: E402
from engine.model import mirror_keypoints  # noqa: E402
from engine.networks import MotionEncoder  # noqa: E402
from trainer.synthetic import PATCH_ONE_FACTOR, PATCH_SMALL_JAW, PairRenderer  # noqa: E402

ANCHORS = ("eye_right", "eye_left", "mouth")


def measure(path: Path, batches: int, seed: int) -> dict:
    m, _ = load_checkpoint(path)
    m = m.float().eval()
    k = m.cfg.net.motion_keypoints
    if not (m.cfg.patches and k):
        raise SystemExit(f"{path}: needs local generators and E_mot's keypoint branch")
    make = PairRenderer(m.cfg, 2, 1, seed=seed, one_factor=PATCH_ONE_FACTOR, small_jaw=PATCH_SMALL_JAW, region=False)
    idx, px = list(LANDMARK_ANCHORS), 0.5 * m.cfg.image_size
    errs: dict[str, list] = {"anchor_head": [], "keypoints": [], "keypoints_mirror": []}
    with torch.no_grad():
        for b in range(batches):
            batch = make(b)
            src, truth = batch["source"], batch["anchor_source"]  # (n,3,S,S), (n,3,2)
            _, feat_lo, _ = m.e_app(src)
            kp = MotionEncoder.keypoints(m.e_mot(src), k)
            kpf = mirror_keypoints(MotionEncoder.keypoints(m.e_mot(torch.flip(src, dims=[3])), k))
            for name, a in (("anchor_head", m.generator.patch.source_anchors(feat_lo)), ("keypoints", kp[:, idx]),
                            ("keypoints_mirror", 0.5 * (kp + kpf)[:, idx])):
                errs[name].append((a - truth).norm(dim=-1) * px)  # (n,3)
    out = {}
    for name, v in errs.items():
        e = torch.cat(v)
        q = torch.quantile(e, torch.tensor([0.5, 0.9, 0.99]), dim=0)
        out[name] = {a: {"median": round(float(q[0, i]), 2), "p90": round(float(q[1, i]), 2),
                         "p99": round(float(q[2, i]), 2), "max": round(float(e[:, i].max()), 2)}
                     for i, a in enumerate(ANCHORS)}
    out["identities"] = int(sum(len(v) for v in errs["keypoints"]))
    out["uses"] = "keypoints_mirror" if m.cfg.anchors_from_keypoints else "anchor_head"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", nargs="+", default=None, metavar="NAME=DIR")
    p.add_argument("--batches", type=int, default=30, help="2 fresh identities each")
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anchor_error.json")
    a = p.parse_args(argv)
    pairs = a.checkpoints or [f"builtin={builtin_checkpoint_dir()}"]
    load0 = os.getloadavg()
    res = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not path:
            p.error(f"--checkpoints takes NAME=DIR, got {pair!r}")
        res[name] = measure(Path(path), a.batches, a.seed)
        for way in ("anchor_head", "keypoints", "keypoints_mirror"):
            print(f"{name} {way}: " + "  ".join(f"{k} {v['median']}/{v['p90']}/{v['p99']} (max {v['max']})"
                                               for k, v in res[name][way].items()))
    doc = {"benchmark": "anchor_error", "what": "anchor error in px, median/p90/p99/max, fresh rendered identities",
           "seed": a.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg_start": load0,
           "checkpoints": dict(x.partition("=")[::2] for x in pairs), "results": res}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
