"""Parity of the Triton kernels (kernels/) with their PyTorch references, over awkward shapes.

On a machine without CUDA the kernels run on CPU tensors in Triton's interpreter: this module sets
TRITON_INTERPRET=1 before triton is first imported (interpreter mode is process-wide and decided at that
import). The same tests run compiled on a GPU under the `gpu` marker (`pytest -m gpu tests/test_kernels.py`).

Tolerances: the kernels compute in float32 whatever the storage dtype, so they are compared with the
reference evaluated in float32 on the same (rounded) inputs; fp16/bf16 outputs are allowed their own
rounding. For the warp, the float32 tolerance is not 1e-6: the sampling position is ((g + 1) W - 1) / 2, so a
1-ulp difference in the grid moves it by ~W/2 ulp, times the local slope of the (random) features.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede triton's first import (process-wide)
pytest.importorskip("triton")

from engine.audio import _window, log_mel, mel_filterbank  # noqa: E402
from engine.config import AudioConfig, ModelConfig  # noqa: E402
from engine.model import Marionette  # noqa: E402
from engine.runtimes.torch_runtime import TorchRuntime  # noqa: E402
from kernels import _triton  # noqa: E402
from kernels.logmel import log_mel_frames, log_mel_frames_reference, log_mel_frames_triton  # noqa: E402
from kernels.warp import warp_cat, warp_cat_reference, warp_cat_triton  # noqa: E402

WARP_TOL = {torch.float32: dict(atol=3e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
MEL_ATOL = {"cpu": 2e-4, "cuda": 2e-3}  # log-mel vs engine.audio.log_mel (float64); cuda: 3xTF32 products

DEVICES = [
    pytest.param("cpu", id="cpu-interpreter"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]),
]


def _device(device: str) -> torch.device:
    if device == "cpu" and not _triton.interpreting():
        pytest.skip("CPU runs of the kernels need TRITON_INTERPRET=1 before triton is imported")
    return torch.device(device)


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


# ----------------------------------------------------------------------------------------------- warp
# (B, C, H, W, flow h, flow w, occ, Ce, extra h, extra w, extra_first): odd sizes, batch 1 and 33, flow
# upsampled x1/x2/x4 (the generator's lo / hi / source warps), extra nearest-upsampled x1/x2, either side.
WARP_CASES = [
    pytest.param((1, 5, 13, 11, 13, 11, True, 3, 13, 11, False), id="lo-like-b1-odd"),
    pytest.param((33, 4, 10, 14, 5, 7, True, 6, 5, 7, True), id="hi-like-b33-up2"),
    pytest.param((2, 3, 24, 20, 6, 5, False, 0, 0, 0, False), id="source-like-up4"),
    pytest.param((2, 11, 9, 9, 9, 9, True, 0, 0, 0, False), id="occ-only-c11"),
]


def _warp_inputs(case, dtype, device, seed=0):
    b, c, h, w, hf, wf, has_occ, ce, he, we, _ = case
    g = torch.Generator().manual_seed(seed)
    feat = torch.randn(b, c, h, w, generator=g)
    flow = torch.randn(b, 3, hf, wf, generator=g) * 0.8  # many samples fall outside the image
    flow[:, 0, 0, :] = 3.0  # a row pointing far right, a column far up: border padding
    flow[:, 1, :, 0] = -2.5
    flow = flow[:, :2]  # non-contiguous, as the generator's o[:, :2]
    occ = torch.rand(b, 1, hf, wf, generator=g) if has_occ else None
    extra = torch.randn(b, ce, he, we, generator=g) if ce else None
    return [None if t is None else t.to(device=device, dtype=dtype) for t in (feat, flow, occ, extra)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", WARP_CASES)
def test_warp_cat_matches_reference(case, dtype, device):
    dev = _device(device)
    feat, flow, occ, extra = _warp_inputs(case, dtype, dev)
    extra_first = case[-1]
    with torch.inference_mode():
        got = warp_cat_triton(feat, flow, occ, extra, extra_first)
        want = warp_cat_reference(*_f32(feat, flow, occ, extra), extra_first)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, **WARP_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_warp_cat_bf16_and_strided_batch(device):
    """bf16, and an avatar expanded to the batch (stride 0) as TorchRuntime passes it."""
    dev = _device(device)
    feat, flow, occ, extra = _warp_inputs((1, 6, 12, 10, 6, 5, True, 4, 6, 5, True), torch.bfloat16, dev)
    feat = feat.expand(5, -1, -1, -1)
    flow, occ, extra = (t.expand(5, -1, -1, -1) for t in (flow, occ, extra))
    assert feat.stride(0) == 0
    with torch.inference_mode():
        got = warp_cat_triton(feat, flow, occ, extra, True)
        want = warp_cat_reference(*_f32(feat, flow, occ, extra), True)
    torch.testing.assert_close(got.float(), want, **WARP_TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_warp_cat_semantics(device):
    """Zero flow samples pixel centres (the identity), a flow far outside clamps to the border pixel,
    and extra lands on its side of the concatenation, nearest-upsampled."""
    dev = _device(device)
    feat = torch.randn(2, 3, 8, 6, device=dev)
    extra = torch.randn(2, 2, 4, 3, device=dev)
    zero = torch.zeros(2, 2, 4, 3, device=dev)
    with torch.inference_mode():
        out = warp_cat_triton(feat, zero, None, extra, True)
        far = warp_cat_triton(feat, torch.full((2, 2, 4, 3), 5.0, device=dev))
    torch.testing.assert_close(out[:, 2:], feat, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, :2], extra.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=0, rtol=0)
    torch.testing.assert_close(far, feat[:, :, -1:, -1:].expand_as(feat), atol=1e-6, rtol=0)


def test_warp_cat_dispatch_and_checks():
    feat, flow, occ, extra = _warp_inputs((1, 2, 6, 6, 3, 3, True, 1, 3, 3, False), torch.float32, "cpu")
    torch.testing.assert_close(warp_cat(feat, flow, occ, extra, impl="reference"),
                               warp_cat_reference(feat, flow, occ, extra), atol=0, rtol=0)
    with pytest.raises(ValueError, match="impl"):
        warp_cat(feat, flow, impl="fast")
    with pytest.raises(ValueError, match="must divide"):
        warp_cat(feat, flow, occ, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="flow must be"):
        warp_cat(feat, flow[:, :1])
    # autograd: auto falls back to the reference (gradients flow), an explicit kernel refuses
    f = feat.clone().requires_grad_(True)
    warp_cat(f, flow, occ, extra).sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="forward-only"):
        warp_cat(f, flow, impl="triton")


def _random_tiny_model(seed: int = 0) -> Marionette:
    """The tiny model with every parameter randomised (at init G's flow and head are zero: no warp to test)."""
    torch.manual_seed(seed)
    m = Marionette(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.15)
    return m


@pytest.mark.parametrize("device", DEVICES)
def test_generator_fused_path_matches_eager(device):
    """G with use_kernels (3 warp_cat calls) == G's warp() + refine() (grid_sample + interpolate + mul + cat)."""
    dev = _device(device)
    m = _random_tiny_model().to(dev)
    gen, s = m.generator, m.cfg.image_size
    g = torch.Generator().manual_seed(1)
    src = (torch.rand(1, 3, s, s, generator=g) * 2 - 1).to(dev)
    z = torch.randn(3, m.cfg.latents.total, generator=g).to(dev)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs would round the ~1e-6 warp differences up to ~1e-3
    try:
        with torch.inference_mode():
            hi, lo, app = m.encode_avatar(src)
            args = (src.expand(3, -1, -1, -1), hi.expand(3, -1, -1, -1), lo.expand(3, -1, -1, -1),
                    app.expand(3, -1))
            flow, _, _ = gen.flow(z, args[2], args[3])
            assert flow.abs().max() > 0.05  # a real warp
            want = gen(z, *args)
            gen.use_kernels = True
            got = gen(z, *args)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_runtime_kernels_option():
    rt = TorchRuntime(_random_tiny_model())
    assert rt.kernels is False and rt.model.generator.use_kernels is False  # default: off (opt-in)
    rt_k = TorchRuntime(_random_tiny_model(), kernels=True)  # same weights
    assert rt_k.model.generator.use_kernels is True
    cfg = rt.cfg
    avatar = rt.prepare_avatar(torch.rand(1, 3, cfg.image_size, cfg.image_size))
    z = torch.randn(2, cfg.latents.total) * 0.5
    torch.testing.assert_close(rt_k.generate(avatar, z), rt.generate(avatar, z), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------- log-mel
def _audio(n_rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Rows of tones + noise, one with leading silence and one very quiet (log floor reached)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = np.stack([0.5 * np.sin(2 * np.pi * (150 + 370 * i) * t) + 0.05 * rng.standard_normal(n)
                  for i in range(n_rows)])
    x[0, : n // 3] = 0.0
    if n_rows > 1:
        x[-1] *= 1e-4
    return x.astype(np.float32)


def _mel_args(cfg: AudioConfig, device, dtype=torch.float32) -> tuple:
    win = torch.tensor(_window(cfg.win_length), dtype=dtype, device=device)
    fb = torch.tensor(mel_filterbank(cfg), dtype=dtype, device=device)
    return win, fb, cfg.hop_length, cfg.n_fft, cfg.log_floor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,n", [(1, 400 - 120), (3, 2237), (33, 401)])
def test_log_mel_matches_engine(rows, n, device):
    """Batched kernel (left-padded like engine.audio.log_mel) == log_mel row by row, incl. partial windows."""
    dev = _device(device)
    cfg = AudioConfig()
    x = _audio(rows, n)
    sig = F.pad(torch.from_numpy(x), (cfg.left_pad, 0)).to(dev)
    with torch.inference_mode():
        got = log_mel_frames_triton(sig, *_mel_args(cfg, dev)).cpu()
    want = torch.stack([log_mel(row, cfg) for row in x])
    assert got.shape == want.shape == (rows, (n + cfg.left_pad - cfg.win_length) // cfg.hop_length + 1, cfg.n_mels)
    torch.testing.assert_close(got, want, atol=MEL_ATOL[device], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_log_mel_strided_and_empty(device):
    dev = _device(device)
    cfg = AudioConfig(n_mels=40, n_fft=400, win_length=320)  # another geometry: n_fft == 400, 201 bins
    x = torch.from_numpy(_audio(4, 2 * 1700)).to(dev)[:, ::2]  # non-contiguous rows
    args = _mel_args(cfg, dev)
    with torch.inference_mode():
        got = log_mel_frames_triton(x, *args).cpu()
        empty = log_mel_frames_triton(x[:, :100], *args)
    want = log_mel_frames_reference(x.cpu().double(), *_mel_args(cfg, "cpu", torch.float64))  # == engine
    torch.testing.assert_close(got, want, atol=MEL_ATOL[device], rtol=0)
    assert empty.shape == (4, 0, 40)


def test_log_mel_reference_and_dispatch():
    cfg = AudioConfig()
    x = _audio(2, 1234)
    sig = F.pad(torch.from_numpy(x), (cfg.left_pad, 0))
    args = _mel_args(cfg, "cpu")
    want = torch.stack([log_mel(row, cfg) for row in x])
    args64 = _mel_args(cfg, "cpu", torch.float64)
    torch.testing.assert_close(log_mel_frames(sig.double(), *args64), want, atol=1e-6, rtol=0)  # float64: exact
    torch.testing.assert_close(log_mel_frames(sig, *args, impl="reference"), want, atol=5e-4, rtol=0)
    with pytest.raises(ValueError, match="mel_fb"):
        log_mel_frames(sig, args[0], args[1][:-1], *args[2:])
