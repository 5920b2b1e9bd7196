"""The built-in design: computed pose warp, ground-truth latents, relative motion, the render/audio/idle
recipe (trainer.synthetic) end to end on the tiny config, and `serve` refusing without its extra."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import GT_DIMS, ModelConfig
from engine.errors import InputError


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_geometry_matches_the_renderer_camera():
    from engine import geometry as G
    from trainer.corpus import face

    assert (G.CAM_Z, G.VIEW_HALF, G.HEAD_Y) == (face.CAM_Z, face.VIEW_HALF, face.HEAD_Y)
    yaw, pitch, roll = torch.tensor([12.0, -30.0]), torch.tensor([5.0, 20.0]), torch.tensor([-7.0, 3.0])
    ref = face._rotation(yaw * math.pi / 180, pitch * math.pi / 180, roll * math.pi / 180)
    assert torch.allclose(G.rotation(yaw, pitch, roll), ref, atol=1e-6)


def test_pose_flow_is_identity_for_equal_poses_and_moves_the_head():
    from engine.geometry import pose_flow

    rng = np.random.default_rng(0)
    p = torch.from_numpy(np.stack([rng.uniform(-30, 30, 5), rng.uniform(-20, 20, 5), rng.uniform(-15, 15, 5),
                                   rng.uniform(-.08, .08, 5), rng.uniform(-.08, .08, 5),
                                   rng.uniform(.9, 1.1, 5)], 1).astype(np.float32))
    assert pose_flow(p, p, 32).abs().max() < 1e-5
    # a pure translation: the body plane moves by exactly the translation, the head (nearer the camera)
    # a little more, by perspective; nothing moves vertically
    a = torch.tensor([[0.0, 0, 0, 0, 0, 1]])
    b = torch.tensor([[0.0, 0, 0, 0.05, 0, 1]])
    fl = pose_flow(b, a, 16)
    assert abs(float(fl[0, 0, 0, 0]) + 0.1) < 1e-4  # grid units: 2 x 0.05 (a corner: the body plane)
    assert fl[:, 0].max() < -0.099 and fl[:, 0].min() > -0.125
    assert fl[:, 1].abs().max() < 1e-5


def test_pose_warp_of_a_rendered_head_beats_copy_source():
    """Warping a render at pose A by pose_flow(B, A) is closer to the render at B than A itself is."""
    from engine.geometry import pose_flow
    from engine.networks import _base_grid
    from trainer.corpus.face import FaceRenderer, sample_identity
    from trainer.evaluate import psnr

    rng = np.random.default_rng(3)
    r = FaceRenderer(64)
    n = 6
    ident = np.stack([sample_identity(rng) for _ in range(n)])
    lo, hi = np.array([-25, -15, -12, -.05, -.05, .95]), np.array([25, 15, 12, .05, .05, 1.05])
    pa, pb = (rng.uniform(lo, hi, (n, 6)).astype(np.float32) for _ in range(2))
    a, b = r.render(ident, pa), r.render(ident, pb)
    fl = F.interpolate(pose_flow(torch.from_numpy(pb), torch.from_numpy(pa), 16), size=(64, 64), mode="bilinear",
                       align_corners=False)
    w = F.grid_sample(a, _base_grid(64) + fl.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
    gain = psnr(w, b) - psnr(a, b)
    assert gain.mean() > 1.0 and (gain > 0).all(), gain


def test_the_mean_cranium_moves_a_rendered_face_better_than_the_generic_head():
    """The warp alone, at a 20 deg turn: the corpus' mean cranium (CRANIUM_AXES, the surface the face is painted
    on) puts the face's pixels nearer the render at the target pose than HEAD_AXES (the cranium plus hair)."""
    from engine.geometry import CRANIUM_AXES, HEAD_AXES, pose_flow
    from engine.networks import _base_grid
    from trainer.corpus.face import FaceRenderer, sample_identity

    rng = np.random.default_rng(5)
    S, n = 96, 10
    r = FaceRenderer(S)
    ident = np.stack([sample_identity(rng) for _ in range(n)])
    pa = np.zeros((n, 6), np.float32)
    pa[:, 5] = 1.0
    pa[:, 0] = rng.uniform(-10, 10, n)
    pb = pa.copy()
    pb[:, 0] += 20 * np.sign(rng.uniform(-1, 1, n))
    a, b = r.render(ident, pa).float(), r.render(ident, pb).float()
    face = r.region_mask(ident, pb, "expression").float()

    def face_psnr(axes):
        fl = pose_flow(torch.from_numpy(pb), torch.from_numpy(pa), S, axes)
        w = F.grid_sample(a, _base_grid(S) + fl.permute(0, 2, 3, 1), padding_mode="border", align_corners=False)
        e = ((w - b) ** 2 * face).sum((1, 2, 3)) / (3 * face.sum((1, 2, 3)))
        return -10 * torch.log10(e)

    gain = face_psnr(CRANIUM_AXES) - face_psnr(HEAD_AXES)
    assert gain.mean() > 0.5 and (gain > -0.5).all(), gain
    assert torch.equal(pose_flow(torch.from_numpy(pb), torch.from_numpy(pa), 8),
                       pose_flow(torch.from_numpy(pb), torch.from_numpy(pa), 8, HEAD_AXES))  # the default


def test_a_model_runs_its_warp_with_its_own_head_axes():
    """ModelConfig.head_axes reaches G's computed warp and survives the checkpoint's JSON; bad values are refused."""
    from engine.geometry import CRANIUM_AXES, HEAD_AXES
    from engine.model import Marionette

    cfg = ModelConfig.preset("talk-tiny")
    assert Marionette(cfg).generator.head_axes == HEAD_AXES
    c2 = ModelConfig.from_dict({**cfg.to_dict(), "head_axes": list(CRANIUM_AXES)})
    assert c2.head_axes == CRANIUM_AXES and Marionette(c2).generator.head_axes == CRANIUM_AXES
    with pytest.raises(ValueError, match="head_axes"):
        ModelConfig.from_dict({**cfg.to_dict(), "head_axes": [0.7, 1.0]})
    # the built-in's preset trains and runs with the cranium's axes (README "The cranium retrain")
    assert ModelConfig.preset("talk").head_axes == CRANIUM_AXES


def test_ground_truth_latents_zero_their_unused_dimensions():
    from engine.model import Marionette

    cfg = ModelConfig.preset("talk-tiny")
    m = Marionette(cfg).eval()
    mask = torch.tensor(cfg.latents.gt_mask())
    assert int(mask.sum()) == sum(GT_DIMS.values())
    with torch.no_grad():
        z = m.compose(m.encode_motion(torch.rand(2, 3, 64, 64) * 2 - 1))
        assert (z[:, mask == 0] == 0).all() and (z[:, mask == 1] != 0).any()
        lip = m.encode_audio(torch.randn(2, cfg.audio.n_mels, cfg.mel_window))
        assert (lip[:, GT_DIMS["lip"]:] == 0).all()
        # relative: the avatar's app vector carries the portrait's own state after the appearance vector, and
        # (patches) where its eyes and mouth are
        portrait = torch.rand(1, 3, 64, 64) * 2 - 1
        hi, lo, app = m.encode_avatar(portrait)
        k = cfg.net.app_dim + cfg.latents.total
        assert app.shape == (1, k + 6)
        assert torch.allclose(app[:, cfg.net.app_dim:k], m.source_state(portrait))
        # talk's anchors are E_mot's eye and mouth keypoints (mirror-averaged); a model without the flag uses its head
        assert cfg.anchors_from_keypoints and ModelConfig.preset("talk").anchors_from_keypoints
        assert torch.allclose(app[:, k:], m.read_portrait(portrait)[1][:, :3].flatten(1))
        m.cfg = dataclasses.replace(cfg, anchors_from_keypoints=False)
        assert torch.allclose(m.encode_avatar(portrait)[2][:, k:], m.generator.patch.source_anchors(lo).flatten(1))


def test_generator_uses_the_source_state_and_the_pose_warp():
    """With the flow head at its zero init, G's output moves with the pose latents through the computed
    warp alone (and not at all when target pose = source pose)."""
    from engine.model import Marionette

    cfg = ModelConfig.preset("talk-tiny")
    torch.manual_seed(0)
    m = Marionette(cfg).eval()
    src = torch.rand(1, 3, 64, 64) * 2 - 1
    hi, lo, app = m.e_app(src)
    sl = cfg.latents.slices()["pose"]
    z_src = torch.zeros(1, cfg.latents.total)
    z_src[:, sl.start] = 0.5  # the portrait looks 15 degrees to its left
    app_rel = torch.cat([app, z_src, m.generator.patch.source_anchors(lo).flatten(1)], 1)
    with torch.no_grad():
        same = m.generator(z_src, src, hi, lo, app_rel)
        turned = m.generator(torch.zeros(1, cfg.latents.total), src, hi, lo, app_rel)
        flow_same = m.generator.flow(z_src, lo, app_rel)[0]
    assert flow_same.abs().max() < 1e-4  # target = source: the computed warp is the identity
    assert (turned - same).abs().mean() > 1e-3


def test_rendered_batches_serve_reuse_steps_and_a_resumed_run_sees_the_same():
    from trainer.synthetic import PairRenderer, render_batches

    mk = PairRenderer(ModelConfig.preset("talk-tiny"), n_ids=1, per_id=2, seed=3, region=False)
    it = render_batches(mk, 0, 0, reuse=2)
    run = [next(it) for _ in range(5)]
    assert [int(b["step"]) for b in run] == [0, 0, 1, 1, 2]  # step s trains on rendered batch s // 2
    assert "region" not in run[0] and torch.equal(run[2]["target"], mk(1)["target"])
    resumed = render_batches(mk, 3, 0, reuse=2)  # a run resumed at step 3: the second use of batch 1, then batch 2
    assert [int(next(resumed)["step"]) for _ in range(3)] == [1, 2, 2]
    assert [int(b["step"]) for b, _ in zip(render_batches(mk, 4, 0), range(2))] == [4, 5]  # reuse 1: as before
    with pytest.raises(ValueError, match="reuse"):
        render_batches(mk, 0, 0, reuse=0)


def test_pair_renderer_is_deterministic_and_one_factor_targets_keep_the_rest():
    from trainer.synthetic import PairRenderer, sample_pair_states

    cfg = ModelConfig.preset("talk-tiny")
    mk = PairRenderer(cfg, n_ids=2, per_id=3, seed=5)
    a, b = mk(7), mk(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["source"].shape == (2, 3, 64, 64) and a["target"].shape == (6, 3, 64, 64)
    assert a["region"].shape == (6, 1, 64, 64) and a["region"].sum() > 0
    assert not torch.equal(mk(8)["source"], a["source"])
    src, tgt = sample_pair_states(np.random.default_rng(1), 64, 2, one_factor=1.0)
    rep = {g: np.repeat(src[g], 2, 0) for g in src}
    same = np.stack([np.all(tgt[g] == rep[g], axis=1) for g in ("pose", "eyes", "mouth", "expression")], 1)
    assert (same.sum(1) >= 3).all()  # exactly one group changed (or none, by chance)


def test_talk_tiny_trains_render_audio_idle_end_to_end(small_corpus, tmp_path, one_thread):
    from engine.checkpoint import load_model
    from trainer import config as C
    from trainer.stages import MAIN_LOSSES
    from trainer.train import TrainConfig, train

    run = tmp_path / "run"
    ckpt = train(TrainConfig(stage="all", data=small_corpus, config="talk-tiny", out=run, workers=0, log_every=1,
                             ckpt_every=20, seed=0, progress=False, device="cpu"))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    for stage in C.preset("talk-tiny").order:
        vals = [sum(r[k] for k in MAIN_LOSSES[stage]) for r in recs if r["stage"] == stage]
        assert len(vals) == C.preset("talk-tiny").stage(stage).steps
        k = 8
        assert sum(vals[-k:]) / k < 0.9 * sum(vals[:k]) / k, f"{stage} did not learn"
    model, meta = load_model(ckpt)
    assert model.cfg.name == "talk-tiny" and model.cfg.gt_latents and not meta["random_weights"]
    assert meta["expression_presets"]["happy"][:6] == pytest.approx([0.25, 0.0, 1.0, 0.0, 0.8, 0.35])
    assert meta.get("idle_model")
    for stage in C.SYNTHETIC_STAGES:
        assert (run / "state" / f"{stage}.safetensors").is_file()
    # resumable: a second run with --resume finds every stage done and trains nothing
    n = len(recs)
    train(TrainConfig(stage="all", data=small_corpus, config="talk-tiny", out=run, workers=0, resume=True,
                      progress=False, device="cpu"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == n
    # the polish as `make builtin` runs it (trainer.polish): G's stages again from that model into RUN/polish, each
    # resumable; the decision is taken from this run's own stage times
    from trainer.polish import decide, polish, projected_seconds, started

    top = tmp_path
    (top / "talk").symlink_to(run)
    (top / "corpus").symlink_to(small_corpus)
    assert projected_seconds(run, "talk-tiny") > 0 and not started(top)
    ck = polish(top, config="talk-tiny", device="cpu", steps=3, workers=0, progress=False)
    assert json.loads((top / "polish" / "state" / "progress.json").read_text())["completed"] == \
        ["render", "state", "patch"]
    polished, _ = load_model(ck)
    assert any(not torch.equal(a, b) for a, b in zip(polished.generator.parameters(), model.generator.parameters()))
    assert started(top) and decide(top, 0.0).run  # begun: finished even with no budget left
    n = len((top / "polish" / "metrics.jsonl").read_text().splitlines())
    polish(top, config="talk-tiny", device="cpu", steps=3, workers=0, progress=False)  # a rerun: nothing to do
    assert len((top / "polish" / "metrics.jsonl").read_text().splitlines()) == n


def test_render_stage_needs_no_corpus(tmp_path, one_thread):
    from trainer.train import TrainConfig, train

    ckpt = train(TrainConfig(stage="render", data=tmp_path / "missing", config="talk-tiny", out=tmp_path / "r",
                             steps=3, workers=0, progress=False, device="cpu"))
    assert (ckpt / "model.safetensors").is_file()


def test_serve_without_its_extra_refuses_naming_it():
    code = ("import sys; sys.modules['aiortc'] = None\n"
            "from marionette.cli import main\n"
            "sys.exit(main(['serve', '--port', '0']))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "`serve` extra" in p.stderr and "aiortc" in p.stderr


def test_anchors_land_on_the_eyes_and_the_mouth_at_any_pose():
    """The renderer's anchors (what the patch stage teaches the anchor head) sit inside its own eye and mouth
    region masks, for every target pose the pair sampler draws."""

    from trainer.synthetic import PairRenderer

    cfg = dataclasses.replace(ModelConfig.preset("talk-tiny"), image_size=128)
    mk = PairRenderer(cfg, n_ids=4, per_id=4, seed=11)
    b = mk(0)
    from trainer.corpus.face import FaceRenderer, anchor_points, sample_identity

    rng = np.random.default_rng(3)
    from trainer.synthetic import sample_pair_states

    ident = np.stack([sample_identity(rng) for _ in range(16)]).astype(np.float32)
    _, tgt = sample_pair_states(rng, 16, 1)
    r = FaceRenderer(128)
    a = anchor_points(ident, tgt["pose"])  # (16,3,2)
    col = ((a[..., 0] + 1) * 64 - 0.5).round().long().clamp(0, 127)
    row = ((a[..., 1] + 1) * 64 - 0.5).round().long().clamp(0, 127)
    eyes = r.region_mask(ident, tgt["pose"], "eyes")[:, 0]
    mouth = r.region_mask(ident, tgt["pose"], "mouth")[:, 0]
    i = torch.arange(16)
    assert eyes[i, row[:, 0], col[:, 0]].all() and eyes[i, row[:, 1], col[:, 1]].all()
    assert mouth[i, row[:, 2], col[:, 2]].all()
    assert (a[:, 0, 0] < a[:, 1, 0]).all() and (a[:, 2, 1] > a[:, :2, 1].amax(1)).all()
    assert b["anchor_source"].shape == (4, 3, 2) and b["anchor_target"].shape == (16, 3, 2)


def test_patch_refiner_follows_the_flow_and_pastes_only_inside_its_squares():
    from engine.networks import PatchRefiner

    cfg = ModelConfig.preset("talk-tiny")
    torch.manual_seed(0)
    P = PatchRefiner(cfg).eval()
    # a constant backward flow t: the anchors move by -t
    a_s = torch.tensor([[[-0.2, -0.1], [0.2, -0.1], [0.0, 0.25]]])
    t = torch.tensor([0.05, -0.03])
    flow = t.view(1, 2, 1, 1).expand(1, 2, 16, 16).contiguous()
    assert torch.allclose(P.target_anchors(a_s, flow), a_s - t, atol=1e-5)
    frame = torch.rand(1, 3, 64, 64) * 2 - 1
    z = torch.zeros(1, cfg.latents.total)
    with torch.no_grad():
        same, win = P.apply(frame, z, z, a_s, with_window=True)  # fresh nets: zero-initialised outputs
        assert torch.equal(same, frame.clamp(-1, 1))
        P.mouth_net.out.bias.fill_(0.5)
        moved = P.apply(frame, z, z, a_s)
    diff = (moved - frame).abs().amax(1)[0]  # (64,64)
    col, row = [int(round(float((v + 1) * 32 - 0.5))) for v in a_s[0, 2]]
    assert diff[row, col] > 0.3  # at the mouth anchor
    centre, half, u, v = P.boxes(a_s)
    ys, xs = torch.nonzero(diff > 1e-6, as_tuple=True)
    gx, gy = (xs.float() + 0.5) / 32 - 1, (ys.float() + 0.5) / 32 - 1
    assert ((gx - centre[0, 2, 0]).abs().max() <= half[0, 2] + 1e-3)  # nothing outside the mouth square
    assert ((gy - centre[0, 2, 1]).abs().max() <= half[0, 2] + 1e-3)
    assert win.amax() == 1.0 and win.amin() == 0.0


def _full_frame_paste(P, frame, base, z_t, z_s, a_t, squares=(0, 1, 2)):
    """The paste as it was before the crops: every square's window and inverse map over the whole frame."""
    import torch.nn.functional as F

    from engine.networks import PATCH_FEATHER

    cond = P.conditions(z_t, z_s)
    out = frame
    for k in squares:
        centre, half, u, v = P.boxes(a_t)
        c, h = centre[:, k], half[:, k].view(-1, 1, 1, 1)
        sx = -1.0 if k == 1 else 1.0
        grid, _, _, _ = P._place(a_t, k)
        patch = F.grid_sample(base, grid, mode="bilinear", padding_mode="border", align_corners=False)
        delta = (P.mouth_net if k == 2 else P.eye_net)(patch, cond[0] if k == 2 else cond[1 + k])
        q = P.grid_full - c.view(-1, 1, 1, 2)
        qx = (q * u.view(-1, 1, 1, 2)).sum(-1, keepdim=True) / h * sx
        qy = (q * v.view(-1, 1, 1, 2)).sum(-1, keepdim=True) / h
        win = ((1.0 - torch.maximum(qx.abs(), qy.abs()).permute(0, 3, 1, 2)) / PATCH_FEATHER).clamp(0.0, 1.0)
        back = F.grid_sample(delta, torch.cat([qx, qy], -1), mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        out = out + win * (base - out + back)
    return out.clamp(-1.0, 1.0)


def test_patch_crops_hold_every_square_up_to_the_largest_face():
    """Each eye's change is pasted inside a crop around its square (gather, compute, scatter; the mouth's over
    the frame); the crop is sized so the frame is what the whole-frame paste makes for any face scale up to
    FACE_SCALE_MAX, any turn of the eye line and squares that leave the frame; and the two phases (body, mouth)
    make the same frame."""
    from engine.networks import FACE_SCALE_MAX, PatchRefiner

    cfg = ModelConfig.preset("talk-tiny")
    torch.manual_seed(0)
    P = PatchRefiner(cfg).eval()
    s = cfg.image_size
    assert P.crop_eye < s  # a crop, not the frame
    with torch.no_grad():
        for p in (*P.mouth_net.parameters(), *P.eye_net.parameters()):  # fresh nets draw nothing: give them weights
            p.add_(torch.randn_like(p) * 0.2)
    g = torch.Generator().manual_seed(1)
    b = 24
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.pi  # the eye line at any angle
    d = torch.rand(b, generator=g) * (FACE_SCALE_MAX - 0.2) + 0.2
    d[:4] = FACE_SCALE_MAX * 0.999  # the largest faces
    centre = (torch.rand(b, 2, generator=g) * 2 - 1) * 0.9  # some squares leave the frame
    u = torch.stack([angle.cos(), angle.sin()], -1)
    v = torch.stack([-u[:, 1], u[:, 0]], -1)
    ln = d * 0.7  # eye distance; the mouth below the eyes' midpoint by sqrt(d^2 - ln^2)
    em = (d * d - ln * ln).sqrt()
    e0 = centre - 0.5 * ln[:, None] * u
    e1 = centre + 0.5 * ln[:, None] * u
    mo = centre + em[:, None] * v
    a_t = torch.stack([e0, e1, mo], 1)  # (B,3,2)
    frame = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    base = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    z_t = torch.randn(b, cfg.latents.total, generator=g) * 0.5
    z_s = torch.randn(b, cfg.latents.total, generator=g) * 0.5
    with torch.no_grad():
        want = _full_frame_paste(P, frame, base, z_t, z_s, a_t)
        got, win = P.apply(frame, z_t, z_s, a_t, base=base, with_window=True)
        assert (got - want).abs().max() < 1e-5
        assert ((got - frame.clamp(-1, 1)).abs().amax(1) > 1e-6).float().mean() > 0.01  # the nets did draw
        # the same through the two phases: body (the eyes, the mouth's window) + mouth (its net, pasted)
        flow = torch.zeros(b, 2, s // 4, s // 4)
        assert (P.mouth(*P.body(frame, z_t, z_s, flow, a_t, base), z_t, z_s) - want).abs().max() < 1e-5
    assert win.shape == (b, 1, s, s) and win.amax() == 1.0


def test_a_third_patch_level_starts_as_the_two_level_net_and_reaches_further():
    """PatchNet(levels=3) holding a two-level net's weights computes the same change (its `lift` starts at zero);
    once the third level is used, a change at one corner of the square reaches the opposite side (+-18 px)
    where the two-level net's cannot (+-6)."""
    from engine.networks import PatchNet

    torch.manual_seed(0)
    two, three = PatchNet(6, 8, levels=2), PatchNet(6, 8, levels=3)
    missing, unexpected = three.load_state_dict(two.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("down2", "deep1", "deep2", "lift") for k in missing)
    for net in (two, three):
        torch.nn.init.normal_(net.out.weight, std=0.1)
    three.out.load_state_dict(two.out.state_dict())
    x, c = torch.rand(1, 3, 32, 32), torch.rand(1, 6)
    with torch.no_grad():
        assert torch.allclose(two(x, c), three(x, c), atol=1e-6)
    torch.nn.init.normal_(three.lift.weight, std=0.1)

    def reach(net) -> float:
        xx = x.clone().requires_grad_(True)
        net(xx, c)[0, :, 28, 28].sum().backward()  # one output pixel near a corner
        g = xx.grad.abs().sum(1)[0]
        return float(g[:14, :14].sum())  # what it reads more than 14 px away on both axes

    assert reach(two) == 0.0 and reach(three) > 0.0
    with pytest.raises(ValueError, match="levels"):
        PatchNet(6, 8, levels=4)


def test_a_warping_patch_net_starts_as_the_painting_one_and_moves_what_is_there():
    """PatchNet(warp_res=n) holding a net's weights without the warp computes the same change (its `flow` conv
    starts at zero); a flow of a quarter of the square's half-side moves an edge by n/8 pixels, which the
    painting net alone could only approximate. The flow is learned: its gradient reaches the flow conv."""
    from engine.networks import PatchNet

    torch.manual_seed(0)
    plain, warp = PatchNet(6, 8, levels=3), PatchNet(6, 8, levels=3, warp_res=32)
    missing, unexpected = warp.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["flow.bias", "flow.weight"]
    torch.nn.init.normal_(plain.out.weight, std=0.1)
    warp.out.load_state_dict(plain.out.state_dict())
    x = torch.zeros(1, 3, 32, 32)
    x[..., 12:20] = 1.0  # a vertical bar, columns 12..19
    c = torch.rand(1, 6)
    with torch.no_grad():
        assert torch.allclose(plain(x, c), warp(x, c), atol=1e-6)
        torch.nn.init.zeros_(warp.out.weight)
        torch.nn.init.zeros_(warp.out.bias)
        warp.flow.bias.copy_(torch.tensor([0.25, 0.0]))  # sample 4 px to the right: the bar moves 4 px left
        moved = x + warp(x, c)
    assert torch.allclose(moved[..., 8:16], torch.ones_like(moved[..., 8:16]), atol=1e-5)
    assert float(moved[..., 16:].abs().max()) < 1e-5 and float(moved[..., :8].abs().max()) < 1e-5
    warp.flow.bias.data.zero_()
    warp.flow.weight.data.normal_(std=0.01)
    xx = torch.rand(1, 3, 32, 32)
    warp(xx, c).square().sum().backward()
    assert warp.flow.weight.grad is not None and float(warp.flow.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="warp_res"):
        PatchNet(6, 8, warp_res=31)
    # the linear basis: each (target, source) pair's difference moves the square by its own field, and not at
    # all where target and source agree
    based = PatchNet(4, 8, levels=3, warp_res=32, pairs=((0, 1), (2, 3)))
    with torch.no_grad():
        based.basis[0].view(2, 8, 8)[0] = 0.5  # pair 0 moves the sampling point half a half-side right per unit
        same = based(x, torch.tensor([[0.7, 0.7, 0.2, 0.2]]))
        half = based(x, torch.tensor([[0.9, 0.4, 0.2, 0.2]]))  # difference 0.5: 0.25 -> 4 px, as above
        other = based(x, torch.tensor([[0.3, 0.3, 0.9, 0.4]]))  # pair 1 has no field
    assert float(same.abs().max()) == 0.0 and float(other.abs().max()) == 0.0
    assert torch.allclose(x + half, moved, atol=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        PatchNet(4, 8, pairs=((0, 1),))


def test_the_patch_stage_moves_a_checkpoint_into_the_new_generator_layout(tmp_path, one_thread):
    """A talk checkpoint with G's old mouth branch and two-level local generators trains on in the new layout:
    every shared weight outside the local generators kept as it was, the branch dropped, the third level added."""

    from engine.checkpoint import load_model, save_checkpoint
    from engine.config import NetworkConfig
    from engine.model import Marionette
    from trainer.train import TrainConfig, train

    base = ModelConfig.preset("talk-tiny")
    old_cfg = dataclasses.replace(base, eye_source_gaze=True,
                                  net=dataclasses.replace(base.net, mouth_branch=True, patch_levels=2))
    from engine.idle_model import WEIGHTS as IDLE_WEIGHTS
    from engine.idle_model import IdleModelConfig, IdleMotionModel, save_idle_model

    torch.manual_seed(0)
    old = Marionette(old_cfg).eval()
    idle_meta = save_idle_model(IdleMotionModel(IdleModelConfig(n_mels=old_cfg.audio.n_mels, fps=old_cfg.fps,
                                                                mel_per_frame=old_cfg.mel_per_frame)), tmp_path / "old")
    save_checkpoint(old, tmp_path / "old", meta={"idle_model": idle_meta})
    for name in ("talk", "talk-tiny"):
        assert ModelConfig.preset(name).net.mouth_branch is False and ModelConfig.preset(name).net.patch_levels == 3
    assert NetworkConfig().mouth_branch and NetworkConfig().patch_levels == 2 and not NetworkConfig().patch_warp
    # (old checkpoints load unchanged)
    ckpt = train(TrainConfig(stage="patch", data=tmp_path / "missing", config="talk-tiny", out=tmp_path / "run",
                             init=tmp_path / "old", steps=2, workers=0, progress=False, device="cpu",
                             freeze=("generator.patch.anchor",)))
    model, meta = load_model(ckpt)
    assert model.cfg.net.mouth_branch is False and model.cfg.net.patch_levels == 3 and model.cfg.net.patch_warp
    assert meta["idle_model"] and (ckpt / IDLE_WEIGHTS).read_bytes() == (tmp_path / "old" / IDLE_WEIGHTS).read_bytes()
    assert model.cfg.eye_source_gaze is False
    sd = model.state_dict()
    assert not any(k.startswith("generator.mouth64") for k in sd)
    assert any(".deep1." in k for k in sd) and "generator.patch.mouth_net.flow.weight" in sd
    same = [k for k in old.state_dict() if k in sd and not k.startswith("generator.patch.")]
    assert same and all(torch.equal(old.state_dict()[k], sd[k]) for k in same)
    kept = [k for k in sd if k.startswith("generator.patch.anchor.")]  # --freeze: trained by the stage, kept
    assert kept and all(torch.equal(old.state_dict()[k], sd[k]) for k in kept)
    trained = [k for k in sd if k.startswith("generator.patch.mouth_net.") and k in old.state_dict()]
    assert any(not torch.equal(old.state_dict()[k], sd[k]) for k in trained)
    with pytest.raises(InputError, match="no such submodule"):
        train(TrainConfig(stage="patch", data=tmp_path / "missing", config="talk-tiny", out=tmp_path / "run2",
                          init=tmp_path / "old", steps=1, workers=0, progress=False, device="cpu",
                          freeze=("generator.nothing",)))


def test_resuming_a_stage_started_from_init_keeps_that_checkpoints_config(tmp_path, one_thread):
    """`train --init CK --resume` after an interruption rebuilds the model as saved, not from the preset: the
    jaw calibration of CK (which the preset lacks) survives into the resumed stage's checkpoint."""

    from engine.checkpoint import load_model, save_checkpoint
    from engine.model import Marionette
    from trainer.train import TrainConfig, train

    knots = ((0.0, 0.0), (0.1, 0.2), (0.5, 0.6))
    cfg = dataclasses.replace(ModelConfig.preset("talk-tiny"), jaw_calibration=knots)
    assert ModelConfig.preset("talk-tiny").jaw_calibration != knots
    torch.manual_seed(0)
    save_checkpoint(Marionette(cfg).eval(), tmp_path / "ck")
    common = dict(stage="patch", data=tmp_path / "missing", config="talk-tiny", out=tmp_path / "run",
                  init=tmp_path / "ck", workers=0, ckpt_every=1, progress=False, device="cpu")
    train(TrainConfig(steps=2, **common))
    progress = tmp_path / "run" / "state" / "progress.json"
    progress.write_text(json.dumps({"completed": []}))  # as if cut after its last trainer state
    ckpt = train(TrainConfig(steps=3, resume=True, **common))
    model, meta = load_model(ckpt)
    assert meta["train"]["step"] == 3
    assert model.cfg.jaw_calibration == knots


def test_without_the_source_gaze_the_eye_net_hears_only_the_target_gaze():
    """eye_source_gaze=False: the per-avatar estimate of the source's gaze (which E_mot cannot read) reaches no
    net; the target's gaze still does, mirrored for the image-right eye."""

    from engine.networks import PatchRefiner

    cfg = ModelConfig.preset("talk-tiny")
    assert cfg.eye_source_gaze is False
    P = PatchRefiner(cfg)
    e = cfg.latents.slices()["eye"].start
    z_t, z_s = torch.rand(2, cfg.latents.total), torch.rand(2, cfg.latents.total)
    z_s2 = z_s.clone()
    z_s2[:, e:e + 2] = -z_s2[:, e:e + 2]  # another source gaze
    a, b = P.conditions(z_t, z_s), P.conditions(z_t, z_s2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    z_t2 = z_t.clone()
    z_t2[:, e] += 0.5
    c = P.conditions(z_t2, z_s)
    assert not torch.equal(a[1], c[1]) and torch.allclose((c[1] - a[1]).sum(1), torch.full((2,), 0.5))
    assert torch.allclose((c[2] - a[2]).sum(1), torch.full((2,), -0.5))  # mirrored
    told = PatchRefiner(dataclasses.replace(cfg, eye_source_gaze=True))
    assert not torch.equal(told.conditions(z_t, z_s)[1], told.conditions(z_t, z_s2)[1])


def test_keypoint_anchors_of_a_mirrored_portrait_are_the_mirrored_anchors():
    """`anchors_from_keypoints`: the portrait's anchors are E_mot's first three keypoints, read with the mirror image
    too. For any weights, a mirrored portrait's anchors are the portrait's with x negated and the eyes swapped, the
    engine's landmark mirror map matches the renderer's landmark names, and the flag needs the keypoint branch."""
    from engine.config import LANDMARK_ANCHORS, LANDMARK_MIRROR
    from engine.model import Marionette, mirror_keypoints
    from trainer.corpus.face import LANDMARKS

    swap = {"right": "left", "left": "right"}
    names = ["_".join(swap.get(w, w) for w in n.split("_")) for n in LANDMARKS]
    assert [LANDMARKS[i] for i in LANDMARK_MIRROR] == names
    assert [LANDMARKS[i] for i in LANDMARK_ANCHORS] == ["eye_right", "eye_left", "mouth"]
    cfg = ModelConfig.preset("talk-tiny")
    torch.manual_seed(1)
    m = Marionette(cfg).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a = m.encode_avatar(x)[2][:, -6:].reshape(2, 3, 2)
        b = m.encode_avatar(torch.flip(x, dims=[3]))[2][:, -6:].reshape(2, 3, 2)
    assert torch.allclose(b[:, [1, 0, 2]] * torch.tensor([-1.0, 1.0]), a, atol=1e-5)
    kp = torch.rand(2, len(LANDMARKS), 2)
    assert torch.equal(mirror_keypoints(mirror_keypoints(kp)), kp)
    with pytest.raises(ValueError, match="anchors_from_keypoints"):
        Marionette(dataclasses.replace(cfg, net=dataclasses.replace(cfg.net, motion_keypoints=0)))


def test_landmarks_are_the_anchors_and_move_with_the_pose():
    """The renderer's landmarks (what E_mot's keypoint branch learns): the first three are the patch anchors; a
    turn to the subject's left moves the nose tip to the image right of the eyes' midpoint, a roll tilts the
    eye line, a translation moves every landmark by a little more than twice its fraction (grid units: the
    face is nearer the camera than the head centre)."""
    from engine.config import N_LANDMARKS
    from trainer.corpus.face import LANDMARKS, anchor_points, landmark_points, sample_identity

    assert len(LANDMARKS) == N_LANDMARKS
    rng = np.random.default_rng(5)
    ident = np.stack([sample_identity(rng) for _ in range(4)]).astype(np.float32)
    zero = np.tile(np.array([[0, 0, 0, 0, 0, 1]], np.float32), (4, 1))
    kp0 = landmark_points(ident, zero)
    assert kp0.shape == (4, N_LANDMARKS, 2) and torch.equal(kp0[:, :3], anchor_points(ident, zero))
    nose, eyes = LANDMARKS.index("nose_tip"), kp0[:, :2].mean(1)
    assert (kp0[:, nose, 0] - eyes[:, 0]).abs().max() < 1e-4  # frontal: the nose under the eyes' midpoint
    for col, val in ((0, 20.0), (2, 10.0), (3, 0.05)):
        pose = zero.copy()
        pose[:, col] = val
        kp = landmark_points(ident, pose)
        if col == 0:
            assert (kp[:, nose, 0] - kp[:, :2, 0].mean(1) > 0.02).all()
        elif col == 2:  # counter-clockwise in the image: the image-right eye (subject's left) rises (y down)
            assert (kp[:, 1, 1] < kp[:, 0, 1] - 0.01).all()
        else:
            shift = kp[..., 0] - kp0[..., 0]
            assert ((shift > 0.1) & (shift < 0.13)).all() and (kp[..., 1] - kp0[..., 1]).abs().max() < 0.01


def test_the_state_estimator_finds_keypoints_and_learns_them(one_thread):
    """E_mot's keypoint branch: its soft-argmax keypoints are appended to the motion feature inside the image,
    the state regression adds their error to the renderer's landmarks, and a few steps on one batch cut it."""
    from engine.model import Marionette
    from engine.networks import MotionEncoder
    from trainer.synthetic import StatePool, state_regression

    cfg = ModelConfig.preset("talk-tiny")
    k = cfg.net.motion_keypoints
    assert k == ModelConfig.preset("talk").net.motion_keypoints > 0
    torch.manual_seed(0)
    m = Marionette(cfg)
    pool = StatePool(cfg, size=16, batch=16, seed=3)
    b = pool(0)
    assert b["kp"].shape == (16, k, 2)
    feat = m.motion_feature(b["frames"])
    assert feat.shape == (16, cfg.net.motion_dim + 2 * k)
    kp = MotionEncoder.keypoints(feat, k)
    assert kp.abs().max() < 1.0
    gen = torch.Generator().manual_seed(0)
    _, without = state_regression(m, b["frames"], b["z"], gen)
    gen = torch.Generator().manual_seed(0)
    _, with_kp = state_regression(m, b["frames"], b["z"], gen, b["kp"])
    assert with_kp > without
    opt = torch.optim.Adam(m.e_mot.parameters(), lr=3e-3)

    def kp_err() -> float:
        with torch.no_grad():
            return float((MotionEncoder.keypoints(m.motion_feature(b["frames"]), k) - b["kp"]).abs().mean())

    before = kp_err()
    for _ in range(30):
        _, loss = state_regression(m, b["frames"], b["z"], torch.Generator().manual_seed(1), b["kp"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kp_err() < 0.7 * before


def test_the_state_stage_gives_an_older_checkpoint_the_keypoint_branch(tmp_path, one_thread):
    """`train --stage state --init CK` on a checkpoint without E_mot's keypoint branch: the branch is added, the
    estimator trains, and every weight outside it (G, E_app, E_aud) is kept as it was."""

    from engine.checkpoint import load_model, save_checkpoint
    from engine.model import Marionette
    from trainer.train import TrainConfig, train

    base = ModelConfig.preset("talk-tiny")
    old_cfg = dataclasses.replace(base, motion_mirror=False, anchors_from_keypoints=False,
                                  net=dataclasses.replace(base.net, motion_keypoints=0))
    torch.manual_seed(0)
    old = Marionette(old_cfg).eval()
    save_checkpoint(old, tmp_path / "old")
    ckpt = train(TrainConfig(stage="state", data=tmp_path / "missing", config="talk-tiny", out=tmp_path / "run",
                             init=tmp_path / "old", steps=2, workers=0, progress=False, device="cpu"))
    model, _ = load_model(ckpt)
    assert model.cfg.net.motion_keypoints == base.net.motion_keypoints > 0 and model.cfg.motion_mirror
    assert model.cfg.anchors_from_keypoints
    sd, osd = model.state_dict(), old.state_dict()
    outside = [k for k in osd if not k.startswith(("e_mot.", "e_lip.", "e_pose.", "e_eye.", "e_exp."))]
    assert outside and all(torch.equal(osd[k], sd[k]) for k in outside)
    assert any(k.startswith("e_mot.kp_head.") for k in sd)
    assert not torch.equal(osd["e_mot.body.0.0.weight"], sd["e_mot.body.0.0.weight"])


def test_the_portrait_is_read_at_nine_shifts_and_its_keypoints_moved_back():
    """`portrait_jitter_px`: the portrait's state is the mean of its (mirror-averaged) readings at the 3 x 3 shifts
    of +-d px (the border repeated), and its keypoints the mean of each shift's keypoints moved back by the shift;
    the built-in reads its portrait that way, and driving frames are not jittered."""
    from engine.model import Marionette

    cfg = ModelConfig.preset("talk-tiny")
    assert cfg.portrait_jitter_px == 1 and ModelConfig.preset("talk").portrait_jitter_px == 3
    torch.manual_seed(0)
    m = Marionette(cfg).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    once = dataclasses.replace(cfg, portrait_jitter_px=0)
    with torch.no_grad():
        z, kp = m.read_portrait(x)
        m.cfg = once
        zs, kps = [], []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                pad = F.pad(x, (1, 1, 1, 1), mode="replicate")
                shifted = pad[:, :, 1 - dy:65 - dy, 1 - dx:65 - dx]  # content moved by (dx, dy), border repeated
                zi, ki = m.read_portrait(shifted)
                zs.append(zi)
                kps.append(ki - torch.tensor([2.0 * dx / 64, 2.0 * dy / 64]))
        z1, kp1 = m.read_portrait(x)
        m.cfg = cfg
        assert torch.allclose(z, torch.stack(zs).mean(0), atol=1e-6)
        assert torch.allclose(kp, torch.stack(kps).mean(0), atol=1e-6)
        assert (z - z1).abs().max() > 0 and (kp - kp1).abs().max() > 0  # not the single reading
        assert torch.allclose(m.encode_avatar(x)[2][:, cfg.net.app_dim:cfg.net.app_dim + cfg.latents.total], z)
        assert torch.equal(m.encode_motion(x, mirror=True)["pose"], m.encode_motion(x, mirror=True)["pose"])


def test_reading_views_move_and_zoom_the_content_and_their_readings_map_back():
    """`engine.model.reading_views` / `view_frames`: a view (dx, dy, k) shows the point p (grid units) at k p + t,
    t = 2 (dx, dy) / S; `unview_keypoints` and `unview_state` undo exactly that for a reader that sees it (a zoom
    multiplies the head's scale and its offset from the centre), and the views' mean is returned."""
    from engine.model import (POSE_LATENT_OFFSET, POSE_LATENT_SCALE, reading_views, unview_keypoints, unview_state,
                              view_frames)

    views = reading_views(3, 0.04)
    assert len(views) == 27 and (0, 0, 1.0) in views and reading_views(0, 0.0) == [(0, 0, 1.0)]
    with pytest.raises(ValueError):
        reading_views(-1, 0.0)
    s = 64
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    img = torch.exp(-((xs - 20) ** 2 + (ys - 40) ** 2) / (2 * 2.5 ** 2))[None, None]  # a blob at (x 20, y 40)
    for dx, dy, k in [(3, -3, 1.0), (0, 0, 1.25), (2, 1, 0.8)]:
        v = view_frames(img, [(dx, dy, k)])[0, 0]
        w = v / v.sum()
        cx, cy = float((w * xs).sum()), float((w * ys).sum())
        # pixel centre -> grid, moved, back to pixels
        gx, gy = (2 * 20 + 1) / s - 1, (2 * 40 + 1) / s - 1
        ex, ey = ((k * gx + 2 * dx / s) + 1) * s / 2 - 0.5, ((k * gy + 2 * dy / s) + 1) * s / 2 - 0.5
        assert abs(cx - ex) < 0.05 and abs(cy - ey) < 0.05, (dx, dy, k, cx, cy, ex, ey)
    b = 3
    torch.manual_seed(1)
    kp = torch.rand(b, 8, 2) * 1.6 - 0.8
    seen = torch.cat([k * kp + torch.tensor([2.0 * dx / s, 2.0 * dy / s]) for dx, dy, k in views])
    assert torch.allclose(unview_keypoints(seen, views, b, s), kp, atol=1e-6)
    pose = torch.rand(b, 6) - 0.5  # latents; the physical scale 1 + 0.1 l, tx 0.08 l
    phys = pose * torch.tensor(POSE_LATENT_SCALE) + torch.tensor(POSE_LATENT_OFFSET)
    read = []
    for dx, dy, k in views:
        q = phys.clone()
        q[:, 3:6] *= k
        read.append((q - torch.tensor(POSE_LATENT_OFFSET)) / torch.tensor(POSE_LATENT_SCALE))
    lip = torch.rand(b, 3)
    back = unview_state({"pose": torch.cat(read), "lip": lip.repeat(len(views), 1)}, views, b)
    assert torch.allclose(back["pose"], pose, atol=1e-5) and torch.allclose(back["lip"], lip, atol=1e-6)


def test_driving_frames_are_read_offline_at_the_models_views():
    """`read_driving` (render --pose-from, evaluate): one `encode_motion` where the model asks for no views, else the
    mean of every view's reading mapped back; the built-in asks for 27 (3 x 3 shifts of 3 px at 3 zooms)."""
    from engine.model import Marionette, reading_views, unview_state, view_frames
    from engine.runtimes.backend import read_driving
    from engine.runtimes.torch_runtime import TorchRuntime

    cfg = dataclasses.replace(ModelConfig.preset("talk-tiny"), driving_jitter_px=0, driving_zoom=0.0)
    torch.manual_seed(0)
    rt = TorchRuntime(Marionette(cfg).eval(), device="cpu")
    x = torch.rand(2, 3, 64, 64)
    once = read_driving(rt, x)
    assert all(torch.equal(once[k], v) for k, v in rt.encode_motion(x).items())
    rt.model.cfg = dataclasses.replace(cfg, driving_jitter_px=2, driving_zoom=0.05)
    views = reading_views(2, 0.05)
    many = read_driving(rt, x)
    want = unview_state({k: torch.cat([rt.encode_motion(view_frames(x, [v]))[k] for v in views]) for k in once},
                        views, 2)
    assert all(torch.allclose(many[k], want[k], atol=1e-6) for k in want)
    assert (many["pose"] - once["pose"]).abs().max() > 0
    talk = ModelConfig.preset("talk")
    assert (talk.driving_jitter_px, talk.driving_zoom) == (3, 0.04)


def test_the_mirror_reading_of_a_mirrored_frame_is_the_mirrored_state():
    """The mirror reading (`motion_mirror`) averages a frame's reading and its mirror image's, so for any weights a
    mirrored frame reads exactly as the mirrored state (yaw, roll, tx and gaze_x negated, the lids swapped, the
    rest equal); the portrait's state is read that way, a runtime's driving frames by default, and the live
    webcam path reads once (its round has no room for a second pass)."""
    from engine.model import Marionette, mirror_latent
    from engine.runtimes.torch_runtime import TorchRuntime

    cfg = ModelConfig.preset("talk-tiny")
    assert cfg.motion_mirror and ModelConfig.preset("talk").motion_mirror
    torch.manual_seed(0)
    m = Marionette(cfg).eval()
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = m.encode_motion(x, mirror=True), m.encode_motion(torch.flip(x, dims=[3]), mirror=True)
        one = m.encode_motion(x)
        m.cfg = dataclasses.replace(cfg, portrait_jitter_px=0)  # the portrait read once (with its mirror image)
        assert torch.allclose(m.source_state(x), m.compose(a))
        m.cfg = cfg
    for k in a:
        assert torch.allclose(mirror_latent(k, b[k]), a[k], atol=1e-5), k
    pose, eye = a["pose"], a["eye"]
    assert torch.allclose(b["pose"][:, [0, 2, 3]], -pose[:, [0, 2, 3]], atol=1e-5)
    assert torch.allclose(b["pose"][:, [1, 4, 5]], pose[:, [1, 4, 5]], atol=1e-5)
    assert torch.allclose(b["eye"][:, 0], -eye[:, 0], atol=1e-5) and torch.allclose(b["eye"][:, 2], eye[:, 3], atol=1e-5)
    assert not torch.allclose(one["pose"], pose)  # (the single reading differs: the test is not trivial)
    rt = TorchRuntime(m, device="cpu")
    x01 = (x + 1) / 2
    assert torch.allclose(rt.encode_motion(x01)["pose"], pose, atol=1e-5)
    assert torch.allclose(rt.encode_motion(x01, mirror=False)["pose"], one["pose"], atol=1e-5)

    with pytest.raises(ValueError, match="gt_latents"):
        Marionette(dataclasses.replace(ModelConfig.preset("tiny"), motion_mirror=True))
