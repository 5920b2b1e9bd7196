"""Physical controls <-> factor latents.

Pose latent (6) = [yaw/30, pitch/20, roll/15, tx/0.08, ty/0.08, (scale-1)/0.1] (degrees, fractions of
the image size, scale ratio), so the corpus' pose ranges map to about [-1, 1] and all zeros is the
canonical (frontal, centred) head. Eye latent (6) = [gaze_x, gaze_y, lid_left, lid_right, 0, 0]
(gaze -1..1 with +x = subject's left and +y = up; lids 0 = open .. 1 = closed, as the corpus).
Expression latents come from named presets (the checkpoint's `expression_presets`, one vector per
name at intensity 1); a spec "happy:0.8" or a blend "happy:0.5+sad:0.3" is the weighted sum.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from engine.errors import InputError

POSE_SCALE = np.array([30.0, 20.0, 15.0, 0.08, 0.08, 0.1], np.float32)
POSE_FIELDS = ("yaw", "pitch", "roll", "tx", "ty", "scale")
EYE_FIELDS = ("gaze_x", "gaze_y", "lid_left", "lid_right")
INTENSITY_RANGE = (0.0, 2.0)


def pose_latent(yaw=0.0, pitch=0.0, roll=0.0, tx=0.0, ty=0.0, scale=1.0) -> np.ndarray:
    """Physical pose -> pose latent. Scalars give (6,); arrays of the same shape (...) give (..., 6)."""
    yaw, pitch, roll, tx, ty, scale = np.broadcast_arrays(*(np.asarray(v, np.float32)
                                                            for v in (yaw, pitch, roll, tx, ty, scale)))
    phys = np.stack([yaw, pitch, roll, tx, ty, scale - 1.0], axis=-1)
    return (phys / POSE_SCALE).astype(np.float32)


def pose_from_latent(latent) -> dict[str, float | np.ndarray]:
    """Inverse of `pose_latent`: {"yaw", "pitch", "roll", "tx", "ty", "scale"} (floats for a (6,) latent)."""
    z = np.asarray(latent, np.float32)
    if z.shape[-1] != 6:
        raise ValueError(f"pose latent must have 6 values, got shape {z.shape}")
    phys = z * POSE_SCALE
    out = {k: phys[..., i] for i, k in enumerate(POSE_FIELDS)}
    out["scale"] = out["scale"] + 1.0
    return {k: float(v) if np.ndim(v) == 0 else v for k, v in out.items()}


def eye_latent(gaze_x=0.0, gaze_y=0.0, lid_left=0.0, lid_right=0.0) -> np.ndarray:
    """Gaze and lids -> eye latent (6,) (or (..., 6) for arrays); the last two entries are 0."""
    gx, gy, ll, lr = np.broadcast_arrays(*(np.asarray(v, np.float32) for v in (gaze_x, gaze_y, lid_left, lid_right)))
    zeros = np.zeros_like(gx)
    return np.stack([gx, gy, ll, lr, zeros, zeros], axis=-1).astype(np.float32)


def eye_from_latent(latent) -> dict[str, float | np.ndarray]:
    """Inverse of `eye_latent`: {"gaze_x", "gaze_y", "lid_left", "lid_right"}."""
    z = np.asarray(latent, np.float32)
    if z.shape[-1] != 6:
        raise ValueError(f"eye latent must have 6 values, got shape {z.shape}")
    return {k: float(z[..., i]) if z.ndim == 1 else z[..., i] for i, k in enumerate(EYE_FIELDS)}


# --------------------------------------------------------------------------------------- expression
def _preset_vector(name: str, presets: Mapping[str, "np.ndarray | list[float]"]) -> np.ndarray:
    key = name.strip().lower()
    lookup = {k.lower(): k for k in presets}
    if key not in lookup:
        valid = ", ".join(sorted(presets)) or "(none)"
        raise InputError(f"unknown expression preset {name.strip()!r}; valid presets: {valid}")
    return np.asarray(presets[lookup[key]], np.float32)


def _parse_intensity(text: str, term: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"expression {term!r}: intensity {text.strip()!r} is not a number "
                         f"(write preset:intensity, e.g. happy:0.8)") from None
    lo, hi = INTENSITY_RANGE
    if not math.isfinite(v) or not lo <= v <= hi:
        raise InputError(f"expression {term!r}: intensity {v} is outside {lo}..{hi}")
    return v


def parse_expression(spec: str, presets: Mapping[str, "np.ndarray | list[float]"]) -> np.ndarray:
    """"happy", "happy:0.8" or "happy:0.5+sad:0.3" -> expression latent (exp,) float32.

    Each term is preset[:intensity] (intensity 0..2, default 1; names case-insensitive); terms add.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError("empty expression; write preset[:intensity], e.g. happy:0.8, or a blend happy:0.5+sad:0.3")
    total: np.ndarray | None = None
    for term in spec.split("+"):
        if not term.strip():
            raise InputError(f"expression {spec!r} has an empty term (stray '+')")
        name, sep, inten = term.partition(":")
        if not name.strip():
            raise InputError(f"expression term {term.strip()!r} has no preset name")
        vec = _preset_vector(name, presets)
        a = _parse_intensity(inten, term.strip()) if sep else 1.0
        total = a * vec if total is None else total + a * vec
    return total.astype(np.float32)


def expression_vector(expr, presets: Mapping[str, "np.ndarray | list[float]"]) -> np.ndarray:
    """A spec string (see `parse_expression`) or an explicit vector -> (exp,) float32."""
    if isinstance(expr, str):
        return parse_expression(expr, presets)
    return np.asarray(expr, np.float32)


def interpolate_presets(a, b, t: float, presets: Mapping[str, "np.ndarray | list[float]"]) -> np.ndarray:
    """(1 - t) * a + t * b for two expressions (spec strings or vectors); t is clipped to 0..1."""
    t = float(np.clip(t, 0.0, 1.0))
    va, vb = expression_vector(a, presets), expression_vector(b, presets)
    if va.shape != vb.shape:
        raise ValueError(f"expression vectors differ in shape: {va.shape} vs {vb.shape}")
    return ((1.0 - t) * va + t * vb).astype(np.float32)
