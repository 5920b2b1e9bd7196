"""The training loop, its losses, data and stages (tiny config, real parts, small corpus fixture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.errors import InputError
from trainer import config as C
from trainer import losses as L
from trainer.loop import main_losses_fell, optimizer_from_flat, optimizer_to_flat, save_state, load_state


# ============================================================================================ losses
def test_ms_ssim_identity_and_order():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 64, 64) * 2 - 1
    near = (a + 0.05 * torch.randn_like(a)).clamp(-1, 1)
    far = torch.rand(2, 3, 64, 64) * 2 - 1
    assert L.ms_ssim(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert L.ms_ssim(a, near) > L.ms_ssim(a, far) + 0.2
    assert L.n_ssim_scales(64) == 3 and L.n_ssim_scales(256) == 5


def test_ms_ssim_single_scale_matches_evaluation_ssim():
    from trainer.evaluate import ssim

    torch.manual_seed(1)
    a = torch.rand(2, 3, 48, 48)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    mine = L._ssim_cs(a, b, 11)[0]
    assert torch.allclose(mine, ssim(a, b).flatten(), atol=1e-5)


def test_info_nce_prefers_the_positive():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    negs = torch.randn(8, 4, 16)
    good = L.info_nce(a, a + 0.01 * torch.randn_like(a), negs)
    bad = L.info_nce(a, torch.randn(8, 16), negs)
    assert good < 0.1 < bad
    assert L.nce_accuracy(a, a, negs) == 1.0


def test_correlation_loss_and_memory_bank():
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y_dep = torch.cat([x[:, :2] * 2 + 0.01 * torch.randn(256, 2), torch.randn(256, 3)], dim=1)
    y_ind = torch.randn(256, 5)
    assert L.correlation_loss(x, y_dep) > 0.09 > 0.02 > L.correlation_loss(x, y_ind)  # 2 of 20 pairs at ~1
    bank = L.MemoryBank(8, 4, 5)
    for i in range(3):
        bank.loss(x[i * 4:(i + 1) * 4].requires_grad_(), y_ind[i * 4:(i + 1) * 4])
    assert bank.count == 8 and bank.ptr == 4  # ring buffer wrapped
    other = L.MemoryBank(8, 4, 5)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.x, bank.x) and other.ptr == bank.ptr
    # gradients reach only the current batch
    xb = torch.randn(4, 4, requires_grad=True)
    bank.loss(xb, torch.randn(4, 5)).backward()
    assert xb.grad is not None and xb.grad.abs().sum() > 0


def test_lr_schedule():
    s = C.StageConfig(steps=100, batch_size=1, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert C.lr_at(s, 0, 1.0) == pytest.approx(0.1)
    assert C.lr_at(s, 9, 1.0) == pytest.approx(1.0)
    assert C.lr_at(s, 99, 1.0) == pytest.approx(0.1, abs=0.01)
    st = C.StageConfig(steps=100, batch_size=1, lr=1.0, schedule="step", step_every=30, step_gamma=0.5)
    assert C.lr_at(st, 61, 1.0) == pytest.approx(0.25)
    o = C.override(C.preset("lite").stage("motion"), lr=1e-3)
    assert o.lr == 1e-3 and o.lr_d == pytest.approx(1e-4)
    with pytest.raises(InputError, match="tiny, lite, base"):
        C.preset("huge")


def test_optimizer_state_roundtrip_without_pickle(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.5, 0.99))
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    tensors, doc = optimizer_to_flat(opt, "opt")
    save_state(tmp_path / "s.state", tensors, {"opt": doc, "step": 3})
    t2, d2 = load_state(tmp_path / "s.state")
    assert json.loads((tmp_path / "s.json").read_text())["step"] == 3
    net2 = torch.nn.Linear(4, 3)
    net2.load_state_dict(net.state_dict())
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1.0)
    optimizer_from_flat(opt2, d2["opt"], t2)
    x = torch.randn(5, 4)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x).pow(2).sum().backward()
        o.step()
    assert torch.equal(net.weight, net2.weight)
    assert opt2.param_groups[0]["betas"] == (0.5, 0.99)


def test_main_losses_fell():
    recs = [{"l1": 1.0 - 0.01 * i} for i in range(20)]
    assert main_losses_fell(recs, ("l1",), k=5)["l1"][2]
    assert not main_losses_fell(list(reversed(recs)), ("l1",), k=5)["l1"][2]


# ============================================================================================ data
def test_step_sampler_is_disjoint_across_ranks_and_resumable():
    from trainer.data import StepSampler

    def take(s, n):
        it = iter(s)
        return [next(it) for _ in range(n)]

    r0, r1 = take(StepSampler(3, 0, 0, 2), 9), take(StepSampler(3, 0, 1, 2), 9)
    assert not set(r0) & set(r1)
    assert take(StepSampler(3, 2, 0, 2), 3) == r0[6:9]  # resuming at step 2 continues the stream


def test_augmentation_shapes_and_ranges():
    from trainer.data import affine_params, apply_affine, color_jitter

    rng = np.random.default_rng(0)
    x = torch.rand(3, 64, 64) * 2 - 1
    y = color_jitter(x, rng, C.AugmentConfig())
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
    ident = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    assert torch.allclose(apply_affine(x, ident), x, atol=1e-5)
    z = apply_affine(x.unsqueeze(0).repeat(2, 1, 1, 1), affine_params(rng, 3, 0.03, 0.02))
    assert z.shape == (2, 3, 64, 64)


def test_list_clips_reports_missing_data(tmp_path):
    from trainer.data import list_clips

    with pytest.raises(InputError, match="not a directory"):
        list_clips(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    assert list_clips(tmp_path, "train") == []


# ====================================================================================== idle model
def test_idle_model_source_is_seeded_and_moves():
    from engine.idle_model import IdleModelConfig, IdleMotionModel, LearnedIdleSource

    torch.manual_seed(0)
    model = IdleMotionModel(IdleModelConfig(hidden=16, audio_dim=8, style_dim=8))
    mel = np.random.default_rng(0).normal(-5, 2, size=(400, 80)).astype(np.float32)
    a = LearnedIdleSource(model, seed=3)
    a.push_mel(mel)
    b = LearnedIdleSource(model, seed=3)
    b.push_mel(mel)
    pa = a.latents(0, 50, "pose")
    pb = np.concatenate([b.latents(0, 20, "pose"), b.latents(20, 30, "pose")])  # query pattern is irrelevant
    assert np.array_equal(pa, pb)
    assert pa.shape == (50, 6) and a.latents(0, 5, "eye").shape == (5, 6)
    assert np.std(pa, axis=0).max() > 0  # sampled, not frozen
    c = LearnedIdleSource(model, seed=4)
    c.push_mel(mel)
    assert not np.array_equal(c.latents(0, 50, "pose"), pa)


# ====================================================================================== end to end
def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
