"""Procedural 2.5D face renderer of the synthetic talking-head corpus (torch, batched, CPU or CUDA).

One perspective ray per pixel. The head is analytic 3D geometry intersected in closed form after the
ray is rotated into head space, so yaw/pitch/roll, perspective, foreshortening and occlusion are true 3D:

* the skull/face: two half-ellipsoids joined with matching tangents at the lip line (the upper one is the
  cranium, the lower one the jaw; opening the jaw stretches the lower one so the chin drops);
* the nose (bridge + tip ellipsoids), two ears, a hair shell (an ellipsoid around the head whose hair
  mask leaves the face open, with fringe, parting, sideburns and long hair), long back hair;
* in "body space" (translated and scaled with the head, not rotated): a neck cylinder and the shoulders.

Features are signed-distance shapes painted in head-space surface coordinates (x, y of the hit point):
eyes (sclera, iris, pupil, catch light, lids, lashes, crease), brows, lips, the mouth opening with teeth,
tongue and a dark interior, cheeks, folds. Every edge is anti-aliased with a linear ramp one pixel
footprint wide (silhouettes use finite differences of the ray's closest approach to each primitive).
Shading is Lambert (wrapped) + ambient + a Blinn-Phong highlight; the background is a per-identity gradient.

Conventions. Camera frame: x to the image right, y up, z towards the camera; the head faces the camera.
Head space: +x is the subject's left (image right at zero pose), +y up, +z out of the face.
Pose: R = Rz(roll) @ Rx(pitch) @ Ry(yaw) about the head centre; yaw > 0 turns the face towards the
subject's left (the nose moves to the image right), pitch > 0 looks up, roll > 0 tilts the head
counter-clockwise in the image; tx > 0 moves the head right, ty > 0 moves it up (fractions of the image
size); scale multiplies the head size. Eyes: gaze_x > 0 looks to the subject's left, gaze_y > 0 up;
lid_left closes the eye on the subject's left (+x). All factor columns as in `factors.FACTOR_GROUPS`.

Disentanglement by construction: the eyes group only changes texture inside two head-space boxes around
the eyes (opening, lids, crease, lashes), the mouth group only the lips/mouth texture and the jaw (the
lower half-ellipsoid, within the volume it sweeps), expression only face texture (brows, lid squint,
mouth corners, cheeks, folds, forehead lines); every painter's weight is exactly zero outside its box.
`region_mask` casts the same rays against those boxes (and the jaw's volume), so a pixel whose ray misses
them cannot change when that group changes.

Speed: the expensive parts (face texture, eyes, mouth, nose, ears, hair, body) are evaluated only inside
per-sample pixel windows around their exact projected bounds (gather -> compute -> scatter), which
changes no pixel. `FaceRenderer(compile=True)` runs the core through `torch.compile` with fixed window
sizes (one compilation per batch size; batches whose windows do not fit run eagerly).

No randomness inside `render`: equal inputs give bit-identical frames on the same device; a batch of N
equals N single renders (to float rounding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from engine.errors import InputError
from trainer.corpus import factors as _factors
from trainer.corpus.face_identity import (
    FIELD_INDEX,
    IDENTITY_DIM,
    IDENTITY_FIELDS,
    IDENTITY_HIGH,
    IDENTITY_LOW,
    neutral_identity,
    sample_identity,
)

__all__ = ["IDENTITY_FIELDS", "IDENTITY_DIM", "FIELD_INDEX", "sample_identity", "neutral_identity",
           "FaceRenderer", "CLAMP_RANGES"]

# ---------------------------------------------------------------------------------------- camera
CAM_Z = 6.0          # camera distance from the head centre (head half-height ~1)
VIEW_HALF = 1.55     # half the visible height at the head's depth (world units)
TAN = VIEW_HALF / CAM_Z
HEAD_Y = 0.10        # head centre above the image centre at zero pose

# How far beyond the factor table the renderer goes before clamping (low, high per column).
CLAMP_RANGES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "pose": ((-40.0, -26.0, -20.0, -0.12, -0.12, 0.8), (40.0, 26.0, 20.0, 0.12, 0.12, 1.25)),
    "eyes": ((-1.1, -1.1, 0.0, 0.0), (1.1, 1.1, 1.0, 1.0)),
    "mouth": ((0.0, -1.1, 0.0), (1.0, 1.1, 1.0)),
    "expression": ((0.0,) * 6, (1.0,) * 6),
}
_GROUP_DIMS = {g: _factors.dims(g) for g in _factors.GROUP_NAMES}
_NEUTRAL = {g: _factors.neutral(g) for g in _factors.GROUP_NAMES}

JAW_DROP = 0.13      # how far the chin drops at jaw_open = 1 (head units)


# ---------------------------------------------------------------------------------------- helpers
def _cov(d: torch.Tensor, fw: torch.Tensor | float) -> torch.Tensor:
    """Anti-aliased coverage of the region d < 0 (d a distance, fw the pixel footprint in d's units)."""
    return (0.5 - d / fw).clamp(0.0, 1.0)


def _band(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, fw) -> torch.Tensor:
    """Coverage of lo < y < hi, exactly 0 when the band is empty (hi <= lo)."""
    return (torch.minimum(y - lo, hi - y) / fw + 0.5).clamp(0.0, 1.0) * ((hi - lo) / fw).clamp(0.0, 1.0)


def _ss(e0: float, e1: float, x: torch.Tensor) -> torch.Tensor:
    """Smoothstep from e0 to e1 (e0 > e1 allowed: a falling step)."""
    t = ((x - e0) * (1.0 / (e1 - e0))).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _bump(r2: torch.Tensor) -> torch.Tensor:
    """Smooth, compactly supported bump of a squared normalised radius (exactly 0 for r2 >= 1)."""
    t = (1.0 - r2).clamp(min=0.0)
    return t * t


def _paint(alb: torch.Tensor, col: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Paint colour col (B,3,1,1) or (B,3,H,W) over albedo (B,3,H,W) with coverage a (B,H,W)."""
    return alb + (col - alb) * a.unsqueeze(1)


def _fwidth(r: torch.Tensor) -> torch.Tensor:
    """Screen-space footprint of a smooth field (B,H,W): |d/dx| + |d/dy| by forward differences."""
    dx = (r[:, :, 1:] - r[:, :, :-1]).abs()
    dy = (r[:, 1:, :] - r[:, :-1, :]).abs()
    dx = torch.cat([dx, dx[:, :, -1:]], 2)
    dy = torch.cat([dy, dy[:, -1:, :]], 1)
    return (dx + dy).clamp(min=1e-6)


def _ellipsoid(o, d, c, ax):
    """Ray/ellipsoid: o (3 x (B,1,1)) origin, d (3 x (B,H,W)) direction, c/ax (3 x (B,1,1)) centre/axes.

    Returns t (front hit, or the closest approach where the ray misses), t_c (closest approach), half
    (half chord, 0 on a miss) and r (closest distance to the centre in the ellipsoid's unit-sphere space:
    r < 1 hit, r > 1 miss; smooth across the silhouette, used for anti-aliasing).
    """
    ix, iy, iz = 1.0 / ax[0], 1.0 / ax[1], 1.0 / ax[2]
    ox, oy, oz = (o[0] - c[0]) * ix, (o[1] - c[1]) * iy, (o[2] - c[2]) * iz
    dx, dy, dz = d[0] * ix, d[1] * iy, d[2] * iz
    a = dx * dx + dy * dy + dz * dz
    b = ox * dx + oy * dy + oz * dz
    oo = ox * ox + oy * oy + oz * oz
    tc = -b / a
    r2 = (oo + b * tc).clamp(min=0.0)
    half = ((1.0 - r2).clamp(min=0.0) / a).sqrt()
    return tc - half, tc, half, r2.sqrt()


def _point(o, d, t):
    return o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]


def _normal(p, c, ax):
    nx = (p[0] - c[0]) / (ax[0] * ax[0])
    ny = (p[1] - c[1]) / (ax[1] * ax[1])
    nz = (p[2] - c[2]) / (ax[2] * ax[2])
    inv = (nx * nx + ny * ny + nz * nz).clamp(min=1e-12).rsqrt()
    return nx * inv, ny * inv, nz * inv


def _dot(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _over(top, under):
    """Premultiplied 'over': (C (B,3,H,W), alpha (B,1,H,W))."""
    return top[0] + (1.0 - top[1]) * under[0], top[1] + (1.0 - top[1]) * under[1]


def _soft_z(l1, t1, l2, t2, tau):
    """Merge two premultiplied layers by depth with a soft transition of width tau (in ray parameter)."""
    w = ((t2 - t1) / tau * 0.5 + 0.5).clamp(0.0, 1.0).unsqueeze(1)  # 1: layer 1 in front
    f1 = _over(l1, l2)
    f2 = _over(l2, l1)
    return f2[0] + (f1[0] - f2[0]) * w, f2[1] + (f1[1] - f2[1]) * w


def _layer(col, shade, a):
    """Premultiplied layer from albedo col, a shading factor (B,H,W) or None and coverage a (B,H,W)."""
    a1 = a.unsqueeze(1)
    c = col if shade is None else col * shade.unsqueeze(1)
    return c * a1, a1


def _rotation(yaw, pitch, roll):
    """(B,3,3) R = Rz(roll) @ Rx(pitch) @ Ry(yaw); angles in radians, signs as in the module docstring."""
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    z, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    ry = torch.stack([cy, z, sy, z, one, z, -sy, z, cy], -1).view(-1, 3, 3)
    rx = torch.stack([one, z, z, z, cp, sp, z, -sp, cp], -1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, z, sr, cr, z, z, z, one], -1).view(-1, 3, 3)
    return rz @ rx @ ry


# ---------------------------------------------------------------------------------------- parameters
def _derive(ident: torch.Tensor, pose: torch.Tensor) -> dict[str, Any]:
    """Per-sample scalars (B,1,1) that every pixel needs: camera, geometry of all primitives, colours."""
    B = ident.shape[0]

    def f(name):
        return ident[:, FIELD_INDEX[name]].view(B, 1, 1)

    def rgb(prefix):
        i = FIELD_INDEX[prefix + "_r"]
        return ident[:, i:i + 3].reshape(B, 3, 1, 1)

    p: dict[str, Any] = {"f": f}
    deg = math.pi / 180.0
    R = _rotation(pose[:, 0] * deg, pose[:, 1] * deg, pose[:, 2] * deg)  # (B,3,3)
    scale = pose[:, 5]
    cx = pose[:, 3] * (2.0 * VIEW_HALF)
    cy = pose[:, 4] * (2.0 * VIEW_HALF) + HEAD_Y
    inv_s = (1.0 / scale).view(B, 1, 1)
    # world ray: o = (0, 0, CAM_Z), d = (u*TAN, v*TAN, -1); head space: R^T (p - c) / s
    rel = torch.stack([-cx, -cy, torch.full_like(cx, CAM_Z)], -1)  # (B,3) o - c
    oh = torch.einsum("bji,bj->bi", R, rel) / scale.view(B, 1)
    p["o_head"] = tuple(oh[:, i].view(B, 1, 1) for i in range(3))
    # d_head_i = (R[0,i] u TAN + R[1,i] v TAN - R[2,i]) / s
    p["d_head_coef"] = tuple((R[:, 0, i].view(B, 1, 1) * (TAN * inv_s), R[:, 1, i].view(B, 1, 1) * (TAN * inv_s),
                              -R[:, 2, i].view(B, 1, 1) * inv_s) for i in range(3))
    p["o_body"] = ((-cx / scale).view(B, 1, 1), (-cy / scale).view(B, 1, 1), (CAM_Z / scale).view(B, 1, 1))
    p["inv_s"] = inv_s
    p["R"] = R
    p["centre"] = torch.stack([cx, cy, torch.zeros_like(cx)], -1)  # (B,3) world head centre
    p["scale"] = scale
    az, el = f("light_azimuth") * deg, f("light_elevation") * deg
    lw = (torch.sin(az) * torch.cos(el), torch.sin(el), torch.cos(az) * torch.cos(el))
    p["light_world"] = lw
    lwt = torch.cat([x.view(B, 1) for x in lw], 1)
    lh = torch.einsum("bji,bj->bi", R, lwt)
    p["light_head"] = tuple(lh[:, i].view(B, 1, 1) for i in range(3))

    # --- head: cranium E1 (centre 0) and jaw E2 joined with equal tangents at y = mouth_y
    a1, b1, c1 = f("head_width"), f("head_height"), f("head_depth")
    ym = f("mouth_y")
    k1sq = 1.0 - (ym / b1) ** 2
    L = f("chin_length")
    sigma = ((-ym) * L / (b1 * b1 * k1sq)).clamp(max=0.42)
    u = -sigma / (1.0 - sigma)
    b2 = L / (1.0 + u)
    y2 = ym - u * b2
    q = (k1sq / (1.0 - u * u)).sqrt()
    a2, c2 = a1 * q, c1 * q
    p.update(a1=a1, b1=b1, c1=c1, ym=ym, a2=a2, b2=b2, y2=y2, c2=c2, chin=ym - L)
    # --- nose: bridge (tilted ellipsoid) and tip
    ey, nl, nw, npr = f("eye_y"), f("nose_length"), f("nose_width"), f("nose_protrusion")
    ntip_y = ey - nl
    nb_y = ey - 0.5 * nl
    zs_b = c1 * (1.0 - (nb_y / b1) ** 2).clamp(min=0.05).sqrt()
    zs_t = c1 * (1.0 - (ntip_y / b1) ** 2).clamp(min=0.05).sqrt()
    p["nose_bridge_c"] = (torch.zeros_like(nb_y), nb_y, zs_b + 0.35 * npr - 0.055)
    p["nose_bridge_ax"] = (0.75 * nw, 0.56 * nl, torch.full_like(nw, 0.085))
    p["nose_tilt"] = torch.atan2(0.6 * npr, nl)  # tip further out than the bridge
    p["nose_tip_c"] = (torch.zeros_like(nb_y), ntip_y + 0.045, zs_t + npr - 0.055)
    p["nose_tip_ax"] = (0.78 * nw, torch.full_like(nw, 0.065), torch.full_like(nw, 0.07))
    p["nose_bottom"] = ntip_y
    p["ala_c"] = (0.78 * nw, ntip_y + 0.035, zs_t + 0.3 * npr - 0.03)
    p["ala_ax"] = (0.42 * nw, torch.full_like(nw, 0.042), torch.full_like(nw, 0.06))
    # --- ears (axis-aligned, on the sides of the cranium)
    es = f("ear_size")
    ear_y = ey - 0.12
    ear_z = torch.full_like(ey, -0.06)
    xs = a1 * (1.0 - (ear_y / b1) ** 2 - (ear_z / c1) ** 2).clamp(min=0.05).sqrt()
    p["ear_c"] = (xs - 0.01, ear_y, ear_z)
    p["ear_ax"] = (torch.full_like(es, 0.055), 0.17 * es, 0.095 * es)
    # --- hair shell and long back hair
    vol = f("hair_volume")
    p["hair_c"] = (torch.zeros_like(vol), 0.04 + 0.25 * vol, -0.05 - 0.3 * vol)
    p["hair_ax"] = (a1 + 0.04 + vol, b1 + 0.03 + 0.8 * vol, c1 + 0.035 + 0.55 * vol)
    hl = f("hair_length")
    p["hair_len"] = hl
    p["back_c"] = (torch.zeros_like(vol), -0.35 - 0.45 * hl, -0.38 - 0.1 * vol)
    p["back_ax"] = (a1 + 0.08 + 0.8 * vol, 0.95 + 0.55 * hl, 0.42 + 0.2 * vol)
    # --- body (body space: translated/scaled with the head, never rotated)
    p["neck_r"] = (0.37 * a1 / 0.74, torch.full_like(a1, 0.33))
    p["torso_c"] = (torch.zeros_like(a1), torch.full_like(a1, -1.78), torch.full_like(a1, -0.3))
    p["torso_ax"] = (1.6 * a1 / 0.74 + 0.1, torch.full_like(a1, 0.64), torch.full_like(a1, 0.62))
    # colours
    for name in ("skin", "hair", "eye", "lip", "cloth", "bg_top", "bg_bottom"):
        p[name] = rgb(name)
    return p


# ---------------------------------------------------------------------------------------- features
def _eye(alb, x, y, fw, p, sx: float, gx, gy, lid, squint, lx):
    """Eye opening (sclera, iris, pupil, catch light), lids, crease and lashes of the eye at x ~ sx."""
    f = p["f"]
    ex, ey, ew, eo = sx * f("eye_spacing"), f("eye_y"), f("eye_width"), f("eye_open")
    X = (x - ex) / ew
    Xo = X * sx
    Y = y - ey - f("eye_tilt") * 0.3 * eo * Xo
    par = 1.0 - X * X
    up0 = eo * par * (1.0 - 0.12 * Xo)
    lo0 = -0.62 * eo * par * (1.0 + 0.1 * Xo)
    span = up0 - lo0
    lo1 = lo0 + squint * 0.36 * span
    up1 = up0 - squint * 0.2 * span
    meet = lo1 + 0.22 * (up1 - lo1)
    opened = 1.0 - lid  # written so that a closed lid (lid = 1) gives up == lo == meet exactly
    up = meet + (up1 - meet) * opened
    lo = meet - (meet - lo1) * opened
    a_open = _band(Y, lo, up, fw)
    # eyeball
    sclera = torch.tensor([0.93, 0.90, 0.87], device=x.device).view(1, 3, 1, 1)
    col = sclera * (0.72 + 0.28 * (par * 1.6).clamp(0.0, 1.0)).unsqueeze(1)
    ir = 0.40 * ew
    ix = ex + gx * 0.46 * ew
    iy = ey + gy * 0.55 * eo
    fx = 1.0 - 0.22 * gx.abs()
    dxi, dyi = (x - ix) / (ir * fx), (y - iy) / ir
    ri = (dxi * dxi + dyi * dyi).sqrt()
    iris = p["eye"] * (0.45 + 0.55 * _ss(1.0, 0.72, ri) + 0.25 * _ss(0.75, 0.45, ri)).unsqueeze(1)
    col = _paint(col, iris, _cov((ri - 1.0) * ir, fw))
    col = _paint(col, torch.full_like(sclera, 0.03), _cov((ri - 0.42) * ir, fw))
    cx_, cy_ = x - (ix + 0.32 * ir * lx), y - (iy + 0.34 * ir)
    rc = (cx_ * cx_ + cy_ * cy_).sqrt()
    col = _paint(col, torch.full_like(sclera, 1.0), 0.9 * _cov(rc - 0.14 * ir, fw))
    lidshadow = 1.0 - 0.45 * (1.0 - (up - Y) / (0.5 * eo)).clamp(0.0, 1.0)
    col = col * lidshadow.unsqueeze(1)
    alb = _paint(alb, col, a_open)
    # upper lid skin band up to the crease, the crease, lashes, lower lid line
    parc = (1.0 - (X * (1.0 / 1.12)) ** 2).clamp(min=0.0)
    crease = up0 + (0.42 + 0.2 * lid) * eo * parc.sqrt() + 0.012
    a_lid = _band(Y, up, crease, fw) * (parc * 4.0).clamp(0.0, 1.0)
    alb = alb * (1.0 - 0.1 * a_lid).unsqueeze(1)
    a_cr = _band(Y, crease - 0.006, crease + 0.002, fw) * (parc * 3.0).clamp(0.0, 1.0) * (0.3 - 0.2 * lid)
    alb = alb * (1.0 - a_cr).unsqueeze(1)
    lash_th = 0.009 + 0.012 * _ss(-0.2, 1.0, Xo)
    a_lash = _band(Y, up - 0.002, up + lash_th, fw) * (1.0 - (X * (1.0 / 1.07)) ** 2).clamp(0.0, 1.0).sqrt()
    dark = (p["hair"] * 0.25 + 0.02).clamp(max=0.12)
    alb = _paint(alb, dark, 0.92 * a_lash)
    a_low = _band(Y, lo - 0.006, lo + 0.001, fw) * par.clamp(0.0, 1.0) * 0.35
    alb = alb * (1.0 - 0.5 * a_low).unsqueeze(1)
    return alb


def _brow(alb, x, y, fw, p, sx: float, raise_, furrow):
    f = p["f"]
    ex, ey, ew = sx * f("eye_spacing"), f("eye_y"), f("eye_width")
    bw = 1.22 * ew
    bx = ex + sx * (0.012 - 0.03 * furrow)
    X = (x - bx) / bw
    Xo = X * sx
    yb = (ey + f("brow_height") + f("brow_arch") * (1.0 - Xo * Xo) - 0.018 * Xo
          + 0.065 * raise_ * (1.0 - 0.25 * Xo) - 0.045 * furrow * _ss(0.5, -1.0, Xo))
    th = f("brow_thickness") * (1.0 - 0.45 * _ss(-0.4, 1.1, Xo)) * (1.0 + 0.15 * furrow)
    d = torch.maximum((y - yb).abs() - 0.5 * th, (X.abs() - 1.0) * bw)
    a = _cov(d, fw + 0.006) * 0.92
    col = (p["hair"] * 0.72).clamp(max=0.8)
    return _paint(alb, col, a)


# mouth shape constants (shared by the painter and the boxes that bound it)
_OPEN_JAW, _OPEN_ROUND, _OPEN_UP = 0.14, 0.018, 0.14
_CHIN_CREASE = 0.05
_SMILE_LIFT, _FROWN_DROP = 0.065, 0.05  # mouth-corner displacement at smile = 1 / frown = 1


def _mouth_width(p, wd, rd, smile, frown):
    return p["f"]("mouth_width") * (1.0 + 0.2 * wd - 0.3 * rd + 0.12 * smile - 0.04 * frown)


def _lip_fullness(wd, rd):
    return 1.0 + 0.45 * rd - 0.25 * wd.clamp(min=0.0) + 0.25 * (-wd).clamp(min=0.0)


def _mouth(alb, x, y, fw, p, jaw, wd, rd, smile, frown):
    """Lips, the seam, corners, the chin crease and the opening (dark interior, tongue, teeth)."""
    f = p["f"]
    mw = _mouth_width(p, wd, rd, smile, frown)
    X = x / mw
    X2 = X * X
    ym = f("mouth_y")
    ys = ym + (_SMILE_LIFT * smile - _FROWN_DROP * frown) * X2
    op = _OPEN_JAW * jaw + _OPEN_ROUND * rd
    op_u = _OPEN_UP * op
    op_l = op - op_u
    e = 0.4 + 0.3 * rd
    po = (1.0 - X2 * (1.0 / 0.81)).clamp(min=0.0) ** e
    yt = ys + op_u * po
    yb = ys - op_l * po
    pl = (1.0 - X2).clamp(min=0.0) ** 0.55
    full = _lip_fullness(wd, rd)
    bow = 0.3 * (1.0 - (x / 0.04) ** 2).clamp(min=0.0)
    yu = yt + f("lip_upper") * full * pl * (1.0 - bow)
    yl = yb - f("lip_lower") * full * pl
    # lips
    fwl = fw + 0.004
    a_lip = _band(y, yl, yu, fwl)
    lipshade = 0.86 + 0.22 * _ss(0.01, -0.01, y - ys) + 0.12 * _bump((x / (0.45 * mw)) ** 2 + (
        (y - (yb - 0.45 * f("lip_lower") * full)) / (0.35 * f("lip_lower") * full + 1e-3)) ** 2)
    alb = _paint(alb, p["lip"] * lipshade.unsqueeze(1), a_lip)
    # corner dimples and the chin crease below the lower lip (moves with the jaw)
    for s in (-1.0, 1.0):
        dx_, dy_ = x - s * mw, y - ys - 0.003
        alb = alb * (1.0 - 0.25 * _bump((dx_ * dx_ + dy_ * dy_) * (1.0 / 0.02 ** 2))).unsqueeze(1)
    yc = ym - op_l - f("lip_lower") * full - _CHIN_CREASE
    alb = alb * (1.0 - 0.12 * _bump((x / (0.7 * mw)) ** 2 + ((y - yc) / 0.028) ** 2)).unsqueeze(1)
    # the seam between closed lips
    a_seam = _band(y, ys - 0.0045, ys + 0.0025, fw) * (1.0 - X2).clamp(0.0, 1.0).sqrt() * 0.85
    alb = _paint(alb, p["lip"] * 0.3, a_seam)
    # the opening: dark interior, tongue, lower and upper teeth
    a_open = _band(y, yb, yt, fw)
    dev = x.device
    col = torch.tensor([0.17, 0.05, 0.06], device=dev).view(1, 3, 1, 1) * (0.55 + 0.6 * X2.clamp(max=1.0)).unsqueeze(1)
    yb0 = ym - op_l
    a_tg = _bump((x / (0.62 * mw)) ** 2 + ((y - yb0 + 0.004) / (0.55 * op_l + 0.008)) ** 2)
    col = _paint(col, torch.tensor([0.62, 0.26, 0.28], device=dev).view(1, 3, 1, 1), 0.9 * a_tg)
    teeth = torch.tensor([0.95, 0.93, 0.86], device=dev).view(1, 3, 1, 1)
    a_tl = _cov(y - (yb + 0.024 * (1.0 - X2)), fw) * _ss(0.62, 0.42, X.abs()) * 0.9
    col = _paint(col, teeth * 0.8, a_tl)
    gaps = 1.0 - 0.15 * _ss(0.6, 1.0, torch.cos(x * (2.0 * math.pi / 0.048)))
    tshade = (0.72 + 0.28 * (1.0 - X2).clamp(0.0, 1.0)) * gaps
    a_tu = _cov((yt - 0.045 * (1.0 - 0.5 * X2)) - y, fw) * _ss(0.82, 0.62, X.abs())
    col = _paint(col, teeth * tshade.unsqueeze(1), a_tu)
    alb = _paint(alb, col, a_open)
    return alb


def _face_base(x, y, fw, p, expr):
    """Skin-level texture: blush (B,H,W) and a shading multiplier (B,H,W) at head-space (x, y):
    eye sockets, the shadow under the nose, philtrum, cheeks (raise/blush), nasolabial folds (smile),
    forehead lines (brow raise) and frown lines (furrow)."""
    f = p["f"]
    B = x.shape[0]
    br_raise, br_furrow, smile, _, cheek, _ = (expr[:, i].view(B, 1, 1) for i in range(6))
    a1, ey, ew, eo = f("head_width"), f("eye_y"), f("eye_width"), f("eye_open")
    es = f("eye_spacing")
    ym = f("mouth_y")
    nb = p["nose_bottom"]
    shade = 1.0
    for sx in (-1.0, 1.0):
        shade = shade - 0.1 * _bump(((x - sx * es) / (1.55 * ew)) ** 2 + ((y - ey - 0.01) / (2.6 * eo)) ** 2)
    shade = shade - 0.22 * _bump((x / (1.5 * f("nose_width"))) ** 2 + ((y - nb + 0.035) / 0.035) ** 2)
    shade = shade - 0.06 * _bump((x / 0.035) ** 2 + ((y - 0.5 * (nb + ym)) / (0.5 * (nb - ym) + 1e-3)) ** 2)
    cx = 0.5 * (es + a1 * 0.62)
    cy = 0.5 * (ey + ym) - 0.02 - 0.035 * cheek
    rx2 = ((x.abs() - cx) / 0.15) ** 2
    blush = _bump(rx2 + ((y - cy) / 0.11) ** 2) * (0.10 * f("blush") + 0.22 * cheek + 0.1 * smile)
    shade = shade + 0.08 * cheek * _bump(rx2 + ((y - cy - 0.04) / 0.07) ** 2) \
        - 0.08 * cheek * _bump(rx2 + ((y - cy + 0.09) / 0.06) ** 2)
    t = ((nb - y) / (nb - ym + 0.05)).clamp(0.0, 1.0)
    fx = f("nose_width") * 1.25 + t * (f("mouth_width") * 1.05 - f("nose_width") * 0.9) + 0.02
    fold = _cov((x.abs() - fx).abs() - 0.006, fw + 0.01) * _bump(
        ((y - 0.5 * (nb + ym) + 0.03) / (0.5 * (nb - ym) + 0.05)) ** 2)
    shade = shade - (0.12 * smile + 0.05 * cheek + 0.03) * fold
    bt = ey + f("brow_height")
    for k in range(3):
        yl = bt + 0.1 + 0.055 * k
        shade = shade - 0.07 * br_raise * _band(y, yl - 0.006, yl + 0.004, fw + 0.004) * _bump((x / (es + 0.05)) ** 2)
    for s in (-1.0, 1.0):
        shade = shade - 0.12 * br_furrow * _band(x, s * 0.045 - 0.006, s * 0.045 + 0.006, fw + 0.004) \
            * _bump(((y - bt + 0.01) / 0.075) ** 2)
    return blush, shade


def _hair_mask(px, py, pz, fw, p):
    """Coverage of hair at head-space points on the hair shell."""
    f = p["f"]
    a1, hl = f("head_width"), p["hair_len"]
    fz = pz * (px * px + pz * pz + 1e-6).rsqrt()
    y_side = f("eye_y") - 0.03 + (f("mouth_y") - 0.3 - f("eye_y")) * _ss(0.3, 0.8, hl)
    y_back = -0.45 - 0.9 * _ss(0.2, 0.7, hl)
    yh = f("hairline") + 0.1 * (px / a1) ** 2
    y_fr = f("eye_y") + f("brow_height") + 0.07 + 0.12 * f("hair_part") * px / a1 + 0.02 * torch.sin(px * 45.0)
    yh = yh + (torch.minimum(yh, y_fr) - yh) * f("fringe")
    yb = y_side + (yh - y_side) * _ss(0.3, 0.75, fz) + (y_back - y_side) * _ss(0.0, -0.55, fz)
    yb = yb + 0.012 * torch.sin(px * 37.0 + pz * 11.0)
    return ((py - yb) / (fw + 0.012) + 0.5).clamp(0.0, 1.0)


def _hair_mask_back(px, py, pz, fw, p):
    """`_hair_mask` for the inside of the shell seen through the face opening: sides and back only."""
    f = p["f"]
    hl = p["hair_len"]
    fz = pz * (px * px + pz * pz + 1e-6).rsqrt()
    y_side = f("eye_y") - 0.03 + (f("mouth_y") - 0.3 - f("eye_y")) * _ss(0.3, 0.8, hl)
    y_back = -0.45 - 0.9 * _ss(0.2, 0.7, hl)
    yh = f("hairline") + 0.1 * (px / f("head_width")) ** 2
    yb = y_side + (yh - y_side) * _ss(0.3, 0.75, fz) + (y_back - y_side) * _ss(0.0, -0.55, fz)
    return ((py - yb) / (fw + 0.012) + 0.5).clamp(0.0, 1.0)


def _hair_color(px, py, pz, fw):
    """Strand shading (multiplier) on the hair; the fine strands fade out where a pixel spans them."""
    # "diamond angle": monotone in the azimuth around the head (like atan2, far cheaper), ~radians
    d = px / (px.abs() + pz.abs() + 1e-6)
    ang = torch.where(pz >= 0.0, d, torch.where(px >= 0.0, 2.0 - d, -2.0 - d)) * (0.5 * math.pi)
    w = ang * 3.0 + 1.5 * torch.sin(py * 3.0 + ang)
    fine = (1.6 - fw * 60.0).clamp(0.0, 1.0)  # strand period ~0.1 head units: fade below ~3 px per period
    return 0.9 + 0.07 * torch.sin(w * 9.0) + 0.04 * fine * torch.sin(w * 19.0 + py * 7.0)


# ---------------------------------------------------------------------------------------- boxes
# Head-space boxes (lo, hi), each a tuple of three (B,1,1) tensors. Feature boxes bound what a painter
# can touch (for every value of its factor group); they place the computation windows and, for the
# eyes/mouth/expression groups, define `region_mask`.
def _surface_z(p, x_far, y0, y1):
    """A lower bound of the face surface's z (front) over |x| <= x_far, y0 <= y <= y1: the smallest z of
    the cranium and of the jaw (closed and fully open) at the corners, minus a margin."""
    zs = []
    ym = p["ym"]
    kmax = 1.0 + JAW_DROP / p["f"]("chin_length")
    for y in (y0, y1):
        q1 = 1.0 - (x_far / p["a1"]) ** 2 - (y / p["b1"]) ** 2
        zs.append(p["c1"] * q1.clamp(min=0.0).sqrt())
        for k in (1.0, kmax):
            q2 = 1.0 - (x_far / p["a2"]) ** 2 - ((y - ym - (p["y2"] - ym) * k) / (p["b2"] * k)) ** 2
            zs.append(torch.where(y < ym + 0.05, p["c2"] * q2.clamp(min=0.0).sqrt(), zs[-1]))
    z = zs[0]
    for t in zs[1:]:
        z = torch.minimum(z, t)
    return z - 0.04


def _surface_zmax(p, x0, x1, y0, y1):
    """An upper bound of the face surface's z over x0 <= x <= x1, y0 <= y <= y1, plus a margin."""
    xn = torch.where((x0 < 0.0) & (x1 > 0.0), torch.zeros_like(x0), torch.minimum(x0.abs(), x1.abs()))
    yn = torch.where((y0 < 0.0) & (y1 > 0.0), torch.zeros_like(y0), torch.minimum(y0.abs(), y1.abs()))
    z = p["c1"] * (1.0 - (xn / p["a1"]) ** 2 - (yn / p["b1"]) ** 2).clamp(min=0.0).sqrt()
    ym = p["ym"]
    kmax = 1.0 + JAW_DROP / p["f"]("chin_length")
    yj = torch.minimum(y1, ym)
    for k in (1.0, kmax):
        yc = ym + (p["y2"] - ym) * k
        q = 1.0 - (xn / p["a2"]) ** 2 - ((torch.minimum(yj, yc) - yc) / (p["b2"] * k)) ** 2
        z = torch.where(y0 < ym, torch.maximum(z, p["c2"] * q.clamp(min=0.0).sqrt()), z)
    return z + 0.03


def _eye_box(p, sx: float):
    """Everything the eyes group paints for the eye at x ~ sx: opening, lids, crease, lashes."""
    f = p["f"]
    ex, ey, ew, eo = sx * f("eye_spacing"), f("eye_y"), f("eye_width"), f("eye_open")
    tilt = f("eye_tilt").abs() * 0.3 * eo * 1.15
    x0, x1 = ex - 1.15 * ew, ex + 1.15 * ew
    y0 = ey - 0.8 * eo - tilt - 0.012
    y1 = ey + 1.75 * eo + tilt + 0.035
    zf = _surface_z(p, torch.maximum(x0.abs(), x1.abs()), y0, y1)
    return (x0, y0, zf), (x1, y1, _surface_zmax(p, x0, x1, y0, y1))


def _eye_window_box(p, sx: float):
    """The eye box plus the brow above it (brows are expression, painted in the same window)."""
    f = p["f"]
    (x0, y0, _), (x1, y1, z1) = _eye_box(p, sx)
    ex, ew = sx * f("eye_spacing"), f("eye_width")
    bw = 1.22 * ew
    x0 = torch.minimum(x0, ex - bw - 0.045)
    x1 = torch.maximum(x1, ex + bw + 0.045)
    y1 = torch.maximum(y1, f("eye_y") + f("brow_height") + f("brow_arch") + 0.065 * 1.25 + 0.02
                       + 0.6 * f("brow_thickness") * 1.15 + 0.01)
    zf = _surface_z(p, torch.maximum(x0.abs(), x1.abs()), y0, y1)
    return (x0, y0, zf), (x1, y1, torch.maximum(z1, _surface_zmax(p, x0, x1, y0, y1)))


def _mouth_box(p):
    """Everything the mouth painter touches, for every mouth and expression value."""
    f = p["f"]
    ym = f("mouth_y")
    mw = f("mouth_width") * (1.0 + 0.2 * 1.1 + 0.12)
    full = 1.0 + 0.45 + 0.25 * 1.1
    op = _OPEN_JAW + _OPEN_ROUND
    top = ym + _SMILE_LIFT + _OPEN_UP * op + f("lip_upper") * full + 0.01
    bottom = ym - _FROWN_DROP - op - f("lip_lower") * full - _CHIN_CREASE - 0.028 - 0.012
    half = mw + 0.03
    return (-half, bottom, _surface_z(p, half, bottom, top)), (half, top, _surface_zmax(p, -half, half, bottom, top))


def _face_box(p):
    """Everything `_face_base` touches (identity shading, blush, folds, forehead and frown lines)."""
    f = p["f"]
    es, ew, eo, ey, ym = f("eye_spacing"), f("eye_width"), f("eye_open"), f("eye_y"), f("mouth_y")
    cx = 0.5 * (es + p["a1"] * 0.62)
    half = torch.maximum(cx + 0.15, es + 1.55 * ew) + 0.01
    top = torch.maximum(ey + f("brow_height") + 0.1 + 0.11 + 0.01, ey + 0.01 + 2.6 * eo) + 0.01
    nb = p["nose_bottom"]
    bottom = torch.minimum(0.5 * (nb + ym) - 0.03 - (0.5 * (nb - ym) + 0.05), 0.5 * (ey + ym) - 0.055 - 0.11 - 0.09)
    bottom = torch.minimum(bottom, ym - 0.01) - 0.01
    return (-half, bottom, _surface_z(p, half, bottom, top)), (half, top, p["c1"] + 0.02)


def _nose_box(p):
    nw = p["f"]("nose_width")
    bc, ba = p["nose_bridge_c"], p["nose_bridge_ax"]
    tc, ta = p["nose_tip_c"], p["nose_tip_ax"]
    r = torch.maximum(ba[1], ba[2])  # the tilted bridge fits in a box of its largest y/z half-axis
    x = torch.maximum(ba[0], torch.maximum(ta[0], p["ala_c"][0] + p["ala_ax"][0])) + 0.01
    y0 = torch.minimum(bc[1] - r, torch.minimum(tc[1] - ta[1], p["ala_c"][1] - p["ala_ax"][1])) - 0.01
    y1 = bc[1] + r + 0.01
    z0 = torch.minimum(bc[2] - r, p["ala_c"][2] - p["ala_ax"][2]) - 0.01
    z1 = torch.maximum(bc[2] + r, tc[2] + ta[2]) + 0.01
    del nw
    return (-x, y0, z0), (x, y1, z1)


def _ear_box(p, s: float):
    c, a = p["ear_c"], p["ear_ax"]
    cx = s * c[0]
    return (cx - a[0] - 0.01, c[1] - a[1] - 0.01, c[2] - a[2] - 0.01), (cx + a[0] + 0.01, c[1] + a[1] + 0.01,
                                                                       c[2] + a[2] + 0.01)


# ---------------------------------------------------------------------------------------- windows
# Expensive parts are evaluated only inside per-sample pixel windows centred on the part's projected
# bounds (exact for ellipsoids, projected corners for boxes). Window sizes are per call (eager: just large
# enough for the batch) or fixed (compiled); the pixels do not depend on the window size.
def _project_points(world, size: int):
    """Pixel (col, row) of world points (..., 3)."""
    depth = (CAM_Z - world[..., 2]).clamp(min=1e-3) * TAN
    return (world[..., 0] / depth + 1.0) * (0.5 * size) - 0.5, (1.0 - world[..., 1] / depth) * (0.5 * size) - 0.5


def _screen_head_box(p, box, size: int):
    """Pixel bounds (col0, col1, row0, row1), each (B,), of a head-space box: its 8 projected corners."""
    lo, hi = box
    B = p["R"].shape[0]
    pts = torch.stack([torch.stack([(lo[i] if (k >> i) & 1 == 0 else hi[i]).reshape(B) for i in range(3)], -1)
                       for k in range(8)], 1)  # (B,8,3)
    world = p["centre"].view(B, 1, 3) + p["scale"].view(B, 1, 1) * torch.einsum("bij,bkj->bki", p["R"], pts)
    col, row = _project_points(world, size)
    return col.amin(1), col.amax(1), row.amin(1), row.amax(1)


def _screen_ellipsoid(p, c, ax, size: int, body: bool = False):
    """Exact pixel bounds of a head-space (or body-space) ellipsoid under the perspective camera: the
    planes through the camera tangent to it (plane x = k (CAM_Z - z) tangent <=> a quadratic in k)."""
    B = p["R"].shape[0]
    sc = p["scale"].view(B, 1, 1)
    axes = torch.stack([a.reshape(B) for a in ax], -1).view(B, 1, 3)
    cb = torch.stack([x.reshape(B) for x in c], -1)
    if body:
        M = torch.diag_embed(axes.view(B, 3)) * sc
        cw = p["centre"] + sc.view(B, 1) * cb
    else:
        M = p["R"] * axes * sc
        cw = p["centre"] + sc.view(B, 1) * torch.einsum("bij,bj->bi", p["R"], cb)
    A = M @ M.transpose(1, 2)
    e = cw[:, 2] - CAM_Z
    bounds = []
    for i in (0, 1):
        qa = A[:, 2, 2] - e * e
        qb = A[:, i, 2] - cw[:, i] * e
        qc = A[:, i, i] - cw[:, i] ** 2
        disc = (qb * qb - qa * qc).clamp(min=0.0).sqrt()
        k1, k2 = (-qb - disc) / qa, (-qb + disc) / qa
        lo_k, hi_k = torch.minimum(k1, k2) / TAN, torch.maximum(k1, k2) / TAN
        bounds.append((lo_k, hi_k))
    (u0, u1), (v0, v1) = bounds
    return (u0 + 1.0) * (0.5 * size) - 0.5, (u1 + 1.0) * (0.5 * size) - 0.5, \
        (1.0 - v1) * (0.5 * size) - 0.5, (1.0 - v0) * (0.5 * size) - 0.5


def _screen_union(*bbs):
    c0, c1, r0, r1 = bbs[0]
    for d0, d1, s0, s1 in bbs[1:]:
        c0, c1, r0, r1 = torch.minimum(c0, d0), torch.maximum(c1, d1), torch.minimum(r0, s0), torch.maximum(r1, s1)
    return c0, c1, r0, r1


def _screen_intersect(a, b):
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1]), torch.maximum(a[2], b[2]), torch.minimum(a[3], b[3])


def _win_head(p, size):
    zero = torch.zeros_like(p["a1"])
    kmax = 1.0 + JAW_DROP / p["f"]("chin_length")
    ym = p["ym"]
    jaw_box = ((-p["a2"], ym - p["f"]("chin_length") - JAW_DROP, -p["c2"]), (p["a2"], ym, p["c2"]))
    jaw = _screen_intersect(_screen_head_box(p, jaw_box, size),
                            _screen_ellipsoid(p, (zero, ym + (p["y2"] - ym) * kmax, zero),
                                              (p["a2"], p["b2"] * kmax, p["c2"]), size))
    bbs = [_screen_ellipsoid(p, (zero, zero, zero), (p["a1"], p["b1"], p["c1"]), size), jaw,
           _screen_head_box(p, _nose_box(p), size)]
    for s in (-1.0, 1.0):
        bbs.append(_screen_head_box(p, _ear_box(p, s), size))
    return _screen_union(*bbs)


def _win_neck(p, size):
    """The neck's box in body space (world = centre + scale * body, no rotation)."""
    nrx, nrz = p["neck_r"]
    box = (-nrx, p["torso_c"][1], -0.1 - nrz), (nrx, torch.full_like(nrx, -0.25), -0.1 + nrz)
    eye = torch.eye(3, device=nrx.device).expand(p["R"].shape[0], 3, 3)
    return _screen_head_box(dict(p, R=eye), box, size)


_WINDOWS = {  # name: (pixel bounds, parent window)
    "head": (_win_head, None),
    "hair": (lambda p, s: _screen_ellipsoid(p, p["hair_c"], p["hair_ax"], s), None),
    "back": (lambda p, s: _screen_ellipsoid(p, p["back_c"], p["back_ax"], s), None),
    "body": (lambda p, s: _screen_ellipsoid(p, p["torso_c"], p["torso_ax"], s, body=True), None),
    "neck": (_win_neck, None),
    "face": (lambda p, s: _screen_head_box(p, _face_box(p), s), "head"),
    "mouth": (lambda p, s: _screen_head_box(p, _mouth_box(p), s), "head"),
    "eye_r": (lambda p, s: _screen_head_box(p, _eye_window_box(p, -1.0), s), "head"),
    "eye_l": (lambda p, s: _screen_head_box(p, _eye_window_box(p, 1.0), s), "head"),
    "nose": (lambda p, s: _screen_head_box(p, _nose_box(p), s), "head"),
    "ear_r": (lambda p, s: _screen_head_box(p, _ear_box(p, -1.0), s), "head"),
    "ear_l": (lambda p, s: _screen_head_box(p, _ear_box(p, 1.0), s), "head"),
}


class _Window:
    """An (h, w) pixel window per sample, centred on pixel bounds (col0, col1, row0, row1), inside its parent
    window (or the frame). get/put gather from / scatter into tensors (B, [C,] ph, pw) of the parent."""

    def __init__(self, bounds, h: int, w: int, size: int, pix: float, parent: "_Window | None" = None):
        c0, c1, r0, r1 = bounds
        B = c0.shape[0]
        dev = c0.device
        if parent is None:
            px0 = py0 = torch.zeros(B, dtype=torch.long, device=dev)
            ph = pw = size
        else:
            px0, py0, ph, pw = parent.x0, parent.y0, parent.h, parent.w
        h, w = min(h, ph), min(w, pw)
        x0 = torch.round(0.5 * (c0 + c1) - 0.5 * (w - 1)).long()
        y0 = torch.round(0.5 * (r0 + r1) - 0.5 * (h - 1)).long()
        x0 = torch.minimum(torch.maximum(x0, px0), px0 + (pw - w))
        y0 = torch.minimum(torch.maximum(y0, py0), py0 + (ph - h))
        cols = x0.view(B, 1) + torch.arange(w, device=dev).view(1, w)
        rows = y0.view(B, 1) + torch.arange(h, device=dev).view(1, h)
        # exactly the renderer's full-frame pixel coordinates
        self.u = ((cols.float() + 0.5) * pix - 1.0).view(B, 1, w)
        self.v = (-((rows.float() + 0.5) * pix - 1.0)).view(B, h, 1)
        self.idx = ((rows - py0.view(B, 1)).view(B, h, 1) * pw + (cols - px0.view(B, 1)).view(B, 1, w)).reshape(
            B, 1, h * w)
        self.x0, self.y0, self.h, self.w, self.B, self.ph, self.pw = x0, y0, h, w, B, ph, pw
        self.cols, self.rows = cols, rows

    def get(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:
            return t.reshape(self.B, 1, -1).gather(2, self.idx).view(self.B, self.h, self.w)
        C = t.shape[1]
        return t.reshape(self.B, C, -1).gather(2, self.idx.expand(self.B, C, -1)).view(self.B, C, self.h, self.w)

    def put(self, t: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3:
            return t.reshape(self.B, 1, -1).scatter(2, self.idx, val.reshape(self.B, 1, -1)).view(
                self.B, self.ph, self.pw)
        C = t.shape[1]
        return t.reshape(self.B, C, -1).scatter(2, self.idx.expand(self.B, C, -1), val.reshape(self.B, C, -1)).view(
            self.B, C, self.ph, self.pw)

    def over(self, canvas: torch.Tensor, layer) -> torch.Tensor:
        """Composite a premultiplied window layer (C (B,3,h,w), alpha (B,1,h,w)) over the parent canvas."""
        return self.put(canvas, layer[0] + (1.0 - layer[1]) * self.get(canvas))


def _needed_windows(p, size: int, margin_px: float = 6.0) -> dict[str, tuple[int, int]]:
    """(h, w) per window that holds the projected box of every sample in the batch, rounded up to 8."""
    out = {}
    for name, (fn, _) in _WINDOWS.items():
        c0, c1, r0, r1 = fn(p, size)
        need_w = float((c1.clamp(-1, size) - c0.clamp(-1, size)).max()) + margin_px
        need_h = float((r1.clamp(-1, size) - r0.clamp(-1, size)).max()) + margin_px
        out[name] = (max(8, min(size, int(math.ceil(need_h / 8.0)) * 8)),
                     max(8, min(size, int(math.ceil(need_w / 8.0)) * 8)))
    return out


_WINDOW_CACHE: dict[int, dict[str, tuple[int, int]]] = {}


def static_window_sizes(size: int) -> dict[str, tuple[int, int]]:
    """Fixed window sizes for the compiled renderer (whose shapes are fixed): large enough for the corpus'
    identities (`sample_identity`, 384 draws) at the corners of the factor table's pose ranges, plus a
    margin. A batch that needs more (unusual identities or poses) is rendered eagerly instead."""
    if size in _WINDOW_CACHE:
        return _WINDOW_CACHE[size]
    rng = np.random.default_rng(0)
    ids = np.stack([sample_identity(rng) for _ in range(384)])
    lo, hi = _factors.ranges("pose")
    poses = np.array([(yw, pt, rl, tx, ty, hi[5]) for yw in (lo[0], hi[0]) for pt in (lo[1], 0.0, hi[1])
                      for rl in (lo[2], hi[2]) for tx in (lo[3], hi[3]) for ty in (lo[4], hi[4])], np.float32)
    ident = torch.as_tensor(np.repeat(ids, len(poses), 0), dtype=torch.float32)
    pose = torch.as_tensor(np.tile(poses, (len(ids), 1)))
    with torch.no_grad():
        out = _needed_windows(_derive(ident, pose), size, margin_px=6.0 + size / 16.0)
    _WINDOW_CACHE[size] = out
    return out


# ---------------------------------------------------------------------------------------- core
def _head_rays(p, u, v):
    """Head-space ray directions (3 x (B,h,w)), the unit view vector and the Blinn half vector."""
    dh = tuple(cu * u + (cv * v + c0) for (cu, cv, c0) in p["d_head_coef"])
    lh = p["light_head"]
    inv_len = (dh[0] * dh[0] + dh[1] * dh[1] + dh[2] * dh[2]).rsqrt()
    view = (-dh[0] * inv_len, -dh[1] * inv_len, -dh[2] * inv_len)
    hv = (lh[0] + view[0], lh[1] + view[1], lh[2] + view[2])
    inv_h = (hv[0] * hv[0] + hv[1] * hv[1] + hv[2] * hv[2]).clamp(min=1e-12).rsqrt()
    return dh, view, (hv[0] * inv_h, hv[1] * inv_h, hv[2] * inv_h)


def _shade(n, l, hv=None, amb=0.36, kd=0.74, ks=0.0):
    """Ambient + wrapped Lambert (+ Blinn-Phong, exponent 16, when ks > 0)."""
    s = amb + kd * ((_dot(n, l) + 0.3) * (1.0 / 1.3)).clamp(min=0.0)
    if ks:
        nh = _dot(n, hv).clamp(min=0.0)
        nh = nh * nh
        nh = nh * nh
        nh = nh * nh
        s = s + ks * nh * nh
    return s


def _neck(p, u, v):
    """The neck: a vertical elliptic cylinder in body space (x = 0, z = -0.1), cut above by the head.
    Premultiplied layer and depth (ray parameter) at pixels u (B,1,w), v (B,h,1). The anti-aliasing
    width is analytic so any window gives the same pixels."""
    B = p["R"].shape[0]
    ob = p["o_body"]
    isc = p["inv_s"]
    h, w = v.shape[1], u.shape[2]
    dx, dy, dz = (u * (TAN * isc)).expand(B, h, w), (v * (TAN * isc)).expand(B, h, w), (-isc).expand(B, h, w)
    nrx, nrz = p["neck_r"]
    lw = p["light_world"]
    ox, oz = ob[0] / nrx, (ob[2] + 0.1) / nrz
    ndx, ndz = dx / nrx, dz / nrz
    aa = ndx * ndx + ndz * ndz
    bb = ox * ndx + oz * ndz
    tc = -bb / aa
    rn2 = (ox * ox + oz * oz + bb * tc).clamp(min=0.0)
    tn = tc - ((1.0 - rn2).clamp(min=0.0) / aa).sqrt()
    px, py, pz = ob[0] + tn * dx, ob[1] + tn * dy, ob[2] + tn * dz
    nnx, nnz = px / (nrx * nrx), (pz + 0.1) / (nrz * nrz)
    ndl = (nnx * lw[0] + nnz * lw[2]) * (nnx * nnx + nnz * nnz).clamp(min=1e-12).rsqrt()
    shade = (0.3 + 0.62 * ((ndl + 0.3) / 1.3).clamp(min=0.0)) * (0.62 + 0.38 * _ss(-0.7, -1.1, py))
    fw = (2.0 / p["size"]) * TAN * isc * tn / nrx
    a = _cov(rn2.sqrt() - 1.0, fw) * _cov(py + 0.3, 0.05)
    return _layer(p["skin"] * 0.97, shade, a), tn


_TAU = 0.04  # soft depth-merge width (ray parameter) where nose and ears meet the face


def _render_core(u: torch.Tensor, v: torch.Tensor, pix: float, ident: torch.Tensor, pose: torch.Tensor,
                 eyes: torch.Tensor, mouth: torch.Tensor, expr: torch.Tensor,
                 wins: dict[str, tuple[int, int]], with_back: bool = True) -> torch.Tensor:
    """u (1,1,S), v (1,S,1) pixel-centre coordinates in [-1, 1] (y up); pix = 2/S; wins: window sizes;
    with_back=False skips the long back hair (only valid when no sample has hair_length > 0.25).
    Returns (B,3,S,S) in [0, 1]."""
    p = _derive(ident, pose)
    B = ident.shape[0]
    S = u.shape[2]
    p["size"] = S
    dev = ident.device
    f = p["f"]
    lh = p["light_head"]
    lw = p["light_world"]
    oh = p["o_head"]
    skin = p["skin"]
    zero = torch.zeros_like(p["a1"])
    foot = pix * TAN * p["inv_s"]  # head units per pixel per unit of the ray parameter

    def win(name, parent=None):
        return _Window(_WINDOWS[name][0](p, S), *wins[name], S, pix, parent)

    # ------------------------------------------------ background
    g = v * 0.5 + 0.5
    vig = 1.0 - 0.22 * (u * u + v * v)
    out = ((p["bg_bottom"] + (p["bg_top"] - p["bg_bottom"]) * g.unsqueeze(1)) * vig.unsqueeze(1)).expand(
        B, 3, S, S).contiguous()

    # ------------------------------------------------ long hair hanging behind the head and shoulders
    if with_back:
        w = win("back")
        dh, _, _ = _head_rays(p, w.u, w.v)
        tbk, _, _, rbk = _ellipsoid(oh, dh, p["back_c"], p["back_ax"])
        Pb = _point(oh, dh, tbk)
        nbk = _normal(Pb, p["back_c"], p["back_ax"])
        bottom = p["back_c"][1] - 0.75 * p["back_ax"][1] + 0.03 * torch.sin(Pb[0] * 23.0)
        a_back = (_cov(rbk - 1.0, _fwidth(rbk)) * _cov(bottom - Pb[1], foot * tbk + 0.02)
                  * _ss(0.25, 0.5, p["hair_len"]))
        out = w.over(out, _layer(p["hair"] * 0.8, _shade(nbk, lh, amb=0.35, kd=0.5)
                                 * _hair_color(Pb[0], Pb[1], -Pb[2], foot * tbk), a_back))

    # ------------------------------------------------ body space: neck and shoulders (not rotated)
    wb = win("body")
    ob_ = p["o_body"]
    isc = p["inv_s"]
    hb, ww = wb.h, wb.w
    db_ = ((wb.u * (TAN * isc)).expand(B, hb, ww), (wb.v * (TAN * isc)).expand(B, hb, ww), (-isc).expand(B, hb, ww))
    tcen, tax = p["torso_c"], p["torso_ax"]
    ts, _, _, rs = _ellipsoid(ob_, db_, tcen, tax)
    Ps = _point(ob_, db_, ts)
    ns = _normal(Ps, tcen, tax)
    neckline = _cov(((Ps[0] / 0.46) ** 2 + ((Ps[1] + 1.15) / 0.26) ** 2).sqrt() - 1.0, 0.05)
    tcol = p["cloth"] + (skin * 0.9 - p["cloth"]) * neckline.unsqueeze(1)
    out = wb.over(out, _layer(tcol, 0.32 + 0.7 * ((_dot(ns, lw) + 0.3) / 1.3).clamp(min=0.0),
                              _cov(rs - 1.0, _fwidth(rs))))
    # the neck meets the head by depth inside the head's window (the jaw hides the neck, the neck hides
    # the underside of the skull); outside it, it is simply composited
    wh = win("head")
    wn = win("neck")
    neck, _ = _neck(p, wn.u, wn.v)
    in_head = (((wn.cols >= wh.x0.view(B, 1)) & (wn.cols < (wh.x0 + wh.w).view(B, 1))).view(B, 1, -1)
               & ((wn.rows >= wh.y0.view(B, 1)) & (wn.rows < (wh.y0 + wh.h).view(B, 1))).view(B, -1, 1))
    neck = (neck[0] * (~in_head).unsqueeze(1), neck[1] * (~in_head).unsqueeze(1))

    # ------------------------------------------------ hair shell: inner (exit) hits now, front hits last
    whr = win("hair")
    dh, _, _ = _head_rays(p, whr.u, whr.v)
    hc, ha = p["hair_c"], p["hair_ax"]
    tf, tcf, halff, rf = _ellipsoid(oh, dh, hc, ha)
    a_shell = _cov(rf - 1.0, _fwidth(rf))
    hair_fw = foot * tf
    Px = _point(oh, dh, tcf + halff)
    out = whr.over(out, _layer(p["hair"] * 0.42, None, a_shell * _hair_mask_back(Px[0], Px[1], Px[2], hair_fw, p)))
    Pf = _point(oh, dh, tf)
    nf = _normal(Pf, hc, ha)
    sheen = 1.0 + 0.25 * _bump(((Pf[1] - hc[1] - 0.55 * ha[1]) / (0.18 * ha[1])) ** 2) * nf[2].clamp(0.0, 1.0)
    a_front = a_shell * _hair_mask(Pf[0], Pf[1], Pf[2], hair_fw, p)
    hair_shade = _shade(nf, lh, amb=0.4, kd=0.7) * _hair_color(Pf[0], Pf[1], Pf[2], hair_fw) * sheen
    hair_col = p["hair"] * hair_shade.unsqueeze(1)
    # first hits low on the back half of the shell (long hair seen from below / beside the neck) hang
    # behind the neck and the head
    front_side = 1.0 - _ss(0.05, -0.1, Pf[2]) * _ss(p["ym"] + 0.15, p["ym"] - 0.05, Pf[1])
    out = whr.over(out, _layer(hair_col, None, a_front * (1.0 - front_side)))
    hair_front = _layer(hair_col, None, a_front * front_side)
    out = wn.over(out, neck)

    # ------------------------------------------------ head: E1 above the lip line, E2 (jaw) below
    dh, view, hv = _head_rays(p, wh.u, wh.v)
    jaw = mouth[:, 0].view(B, 1, 1)
    kj = 1.0 + JAW_DROP * jaw / f("chin_length")
    ym = p["ym"]
    e1c, e1a = (zero, zero, zero), (p["a1"], p["b1"], p["c1"])
    e2c, e2a = (zero, ym + (p["y2"] - ym) * kj, zero), (p["a2"], p["b2"] * kj, p["c2"])
    t1, _, _, r1 = _ellipsoid(oh, dh, e1c, e1a)
    t2, _, _, r2 = _ellipsoid(oh, dh, e2c, e2a)
    upper = (oh[1] + t1 * dh[1]) >= ym
    th = torch.where(upper, t1, t2)
    rh = torch.where(upper, r1, r2)
    a_head = _cov(rh - 1.0, _fwidth(rh))
    P = _point(oh, dh, th)
    n1 = _normal(P, e1c, e1a)
    n2 = _normal(P, e2c, e2a)
    nhd = tuple(torch.where(upper, a, b) for a, b in zip(n1, n2))
    fw = foot * th * _dot(nhd, view).clamp(min=0.12).rsqrt()

    # ------------------------------------------------ face texture, each part in its window inside the head's
    alb = skin.expand(B, 3, wh.h, wh.w).contiguous()
    fshade = torch.ones(B, wh.h, wh.w, device=dev)
    w = win("face", wh)
    blush, sh = _face_base(w.get(P[0]), w.get(P[1]), w.get(fw), p, expr)
    red = skin * torch.tensor([1.0, 0.72, 0.72], device=dev).view(1, 3, 1, 1)
    alb = w.put(alb, skin + (red - skin) * blush.unsqueeze(1))
    fshade = w.put(fshade, sh)
    smile, frown = expr[:, 2].view(B, 1, 1), expr[:, 3].view(B, 1, 1)
    w = win("mouth", wh)
    alb = w.put(alb, _mouth(w.get(alb), w.get(P[0]), w.get(P[1]), w.get(fw), p, jaw, mouth[:, 1].view(B, 1, 1),
                            mouth[:, 2].view(B, 1, 1), smile, frown))
    gx, gy = eyes[:, 0].view(B, 1, 1), eyes[:, 1].view(B, 1, 1)
    squint, br_raise, br_furrow = expr[:, 5].view(B, 1, 1), expr[:, 0].view(B, 1, 1), expr[:, 1].view(B, 1, 1)
    for sx, name, lid_col in ((-1.0, "eye_r", 3), (1.0, "eye_l", 2)):  # subject's right eye (x<0): lid_right
        w = win(name, wh)
        xw, yw, fww = w.get(P[0]), w.get(P[1]), w.get(fw)
        a = _eye(w.get(alb), xw, yw, fww, p, sx, gx, gy, eyes[:, lid_col].view(B, 1, 1), squint, lw[0])
        alb = w.put(alb, _brow(a, xw, yw, fww, p, sx, br_raise, br_furrow))
    face = _layer(alb, fshade * _shade(nhd, lh, hv, ks=0.1), a_head)

    # ------------------------------------------------ nose (bridge, alae, tip) merged by depth, in its window
    w = win("nose", wh)
    dw, _, hvw = _head_rays(p, w.u, w.v)
    thw = w.get(th)
    ct, st = torch.cos(p["nose_tilt"]), torch.sin(p["nose_tilt"])
    bc = p["nose_bridge_c"]
    ob = (oh[0] - bc[0], (oh[1] - bc[1]) * ct + (oh[2] - bc[2]) * st, -(oh[1] - bc[1]) * st + (oh[2] - bc[2]) * ct)
    db = (dw[0], dw[1] * ct + dw[2] * st, -dw[1] * st + dw[2] * ct)
    tb, _, _, rb = _ellipsoid(ob, db, (zero, zero, zero), p["nose_bridge_ax"])
    nb_ = _normal(_point(ob, db, tb), (zero, zero, zero), p["nose_bridge_ax"])
    nb_ = (nb_[0], nb_[1] * ct - nb_[2] * st, nb_[1] * st + nb_[2] * ct)
    nose = _soft_z(_layer(skin, _shade(nb_, lh, hvw, ks=0.12), _cov(rb - 1.0, _fwidth(rb))), tb,
                   (w.get(face[0]), w.get(face[1])), thw, _TAU)
    nose_t = torch.minimum(tb, thw)
    tip_col = skin * torch.tensor([1.0, 0.96, 0.95], device=dev).view(1, 3, 1, 1)
    for s in (-1.0, 1.0):
        ac = (s * p["ala_c"][0], p["ala_c"][1], p["ala_c"][2])
        ta, _, _, ra = _ellipsoid(oh, dw, ac, p["ala_ax"])
        na = _normal(_point(oh, dw, ta), ac, p["ala_ax"])
        nose = _soft_z(_layer(tip_col, _shade(na, lh, hvw, ks=0.04), _cov(ra - 1.0, _fwidth(ra))), ta, nose, nose_t,
                       _TAU)
        nose_t = torch.minimum(nose_t, ta)
    tc_, tax = p["nose_tip_c"], p["nose_tip_ax"]
    tt, _, _, rt = _ellipsoid(oh, dw, tc_, tax)
    Pt = _point(oh, dw, tt)
    ntip = _normal(Pt, tc_, tax)
    qx, qy = (Pt[0] - tc_[0]) / tax[0], (Pt[1] - tc_[1]) / tax[1]
    nostrils = _bump(((qx.abs() - 0.5) / 0.32) ** 2 + ((qy + 0.78) / 0.3) ** 2)
    tip = _layer(tip_col, _shade(ntip, lh, hvw, ks=0.06) * (1.0 - 0.75 * nostrils), _cov(rt - 1.0, _fwidth(rt)))
    nose = _soft_z(tip, tt, nose, nose_t, _TAU)
    face = (w.put(face[0], nose[0]), w.put(face[1], nose[1]))

    # ------------------------------------------------ ears, in their windows
    ear_col = skin * torch.tensor([0.97, 0.9, 0.88], device=dev).view(1, 3, 1, 1)
    for s, name in ((-1.0, "ear_r"), (1.0, "ear_l")):
        w = win(name, wh)
        dw, _, _ = _head_rays(p, w.u, w.v)
        ec = (s * p["ear_c"][0], p["ear_c"][1], p["ear_c"][2])
        te, _, _, re = _ellipsoid(oh, dw, ec, p["ear_ax"])
        Pe = _point(oh, dw, te)
        ne = _normal(Pe, ec, p["ear_ax"])
        qy = (Pe[1] - ec[1]) / p["ear_ax"][1]
        qz = (Pe[2] - ec[2]) / p["ear_ax"][2]
        inner = _bump((qy / 0.62) ** 2 + ((qz - 0.05) / 0.55) ** 2) * (ne[0] * s).clamp(0.0, 1.0)
        ear = _layer(ear_col, _shade(ne, lh) * (1.0 - 0.35 * inner), _cov(re - 1.0, _fwidth(re)))
        merged = _soft_z(ear, te, (w.get(face[0]), w.get(face[1])), w.get(th), _TAU)
        face = (w.put(face[0], merged[0]), w.put(face[1], merged[1]))

    # ------------------------------------------------ composition of the head and the hair in front of it
    under = wh.get(out)
    nk, neck_t = _neck(p, wh.u, wh.v)
    w_neck = ((th - neck_t) / _TAU * 0.5 + 0.5).clamp(0.0, 1.0).unsqueeze(1)  # 1: the neck is in front
    head_first = _over(face, _over(nk, (under, torch.ones_like(nk[1]))))[0]
    neck_first = _over(nk, _over(face, (under, torch.ones_like(nk[1]))))[0]
    out = wh.put(out, head_first + (neck_first - head_first) * w_neck)
    out = whr.over(out, hair_front)
    return out.clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------- region masks
def _box_hit(o, d, lo, hi) -> torch.Tensor:
    """Does the ray o + t d (t > 0) pass through the axis-aligned box [lo, hi]? (B,H,W) bool."""
    tmin = None
    tmax = None
    for i in range(3):
        di = torch.where(d[i].abs() < 1e-9, torch.full_like(d[i], 1e-9), d[i])
        ta = (lo[i] - o[i]) / di
        tb = (hi[i] - o[i]) / di
        lo_t, hi_t = torch.minimum(ta, tb), torch.maximum(ta, tb)
        tmin = lo_t if tmin is None else torch.maximum(tmin, lo_t)
        tmax = hi_t if tmax is None else torch.minimum(tmax, hi_t)
    return tmax >= tmin.clamp(min=0.0)


def _jaw_hit(p, o, d, m) -> torch.Tensor:
    """Rays whose pixel can depend on the jaw opening: the renderer shades a ray with the jaw ellipsoid
    only when its cranium hit (or closest approach) lies below the lip line, and the jaw, open or closed,
    stays inside its fully open ellipsoid (grown by m)."""
    zero = torch.zeros_like(p["ym"])
    t1, _, _, _ = _ellipsoid(o, d, (zero, zero, zero), (p["a1"], p["b1"], p["c1"]))
    below = (o[1] + t1 * d[1]) < p["ym"] + m
    kmax = 1.0 + JAW_DROP / p["f"]("chin_length")
    ym = p["ym"]
    c = (zero, ym + (p["y2"] - ym) * kmax, zero)
    _, _, _, r = _ellipsoid(o, d, c, (p["a2"] + m, p["b2"] * kmax + m, p["c2"] + m))
    return below & (r < 1.0)


def _region(p, group: str, o, d, pix: float) -> torch.Tensor:
    """Pixels whose colour may depend on `group`. Texture: the renderer paints a feature at the cranium's
    hit point (x, y) of a ray (or its closest approach near the silhouette), so a ray counts when that
    point lies in the feature's box (grown by a few pixel footprints). Rays that the renderer shades with
    the jaw (below the lip line) count for the mouth group when they pass near the jaw's fully open
    ellipsoid, and for expression too (its texture reaches below the lip line)."""
    zero = torch.zeros_like(p["a1"])
    e1 = (p["a1"], p["b1"], p["c1"])
    t1, _, _, r1 = _ellipsoid(o, d, (zero, zero, zero), e1)
    x, y = o[0] + t1 * d[0], o[1] + t1 * d[1]
    foot = pix * TAN * p["inv_s"] * t1  # head units per pixel at the hit
    m = 3.5 * foot + 0.01  # the texture's anti-aliasing reaches ~1 footprint / sqrt(n.v) beyond its shapes
    upper = (y >= p["ym"] - m) & (r1 < 1.0 + 3.0 * foot / torch.minimum(p["a1"], p["c1"]))

    def in_boxes(boxes):
        hit = torch.zeros_like(upper)
        for lo, hi in boxes:
            hit = hit | ((x > lo[0] - m) & (x < hi[0] + m) & (y > lo[1] - m) & (y < hi[1] + m))
        return hit & upper

    m3 = 3.0 * pix * TAN * CAM_Z * p["inv_s"] + 0.005
    if group == "eyes":
        return in_boxes([_eye_box(p, -1.0), _eye_box(p, 1.0)])
    if group == "brows":  # the eye windows: lids, irises and the brows above them (a squint moves them)
        return in_boxes([_eye_window_box(p, -1.0), _eye_window_box(p, 1.0)])
    if group == "mouth":
        return in_boxes([_mouth_box(p)]) | _jaw_hit(p, o, d, m3)
    # expression: face texture, brows + eyes (squint), mouth corners
    return (in_boxes([_face_box(p), _eye_window_box(p, -1.0), _eye_window_box(p, 1.0), _mouth_box(p)])
            | _jaw_hit(p, o, d, m3))


# ---------------------------------------------------------------------------------------- API
class FaceRenderer:
    """Batched procedural face renderer. See the module docstring for geometry and conventions.

    `compile=True` wraps the core in `torch.compile` with fixed window sizes (`static_window_sizes`): the
    first call per batch size compiles (1.5-3 minutes on the 2-core CPU machine), batches whose windows do
    not fit those sizes and any compilation failure fall back to eager (`last_path` says which ran).
    Eager is the default. Small renders on a busy machine run faster with `torch.set_num_threads(1)`.
    """

    def __init__(self, size: int = 256, device: str | torch.device = "cpu", compile: bool = False):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or size % 8:
            raise InputError(f"renderer size must be a positive multiple of 8, got {size!r}")
        self.size = int(size)
        self.device = torch.device(device)
        s = self.size
        c = (torch.arange(s, dtype=torch.float32, device=self.device) + 0.5) * (2.0 / s) - 1.0
        self._u = c.view(1, 1, s).contiguous()
        self._v = (-c).view(1, s, 1).contiguous()
        self._pix = 2.0 / s
        self._low = torch.as_tensor(IDENTITY_LOW, device=self.device)
        self._high = torch.as_tensor(IDENTITY_HIGH, device=self.device)
        self._core = _render_core
        self.compiled = False
        self.last_path = ""  # "eager" or "compiled": how the last batch was rendered
        if compile:
            try:
                self._wins = static_window_sizes(s)
                self._core = torch.compile(_render_core, dynamic=False)
                self.compiled = True
            except Exception:  # pragma: no cover - depends on the toolchain
                self._core = _render_core

    # -------------------------------------------------------------- input handling
    def _tensor(self, x, name: str) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.detach().to(device=self.device, dtype=torch.float32)
        try:
            return torch.as_tensor(np.asarray(x, dtype=np.float32), device=self.device)
        except (TypeError, ValueError) as e:
            raise InputError(f"{name}: expected a float array, got {type(x).__name__}") from e

    def _group(self, x, group: str) -> torch.Tensor:
        D = _GROUP_DIMS[group]
        neutral = torch.as_tensor(_NEUTRAL[group], device=self.device).view(1, D)
        if x is None:
            return neutral
        t = self._tensor(x, group)
        if t.dim() == 1:
            t = t.view(1, -1)
        if t.dim() != 2 or t.shape[1] != D:
            raise InputError(f"{group}: expected shape (B, {D}), got {tuple(t.shape)}")
        t = torch.where(torch.isnan(t), neutral, t)
        lo, hi = CLAMP_RANGES[group]
        lo_t, hi_t = torch.tensor(lo, device=self.device), torch.tensor(hi, device=self.device)
        return torch.minimum(torch.maximum(t, lo_t), hi_t)

    def _identity(self, x) -> torch.Tensor:
        t = self._tensor(x, "identity")
        if t.dim() == 1:
            t = t.view(1, -1)
        if t.dim() != 2 or t.shape[1] != IDENTITY_DIM:
            raise InputError(f"identity: expected shape (B, {IDENTITY_DIM}) or ({IDENTITY_DIM},), got {tuple(t.shape)}")
        t = torch.where(torch.isnan(t), (self._low + self._high) * 0.5, t)
        return torch.minimum(torch.maximum(t, self._low), self._high)

    @staticmethod
    def _batch(*ts: torch.Tensor) -> list[torch.Tensor]:
        B = max(t.shape[0] for t in ts)
        out = []
        for t in ts:
            if t.shape[0] == B:
                out.append(t.contiguous())
            elif t.shape[0] == 1:
                out.append(t.expand(B, -1).contiguous())
            else:
                raise InputError(f"batch sizes differ: {[t.shape[0] for t in ts]} (each must be B or 1)")
        return out

    # -------------------------------------------------------------- rendering
    @torch.no_grad()
    def render(self, identity, pose=None, eyes=None, mouth=None, expression=None) -> torch.Tensor:
        """identity (B, IDENTITY_DIM) or (IDENTITY_DIM,) broadcast; pose (B, 6); eyes (B, 4); mouth (B, 3);
        expression (B, 6) -- columns as in factors.FACTOR_GROUPS, tensors or numpy float32 (None: neutral;
        a single row broadcasts). Out-of-range values are clamped (`CLAMP_RANGES`), NaN reads as neutral.
        Returns (B, 3, size, size) float32 in [0, 1] on the renderer's device."""
        ident = self._identity(identity)
        groups = [self._group(x, g) for x, g in ((pose, "pose"), (eyes, "eyes"), (mouth, "mouth"),
                                                 (expression, "expression"))]
        args = self._batch(ident, *groups)
        # windows just large enough for this batch (any size gives the same pixels), and no long back hair
        # when nobody in the batch has long hair (it would be fully transparent)
        wins = _needed_windows(_derive(args[0], args[1]), self.size)
        if self.compiled and all(wins[k][0] <= self._wins[k][0] and wins[k][1] <= self._wins[k][1] for k in wins):
            try:
                out = self._core(self._u, self._v, self._pix, *args, self._wins, True)
                self.last_path = "compiled"
                return out
            except Exception:  # pragma: no cover - depends on the toolchain
                self._core, self.compiled = _render_core, False  # the compiled path failed: eager from now on
        with_back = bool((args[0][:, FIELD_INDEX["hair_length"]] > 0.25).any())
        self.last_path = "eager"
        return _render_core(self._u, self._v, self._pix, *args, wins, with_back)

    @torch.no_grad()
    def region_mask(self, identity, pose, group: str) -> torch.Tensor:
        """(B, 1, size, size) bool: where factor group `group` ('eyes', 'mouth', 'expression') may change
        pixels at this pose, for any values of the group (and of the other groups): the eye regions with
        lids (eyes), lips, mouth opening and the jaw/chin with the space it sweeps (mouth), the face
        (expression). 'pose' gives all True (pose moves everything). 'brows' is not a factor group: the
        eye windows with the brows (eyes and the squint of an expression; the trainer's region loss)."""
        if group not in ("eyes", "mouth", "expression", "pose", "brows"):
            raise InputError("region_mask: group must be 'eyes', 'mouth', 'expression', 'pose' or 'brows', "
                             f"got {group!r}")
        ident, pose_t = self._batch(self._identity(identity), self._group(pose, "pose"))
        B, S = ident.shape[0], self.size
        if group == "pose":
            return torch.ones(B, 1, S, S, dtype=torch.bool, device=self.device)
        p = _derive(ident, pose_t)
        dh = tuple(cu * self._u + (cv * self._v + c0) for (cu, cv, c0) in p["d_head_coef"])
        hit = _region(p, group, p["o_head"], dh, self._pix)
        # one more pixel of dilation for screen-space anti-aliasing of silhouettes
        return torch.nn.functional.max_pool2d(hit.float().unsqueeze(1), 3, 1, 1) > 0.5


def _project(p: dict[str, Any], pts: torch.Tensor) -> torch.Tensor:
    """Head-space points (B,K,3) -> (B,K,2) grid_sample coordinates (x right, y down, -1..1) at p's pose."""
    b = pts.shape[0]
    world = p["centre"].view(b, 1, 3) + p["scale"].view(b, 1, 1) * torch.einsum("bij,bkj->bki", p["R"], pts)
    depth = (CAM_Z - world[..., 2]).clamp(min=1e-3) * TAN
    return torch.stack([world[..., 0] / depth, -world[..., 1] / depth], -1)


def _on_surface(p: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,1,1) head-space x, y -> (B,3): the point on the face's front surface (cranium or jaw) there."""
    b = x.shape[0]
    return torch.cat([x, y, _surface_zmax(p, x, x, y, y) - 0.03], -1).view(b, 3)


def anchor_points(ident: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """(B,3,2) grid_sample coordinates (x right, y down, -1..1 over the image) of three anchors at `pose`:
    the eye at x = -eye_spacing (subject's right, lid_right), the eye at +eye_spacing (subject's left,
    lid_left), and the mouth centre; each on the face's front surface. ident (B,F), pose (B,6) as `render`."""
    ident = torch.as_tensor(ident, dtype=torch.float32)
    pose = torch.as_tensor(pose, dtype=torch.float32)
    p = _derive(ident, pose)
    f = p["f"]
    pts = [_on_surface(p, x, y) for x, y in ((-f("eye_spacing"), f("eye_y")), (f("eye_spacing"), f("eye_y")),
                                             (torch.zeros_like(f("mouth_y")), f("mouth_y")))]
    return _project(p, torch.stack(pts, 1))


# the landmarks `landmark_points` gives (E_mot's keypoint branch is supervised with them): points that pose moves
# and no other factor does (the chin is taken at the shut jaw's; an open jaw moves the real chin a little)
LANDMARKS: tuple[str, ...] = ("eye_right", "eye_left", "mouth", "nose_tip", "chin", "forehead", "cheek_right",
                              "cheek_left")


def landmark_points(ident: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """(B, len(LANDMARKS), 2) grid_sample coordinates (x right, y down, -1..1) of the face's landmarks at `pose`
    (in the order of LANDMARKS; "right"/"left" are the subject's). ident (B,F), pose (B,6) as `render`."""
    ident = torch.as_tensor(ident, dtype=torch.float32)
    pose = torch.as_tensor(pose, dtype=torch.float32)
    p = _derive(ident, pose)
    f = p["f"]
    es, ey, my, a1 = f("eye_spacing"), f("eye_y"), f("mouth_y"), f("head_width")
    zero = torch.zeros_like(ey)
    b = ident.shape[0]
    tip = torch.cat([p["nose_tip_c"][0], p["nose_tip_c"][1], p["nose_tip_c"][2] + p["nose_tip_ax"][2]], -1).view(b, 3)
    cheek_y = 0.5 * (ey + my) - 0.05
    pts = [_on_surface(p, -es, ey), _on_surface(p, es, ey), _on_surface(p, zero, my), tip,
           _on_surface(p, zero, p["chin"] + 0.05), _on_surface(p, zero, ey + 0.42),
           _on_surface(p, -0.72 * a1, cheek_y), _on_surface(p, 0.72 * a1, cheek_y)]
    return _project(p, torch.stack(pts, 1))
