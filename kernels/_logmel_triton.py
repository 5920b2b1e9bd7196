"""Triton kernel of kernels.logmel.log_mel_frames (imported lazily: this module imports triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.logmel import dft_basis, n_frames

BLOCK_M = 16  # frames per program
BLOCK_K = 32  # samples per step of the DFT product
BLOCK_N = 64  # frequency bins per step
NUM_WARPS = 4


@triton.jit
def _log_mel_kernel(
    x, window, basis, fb, out,
    n_rows, T, hop, WIN, NB, NM, log_floor,
    sxb, sxl, sob, sot,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MEL: tl.constexpr,
    TF32X3: tl.constexpr,
):
    # one program: BLOCK_M frames (rows of the flattened (B, T)) -> BLOCK_M x n_mels log-mel values
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    bi = (rows // T).to(tl.int64)
    ti = (rows % T).to(tl.int64)
    start = bi * sxb + ti * hop * sxl  # (BLOCK_M,) first sample of each frame
    mcol = tl.arange(0, BLOCK_MEL)
    mmask = mcol < NM
    mel = tl.zeros((BLOCK_M, BLOCK_MEL), dtype=tl.float32)
    for n0 in range(0, NB, BLOCK_N):
        nb = n0 + tl.arange(0, BLOCK_N)
        nmask = nb < NB
        re = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        im = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, WIN, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            kmask = k < WIN
            a = tl.load(x + start[:, None] + (k * sxl)[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            a = a * tl.load(window + k, mask=kmask, other=0.0)[None, :]  # (BLOCK_M, BLOCK_K)
            bmask = kmask[:, None] & nmask[None, :]
            boff = (k * NB)[:, None] + nb[None, :]
            cs = tl.load(basis + boff, mask=bmask, other=0.0)  # (BLOCK_K, BLOCK_N) cos
            sn = tl.load(basis + WIN * NB + boff, mask=bmask, other=0.0)  # sin
            if TF32X3:
                re += tl.dot(a, cs, input_precision="tf32x3")
                im += tl.dot(a, sn, input_precision="tf32x3")
            else:
                re += tl.dot(a, cs, input_precision="ieee")
                im += tl.dot(a, sn, input_precision="ieee")
        power = re * re + im * im  # (BLOCK_M, BLOCK_N)
        f = tl.load(fb + (nb * NM)[:, None] + mcol[None, :], mask=nmask[:, None] & mmask[None, :], other=0.0)
        if TF32X3:
            mel += tl.dot(power, f, input_precision="tf32x3")
        else:
            mel += tl.dot(power, f, input_precision="ieee")
    res = tl.log(tl.maximum(mel, log_floor))
    dst = out + (bi * sob + ti * sot)[:, None] + mcol[None, :]
    tl.store(dst, res, mask=rmask[:, None] & mmask[None, :])


def launch(signal: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, hop_length: int, n_fft: int,
           log_floor: float) -> torch.Tensor:
    """Allocates the (B, T, n_mels) float32 output and runs the kernel once (inputs checked by the caller)."""
    b, length = signal.shape
    win, nm = window.numel(), mel_fb.shape[1]
    t = n_frames(length, win, hop_length)
    dev = signal.device
    out = torch.empty((b, t, nm), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    if signal.dtype == torch.float64:
        signal = signal.to(torch.float32)
    basis = dft_basis(n_fft, win, dev)
    win32 = window.to(device=dev, dtype=torch.float32).contiguous()
    fb32 = mel_fb.to(device=dev, dtype=torch.float32).contiguous()
    tf32x3 = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8
    grid = (triton.cdiv(b * t, BLOCK_M),)
    _log_mel_kernel[grid](
        signal, win32, basis, fb32, out,
        b * t, t, hop_length, win, n_fft // 2 + 1, nm, float(log_floor),
        signal.stride(0), signal.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_N=BLOCK_N, BLOCK_MEL=max(16, triton.next_power_of_2(nm)),
        TF32X3=tf32x3, num_warps=NUM_WARPS,
    )
    return out
