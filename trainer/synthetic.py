"""The built-in recipe's stages: training on the renderer's ground truth, sized for 2 CPU cores.

Why (measured, see README "The model" and benchmarks/results/quality_vs_compute.md): with a fixed set of
identities the generator fits them and unseen faces stay at copy-source; with a fresh rendered identity
for every sample, and the source's state given to G as well as the target's, unseen faces improve from
the first minutes. So the renderer is in the training loop:

* ``render`` stage (`RenderStage`, data from `PairRenderer`): each step renders ``n_ids`` fresh identities,
  each once as a source and ``per_id`` times as a target (E_app runs once per source, as at run time).
  Targets are either a fully random state or the source's state with one factor group changed (what
  disentanglement needs). Every latent is the ground truth in physical units (`engine.config.GT_DIMS`):
  G is trained on z_target and z_source (the source's ground-truth state; at run time E_mot estimates it once
  per avatar, so its error is a constant bias, not noise to hedge against); head pose is the explicit
  warp of `engine.geometry` and G learns a bounded residual. E_mot and its
  heads are regressed to the ground truth on sources and targets (appearance-augmented; E_mot's keypoint branch
  to the renderer's landmarks, `trainer.corpus.face.landmark_points`), so they are the
  per-avatar state estimator, the driving-video / webcam encoder and the evaluation's self-driving path
  at once. The image loss is L1 with the mouth and the eye windows (lids, irises, brows: the renderer's
  region masks at the target pose) weighted up, and more so where the target has content that the source
  moved to the target's pose lacks (an opened mouth, shut lids, a moved iris: `PairRenderer`'s "change" mask),
  plus an image-gradient L1 for sharpness.
* ``state`` stage (`StateStage`, data from `StatePool`): E_mot + heads alone, regressed to the ground truth on
  a pool of rendered frames (cheaper per image than fresh renders), the head pose weighted up and the keypoint
  branch on the landmarks: the state estimator must be accurate, because relative motion moves the head by
  (target - estimated source), and every degree or pixel it is off costs G about 1 dB.
* ``patch`` stage (`PatchStage`): the local generators for the mouth and the eyes
  (`engine.networks.PatchRefiner`) on the frozen G's frames: squares that follow three anchors (found in the
  portrait by a small head on E_app's features, carried into the frame by G's flow) are turned into the target's
  mouth opening, lids and irises. Concentrating generation there, at about native resolution, is what made new
  content learnable in minutes (G alone barely changed the mouth in 2400 steps: README "The model").
* ``audio`` stage (`AudioStage`): E_aud regresses the ground-truth mouth [jaw, width, rounding] of each
  video frame from its mel window (corpus clips: espeak speech with phoneme-timed visemes).
* ``idle``: the idle-motion model as in the progressive recipe (`trainer.stages.IdleStage`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from engine.config import LANDMARK_ANCHORS
from engine.model import Marionette
from engine.networks import MOUTH_SIDE
from trainer import losses as L
from trainer.config import StageConfig
from trainer.corpus import factors as _factors
from trainer.stages import StageModule

log = logging.getLogger(__name__)

POSE_SCALE = np.array([30.0, 20.0, 15.0, 0.08, 0.08, 0.1], np.float32)
POSE_OFFSET = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0], np.float32)
GROUPS = ("pose", "eyes", "mouth", "expression")
# pose targets near the source: share, and the spread around the source's pose (deg, deg, deg, frac, frac, ratio).
# The corpus' clips move |yaw| 5.3, |pitch| 4.5, |roll| 2.3 deg from their first frame on average.
CHANGE_THRESHOLD = 0.03  # |target - source moved to the target's pose| above this (in [0, 1]) is new content
NEAR_POSE = 0.6
SMALL_JAW = 0.5  # speech keeps the jaw in 0.1-0.3 (corpus ground truth: mean 0.15, p90 0.37)
PATCH_ONE_FACTOR, PATCH_SMALL_JAW = 0.6, 0.5  # the patch stage's pairs: more single-factor changes, more small
# openings (with the sampler's uniform jaw the nets learned "shut below 0.45": the oracle read 0.04 at jaw 0.3)
NEAR_POSE_SD = (8.0, 6.0, 4.0, 0.015, 0.012, 0.02)


def latents_from_factors(fac: dict[str, np.ndarray], model_cfg) -> np.ndarray:
    """Corpus factor groups {pose (N,6), eyes (N,4), mouth (N,3), expression (N,6)} -> ground-truth z (N, total)
    in the layout of `engine.config.GT_DIMS` (unused dimensions zero)."""
    lat = model_cfg.latents
    n = len(fac["pose"])
    z = np.zeros((n, lat.total), np.float32)
    sl = lat.slices()
    parts = {"lip": fac["mouth"], "pose": (fac["pose"] - POSE_OFFSET) / POSE_SCALE, "eye": fac["eyes"],
             "exp": fac["expression"]}
    for k, v in parts.items():
        d = v.shape[1]
        z[:, sl[k].start:sl[k].start + d] = v
    return z


def _portrait_states(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """States a user's portrait typically shows: near-frontal, eyes open, mouth (mostly) closed, mild
    or no expression."""
    pose = np.stack([rng.uniform(-15, 15, n), rng.uniform(-10, 10, n), rng.uniform(-8, 8, n),
                     rng.uniform(-0.04, 0.04, n), rng.uniform(-0.04, 0.04, n), rng.uniform(0.95, 1.05, n)], 1)
    eyes = np.concatenate([rng.uniform(-0.3, 0.3, (n, 2)), rng.uniform(0.0, 0.15, (n, 2))], 1)
    mouth = np.stack([np.where(rng.random(n) < 0.7, 0.0, rng.uniform(0.0, 0.3, n)), rng.uniform(-0.3, 0.3, n),
                      rng.uniform(0.0, 0.3, n)], 1)
    presets = np.stack([_factors.preset_vector(p) for p in _factors.PRESET_NAMES])
    expr = presets[rng.integers(0, len(presets), n)] * rng.uniform(0.0, 0.5, (n, 1))
    expr = np.where((rng.random(n) < 0.6)[:, None], 0.0, expr)
    return {"pose": pose.astype(np.float32), "eyes": eyes.astype(np.float32), "mouth": mouth.astype(np.float32),
            "expression": expr.astype(np.float32)}


def sample_pair_states(rng: np.random.Generator, n_ids: int, per_id: int, one_factor: float = 0.35
                       ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Source states (n_ids) and target states (n_ids * per_id, grouped by source)."""
    from trainer.oracle import sample_factors

    rand = sample_factors(rng, n_ids)
    port = _portrait_states(rng, n_ids)
    use_port = rng.random(n_ids) < 0.5
    src = {g: np.where(use_port[:, None], port[g], rand[g]).astype(np.float32) for g in GROUPS}
    b = n_ids * per_id
    tgt = sample_factors(rng, b)
    rep = {g: np.repeat(src[g], per_id, axis=0) for g in GROUPS}
    # most targets move the head as a talking head does (a few degrees from the source, as the corpus' clips
    # and the idle model do); the rest anywhere in the range (commanded poses)
    near = rng.random(b) < NEAR_POSE
    lo, hi = _factors.ranges("pose")
    jitter = rep["pose"] + rng.normal(0.0, 1.0, (b, 6)) * np.asarray(NEAR_POSE_SD, np.float32)
    tgt["pose"] = np.where(near[:, None], np.clip(jitter, lo, hi), tgt["pose"]).astype(np.float32)
    one = rng.random(b) < one_factor
    which = rng.choice(len(GROUPS), size=b, p=[0.2, 0.3, 0.3, 0.2])
    for gi, g in enumerate(GROUPS):
        keep = one & (which != gi)  # one-factor targets keep every other group of their source
        tgt[g] = np.where(keep[:, None], rep[g], tgt[g]).astype(np.float32)
    return src, tgt


class PairRenderer:
    """Training batches of the `render` stage, rendered on the fly; batch `step` is a pure function of
    (seed, step), so a resumed run sees the same data.

    Returns {"source" (n_ids,3,S,S), "target" (B,3,S,S) in [-1,1], "z_source" (n_ids,total), "z_target" (B,total),
    "region" (B,1,S,S) mouth-or-eye-windows mask (the eye windows with the brows) (unless region=False),
    "change" (B,1,S,S) where the target has content the source lacks,
    "src_index" (B,), "anchor_source" (n_ids,3,2), "anchor_target" (B,3,2) (`trainer.corpus.face.anchor_points`),
    "kp_source" (n_ids,K,2), "kp_target" (B,K,2) (`trainer.corpus.face.landmark_points`),
    "step" ()}."""

    def __init__(self, model_cfg, n_ids: int, per_id: int, seed: int, device: torch.device | str = "cpu",
                 identity_pool: int = 0, one_factor: float = 0.35, small_jaw: float = 0.0, region: bool = True):
        from trainer.corpus.face import FaceRenderer, sample_identity

        self.one_factor = float(one_factor)
        self.with_region = bool(region)  # the mouth + eye-windows mask (the render stage's loss; ~13 % of the rendering)
        self.small_jaw = float(small_jaw)  # share of targets whose jaw is redrawn in [0, SMALL_JAW] (speech's range)
        self.cfg = model_cfg
        self.n_ids, self.per_id, self.seed = int(n_ids), int(per_id), int(seed)
        self.device = torch.device(device)
        self.renderer = FaceRenderer(model_cfg.image_size, device=self.device)
        # identity_pool > 0: draw identities from a fixed set of that many (the "fixed corpus" ablation)
        prng = np.random.default_rng([self.seed, 4711])
        self.pool = (np.stack([sample_identity(prng) for _ in range(identity_pool)]).astype(np.float32)
                     if identity_pool > 0 else None)

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        from trainer.corpus.face import sample_identity

        rng = np.random.default_rng([self.seed, 90210, int(step)])
        if self.pool is not None:
            ident = self.pool[rng.integers(0, len(self.pool), self.n_ids)]
        else:
            ident = np.stack([sample_identity(rng) for _ in range(self.n_ids)]).astype(np.float32)
        src, tgt = sample_pair_states(rng, self.n_ids, self.per_id, one_factor=self.one_factor)
        if self.small_jaw > 0:
            moving = np.any(tgt["mouth"] != np.repeat(src["mouth"], self.per_id, axis=0), axis=1)  # keep one-factor
            redraw = moving & (rng.random(len(tgt["mouth"])) < self.small_jaw)  # pairs' other groups as they are
            tgt["mouth"][:, 0] = np.where(redraw, rng.uniform(0.0, SMALL_JAW, len(redraw)), tgt["mouth"][:, 0])
        r = self.renderer
        s_img = r.render(ident, src["pose"], src["eyes"], src["mouth"], src["expression"])
        ident_t = np.repeat(ident, self.per_id, axis=0)
        t_img = r.render(ident_t, tgt["pose"], tgt["eyes"], tgt["mouth"], tgt["expression"])
        rep = {g: np.repeat(src[g], self.per_id, axis=0) for g in GROUPS}
        region = (r.region_mask(ident_t, tgt["pose"], "mouth") | r.region_mask(ident_t, tgt["pose"], "brows")
                  if self.with_region else None)
        # where the target has content that the source, moved to the target's pose, lacks (an opened mouth,
        # a shut lid, a moved iris, a smile): the target rendered at its own pose with the source's other
        # factors differs from it exactly there (dilated by 2 px)
        moved = r.render(ident_t, tgt["pose"], rep["eyes"], rep["mouth"], rep["expression"])
        change = ((t_img - moved).abs().amax(dim=1, keepdim=True) > CHANGE_THRESHOLD).float()
        change = F.max_pool2d(change, 5, stride=1, padding=2)
        from trainer.corpus.face import anchor_points, landmark_points

        out = {"anchor_source": anchor_points(ident, src["pose"]),
                "kp_source": landmark_points(ident, src["pose"]), "kp_target": landmark_points(ident_t, tgt["pose"]),
                "anchor_target": anchor_points(ident_t, tgt["pose"]), "moved": moved * 2 - 1,
                "source": s_img * 2 - 1, "target": t_img * 2 - 1, "change": change,
                "z_source": torch.from_numpy(latents_from_factors(src, self.cfg)),
                "z_target": torch.from_numpy(latents_from_factors(tgt, self.cfg)),
                "src_index": torch.arange(self.n_ids).repeat_interleave(self.per_id),
                "step": torch.tensor(int(step))}
        if region is not None:
            out["region"] = region.float()
        return out


class _StepDataset(torch.utils.data.Dataset):
    def __init__(self, make: PairRenderer, start: int):
        self.make, self.start = make, int(start)

    def __len__(self) -> int:
        return 2 ** 62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.make(self.start + int(i))


def render_batches(make: PairRenderer, start: int, workers: int, reuse: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """The batches of steps start, start+1, ...: rendered in `workers` background processes (CPU: rendering
    overlaps the training step), or in this process on the renderer's device (workers = 0, e.g. on CUDA).
    reuse > 1: step s trains on rendered batch s // reuse (StageConfig.reuse), so a resumed run sees the same."""
    if reuse < 1:
        raise ValueError(f"reuse must be >= 1, got {reuse}")
    if reuse == 1:
        return _rendered(make, start, workers)

    def repeat() -> Iterator[dict[str, torch.Tensor]]:
        skip = start % reuse
        for batch in _rendered(make, start // reuse, workers):
            for _ in range(reuse - skip):
                yield batch
            skip = 0
    return repeat()


def _rendered(make: PairRenderer, start: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
    if workers <= 0:
        def gen() -> Iterator[dict[str, torch.Tensor]]:
            step = start
            while True:
                yield make(step)
                step += 1
        return gen()
    from torch.utils.data import DataLoader

    dl = DataLoader(_StepDataset(make, start), batch_size=None, shuffle=False, num_workers=workers,
                    prefetch_factor=2, persistent_workers=False)
    return iter(dl)


KEYPOINT_WEIGHT = 2.0  # L1 of E_mot's keypoints (grid units: 0.01 = 1.3 px at 256^2) beside the state's smooth-L1
POSE_WEIGHT = 3.0  # the state's head pose weighs this much more than its other dimensions: relative motion moves the
# whole head by the estimate's error (1 degree or 1 px off costs G ~1 dB), a gaze or a brow only their own pixels


def state_regression(m: Marionette, frames: torch.Tensor, gt: torch.Tensor, rng: torch.Generator,
                     keypoints: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """E_mot + heads on appearance-augmented frames (B,3,S,S) in [-1,1] -> (estimated z (B,total), the smooth-L1
    to the ground truth `gt` over the dimensions with a meaning, plus, for a model with E_mot's keypoint branch,
    KEYPOINT_WEIGHT x the L1 of its keypoints to the renderer's landmarks `keypoints` (B,K,2)). `rng` is a CPU
    generator (augmented on CPU; the augmentation moves no pixel, so the landmarks stay where they are)."""
    from trainer.oracle import augment

    aug = augment((frames.detach().cpu() + 1) * 0.5, rng).to(frames.device) * 2 - 1
    feat = m.motion_feature(aug)
    est = m.compose(m.heads(feat))
    reg = F.smooth_l1_loss(est, gt, beta=0.05, reduction="none")
    w = m.latent_mask.clone()
    w[m.cfg.latents.slices()["pose"]] *= POSE_WEIGHT
    loss = (reg * w).sum(1).mean() / m.latent_mask.sum()
    k = m.cfg.net.motion_keypoints
    if k and keypoints is not None:
        from engine.networks import MotionEncoder

        loss = loss + KEYPOINT_WEIGHT * (MotionEncoder.keypoints(feat, k) - keypoints.to(feat)).abs().mean()
    return est, loss


class RenderStage(StageModule):
    """E_app + E_mot (+ heads) + G on rendered pairs with ground-truth latents (see the module docstring)."""

    name = "render"
    REGION_WEIGHT = 4.0  # extra L1 weight inside the mouth and the eye windows (where new pixels are made)
    SOURCE_NOISE = 0.0  # sd of an error added to the source's ground-truth latents (see forward: 0 is best)
    REG_WEIGHT = 1.0
    GRAD_WEIGHT = 2.0  # image-gradient L1 (sharpness)
    CHANGE_WEIGHT = 4.0  # extra L1 weight where the target has content the source lacks (PairRenderer "change")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m: Marionette = self.model
        src, tgt = batch["source"], batch["target"]
        zs, zt, idx = batch["z_source"], batch["z_target"], batch["src_index"]
        logs: dict[str, torch.Tensor] = {}
        # E_mot + heads: regress the ground truth on sources and targets (appearance-augmented)
        gt = torch.cat([zs, zt])
        kp = torch.cat([batch["kp_source"], batch["kp_target"]]) if "kp_source" in batch else None
        est, reg = state_regression(m, torch.cat([src, tgt]), gt, self.rng, kp)
        logs["reg"] = reg.detach()
        # the source state G is told: the ground truth. At run time it is E_mot's estimate, made once per avatar,
        # so its error is a constant bias (the whole head sits a pixel off), not noise G should hedge against:
        # feeding G this stage's own coarse estimate (5 degrees at step 1000), or the ground truth plus noise of
        # 0.05 (1.5 degrees, 1 px), cost 3-6 dB at once and G answered with blur (PSNR fell to copy-source).
        z_src = zs + (torch.randn(zs.shape, generator=self.rng).to(zs.device) * self.SOURCE_NOISE * m.latent_mask
                      if self.SOURCE_NOISE > 0 else 0.0)
        feat_hi, feat_lo, app = m.e_app(src)
        if m.cfg.relative:
            app = torch.cat([app, z_src], dim=1)
        out = m.generator(zt, src[idx], feat_hi[idx], feat_lo[idx], app[idx], patches=False)
        err = (out - tgt).abs()
        l1 = err.mean()
        reg_l1 = (err * batch["region"]).sum() / (batch["region"].sum() * 3).clamp(min=1.0)
        chg_l1 = (err * batch["change"]).sum() / (batch["change"].sum() * 3).clamp(min=1.0)
        # edges: L1 of the image gradients (a blurred face has L1's lowest risk where the warp is uncertain;
        # its gradients do not match the target's)
        gx = ((out[..., :, 1:] - out[..., :, :-1]) - (tgt[..., :, 1:] - tgt[..., :, :-1])).abs().mean()
        gy = ((out[..., 1:, :] - out[..., :-1, :]) - (tgt[..., 1:, :] - tgt[..., :-1, :])).abs().mean()
        grad = gx + gy
        loss_img = l1 + self.REGION_WEIGHT * reg_l1 + self.CHANGE_WEIGHT * chg_l1 + self.GRAD_WEIGHT * grad
        logs["l1"], logs["region_l1"], logs["grad_l1"] = l1.detach(), reg_l1.detach(), grad.detach()
        logs["change_l1"] = chg_l1.detach()
        with torch.no_grad():
            logs["psnr"] = L.psnr(out, tgt)
            logs["psnr_copy"] = L.psnr(src[idx], tgt)
            sl = m.cfg.latents.slices()
            logs["pose_err"] = (est[:, sl["pose"]][:, :3] - gt[:, sl["pose"]][:, :3]).abs().mean() * 20.0
        return {"loss": loss_img + self.REG_WEIGHT * reg, "logs": logs, "fake": None, "real": None}


class PatchStage(StageModule):
    """The local generators (`engine.networks.PatchRefiner`) and the anchor head, with everything else frozen.

    At run time each square shows the net's change on top of G's pose-warped source image (sharp, with the
    source's own mouth and eyes at the target pose). Here the net reads the renderer's exact counterpart, the
    source's identity and factors at the target's pose ("moved", which `PairRenderer` renders for the change
    mask anyway), and learns to make the target's mouth opening, lids and irises from it at the ground-truth
    target anchors, jittered by ANCHOR_JITTER of the face scale (the run-time anchors are estimates). Reading
    G's own frame instead, the nets did not improve on it at all in 250 steps (the change-region L1 moved by
    +0.0004), reading "moved" they cut it by 9 % (/tmp experiment, recorded in the README's model section).
    The anchor head learns the source anchors (cross-entropy to a Gaussian at the truth + L1 of its
    soft-argmax), unless the model takes them from E_mot's keypoints (`ModelConfig.anchors_from_keypoints`,
    the built-in's: the head's tails were 15-70 px off). Loss: L1 inside the paste windows, more where the target
    has content the source lacks ("change"), plus image-gradient L1 there. Logged: the run-time anchor path's
    error (predicted source anchors carried by G's flow) in pixels. FROM_MOVED = False trains on G's frames
    (needs G's forward)."""

    name = "patch"
    ANCHOR_WEIGHT = 20.0
    ANCHOR_CE_WEIGHT = 0.1
    ANCHOR_SIGMA = 1.0  # cells of the S/4 map
    FROM_MOVED = True
    L1_WEIGHT = 1.0
    # squared error beside L1 (window and change region): from nothing, L1 alone kept a lip-coloured blob where
    # the mouth opens (its median) for thousands of steps; the squared error's mean (a grey interior) gives the
    # opening a gradient from the start (benchmarks/patch_sweep.py: the oracle read 0.073 for a commanded 0.8
    # after 1000 steps, against 0.058 after 1500 and 0.060 after 3500 with L1 alone; README "The recipe's mouth")
    MSE_WEIGHT = 2.0
    ANCHOR_JITTER = 0.02  # sd, in units of the face scale d
    CHANGE_WEIGHT = 4.0
    GRAD_WEIGHT = 2.0
    ADV_WEIGHT = 0.02  # with a discriminator (StageConfig.lr_d > 0): hinge loss on the mouth squares
    FM_WEIGHT = 0.2  # and D-feature matching
    DIAG_EVERY = 10  # the log-only passes (see forward) every this many steps
    POOLED_SHARE = 0.5  # the change-region L1: this share pooled over the batch (a wide opening weighs by its
    # pixels), the rest per sample (a thin opening weighs as much as a wide one; see forward)

    def __init__(self, model: Marionette, scfg: StageConfig, oracle=None, vgg=None):
        super().__init__(model, scfg, oracle, vgg)
        self._step = 0
        self._diag: dict[str, torch.Tensor] = {}

    def begin_step(self, step: int) -> None:
        self._step = step

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m: Marionette = self.model
        G = m.generator
        P = G.patch
        src, tgt = batch["source"], batch["target"]
        zs, zt, idx = batch["z_source"], batch["z_target"], batch["src_index"]
        # with the renderer's frames and E_mot's anchors, E_app, G's flow and E_mot serve only the anchor logs
        # (0.16 s of a 0.41 s step on 2 cores): then they run every DIAG_EVERY-th step, the others repeat them
        frozen_anchors = self.FROM_MOVED and m.cfg.anchors_from_keypoints
        diag = not frozen_anchors or not self._diag or self._step % self.DIAG_EVERY == 0
        if diag:
            with torch.no_grad():
                feat_hi, feat_lo, app = m.e_app(src)
                app = torch.cat([app, zs], dim=1)
                flow, occ, mm = G.flow(zt, feat_lo[idx], app[idx])  # for the anchor path's error (a log)
        with torch.no_grad():
            if self.FROM_MOVED:  # the net reads the renderer's source moved to the target pose (see the doc)
                frame = base = batch["moved"]
            else:  # G's frame and warped source, as at run time
                w_lo, w_hi, base = G.warp(flow, occ, src[idx], feat_hi[idx], feat_lo[idx])
                frame = G.refine(mm, w_lo, w_hi, base)
        if m.cfg.anchors_from_keypoints:  # the run-time anchors are E_mot's keypoints (frozen here): nothing to learn
            if diag:
                with torch.no_grad():
                    # (n_ids,3,2), as encode_avatar's but read once (the nine shifts would cost this log-only pass 9x)
                    a_s = m.read_portrait(src, jitter=False)[1][:, list(LANDMARK_ANCHORS)]
                anchor = (a_s - batch["anchor_source"]).abs().mean()  # logged only
            anchor_loss = torch.zeros((), device=src.device)
        else:
            # the anchor head: cross-entropy against a Gaussian at the true position (a strong signal from the
            # first step, where the soft-argmax's own gradient is ~1/n^2) plus L1 of the soft-argmax
            logp = P.anchor_maps(feat_lo)  # (n_ids,3,n*n)
            a_s = P.source_anchors(feat_lo, logp)
            g = P.grid_lo.reshape(1, 1, -1, 2)
            n = P.grid_lo.shape[1]
            d2 = ((g - batch["anchor_source"].unsqueeze(2)) ** 2).sum(-1) * (n / 2) ** 2  # (n_ids,3,n*n) cells^2
            target = torch.softmax(-d2 / (2 * self.ANCHOR_SIGMA ** 2), dim=-1)
            anchor = (a_s - batch["anchor_source"]).abs().mean()
            anchor_ce = -(target * logp).sum(-1).mean()
            anchor_loss = self.ANCHOR_WEIGHT * anchor + self.ANCHOR_CE_WEIGHT * anchor_ce
        a_t = batch["anchor_target"]
        _, half, _, _ = P.boxes(a_t)
        d = half[:, 2:3, None] * (2.0 / MOUTH_SIDE)  # (B,1,1) face scale
        jit = torch.randn(a_t.shape, generator=self.rng).to(a_t.device) * self.ANCHOR_JITTER * d
        out, win = P.apply(frame, zt, zs[idx], a_t + jit, base=base, with_window=True)
        err = (out - tgt).abs()
        wsum = (win.sum() * 3).clamp(min=1.0)
        l1 = (err * win).sum() / wsum
        chg = batch["change"] * win
        # per sample, then averaged: a thin opening (jaw 0.2: a few pixels) weighs as much as a wide one. Pooled
        # over the batch, the nets learned a threshold: shut below jaw ~0.4, over-opened above 0.6 (the oracle read
        # 0.04 for a commanded 0.3, the renderer 0.26), and speech lives at jaw 0.1-0.3
        n_chg = chg.sum((1, 2, 3))  # (B,)
        per = (err * chg).sum((1, 2, 3)) / (3 * n_chg).clamp(min=1.0)
        has = (n_chg > 0).float()
        chg_l1 = (per * has).sum() / has.sum().clamp(min=1.0)
        pooled = (err * chg).sum() / (3 * n_chg.sum()).clamp(min=1.0)
        chg_loss = (1 - self.POOLED_SHARE) * chg_l1 + self.POOLED_SHARE * pooled
        gx = ((out[..., :, 1:] - out[..., :, :-1]) - (tgt[..., :, 1:] - tgt[..., :, :-1])).abs() * win[..., :, 1:]
        gy = ((out[..., 1:, :] - out[..., :-1, :]) - (tgt[..., 1:, :] - tgt[..., :-1, :])).abs() * win[..., 1:, :]
        grad = (gx.sum() + gy.sum()) / wsum
        mse = (err.square() * win).sum() / wsum
        chg_mse = (err.square() * chg).sum() / (chg.sum() * 3).clamp(min=1.0)
        loss = (self.L1_WEIGHT * (l1 + self.CHANGE_WEIGHT * chg_loss + self.GRAD_WEIGHT * grad)
                + self.MSE_WEIGHT * (mse + self.CHANGE_WEIGHT * chg_mse) + anchor_loss)
        logs = {"l1": l1.detach(), "change_l1": chg_l1.detach(), "change_l1_pooled": pooled.detach(),
                "grad_l1": grad.detach()}
        fake = real = None
        if self.disc is not None:  # a patch discriminator on the mouth squares: thin openings sharp, not averaged away
            fake, real = P.square(out, a_t, 2), P.square(tgt, a_t, 2)
            feats_f, logits_f = self.disc(fake)
            with torch.no_grad():
                feats_r, _ = self.disc(real)
            g_adv, fm = L.g_hinge(logits_f), L.feature_matching(feats_f, feats_r)
            logs["gan_g"], logs["fm"] = g_adv.detach(), fm.detach()
            loss = loss + self.ADV_WEIGHT * g_adv + self.FM_WEIGHT * fm
        with torch.no_grad():
            e0 = (frame - tgt).abs()
            logs["l1_g"] = (e0 * win).sum() / wsum
            per0 = (e0 * chg).sum((1, 2, 3)) / (3 * n_chg).clamp(min=1.0)
            logs["change_l1_g"] = (per0 * has).sum() / has.sum().clamp(min=1.0)
            if diag:
                px = 0.5 * m.cfg.image_size  # grid units -> pixels
                self._diag = {"anchor": anchor.detach(), "anchor_src_px": anchor.detach() * px,
                              "anchor_tgt_px": (P.target_anchors(a_s.detach()[idx], flow) - a_t).norm(dim=-1).mean()
                              * px}
            logs.update(self._diag)
        return {"loss": loss, "logs": logs, "fake": fake, "real": real}


class StatePool:
    """Frames of the `state` stage: a pool of `size` frames (fresh identities, independent random states) rendered
    once up front (a pure function of the seed), then batches drawn from it per step (a pure function of
    (seed, step)): the pool makes each image far cheaper than rendering it, as for the factor oracle."""

    def __init__(self, model_cfg, size: int, batch: int, seed: int, device: torch.device | str = "cpu"):
        from trainer.corpus.face import FaceRenderer, sample_identity
        from trainer.oracle import sample_factors

        self.cfg, self.batch, self.seed = model_cfg, int(batch), int(seed)
        r = FaceRenderer(model_cfg.image_size, device=device)
        rng = np.random.default_rng([self.seed, 31337])
        from trainer.corpus.face import landmark_points

        frames, z, kp = [], [], []
        chunk = 64
        for s in range(0, size, chunk):
            n = min(chunk, size - s)
            ident = np.stack([sample_identity(rng) for _ in range(n)]).astype(np.float32)
            fac = sample_factors(rng, n)
            port = _portrait_states(rng, n)  # a third portrait-like states, as the sources the estimator sees
            use = rng.random(n) < 0.33
            fac = {g: np.where(use[:, None], port[g], fac[g]).astype(np.float32) for g in GROUPS}
            img = r.render(ident, fac["pose"], fac["eyes"], fac["mouth"], fac["expression"])
            frames.append((img * 255).round().to(torch.uint8).cpu())
            z.append(torch.from_numpy(latents_from_factors(fac, model_cfg)))
            kp.append(landmark_points(ident, fac["pose"]))
            log.info("state pool: %d / %d frames rendered", s + n, size)
        self.frames, self.z, self.kp = torch.cat(frames), torch.cat(z), torch.cat(kp)

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 27182, int(step)])
        idx = torch.from_numpy(rng.integers(0, len(self.frames), self.batch))
        return {"frames": self.frames[idx].float() / 127.5 - 1, "z": self.z[idx], "kp": self.kp[idx]}


class StateStage(StageModule):
    """E_mot + heads regressed to the ground truth on many rendered frames (appearance-augmented): the state
    estimator that runs once per avatar (the source state of relative motion) and on driving frames."""

    name = "state"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m: Marionette = self.model
        x = batch["frames"]
        est, reg = state_regression(m, x, batch["z"], self.rng, batch.get("kp"))
        with torch.no_grad():
            sl = m.cfg.latents.slices()["pose"]
            pose_deg = ((est[:, sl][:, :3] - batch["z"][:, sl][:, :3]).abs()
                        * torch.tensor([30.0, 20.0, 15.0], device=x.device)).mean()
        return {"loss": reg, "logs": {"reg": reg.detach(), "pose_deg": pose_deg}, "fake": None, "real": None}


def augment_mel(mel: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Voice / channel augmentation of log-mel windows (B, n_mels, T) (natural-log power): a level change of
    -10 .. +5 dB, a spectral tilt of up to +-6.5 dB across the bands, and for half the windows a stationary
    noise floor 10 .. 30 dB under the window's peak. The corpus speaks through one synthesiser; users speak
    through their own voices and microphones."""
    b, n, _ = mel.shape

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(mel.device)

    gain = u(-2.3, 1.15, b, 1, 1)
    slope = u(-1.5, 1.5, b, 1, 1) * (torch.arange(n, device=mel.device).view(1, n, 1) / (n - 1) - 0.5)
    out = mel + gain + slope
    peak = out.amax(dim=(1, 2), keepdim=True)
    floor = peak - u(2.3, 6.9, b, 1, 1) + u(-0.5, 0.5, b, n, 1)  # per-band noise level
    noisy = torch.logaddexp(out, floor)
    use = (torch.rand(b, 1, 1, generator=gen) < 0.5).to(mel.device)
    return torch.where(use, noisy, out)


class AudioStage(StageModule):
    """E_aud regresses the ground-truth mouth latent of each frame from its (voice-augmented) mel window."""

    name = "audio"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m: Marionette = self.model
        lip = m.encode_audio(augment_mel(batch["mel"], self.rng))  # (B, lip), unused dims zero
        target = torch.zeros_like(lip)
        target[:, : batch["mouth"].shape[1]] = batch["mouth"]
        err = F.smooth_l1_loss(lip, target, beta=0.05, reduction="none").sum(1).mean()
        with torch.no_grad():
            jaw_mae = (lip[:, 0] - target[:, 0]).abs().mean()
        return {"loss": err, "logs": {"lip_reg": err.detach(), "jaw_mae": jaw_mae}, "fake": None, "real": None}


def gt_expression_presets(model_cfg) -> dict[str, list[float]]:
    """The corpus' named expressions in a ground-truth-latent model's exp space (padded with zeros)."""
    n = model_cfg.latents.exp
    out = {}
    for name in _factors.PRESET_NAMES:
        v = list(map(float, _factors.preset_vector(name)))[:n]
        out[name] = v + [0.0] * (n - len(v))
    return out


def build(name: str, model: Marionette, scfg: StageConfig, oracle=None, vgg=None) -> StageModule:
    if name == "render":
        return RenderStage(model, scfg, oracle, vgg)
    if name == "audio":
        return AudioStage(model, scfg, oracle, vgg)
    if name == "state":
        return StateStage(model, scfg, oracle, vgg)
    if name == "patch":
        return PatchStage(model, scfg, oracle, vgg)
    raise ValueError(f"unknown synthetic stage {name!r}")
