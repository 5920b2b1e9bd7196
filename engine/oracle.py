"""The factor oracle's network: a small CNN that reads factor groups (pose, eyes, mouth, expression, in the
synthetic corpus' units) back from a frame, and its files.

Trained by `trainer.oracle` (which owns the corpus' factor table and the training); it ships with the
built-in checkpoint (`<checkpoint>/oracle/`). Two users: `marionette evaluate` (its yardstick) and the
per-avatar jaw calibration (`engine.jaw_map`), which reads how far G opens each portrait's mouth. The
columns and their ranges are stored in its oracle.json, so loading it here needs no corpus code.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import ORACLE_FILES
from engine.errors import InputError

FORMAT = 1
WEIGHTS, CONFIG = ORACLE_FILES  # oracle.safetensors, oracle.json
ORACLE_SUBDIR = "oracle"


# =================================================================================== network
@dataclass(frozen=True)
class OracleNetConfig:
    """size: the frame size the oracle works at (inputs of any square size are resized to it);
    channels: widths of the stride-2 stages after the stem; embed_dim: the global embedding's size; stem_stride:
    the stem's stride (1 at 128 px; 2 at 256 px reads the native corpus frames for about the same compute).
    regions: also read crops of both eyes (with the brows) and the mouth, `region_size` px each, taken from the
    input at its own resolution (256 px frames: about native detail) where the global branch locates the eyes
    and the mouth (`REGION_ANCHORS`); region_channels / region_dim: the crops' CNN and their embedding. Gaze,
    mouth width and rounding move a few pixels of a 128 px frame; the crops see them at 2x."""

    size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    embed_dim: int = 256
    stem_stride: int = 1
    regions: bool = False
    region_size: int = 48
    region_channels: tuple[int, ...] = (16, 32, 64, 96)
    region_dim: int = 128

    def __post_init__(self):
        if self.regions:
            kr = 2 ** len(self.region_channels)
            if self.region_size < 16 or self.region_size % kr:
                raise InputError(f"oracle region_size must be >= 16 and divisible by {kr}, got {self.region_size!r}")
        k = self.stem_stride * 2 ** len(self.channels)
        if not isinstance(self.size, int) or self.size < 32 or self.size % k:
            raise InputError(f"oracle size must be an integer >= 32 divisible by {k}, got {self.size!r}")
        if self.stem_stride not in (1, 2, 4):
            raise InputError(f"oracle stem_stride must be 1, 2 or 4, got {self.stem_stride!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OracleNetConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise InputError(f"unknown oracle config fields {sorted(set(d) - known)}")
        if "channels" in d:
            d["channels"] = tuple(int(c) for c in d["channels"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(min(8, cout // 4), cout),
                         nn.SiLU())


def _region_net(cfg: OracleNetConfig) -> nn.Sequential:
    """A crop (B, 3, r, r) -> (B, region_dim): stem + stride-2 stages, flatten, linear."""
    ch = cfg.region_channels
    layers = [_conv(3, ch[0], 1)]
    cin = ch[0]
    for c in ch:
        layers += [_conv(cin, c, 2), _conv(c, c, 1)]
        cin = c
    side = cfg.region_size // 2 ** len(ch)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(cin * side * side, cfg.region_dim), nn.SiLU())


# Crop geometry, in units of the distance d between the eyes, along the eye line u (towards the left eye) and
# its normal n (down the face): (offset along n of the crop's centre, crop side). The eye crop reaches from
# 0.7 d above the eye (the brow) to 0.3 d below it (squint, cheek); the mouth crop spans 1.2 d around a point
# 0.25 d below the mouth centre (a wide smile, the lower lip of an open jaw).
EYE_CROP = (-0.2, 1.0)
MOUTH_CROP = (0.25, 1.2)
REGION_ANCHORS = ("right_eye", "left_eye", "mouth")


def region_crops(x: torch.Tensor, anchors: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Crops of frames x (B, C, H, W) (square) at anchors (B, 3, 2) (right eye, left eye, mouth centre; grid
    coordinates, x right, y down, -1..1) -> three (B, C, size, size): right eye, left eye mirrored (so that it
    looks like a right eye), mouth. Each is a rotated square aligned with the eye line and scaled by the eye
    distance (`EYE_CROP`, `MOUTH_CROP`), so that roll, scale and position do not change what a crop shows."""
    a = anchors.to(x)
    v = a[:, 1] - a[:, 0]  # (B, 2) right eye -> left eye
    d = v.norm(dim=1, keepdim=True).clamp(min=1e-3)  # (B, 1)
    u = v / d
    n = torch.stack([-u[:, 1], u[:, 0]], 1)  # (B, 2) down the face when u points right

    def crop(centre, off_side, flip):
        off, side = off_side
        c = centre + off * d * n  # (B, 2)
        half = 0.5 * side * d
        ux = -u if flip else u
        theta = torch.stack([half * ux, half * n, c], 2)  # (B, 2, 3): output (x, y, 1) -> input (x, y)
        grid = F.affine_grid(theta, [len(x), x.shape[1], size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return crop(a[:, 0], EYE_CROP, False), crop(a[:, 1], EYE_CROP, True), crop(a[:, 2], MOUTH_CROP, False)


class FactorOracle(nn.Module):
    """Regressor frame -> factor groups. Input (B, 3, H, W) in [0, 1] (resized to `cfg.size`).

    Stem (full resolution) + len(channels) stride-2 stages -> flatten -> embedding e (B, embed_dim)
    -> linear -> normalised factors y in ~[0, 1] ((value - low) / (high - low) per column, the corpus'
    ranges) -> units. `forward` gives {group: (B, D)} in the units of `factors.FACTOR_GROUPS`.

    With `cfg.regions`: e also gives the anchors a (B, 3, 2) (right eye, left eye, mouth centre, grid_sample
    coordinates, as `trainer.corpus.face.anchor_points`); crops of both eyes and the mouth, oriented and scaled
    by the eye line (`region_crops`, computed, not learned), are read at the input's resolution by two small
    CNNs (the left eye mirrored so both eyes share one), and y comes from [e, eye_r, eye_l, mouth].
    """

    def __init__(self, cfg: OracleNetConfig, columns: Sequence[str], low: Sequence[float], high: Sequence[float]):
        super().__init__()
        self.cfg = cfg
        self.columns = tuple(str(c) for c in columns)  # "group.name", the output's column order
        if not self.columns or len(low) != len(self.columns) or len(high) != len(self.columns):
            raise InputError(f"oracle: {len(self.columns)} columns but {len(low)} lows and {len(high)} highs")
        n_out = len(self.columns)
        ch = cfg.channels
        layers = [_conv(3, ch[0], cfg.stem_stride)]
        cin = ch[0]
        for c in ch:
            layers += [_conv(cin, c, 2), _conv(c, c, 1)]
            cin = c
        self.body = nn.Sequential(*layers)
        side = cfg.size // (cfg.stem_stride * 2 ** len(ch))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, cfg.embed_dim), nn.SiLU())
        head_in = cfg.embed_dim
        if cfg.regions:
            self.anchor_head = nn.Linear(cfg.embed_dim, 6)
            self.eye_net = _region_net(cfg)
            self.mouth_net = _region_net(cfg)
            head_in += 3 * cfg.region_dim
        self.head = nn.Linear(head_in, n_out)
        lo, hi = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.register_buffer("low", torch.from_numpy(lo.copy()), persistent=False)
        self.register_buffer("span", torch.from_numpy(hi - lo), persistent=False)
        with torch.no_grad():  # start at the middle of every range
            self.head.bias.fill_(0.5)

    def _input(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) or (3, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1] on the oracle's device, at its own size."""
        if frames.dim() == 3:
            frames = frames.unsqueeze(0)
        if frames.dim() != 4 or frames.shape[1] != 3:
            raise InputError(f"oracle frames must be (B, 3, H, W) in [0, 1], got {tuple(frames.shape)}")
        p = self.head.weight
        return frames.to(device=p.device, dtype=p.dtype) * 2.0 - 1.0

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        """`_input` frames (B, 3, H, W) -> the global embedding e (B, embed_dim), read at `cfg.size`."""
        s = self.cfg.size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return self.embed(self.body(x))

    def anchors(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, 2) where the oracle finds the right eye, the left eye and the mouth centre
        (grid_sample coordinates). Needs `cfg.regions`."""
        if not self.cfg.regions:
            raise InputError("this oracle has no region branch (OracleNetConfig.regions=False)")
        return self.anchor_head(self._global(self._input(frames))).view(-1, 3, 2)

    def features_and_anchors(self, frames: torch.Tensor, anchors: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) in [0, 1] -> (penultimate embedding (B, embed_dim [+ 3 * region_dim]), the anchors it
        finds (B, 3, 2) or None without regions). The crops are taken at `anchors` (B, 3, 2) where given and
        finite (training: the renderer's), elsewhere where the oracle finds them."""
        x = self._input(frames)  # (B, 3, H, W)
        e = self._global(x)  # (B, embed_dim)
        if not self.cfg.regions:
            return e, None
        found = self.anchor_head(e).view(-1, 3, 2)  # (B, 3, 2)
        a = found
        if anchors is not None:
            anchors = anchors.to(e)
            a = torch.where(torch.isfinite(anchors), anchors, found.detach())
        eye_r, eye_l, mouth = region_crops(x, a, self.cfg.region_size)
        n = len(e)
        eyes = self.eye_net(torch.cat([eye_r, eye_l]))  # (2B, region_dim)
        return torch.cat([e, eyes[:n], eyes[n:], self.mouth_net(mouth)], 1), found

    def features(self, frames: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> penultimate embedding (B, embed_dim [+ 3 * region_dim])."""
        return self.features_and_anchors(frames, anchors)[0]

    def normalised(self, frames: torch.Tensor, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, columns) factors as fractions of their ranges (`self.columns`)."""
        return self.head(self.features(frames, anchors))

    def flat(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, columns) factors in units (`self.columns`)."""
        return self.low + self.span * self.normalised(frames)

    def column(self, name: str) -> int:
        """Where column "group.name" (e.g. "mouth.jaw_open") sits in `flat`'s output."""
        try:
            return self.columns.index(name)
        except ValueError:
            raise InputError(f"this oracle reads no {name!r} (its columns: {', '.join(self.columns)})") from None

    def group_slices(self) -> dict[str, slice]:
        """Where each factor group ("pose", "eyes", ...) sits in `flat`'s output (a group's columns are adjacent)."""
        out: dict[str, slice] = {}
        for i, c in enumerate(self.columns):
            g = c.split(".")[0]
            out[g] = slice(out[g].start if g in out else i, i + 1)
        return out

    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> {"pose": (B, 6), "eyes": (B, 4), "mouth": (B, 3), "expression": (B, 6)}."""
        y = self.flat(frames)
        return {g: y[:, s] for g, s in self.group_slices().items()}


@torch.no_grad()
def read_factors(oracle: FactorOracle, frames: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Run the oracle over (N, 3, H, W) frames in [0, 1] in batches -> (N, columns) float32 numpy (units)."""
    was = oracle.training
    oracle.eval()
    out = []
    for i in range(0, len(frames), batch_size):
        out.append(oracle.flat(frames[i:i + batch_size]).float().cpu())
    oracle.train(was)
    if not out:
        return np.zeros((0, len(oracle.columns)), np.float32)
    return torch.cat(out).numpy()


# =================================================================================== save / load
def save_oracle(oracle: FactorOracle, path: Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the oracle to the directory `path` (safetensors + JSON, atomically). Returns the directory."""
    from safetensors.torch import save_file

    from engine.checkpoint import atomic_write

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in oracle.state_dict().items()}
    low = oracle.low.detach().cpu().numpy()
    doc = {"format": FORMAT, "net": oracle.cfg.to_dict(), "columns": list(oracle.columns),
           "low": low.tolist(), "high": (low + oracle.span.detach().cpu().numpy()).tolist(), "meta": dict(meta or {})}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    atomic_write(path / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(path / CONFIG, lambda p: Path(p).write_text(text))
    return path


def load_oracle(path: Path, device: str | torch.device = "cpu") -> tuple[FactorOracle, dict]:
    """Oracle directory (or its oracle.json / oracle.safetensors) -> (oracle in eval mode, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS, CONFIG):
        path = path.parent
    if not path.is_dir():
        raise InputError(f"oracle {path} does not exist (a directory with {WEIGHTS} and {CONFIG}; "
                         "train one with trainer.oracle.train_oracle / `marionette oracle`)")
    for f in (WEIGHTS, CONFIG):
        if not (path / f).is_file():
            raise InputError(f"oracle {path}: missing {f}")
    try:
        doc = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"oracle {path}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InputError(f"oracle {path}: unsupported format {doc.get('format') if isinstance(doc, dict) else doc!r}")
    columns, low, high = doc.get("columns"), doc.get("low"), doc.get("high")
    if not (isinstance(columns, list) and isinstance(low, list) and isinstance(high, list)
            and len(columns) == len(low) == len(high) > 0):
        raise InputError(f"oracle {path}: {CONFIG} lacks its columns and their ranges (low, high)")
    cfg = OracleNetConfig.from_dict(doc.get("net", {}))
    model = FactorOracle(cfg, columns, low, high)
    try:
        state = load_file(str(path / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"oracle {path}: {WEIGHTS} is not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"oracle {path}: weights do not match its config ({e})") from None
    model.to(device).eval()
    return model, dict(doc.get("meta") or {})


def default_oracle_dir(checkpoint_dir: Path | None) -> Path | None:
    """Where the oracle of a checkpoint lives: `<checkpoint>/oracle` (None without a checkpoint)."""
    return None if checkpoint_dir is None else Path(checkpoint_dir) / ORACLE_SUBDIR
