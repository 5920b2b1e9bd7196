"""Held-out quality against CPU-minutes of training, for the built-in design and for the alternatives, in one run.

    python benchmarks/quality_vs_compute.py --minutes 1 2 4 --oracle runs/builtin/oracle \
        --corpus runs/builtin/eval256        # corpus only for the `progressive` design (fixed mp4 clips)

Designs (each trained from scratch in this process, one after the other, with the same held-out set):
  talk          the built-in design: pairs rendered on the fly (a new identity per sample), ground-truth
                latents, the source's state given to G (relative), head pose as an explicit 3D warp
  no-warp       talk without the explicit pose warp (G learns all of the flow)
  absolute      talk without the source's state and without the warp (G told the target's state only)
  fixed-ids     talk, but the identities come from a fixed set of 32 (as a corpus of mp4s would give)
  progressive   today's recipe before this change: PD-FGC's stage 1 (lite, self-reconstruction through
                E_mot + heads, L1 + MS-SSIM + motion term) on the corpus' clips. Its GAN term is left out
                (its discriminator step costs time too, so this favours it per CPU-minute).

CPU-minutes are this process's CPU time (user + system, all threads; rendering included; the evaluations
not counted). At each budget in --minutes the model is evaluated on held-out pairs rendered for unseen
identities (seeded): PSNR of the generated target minus copy-source (the source unchanged), in the
self-driving setting (E_mot on the target drives G, as `marionette evaluate`), and, for designs with
ground-truth latents, with the ground-truth state commanded; the factor oracle reads pose (degrees), gaze,
lids and mouth (% of range) back from the frames. Results: benchmarks/results/quality_vs_compute.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("quality_vs_compute")
DESIGNS = ("talk", "no-warp", "absolute", "fixed-ids", "progressive")


def model_config(design: str):
    from engine.config import ModelConfig

    if design == "progressive":
        return ModelConfig.preset("lite")
    cfg = ModelConfig.preset("talk")
    if design == "no-warp":
        return dataclasses.replace(cfg, pose_warp=False)
    if design == "absolute":
        return dataclasses.replace(cfg, pose_warp=False, relative=False)
    return cfg


def heldout(cfg, n: int, seed: int) -> dict[str, torch.Tensor]:
    from trainer.synthetic import PairRenderer

    return PairRenderer(cfg, n_ids=n, per_id=1, seed=seed)(0)


@torch.no_grad()
def evaluate(model, data: dict, oracle, gt: bool) -> dict:
    from trainer import oracle as O
    from trainer.evaluate import psnr

    model.eval()
    src, tgt = data["source"], data["target"]
    out: dict = {}
    feat_hi, feat_lo, app = model.encode_avatar(src)
    z_self = model.compose(model.encode_motion(tgt))
    runs = {"self": model(z_self, src, feat_hi, feat_lo, app)}
    if gt:
        runs["commanded"] = model(data["z_target"], src, feat_hi, feat_lo, app)
    t01 = (tgt + 1) / 2
    copy = float(psnr((src + 1) / 2, t01).mean())
    truth = None
    for name, frames in runs.items():
        f01 = ((frames + 1) / 2).clamp(0, 1)
        rec = {"psnr": float(psnr(f01, t01).mean()), "psnr_copy": copy}
        rec["psnr_gain"] = rec["psnr"] - copy
        if oracle is not None:
            read = O.read_factors(oracle, f01)
            if truth is None:
                truth = O.read_factors(oracle, t01)  # the oracle's reading of the real target
            sl = O.group_slices()
            err = np.abs(read - truth)
            rec["pose_deg"] = float(err[:, sl["pose"]][:, :3].mean())
            pct = err / O.RANGE[None] * 100
            rec["gaze_pct"] = float(pct[:, sl["eyes"]][:, :2].mean())
            rec["lids_pct"] = float(pct[:, sl["eyes"]][:, 2:4].mean())
            rec["mouth_pct"] = float(pct[:, sl["mouth"]].mean())
            rec["expression_pct"] = float(pct[:, sl["expression"]].mean())
        out[name] = rec
    model.train()
    return out


def train_design(design: str, budgets: list[float], data: dict, oracle, corpus: Path | None, seed: int) -> dict:
    from engine.model import Marionette
    from trainer import config as C
    from trainer.nets import init_weights

    cfg = model_config(design)
    torch.manual_seed(seed)
    model = init_weights(Marionette(cfg))
    if design == "progressive":
        from trainer.data import ClipStore, StageDataset, list_clips, make_loader
        from trainer.stages import MotionStage, TRAINS

        if corpus is None:
            raise SystemExit("the progressive design trains on corpus clips: pass --corpus DIR (256 px)")
        preset = C.preset("lite")
        scfg = preset.stage("motion")
        stage = MotionStage(model, scfg)
        clips = list_clips(corpus, "train")
        ds = StageDataset(clips, cfg, "motion", scfg, preset.augment, seed, ClipStore(cfg, lru=64))
        it = make_loader(ds, 8, 0, 0, 1, 0)
        params = [p for n in TRAINS["motion"] for p in getattr(model, n).parameters()]
        lr = scfg.lr
        batches = lambda step: next(it)  # noqa: E731
    else:
        from trainer.synthetic import PairRenderer, RenderStage
        from trainer.stages import TRAINS

        preset = C.preset("talk")
        scfg = preset.stage("render")
        stage = RenderStage(model, scfg)
        make = PairRenderer(cfg, n_ids=2, per_id=4, seed=seed, identity_pool=32 if design == "fixed-ids" else 0)
        params = [p for n in TRAINS["render"] for p in getattr(model, n).parameters()]
        lr = scfg.lr
        batches = make
    opt = torch.optim.AdamW(params, lr=lr, betas=scfg.betas, weight_decay=scfg.weight_decay)
    curve = []
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    step = 0
    for budget in sorted(budgets):
        while (time.process_time() - cpu0) / 60 < budget:
            batch = batches(step)
            stage.rng.manual_seed(seed * 1_000_003 + step)
            warm = min(1.0, (step + 1) / max(1, scfg.warmup))
            for g in opt.param_groups:
                g["lr"] = lr * warm
            out = stage(batch)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, scfg.grad_clip)
            opt.step()
            step += 1
        e0 = time.process_time()
        ev = evaluate(model, data, oracle, gt=cfg.gt_latents)
        cpu0 += time.process_time() - e0  # the evaluation is not training: its CPU time is not counted
        rec = {"cpu_minutes": budget, "steps": step, "wall_s": round(time.perf_counter() - wall0, 1),
               "load": round(os.getloadavg()[0], 2), **ev}
        log.info("%s @ %.1f CPU-min (%d steps): %s", design, budget, step,
                 {k: round(v["psnr_gain"], 2) for k, v in ev.items()})
        curve.append(rec)
    return {"design": design, "model_config": cfg.name, "pose_warp": cfg.pose_warp, "relative": cfg.relative,
            "gt_latents": cfg.gt_latents, "curve": curve}


def markdown(res: dict) -> str:
    lines = ["# Quality vs compute", "",
             f"Held-out: {res['heldout_pairs']} rendered pairs of unseen identities (seed {res['heldout_seed']}), "
             f"256 px. CPU-minutes = process CPU time (all threads, rendering included) on {res['cores']} cores. "
             "PSNR gain = generated minus copy-source (dB). Pose error in degrees (mean |yaw, pitch, roll|), "
             "gaze / lids / mouth as % of range, all read by the factor oracle from the frames against its "
             "reading of the real target. 'self': E_mot of the target drives G; 'commanded': the ground-truth "
             "state is commanded (ground-truth-latent designs only).", "",
             "| design | CPU-min | steps | path | PSNR | gain | pose ° | gaze % | lids % | mouth % | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in res["designs"]:
        for r in d["curve"]:
            for path in ("self", "commanded"):
                if path not in r:
                    continue
                e = r[path]
                lines.append(f"| {d['design']} | {r['cpu_minutes']:g} | {r['steps']} | {path} | {e['psnr']:.2f} | "
                             f"{e['psnr_gain']:+.2f} | {e.get('pose_deg', float('nan')):.2f} | "
                             f"{e.get('gaze_pct', float('nan')):.1f} | {e.get('lids_pct', float('nan')):.1f} | "
                             f"{e.get('mouth_pct', float('nan')):.1f} | {r['load']} |")
    lines += ["", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="CPU-minute budgets")
    p.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    p.add_argument("--oracle", type=Path, help="factor oracle directory (default: the built-in's)")
    p.add_argument("--corpus", type=Path, help="256 px corpus (train split) for the progressive design")
    p.add_argument("--pairs", type=int, default=48, help="held-out pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality_vs_compute.json"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    from engine.checkpoint import builtin_checkpoint_dir
    from engine.config import ModelConfig
    from trainer.oracle import default_oracle_dir, load_oracle

    opath = a.oracle or default_oracle_dir(builtin_checkpoint_dir())
    oracle = load_oracle(opath)[0] if opath is not None and Path(opath).is_dir() else None
    heldout_seed = 987_654 + a.seed
    data = heldout(ModelConfig.preset("talk"), a.pairs, heldout_seed)
    res = {"command": "python benchmarks/quality_vs_compute.py " + " ".join(os.sys.argv[1:]),
           "cores": os.cpu_count(), "threads": a.threads, "heldout_pairs": a.pairs, "heldout_seed": heldout_seed,
           "oracle": None if oracle is None else str(opath), "designs": []}
    for d in a.designs:
        res["designs"].append(train_design(d, a.minutes, data, oracle, a.corpus, a.seed))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")  # after every design: a partial run keeps its results
        a.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
