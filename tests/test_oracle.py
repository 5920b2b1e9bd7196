"""The factor oracle: network shapes and units, save/load, training data, accuracy, a short training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.errors import InputError
from trainer import oracle as O
from trainer.corpus import factors as fa


def _small(size: int = 64) -> O.FactorOracle:
    torch.manual_seed(0)
    return O.FactorOracle(O.OracleNetConfig(size=size, channels=(8, 16, 16, 32, 32), embed_dim=24)).eval()


def test_columns_follow_the_factor_table():
    assert O.N_OUT == sum(fa.dims(g) for g in fa.GROUP_NAMES)
    sl = O.group_slices()
    for g in fa.GROUP_NAMES:
        assert [c for gg, c in O.COLUMNS[sl[g]]] == fa.column_names(g)
        assert all(gg == g for gg, _ in O.COLUMNS[sl[g]])
        lo, hi = fa.ranges(g)
        np.testing.assert_array_equal(O.LOW[sl[g]], lo)
        np.testing.assert_array_equal(O.HIGH[sl[g]], hi)


def test_forward_groups_units_and_features():
    o = _small()
    x = torch.rand(3, 3, 80, 80)  # any square size: resized to the oracle's
    out = o(x)
    assert list(out) == list(fa.GROUP_NAMES)
    for g, v in out.items():
        assert v.shape == (3, fa.dims(g))
    flat = o.flat(x)
    np.testing.assert_allclose(flat.detach().numpy(), (O.LOW + O.RANGE * o.normalised(x).detach().numpy()), rtol=1e-5, atol=1e-5)
    assert o.features(x).shape == (3, 24)
    with pytest.raises(InputError):
        o(torch.rand(2, 1, 64, 64))
    # gradients reach the input (the trainer uses `features` as a loss feature)
    xi = torch.rand(2, 3, 64, 64, requires_grad=True)
    o.features(xi).sum().backward()
    assert xi.grad is not None and float(xi.grad.abs().sum()) > 0


def test_read_factors_batches_match_one_pass():
    o = _small()
    x = torch.rand(5, 3, 64, 64)
    np.testing.assert_allclose(O.read_factors(o, x, batch_size=2), o.flat(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert O.read_factors(o, x[:0]).shape == (0, O.N_OUT)


def test_save_load_roundtrip(tmp_path):
    o = _small()
    d = O.save_oracle(o, tmp_path / "oracle", meta={"note": "x"})
    assert sorted(p.name for p in d.iterdir()) == sorted([O.WEIGHTS, O.CONFIG])
    doc = json.loads((d / O.CONFIG).read_text())
    assert doc["net"]["channels"] == [8, 16, 16, 32, 32] and doc["meta"] == {"note": "x"}
    o2, meta = O.load_oracle(d)
    assert meta == {"note": "x"} and not o2.training
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(o.flat(x), o2.flat(x))
    o3, _ = O.load_oracle(d / O.CONFIG)  # the file names the directory too
    assert torch.equal(o3.flat(x), o2.flat(x))


def test_load_rejects_bad_oracles(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        O.load_oracle(tmp_path / "nope")
    d = O.save_oracle(_small(), tmp_path / "o")
    doc = json.loads((d / O.CONFIG).read_text())
    doc["columns"] = doc["columns"][::-1]
    (d / O.CONFIG).write_text(json.dumps(doc))
    with pytest.raises(InputError, match="columns"):
        O.load_oracle(d)
    d = O.save_oracle(_small(), tmp_path / "o2")
    (d / O.WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="safetensors"):
        O.load_oracle(d)
    d = O.save_oracle(_small(), tmp_path / "o3")
    doc = json.loads((d / O.CONFIG).read_text())
    doc["net"]["embed_dim"] = 25
    (d / O.CONFIG).write_text(json.dumps(doc))
    with pytest.raises(InputError, match="weights do not match"):
        O.load_oracle(d)


def test_default_oracle_dir(tmp_path):
    assert O.default_oracle_dir(None) is None
    assert O.default_oracle_dir(tmp_path) == tmp_path / "oracle"


def test_sample_factors_cover_ranges_and_are_seeded():
    a = O.sample_factors(np.random.default_rng(3), 2000)
    b = O.sample_factors(np.random.default_rng(3), 2000)
    flat = O.flat_factors(a)
    np.testing.assert_array_equal(flat, O.flat_factors(b))
    assert flat.shape == (2000, O.N_OUT)
    assert (flat >= O.LOW - 1e-6).all() and (flat <= O.HIGH + 1e-6).all()
    # every column spreads over most of its range (an oracle trained on it sees all of it)
    spread = (np.percentile(flat, 98, axis=0) - np.percentile(flat, 2, axis=0)) / O.RANGE
    assert (spread > 0.6).all(), dict(zip(O.COLUMNS, spread.round(2)))
    # groups are sampled independently: no strong correlation across groups
    c = np.corrcoef(flat.T)
    sl = O.group_slices()
    for g in sl:
        for h in sl:
            if g != h:
                assert np.abs(c[sl[g], sl[h]]).max() < 0.15


def test_accuracy_numbers():
    truth = np.zeros((4, O.N_OUT), np.float32)
    truth[:, 0] = [0, 10, 20, 30]  # yaw
    pred = truth.copy()
    pred[:, 0] += 7.0  # 7 degrees off
    acc = O.accuracy(pred, truth)
    yaw = acc["groups"]["pose"]["columns"]["yaw"]
    assert acc["frames"] == 4
    assert yaw["mae"] == pytest.approx(7.0)
    assert yaw["mae_pct"] == pytest.approx(100 * 7.0 / 70.0)
    assert yaw["mean_baseline_mae"] == pytest.approx(10.0)  # |x - 15| averaged
    assert acc["groups"]["eyes"]["mae_pct"] == 0.0
    with pytest.raises(ValueError):
        O.accuracy(pred[:, :3], truth[:, :3])


def test_augment_is_seeded_and_keeps_range():
    x = torch.rand(6, 3, 32, 32)
    a = O.augment(x, torch.Generator().manual_seed(1))
    b = O.augment(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, x)


def test_mirror_matches_the_renderer():
    """A mirrored frame is the frame of the mirrored factors (identity mirrored too: light, hair parting)."""
    from trainer.corpus.face import FaceRenderer, sample_identity
    from trainer.corpus.face_identity import FIELD_INDEX

    rng = np.random.default_rng(5)
    r = FaceRenderer(64)
    ids = np.stack([sample_identity(rng) for _ in range(4)])
    fac = O.sample_factors(rng, 4)
    y = torch.from_numpy((O.flat_factors(fac) - O.LOW) / O.RANGE)
    x = r.render(ids, fac["pose"], fac["eyes"], fac["mouth"], fac["expression"])
    flip = torch.tensor([True, True, True, False])
    xm, ym = O.mirror(x, y, flip)
    assert torch.equal(xm[3], x[3]) and torch.equal(ym[3], y[3])
    u = ym.numpy() * O.RANGE + O.LOW
    ids_m = ids.copy()
    for f in ("light_azimuth", "hair_part"):
        ids_m[:3, FIELD_INDEX[f]] *= -1
    sl = O.group_slices()
    want = r.render(ids_m, *(u[:, sl[g]] for g in fa.GROUP_NAMES))
    unmirrored = r.render(ids_m, fac["pose"], fac["eyes"], fac["mouth"], fac["expression"])
    err = (xm[:3] - want[:3]).abs().mean(dim=(1, 2, 3))
    assert (err < 0.01).all(), err
    assert (err < 0.3 * (xm[:3] - unmirrored[:3]).abs().mean(dim=(1, 2, 3))).all()


def test_config_validation(tmp_path):
    with pytest.raises(InputError):
        O.OracleConfig(data=None, out=tmp_path, render_fraction=1.5)
    with pytest.raises(InputError):
        O.OracleConfig(data=None, out=tmp_path, steps=-1)
    with pytest.raises(InputError):
        O.OracleNetConfig(size=50)
    assert O.OracleConfig(data=None, out=tmp_path, render_fraction=0.2).render_fraction == 1.0


def _finite_tree(x):
    if isinstance(x, dict):
        return all(_finite_tree(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite_tree(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def test_train_oracle_on_small_corpus(small_corpus, tmp_path):
    cfg = O.OracleConfig(data=small_corpus, out=tmp_path / "oracle", steps=4, batch_size=8, size=64,
                         render_pool=16, eval_frames=16, max_real_frames=64, log_every=2)
    d = O.train_oracle(cfg)
    oracle, meta = O.load_oracle(d)
    assert oracle.cfg.size == 64
    t = meta["trained"]
    assert t["steps"] == 4 and t["real_frames"] > 0 and t["render_pool"] == 16
    for key in ("accuracy_rendered", "accuracy"):
        acc = meta[key]
        assert acc["frames"] > 0 and _finite_tree(acc)
        assert set(acc["groups"]) == set(fa.GROUP_NAMES)
    assert meta["accuracy"]["split"] in ("val", "test")



def test_training_is_deterministic(tmp_path):
    def run(name):
        cfg = O.OracleConfig(data=None, out=tmp_path / name, steps=2, batch_size=4, size=64, render_pool=4,
                             eval_frames=4)
        return O.load_oracle(O.train_oracle(cfg))

    (a, ma), (b, mb) = run("a"), run("b")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(a.flat(x), b.flat(x))
    assert ma == mb and ma["trained"]["real_frames"] == 0


@pytest.mark.slow
def test_trained_oracle_beats_predicting_the_mean(small_corpus, tmp_path):
    """A longer run (64 px, 1500 steps, a few minutes on CPU): on frames rendered for unseen identities the
    oracle reads far better than predicting the mean overall, pose, jaw opening and lids most of all; on the
    held-out corpus identity's decoded frames it reads the head turn better than the mean."""
    cfg = O.OracleConfig(data=small_corpus, out=tmp_path / "oracle", steps=1500, batch_size=32, size=64,
                         render_pool=4096, eval_frames=512, log_every=250)
    _, meta = O.load_oracle(O.train_oracle(cfg))
    g = meta["accuracy_rendered"]["groups"]
    cols = {f"{k}.{c}": v for k, grp in g.items() for c, v in grp["columns"].items()}
    mae = np.mean([v["mae_pct"] for v in cols.values()])
    base = np.mean([v["mean_baseline_pct"] for v in cols.values()])
    assert mae < 0.85 * base, (mae, base)
    assert g["pose"]["mae_pct"] < 0.5 * g["pose"]["mean_baseline_pct"], g["pose"]
    for c in ("mouth.jaw_open", "eyes.lid_left", "eyes.lid_right"):
        assert cols[c]["mae_pct"] < 0.7 * cols[c]["mean_baseline_pct"], (c, cols[c])
    yaw = meta["accuracy"]["groups"]["pose"]["columns"]["yaw"]
    assert yaw["mae"] < yaw["mean_baseline_mae"], yaw


# =================================================================================== region branch
def _small_regions(size: int = 64) -> O.FactorOracle:
    torch.manual_seed(0)
    return O.FactorOracle(O.OracleNetConfig(size=size, channels=(8, 16, 16, 32, 32), embed_dim=24, regions=True,
                                            region_size=16, region_channels=(8, 8), region_dim=12)).eval()


def test_region_crops_follow_the_eye_line():
    """A crop is centred on its anchor (moved along the eye line's normal), scaled by the eye distance and
    turned with it; the left eye's crop is mirrored. Checked on a frame whose pixels are their own
    coordinates."""
    S, r = 128, 33
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    frame = torch.stack([xs, ys, torch.zeros_like(xs)])[None]  # (1, 3, S, S): x, y
    for roll in (0.0, 0.4):
        u = torch.tensor([math.cos(roll), math.sin(roll)])
        n = torch.tensor([-u[1], u[0]])
        d = 0.4
        er, el = torch.tensor([-0.1, -0.2]), torch.tensor([-0.1, -0.2]) + d * u
        m = (er + el) / 2 + 0.5 * n
        a = torch.stack([er, el, m])[None]
        cr, cl, cm = O.region_crops(frame, a, r)
        mid = r // 2
        for crop, anchor, (off, side), flip in ((cr, er, O.EYE_CROP, False), (cl, el, O.EYE_CROP, True),
                                                (cm, m, O.MOUTH_CROP, False)):
            centre = anchor + off * d * n
            np.testing.assert_allclose(crop[0, :2, mid, mid].numpy(), centre.numpy(), atol=0.02)
            # one step right in the crop moves along u (against it when mirrored), one step down along n
            step = (crop[0, :2, mid, mid + 4] - crop[0, :2, mid, mid]) / (4 * side * d / r)
            np.testing.assert_allclose(step.numpy(), (-u if flip else u).numpy(), atol=0.05)
            step = (crop[0, :2, mid + 4, mid] - crop[0, :2, mid, mid]) / (4 * side * d / r)
            np.testing.assert_allclose(step.numpy(), n.numpy(), atol=0.05)


def test_region_crops_land_on_the_rendered_eyes_and_mouth():
    """With the renderer's anchors the crops hold what the eye and mouth factors change, for turned, rolled
    and scaled heads: a blink changes the middle of the eye crops and not their borders, and opening the jaw
    changes the mouth crop."""
    from trainer.corpus.face import FaceRenderer, anchor_points, sample_identity

    rng = np.random.default_rng(9)
    n = 6
    ids = np.stack([sample_identity(rng) for _ in range(n)])
    fac = O.sample_factors(rng, n)
    fac["eyes"][:] = 0.0
    fac["mouth"][:, 0] = 0.0
    r = FaceRenderer(128)
    a = anchor_points(torch.from_numpy(ids), torch.from_numpy(fac["pose"]))
    base = O.region_crops(r.render(ids, fac["pose"], fac["eyes"], fac["mouth"], fac["expression"]), a, 32)
    blink, jaw = {k: v.copy() for k, v in fac.items()}, {k: v.copy() for k, v in fac.items()}
    blink["eyes"][:, 2:] = 1.0
    jaw["mouth"][:, 0] = 0.8
    crops = {}
    for name, f in (("blink", blink), ("jaw", jaw)):
        crops[name] = O.region_crops(r.render(ids, f["pose"], f["eyes"], f["mouth"], f["expression"]), a, 32)
    ring = torch.ones(32, 32, dtype=torch.bool)
    ring[3:-3, 3:-3] = False
    for j in (0, 1):  # both eyes
        d = (crops["blink"][j] - base[j]).abs().mean(1)  # (n, 32, 32)
        centre, border = d[:, 12:26, 6:26].mean(dim=(1, 2)), d[:, ring].mean(1)
        assert (centre > 0.01).all() and (border < 0.2 * centre).all(), (j, centre, border)
    d = (crops["jaw"][2] - base[2]).abs().mean(1)
    assert (d[:, 6:26, 6:26].mean(dim=(1, 2)) > 0.01).all()


def test_region_oracle_forward_save_load_and_gradients(tmp_path):
    o = _small_regions()
    x = torch.rand(3, 3, 96, 96)  # any square size; the crops come from the input itself
    out = o(x)
    assert [v.shape for v in out.values()] == [(3, fa.dims(g)) for g in fa.GROUP_NAMES]
    assert o.anchors(x).shape == (3, 3, 2)
    assert o.features(x).shape == (3, 24 + 3 * 12)
    # given anchors replace the found ones; NaN rows fall back to the found ones
    a = torch.zeros(3, 3, 2)
    a[:, 0, 0], a[:, 1, 0] = -0.3, 0.3
    given = o.normalised(x, a)
    assert not torch.allclose(given, o.normalised(x))
    mixed = a.clone()
    mixed[1] = float("nan")
    got = o.normalised(x, mixed)
    assert torch.allclose(got[0], given[0]) and torch.allclose(got[1], o.normalised(x)[1], atol=1e-6)
    xi = torch.rand(2, 3, 64, 64, requires_grad=True)
    o.features(xi).sum().backward()
    assert float(xi.grad.abs().sum()) > 0
    d = O.save_oracle(o, tmp_path / "oracle")
    o2, _ = O.load_oracle(d)
    assert o2.cfg.regions and torch.equal(o2.flat(x), o.flat(x))
    with pytest.raises(InputError, match="no region branch"):
        _small().anchors(x)
    # an oracle written before the region branch existed loads as a global-only one
    assert not O.OracleNetConfig.from_dict({"size": 64}).regions
    with pytest.raises(InputError, match="region_size"):
        O.OracleNetConfig(regions=True, region_size=20)


def test_train_region_oracle_reports_anchor_error(tmp_path):
    cfg = O.OracleConfig(data=None, out=tmp_path / "oracle", steps=3, batch_size=4, size=64, regions=True,
                         render_size=96, render_pool=8, eval_frames=8, log_every=1)
    oracle, meta = O.load_oracle(O.train_oracle(cfg))
    assert oracle.cfg.regions and meta["trained"]["regions"] and meta["trained"]["render_size"] == 96
    px = meta["accuracy_rendered"]["anchors_px"]
    assert px["size"] == 96 and all(px[k]["median"] >= 0 for k in O.REGION_ANCHORS)
