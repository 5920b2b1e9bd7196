"""Fused warp: bilinear sampling of cached avatar features by a predicted flow, occlusion blend and the
concatenation the generator's refine net reads, in one pass.

``warp_cat(feat, flow, occ, extra, extra_first=...)`` computes (reference semantics, pure PyTorch)::

    flow, occ = bilinear_upsample(flow, occ -> feat's H x W)    # only when their size differs
    w = grid_sample(feat, identity_grid + flow, bilinear, padding_mode="border", align_corners=False)
    w = w * occ                                                  # when occ is given
    out = cat([w, nearest_upsample(extra)]) or cat([nearest_upsample(extra), w])   # when extra is given

which is what ``engine.networks.Generator`` does in ``warp`` + the start of ``refine`` with
grid_sample + interpolate + mul + cat (5-8 launches and as many round trips through memory). The Triton
kernel computes the flow/occlusion interpolation, the 4-tap gather, the occlusion product and the copy of
`extra` per output pixel and writes the concatenated tensor once.

Shapes: feat (B, C, H, W); flow (B, 2, h, w) in normalised grid units (x then y; backward warp: output p
samples feat at p + flow(p)); occ (B, 1, h, w); extra (B, Ce, he, we) with H % he == W % we == 0.
Output (B, C [+ Ce], H, W) in feat's dtype. Inputs may be strided (e.g. an avatar expanded to a batch).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from kernels._triton import choose

__all__ = ["warp_cat", "warp_cat_reference", "warp_cat_triton", "base_grid"]


@lru_cache(maxsize=32)
def base_grid(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Identity sampling grid (1, h, w, 2) for grid_sample(align_corners=False): pixel centres in [-1, 1]
    (computed in float32, then cast: the same values as engine.networks' cached grids). Read-only."""
    vy = (torch.arange(h, dtype=torch.float32) * 2 + 1) / h - 1
    vx = (torch.arange(w, dtype=torch.float32) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(vy, vx, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0).to(device=device, dtype=dtype)


def _check(feat: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None, extra: torch.Tensor | None) -> None:
    if feat.dim() != 4:
        raise ValueError(f"feat must be (B, C, H, W), got {tuple(feat.shape)}")
    b, _, h, w = feat.shape
    if flow.dim() != 4 or flow.shape[:2] != (b, 2):
        raise ValueError(f"flow must be (B={b}, 2, h, w), got {tuple(flow.shape)}")
    if occ is not None and tuple(occ.shape) != (b, 1, *flow.shape[2:]):
        raise ValueError(f"occ must be (B={b}, 1, {flow.shape[2]}, {flow.shape[3]}) like flow, got {tuple(occ.shape)}")
    if extra is not None:
        if extra.dim() != 4 or extra.shape[0] != b:
            raise ValueError(f"extra must be (B={b}, Ce, he, we), got {tuple(extra.shape)}")
        if h % extra.shape[2] or w % extra.shape[3]:
            raise ValueError(f"extra's size {tuple(extra.shape[2:])} must divide feat's size {(h, w)}")
    for name, t in (("flow", flow), ("occ", occ), ("extra", extra)):
        if t is not None and (t.dtype != feat.dtype or t.device != feat.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}, feat is {feat.dtype} on {feat.device}; "
                             "they must match")


def warp_cat_reference(feat: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None = None,
                       extra: torch.Tensor | None = None, extra_first: bool = False) -> torch.Tensor:
    """Pure-PyTorch definition (the module doc); the CPU fallback and the ground truth of the tests."""
    _check(feat, flow, occ, extra)
    h, w = feat.shape[2:]
    if tuple(flow.shape[2:]) != (h, w):
        flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False)  # (B,2,H,W)
        if occ is not None:
            occ = F.interpolate(occ, size=(h, w), mode="bilinear", align_corners=False)  # (B,1,H,W)
    grid = base_grid(h, w, flow.dtype, flow.device) + flow.permute(0, 2, 3, 1)  # (B,H,W,2)
    out = F.grid_sample(feat, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B,C,H,W)
    if occ is not None:
        out = out * occ
    if extra is None:
        return out
    if tuple(extra.shape[2:]) != (h, w):
        extra = F.interpolate(extra, size=(h, w), mode="nearest")  # (B,Ce,H,W)
    return torch.cat([extra, out] if extra_first else [out, extra], dim=1)  # (B,C+Ce,H,W)


def warp_cat_triton(feat: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None = None,
                    extra: torch.Tensor | None = None, extra_first: bool = False) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1); forward only."""
    _check(feat, flow, occ, extra)
    from kernels._warp_triton import launch  # noqa: PLC0415 (imports triton)

    return launch(feat, flow, occ, extra, extra_first)


def warp_cat(feat: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None = None,
             extra: torch.Tensor | None = None, extra_first: bool = False, *, impl: str = "auto") -> torch.Tensor:
    """`warp_cat_reference`'s result, by the Triton kernel on CUDA and the reference elsewhere
    (rule: kernels._triton.choose; impl = "auto" | "triton" | "reference")."""
    if choose("warp_cat", impl, feat, flow, occ, extra):
        return warp_cat_triton(feat, flow, occ, extra, extra_first)
    return warp_cat_reference(feat, flow, occ, extra, extra_first)
