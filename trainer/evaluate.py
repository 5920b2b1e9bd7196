"""`marionette evaluate`: quality of a checkpoint on a corpus split, measured against ground truth.

Sections of the report (JSON, plus report.md and a PNG grid beside it), each with two baselines, "copy the
source frame" and a "random-weights model" of the same config:

1. **oracle** -- the factor oracle's own accuracy on the split's real (decoded mp4) frames: MAE per column
   in units and % of range, next to predicting the mean. Every later number is read by this oracle.
2. **reconstruction** -- self-driving: the source is the clip's first frame, every factor of frame t comes
   from frame t itself through E_mot; PSNR and SSIM of the generated frame against the real frame.
3. **control** -- commanded factors read back by the oracle: pose latent from the ground-truth pose and
   eye latent from the ground-truth gaze/lids (`engine.controls`), expression from the checkpoint's presets
   at the clip's preset and intensity, lips from the clip's audio (E_aud on mel windows, gated by voice
   activity as `marionette render` does). Error per column against the ground truth (units, % of range).
   **control_vs_real** reads the same generated frames against the oracle's reading of the clip's real frame
   (the ground-truth image of that command) instead of the commanded number: the oracle's own bias, the same
   for both frames of one face, cancels. This is the acceptance measure: some columns cannot be read from one
   frame at all (the renderer's mouth width is +-20 % of a mouth whose size varies +-19 % between identities,
   so the real frames themselves read 17 % of the width range off), and there `control` measures the oracle.
4. **disentanglement** -- from a base command (the source frame's own pose/eyes/expression, closed lips),
   one factor at a time is varied over its range (lip: the clip's audio at frames spread over its jaw
   opening; pose/eye: seeded uniform samples; exp: every preset) while the others are held; the oracle
   reads every group; entry [row = varied factor, column = measured group] is the variance of the reading
   as a fraction of the column's range squared, averaged over the group's columns and the sources.
   With the corpus' identity vectors the same sweep through the renderer itself (ground truth) gives the
   floor the oracle's own noise sets.
5. **lip_sync** -- Pearson correlation of the oracle's jaw_open on the audio-driven frames (section 3)
   with the ground-truth jaw_open (the phoneme-derived truth), per-clip centred and pooled, over offsets
   -200..+200 ms in frame steps; offset > 0 means the generated mouth lags the truth.

Deterministic: clips, frames and sampled commands are fixed by the config and its seed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.errors import InputError
from engine.runtimes.backend import read_driving
from trainer import oracle as _or
from trainer.corpus import factors as _factors

log = logging.getLogger(__name__)

REPORT_FORMAT = 1
SPLITS = ("train", "val", "test")
FACTOR_TO_GROUP = {"lip": "mouth", "pose": "pose", "eye": "eyes", "exp": "expression"}
LIP_SYNC_MAX_MS = 200

# acceptance thresholds of the shipped checkpoint (reported pass/fail; they never stop the evaluation)
THRESHOLDS = {"psnr_gain_db": 4.0, "pose_deg": 3.0, "gaze_pct": 15.0, "blink_pct": 15.0, "mouth_pct": 15.0,
              "disentanglement_ratio": 0.10, "lip_sync_correlation": 0.6, "lip_sync_offset_ms": 40.0}


# =================================================================================== config
@dataclass(frozen=True)
class EvalConfig:
    """data: corpus directory; out: report.json (report.md and report.png are written beside it).

    checkpoint: None = the built-in checkpoint (random weights of `config` when none is installed);
    oracle: None = `<checkpoint>/oracle`. max_clips: clips of the split (spread over identities; None =
    all); max_frames: frames per clip, a contiguous run from the clip's middle (None = the whole clip).
    """

    data: Path
    out: Path
    checkpoint: Path | None = None
    split: str = "test"
    oracle: Path | None = None
    max_clips: int | None = None
    max_frames: int | None = 100
    device: str = "cpu"
    config: str = "lite"
    seed: int = 0
    batch_size: int = 32
    disentangle_sources: int = 8
    disentangle_values: int = 8
    grid_clips: int = 4

    def __post_init__(self):
        if self.split not in SPLITS + ("all",):
            raise InputError(f"split must be one of train, val, test, all; got {self.split!r}")
        for name in ("max_clips", "max_frames"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be a positive integer or None, got {v!r}")
        if self.batch_size < 1 or self.disentangle_values < 2 or self.disentangle_sources < 0:
            raise InputError("batch_size must be >= 1, disentangle_values >= 2, disentangle_sources >= 0")


# =================================================================================== corpus access
# The corpus layout is read with trainer.data (the trainer's reader): list_clips, ClipRef, the decoder, the
# factor-table reader and the identity lookup.
def clip_table(ref) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A clip's ground truth: ((T, N_OUT) float32 in the oracle's column order, the factor arrays incl.
    "expression_preset" (T,) indices into PRESET_NAMES (-1 unknown) and "expression_intensity" (T,))."""
    from trainer.data import _read_factors

    if ref.factors is None:
        raise InputError(f"clip {ref.video} has no factor table ({ref.video.with_suffix('.npz').name}): "
                         "evaluation needs the synthetic corpus' per-frame ground truth")
    arrays = _read_factors(ref.factors, 1 << 62)
    return _or.flat_factors(arrays), arrays


def video_size(path: Path) -> int:
    """The short side of a video's frames (its native size for a square corpus)."""
    import av

    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            return int(min(st.codec_context.width, st.codec_context.height))
    except (av.error.FFmpegError, IndexError, OSError, ValueError) as e:
        raise InputError(f"cannot read video {path}: {e}") from None


def decode_frames(path: Path, size: int | None = None) -> np.ndarray:
    """All frames of a clip as (T, S, S, 3) uint8 (centre square, resized to `size`; default native)."""
    return decode_video(path, size)[0]


def decode_video(path: Path, size: int | None = None) -> tuple[np.ndarray, float]:
    """`decode_frames` and the video's frame rate."""
    from trainer.data import _decode_video

    return _decode_video(Path(path), video_size(path) if size is None else int(size))


def select_clips(data: Path, split: str, max_clips: int | None) -> list:
    """The evaluated clips: the split's clips ordered round-robin over identities (the first clip of every
    identity, then the second, ...), the first `max_clips` of them."""
    from trainer.data import list_clips

    splits = SPLITS if split == "all" else (split,)
    clips = [c for s in splits for c in list_clips(data, s) if c.factors is not None]
    if not clips:
        where = Path(data) / (split if split != "all" else "{train,val,test}")
        raise InputError(f"no clips with ground truth found in {where} (expected <split>/<identity>/<clip>.mp4 + .npz, "
                         "as `marionette corpus` writes)")
    by_id: dict[tuple[str, str], list] = {}
    for c in clips:
        by_id.setdefault((c.split, c.identity), []).append(c)
    order = []
    rank = 0
    while len(order) < len(clips):
        for k in sorted(by_id):
            if rank < len(by_id[k]):
                order.append(by_id[k][rank])
        rank += 1
    return order if max_clips is None else order[:max_clips]


def frame_window(n_frames: int, max_frames: int | None) -> np.ndarray:
    """The evaluated frames of a clip: frames 1.. (frame 0 is the source), a contiguous run of at most
    `max_frames` from the middle."""
    avail = max(0, n_frames - 1)
    n = avail if max_frames is None else min(avail, max_frames)
    start = 1 + (avail - n) // 2
    return np.arange(start, start + n, dtype=np.int64)


# =================================================================================== metrics
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images; identical images give +inf."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian(window: int, sigma: float, device, dtype) -> torch.Tensor:
    t = torch.arange(window, device=device, dtype=dtype) - (window - 1) / 2.0
    g = torch.exp(-(t * t) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images: Gaussian window (11, sigma 1.5), 'valid'
    filtering, K1 = 0.01, K2 = 0.03, mean over channels and positions -> (B,)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    x = x.double()
    y = y.double()
    B, C, H, W = x.shape
    window = min(window, H, W)
    g = _gaussian(window, sigma, x.device, x.dtype)
    gx = g.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    gy = g.view(1, 1, -1, 1).repeat(C, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.conv2d(t, gx, groups=C), gy, groups=C)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either series is constant (no linear relation to measure)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if len(a) < 2 or np.ptp(a) <= 1e-9 * (1 + np.abs(a).max()) or np.ptp(b) <= 1e-9 * (1 + np.abs(b).max()):
        return 0.0
    a = a - a.mean()
    b = b - b.mean()
    return float(np.clip((a * b).sum() / math.sqrt(float((a * a).sum()) * float((b * b).sum())), -1.0, 1.0))


def offset_sweep(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], max_offset: int) -> list[tuple[int, float]]:
    """Correlation of pred[t + k] with truth[t] for k = -max_offset..max_offset, pairs pooled over the
    clips after centring each clip's pairs (per-clip biases of the reader do not count). k > 0: pred lags."""
    out = []
    for k in range(-max_offset, max_offset + 1):
        ps, ts = [], []
        for p, t in zip(pred, truth):
            p = np.asarray(p, np.float64)
            t = np.asarray(t, np.float64)
            n = min(len(p), len(t))
            if k >= 0:
                pp, tt = p[k:n], t[:n - k]
            else:
                pp, tt = p[:n + k], t[-k:n]
            m = min(len(pp), len(tt))
            if m >= 2:
                ps.append(pp[:m] - pp[:m].mean())
                ts.append(tt[:m] - tt[:m].mean())
        out.append((k, correlation(np.concatenate(ps), np.concatenate(ts)) if ps else 0.0))
    return out


def lip_sync_summary(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray], fps: float) -> dict[str, Any]:
    step_ms = 1000.0 / fps
    max_k = int(math.floor(LIP_SYNC_MAX_MS / step_ms + 1e-9))
    sweep = offset_sweep(pred, truth, max_k)
    best_k, best_c = max(sweep, key=lambda kc: (kc[1], -abs(kc[0])))
    zero = dict(sweep)[0]
    return {"correlation": zero, "best_offset_ms": best_k * step_ms, "best_correlation": best_c,
            "sweep": [{"offset_ms": k * step_ms, "correlation": c} for k, c in sweep]}


def control_errors(read: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Per-column MAE of oracle readings against commanded (ground-truth) values plus the summaries the
    acceptance criteria name: pose_deg (mean |error| of yaw/pitch/roll), gaze_pct, blink_pct, mouth_pct,
    expression_pct (% of range, mean over the columns)."""
    acc = _or.accuracy(read, truth)
    g = acc["groups"]
    pc = g["pose"]["columns"]
    ec = g["eyes"]["columns"]
    summary = {
        "pose_deg": float(np.mean([pc[c]["mae"] for c in ("yaw", "pitch", "roll")])),
        "pose_pct": g["pose"]["mae_pct"],
        "gaze_pct": float(np.mean([ec[c]["mae_pct"] for c in ("gaze_x", "gaze_y")])),
        "blink_pct": float(np.mean([ec[c]["mae_pct"] for c in ("lid_left", "lid_right")])),
        "mouth_pct": g["mouth"]["mae_pct"],
        "jaw_open_pct": g["mouth"]["columns"]["jaw_open"]["mae_pct"],
        "expression_pct": g["expression"]["mae_pct"],
    }
    return {"summary": summary, "frames": acc["frames"], "groups": g}


# =================================================================================== models
def _random_model(cfg, seed: int):
    from engine.model import Marionette

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Marionette(cfg)
    return model.eval()


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> model size, as `engine.image.load_portrait` resizes tensors (bicubic, antialiased)."""
    if tuple(frames.shape[-2:]) == (size, size):
        return frames
    return F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0.0, 1.0)


def _batched(fn, x: torch.Tensor, bs: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)]) if len(x) else x


def _compose(cfg, parts: dict[str, torch.Tensor | np.ndarray], n: int) -> torch.Tensor:
    """{factor: (n, dim)} -> z (n, total); missing factors canonical (zeros)."""
    z = torch.zeros(n, cfg.latents.total)
    for f, sl in cfg.latents.slices().items():
        if f in parts:
            z[:, sl] = torch.as_tensor(np.asarray(parts[f], np.float32))
    return z


def _generate(rt, avatar, z: torch.Tensor, bs: int) -> torch.Tensor:
    return _batched(lambda zz: rt.generate(avatar, zz), z, bs)


class _Model:
    """A runtime plus the expression presets it is commanded with."""

    def __init__(self, name: str, model, presets: dict[str, list[float]], device: str, oracle=None):
        from engine.jaw_map import JawCalibrated
        from engine.runtimes.torch_runtime import TorchRuntime

        self.name = name
        self.rt = TorchRuntime(model, device=device)
        if oracle is not None and model.cfg.avatar_jaw_map:  # each avatar's jaw map, as render and serve apply it
            self.rt = JawCalibrated(self.rt, oracle)
        self.cfg = self.rt.cfg
        self.presets = {k.lower(): np.asarray(v, np.float32) for k, v in presets.items()}

    def exp_latents(self, preset: np.ndarray, intensity: np.ndarray) -> np.ndarray:
        """Per-frame expression latent = preset latent x intensity (preset: indices into PRESET_NAMES)."""
        out = np.zeros((len(intensity), self.cfg.latents.exp), np.float32)
        for i, (p, a) in enumerate(zip(preset, intensity)):
            if not 0 <= int(p) < len(_factors.PRESET_NAMES):
                raise InputError(f"frame {i}: unknown expression preset (index {int(p)}); the factor table needs "
                                 f"expression_preset as one of {', '.join(_factors.PRESET_NAMES)}")
            name = _factors.PRESET_NAMES[int(p)]
            if name not in self.presets:
                raise InputError(f"the model has no expression preset {name!r} (it has {sorted(self.presets)})")
            out[i] = self.presets[name] * float(a)
        return out


# =================================================================================== per clip
@dataclass
class _ClipData:
    clip: Any  # trainer.data.ClipRef
    truth: np.ndarray  # (T, N_OUT)
    window: np.ndarray  # evaluated frame indices
    source: torch.Tensor  # (1, 3, C, C) frame 0 at corpus size
    frames: torch.Tensor  # (n, 3, C, C) the window's real frames
    arrays: dict[str, np.ndarray]
    samples: np.ndarray  # 16 kHz mono
    fps: float


def _load_clip(clip, max_frames: int | None) -> _ClipData:
    from engine.audio import SAMPLE_RATE, load_audio

    truth, arrays = clip_table(clip)
    video, fps = decode_video(clip.video)
    n = min(len(video), len(truth))
    truth = truth[:n]
    window = frame_window(n, max_frames)
    if len(window) < 2:
        raise InputError(f"clip {clip.video} is too short to evaluate ({n} frames)")
    f = _or.uint8_to_float(video[np.concatenate([[0], window])])
    samples = load_audio(clip.audio if clip.audio is not None else clip.video, SAMPLE_RATE)
    return _ClipData(clip, truth, window, f[:1], f[1:], arrays, samples, float(fps))


def _lip_latents(m: _Model, cd: _ClipData) -> np.ndarray:
    """Gated E_aud lip latents for every frame 0..T-1 of the clip (as `marionette render` computes them)."""
    from engine.audio import SAMPLE_RATE, log_mel, mel_windows, voice_activity

    T = len(cd.truth)
    lip = np.zeros((T, m.cfg.latents.lip), np.float32)
    if len(cd.samples) == 0:
        return lip
    active = voice_activity(cd.samples, cd.fps, SAMPLE_RATE, n_frames=T)
    if not active.any():
        return lip
    mel = log_mel(cd.samples, m.cfg.audio)
    wins = mel_windows(mel, m.cfg, T, fps=None if abs(cd.fps - m.cfg.fps) < 1e-6 else cd.fps)
    lat = _batched(m.rt.encode_audio, wins, 64).numpy()
    return lat * active[:, None]


def _control_commands(m: _Model, cd: _ClipData, lip: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    from engine.controls import eye_latent, pose_latent

    t = cd.truth[idx]
    sl = _or.group_slices()
    pose, eyes = t[:, sl["pose"]], t[:, sl["eyes"]]
    a = cd.arrays
    exp = m.exp_latents(a["expression_preset"][idx], a["expression_intensity"][idx])
    return {"lip": lip[idx], "pose": pose_latent(*(pose[:, i] for i in range(6))),
            "eye": eye_latent(*(eyes[:, i] for i in range(4))), "exp": exp}


def _disentangle_values(cfg: EvalConfig, presets: Sequence[str]) -> dict[str, np.ndarray]:
    """Seeded physical values of the varied pose/eye groups (the same for every source and model)."""
    rng = np.random.default_rng([cfg.seed, 11])
    k = cfg.disentangle_values
    lo, hi = _factors.ranges("pose")
    pose = rng.uniform(lo, hi, size=(k, 6)).astype(np.float32)
    eyes = np.concatenate([rng.uniform(-1, 1, size=(k, 2)), rng.uniform(0, 1, size=(k, 2))], 1).astype(np.float32)
    return {"pose": pose, "eyes": eyes, "presets": np.asarray(list(presets))}


def _variance_matrix(reads: dict[str, np.ndarray]) -> np.ndarray:
    """{varied factor: (K, N_OUT) readings} -> (4, N_OUT) [factor, oracle column] variance / range^2 (the
    (4, 4) matrix is its mean over each measured group's columns: `_group_matrix`)."""
    return np.stack([(reads[f] / _or.RANGE[None]).var(0) for f in FACTOR_TO_GROUP])


def _group_matrix(V: np.ndarray) -> np.ndarray:
    """(4, N_OUT) column variances -> (4, 4) [varied factor, measured group]."""
    sl = _or.group_slices()
    return np.stack([V[:, sl[g]].mean(1) for g in FACTOR_TO_GROUP.values()], 1)


def _lip_sweep_frames(cd: _ClipData, k: int) -> np.ndarray:
    """k frames of the window spread over the ranks of their ground-truth jaw opening (closed .. open)."""
    jaw = cd.truth[cd.window, _or.group_slices()["mouth"].start]
    order = np.argsort(jaw, kind="stable")
    return cd.window[order[_or._spread(len(order), k)]]


def _disentangle_model(m: _Model, oracle, cd: _ClipData, lip: np.ndarray, values: dict, bs: int,
                       device, keep: dict | None = None) -> np.ndarray:
    from engine.controls import eye_latent, pose_latent

    avatar = m.rt.prepare_avatar(_resize(cd.source, m.cfg.image_size))
    base = _control_commands(m, cd, np.zeros_like(lip), np.array([0]))
    lip_frames = _lip_sweep_frames(cd, len(values["pose"]))
    varied = {
        "lip": lip[lip_frames],
        "pose": pose_latent(*(values["pose"][:, i] for i in range(6))),
        "eye": eye_latent(*(values["eyes"][:, i] for i in range(4))),
        "exp": np.stack([m.presets[str(p)] for p in values["presets"]]),
    }
    reads = {}
    for f, vals in varied.items():
        n = len(vals)
        parts = {g: np.repeat(base[g], n, axis=0) for g in base}
        parts[f] = vals
        frames = _generate(m.rt, avatar, _compose(m.cfg, parts, n), bs)
        if keep is not None:
            keep[f] = frames
        reads[f] = _or.read_factors(oracle, frames.to(device))
    return _variance_matrix(reads)


def _disentangle_renderer(renderer, oracle, cd: _ClipData, ident: np.ndarray, values: dict, device,
                          keep: dict | None = None) -> np.ndarray:
    sl = _or.group_slices()
    t0 = cd.truth[0]
    base = {g: t0[sl[g]][None] for g in _or.GROUPS}
    base["mouth"] = _factors.neutral("mouth", 1)
    lip_frames = _lip_sweep_frames(cd, len(values["pose"]))
    varied = {"mouth": cd.truth[lip_frames, sl["mouth"]], "pose": values["pose"], "eyes": values["eyes"],
              "expression": np.stack([_factors.preset_vector(str(p)) for p in values["presets"]])}
    reads = {}
    for f, g in FACTOR_TO_GROUP.items():
        n = len(varied[g])
        parts = {k: np.repeat(v, n, axis=0) for k, v in base.items()}
        parts[g] = varied[g]
        frames = renderer.render(ident, parts["pose"], parts["eyes"], parts["mouth"], parts["expression"])
        if keep is not None:
            keep[f] = frames.cpu()
        reads[f] = _or.read_factors(oracle, frames.to(device))
    return _variance_matrix(reads)


LEAK_REPORTED = 0.05  # off-diagonal entries at least this share of their row's diagonal are broken down by column


def _matrix_report(V: np.ndarray) -> dict[str, Any]:
    """(4, N_OUT) column variances -> the (4, 4) matrix, its ratios to each row's diagonal, and `leaks`: each
    off-diagonal entry >= LEAK_REPORTED of its diagonal, with the oracle columns that make it (their share of the
    entry), so a report says where a leak is (pose -> expression: the brows, say), not only how large."""
    M = _group_matrix(V)
    diag = np.diag(M)
    ratio = M / np.where(diag[:, None] > 0, diag[:, None], np.nan)
    off = ratio[~np.eye(4, dtype=bool)]
    off = off[np.isfinite(off)]
    sl = _or.group_slices()
    rows, groups = list(FACTOR_TO_GROUP), list(FACTOR_TO_GROUP.values())
    leaks = []
    for i, j in zip(*np.nonzero(np.isfinite(ratio) & ~np.eye(4, dtype=bool))):
        if ratio[i, j] < LEAK_REPORTED:
            continue
        cols = V[i, sl[groups[j]]]
        names = [c for g, c in _or.COLUMNS if g == groups[j]]
        share = cols / cols.sum() if cols.sum() > 0 else cols
        top = sorted(zip(names, share.tolist()), key=lambda x: -x[1])[:3]
        leaks.append({"varied": rows[i], "measured": groups[j], "ratio": float(ratio[i, j]),
                      "columns": {n: round(float(x), 3) for n, x in top}})
    leaks.sort(key=lambda x: -x["ratio"])
    return {"rows": rows, "columns": groups,
            "variance": M.tolist(),
            "ratio": [[None if not np.isfinite(x) else float(x) for x in row] for row in ratio],
            "max_off_diagonal_ratio": float(off.max()) if len(off) else None,
            "leaks": leaks}


# =================================================================================== evaluate
def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return float(np.mean(xs)) if xs else float("nan")


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation; writes cfg.out (JSON), report.md and report.png beside it; returns the report."""
    from tqdm import tqdm

    from engine.checkpoint import default_expression_presets, load_model

    data = Path(cfg.data)
    if not data.is_dir():
        raise InputError(f"corpus directory {data} does not exist")
    clips = select_clips(data, cfg.split, cfg.max_clips)
    device = torch.device(cfg.device)

    model, meta = load_model(cfg.checkpoint, config=cfg.config, seed=cfg.seed)
    oracle_path = cfg.oracle if cfg.oracle is not None else _or.default_oracle_dir(meta.get("checkpoint"))
    if oracle_path is None:
        raise InputError("no oracle: the model has no checkpoint directory to find `oracle/` in; pass --oracle DIR "
                         "(train one with `marionette oracle --data CORPUS --out DIR`)")
    if not Path(oracle_path).is_dir():
        raise InputError(f"no oracle at {oracle_path}; pass --oracle DIR or train one with "
                         f"`marionette oracle --data CORPUS --out {oracle_path}`")
    oracle, oracle_meta = _or.load_oracle(Path(oracle_path), device=device)
    mcfg = model.cfg
    S = mcfg.image_size
    models = {
        "model": _Model("model", model, meta["expression_presets"], cfg.device, oracle=oracle),
        "random_weights": _Model("random_weights", _random_model(mcfg, cfg.seed + 1),
                                 default_expression_presets(mcfg), cfg.device),
    }
    bs = cfg.batch_size
    preset_names = [p for p in _factors.PRESET_NAMES if all(p in m.presets for m in models.values())]
    values = _disentangle_values(cfg, preset_names)
    renderer = None

    real_read, real_truth = [], []
    recon = {k: {"psnr": [], "ssim": []} for k in ("model", "copy_source", "random_weights")}
    ctrl_read = {k: [] for k in ("model", "copy_source", "random_weights")}
    ctrl_truth = []
    jaw = {k: [] for k in ("model", "copy_source", "random_weights", "real_video")}
    jaw_truth = []
    disent = {k: [] for k in ("model", "random_weights", "renderer")}
    grid_rows = []
    sweeps: dict[str, dict[str, torch.Tensor]] = {}  # {"model" | "renderer": {factor: frames}} of the first source
    jaw_col = _or.group_slices()["mouth"].start
    used = []
    clip_fps: float | None = None

    for ci, clip in enumerate(tqdm(clips, desc="evaluate", disable=None)):
        cd = _load_clip(clip, cfg.max_frames)
        if clip_fps is None:
            clip_fps = cd.fps
        elif abs(cd.fps - clip_fps) > 1e-3:
            raise InputError(f"{clip.video} is at {cd.fps:g} fps, the clips before it at {clip_fps:g}: "
                             "evaluate one frame rate at a time")
        used.append(f"{clip.split}/{clip.identity}/{clip.name}")
        truth_w = cd.truth[cd.window]
        # 1. the oracle on the real frames
        r_real = _or.read_factors(oracle, cd.frames.to(device), bs)
        real_read.append(r_real)
        real_truth.append(truth_w)
        src_S = _resize(cd.source, S)
        real_S = _resize(cd.frames, S)
        # copy-source baselines
        copy = src_S.expand(len(real_S), -1, -1, -1)
        recon["copy_source"]["psnr"] += psnr(copy, real_S).tolist()
        recon["copy_source"]["ssim"] += ssim(copy, real_S).tolist()
        r_src = _or.read_factors(oracle, cd.source.to(device))
        ctrl_read["copy_source"].append(np.repeat(r_src, len(truth_w), 0))
        ctrl_truth.append(truth_w)
        jaw["copy_source"].append(np.repeat(r_src[:, jaw_col], len(truth_w)))
        jaw["real_video"].append(r_real[:, jaw_col])
        jaw_truth.append(truth_w[:, jaw_col])
        grid = {"source": src_S[0], "truth": real_S}
        for name, m in models.items():
            avatar = m.rt.prepare_avatar(src_S)
            # 2. self-driving reconstruction
            mot = {k: v for k, v in _batched_motion(m.rt, real_S, bs).items()}
            z = _compose(m.cfg, mot, len(real_S))
            out = _generate(m.rt, avatar, z, bs)
            recon[name]["psnr"] += psnr(out, real_S).tolist()
            recon[name]["ssim"] += ssim(out, real_S).tolist()
            # 3. control: commanded factors, read back
            lip = _lip_latents(m, cd)
            cmd = _control_commands(m, cd, lip, cd.window)
            gen = _generate(m.rt, avatar, _compose(m.cfg, cmd, len(cd.window)), bs)
            r = _or.read_factors(oracle, gen.to(device), bs)
            ctrl_read[name].append(r)
            jaw[name].append(r[:, jaw_col])
            if name == "model":
                grid["self"] = out
                grid["control"] = gen
            # 4. disentanglement (the first source's sweeps are kept for the sweep grid)
            if ci < cfg.disentangle_sources:
                keep = sweeps.setdefault(name, {}) if (ci == 0 and name == "model") else None
                disent[name].append(_disentangle_model(m, oracle, cd, lip, values, bs, device, keep))
        if ci < cfg.disentangle_sources:
            from trainer.data import _identity_params

            ident = _identity_params(clip)
            if ident is not None:
                if renderer is None:
                    from trainer.corpus.face import FaceRenderer

                    renderer = FaceRenderer(int(cd.source.shape[-1]), device=device)
                keep = sweeps.setdefault("renderer", {}) if ci == 0 else None
                disent["renderer"].append(_disentangle_renderer(renderer, oracle, cd, ident, values, device, keep))
        if ci < cfg.grid_clips:
            grid_rows.append(_grid_row(grid))

    # ----------------------------------------------------------------- assemble
    rt_all = np.concatenate(real_truth)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "checkpoint": meta.get("checkpoint"),
        "random_weights": bool(meta.get("random_weights")),
        "model_config": mcfg.name,
        "image_size": S,
        "fps": clip_fps,
        "corpus": str(data),
        "split": cfg.split,
        "clips": used,
        "frames": int(len(rt_all)),
        "settings": {"max_clips": cfg.max_clips, "max_frames": cfg.max_frames, "seed": cfg.seed,
                     "disentangle_sources": min(cfg.disentangle_sources, len(clips)),
                     "disentangle_values": cfg.disentangle_values, "expression_presets": preset_names},
        "oracle": {"path": str(oracle_path), "size": oracle.cfg.size,
                   "trained": oracle_meta.get("trained"),
                   "accuracy": _or.accuracy(np.concatenate(real_read), rt_all)},
    }
    ct = np.concatenate(ctrl_truth)
    report["reconstruction"] = {k: {"psnr": _mean(v["psnr"]), "ssim": _mean(v["ssim"]), "frames": len(v["psnr"])}
                                for k, v in recon.items()}
    report["control"] = {k: control_errors(np.concatenate(v), ct) for k, v in ctrl_read.items()}
    rr = np.concatenate(real_read)
    report["control_vs_real"] = {k: control_errors(np.concatenate(v), rr) for k, v in ctrl_read.items()}
    report["disentanglement"] = {k: _matrix_report(np.mean(v, axis=0)) for k, v in disent.items() if v}
    report["lip_sync"] = {k: lip_sync_summary(v, jaw_truth, clip_fps) for k, v in jaw.items()}
    report["thresholds"] = _thresholds(report)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(report), indent=2) + "\n")
    out.with_name(out.stem + ".md" if out.suffix == ".json" else out.name + ".md").write_text(markdown(report))
    if grid_rows:
        _write_grid(grid_rows, _png_path(out))
    if "model" in sweeps and "renderer" in sweeps:
        _write_sweeps(sweeps, S, out.with_name(out.stem + "_sweeps.png"))
    log.info("evaluation written to %s", out)
    return report


def _png_path(out: Path) -> Path:
    return out.with_suffix(".png") if out.suffix == ".json" else out.with_name(out.name + ".png")


def _batched_motion(rt, frames: torch.Tensor, bs: int) -> dict[str, np.ndarray]:
    """The clip's frames read as `render --pose-from` reads a driving video (`read_driving`)."""
    parts: dict[str, list] = {}
    for i in range(0, len(frames), bs):
        for k, v in read_driving(rt, frames[i:i + bs]).items():
            parts.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def _finite(x):
    """JSON-safe: non-finite floats become None."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _thresholds(r: dict[str, Any]) -> dict[str, Any]:
    T = THRESHOLDS
    c = r.get("control_vs_real", r["control"])["model"]["summary"]
    gain = r["reconstruction"]["model"]["psnr"] - r["reconstruction"]["copy_source"]["psnr"]
    ls = r["lip_sync"]["model"]
    dm = r.get("disentanglement", {}).get("model", {}).get("max_off_diagonal_ratio")
    checks = {
        "psnr_gain_db": (gain, gain >= T["psnr_gain_db"], f">= {T['psnr_gain_db']}"),
        "pose_deg": (c["pose_deg"], c["pose_deg"] < T["pose_deg"], f"< {T['pose_deg']}"),
        "gaze_pct": (c["gaze_pct"], c["gaze_pct"] < T["gaze_pct"], f"< {T['gaze_pct']}"),
        "blink_pct": (c["blink_pct"], c["blink_pct"] < T["blink_pct"], f"< {T['blink_pct']}"),
        "mouth_pct": (c["mouth_pct"], c["mouth_pct"] < T["mouth_pct"], f"< {T['mouth_pct']}"),
        "disentanglement_ratio": (dm, dm is not None and dm < T["disentanglement_ratio"],
                                  f"< {T['disentanglement_ratio']}"),
        "lip_sync_correlation": (ls["best_correlation"], ls["best_correlation"] >= T["lip_sync_correlation"],
                                 f">= {T['lip_sync_correlation']}"),
        "lip_sync_offset_ms": (ls["best_offset_ms"], abs(ls["best_offset_ms"]) <= T["lip_sync_offset_ms"],
                               f"within +-{T['lip_sync_offset_ms']}"),
    }
    out = {k: {"value": v, "pass": bool(p), "target": t} for k, (v, p, t) in checks.items()}
    out["all_pass"] = all(v["pass"] for v in out.values())
    return out


# =================================================================================== outputs
def _grid_row(g: dict[str, torch.Tensor]) -> torch.Tensor:
    n = len(g["truth"])
    picks = _or._spread(n, 3) if n >= 3 else np.arange(n)
    tiles = [g["source"]]
    for i in picks:
        tiles += [g["truth"][i], g["self"][i], g["control"][i]]
    return torch.stack(tiles)


def _write_grid(rows: list[torch.Tensor], path: Path) -> None:
    from PIL import Image, ImageDraw

    S = rows[0].shape[-1]
    ncol = max(len(r) for r in rows)
    label_h = 14
    canvas = np.full((label_h + S * len(rows), S * ncol, 3), 255, np.uint8)
    for ri, r in enumerate(rows):
        for ci, t in enumerate(r):
            canvas[label_h + ri * S: label_h + (ri + 1) * S, ci * S:(ci + 1) * S] = (
                t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    labels = ["source"] + ["truth", "self-driven", "commanded"] * ((ncol - 1) // 3)
    for ci, lab in enumerate(labels[:ncol]):
        draw.text((ci * S + 2, 1), lab[: max(4, S // 6)], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _write_sweeps(sweeps: dict[str, dict[str, torch.Tensor]], size: int, path: Path) -> None:
    """One row per factor sweep (lip, pose, eye, expression) of the first held-out source: the model's frames,
    and under them the renderer's ground truth for the same commands."""
    from PIL import Image, ImageDraw

    rows, labels = [], []
    for f in FACTOR_TO_GROUP:
        if f in sweeps["model"] and f in sweeps["renderer"]:
            rows += [sweeps["model"][f], _resize(sweeps["renderer"][f], size)]
            labels += [f"{f}: model", f"{f}: truth"]
    ncol = max(len(r) for r in rows)
    lab_w = 96
    canvas = np.full((size * len(rows), lab_w + size * ncol, 3), 255, np.uint8)
    for ri, r in enumerate(rows):
        for ci, t in enumerate(r):
            canvas[ri * size:(ri + 1) * size, lab_w + ci * size:lab_w + (ci + 1) * size] = (
                t.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy())
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for ri, lab in enumerate(labels):
        draw.text((4, ri * size + size // 2 - 6), lab, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _f(x, nd=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _control_row(name: str, s: dict[str, Any]) -> str:
    return (f"| {name} | {_f(s['pose_deg'])} | {_f(s['pose_pct'], 1)} | {_f(s['gaze_pct'], 1)} | "
            f"{_f(s['blink_pct'], 1)} | {_f(s['mouth_pct'], 1)} | {_f(s['jaw_open_pct'], 1)} | "
            f"{_f(s['expression_pct'], 1)} |")


def markdown(r: dict[str, Any]) -> str:
    """The report as markdown tables."""
    L = [f"# Evaluation: {r['checkpoint'] or 'random weights (' + r['model_config'] + ')'}", "",
         f"Corpus `{r['corpus']}`, split `{r['split']}`: {len(r['clips'])} clips, {r['frames']} frames "
         f"({r['image_size']} px, {r['fps']:g} fps).", ""]
    acc = r["oracle"]["accuracy"]
    L += ["## 1. Factor oracle accuracy (real frames of this split)", "",
          f"Oracle `{r['oracle']['path']}` ({r['oracle']['size']} px), {acc['frames']} frames.", "",
          "| group | column | MAE | unit | % of range | predict-mean % |", "|---|---|---|---|---|---|"]
    for g, gv in acc["groups"].items():
        for c, cv in gv["columns"].items():
            L.append(f"| {g} | {c} | {_f(cv['mae'], 3)} | {cv['unit']} | {_f(cv['mae_pct'], 1)} | "
                     f"{_f(cv['mean_baseline_pct'], 1)} |")
    L += ["", "## 2. Reconstruction (self-driving)", "", "| | PSNR dB | SSIM |", "|---|---|---|"]
    for k, v in r["reconstruction"].items():
        L.append(f"| {k} | {_f(v['psnr'])} | {_f(v['ssim'], 4)} |")
    L += ["", "## 3. Factor control (commanded, read back by the oracle)", "",
          "| | pose deg | pose % | gaze % | blink % | mouth % | jaw_open % | expression % |",
          "|---|---|---|---|---|---|---|---|"]
    for k, v in r["control"].items():
        L.append(_control_row(k, v["summary"]))
    if "control_vs_real" in r:
        L += ["", "Against the real frame (the acceptance measure): the same generated frames, each error taken "
              "against the oracle's reading of the clip's real frame, so that the oracle's bias on that face "
              "cancels.", "",
              "| | pose deg | pose % | gaze % | blink % | mouth % | jaw_open % | expression % |",
              "|---|---|---|---|---|---|---|---|"]
        for k, v in r["control_vs_real"].items():
            L.append(_control_row(k, v["summary"]))
    L += ["", "## 4. Disentanglement", "",
          "Variance of the oracle's reading / range^2 (in brackets: / the row's diagonal); rows: the varied factor, "
          "columns: the measured group. `renderer` is the ground-truth renderer through the same oracle: "
          "the floor set by the oracle's own noise.", ""]
    for k, v in r.get("disentanglement", {}).items():
        L += [f"**{k}** (max off-diagonal / diagonal: {_f(v['max_off_diagonal_ratio'], 3)})", "",
              "| varied \\ measured | " + " | ".join(v["columns"]) + " |", "|---" * (len(v["columns"]) + 1) + "|"]
        for name, row, rat in zip(v["rows"], v["variance"], v["ratio"]):
            L.append(f"| {name} | " + " | ".join(f"{x:.2e} ({_f(q, 2)})" for x, q in zip(row, rat)) + " |")
        if v.get("leaks"):
            L += ["", "Leaks of at least 5 % (the oracle columns that make each, as a share of it): " + "; ".join(
                f"{x['varied']} -> {x['measured']} {_f(x['ratio'], 3)} ("
                + ", ".join(f"{c} {100 * q:.0f} %" for c, q in x["columns"].items()) + ")" for x in v["leaks"])]
        L.append("")
    L += ["## 5. Lip sync (oracle jaw_open vs phoneme-derived truth)", "",
          "| | corr @ 0 ms | best offset ms | corr @ best |", "|---|---|---|---|"]
    for k, v in r["lip_sync"].items():
        L.append(f"| {k} | {_f(v['correlation'], 3)} | {_f(v['best_offset_ms'], 0)} | {_f(v['best_correlation'], 3)} |")
    L += ["", "## Acceptance", "", "| criterion | value | target | pass |", "|---|---|---|---|"]
    for k, v in r["thresholds"].items():
        if k != "all_pass":
            L.append(f"| {k} | {_f(v['value'], 3)} | {v['target']} | {'yes' if v['pass'] else 'no'} |")
    L += ["", f"All pass: {'yes' if r['thresholds']['all_pass'] else 'no'}", ""]
    return "\n".join(L)


# =================================================================================== real speech
REAL_SPEECH_DIR = Path("/usr/share/pocketsphinx/test/data")  # Debian's pocketsphinx-testdata (BSD-2)


def real_speech_files() -> list[Path]:
    """Recordings of real human speech on this machine: the LibriVox readings and CMU test utterances of
    Debian's pocketsphinx-testdata (16 kHz mono WAV); empty when the package is not installed."""
    d = REAL_SPEECH_DIR
    return sorted((d / "librivox").glob("*.wav")) + sorted((d / "cards").glob("*.wav")) if d.is_dir() else []


def mouth_vs_speech(jaw: np.ndarray, samples: np.ndarray, fps: float, sample_rate: int = 16000) -> dict[str, Any]:
    """How a rendered mouth follows real speech, from the jaw opening read off each frame (`jaw` (T,)).

    Levels are judged against the clip's own range, from its noise floor (5th-percentile frame level) to its
    loud speech (95th percentile), so that recordings with room noise (audiobooks) have pauses too. Speech
    frames: within min(20 dB, half the range) of the top. Pause frames: within min(10 dB, 35 % of the range)
    of the floor, in runs of >= 4 frames (160 ms at 25 fps), the frame after a run's start onward (the mouth
    may take one frame to close). Reports the mean jaw in each, their ratio, the share of pause frames with the
    jaw under 0.15 (shut), the 90th percentile of the jaw in each, how much the jaw moves per frame in each
    (mean |change| between consecutive frames) and their ratio, and the correlation of the jaw with the
    level in dB (at the best offset of +-2 frames)."""
    from engine.audio import frame_energy

    n = len(jaw)
    e = frame_energy(samples, fps, sample_rate, n)
    db = 20 * np.log10(np.maximum(e.astype(np.float64), 1e-10))
    top, floor = float(np.percentile(db, 95)), float(np.percentile(db, 5))
    span = max(top - floor, 1e-6)
    speech = db > top - min(20.0, 0.5 * span)
    quiet = db < floor + min(10.0, 0.35 * span)
    pause = np.zeros(n, bool)
    i = 0
    while i < n:
        if quiet[i]:
            j = i
            while j < n and quiet[j]:
                j += 1
            if j - i >= 4:
                pause[i + 1:j] = True
            i = j
        else:
            i += 1
    jaw = np.asarray(jaw, np.float64)
    out: dict[str, Any] = {"frames": n, "speech_frames": int(speech.sum()), "pause_frames": int(pause.sum()),
                           "jaw_speech": float(jaw[speech].mean()) if speech.any() else None,
                           "jaw_pause": float(jaw[pause].mean()) if pause.any() else None}
    if speech.any() and pause.any():
        out["ratio"] = out["jaw_speech"] / max(out["jaw_pause"], 1e-3)
        out["pause_shut_fraction"] = float((jaw[pause] < 0.15).mean())
        out["jaw_speech_p90"] = float(np.percentile(jaw[speech], 90))
        out["jaw_pause_p90"] = float(np.percentile(jaw[pause], 90))
    # movement: mean |jaw change| between consecutive frames of speech, and of pauses. Unlike the ratio of
    # levels it does not depend on where the oracle puts a shut mouth (one reading a shut mouth at 0.02
    # instead of 0.00 turns a ratio of 15 into 1.2 for the same frames)
    step = np.abs(np.diff(jaw))
    in_speech, in_pause = speech[1:] & speech[:-1], pause[1:] & pause[:-1]
    if in_speech.any() and in_pause.any():
        out["movement_speech"] = float(step[in_speech].mean())
        out["movement_pause"] = float(step[in_pause].mean())
        out["movement_ratio"] = out["movement_speech"] / max(out["movement_pause"], 1e-3)
    sweep = offset_sweep([jaw], [np.maximum(db, top - 40)], 2)
    k, c = max(sweep, key=lambda kc: kc[1])
    out["level_correlation"], out["level_offset_ms"] = c, k * 1000.0 / fps
    return out
