"""The factor groups of the synthetic corpus: names, units, ranges and the canonical (neutral) value.

Every per-frame factor the renderer takes and the corpus stores is listed here once; the renderer,
the trajectory generator, the writer (manifest) and the evaluation all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Column:
    name: str
    unit: str
    low: float  # the range the corpus samples from (the renderer accepts a little beyond it)
    high: float
    neutral: float = 0.0


FACTOR_GROUPS: dict[str, tuple[Column, ...]] = {
    # True 3D head rotation (degrees, applied roll*pitch*yaw about the head centre), image-plane
    # translation as a fraction of the image size, and scale relative to the canonical framing.
    "pose": (
        Column("yaw", "deg", -35.0, 35.0),
        Column("pitch", "deg", -22.0, 22.0),
        Column("roll", "deg", -16.0, 16.0),
        Column("tx", "fraction of width", -0.08, 0.08),
        Column("ty", "fraction of height", -0.08, 0.08),
        Column("scale", "ratio", 0.9, 1.1, neutral=1.0),
    ),
    # Gaze: iris offset in the eye opening, -1..1 (x: subject's left is +, y: up is +).
    # Lids: 0 = open, 1 = closed.
    "eyes": (
        Column("gaze_x", "unit", -1.0, 1.0),
        Column("gaze_y", "unit", -1.0, 1.0),
        Column("lid_left", "closure", 0.0, 1.0),
        Column("lid_right", "closure", 0.0, 1.0),
    ),
    # Jaw opening 0 (closed) .. 1 (wide open); width -1 (pursed) .. 1 (stretched); rounding 0..1.
    "mouth": (
        Column("jaw_open", "unit", 0.0, 1.0),
        Column("width", "unit", -1.0, 1.0),
        Column("rounding", "unit", 0.0, 1.0),
    ),
    # Continuous expression vector, each 0..1. Changes slower than speech.
    "expression": (
        Column("brow_raise", "unit", 0.0, 1.0),
        Column("brow_furrow", "unit", 0.0, 1.0),
        Column("smile", "unit", 0.0, 1.0),
        Column("frown", "unit", 0.0, 1.0),
        Column("cheek_raise", "unit", 0.0, 1.0),
        Column("eye_squint", "unit", 0.0, 1.0),
    ),
}

GROUP_NAMES: tuple[str, ...] = tuple(FACTOR_GROUPS)

# Named points in expression space at intensity 1; a preset at intensity a is a * vector.
EXPRESSION_PRESETS: dict[str, tuple[float, ...]] = {
    #            raise furrow smile frown cheek squint
    "neutral": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "happy": (0.25, 0.0, 1.0, 0.0, 0.8, 0.35),
    "sad": (0.6, 0.35, 0.0, 0.9, 0.0, 0.15),
    "angry": (0.0, 1.0, 0.0, 0.55, 0.2, 0.6),
    "surprised": (1.0, 0.0, 0.1, 0.0, 0.0, 0.0),
    "disgusted": (0.0, 0.6, 0.0, 0.6, 0.7, 0.5),
    "fearful": (0.85, 0.5, 0.0, 0.35, 0.0, 0.0),
}
PRESET_NAMES: tuple[str, ...] = tuple(EXPRESSION_PRESETS)


def dims(group: str) -> int:
    return len(FACTOR_GROUPS[group])


def column_names(group: str) -> list[str]:
    return [c.name for c in FACTOR_GROUPS[group]]


def neutral(group: str, batch: int | None = None) -> np.ndarray:
    """The canonical value of a group, shape (D,) or (batch, D), float32."""
    v = np.array([c.neutral for c in FACTOR_GROUPS[group]], dtype=np.float32)
    return v if batch is None else np.tile(v, (batch, 1))


def ranges(group: str) -> tuple[np.ndarray, np.ndarray]:
    cols = FACTOR_GROUPS[group]
    return (np.array([c.low for c in cols], np.float32), np.array([c.high for c in cols], np.float32))


def preset_vector(name: str, intensity: float = 1.0) -> np.ndarray:
    if name not in EXPRESSION_PRESETS:
        raise ValueError(f"unknown expression preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return np.asarray(EXPRESSION_PRESETS[name], np.float32) * np.float32(intensity)


def manifest_groups() -> dict:
    """The factor-group section of manifest.json."""
    return {
        g: {"columns": [c.name for c in cols], "units": [c.unit for c in cols],
            "low": [c.low for c in cols], "high": [c.high for c in cols],
            "neutral": [c.neutral for c in cols]}
        for g, cols in FACTOR_GROUPS.items()
    }
