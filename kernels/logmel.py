"""Batched log-mel: many sessions' audio -> framing -> windowed |rFFT|^2 -> mel -> natural log, one launch.

The definition is engine.audio's (module doc there): frame k of a row covers signal[k*hop : k*hop + win]
(complete windows only, no padding here: the caller left-pads as `engine.audio.log_mel` does), the window
is applied, the frame is zero-padded to n_fft, the power spectrum (n_fft // 2 + 1 bins) is multiplied by the
mel filterbank and log(max(mel, log_floor)) is taken. The window and the filterbank are arguments (kernels
does not import engine), e.g. ``torch.from_numpy(engine.audio._window(cfg.win_length))`` and
``torch.from_numpy(engine.audio.mel_filterbank(cfg))``.

    signal (B, L) -> (B, T, n_mels) float32, T = (L - win) // hop + 1 (0 when L < win)

The reference runs torch.fft in float32 (float64 when the signal is float64: then it equals
engine.audio.log_mel to ~1e-7). The Triton kernel computes the DFT of the win non-zero samples as two
matrix products with a cached cos/sin table (float32 accumulate; 3xTF32 tensor-core products on GPUs of
compute capability >= 8, plain fp32 elsewhere), then the filterbank product and the log, without writing
frames, spectra or mel power to memory.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from kernels._triton import choose

__all__ = ["log_mel_frames", "log_mel_frames_reference", "log_mel_frames_triton", "n_frames", "dft_basis"]


def n_frames(length: int, win_length: int, hop_length: int) -> int:
    """Complete windows in `length` samples."""
    return 0 if length < win_length else (length - win_length) // hop_length + 1


def _check(signal: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, hop_length: int, n_fft: int) -> None:
    if signal.dim() != 2:
        raise ValueError(f"signal must be (B, L), got {tuple(signal.shape)}")
    if not signal.dtype.is_floating_point:
        raise ValueError(f"signal must be a float tensor, got {signal.dtype}")
    if window.dim() != 1 or not 0 < window.numel() <= n_fft:
        raise ValueError(f"window must be 1-D with 1 .. n_fft={n_fft} samples, got {tuple(window.shape)}")
    if mel_fb.dim() != 2 or mel_fb.shape[0] != n_fft // 2 + 1:
        raise ValueError(f"mel_fb must be (n_fft // 2 + 1 = {n_fft // 2 + 1}, n_mels), got {tuple(mel_fb.shape)}")
    if hop_length < 1:
        raise ValueError(f"hop_length must be >= 1, got {hop_length}")


def log_mel_frames_reference(signal: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, hop_length: int,
                             n_fft: int, log_floor: float) -> torch.Tensor:
    """Pure-PyTorch definition (module doc); (B, L) -> (B, T, n_mels) float32."""
    _check(signal, window, mel_fb, hop_length, n_fft)
    dt = torch.float64 if signal.dtype == torch.float64 else torch.float32
    win = window.numel()
    b, length = signal.shape
    t = n_frames(length, win, hop_length)
    if t == 0:
        return torch.zeros((b, 0, mel_fb.shape[1]), dtype=torch.float32, device=signal.device)
    frames = signal.to(dt).unfold(1, win, hop_length)  # (B, T, win), a view
    spec = torch.fft.rfft(frames * window.to(device=signal.device, dtype=dt), n=n_fft)  # (B, T, n_fft/2+1)
    power = spec.real.square() + spec.imag.square()
    mel = power @ mel_fb.to(device=signal.device, dtype=dt)  # (B, T, n_mels)
    return mel.clamp_min(log_floor).log().to(torch.float32)


@lru_cache(maxsize=8)
def dft_basis(n_fft: int, win_length: int, device: torch.device) -> torch.Tensor:
    """(2, win_length, n_fft // 2 + 1) float32 [cos; sin](2 pi k n / n_fft), from exact integer phases in
    float64 (cached per device; read-only)."""
    k = torch.arange(win_length, dtype=torch.int64)[:, None]
    n = torch.arange(n_fft // 2 + 1, dtype=torch.int64)[None, :]
    phase = (k * n % n_fft).to(torch.float64) * (2 * math.pi / n_fft)
    return torch.stack([phase.cos(), phase.sin()]).to(device=device, dtype=torch.float32).contiguous()


def log_mel_frames_triton(signal: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, hop_length: int,
                          n_fft: int, log_floor: float) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1); forward only."""
    _check(signal, window, mel_fb, hop_length, n_fft)
    from kernels._logmel_triton import launch  # noqa: PLC0415 (imports triton)

    return launch(signal, window, mel_fb, hop_length, n_fft, log_floor)


def log_mel_frames(signal: torch.Tensor, window: torch.Tensor, mel_fb: torch.Tensor, hop_length: int, n_fft: int,
                   log_floor: float, *, impl: str = "auto") -> torch.Tensor:
    """`log_mel_frames_reference`'s result, by the Triton kernel on CUDA and the reference elsewhere
    (rule: kernels._triton.choose; impl = "auto" | "triton" | "reference"). A float64 signal stays on the
    float64 reference under impl="auto" (the kernel computes in float32)."""
    if signal.dtype == torch.float64 and impl == "auto":
        impl = "reference"
    if choose("log_mel_frames", impl, signal):
        return log_mel_frames_triton(signal, window, mel_fb, hop_length, n_fft, log_floor)
    return log_mel_frames_reference(signal, window, mel_fb, hop_length, n_fft, log_floor)
