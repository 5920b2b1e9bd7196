"""Shapes, batching, identity at init, determinism and the MAC budget of the networks."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import ModelConfig
from engine.model import Marionette
from engine.networks import count_macs
from engine.runtimes.torch_runtime import TorchRuntime, to_uint8_hwc


def _model(name: str = "tiny", seed: int = 0, **overrides) -> Marionette:
    torch.manual_seed(seed)
    return Marionette(ModelConfig.preset(name, **overrides)).eval()


def _portrait(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth synthetic 'portrait' in [0,1]: gradients plus a bright ellipse."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c = torch.rand(3, 1, 1, generator=g)
    img = 0.3 + 0.2 * x * c + 0.1 * y
    img = img + 0.4 * ((x / 0.6) ** 2 + (y / 0.8) ** 2 < 1).float() * c
    return img.clamp(0, 1).unsqueeze(0)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def tiny():
    return _model("tiny")


@pytest.mark.parametrize("name", ["tiny", "lite"])
def test_module_shapes(name):
    m = _model(name)
    cfg, lat, net = m.cfg, m.cfg.latents, m.cfg.net
    s, b = cfg.image_size, 2
    img = torch.rand(b, 3, s, s) * 2 - 1
    with torch.no_grad():
        hi, lo, app = m.e_app(img)
        assert hi.shape == (b, net.app_channels[1], s // 2, s // 2)
        assert lo.shape == (b, net.app_channels[2], s // 4, s // 4)
        assert app.shape == (b, net.app_dim)
        mot = m.e_mot(img)
        assert mot.shape == (b, net.motion_dim)
        for head, n in ((m.e_lip, lat.lip), (m.e_pose, lat.pose), (m.e_eye, lat.eye), (m.e_exp, lat.exp)):
            assert head(mot).shape == (b, n)
        factors = m.encode_motion(img)
        assert {k: tuple(v.shape) for k, v in factors.items()} == {
            "lip": (b, 20), "pose": (b, 6), "eye": (b, 6), "exp": (b, 10)}
        mel = torch.randn(b, cfg.audio.n_mels, cfg.mel_window)
        assert m.e_aud(mel).shape == (b, lat.lip)
        z = m.compose(factors)
        assert z.shape == (b, lat.total)
        assert torch.equal(m.split(z)["exp"], factors["exp"])
        out = m.generator(z, img, hi, lo, app)
        assert out.shape == (b, 3, s, s)
        assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("lookahead_ms", [40, 80, 120])
def test_audio_window_follows_lookahead(lookahead_ms):
    m = _model("tiny", lookahead_ms=lookahead_ms)
    assert m.cfg.mel_window == 20 + lookahead_ms // 10
    mel = torch.randn(3, m.cfg.audio.n_mels, m.cfg.mel_window)
    with torch.no_grad():
        assert m.e_aud(mel).shape == (3, m.cfg.latents.lip)


def test_bad_image_size_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        Marionette(ModelConfig.preset("tiny", image_size=80))


def _perturb(model: Marionette, seed: int = 1, scale: float = 0.05) -> Marionette:
    """Random weights everywhere (the zero-initialised output layers too), so batching is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.generator.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_batch_equals_singles_shared_and_per_item_avatars():
    rt = TorchRuntime(_perturb(_model("tiny")))
    avatars = [rt.prepare_avatar(_portrait(96, seed=i)) for i in range(3)]
    z = torch.randn(3, rt.cfg.latents.total, generator=torch.Generator().manual_seed(3))
    # one avatar for every row
    batch = rt.generate(avatars[0], z)
    singles = torch.cat([rt.generate(avatars[0], z[i:i + 1]) for i in range(3)])
    assert batch.shape == (3, 3, 64, 64)
    assert (batch - singles).abs().max() < 1e-5
    # one avatar per row
    batch = rt.generate(avatars, z)
    singles = torch.cat([rt.generate(avatars[i], z[i:i + 1]) for i in range(3)])
    assert (batch - singles).abs().max() < 1e-5
    assert (batch[0] - batch[1]).abs().max() > 1e-3  # the avatars really differ


def test_zero_z_reproduces_source_and_is_deterministic(tiny):
    rt = TorchRuntime(tiny)
    src = _portrait(64)
    avatar = rt.prepare_avatar(src)
    out = rt.generate(avatar, torch.zeros(1, rt.cfg.latents.total))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert 0 <= out.min() and out.max() <= 1
    assert _psnr(out, src) > 30
    again = rt.generate(avatar, torch.zeros(1, rt.cfg.latents.total))
    assert torch.equal(out, again)
    # random z on a random model: still deterministic
    z = torch.randn(2, rt.cfg.latents.total)
    assert torch.equal(rt.generate(avatar, z), rt.generate(avatar, z))


def test_flow_is_identity_at_init(tiny):
    s = tiny.cfg.image_size
    img = torch.rand(1, 3, s, s) * 2 - 1
    with torch.no_grad():
        hi, lo, app = tiny.e_app(img)
        flow, occ, _ = tiny.generator.flow(torch.randn(1, tiny.cfg.latents.total), lo, app)
        assert flow.abs().max() == 0
        w_lo, w_hi, w_src = tiny.generator.warp(flow, occ, img, hi, lo)
    assert torch.allclose(w_src, img, atol=1e-5)


def test_gradients_reach_every_parameter():
    m = _perturb(_model("tiny")).train()
    s = m.cfg.image_size
    src, drv = torch.rand(2, 3, s, s) * 2 - 1, torch.rand(2, 3, s, s) * 2 - 1
    loss = m.reconstruct(src, drv).square().mean() + m.e_aud(torch.randn(2, 80, m.cfg.mel_window)).square().mean()
    loss.backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not dead


def test_runtime_encoders_and_uint8(tiny):
    rt = TorchRuntime(tiny)
    s = rt.cfg.image_size
    lat = rt.encode_audio(torch.randn(4, rt.cfg.audio.n_mels, rt.cfg.mel_window))
    assert lat.shape == (4, rt.cfg.latents.lip) and lat.dtype == torch.float32
    f = rt.encode_motion(torch.rand(2, 3, s, s))
    assert {k: tuple(v.shape) for k, v in f.items()} == {"lip": (2, 20), "pose": (2, 6), "eye": (2, 6),
                                                         "exp": (2, 10)}
    rt.warmup((1, 2))
    u8 = to_uint8_hwc(torch.tensor([0.0, 0.5, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2))
    assert u8.shape == (1, 2, 2, 3) and u8.dtype.name == "uint8"
    assert u8[0, :, :, 0].tolist() == [[0, 128], [255, 255]]


def test_runtime_rejects_bad_shapes(tiny):
    from engine.errors import InputError

    rt = TorchRuntime(tiny)
    avatar = rt.prepare_avatar(_portrait(64))
    with pytest.raises(InputError):
        rt.generate(avatar, torch.zeros(2, rt.cfg.latents.total + 1))
    with pytest.raises(InputError):
        rt.generate([avatar, avatar], torch.zeros(3, rt.cfg.latents.total))
    with pytest.raises(InputError):
        rt.encode_audio(torch.zeros(1, 80, rt.cfg.mel_window + 1))


def _frame_macs(cfg: ModelConfig) -> tuple[int, int]:
    torch.manual_seed(0)
    m = Marionette(cfg).eval()
    s = cfg.image_size
    img = torch.rand(1, 3, s, s) * 2 - 1
    with torch.no_grad():
        hi, lo, app = m.e_app(img)
    z = torch.zeros(1, cfg.latents.total)
    mel = torch.randn(1, cfg.audio.n_mels, cfg.mel_window)
    return count_macs(m.generator, z, img, hi, lo, app), count_macs(m.e_aud, mel)


def test_lite_frame_macs_within_budget():
    g, a = _frame_macs(ModelConfig.preset("lite"))
    assert a <= 0.15e9, f"E_aud {a / 1e9:.3f} GMAC"
    assert g + a <= 1.5e9, f"lite per-frame {(g + a) / 1e9:.3f} GMAC (G {g / 1e9:.3f} + E_aud {a / 1e9:.3f})"


def test_count_macs_includes_grid_sample():
    import torch.nn.functional as F

    x, grid = torch.rand(2, 5, 8, 8), torch.rand(2, 6, 7, 2) * 2 - 1
    assert count_macs(F.grid_sample, x, grid, align_corners=False) == 4 * 2 * 5 * 6 * 7


def test_jaw_calibration_maps_the_jaw_relative_to_the_source_in_eval_only():
    import dataclasses

    import torch

    from engine.config import ModelConfig
    from engine.model import Marionette

    knots = ((0.0, 0.0), (0.1, 0.25), (0.5, 0.6))
    cfg = dataclasses.replace(ModelConfig.preset("talk-tiny"), jaw_calibration=knots)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # survives the checkpoint's JSON
    g = Marionette(cfg).generator
    n, k = cfg.latents.total, g.app_dim
    app = torch.zeros(5, k + n + 6)
    app[:, k] = 0.05  # the source's jaw
    z = torch.zeros(5, n)
    z[:, 0] = torch.tensor([0.0, 0.05, 0.15, 0.35, 0.85])  # d = -0.05, 0, 0.1, 0.3, 0.8
    z[:, 3] = 1.0  # the other latents pass through
    out = g.calibrate_jaw(z, app)
    # below the source: identity; at a knot: its value; between: linear; past the last: slope 1
    want = 0.05 + torch.tensor([-0.05, 0.0, 0.25, 0.25 + 0.35 * 0.5, 0.6 + 0.3])
    assert torch.allclose(out[:, 0], want, atol=1e-6), out[:, 0]
    assert torch.equal(out[:, 1:], z[:, 1:])
    # G applies it in eval mode only (training sees the commanded jaw)
    calls = []
    orig = g.calibrate_jaw
    g.calibrate_jaw = lambda *a: calls.append(1) or orig(*a)
    s = cfg.image_size
    src = torch.zeros(1, 3, s, s)
    m = Marionette(cfg)
    m.generator = g
    hi, lo, app1 = m.encode_avatar(src)
    g.train()
    g(z[:1], src, hi, lo, app1)
    assert not calls
    g.eval()
    g(z[:1], src, hi, lo, app1)
    assert calls
    with pytest.raises(ValueError, match="start at"):
        Marionette(dataclasses.replace(cfg, jaw_calibration=((0.1, 0.2), (0.3, 0.1))))
