"""The procedural face renderer: contract, determinism, disentanglement by group, pose geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import InputError
from trainer.corpus import factors as F
from trainer.corpus.face import (
    IDENTITY_DIM,
    IDENTITY_FIELDS,
    FaceRenderer,
    sample_identity,
)
from trainer.corpus.face_identity import IDENTITY_HIGH, IDENTITY_LOW

TOL = 1.0 / 255.0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small renders: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def r64():
    return FaceRenderer(64)


@pytest.fixture(scope="module")
def r96():
    return FaceRenderer(96)


@pytest.fixture(scope="module")
def r128():
    return FaceRenderer(128)


def _ids(n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([sample_identity(rng) for _ in range(n)])


def _random(group, n, rng):
    lo, hi = F.ranges(group)
    return rng.uniform(lo, hi, (n, len(lo))).astype(np.float32)


def _neutral(group, n):
    return F.neutral(group, n)


def _pose(yaw=0.0, pitch=0.0, roll=0.0, tx=0.0, ty=0.0, scale=1.0, n=1):
    return np.tile(np.array([[yaw, pitch, roll, tx, ty, scale]], np.float32), (n, 1))


# ------------------------------------------------------------------------------------------ identity
def test_identity_vector():
    assert IDENTITY_DIM == len(IDENTITY_FIELDS) == len(set(IDENTITY_FIELDS))
    a = sample_identity(np.random.default_rng(7))
    b = sample_identity(np.random.default_rng(7))
    assert a.shape == (IDENTITY_DIM,) and a.dtype == np.float32
    assert np.array_equal(a, b)
    ids = _ids(50, seed=3)
    assert np.all(ids >= IDENTITY_LOW) and np.all(ids <= IDENTITY_HIGH)
    assert not np.array_equal(ids[0], ids[1])


# ------------------------------------------------------------------------------------------ contract
def test_shape_dtype_range(r64):
    rng = np.random.default_rng(0)
    n = 3
    img = r64.render(_ids(n), _random("pose", n, rng), _random("eyes", n, rng), _random("mouth", n, rng),
                     _random("expression", n, rng))
    assert img.shape == (n, 3, 64, 64) and img.dtype == torch.float32 and img.device.type == "cpu"
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert torch.isfinite(img).all()


def test_identity_broadcast_and_tensor_inputs(r64):
    rng = np.random.default_rng(1)
    ident = _ids(1)[0]
    pose, eyes = _random("pose", 2, rng), _random("eyes", 2, rng)
    mouth, expr = _random("mouth", 2, rng), _random("expression", 2, rng)
    a = r64.render(ident, pose, eyes, mouth, expr)
    b = r64.render(torch.from_numpy(np.stack([ident, ident])), torch.from_numpy(pose), torch.from_numpy(eyes),
                   torch.from_numpy(mouth), torch.from_numpy(expr))
    assert a.shape == (2, 3, 64, 64)
    assert torch.equal(a, b)


def test_batch_equals_singles_and_no_flicker(r64):
    rng = np.random.default_rng(2)
    n = 4
    args = (_ids(n, 5), _random("pose", n, rng), _random("eyes", n, rng), _random("mouth", n, rng),
            _random("expression", n, rng))
    batch = r64.render(*args)
    again = r64.render(*args)
    assert torch.equal(batch, again)  # bit-identical: no randomness, no flicker
    for i in range(n):
        single = r64.render(*(a[i:i + 1] for a in args))
        assert torch.allclose(single[0], batch[i], atol=1e-5, rtol=0)


def test_out_of_range_is_clamped(r64):
    ident = _ids(1)[0]
    wild = r64.render(ident, _pose(yaw=400.0, pitch=-300.0, scale=9.0), np.array([[5.0, -5.0, 3.0, -2.0]], np.float32),
                      np.array([[4.0, 9.0, -3.0]], np.float32), np.full((1, 6), 7.0, np.float32))
    assert torch.isfinite(wild).all() and float(wild.min()) >= 0.0 and float(wild.max()) <= 1.0
    lo, hi = np.array([-40.0, -26.0]), np.array([40.0, 26.0])
    edge = r64.render(ident, _pose(yaw=hi[0], pitch=lo[1], scale=1.25), np.array([[1.1, -1.1, 1.0, 0.0]], np.float32),
                      np.array([[1.0, 1.1, 0.0]], np.float32), np.ones((1, 6), np.float32))
    assert torch.equal(wild, edge)
    nan = r64.render(ident, np.full((1, 6), np.nan, np.float32))
    assert torch.equal(nan, r64.render(ident))


def test_windows_change_nothing():
    """The expensive parts run in per-sample windows; rendering every part over the whole frame gives the
    same pixels, even for extreme poses and identities (the windows hold everything they must)."""
    from trainer.corpus import face as FM

    size, n = 64, 8
    r = FaceRenderer(size)
    rng = np.random.default_rng(1)
    ids = _ids(n, 2)
    ids[:3] = np.where(rng.uniform(size=(3, IDENTITY_DIM)) < 0.5, IDENTITY_LOW, IDENTITY_HIGH)
    lo, hi = (np.array(x, np.float32) for x in FM.CLAMP_RANGES["pose"])
    pose = rng.uniform(lo, hi, (n, 6)).astype(np.float32)
    pose[:4] = [[40, 26, 20, 0.12, 0.12, 1.25], [-40, -26, -20, -0.12, -0.12, 1.25], [40, -26, 20, -0.12, 0.12, 1.25],
                [-40, 26, -20, 0.12, -0.12, 0.8]]
    args = r._batch(r._identity(ids), r._group(pose, "pose"), r._group(_random("eyes", n, rng), "eyes"),
                    r._group(_random("mouth", n, rng), "mouth"), r._group(_random("expression", n, rng), "expression"))
    windowed = r.render(*args)
    full = FM._render_core(r._u, r._v, r._pix, *args, {k: (size, size) for k in FM._WINDOWS}, True)
    assert torch.allclose(windowed, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [0, -8, 12, 100, 2.5, True, "64"])
def test_bad_size_raises(size):
    with pytest.raises(InputError):
        FaceRenderer(size)


def test_bad_shapes_raise(r64):
    ident = _ids(1)[0]
    with pytest.raises(InputError):
        r64.render(ident[:5])
    with pytest.raises(InputError):
        r64.render(ident, np.zeros((2, 5), np.float32))
    with pytest.raises(InputError):
        r64.render(_ids(2), _pose(n=3))
    with pytest.raises(InputError):
        r64.region_mask(ident, _pose(), "nose")


# ------------------------------------------------------------------------------------------ disentanglement
def _setup(n=6, seed=11):
    rng = np.random.default_rng(seed)
    ids = _ids(n, seed)
    pose = _random("pose", n, rng)
    pose[0, 0], pose[1, 0], pose[2, 1], pose[3, 2] = 35.0, -35.0, 22.0, -16.0  # turned heads included
    return rng, ids, pose


@pytest.mark.parametrize("group", ["eyes", "mouth", "expression"])
def test_group_changes_only_inside_its_region(r96, group):
    rng, ids, pose = _setup()
    n = len(ids)
    base = {g: _random(g, n, rng) for g in ("eyes", "mouth", "expression")}
    a = r96.render(ids, pose, base["eyes"], base["mouth"], base["expression"])
    other = dict(base)
    lo, hi = F.ranges(group)
    other[group] = np.where(base[group] < 0.5 * (lo + hi), hi, lo).astype(np.float32)  # far from base
    b = r96.render(ids, pose, other["eyes"], other["mouth"], other["expression"])
    diff = (a - b).abs().amax(1)  # (n, H, W)
    mask = r96.region_mask(ids, pose, group)[:, 0]
    assert mask.dtype == torch.bool and mask.shape == diff.shape
    outside = diff.masked_fill(mask, 0.0).amax((1, 2))
    assert float(outside.max()) < TOL, f"{group} changed pixels outside its region: {outside.tolist()}"
    changed = ((diff > 0.05) & mask).sum((1, 2))
    assert int(changed.min()) >= 10, f"{group} barely changed anything: {changed.tolist()}"


def test_masks_are_local(r96):
    _, ids, pose = _setup()
    eyes = r96.region_mask(ids, pose, "eyes").float().mean((1, 2, 3))
    mouth = r96.region_mask(ids, pose, "mouth").float().mean((1, 2, 3))
    expr = r96.region_mask(ids, pose, "expression").float().mean((1, 2, 3))
    assert float(eyes.max()) < 0.12 and float(mouth.max()) < 0.25 and float(expr.max()) < 0.45
    assert float(eyes.min()) > 0.01 and float(mouth.min()) > 0.02
    assert bool(r96.region_mask(ids, pose, "pose").all())
    # the eye and mouth regions are (nearly) apart
    overlap = (r96.region_mask(ids, pose, "eyes") & r96.region_mask(ids, pose, "mouth")).float().mean()
    assert float(overlap) < 0.01


def test_the_brows_mask_is_the_eye_windows(r96):
    """'brows' (the trainer's region loss, not a factor group): the eyes' region and the brows above them,
    inside the expression's region, and still a small part of the frame."""
    _, ids, pose = _setup()
    eyes, brows = r96.region_mask(ids, pose, "eyes"), r96.region_mask(ids, pose, "brows")
    expr = r96.region_mask(ids, pose, "expression")
    assert float((eyes & ~brows).float().mean()) < 1e-3  # (nearly) all of the eyes' region
    assert float((brows & ~expr).float().mean()) < 1e-3
    grown = brows.float().mean((1, 2, 3)) / eyes.float().mean((1, 2, 3)).clamp(min=1e-6)
    assert float(grown.min()) > 1.2 and float(brows.float().mean((1, 2, 3)).max()) < 0.2, grown.tolist()


def test_blink_closes_the_lids(r128):
    ids = _ids(4, 21)
    pose = _pose(n=4)
    pose[1, 0] = 30.0
    eyes_open = _neutral("eyes", 4)
    closed = eyes_open.copy()
    closed[:, 2:] = 1.0
    a = r128.render(ids, pose, eyes_open)
    b = r128.render(ids, pose, closed)
    diff = (a - b).abs().amax(1)
    assert int(((diff > 0.1).sum((1, 2))).min()) >= 30  # both eyes: sclera and iris covered by lids
    mask = r128.region_mask(ids, pose, "eyes")[:, 0]
    assert float(diff.masked_fill(mask, 0.0).max()) < TOL
    # one lid only: the change stays on that eye's side of the face (subject's left = image right here)
    left = eyes_open.copy()
    left[:, 2] = 1.0
    d = (r128.render(ids[:1], _pose(), left[:1]) - a[:1]).abs().amax(1)[0]
    cols = torch.nonzero(d > 0.05)[:, 1].float()
    assert len(cols) > 10 and float(cols.min()) > 64


def test_jaw_opens_mouth_dark_interior_and_teeth(r128):
    ident = _ids(1, 4)[0]
    closed = r128.render(ident, _pose(), None, np.array([[0.0, 0.0, 0.0]], np.float32))
    opened = r128.render(ident, _pose(), None, np.array([[1.0, 0.0, 0.0]], np.float32))
    diff = (opened - closed).abs().amax(1)[0]
    changed = diff > 0.05
    assert int(changed.sum()) >= 60
    lum_open = opened[0].mean(0)[changed]
    assert float(lum_open.min()) < 0.15  # a dark mouth interior
    assert float(opened[0].min(0).values[changed].max()) > 0.55  # and something white (teeth)


def test_pose_moves_everything_and_identities_differ(r64):
    ids = _ids(4, 8)
    a = r64.render(ids, _pose(n=4))
    b = r64.render(ids, _pose(yaw=25.0, pitch=10.0, n=4))
    frac = ((a - b).abs().amax(1) > TOL).float().mean((1, 2))
    assert float(frac.min()) > 0.15
    for i in range(4):
        for j in range(i + 1, 4):
            assert float((a[i] - a[j]).abs().mean()) > 0.04


def _mouth_centroid(r, ident, pose):
    """Image position (col, row) of what the jaw changes: the mouth, wherever the head points."""
    closed = r.render(ident, pose, None, np.array([[0.0, 0.0, 0.0]], np.float32))
    opened = r.render(ident, pose, None, np.array([[1.0, 0.0, 0.0]], np.float32))
    w = (opened - closed).abs().amax(1)[0]
    w = w * (w > 0.05)
    rows, cols = torch.meshgrid(torch.arange(w.shape[0]).float(), torch.arange(w.shape[1]).float(), indexing="ij")
    return float((w * cols).sum() / w.sum()), float((w * rows).sum() / w.sum())


def test_yaw_pitch_roll_rotate_the_head(r128):
    ident = _ids(1, 9)[0]
    c0, r0 = _mouth_centroid(r128, ident, _pose())
    cy_pos, _ = _mouth_centroid(r128, ident, _pose(yaw=30.0))
    cy_neg, _ = _mouth_centroid(r128, ident, _pose(yaw=-30.0))
    assert cy_pos > c0 + 4 and cy_neg < c0 - 4  # yaw > 0: the face turns to the image right
    _, rp_up = _mouth_centroid(r128, ident, _pose(pitch=20.0))
    _, rp_dn = _mouth_centroid(r128, ident, _pose(pitch=-20.0))
    assert rp_up < r0 - 2 and rp_dn > r0 + 2  # pitch > 0: looks up (rows grow downwards)
    cr, _ = _mouth_centroid(r128, ident, _pose(roll=15.0))
    assert cr > c0 + 2  # roll > 0: counter-clockwise, so the mouth (below the centre) swings right
    ct, rt = _mouth_centroid(r128, ident, _pose(tx=0.08, ty=0.08))
    assert abs((ct - c0) - 0.08 * 128) < 3 and abs((r0 - rt) - 0.08 * 128) < 3
    # foreshortening: seen at yaw 35 the mouth (its width change: both corners) spans fewer columns
    def mouth_span(pose):
        narrow = r128.render(ident, pose, None, np.array([[0.0, -1.0, 0.0]], np.float32))
        wide = r128.render(ident, pose, None, np.array([[0.0, 1.0, 0.0]], np.float32))
        cols = torch.nonzero((wide - narrow).abs().amax(1)[0] > 0.05)[:, 1]
        return int(cols.max() - cols.min())

    assert mouth_span(_pose(yaw=35.0)) < 0.93 * mouth_span(_pose())


def test_gaze_moves_the_iris(r128):
    ident = _ids(1, 13)[0]
    left = r128.render(ident, _pose(), np.array([[1.0, 0.0, 0.0, 0.0]], np.float32))
    right = r128.render(ident, _pose(), np.array([[-1.0, 0.0, 0.0, 0.0]], np.float32))

    lum_l, lum_r = left[0].mean(0), right[0].mean(0)
    cols = torch.arange(lum_l.shape[1]).float().view(1, -1)
    darker_in_left = (lum_r - lum_l).clamp(min=0.0)  # where the iris went when looking left
    darker_in_right = (lum_l - lum_r).clamp(min=0.0)
    assert float(darker_in_left.sum()) > 1.0
    c_left = float((darker_in_left * cols).sum() / darker_in_left.sum())
    c_right = float((darker_in_right * cols).sum() / darker_in_right.sum())
    assert c_left > c_right + 1.0  # gaze_x > 0: towards the subject's left = the image right


@pytest.mark.slow
def test_compiled_matches_eager():
    ids = _ids(2, 1)
    rng = np.random.default_rng(0)
    args = (ids, _random("pose", 2, rng), _random("eyes", 2, rng), _random("mouth", 2, rng),
            _random("expression", 2, rng))
    comp = FaceRenderer(64, compile=True)
    a = comp.render(*args)
    assert comp.last_path == "compiled"
    b = FaceRenderer(64).render(*args)
    assert torch.allclose(a, b, atol=5e-3)
