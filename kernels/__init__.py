"""Custom GPU kernels, each beside a pure-PyTorch reference that is the CPU fallback and the tests' truth.

    from kernels.warp import warp_cat            # G's grid_sample + occlusion + concatenation, fused
    from kernels.logmel import log_mel_frames    # batched framing -> |rFFT|^2 -> mel -> log, one launch

Each kernel `k` comes as `k_reference` (PyTorch), `k_triton` (the Triton kernel: CUDA, or CPU under
TRITON_INTERPRET=1) and `k` (same signature as the reference plus `impl="auto"|"triton"|"reference"`: the
kernel for CUDA tensors, the reference elsewhere or under autograd, logged once; rule in kernels._triton).
Kernels are forward-only. triton is imported lazily, only when a kernel runs (pip install 'marionette[gpu]').

Status (2026-11): parity-tested on CPU through Triton's interpreter (tests/test_kernels.py); not yet run
compiled on a GPU, so nothing uses them by default: `marionette serve|render --kernels` (torch backend on
CUDA) opts in. `benchmarks/kernel_speed.py` decides whether they stay (each kernel vs the eager reference
and vs torch.compile of it, and the per-frame path with and without); `benchmarks/profile_frame.py` shows
where the per-frame time goes (on CPU: convolutions ~65 %, the warp family grid_sample + cat +
interpolate + mul ~15-20 %, the log-mel < 0.5 %).
"""
