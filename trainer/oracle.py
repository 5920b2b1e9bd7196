"""The factor oracle: a small CNN that reads every factor group of `factors.FACTOR_GROUPS` (pose, eyes,
mouth, expression, in their own units) back from a frame.

It is the yardstick of `marionette evaluate` (factor-control error, disentanglement, lip sync) and a
feature extractor for the trainer (`FactorOracle.features`, the penultimate embedding).

Training (`train_oracle`) mixes two sources of labelled frames:
* frames rendered fresh by the corpus' `FaceRenderer` from independently sampled factors and identities
  (unlimited, decorrelated: the oracle cannot learn the corpus' correlations between groups);
* decoded mp4 frames of the corpus' train split with their per-frame ground truth (the codec and the
  corpus' own rendering size, i.e. exactly what it reads at evaluation time).
Frames are augmented (down/up-sampling blur, noise, brightness/contrast) so that it also reads the softer
frames a generator produces. Its accuracy is always reported on decoded frames of held-out identities.

On disk: a directory with `oracle.safetensors` and `oracle.json` ({"format": 1, "net": OracleNetConfig,
"columns": [...], "meta": {...}}); by convention it lives in `<checkpoint>/oracle/` so a checkpoint
carries the yardstick it is evaluated with.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from engine.checkpoint import ORACLE_FILES
from engine.errors import InputError
from engine.oracle import (EYE_CROP, FORMAT, MOUTH_CROP, REGION_ANCHORS, OracleNetConfig,  # noqa: F401 (re-exported)
                           default_oracle_dir, read_factors, region_crops, save_oracle)
from engine.oracle import FactorOracle as _FactorOracle
from engine.oracle import load_oracle as _load_oracle
from trainer.corpus import factors as _factors

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = ORACLE_FILES  # oracle.safetensors, oracle.json (the engine ships them with the built-in)
ORACLE_SUBDIR = "oracle"

GROUPS: tuple[str, ...] = _factors.GROUP_NAMES  # ("pose", "eyes", "mouth", "expression")
COLUMNS: tuple[tuple[str, str], ...] = tuple((g, c.name) for g in GROUPS for c in _factors.FACTOR_GROUPS[g])
N_OUT = len(COLUMNS)
LOW = np.concatenate([_factors.ranges(g)[0] for g in GROUPS]).astype(np.float32)
HIGH = np.concatenate([_factors.ranges(g)[1] for g in GROUPS]).astype(np.float32)
RANGE = (HIGH - LOW).astype(np.float32)


def group_slices() -> dict[str, slice]:
    """Where each factor group sits in the oracle's flat (…, N_OUT) output."""
    out, start = {}, 0
    for g in GROUPS:
        n = _factors.dims(g)
        out[g] = slice(start, start + n)
        start += n
    return out


def flat_factors(groups: Mapping[str, Any]) -> np.ndarray:
    """{group: (T, D)} -> (T, N_OUT) float32 in the oracle's column order."""
    missing = [g for g in GROUPS if g not in groups]
    if missing:
        raise InputError(f"factor table lacks groups {missing}; needs {list(GROUPS)}")
    parts = []
    for g in GROUPS:
        a = np.asarray(groups[g], np.float32)
        if a.ndim != 2 or a.shape[1] != _factors.dims(g):
            raise InputError(f"factor group {g!r} must be (T, {_factors.dims(g)}), got {a.shape}")
        parts.append(a)
    if len({len(p) for p in parts}) != 1:
        raise InputError(f"factor groups have different lengths: {[len(p) for p in parts]}")
    return np.concatenate(parts, axis=1)


# =================================================================================== network
# the network and its files live in engine.oracle (the per-avatar jaw calibration reads with it); here, the
# corpus' columns


class FactorOracle(_FactorOracle):
    """`engine.oracle.FactorOracle` reading this corpus' factor table (`COLUMNS`, ranges `LOW`..`HIGH`)."""

    def __init__(self, cfg: OracleNetConfig = OracleNetConfig()):
        super().__init__(cfg, [f"{g}.{c}" for g, c in COLUMNS], LOW, HIGH)


def load_oracle(path: Path, device: str | torch.device = "cpu") -> tuple[_FactorOracle, dict]:
    """Oracle directory (or its oracle.json / oracle.safetensors) -> (oracle in eval mode, meta); it must read
    this corpus' factor table (its columns and ranges)."""
    model, meta = _load_oracle(path, device)
    want = tuple(f"{g}.{c}" for g, c in COLUMNS)
    if model.columns != want:
        raise InputError(f"oracle {path}: its columns {list(model.columns)} differ from this corpus' factor table "
                         f"{list(want)}")
    low = model.low.cpu().numpy()
    if not np.allclose(low, LOW) or not np.allclose(low + model.span.cpu().numpy(), HIGH):
        raise InputError(f"oracle {path}: trained for other factor ranges than this corpus' factor table")
    return model, meta


def sample_factors(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Independent factors for `n` rendered training frames, covering every group's whole range.

    Lids: a third both-equal (blinks), a third independent, a third nearly open; expression: half
    independent uniform columns (each zero half the time), half a preset at a random intensity plus noise.
    """
    out = {}
    lo, hi = _factors.ranges("pose")
    out["pose"] = rng.uniform(lo, hi, size=(n, len(lo))).astype(np.float32)
    gaze = rng.uniform(-1.0, 1.0, size=(n, 2))
    kind = rng.integers(0, 3, size=n)
    both = rng.uniform(0.0, 1.0, size=n)
    ind = rng.uniform(0.0, 1.0, size=(n, 2))
    lids = np.where(kind[:, None] == 0, both[:, None], np.where(kind[:, None] == 1, ind,
                                                                 rng.uniform(0.0, 0.15, size=(n, 2))))
    out["eyes"] = np.concatenate([gaze, lids], 1).astype(np.float32)
    lo, hi = _factors.ranges("mouth")
    m = rng.uniform(lo, hi, size=(n, 3))
    closed = rng.random(n) < 0.15  # closed mouths are common in speech
    m[closed, 0] = 0.0
    out["mouth"] = m.astype(np.float32)
    free = rng.uniform(0.0, 1.0, size=(n, 6)) * (rng.random((n, 6)) < 0.5)
    presets = np.stack([_factors.preset_vector(p) for p in _factors.PRESET_NAMES])
    pre = presets[rng.integers(0, len(presets), size=n)] * rng.uniform(0.0, 1.0, size=(n, 1))
    pre = np.clip(pre + rng.normal(0.0, 0.08, size=(n, 6)), 0.0, 1.0)
    out["expression"] = np.where((rng.random(n) < 0.5)[:, None], free, pre).astype(np.float32)
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample appearance augmentation of (B, 3, S, S) frames in [0, 1] that keeps every factor:
    down/up-sampling blur (to x0.6 .. x0.9, 35 %; stronger blur hides the iris at 128 px), Gaussian noise (sd <= 0.03), brightness/contrast (+-12 %)."""
    B, _, S, _ = x.shape
    dev = x.device

    def u(*shape):
        return torch.rand(*shape, generator=gen, device=dev)

    out = x.clone()
    levels = (0.6, 0.7, 0.8, 0.9)
    level = (u(B) * len(levels)).long().clamp(max=len(levels) - 1)
    blur = u(B) < 0.35
    for j, sc in enumerate(levels):
        idx = torch.nonzero(blur & (level == j)).flatten()
        if len(idx):
            s = max(16, int(round(S * sc)))
            small = F.interpolate(out[idx], size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out[idx] = F.interpolate(small, size=(S, S), mode="bilinear", align_corners=False)
    gain = 1.0 + 0.24 * (u(B, 1, 1, 1) - 0.5)
    bias = 0.12 * (u(B, 1, 1, 1) - 0.5)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * gain + mean + bias
    noise = 0.03 * u(B, 1, 1, 1) * torch.randn(out.shape, generator=gen, device=dev)
    return (out + noise).clamp(0.0, 1.0)


def _mirror_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """For a horizontally mirrored frame: the column permutation and which columns change sign (in units;
    every such column has a symmetric range). Mirroring negates yaw, roll, tx and gaze_x and swaps the
    lids (the renderer's camera is centred and the face's features are symmetric)."""
    names = [f"{g}.{c}" for g, c in COLUMNS]
    perm = list(range(N_OUT))
    a, b = names.index("eyes.lid_left"), names.index("eyes.lid_right")
    perm[a], perm[b] = b, a
    neg = torch.zeros(N_OUT, dtype=torch.bool)
    for n in ("pose.yaw", "pose.roll", "pose.tx", "eyes.gaze_x"):
        j = names.index(n)
        assert LOW[j] == -HIGH[j]
        neg[j] = True
    return torch.tensor(perm), neg


def mirror(x: torch.Tensor, y_norm: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the rows `flip` (B,) bool of frames x (B, 3, S, S) and their normalised factors y (B, N_OUT)."""
    perm, neg = _mirror_tables()
    ym = y_norm[:, perm.to(y_norm.device)]
    ym = torch.where(neg.to(y_norm.device), 1.0 - ym, ym)
    f = flip.view(-1, 1, 1, 1)
    return torch.where(f, x.flip(-1), x), torch.where(flip.view(-1, 1), ym, y_norm)


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), antialiased bilinear (a no-op at the same size)."""
    if tuple(frames.shape[-2:]) == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(0.0, 1.0)


def uint8_to_float(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


# =================================================================================== accuracy
def accuracy(pred: np.ndarray, truth: np.ndarray, baseline: np.ndarray | None = None) -> dict[str, Any]:
    """Per-column MAE of oracle readings `pred` against `truth` (both (N, N_OUT), units), in units and as
    % of the column's range, with the MAE of predicting a constant (`baseline`, default the truth's mean).

    {"frames": N, "groups": {group: {"mae_pct": mean over columns, "mean_baseline_pct": ...,
     "columns": {name: {"mae", "mae_pct", "mean_baseline_mae", "mean_baseline_pct", "unit"}}}}}"""
    pred = np.asarray(pred, np.float64)
    truth = np.asarray(truth, np.float64)
    if pred.shape != truth.shape or pred.ndim != 2 or pred.shape[1] != N_OUT:
        raise ValueError(f"pred and truth must both be (N, {N_OUT}), got {pred.shape} and {truth.shape}")
    base = truth.mean(0) if baseline is None else np.asarray(baseline, np.float64)
    mae = np.abs(pred - truth).mean(0) if len(truth) else np.full(N_OUT, np.nan)
    bmae = np.abs(truth - base[None]).mean(0) if len(truth) else np.full(N_OUT, np.nan)
    groups: dict[str, Any] = {}
    for g, sl in group_slices().items():
        cols = {}
        for j, col in zip(range(sl.start, sl.stop), _factors.FACTOR_GROUPS[g]):
            cols[col.name] = {"unit": col.unit, "mae": float(mae[j]), "mae_pct": float(100 * mae[j] / RANGE[j]),
                              "mean_baseline_mae": float(bmae[j]),
                              "mean_baseline_pct": float(100 * bmae[j] / RANGE[j])}
        groups[g] = {"mae_pct": float(np.mean([c["mae_pct"] for c in cols.values()])),
                     "mean_baseline_pct": float(np.mean([c["mean_baseline_pct"] for c in cols.values()])),
                     "columns": cols}
    return {"frames": int(len(truth)), "groups": groups}


# =================================================================================== training
@dataclass(frozen=True)
class OracleConfig:
    """Training of the factor oracle (`train_oracle`).

    size: the oracle's input size (128: CPU-friendly; 256: the corpus' native detail, for a GPU, with a
    stride-2 stem). data: corpus directory (its train split supplies decoded frames, its val split, else test, the
    held-out accuracy); None trains on rendered frames only. out: directory written (oracle.safetensors +
    oracle.json). render_fraction: share of each batch rendered fresh by FaceRenderer (at `render_size`,
    default `size`); the rest are corpus train frames (all rendered when there is no train split).
    render_pool: rendered frames are drawn from a pool of this many frames rendered once up front (0: fresh
    frames every step); None = fresh on CUDA, a pool of 16384 elsewhere (the CPU renderer takes tens of ms
    per 128 px frame, several times a training step's share).
    regions: the oracle also reads eye and mouth crops at the input's resolution (`OracleNetConfig.regions`);
    rendered frames then default to 256 px (`render_size`), the crops are taken at the renderer's anchors
    moved by N(0, anchor_jitter) (grid units; 0.015 is 2 px at 256) so that they tolerate the anchors the
    oracle finds itself at evaluation, and the anchor head learns from the renderer's anchors.
    max_real_frames: cap on the decoded train frames kept in memory (evenly spread over the clips).
    eval_frames: frames of each accuracy check written to meta: "accuracy_rendered" (fresh renders of
    unseen identities) and "accuracy" (decoded frames of the val split, else test, evenly spread).
    """

    data: Path | None
    out: Path
    steps: int = 3000
    batch_size: int = 32
    size: int = 128
    device: str = "cpu"
    seed: int = 0
    lr: float = 2e-3
    render_fraction: float = 0.5
    render_size: int | None = None
    render_pool: int | None = None
    max_real_frames: int = 20000
    eval_frames: int = 1024
    log_every: int = 100
    regions: bool = False
    region_size: int = 48
    anchor_jitter: float = 0.015

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1:
            raise InputError(f"oracle training needs steps >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.render_fraction <= 1.0:
            raise InputError(f"render_fraction must be in 0..1, got {self.render_fraction}")
        if self.data is None and self.render_fraction < 1.0:
            object.__setattr__(self, "render_fraction", 1.0)


def _spread(n_total: int, n: int) -> np.ndarray:
    """n indices evenly spread over range(n_total) (all of them when n >= n_total)."""
    if n >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(np.int64))


def corpus_frames(data: Path, splits: Iterable[str], max_frames: int, size: int,
                  desc: str = "frames") -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Decoded corpus frames with ground truth: at most `max_frames` frames evenly spread over all the
    clips of `splits` (the same number from every clip, deterministic), resized to `size`.

    Returns (frames (N, 3, size, size) uint8, truth (N, N_OUT) float32, identities (N,))."""
    from trainer.data import _decode_video, list_clips
    from trainer.evaluate import clip_table

    clips = [c for s in splits for c in list_clips(data, s) if c.factors is not None]
    if not clips or max_frames <= 0:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), np.zeros((0, N_OUT), np.float32), []
    per_clip = max(1, int(math.ceil(max_frames / len(clips))))
    frames, truth, ids = [], [], []
    from tqdm import tqdm

    for clip in tqdm(clips, desc=desc, leave=False, disable=None):
        tab = clip_table(clip)[0]
        video = _decode_video(clip.video, size)[0]  # (T, size, size, 3) uint8
        sel = _spread(min(len(tab), len(video)), per_clip)
        frames.append(torch.from_numpy(np.ascontiguousarray(video[sel])).permute(0, 3, 1, 2).contiguous())
        truth.append(tab[sel])
        ids += [clip.identity] * len(sel)
    f = torch.cat(frames)
    t = np.concatenate(truth)
    if len(f) > max_frames:
        keep = _spread(len(f), max_frames)
        f, t, ids = f[torch.from_numpy(keep)], t[keep], [ids[i] for i in keep]
    return f, t.astype(np.float32), ids


@torch.no_grad()
def rendered_frames(n: int, size: int, render_size: int, device, seed: int, batch: int = 64,
                    uint8: bool = False, with_anchors: bool = False):
    """n frames rendered from `sample_factors` and fresh identities (seeded) at `render_size`, resized to
    `size`: (frames (n, 3, size, size) on `device`, float in [0, 1] or uint8, truth (n, N_OUT)) [+ the
    anchors (n, 3, 2) of `trainer.corpus.face.anchor_points` with `with_anchors`]."""
    from tqdm import tqdm

    from trainer.corpus.face import FaceRenderer, anchor_points, sample_identity

    rng = np.random.default_rng([seed, 8])
    renderer = FaceRenderer(render_size, device=device)
    frames, truth, anchors = [], [], []
    for i in tqdm(range(0, n, batch), desc="rendering", leave=False, disable=None):
        k = min(batch, n - i)
        fac = sample_factors(rng, k)
        ident = np.stack([sample_identity(rng) for _ in range(k)])
        x = resize_frames(renderer.render(ident, fac["pose"], fac["eyes"], fac["mouth"], fac["expression"]), size)
        frames.append(x.mul(255.0).round_().to(torch.uint8) if uint8 else x)
        truth.append(flat_factors(fac))
        if with_anchors:
            anchors.append(anchor_points(torch.from_numpy(ident), torch.from_numpy(fac["pose"])).to(device))
        if (i // batch) % 20 == 19:
            log.info("oracle: rendered %d/%d frames", i + k, n)
    if not frames:
        out = (torch.zeros(0, 3, size, size, device=device, dtype=torch.uint8 if uint8 else torch.float32),
               np.zeros((0, N_OUT), np.float32))
        return out + (torch.zeros(0, 3, 2, device=device),) if with_anchors else out
    out = (torch.cat(frames), np.concatenate(truth))
    return out + (torch.cat(anchors),) if with_anchors else out


def _heldout_split(data: Path | None) -> str | None:
    if data is None:
        return None
    from trainer.data import list_clips

    for s in ("val", "test"):
        if any(c.factors is not None for c in list_clips(data, s)):
            return s
    return None


def train_oracle(cfg: OracleConfig) -> Path:
    """Train the factor oracle; writes `cfg.out` (oracle.safetensors + oracle.json with the config, the
    training settings and the held-out accuracy in meta). Deterministic for a seed on one device."""
    from tqdm import tqdm

    from trainer.corpus.face import FaceRenderer, anchor_points, sample_identity

    device = torch.device(cfg.device)
    net_cfg = OracleNetConfig(size=cfg.size, stem_stride=2 if cfg.size >= 256 else 1, regions=cfg.regions,
                              region_size=cfg.region_size)
    render_size = cfg.render_size or (max(cfg.size, 256) if cfg.regions else cfg.size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        oracle = FactorOracle(net_cfg).to(device)
    rng = np.random.default_rng([cfg.seed, 7])
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    # frames are kept at the size the oracle reads them: its global size, or the crops' source resolution
    keep = render_size if cfg.regions else cfg.size

    real_f, real_t = torch.zeros(0), np.zeros((0, N_OUT), np.float32)
    if cfg.data is not None and cfg.render_fraction < 1.0:
        real_f, real_t, _ = corpus_frames(Path(cfg.data), ["train"], cfg.max_real_frames, keep,
                                          desc="oracle: decoding train frames")
        log.info("oracle: %d decoded train frames", len(real_f))
    n_real = 0 if len(real_f) == 0 else int(round(cfg.batch_size * (1.0 - cfg.render_fraction)))
    n_render = cfg.batch_size - n_real
    renderer = FaceRenderer(render_size, device=device) if n_render > 0 else None
    pool = cfg.render_pool if cfg.render_pool is not None else (0 if device.type == "cuda" else 16384)
    pool_f, pool_y, pool_a = None, None, None
    if n_render and pool > 0:
        pool_f, t, pool_a = rendered_frames(pool, keep, render_size, device, seed=cfg.seed, uint8=True,
                                            with_anchors=True)  # uint8: a quarter of the memory of float frames
        pool_y = torch.from_numpy((t - LOW) / RANGE).to(device)
        log.info("oracle: rendered a pool of %d frames", len(pool_f))
    real_f = real_f.to(device) if n_real else real_f
    real_y = torch.from_numpy((real_t - LOW) / RANGE).to(device) if n_real else None
    swap = torch.tensor([1, 0, 2], device=device)

    opt = torch.optim.AdamW(oracle.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warm = min(100, max(1, cfg.steps // 10))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    oracle.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="oracle", disable=None)
    for step in bar:
        xs, ys, As = [], [], []
        if n_render and pool_f is not None:
            idx = torch.from_numpy(rng.integers(0, len(pool_f), size=n_render)).to(device)
            xs.append(pool_f[idx].float().div_(255.0))
            ys.append(pool_y[idx])
            As.append(pool_a[idx])
        elif n_render:
            fac = sample_factors(rng, n_render)
            ident = np.stack([sample_identity(rng) for _ in range(n_render)])
            img = renderer.render(ident, fac["pose"], fac["eyes"], fac["mouth"], fac["expression"])
            xs.append(resize_frames(img, keep))
            ys.append(torch.from_numpy((flat_factors(fac) - LOW) / RANGE).to(device))
            As.append(anchor_points(torch.from_numpy(ident), torch.from_numpy(fac["pose"])).to(device) if cfg.regions
                      else torch.full((n_render, 3, 2), float("nan"), device=device))  # (unused without regions)
        if n_real:
            idx = torch.from_numpy(rng.integers(0, len(real_f), size=n_real)).to(device)
            xs.append(real_f[idx].float().div_(255.0))
            ys.append(real_y[idx])
            As.append(torch.full((n_real, 3, 2), float("nan"), device=device))  # found by the oracle itself
        y = torch.cat(ys).float()
        flip = torch.rand(len(y), generator=gen, device=device) < 0.5
        x, y = mirror(torch.cat(xs), y, flip)
        anchors = torch.cat(As)
        if cfg.regions:  # a mirrored frame: x -> -x, and the eyes swap
            am = anchors[:, swap] * torch.tensor([-1.0, 1.0], device=device)
            anchors = torch.where(flip.view(-1, 1, 1), am, anchors)
        x = augment(x, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if cfg.regions:
            jitter = cfg.anchor_jitter * torch.randn(anchors.shape, generator=gen, device=device)
            feat, found = oracle.features_and_anchors(x, anchors + jitter)
            known = torch.isfinite(anchors)
            loss = F.smooth_l1_loss(oracle.head(feat), y, beta=0.05)
            if bool(known.any()):
                loss = loss + 4.0 * F.smooth_l1_loss(found[known], anchors[known], beta=0.01)
        else:
            loss = F.smooth_l1_loss(oracle.normalised(x), y, beta=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            recent = float(np.mean(losses[-cfg.log_every:]))
            bar.set_postfix(loss=f"{recent:.4f}")
            log.info("oracle step %d/%d loss %.4f", step + 1, cfg.steps, recent)
    oracle.eval()

    meta: dict[str, Any] = {
        "trained": {"steps": cfg.steps, "batch_size": cfg.batch_size, "seed": cfg.seed, "lr": cfg.lr,
                    "render_fraction": cfg.render_fraction if n_real else 1.0, "render_pool": pool,
                    "render_size": render_size, "regions": cfg.regions, "region_size": cfg.region_size,
                    "anchor_jitter": cfg.anchor_jitter,
                    "real_frames": int(len(real_f)), "data": None if cfg.data is None else str(cfg.data),
                    "final_loss": float(np.mean(losses[-cfg.log_every:])) if losses else None},
    }
    f, t, a = rendered_frames(cfg.eval_frames, keep, render_size, device, seed=cfg.seed + 10_000,
                              with_anchors=True)
    meta["accuracy_rendered"] = accuracy(read_factors(oracle, f), t)
    if cfg.regions and len(f):
        with torch.no_grad():
            found = torch.cat([oracle.anchors(f[i:i + 64]) for i in range(0, len(f), 64)])
        err = (found - a).norm(dim=-1) * (render_size / 2.0)  # (N, 3) px at render_size
        meta["accuracy_rendered"]["anchors_px"] = {
            "size": render_size, **{n: {"median": float(err[:, j].median()), "p95": float(err[:, j].quantile(0.95))}
                                    for j, n in enumerate(REGION_ANCHORS)}}
        log.info("oracle anchors on unseen identities, median px at %d: %s", render_size,
                 ", ".join(f"{n} {float(err[:, j].median()):.2f}" for j, n in enumerate(REGION_ANCHORS)))
    log.info("oracle on %d frames rendered for unseen identities, MAE %% of range: %s", len(t),
             ", ".join(f"{g} {v['mae_pct']:.1f}" for g, v in meta["accuracy_rendered"]["groups"].items()))
    split = _heldout_split(None if cfg.data is None else Path(cfg.data))
    if split is not None:
        f, t, _ = corpus_frames(Path(cfg.data), [split], cfg.eval_frames, keep, desc="oracle: held-out frames")
        pred = read_factors(oracle, f.to(device).float().div_(255.0))
        acc = accuracy(pred, t, baseline=real_t.mean(0) if len(real_t) else None)
        acc["split"] = split
        meta["accuracy"] = acc
        log.info("oracle held-out (%s, %d frames) MAE %% of range: %s", split, len(t),
                 ", ".join(f"{g} {v['mae_pct']:.1f}" for g, v in acc["groups"].items()))
    return save_oracle(oracle.cpu(), Path(cfg.out), meta)
