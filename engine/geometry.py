"""Head pose as computed geometry: the backward flow that moves a head from one pose to another.

The camera and pose conventions are the synthetic corpus' (`trainer.corpus.face`), which is also the
framing real portraits are aligned to: a pinhole camera at z = CAM_Z looking down -z, the visible height
at the head's depth 2 * VIEW_HALF, the head centre HEAD_Y above the image centre at zero pose; pose
[yaw, pitch, roll] in degrees with R = Rz(roll) @ Rx(pitch) @ Ry(yaw) about the head centre, [tx, ty]
as fractions of the image size and a scale relative to the canonical framing.

`pose_flow(target_pose, source_pose, n)` casts one ray per output pixel at an n x n grid into a generic
head ellipsoid (`axes`: HEAD_AXES, or a model's `head_axes`) posed at the target, maps
the hit point back to the source pose and projects it: a backward warp in `grid_sample` units (output
pixel p samples the source at p + flow(p)). Rays that miss the head fade (over HEAD_FADE in the
ellipsoid's unit-sphere distance) into the body's motion, which follows translation and scale but not
rotation, as the renderer's neck and shoulders do. This is LivePortrait's idea of applying pose
analytically to keypoints, made dense: the generator only learns the residual (identity-specific head
shape, hair, occlusion) instead of the whole rotation.

Everything is elementwise tensor arithmetic (exports to ONNX, runs on any backend).
"""

from __future__ import annotations

import math

import torch

# camera and framing of the corpus (trainer.corpus.face: CAM_Z, VIEW_HALF, HEAD_Y; kept equal by a test)
CAM_Z = 6.0
VIEW_HALF = 1.55
HEAD_Y = 0.10
TAN = VIEW_HALF / CAM_Z
# generic head ellipsoid (head space, centred on the head centre): the corpus' mean cranium + a little hair. The
# shipped G was trained with it (the default when a model's `head_axes` is empty)
HEAD_AXES = (0.80, 1.08, 0.92)
# the corpus' mean cranium (trainer.corpus.face_identity's sampler: head_width 0.66-0.82, head_height 0.96-1.08,
# head_depth 0.82-0.94), the surface the face is painted on. Moving a rendered face by the warp alone, it beats
# HEAD_AXES by 1.0-1.8 dB in the face region at 10-30 deg of turn (the face's own cranium: 1.5-2.6 dB): the hair's
# margin made the ellipsoid too big for the features on it (README "The warp's head"; a model opts in with
# ModelConfig.head_axes)
CRANIUM_AXES = (0.74, 1.02, 0.88)
HEAD_FADE = 0.18  # unit-sphere distance over which a ray that misses the head blends into the body's motion


def rotation(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """(B,) angles in degrees -> (B, 3, 3) R = Rz(roll) @ Rx(pitch) @ Ry(yaw) (the corpus' convention)."""
    d = math.pi / 180.0
    cy, sy = torch.cos(yaw * d), torch.sin(yaw * d)
    cp, sp = torch.cos(pitch * d), torch.sin(pitch * d)
    cr, sr = torch.cos(roll * d), torch.sin(roll * d)
    z, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    ry = torch.stack([cy, z, sy, z, one, z, -sy, z, cy], -1).view(-1, 3, 3)
    rx = torch.stack([one, z, z, z, cp, sp, z, -sp, cp], -1).view(-1, 3, 3)
    rz = torch.stack([cr, -sr, z, sr, cr, z, z, z, one], -1).view(-1, 3, 3)
    return rz @ rx @ ry


def _centre(pose: torch.Tensor) -> torch.Tensor:
    """(B, 6) physical pose -> (B, 3) world head centre."""
    return torch.stack([pose[:, 3] * (2 * VIEW_HALF), pose[:, 4] * (2 * VIEW_HALF) + HEAD_Y,
                        torch.zeros_like(pose[:, 3])], -1)


def pixel_grid(n: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres of an n x n image: u (1, n, n) to the right, v (1, n, n) up, both in (-1, 1)."""
    c = (torch.arange(n, device=device, dtype=dtype) * 2 + 1) / n - 1
    v, u = torch.meshgrid(-c, c, indexing="ij")
    return u.unsqueeze(0), v.unsqueeze(0)


def pose_flow(target: torch.Tensor, source: torch.Tensor, n: int,
              axes: tuple[float, float, float] = HEAD_AXES) -> torch.Tensor:
    """Backward flow (B, 2, n, n) in grid_sample units that moves a head at pose `source` to pose `target`.

    target, source: (B, 6) physical poses [yaw, pitch, roll (deg), tx, ty (fractions of the image), scale];
    axes: the head ellipsoid's half-axes (x, y, z) in head units.
    """
    u, v = pixel_grid(n, target.device, target.dtype)  # (1,n,n)
    b = target.shape[0]
    r_t = rotation(target[:, 0], target[:, 1], target[:, 2])  # (B,3,3)
    r_s = rotation(source[:, 0], source[:, 1], source[:, 2])
    c_t, c_s = _centre(target), _centre(source)  # (B,3)
    s_t, s_s = target[:, 5].clamp(min=0.5), source[:, 5].clamp(min=0.5)  # (B,)

    def col(x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,1,1)
        return x.view(b, 1, 1)

    # ray in world space: o = (0, 0, CAM_Z), d = (u TAN, v TAN, -1); in target head space: R^T (x - c) / s
    rel = torch.stack([-c_t[:, 0], -c_t[:, 1], CAM_Z - c_t[:, 2]], -1)  # (B,3) o - c
    o_h = (r_t.transpose(1, 2) @ rel.unsqueeze(-1)).squeeze(-1) / s_t.view(b, 1)  # (B,3) R^T (o - c) / s
    dw = (u * TAN, v * TAN, -torch.ones_like(u))  # 3 x (1,n,n)
    d_h = [(col(r_t[:, 0, i]) * dw[0] + col(r_t[:, 1, i]) * dw[1] + col(r_t[:, 2, i]) * dw[2]) / col(s_t)
           for i in range(3)]  # 3 x (B,n,n)
    ax = tuple(float(a) for a in axes)
    ox, oy, oz = (col(o_h[:, i]) / ax[i] for i in range(3))
    dx, dy, dz = (d_h[i] / ax[i] for i in range(3))
    a = dx * dx + dy * dy + dz * dz
    bb = ox * dx + oy * dy + oz * dz
    tc = -bb / a
    r2 = (ox * ox + oy * oy + oz * oz + bb * tc).clamp(min=0.0)
    t = tc - ((1.0 - r2).clamp(min=0.0) / a).sqrt()  # front hit (closest approach on a miss)
    h = [col(o_h[:, i]) + t * d_h[i] for i in range(3)]  # head-space point (B,n,n)
    # back to the world at the source pose: x = c_s + s_s R_s h
    w = [col(c_s[:, i]) + col(s_s) * (col(r_s[:, i, 0]) * h[0] + col(r_s[:, i, 1]) * h[1] + col(r_s[:, i, 2]) * h[2])
         for i in range(3)]
    depth = (CAM_Z - w[2]).clamp(min=1e-3) * TAN
    u_head, v_head = w[0] / depth, w[1] / depth
    # body: a point of the plane z = 0 follows translation and scale only
    k = col(s_s / s_t)
    bx = col(c_s[:, 0]) + k * (u * (TAN * CAM_Z) - col(c_t[:, 0]))
    by = col(c_s[:, 1]) + k * (v * (TAN * CAM_Z) - col(c_t[:, 1]))
    u_body, v_body = bx / (TAN * CAM_Z), by / (TAN * CAM_Z)
    wh = ((1.0 + HEAD_FADE - r2.sqrt()) / HEAD_FADE).clamp(0.0, 1.0)  # 1 on the head, 0 beyond the fade
    us = wh * u_head + (1.0 - wh) * u_body
    vs = wh * v_head + (1.0 - wh) * v_body
    return torch.stack([us - u, -(vs - v)], 1)  # grid x = u, grid y = -v
