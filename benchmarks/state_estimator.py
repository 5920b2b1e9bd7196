"""What the state estimator's head pose costs G: PSNR over copy-source with the true and the estimated states.

Fresh rendered identities; per pair a portrait-like source (`trainer.synthetic._portrait_states`) and a target a
few degrees away (the pair sampler's near-pose spread) with every other factor redrawn, as a talking clip moves.
G (with its local generators) is told, per row: the true source and target states; the true states with the
head pose estimated by E_mot + heads (single reading, and the mirror reading of `ModelConfig.motion_mirror`);
the estimated states throughout. Also the estimator's relative pose error (target minus source, the quantity
relative motion uses) and, with E_mot's keypoint branch, its landmark error in pixels.

    .venv/bin/python benchmarks/state_estimator.py --checkpoint engine/assets/builtin --pairs 48 --seed 777 \
        --out benchmarks/results/state_estimator.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POSE_UNITS = np.array([30.0, 20.0, 15.0, 0.08, 0.08, 0.1], np.float32)  # latent -> deg, deg, deg, frac, frac, ratio


def _psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1.0 / ((a - b) ** 2).flatten(1).mean(1))


def measure(checkpoint: Path, pairs: int, seed: int) -> dict:
    from engine.checkpoint import load_checkpoint
    from engine.model import mirror_mean
    from engine.networks import MotionEncoder
    from trainer.corpus import factors as _factors
    from trainer.corpus.face import FaceRenderer, landmark_points, sample_identity
    from trainer.oracle import sample_factors
    from trainer.synthetic import NEAR_POSE_SD, _portrait_states, latents_from_factors

    m, _ = load_checkpoint(checkpoint)
    m = m.float().eval()
    S = m.cfg.image_size
    rng = np.random.default_rng(seed)
    ident = np.stack([sample_identity(rng) for _ in range(pairs)]).astype(np.float32)
    src = _portrait_states(rng, pairs)
    tgt = sample_factors(rng, pairs)
    lo, hi = _factors.ranges("pose")
    tgt["pose"] = np.clip(src["pose"] + rng.normal(0, 1, (pairs, 6)) * np.asarray(NEAR_POSE_SD, np.float32),
                          lo, hi).astype(np.float32)
    r = FaceRenderer(S)
    sl = m.cfg.latents.slices()["pose"]
    out: dict = {"checkpoint": str(checkpoint), "pairs": pairs, "seed": seed}
    with torch.no_grad():
        s_img = r.render(ident, src["pose"], src["eyes"], src["mouth"], src["expression"])
        t_img = r.render(ident, tgt["pose"], tgt["eyes"], tgt["mouth"], tgt["expression"])
        zs = torch.from_numpy(latents_from_factors(src, m.cfg))
        zt = torch.from_numpy(latents_from_factors(tgt, m.cfg))
        s2, t2 = s_img * 2 - 1, t_img * 2 - 1
        fh, fl, app = m.e_app(s2)
        anchors = m.encode_avatar(s2)[2][:, -6:] if m.cfg.patches else app[:, :0]  # the model's own (head or E_mot)
        copy = _psnr(s_img, t_img)

        def gain(z_t: torch.Tensor, z_s: torch.Tensor) -> float:
            frame = m.generator(z_t, s2, fh, fl, torch.cat([app, z_s, anchors], 1))
            return float((_psnr((frame + 1) / 2, t_img) - copy).mean())

        def read(x: torch.Tensor, mirror: bool) -> torch.Tensor:
            return m.compose(m.encode_motion(x, mirror=mirror))

        out["copy_source_psnr"] = float(copy.mean())
        out["gain_true_states"] = gain(zt, zs)
        for name, mirror in (("single", False), ("mirror", True)):
            es, et = read(s2, mirror), read(t2, mirror)
            rel = (((et - es) - (zt - zs))[:, sl].abs().mean(0).numpy() * POSE_UNITS)
            zt_p, zs_p = zt.clone(), zs.clone()
            zt_p[:, sl], zs_p[:, sl] = et[:, sl], es[:, sl]
            out[name] = {"relative_pose_error": {"yaw_deg": float(rel[0]), "pitch_deg": float(rel[1]),
                                                 "roll_deg": float(rel[2]), "tx_px": float(rel[3] * S),
                                                 "ty_px": float(rel[4] * S), "scale_pct": float(rel[5] * 100)},
                         "gain_estimated_pose": gain(zt_p, zs_p), "gain_estimated_states": gain(et, es)}
        k = m.cfg.net.motion_keypoints
        if k:
            kp = MotionEncoder.keypoints(m.motion_feature(torch.cat([s2, t2])), k)
            gt = torch.cat([landmark_points(ident, src["pose"]), landmark_points(ident, tgt["pose"])])
            from trainer.corpus.face import LANDMARKS

            err = ((kp - gt).abs().mean((0, 2)) * S / 2).numpy()
            out["keypoint_error_px"] = {n: float(e) for n, e in zip(LANDMARKS, err)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("engine/assets/builtin"))
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    res = measure(a.checkpoint, a.pairs, a.seed)
    res["seconds"] = round(time.time() - t0, 1)
    res["loadavg"] = list(os.getloadavg())
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
