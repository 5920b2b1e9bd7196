"""Triton kernel of kernels.warp.warp_cat (imported lazily: this module imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMS = 2048  # output elements per program: BLOCK_C channels x BLOCK_P pixels
MAX_BLOCK_C = 8  # channels per program (fewer for 3-channel images)
NUM_WARPS = 4


@triton.jit
def _lerp4(ptr, o00, o01, o10, o11, w00, w01, w10, w11, mask):
    """Bilinear blend of the 4 taps ptr + o.. with weights w.. (float32)."""
    return (w00 * tl.load(ptr + o00, mask=mask, other=0.0).to(tl.float32)
            + w01 * tl.load(ptr + o01, mask=mask, other=0.0).to(tl.float32)
            + w10 * tl.load(ptr + o10, mask=mask, other=0.0).to(tl.float32)
            + w11 * tl.load(ptr + o11, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _warp_cat_kernel(
    feat, flow, occ, extra, out,
    C, HI, WI, HF, WF, CE, HE, WE, HO, WO,
    scale_h, scale_w,  # HF / HO, WF / WO (bilinear upsampling of flow and occ, align_corners=False)
    sfb, sfc, sfh, sfw,  # feat strides
    slb, slc, slh, slw,  # flow strides
    sob, soh, sow,  # occ strides
    seb, sec, seh, sew,  # extra strides
    sxb, sxc,  # out strides (out is contiguous: row stride WO, column stride 1)
    warp_off, extra_off, n_warp_blocks,
    HAS_OCC: tl.constexpr, HAS_EXTRA: tl.constexpr, UP_FLOW: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # grid: (pixel blocks, warp channel blocks + extra channel blocks, batch)
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HO * WO
    oy = p // WO
    ox = p % WO
    out_b = out + b * sxb
    if pid_c < n_warp_blocks:
        # ---- flow (and occlusion) at the output pixel
        fl = flow + b * slb
        if UP_FLOW:
            sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_h - 0.5, 0.0)
            sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_w - 0.5, 0.0)
            y0 = sy.to(tl.int32)
            x0 = sx.to(tl.int32)
            ly = sy - y0.to(tl.float32)
            lx = sx - x0.to(tl.float32)
            y1 = tl.minimum(y0 + 1, HF - 1)
            x1 = tl.minimum(x0 + 1, WF - 1)
            w00 = (1.0 - ly) * (1.0 - lx)
            w01 = (1.0 - ly) * lx
            w10 = ly * (1.0 - lx)
            w11 = ly * lx
            o00 = y0 * slh + x0 * slw
            o01 = y0 * slh + x1 * slw
            o10 = y1 * slh + x0 * slw
            o11 = y1 * slh + x1 * slw
            fx = _lerp4(fl, o00, o01, o10, o11, w00, w01, w10, w11, pmask)
            fy = _lerp4(fl + slc, o00, o01, o10, o11, w00, w01, w10, w11, pmask)
            if HAS_OCC:
                oc = occ + b * sob
                occ_v = _lerp4(oc, y0 * soh + x0 * sow, y0 * soh + x1 * sow, y1 * soh + x0 * sow,
                               y1 * soh + x1 * sow, w00, w01, w10, w11, pmask)
        else:
            o = oy * slh + ox * slw
            fx = tl.load(fl + o, mask=pmask, other=0.0).to(tl.float32)
            fy = tl.load(fl + slc + o, mask=pmask, other=0.0).to(tl.float32)
            if HAS_OCC:
                occ_v = tl.load(occ + b * sob + oy * soh + ox * sow, mask=pmask, other=0.0).to(tl.float32)
        # ---- sampling position: identity grid + flow, unnormalised (align_corners=False), border-clamped
        gx = (2 * ox + 1).to(tl.float32) / WO - 1.0 + fx
        gy = (2 * oy + 1).to(tl.float32) / HO - 1.0 + fy
        ix = tl.minimum(tl.maximum(((gx + 1.0) * WI - 1.0) * 0.5, 0.0), WI * 1.0 - 1.0)
        iy = tl.minimum(tl.maximum(((gy + 1.0) * HI - 1.0) * 0.5, 0.0), HI * 1.0 - 1.0)
        ix0 = ix.to(tl.int32)  # floor (ix >= 0)
        iy0 = iy.to(tl.int32)
        ax = ix - ix0.to(tl.float32)
        ay = iy - iy0.to(tl.float32)
        okx = ix0 + 1 < WI  # the right/bottom taps exist (their weight is 0 when they do not)
        oky = iy0 + 1 < HI
        # ---- 4-tap gather over a block of channels
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        m2 = (c < C)[:, None] & pmask[None, :]
        src = feat + b * sfb + (c * sfc)[:, None]
        t00 = (iy0 * sfh + ix0 * sfw)[None, :]
        v00 = tl.load(src + t00, mask=m2, other=0.0).to(tl.float32)
        v01 = tl.load(src + t00 + sfw, mask=m2 & okx[None, :], other=0.0).to(tl.float32)
        v10 = tl.load(src + t00 + sfh, mask=m2 & oky[None, :], other=0.0).to(tl.float32)
        v11 = tl.load(src + t00 + sfh + sfw, mask=m2 & (okx & oky)[None, :], other=0.0).to(tl.float32)
        val = (((1.0 - ay) * (1.0 - ax))[None, :] * v00 + ((1.0 - ay) * ax)[None, :] * v01
               + (ay * (1.0 - ax))[None, :] * v10 + (ay * ax)[None, :] * v11)
        if HAS_OCC:
            val = val * occ_v[None, :]
        dst = out_b + ((warp_off + c) * sxc)[:, None] + p[None, :]
        tl.store(dst, val.to(out.dtype.element_ty), mask=m2)
    else:
        if HAS_EXTRA:
            # ---- copy of `extra` (nearest upsampling by an integer factor) into its channels of out
            c = (pid_c - n_warp_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
            m2 = (c < CE)[:, None] & pmask[None, :]
            ey = (oy * HE) // HO
            ex = (ox * WE) // WO
            v = tl.load(extra + b * seb + (c * sec)[:, None] + (ey * seh + ex * sew)[None, :], mask=m2, other=0.0)
            dst = out_b + ((extra_off + c) * sxc)[:, None] + p[None, :]
            tl.store(dst, v.to(out.dtype.element_ty), mask=m2)


def launch(feat: torch.Tensor, flow: torch.Tensor, occ: torch.Tensor | None, extra: torch.Tensor | None,
           extra_first: bool) -> torch.Tensor:
    """Allocates the (B, C [+ Ce], H, W) output and runs the kernel once (inputs checked by the caller)."""
    b, c, h, w = feat.shape
    ce = 0 if extra is None else extra.shape[1]
    out = torch.empty((b, c + ce, h, w), dtype=feat.dtype, device=feat.device)
    if out.numel() == 0:
        return out
    hf, wf = flow.shape[2:]
    he, we = (1, 1) if extra is None else extra.shape[2:]
    occ_t = flow if occ is None else occ  # dummies are never read (HAS_OCC / HAS_EXTRA are constexpr)
    extra_t = flow if extra is None else extra
    so = (0, 0, 0) if occ is None else (occ.stride(0), occ.stride(2), occ.stride(3))
    se = (0, 0, 0, 0) if extra is None else extra.stride()
    block_c = min(MAX_BLOCK_C, triton.next_power_of_2(max(c, ce)))
    block_p = ELEMS // block_c
    n_warp = triton.cdiv(c, block_c)
    n_extra = triton.cdiv(ce, block_c)
    grid = (triton.cdiv(h * w, block_p), n_warp + n_extra, b)
    _warp_cat_kernel[grid](
        feat, flow, occ_t, extra_t, out,
        c, h, w, hf, wf, ce, he, we, h, w,
        float(hf) / h, float(wf) / w,
        *feat.stride(), *flow.stride(), *so, *se,
        out.stride(0), out.stride(1),
        ce if extra_first else 0, 0 if extra_first else c, n_warp,
        HAS_OCC=occ is not None, HAS_EXTRA=extra is not None, UP_FLOW=(hf, wf) != (h, w),
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=NUM_WARPS,
    )
    return out
