"""Per-avatar jaw calibration (engine.jaw_map): each portrait's mouth opens as far as commanded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.jaw_map import GRID, MIN_SHARE, REFERENCE, JawCalibrated, JawMap, fit_jaw_map, map_jaws


def _reading(late: float, gain: float = 1.0):
    """A G that reads like the renderer, but opens `late` later and `gain` times as far."""
    return lambda d: gain * np.interp(np.maximum(np.asarray(d) - late, 0.0), GRID, REFERENCE)


@pytest.mark.parametrize("late,gain", [(0.1, 1.0), (0.0, 0.5), (0.05, 0.8)])
def test_the_map_undoes_a_mouth_that_opens_late_or_too_little(late, gain):
    g = _reading(late, gain)
    jm = fit_jaw_map(0.04, g(np.asarray(GRID)))
    assert jm is not None
    for d in (0.1, 0.15, 0.2, 0.3):
        mapped = float(jm.apply(np.float32(0.04 + d))) - 0.04
        want = float(np.interp(d, GRID, REFERENCE))
        assert abs(float(g(mapped)) - want) < 0.02, (late, gain, d, mapped)
    # closing the mouth below the portrait's own jaw is left as commanded; the map never falls
    assert np.allclose(jm.apply(np.asarray([-0.2, 0.0, 0.04], np.float32)), [-0.2, 0.0, 0.04])
    out = jm.apply(np.linspace(0.04, 1.0, 50, dtype=np.float32))
    assert (np.diff(out) >= 0).all()


def test_a_mouth_that_opens_too_far_is_held_back_no_further_than_the_floor():
    jm = fit_jaw_map(0.0, _reading(0.0, 3.0)(np.asarray(GRID)))
    for d, d2 in jm.knots[1:]:
        assert MIN_SHARE * d - 1e-4 <= d2 <= d + 1e-4


def test_a_mouth_the_oracle_cannot_see_open_gets_no_map():
    assert fit_jaw_map(0.0, np.linspace(0, 0.05, len(GRID))) is None
    with pytest.raises(ValueError):
        JawMap(source=0.0, knots=((0.0, 0.0), (0.1, 0.05), (0.05, 0.1)))


def _builtin():
    from engine.checkpoint import builtin_checkpoint_dir

    ck = builtin_checkpoint_dir()
    if ck is None:
        pytest.skip("no built-in checkpoint installed (make builtin)")
    return ck


def _oracle(ck):
    from engine.oracle import load_oracle

    return load_oracle(ck / "oracle")[0]


def test_the_reference_is_what_the_oracle_reads_on_the_renderers_own_frames():
    """REFERENCE, measured again on identities it was not measured on."""
    from engine.oracle import read_factors
    from trainer.corpus.face import FaceRenderer, sample_identity

    orc = _oracle(_builtin())
    jc = orc.column("mouth.jaw_open")
    r = FaceRenderer(256)
    rows = []
    for i in range(16):
        ident = np.asarray(sample_identity(np.random.default_rng([2718, i])), np.float32)[None]
        f = torch.stack([r.render(ident, mouth=np.array([[v, 0.0, 0.0]], np.float32))[0] for v in GRID])
        x = read_factors(orc, f)[:, jc]
        rows.append(x - x[0])
    assert np.abs(np.mean(rows, 0) - np.asarray(REFERENCE)).max() < 0.03, np.round(np.mean(rows, 0), 3)


def test_every_avatar_opens_its_mouth_as_far_as_the_renderer_would():
    """The built-in model through open_backend: the built-in avatar and fresh identities, the oracle's reading of G's
    frames at commanded openings against the renderer's (REFERENCE), with the map and without."""
    from engine.image import BUILTIN_AVATAR
    from engine.oracle import read_factors
    from engine.runtimes.backend import open_backend
    from trainer.corpus.face import FaceRenderer, sample_identity

    ck = _builtin()
    rt = open_backend("torch", checkpoint=ck)
    assert isinstance(rt, JawCalibrated)
    orc = _oracle(ck)
    jc = orc.column("mouth.jaw_open")
    r = FaceRenderer(rt.cfg.image_size)
    portraits = [BUILTIN_AVATAR] + [r.render(np.asarray(sample_identity(np.random.default_rng([1618, i])),
                                                         np.float32)[None])[0:1] for i in range(5)]
    ds = (0.0, 0.15, 0.3)
    want = np.interp(ds, GRID, REFERENCE)[1:]
    err_with, err_without = [], []
    for p in portraits:
        av = rt.prepare_avatar(p)
        assert av.jaw_map is not None
        zs = rt.source_state(av)
        z = torch.from_numpy(np.repeat(zs, len(ds), 0))
        z[:, rt.jaw_index] = float(zs[0, rt.jaw_index]) + torch.tensor(ds)
        for avatar, errs in ((av, err_with), (rt.backend.prepare_avatar(p), err_without)):
            x = read_factors(orc, rt.generate(avatar, z))[:, jc]
            errs.append(np.abs((x[1:] - x[0]) - want))
    err_with, err_without = np.concatenate(err_with), np.concatenate(err_without)
    assert np.median(err_with) < 0.04 and np.median(err_with) < 0.5 * np.median(err_without), (err_with, err_without)
    # the built-in avatar, at an opening of 0.15 over its own jaw (a syllable of speech), opens visibly
    assert err_with[0] < 0.05, err_with[:2]


def test_the_map_is_the_same_in_one_piece_in_two_phases_and_per_row():
    """generate == generate_body + generate_mouth with a mapped avatar; in a batch each row gets its own avatar's map."""
    from engine.image import BUILTIN_AVATAR
    from engine.runtimes.backend import open_backend

    ck = _builtin()
    rt = open_backend("torch", checkpoint=ck)
    a = rt.prepare_avatar(BUILTIN_AVATAR)
    plain = rt.backend.prepare_avatar(BUILTIN_AVATAR)
    z = torch.from_numpy(np.repeat(rt.source_state(a), 2, 0))
    z[:, rt.jaw_index] = 0.25
    one = rt.generate(a, z[:1])
    two = rt.generate_mouth(rt.generate_body(a, z[:1]), a, z[:1])
    assert float((one - two).abs().max()) < 1e-4
    mixed = rt.generate([a, plain], z)
    assert float((mixed[0] - one[0]).abs().max()) < 1e-4
    assert float((mixed[1] - rt.backend.generate(plain, z[1:])[0]).abs().max()) < 1e-4
    assert float((mixed[0] - mixed[1]).abs().max()) > 0.01  # the map did open the mouth further
    mapped = map_jaws([a, plain], z.numpy(), rt.jaw_index)
    assert mapped[0, rt.jaw_index] > 0.25 and mapped[1, rt.jaw_index] == pytest.approx(0.25)


def test_onnxruntime_measures_the_same_map(builtin_onnx):
    from engine.image import BUILTIN_AVATAR
    from engine.runtimes.backend import open_backend

    ck = _builtin()
    ort = open_backend("onnxruntime", checkpoint=ck, exported=builtin_onnx, threads=2)
    ref = open_backend("torch", checkpoint=ck)
    assert isinstance(ort, JawCalibrated)
    a, b = ort.prepare_avatar(BUILTIN_AVATAR).jaw_map, ref.prepare_avatar(BUILTIN_AVATAR).jaw_map
    assert abs(a.source - b.source) < 0.01
    assert np.abs(np.asarray(a.knots) - np.asarray(b.knots)).max() < 0.03, (a.knots, b.knots)
