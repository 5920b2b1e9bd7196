"""Per-avatar jaw calibration: each portrait's mouth opens as far as commanded.

G's global jaw calibration (`ModelConfig.jaw_calibration`) matches G's *mean* opening over a few identities to the
renderer's. Per face it varies a lot: for an opening of 0.15 over the portrait's own jaw the factor oracle reads
G's frames at 0.044-0.178 (10th-90th percentile over 20 fresh identities; the renderer's own frames of the same
faces: 0.079-0.136), and the built-in avatar read 0.023: a thin line of lips through most of real speech
(`benchmarks/jaw_map.py`; README "The mouth per avatar").

So, once per avatar, with `ModelConfig.avatar_jaw_map` on: G makes the portrait at a grid of jaw openings relative
to its own (`GRID`, everything else the portrait's state), the factor oracle (`engine.oracle`, shipped with the
built-in checkpoint) reads how far each frame's mouth is open, and a monotone piecewise-linear map (`JawMap`) takes
each commanded opening d to the d' at which this avatar's frames read as open as the renderer's frames do at d
(`REFERENCE`). The runtime applies it to the jaw of every z for that avatar (`JawCalibrated`): nothing changes in
the graphs, nothing per frame but a table lookup. Closing below the portrait's own jaw is left as commanded.

The cost is one batch of len(GRID) frames and oracle readings per avatar (~0.5 s on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

JAW_COLUMN = "mouth.jaw_open"
# openings relative to the portrait's own jaw at which G is read
GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.55, 0.7)
# the oracle's reading of the renderer's own frames at GRID, relative to the same face shut: the mean over 24
# fresh identities (seeds [4242, i]) with the built-in oracle. The renderer's lips part only past ~0.05.
# tests/test_jaw_map.py measures it again.
REFERENCE = (0.0, 0.004, 0.05, 0.11, 0.161, 0.265, 0.362, 0.544, 0.68)
MIN_SPAN = 0.1  # the oracle must see the mouth open at least this far across GRID, else the avatar gets no map
MAX_EXTRA = 0.3  # a commanded opening is never raised by more than this ...
MIN_SHARE = 0.6  # ... nor lowered below this share of itself


@dataclass(frozen=True)
class JawMap:
    """A commanded jaw opening -> the jaw to give G for this avatar.

    source: the portrait's own jaw (its state as G is told it, the openings' zero); knots: (d, d') pairs of
    openings relative to it, both increasing, from (0, 0). Between knots: linear; past the last: d' = d plus the
    last knot's difference; at or below the source (closing a mouth): unchanged."""

    source: float
    knots: tuple[tuple[float, float], ...]

    def __post_init__(self):
        d = np.asarray([k[0] for k in self.knots], np.float32)
        e = np.asarray([k[1] for k in self.knots], np.float32)
        if len(d) < 2 or d[0] != 0.0 or e[0] != 0.0 or (np.diff(d) <= 0).any() or (np.diff(e) < 0).any():
            raise ValueError(f"JawMap knots must start at (0, 0) and increase, got {self.knots}")
        object.__setattr__(self, "_x", d)  # the knots as arrays once, not per frame
        object.__setattr__(self, "_y", e)

    def apply(self, jaw: np.ndarray) -> np.ndarray:
        """Commanded jaw openings (any shape) -> the jaws to give G."""
        jaw = np.asarray(jaw, np.float32)
        d = jaw - self.source
        x, y = self._x, self._y
        mapped = np.where(d > x[-1], d + (y[-1] - x[-1]), np.interp(d, x, y)).astype(np.float32)
        return np.where(d > 0, self.source + mapped, jaw).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "knots": [list(k) for k in self.knots]}


def fit_jaw_map(source: float, readings, grid=GRID, reference=REFERENCE) -> JawMap | None:
    """G's oracle readings at `source + grid` (the first: the portrait's own jaw) -> the map, or None where the
    oracle does not see the mouth open (a span under MIN_SPAN: a face it cannot read)."""
    g = np.asarray(grid, np.float64)
    rel = np.asarray(readings, np.float64) - float(readings[0])
    m = np.maximum.accumulate(rel)  # monotone, for the inverse
    if m[-1] < MIN_SPAN:
        return None
    knots = [(0.0, 0.0)]
    for d, target in zip(g[1:], np.asarray(reference, np.float64)[1:]):
        if target >= m[-1]:
            d2 = g[-1]
        else:
            i = max(1, int(np.searchsorted(m, target, side="left")))
            lo, hi = m[i - 1], m[i]
            d2 = g[i - 1] + (g[i] - g[i - 1]) * ((target - lo) / (hi - lo) if hi > lo else 0.0)
        d2 = float(np.clip(d2, MIN_SHARE * d, d + MAX_EXTRA))
        knots.append((round(float(d), 4), round(max(d2, knots[-1][1]), 4)))
    return JawMap(source=round(float(source), 4), knots=tuple(knots))


def with_jaw_map(avatar, jaw_map: JawMap | None):
    """The avatar carrying `jaw_map` (an AvatarState: a copy; other runtimes' avatars: the attribute set)."""
    if dataclasses.is_dataclass(avatar):
        return dataclasses.replace(avatar, jaw_map=jaw_map)
    avatar.jaw_map = jaw_map
    return avatar


def map_jaws(avatars, z, jaw_index: int):
    """z (B, total) for `avatars` (one for all rows, or one per row) with each row's jaw through its avatar's map;
    z itself (not copied) where no avatar has one."""
    rows = [avatars] if not isinstance(avatars, (list, tuple)) else list(avatars)
    maps = [getattr(a, "jaw_map", None) for a in rows]
    if all(m is None for m in maps):
        return z
    was_torch = isinstance(z, torch.Tensor)
    arr = (z.detach().cpu().numpy() if was_torch else np.asarray(z)).astype(np.float32, copy=True)
    if arr.ndim == 1:
        arr = arr[None]
    if len(maps) == 1:
        maps = maps * len(arr)
    for i, m in enumerate(maps[:len(arr)]):
        if m is not None:
            arr[i, jaw_index] = m.apply(arr[i, jaw_index])
    return torch.from_numpy(arr) if was_torch else arr


class JawCalibrated:
    """A backend whose `prepare_avatar` also measures the avatar's `JawMap` and whose frames apply it; everything
    else is the wrapped backend's."""

    def __init__(self, backend, oracle):
        self.backend = backend
        self.oracle = oracle
        self._jaw = oracle.column(JAW_COLUMN)
        self._lock = threading.Lock()  # the oracle's torch module, for two threads preparing avatars

    def __getattr__(self, item: str):
        return getattr(self.backend, item)

    @property
    def jaw_index(self) -> int:
        return self.backend.cfg.latents.slices()["lip"].start  # lip[0]: the jaw opening

    def source_state(self, avatar) -> np.ndarray:
        """The portrait's own state z_s (1, total), as G is told it (in the avatar's app vector)."""
        cfg = self.backend.cfg
        app = avatar.tensors()[3] if hasattr(avatar, "tensors") else avatar.app
        k = cfg.net.app_dim
        return np.asarray(app[:, k:k + cfg.latents.total].detach().float().cpu().numpy(), np.float32)

    def measure(self, avatar) -> JawMap | None:
        """G's frames of `avatar` at GRID read by the oracle -> its map (None: the oracle cannot read it)."""
        from engine.oracle import read_factors

        zs = self.source_state(avatar)
        src = float(zs[0, self.jaw_index])
        z = np.repeat(zs, len(GRID), axis=0)
        z[:, self.jaw_index] = np.minimum(src + np.asarray(GRID, np.float32), 1.0)
        frames = self.backend.generate(avatar, torch.from_numpy(z))  # (B,3,S,S) in [0,1]
        with self._lock:
            readings = read_factors(self.oracle, torch.as_tensor(frames).float())[:, self._jaw]
        jm = fit_jaw_map(src, readings)
        if jm is None:
            log.info("jaw map: the oracle sees this portrait's mouth open by %.3f at most; commands left as they are",
                     float(np.max(readings - readings[0])))
        else:
            log.info("jaw map: source jaw %.3f, G read %s -> knots %s", src, np.round(readings - readings[0], 3).tolist(),
                     jm.knots)
        return jm

    def prepare_avatar(self, image):
        given = getattr(image, "jaw_map", None)
        avatar = self.backend.prepare_avatar(image)
        if given is not None:  # an avatar measured already (moved between runtimes)
            return with_jaw_map(avatar, given)
        return with_jaw_map(avatar, self.measure(avatar))

    def generate(self, avatars, z):
        return self.backend.generate(avatars, map_jaws(avatars, z, self.jaw_index))

    def generate_body(self, avatars, z):
        return self.backend.generate_body(avatars, map_jaws(avatars, z, self.jaw_index))

    def generate_mouth(self, body, avatars, z):
        return self.backend.generate_mouth(body, avatars, map_jaws(avatars, z, self.jaw_index))

    def describe(self) -> dict[str, Any]:
        return {**self.backend.describe(), "avatar_jaw_map": True}


def calibrated(backend, checkpoint: Path | None = None):
    """`backend` wrapped in `JawCalibrated` when its model asks for it (`ModelConfig.avatar_jaw_map`) and an oracle
    is there to read with (the checkpoint's `oracle/`, else the built-in's; the oracle reads the corpus' factors
    off any frame, whichever model made it); else `backend` itself."""
    from engine.checkpoint import builtin_checkpoint_dir
    from engine.errors import InputError
    from engine.oracle import default_oracle_dir, load_oracle

    if not getattr(backend.cfg, "avatar_jaw_map", False):
        return backend
    dirs = [default_oracle_dir(checkpoint), default_oracle_dir(builtin_checkpoint_dir())]
    for d in dirs:
        if d is not None and d.is_dir():
            try:
                oracle, _ = load_oracle(d)
                return JawCalibrated(backend, oracle)  # InputError too where it reads no jaw
            except InputError as e:
                log.warning("jaw map: %s; avatars keep the commanded jaw", e)
                return backend
    log.warning("jaw map: the model asks for one but no factor oracle is installed; avatars keep the commanded jaw")
    return backend


__all__ = ["GRID", "REFERENCE", "JawMap", "JawCalibrated", "calibrated", "fit_jaw_map", "map_jaws", "with_jaw_map"]
