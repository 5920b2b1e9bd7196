"""Identity parameters of the procedural face: the per-person vector the renderer takes.

An identity is a float32 vector whose entries are named by `IDENTITY_FIELDS`. Geometry entries are in
head units (the head's half-height is about 1), colours are sRGB in 0..1. `sample_identity` draws a
person from palettes (skin tones, natural and dyed hair, eye colours, lip shades) plus continuous shape
parameters; `IDENTITY_LOW` / `IDENTITY_HIGH` bound what the renderer accepts (inputs are clamped).
"""

from __future__ import annotations

import numpy as np

# name, low, high (the renderer clamps to this range; sample_identity stays inside it)
_SPEC: tuple[tuple[str, float, float], ...] = (
    # face shape
    ("head_width", 0.64, 0.84),       # half-width of the cranium ellipsoid
    ("head_height", 0.94, 1.10),      # half-height of the cranium ellipsoid
    ("head_depth", 0.80, 0.96),       # half-depth of the cranium ellipsoid
    ("chin_length", 0.30, 0.52),      # from the lip line down to the chin
    ("mouth_y", -0.56, -0.40),        # the lip line (also where the jaw hinges in the geometry)
    # eyes and brows
    ("eye_y", 0.02, 0.15),
    ("eye_spacing", 0.24, 0.32),      # half the distance between the eye centres
    ("eye_width", 0.105, 0.145),      # half-width of the eye opening
    ("eye_open", 0.048, 0.074),       # height of the open upper lid above the eye centre
    ("eye_tilt", -0.25, 0.35),        # outer corner up (+) or down (-)
    ("brow_height", 0.12, 0.19),      # brow above the eye centre
    ("brow_thickness", 0.022, 0.055),
    ("brow_arch", 0.0, 0.045),
    # nose
    ("nose_length", 0.28, 0.44),
    ("nose_width", 0.065, 0.11),
    ("nose_protrusion", 0.08, 0.20),
    # mouth
    ("mouth_width", 0.145, 0.225),    # half-width of the mouth at rest
    ("lip_upper", 0.022, 0.050),
    ("lip_lower", 0.030, 0.065),
    # ears
    ("ear_size", 0.85, 1.20),
    # hair
    ("hair_volume", 0.02, 0.26),
    ("hairline", 0.30, 0.95),         # height of the front hairline; ~0.95 reads as bald on top
    ("fringe", 0.0, 1.0),             # bangs covering the forehead
    ("hair_part", -1.0, 1.0),         # side the fringe sweeps to
    ("hair_length", 0.0, 1.0),        # 0 short .. 1 long (falls behind the shoulders)
    # colours
    ("skin_r", 0.0, 1.0), ("skin_g", 0.0, 1.0), ("skin_b", 0.0, 1.0),
    ("blush", 0.0, 1.0),
    ("hair_r", 0.0, 1.0), ("hair_g", 0.0, 1.0), ("hair_b", 0.0, 1.0),
    ("eye_r", 0.0, 1.0), ("eye_g", 0.0, 1.0), ("eye_b", 0.0, 1.0),
    ("lip_r", 0.0, 1.0), ("lip_g", 0.0, 1.0), ("lip_b", 0.0, 1.0),
    ("cloth_r", 0.0, 1.0), ("cloth_g", 0.0, 1.0), ("cloth_b", 0.0, 1.0),
    ("bg_top_r", 0.0, 1.0), ("bg_top_g", 0.0, 1.0), ("bg_top_b", 0.0, 1.0),
    ("bg_bottom_r", 0.0, 1.0), ("bg_bottom_g", 0.0, 1.0), ("bg_bottom_b", 0.0, 1.0),
    # lighting (degrees): direction of the key light in the camera frame
    ("light_azimuth", -45.0, 45.0),
    ("light_elevation", 5.0, 55.0),
)

IDENTITY_FIELDS: tuple[str, ...] = tuple(s[0] for s in _SPEC)
IDENTITY_DIM: int = len(IDENTITY_FIELDS)
IDENTITY_LOW = np.array([s[1] for s in _SPEC], np.float32)
IDENTITY_HIGH = np.array([s[2] for s in _SPEC], np.float32)
FIELD_INDEX: dict[str, int] = {n: i for i, n in enumerate(IDENTITY_FIELDS)}

_SKIN = np.array([
    (0.97, 0.82, 0.72), (0.92, 0.73, 0.60), (0.82, 0.60, 0.45), (0.68, 0.47, 0.32),
    (0.50, 0.33, 0.22), (0.33, 0.21, 0.14)], np.float32)
# (colour, weight)
_HAIR = (
    ((0.05, 0.045, 0.04), 3.0),   # black
    ((0.16, 0.10, 0.06), 3.0),    # dark brown
    ((0.34, 0.20, 0.10), 2.5),    # brown
    ((0.55, 0.38, 0.21), 1.5),    # light brown
    ((0.85, 0.70, 0.45), 1.5),    # blonde
    ((0.90, 0.85, 0.72), 0.5),    # platinum
    ((0.56, 0.21, 0.08), 1.0),    # auburn / red
    ((0.52, 0.52, 0.52), 0.8),    # grey
    ((0.84, 0.84, 0.84), 0.4),    # white
    ((0.16, 0.26, 0.62), 0.3),    # dyed blue
    ((0.82, 0.36, 0.56), 0.3),    # dyed pink
    ((0.18, 0.48, 0.32), 0.2),    # dyed green
)
_EYE = (
    ((0.22, 0.12, 0.06), 3.0),    # dark brown
    ((0.40, 0.23, 0.10), 2.5),    # brown
    ((0.46, 0.38, 0.16), 1.2),    # hazel
    ((0.28, 0.48, 0.27), 1.0),    # green
    ((0.28, 0.48, 0.75), 1.5),    # blue
    ((0.50, 0.56, 0.60), 0.8),    # grey
    ((0.60, 0.40, 0.12), 0.5),    # amber
)
_LIPSTICK = ((0.72, 0.10, 0.16), (0.50, 0.12, 0.25), (0.85, 0.35, 0.42), (0.45, 0.20, 0.15))


def _pick(rng: np.random.Generator, table) -> np.ndarray:
    w = np.array([t[1] for t in table], np.float64)
    i = int(rng.choice(len(table), p=w / w.sum()))
    return np.array(table[i][0], np.float32)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


def sample_identity(rng: np.random.Generator) -> np.ndarray:
    """A random person: (IDENTITY_DIM,) float32, a deterministic function of the generator's state."""
    v: dict[str, float] = {}
    u = rng.uniform
    v["head_width"] = u(0.66, 0.82)
    v["head_height"] = u(0.96, 1.08)
    v["head_depth"] = u(0.82, 0.94)
    v["chin_length"] = u(0.32, 0.48)
    v["eye_y"] = u(0.04, 0.13)
    v["eye_spacing"] = u(0.25, 0.31) * v["head_width"] / 0.74
    v["eye_width"] = u(0.11, 0.14)
    v["eye_open"] = u(0.05, 0.072)
    v["eye_tilt"] = u(-0.2, 0.3)
    v["brow_height"] = u(0.13, 0.18)
    v["brow_thickness"] = u(0.025, 0.052)
    v["brow_arch"] = u(0.0, 0.04)
    v["nose_length"] = u(0.30, 0.40)
    # the upper lip sits a philtrum below the nose
    v["mouth_y"] = float(np.clip(v["eye_y"] - v["nose_length"] - u(0.13, 0.19), -0.56, -0.40))
    v["nose_width"] = u(0.07, 0.105)
    v["nose_protrusion"] = u(0.09, 0.19)
    v["mouth_width"] = u(0.15, 0.22)
    v["lip_upper"] = u(0.024, 0.048)
    v["lip_lower"] = u(0.033, 0.062)
    v["ear_size"] = u(0.88, 1.15)
    # hair style: a few archetypes with continuous jitter
    style = rng.choice(4, p=[0.45, 0.3, 0.1, 0.15])  # short, long, bald-ish, big/curly
    if style == 0:
        v["hair_volume"], v["hairline"], v["hair_length"] = u(0.03, 0.1), u(0.42, 0.62), u(0.0, 0.15)
    elif style == 1:
        v["hair_volume"], v["hairline"], v["hair_length"] = u(0.05, 0.14), u(0.38, 0.56), u(0.55, 1.0)
    elif style == 2:
        v["hair_volume"], v["hairline"], v["hair_length"] = u(0.02, 0.05), u(0.8, 0.94), u(0.0, 0.1)
    else:
        v["hair_volume"], v["hairline"], v["hair_length"] = u(0.16, 0.25), u(0.4, 0.6), u(0.0, 0.5)
    v["fringe"] = 0.0 if (style == 2 or rng.uniform() < 0.55) else u(0.35, 1.0)
    v["hair_part"] = u(-1.0, 1.0)
    # colours
    t = u(0.0, 1.0) * (len(_SKIN) - 1)
    i0 = min(int(t), len(_SKIN) - 2)
    skin = _SKIN[i0] * (1 - (t - i0)) + _SKIN[i0 + 1] * (t - i0)
    skin = skin * np.float32(u(0.95, 1.04)) + np.array([u(-0.02, 0.03), u(-0.02, 0.02), u(-0.03, 0.02)],
                                                        np.float32)
    v["skin_r"], v["skin_g"], v["skin_b"] = np.clip(skin, 0.05, 1.0)
    v["blush"] = u(0.0, 1.0)
    hair = _pick(rng, _HAIR) * np.float32(u(0.85, 1.12)) + rng.normal(0, 0.015, 3).astype(np.float32)
    v["hair_r"], v["hair_g"], v["hair_b"] = np.clip(hair, 0.02, 0.97)
    eye = _pick(rng, _EYE) * np.float32(u(0.85, 1.15)) + rng.normal(0, 0.02, 3).astype(np.float32)
    v["eye_r"], v["eye_g"], v["eye_b"] = np.clip(eye, 0.02, 0.95)
    if rng.uniform() < 0.2:
        lip = np.array(_LIPSTICK[int(rng.integers(len(_LIPSTICK)))], np.float32)
    else:
        lip = skin * np.array([0.92, 0.62, 0.62], np.float32) + np.array([0.08, 0.0, 0.02], np.float32)
        lip = lip * np.float32(u(0.85, 1.0))
    lip = lip + rng.normal(0, 0.02, 3).astype(np.float32)
    v["lip_r"], v["lip_g"], v["lip_b"] = np.clip(lip, 0.03, 0.95)
    cloth = _hsv(u(0, 1), u(0.15, 0.8), u(0.15, 0.85))
    v["cloth_r"], v["cloth_g"], v["cloth_b"] = cloth
    h = u(0, 1)
    top = _hsv(h, u(0.05, 0.55), u(0.35, 0.95))
    bottom = _hsv((h + u(-0.12, 0.12)) % 1.0, u(0.05, 0.6), u(0.15, 0.8))
    v["bg_top_r"], v["bg_top_g"], v["bg_top_b"] = top
    v["bg_bottom_r"], v["bg_bottom_g"], v["bg_bottom_b"] = bottom
    v["light_azimuth"] = u(-40.0, 40.0)
    v["light_elevation"] = u(10.0, 50.0)
    out = np.array([v[n] for n in IDENTITY_FIELDS], np.float32)
    return np.clip(out, IDENTITY_LOW, IDENTITY_HIGH)


def neutral_identity() -> np.ndarray:
    """A fixed, average-looking person (used by tests and demos that need one identity)."""
    return sample_identity(np.random.default_rng(12345))
