"""The training loop, its losses, data and stages (tiny config, real parts, small corpus fixture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

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
    # the audio may come in any pieces (live: what MelStream emits), or as one mean row per frame
    d = LearnedIdleSource(model, seed=3)
    for lo, hi in ((0, 7), (7, 9), (9, 130), (130, 400)):
        d.push_mel(mel[lo:hi])
    assert np.array_equal(d.latents(0, 50, "pose"), pa)
    e = LearnedIdleSource(model, seed=3)
    e.push_frame_mel(mel[:200].reshape(50, 4, 80).mean(1))
    assert np.allclose(e.latents(0, 50, "pose"), pa, atol=1e-6)
    # memory stays bounded in a long stream: consumed audio is dropped, old motion forgotten
    f = LearnedIdleSource(model, seed=3, history=30)
    f.push_mel(mel)
    assert np.array_equal(f.latents(20, 30, "pose"), pa[20:50])
    assert f._ring.shape == (30, 10) and len(f._feat) == 100 - 50
    assert np.array_equal(f.latents(49, 1, "pose"), pa[49:50])  # the ring wrapped around and still reads right
    with pytest.raises(ValueError, match="older than"):
        f.latents(0, 5, "pose")
    # a frame generated before its audio arrived stays as generated (silent), later audio lines up
    g = LearnedIdleSource(model, seed=3)
    g.latents(0, 10, "pose")
    g.push_frame_mel(mel[:200].reshape(50, 4, 80).mean(1))
    assert len(g._feat) == 40 and g._feat_base == 10


# ====================================================================================== end to end
@pytest.fixture
def one_thread():
    """Train on one intra-op thread: on this shared 2-core machine two OpenMP threads contend with the other
    processes and made tiny steps ~5x slower (measured 3.2 s vs 15 s for 40 motion steps); results do not
    depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _stage_sums(recs: list[dict], stage: str, keys: tuple[str, ...]) -> list[float]:
    return [sum(r[k] for k in keys) for r in recs if r["stage"] == stage]


def test_tiny_trains_every_stage_end_to_end(small_corpus, tmp_path, one_thread):
    """`marionette train --stage all --config tiny`: every stage runs, its supervised losses fall, and the
    checkpoint holds what the engine reads (weights, expression presets, the idle model)."""
    from engine.checkpoint import load_model
    from engine.idle_model import LearnedIdleSource, load_idle_model
    from engine.runtimes.torch_runtime import TorchRuntime
    from trainer.stages import MAIN_LOSSES
    from trainer.train import TrainConfig, train

    run = tmp_path / "run"
    ckpt = train(TrainConfig(stage="all", data=small_corpus, config="tiny", out=run, workers=0, log_every=1,
                             ckpt_every=25, seed=0, progress=False, device="cpu"))
    assert ckpt == run / "checkpoint"
    recs = _records(run)
    k = 10  # mean of the first vs the last 10 steps (per-step losses vary +-30% with the pairs drawn)
    for stage in C.preset("tiny").order:
        keys = MAIN_LOSSES[stage]
        vals = _stage_sums(recs, stage, keys)
        assert len(vals) == C.preset("tiny").stage(stage).steps
        first, last = sum(vals[:k]) / k, sum(vals[-k:]) / k
        assert last < 0.9 * first, f"{stage}: {'+'.join(keys)} did not fall ({first:.4f} -> {last:.4f})"
        assert all(math.isfinite(r["loss"]) for r in recs if r["stage"] == stage)
        assert all(r["steps_per_s"] > 0 for r in recs if r["stage"] == stage)

    model, meta = load_model(ckpt)
    assert meta["random_weights"] is False and meta["train"] == {"stage": "idle", "step": 60, "steps": 60,
                                                                  "config": "tiny"}
    presets = meta["expression_presets"]
    assert "neutral" in presets and len(presets) >= 2  # the train identity's clips show neutral and others
    assert all(len(v) == model.cfg.latents.exp and all(math.isfinite(x) for x in v) for v in presets.values())
    # the checkpoint drives the runtime, and its idle model replaces the procedural idle source
    rt = TorchRuntime(model)
    avatar = rt.prepare_avatar(torch.rand(1, 3, 64, 64))
    frames = rt.generate(avatar, torch.zeros(2, model.cfg.latents.total))
    assert frames.shape == (2, 3, 64, 64) and torch.isfinite(frames).all()
    idle = load_idle_model(ckpt)
    assert idle is not None and float(idle.default_style.abs().sum()) > 0
    src = LearnedIdleSource(idle, seed=0)
    pose = src.latents(0, 40, "pose")
    assert pose.shape == (40, 6) and np.isfinite(pose).all() and pose.std(0).max() > 0
    from engine.composer import MotionComposer

    z = MotionComposer(model.cfg.latents, {"pose": src, "eye": src}).compose_batch(0, 40)
    assert z.shape == (40, model.cfg.latents.total) and np.array_equal(z[:, model.cfg.latents.slices()["pose"]], pose)
    # trainer state for every stage, without pickle
    for stage in C.STAGES:
        assert (run / "state" / f"{stage}.safetensors").is_file()
        doc = json.loads((run / "state" / f"{stage}.json").read_text())
        assert doc["step"] == C.preset("tiny").stage(stage).steps


def test_resume_continues_exactly_from_the_saved_step(small_corpus, tmp_path, monkeypatch, one_thread):
    """An interrupted run resumed with --resume ends with the same weights as an uninterrupted one (the
    expression stage: G + D + both optimisers + the memory bank + the E_exp freeze schedule)."""
    import trainer.data as D
    from engine.checkpoint import load_checkpoint
    from trainer.train import TrainConfig, train

    common = dict(stage="expression", data=small_corpus, config="tiny", steps=4, batch_size=2, workers=0,
                  log_every=1, ckpt_every=2, seed=1, progress=False, device="cpu")
    full = train(TrainConfig(out=tmp_path / "full", **common))

    real = D.make_loader

    def crashing_loader(*args, **kwargs):  # the data stops after 3 batches: a crash during step 4
        it = real(*args, **kwargs)
        for _ in range(3):
            yield next(it)
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(D, "make_loader", crashing_loader)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(TrainConfig(out=tmp_path / "cut", **common))
    assert json.loads((tmp_path / "cut" / "state" / "expression.json").read_text())["step"] == 2
    monkeypatch.setattr(D, "make_loader", real)
    resumed = train(TrainConfig(out=tmp_path / "cut", resume=True, **common))

    steps = [r["step"] for r in _records(tmp_path / "cut")]
    assert steps == [1, 2, 3, 3, 4]  # step 3 was logged before the crash, then again after resuming
    a, _ = load_checkpoint(full)
    b, meta = load_checkpoint(resumed)
    assert meta["train"]["step"] == 4
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{n} differs after resume"
    # a completed stage is skipped on --resume
    again = train(TrainConfig(out=tmp_path / "cut", resume=True, **common))
    assert again == resumed and [r["step"] for r in _records(tmp_path / "cut")] == steps


def test_bad_training_arguments(small_corpus, tmp_path):
    from trainer.train import TrainConfig, train

    with pytest.raises(InputError, match="unknown stage"):
        train(TrainConfig(stage="everything", data=small_corpus, config="tiny", out=tmp_path / "r"))
    with pytest.raises(InputError, match="not a directory"):
        train(TrainConfig(stage="motion", data=tmp_path / "none", config="tiny", out=tmp_path / "r"))
    with pytest.raises(InputError, match="tiny, lite, base"):
        train(TrainConfig(stage="motion", data=small_corpus, config="huge", out=tmp_path / "r"))
    with pytest.raises(InputError, match="file not found"):
        train(TrainConfig(stage="motion", data=small_corpus, config="tiny", out=tmp_path / "r",
                          vgg_weights=tmp_path / "vgg.safetensors"))


def test_real_video_layout_without_factor_tables(small_corpus, tmp_path, one_thread):
    """The same layout with only mp4 + wav (real talking-head video): every stage still trains; the supervised
    pose / eye terms are masked, the idle stage learns from E_pose / E_eye, and no presets are invented."""
    import shutil

    from engine.checkpoint import read_checkpoint_config
    from trainer.train import TrainConfig, train

    data = tmp_path / "video"
    for f in (small_corpus / "train").rglob("*"):
        if f.suffix in (".mp4", ".wav"):
            dest = data / "train" / f.relative_to(small_corpus / "train")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    ckpt = train(TrainConfig(stage="all", data=data, config="tiny", out=tmp_path / "run", steps=3, batch_size=2,
                             workers=0, log_every=1, ckpt_every=100, progress=False, device="cpu"))
    recs = _records(tmp_path / "run")
    assert {r["stage"] for r in recs} == set(C.STAGES)
    fac = [r for r in recs if r["stage"] == "factors"]
    assert all(r["pose"] == 0 and r["eye_reg"] == 0 for r in fac) and all(r["lip_nce"] > 0 for r in fac)
    _, meta = read_checkpoint_config(ckpt)
    assert "expression_presets" not in meta and meta["idle_model"]["weights"] == "idle_model.safetensors"


@pytest.mark.slow
def test_tiny_longer_run_learns_each_factor(small_corpus, tmp_path, one_thread):
    """A longer tiny run (~2-3 min): reconstruction PSNR rises (measured +0.6 .. +1.5 dB over 1500 motion
    steps, from the copy-the-source baseline of ~27 dB), E_pose reaches a small error, lip-audio retrieval
    beats chance (measured 0.75 vs chance 0.2), decorrelation falls and the idle model's likelihood rises."""
    from trainer.train import TrainConfig, train

    run = tmp_path / "run"
    for stage, steps in (("motion", 1500), ("factors", 300), ("expression", 100), ("idle", 300)):
        train(TrainConfig(stage=stage, data=small_corpus, config="tiny", out=run, steps=steps, workers=0,
                          log_every=5, ckpt_every=10_000, progress=False, device="cpu"))
    recs = _records(run)

    def first_last(stage, key):
        v = [r[key] for r in recs if r["stage"] == stage]
        k = max(1, len(v) // 10)
        return sum(v[:k]) / k, sum(v[-k:]) / k

    p0, p1 = first_last("motion", "psnr")
    assert p1 > p0 + 0.4, (p0, p1)
    pose0, pose1 = first_last("factors", "pose")
    assert pose1 < 0.3 * pose0, (pose0, pose1)
    _, acc = first_last("factors", "lip_acc")
    assert acc > 1.5 / (1 + C.preset("tiny").stage("factors").n_negatives), acc  # chance = 1 / (1 + K)
    e0, e1 = first_last("expression", "decor")
    assert e1 < e0, (e0, e1)
    n0, n1 = first_last("idle", "nll")
    assert n1 < n0 - 0.5, (n0, n1)


def test_lookahead_is_a_training_option_kept_by_later_stages(small_corpus, tmp_path, one_thread):
    """--lookahead-ms sets E_aud's window; a later stage continuing the checkpoint keeps it, and asking
    for another lookahead on that checkpoint is refused (the encoder's window would not fit)."""
    from engine.checkpoint import read_checkpoint_config
    from trainer.train import TrainConfig, train

    base = dict(data=small_corpus, config="tiny", out=tmp_path / "run", workers=0, steps=2, log_every=1,
                seed=0, progress=False, device="cpu")
    ck = train(TrainConfig(stage="factors", lookahead_ms=40, **base))
    cfg, _ = read_checkpoint_config(ck)
    assert cfg.lookahead_ms == 40 and cfg.mel_window == cfg.mel_past + 4
    train(TrainConfig(stage="expression", **base))
    assert read_checkpoint_config(ck)[0].lookahead_ms == 40
    with pytest.raises(InputError, match="40 ms lookahead"):
        train(TrainConfig(stage="expression", lookahead_ms=80, **base))
    with pytest.raises(InputError, match="lookahead-ms"):
        train(TrainConfig(stage="factors", lookahead_ms=-5, **base))


def test_a_sound_only_clip_store_reads_what_a_full_one_does_without_the_frames(small_corpus, tmp_path):
    """The built-in's audio and idle stages read the sound and the factor tables only: their store probes the
    video for its frame count and rate instead of decoding and resizing it, and caches no frames."""
    from engine.config import ModelConfig
    from trainer.data import ClipStore, list_clips

    cfg = ModelConfig.preset("talk-tiny")
    ref = list_clips(small_corpus)[0]
    full = ClipStore(cfg, cache_dir=tmp_path / "full").get(ref)
    for _ in range(2):  # computed, then from its cache
        sound = ClipStore(cfg, cache_dir=tmp_path / "sound", frames=False).get(ref)
        assert sound.n == full.n and sound.frames.shape == (full.n, 0, 0, 3) and sound.fps == full.fps
        assert np.array_equal(sound.windows, full.windows) and np.array_equal(sound.active, full.active)
        assert all(np.array_equal(sound.factors[k], full.factors[k]) for k in full.factors)
    assert not list((tmp_path / "sound").rglob("*.frames.npy")) and list((tmp_path / "full").rglob("*.frames.npy"))
