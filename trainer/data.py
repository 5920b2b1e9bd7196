"""Training data: clips of the corpus layout, decoded once, sampled per stage.

Layout read (the synthetic corpus writes it; real talking-head video can be arranged the same way):
    DIR/[manifest.json]
    DIR/<split>/<identity>/<clip>.mp4     video (any fps PyAV reads; resized to the model's size)
    DIR/<split>/<identity>/<clip>.wav     16 kHz mono speech (optional: else the mp4's audio track)
    DIR/<split>/<identity>/<clip>.npz     per-frame factor table (optional: synthetic corpus only)
    DIR/<split>/<identity>/<clip>.json    clip metadata (optional; "identity" params give exact eye masks)
Without npz files the clips still serve the motion and expression stages; the supervised parts of
the factors stage (pose / eye regression) are masked out and the idle stage uses E_pose / E_eye of the
frames as its targets.

Sampling is a pure function of the sample index: item i draws everything (clip, frames, augmentation)
from `numpy.random.default_rng([seed, i])`, and `StepSampler` hands out the indices of step s as
`(s * world + rank) * batch + j`. So a run is reproducible, ranks never see the same item, and
`--resume` at step s continues with exactly the items an uninterrupted run would have drawn.

Decoded clips (uint8 frames at the model's size, log-mel, voice activity) are cached as .npy files under
`cache_dir` (memory-mapped on later reads) and in a small per-worker LRU.

Augmentation (PD-FGC sec. 3.1 and 3.3): colour jitter (brightness, contrast, saturation, hue) on the
motion branch; a small affine (rotation, scale, translation). Our deviation: in the motion stage the
affine is applied to the driving frame *and* the target (the generator is driven through pose latents,
so an affine on the driving frame alone would contradict the pose it must reproduce); colour jitter stays
on the driving frame alone, which is what makes E_mot ignore appearance.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from engine.config import ModelConfig
from engine.controls import POSE_SCALE
from engine.errors import InputError
from trainer.config import AugmentConfig, StageConfig

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FACTOR_KEYS = ("pose", "eyes", "mouth", "expression")
POSE_OFFSET = np.array([0, 0, 0, 0, 0, 1.0], np.float32)  # latent = (value - offset) / POSE_SCALE
CACHE_VERSION = 1
EYE_BOX = (0.28, 0.50, 0.18, 0.82)  # fallback eye region (top, bottom, left, right) of an aligned face crop
NEUTRAL_EXPRESSION = 0.05  # a frame whose expression vector's max is below this is "neutral"


# ============================================================================================ clips
@dataclass(frozen=True)
class ClipRef:
    split: str
    identity: str
    name: str
    video: Path
    audio: Path | None
    factors: Path | None
    meta: Path | None

    @property
    def key(self) -> str:
        return f"{self.split}/{self.identity}/{self.name}"


def list_clips(data: Path, split: str = "train") -> list[ClipRef]:
    """Clips of `split` under `data` (DIR/<split>/<identity>/<clip>.mp4), sorted. A directory without
    split folders is read as one split (DIR/<identity>/<clip>.mp4)."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"training data {data} is not a directory (expected DIR/<split>/<identity>/<clip>.mp4)")
    root = data / split
    if not root.is_dir():
        if any((data / s).is_dir() for s in SPLITS):
            return []
        root = data  # no split folders: the whole directory is the split
    out = []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        for video in sorted(ident.glob("*.mp4")):
            stem = video.with_suffix("")

            def opt(ext: str, stem: Path = stem) -> Path | None:
                p = stem.with_suffix(ext)
                return p if p.is_file() else None

            out.append(ClipRef(split=split, identity=ident.name, name=video.stem, video=video, audio=opt(".wav"),
                               factors=opt(".npz"), meta=opt(".json")))
    return out


@dataclass
class Clip:
    """A decoded clip. frames (T, S, S, 3) uint8 (maybe memory-mapped); mel (M, n_mels) float32;
    windows (T, n_mels, W) the lip encoder's mel window of every frame; active (T,) bool voice activity;
    factors {group: (T, D)} + "expression_preset" (T,) int + "expression_intensity" (T,) or None."""

    ref: ClipRef
    frames: np.ndarray
    mel: np.ndarray
    windows: np.ndarray
    active: np.ndarray
    fps: float
    factors: dict[str, np.ndarray] | None
    identity_params: np.ndarray | None

    @property
    def n(self) -> int:
        return len(self.frames)


@contextlib.contextmanager
def _video_stream(path: Path, verb: str):
    """`path`'s container, its first video stream and its frame rate; a missing stream or an FFmpeg error,
    here or in the block, as an InputError ("cannot <verb> video ...")."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise InputError(f"{path} has no video stream")
            st = c.streams.video[0]
            yield c, st, float(st.average_rate) if st.average_rate else 25.0
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot {verb} video {path}: {e}") from None


def _probe_video(path: Path) -> tuple[int, float]:
    """(frame count, fps) of `path`'s video stream: from the container's header where it says, else by
    demuxing its packets (no decoding)."""
    with _video_stream(path, "read") as (c, st, fps):
        n = int(st.frames or 0) or sum(1 for p in c.demux(st) if p.size)
    if n <= 0:
        raise InputError(f"video {path} has no frames")
    return n, fps


def _decode_video(path: Path, size: int) -> tuple[np.ndarray, float]:
    """All frames of `path` as (T, size, size, 3) uint8 (centre-cropped to square, antialiased resize) + fps."""
    frames = []
    with _video_stream(path, "decode") as (c, st, fps):
        for fr in c.decode(st):
            frames.append(fr.to_ndarray(format="rgb24"))
    if not frames:
        raise InputError(f"video {path} has no frames")
    x = np.stack(frames)
    h, w = x.shape[1:3]
    if h != w:
        m = min(h, w)
        y0, x0 = (h - m) // 2, (w - m) // 2
        x = x[:, y0:y0 + m, x0:x0 + m]
    if x.shape[1] != size:
        out = []
        for i in range(0, len(x), 64):
            t = torch.from_numpy(np.ascontiguousarray(x[i:i + 64])).permute(0, 3, 1, 2).float()
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out.append(t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
        x = np.concatenate(out)
    return np.ascontiguousarray(x), fps


def _read_factors(path: Path, n: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            out = {k: np.asarray(z[k], np.float32) for k in FACTOR_KEYS if k in z.files}
            missing = [k for k in FACTOR_KEYS if k not in z.files]
            if missing:
                raise InputError(f"{path}: factor table lacks {missing} (has {sorted(z.files)})")
            out["expression_preset"] = (_preset_indices(z["expression_preset"]) if "expression_preset" in z.files
                                        else np.full(len(out["pose"]), -1, np.int64))
            out["expression_intensity"] = (np.asarray(z["expression_intensity"], np.float32)
                                           if "expression_intensity" in z.files
                                           else np.ones(len(out["pose"]), np.float32))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot read factor table {path}: {e}") from None
    return {k: v[:n] for k, v in out.items()}


def _preset_indices(col: np.ndarray) -> np.ndarray:
    """Expression preset column -> indices into `factors.PRESET_NAMES` (-1: unknown); ints or names."""
    from trainer.corpus.factors import PRESET_NAMES

    col = np.asarray(col)
    if col.dtype.kind in "iu":
        return col.astype(np.int64)
    if col.dtype.kind == "f":
        return np.round(col).astype(np.int64)
    lookup = {n: i for i, n in enumerate(PRESET_NAMES)}
    names = [(v.decode() if isinstance(v, bytes) else str(v)).strip().lower() for v in col.tolist()]
    return np.array([lookup.get(n, -1) for n in names], np.int64)


def _identity_params(ref: ClipRef) -> np.ndarray | None:
    """The renderer's identity vector of a synthetic clip's person (clip json or the corpus manifest)."""
    try:
        from trainer.corpus.face_identity import IDENTITY_DIM
    except ImportError:  # pragma: no cover
        return None

    def pick(doc):
        if not isinstance(doc, dict):
            return None
        for key in ("identity_vector", "identity_params", "identity"):
            v = doc.get(key)
            if isinstance(v, dict):
                v = v.get("vector", v.get("params"))
            if isinstance(v, list) and len(v) == IDENTITY_DIM:
                return np.asarray(v, np.float32)
        return None

    docs = []
    if ref.meta is not None:
        docs.append(ref.meta)
    for p in docs:
        try:
            v = pick(json.loads(p.read_text()))
        except (OSError, ValueError):
            v = None
        if v is not None:
            return v
    man = ref.video.parent.parent.parent / "manifest.json"
    if man.is_file():
        try:
            ids = json.loads(man.read_text()).get("identities")
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(ids, dict):
            return pick(ids.get(ref.identity))
        if isinstance(ids, list):
            for d in ids:
                if isinstance(d, dict) and str(d.get("name", d.get("id"))) == ref.identity:
                    return pick(d)
    return None


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ClipStore:
    """Loads clips at the model's size, through an on-disk .npy cache (optional) and an in-memory LRU.

    frames=False: the stages that read only the sound and the factor tables (the built-in's `audio`, and `idle`
    with factor tables) get clips whose `frames` is (T, 0, 0, 3): the video is only probed for its frame rate
    and frame count, not decoded and resized (for the built-in's speech corpus that was 3 minutes of its
    `audio` stage and a 7 GB cache of 256 px frames upscaled from 64)."""

    def __init__(self, cfg: ModelConfig, cache_dir: Path | None = None, lru: int = 16, frames: bool = True):
        self.cfg = cfg
        self.frames = bool(frames)
        # frames, mel, activity: no lookahead in them
        sub = f"v{CACHE_VERSION}_{cfg.image_size}px" if frames else f"v{CACHE_VERSION}_sound"
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / sub
        self.lru = max(1, int(lru))
        self._mem: OrderedDict[str, Clip] = OrderedDict()

    def _paths(self, ref: ClipRef) -> dict[str, Path] | None:
        if self.cache_dir is None:
            return None
        d = self.cache_dir / ref.split / ref.identity
        return {k: d / f"{ref.name}.{k}.npy" for k in ("frames" if self.frames else "nframes", "mel", "active", "fps")}

    def get(self, ref: ClipRef) -> Clip:
        clip = self._mem.get(ref.key)
        if clip is not None:
            self._mem.move_to_end(ref.key)
            return clip
        clip = self._load(ref)
        self._mem[ref.key] = clip
        while len(self._mem) > self.lru:
            self._mem.popitem(last=False)
        return clip

    def _load(self, ref: ClipRef) -> Clip:
        from engine.audio import load_audio, log_mel, mel_windows, voice_activity

        paths = self._paths(ref)
        if paths is not None and all(p.is_file() for p in paths.values()):
            if self.frames:
                frames = np.load(paths["frames"], mmap_mode="r")
            else:
                frames = np.zeros((int(np.load(paths["nframes"])[0]), 0, 0, 3), np.uint8)
            mel = np.load(paths["mel"])
            active = np.load(paths["active"])
            fps = float(np.load(paths["fps"])[0])
        else:
            if self.frames:
                frames, fps = _decode_video(ref.video, self.cfg.image_size)
            else:
                n_frames, fps = _probe_video(ref.video)
                frames = np.zeros((n_frames, 0, 0, 3), np.uint8)
            samples = load_audio(ref.audio if ref.audio is not None else ref.video, self.cfg.audio.sample_rate)
            mel = log_mel(samples, self.cfg.audio).numpy()
            active = voice_activity(samples, fps, self.cfg.audio.sample_rate, n_frames=len(frames))
            if paths is not None:
                first = ("frames", frames) if self.frames else ("nframes", np.array([len(frames)]))
                for k, v in (first, ("mel", mel), ("active", active), ("fps", np.array([fps]))):
                    _save_npy(paths[k], v)
        factors = None
        n = len(frames)
        if ref.factors is not None:
            factors = _read_factors(ref.factors, n)
            n = min(n, *(len(v) for v in factors.values()))
            factors = {k: v[:n] for k, v in factors.items()}
        fps_arg = None if abs(fps - self.cfg.fps) < 1e-6 else fps
        windows = mel_windows(torch.from_numpy(np.asarray(mel)), self.cfg, n, fps=fps_arg).numpy()
        ident = _identity_params(ref) if factors is not None else None
        return Clip(ref=ref, frames=frames[:n], mel=np.asarray(mel), windows=windows,
                    active=np.asarray(active[:n], bool), fps=fps, factors=factors, identity_params=ident)


# ===================================================================================== augmentation
def to_float(frames_u8: np.ndarray) -> torch.Tensor:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32 in [-1, 1]."""
    t = torch.from_numpy(np.array(frames_u8, dtype=np.uint8, copy=True)).float().div_(127.5).sub_(1.0)
    return t.movedim(-1, -3)


def color_jitter(x: torch.Tensor, rng: np.random.Generator, aug: AugmentConfig) -> torch.Tensor:
    """(3,S,S) or (N,3,S,S) in [-1,1]: brightness, contrast, saturation and hue (YIQ rotation), one draw."""
    y = (x + 1) * 0.5
    b = 1 + rng.uniform(-aug.brightness, aug.brightness)
    c = 1 + rng.uniform(-aug.contrast, aug.contrast)
    s = 1 + rng.uniform(-aug.saturation, aug.saturation)
    h = rng.uniform(-aug.hue, aug.hue) * 2 * math.pi
    y = y * b
    mean = y.mean(dim=(-3, -2, -1), keepdim=True)
    y = (y - mean) * c + mean
    gray = (0.299 * y[..., 0:1, :, :] + 0.587 * y[..., 1:2, :, :] + 0.114 * y[..., 2:3, :, :])
    y = gray + (y - gray) * s
    if h:
        to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
        rot = torch.tensor([[1, 0, 0], [0, math.cos(h), -math.sin(h)], [0, math.sin(h), math.cos(h)]],
                           dtype=torch.float32)
        m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
        y = torch.einsum("ij,...jhw->...ihw", m, y)
    return (y.clamp(0, 1) * 2 - 1).contiguous()


def affine_params(rng: np.random.Generator, rotate_deg: float, scale: float, translate: float) -> np.ndarray:
    r = math.radians(rng.uniform(-rotate_deg, rotate_deg))
    s = 1 + rng.uniform(-scale, scale)
    tx, ty = rng.uniform(-translate, translate, size=2) * 2  # grid units are 2 per image
    return np.array([[math.cos(r) / s, -math.sin(r) / s, tx], [math.sin(r) / s, math.cos(r) / s, ty]], np.float32)


def apply_affine(x: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    """(3,S,S) or (N,3,S,S) warped by the 2x3 `theta` (output -> input, affine_grid units), border padding."""
    single = x.dim() == 3
    xb = x.unsqueeze(0) if single else x
    th = torch.from_numpy(theta).unsqueeze(0).expand(len(xb), 2, 3)
    grid = F.affine_grid(th, list(xb.shape), align_corners=False)
    out = F.grid_sample(xb, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0] if single else out


# ======================================================================================== masks
_RENDERERS: dict[int, object] = {}


def eye_mask(clip: Clip, idx: int, size: int) -> torch.Tensor:
    """(1,S,S) float eye-region mask of frame `idx`: exact from the corpus renderer when the clip's json holds
    its identity parameters and the clip has a pose table, else a fixed band of an aligned face crop."""
    if clip.identity_params is not None and clip.factors is not None:
        try:
            from trainer.corpus.face import IDENTITY_DIM, FaceRenderer

            if clip.identity_params.shape == (IDENTITY_DIM,):
                r = _RENDERERS.get(size)
                if r is None:
                    r = _RENDERERS[size] = FaceRenderer(size)
                m = r.region_mask(clip.identity_params[None], clip.factors["pose"][idx:idx + 1], "eyes")
                return m[0].float()
        except (ImportError, InputError):
            pass
    top, bottom, left, right = EYE_BOX
    m = torch.zeros(1, size, size)
    m[:, int(top * size):int(math.ceil(bottom * size)), int(left * size):int(math.ceil(right * size))] = 1.0
    return m


# ==================================================================================== datasets
def _factor_row(clip: Clip, i: int) -> dict[str, torch.Tensor]:
    """Supervision of frame i: pose latent (6), eyes (4), mouth (3), expression (6), preset, neutral flag."""
    if clip.factors is None:
        return {"has_factors": torch.tensor(False), "pose": torch.zeros(6), "eyes": torch.zeros(4),
                "mouth": torch.zeros(3), "expression": torch.zeros(6), "preset": torch.tensor(-1),
                "neutral": torch.tensor(False)}
    f = clip.factors
    pose = (f["pose"][i] - POSE_OFFSET) / POSE_SCALE
    expr = f["expression"][i]
    return {"has_factors": torch.tensor(True), "pose": torch.from_numpy(pose.astype(np.float32)),
            "eyes": torch.from_numpy(f["eyes"][i].copy()), "mouth": torch.from_numpy(f["mouth"][i].copy()),
            "expression": torch.from_numpy(expr.copy()), "preset": torch.tensor(int(f["expression_preset"][i])),
            "neutral": torch.tensor(bool(float(np.max(expr)) < NEUTRAL_EXPRESSION))}


def motion_targets(clip: Clip, start: int, n: int) -> np.ndarray:
    """(n, 10) idle-model targets from the factor table: pose latent (6) + [gaze_x, gaze_y, lid_l, lid_r]."""
    f = clip.factors
    pose = (f["pose"][start:start + n] - POSE_OFFSET) / POSE_SCALE
    return np.concatenate([pose, f["eyes"][start:start + n]], axis=1).astype(np.float32)


def frame_mel(clip: Clip, cfg: ModelConfig, start: int, n: int) -> np.ndarray:
    """(n, n_mels) mean log-mel of each video frame's own mel frames (the idle model's audio input);
    frames past the audio are silence."""
    k = cfg.mel_per_frame
    hop_s = cfg.audio.hop_length / cfg.audio.sample_rate
    out = np.full((n, cfg.audio.n_mels), math.log(cfg.audio.log_floor), np.float32)
    for j in range(n):
        a = int(round((start + j) / clip.fps / hop_s))
        seg = clip.mel[a:a + k]
        if len(seg):
            out[j] = seg.mean(0)
    return out


class StageDataset(Dataset):
    """Items for one stage (`kind` in motion | factors | expression | idle); see the module docstring.

    Every item holds tensors only (default collation). Images are (3,S,S) float in [-1, 1]."""

    LENGTH = 2 ** 62

    def __init__(self, clips: list[ClipRef], cfg: ModelConfig, kind: str, stage: StageConfig,
                 augment: AugmentConfig, seed: int, store: ClipStore):
        if not clips:
            raise InputError("no training clips found (expected DIR/train/<identity>/<clip>.mp4)")
        if kind not in ("motion", "factors", "expression", "idle", "audio"):
            raise ValueError(f"unknown dataset kind {kind!r}")
        self.clips = list(clips)
        self.cfg, self.kind, self.stage, self.aug, self.seed, self.store = cfg, kind, stage, augment, int(seed), store
        self.motion_table: dict[str, np.ndarray] | None = None  # idle targets for clips without factor tables
        if kind == "idle":
            with_f = [c for c in self.clips if c.factors is not None]
            self.pseudo = not with_f  # no factor tables anywhere: targets from E_pose / E_eye of the frames
            self.clips = with_f or self.clips

    def __len__(self) -> int:
        return self.LENGTH

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(index)])
        clip = self.store.get(self.clips[int(rng.integers(len(self.clips)))])
        return getattr(self, f"_{self.kind}")(clip, rng)

    # ---- helpers
    def _pair(self, clip: Clip, rng: np.random.Generator) -> tuple[int, int]:
        n = clip.n
        b = int(rng.integers(n))
        a = int(rng.integers(n - 1)) if n > 1 else 0
        if n > 1 and a >= b:
            a += 1
        return a, b

    def _common(self, clip: Clip, a: int, b: int) -> dict[str, torch.Tensor]:
        item = {"source": to_float(clip.frames[a]), "target": to_float(clip.frames[b]),
                "mel": torch.from_numpy(np.ascontiguousarray(clip.windows[b])),
                "active": torch.tensor(bool(clip.active[b]))}
        item.update(_factor_row(clip, b))
        return item

    # ---- stages
    def _motion(self, clip: Clip, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        a, b = self._pair(clip, rng)
        item = self._common(clip, a, b)
        theta = affine_params(rng, self.aug.rotate_deg, self.aug.scale, self.aug.translate)
        target = apply_affine(item["target"], theta)
        item["target"] = target
        item["driving"] = color_jitter(target, rng, self.aug)
        return item

    def _factors(self, clip: Clip, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        a, b = self._pair(clip, rng)
        item = self._common(clip, a, b)
        item["driving"] = color_jitter(item["target"], rng, self.aug)  # colour only: keeps the pose labels
        n, k, gap = clip.n, self.stage.n_negatives, self.stage.min_offset
        far = np.flatnonzero(np.abs(np.arange(n) - b) >= gap)
        if len(far) == 0:
            far = np.flatnonzero(np.arange(n) != b) if n > 1 else np.array([b])
        neg = rng.choice(far, size=k, replace=len(far) < k)
        item["neg_mel"] = torch.from_numpy(np.ascontiguousarray(clip.windows[neg]))  # (K, n_mels, W)
        item["neg_frames"] = to_float(clip.frames[neg])  # (K,3,S,S), the frames of the unsynced windows
        # eye swap: frame c of the same clip with eyes as different from b's as we can find
        cand = rng.choice(n, size=min(n, 8), replace=False)
        if clip.factors is not None:
            e = clip.factors["eyes"]
            c = int(cand[np.argmax(np.abs(e[cand] - e[b]).sum(1))])
        else:
            c = int(cand[0])
        s = self.cfg.image_size
        mask = torch.maximum(eye_mask(clip, b, s), eye_mask(clip, c, s))
        other = to_float(clip.frames[c])
        item["eye_other"] = other
        item["eye_anchor"] = item["target"] * (1 - mask) + other * mask  # b everywhere but c's eye region
        item["eye_mask"] = mask
        return item

    def _expression(self, clip: Clip, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        a, b = self._pair(clip, rng)
        item = self._common(clip, a, b)
        w = self.stage.window
        idx = np.clip(np.arange(b - w // 2, b - w // 2 + w), 0, clip.n - 1)
        win = to_float(clip.frames[idx])  # (w,3,S,S)
        out = []
        for j in range(w):  # PD-FGC sec. 3.3: each window frame rotated, scaled and colour-jittered
            th = affine_params(rng, self.aug.window_rotate_deg, self.aug.window_scale, 0.0)
            out.append(color_jitter(apply_affine(win[j], th), rng, self.aug))
        item["window"] = torch.stack(out)
        return item

    def _audio(self, clip: Clip, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A frame's mel window and its ground-truth mouth (the built-in recipe's E_aud regression)."""
        for _ in range(32):
            if clip.factors is not None:
                break
            clip = self.store.get(self.clips[int(rng.integers(len(self.clips)))])
        else:
            raise InputError("the audio stage needs clips with factor tables (the synthetic corpus' .npz)")
        b = int(rng.integers(clip.n))
        return {"mel": torch.from_numpy(np.ascontiguousarray(clip.windows[b])),
                "mouth": torch.from_numpy(np.ascontiguousarray(clip.factors["mouth"][b], dtype=np.float32))}

    def _idle(self, clip: Clip, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        L = self.stage.ref_frames + self.stage.seq_frames
        for _ in range(32):  # clips shorter than the sequence are skipped (another draw)
            if clip.n >= L:
                break
            clip = self.store.get(self.clips[int(rng.integers(len(self.clips)))])
        else:
            raise InputError(f"the idle stage needs clips of >= {L} frames (ref_frames + seq_frames); "
                             f"found only shorter ones (e.g. {clip.ref.key}: {clip.n} frames)")
        s = int(rng.integers(clip.n - L + 1))
        item = {"audio": torch.from_numpy(frame_mel(clip, self.cfg, s, L))}
        if self.pseudo:
            if self.motion_table is None:
                raise RuntimeError("idle stage on clips without factor tables: set motion_table first "
                                   "(trainer.stages.pseudo_motion_table)")
            item["motion"] = torch.from_numpy(np.ascontiguousarray(self.motion_table[clip.ref.key][s:s + L]))
        else:
            item["motion"] = torch.from_numpy(motion_targets(clip, s, L))
        return item


class StepSampler(Sampler[int]):
    """Infinite index stream for a DataLoader with `batch_size=batch`: step s of rank r draws the indices
    (s * world + r) * batch + j, j < batch, starting at step `start`."""

    def __init__(self, batch: int, start: int = 0, rank: int = 0, world: int = 1):
        self.batch, self.start, self.rank, self.world = int(batch), int(start), int(rank), int(world)

    def __iter__(self) -> Iterator[int]:
        s = self.start
        while True:
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)
            s += 1

    def __len__(self) -> int:  # pragma: no cover - infinite
        return StageDataset.LENGTH


def make_loader(ds: StageDataset, batch: int, start_step: int, rank: int, world: int, workers: int,
                pin: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    from torch.utils.data import DataLoader

    dl = DataLoader(ds, batch_size=batch, sampler=StepSampler(batch, start_step, rank, world),
                    num_workers=workers, pin_memory=pin, persistent_workers=False,
                    prefetch_factor=2 if workers > 0 else None)
    return iter(dl)
