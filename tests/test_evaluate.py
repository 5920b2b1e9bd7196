"""`marionette evaluate`: metrics (PSNR, SSIM, correlation, offset sweep) and the whole report on the small
corpus with the tiny config and a briefly trained oracle."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.errors import InputError
from trainer import evaluate as E
from trainer import oracle as O


# ============================================================================================ metrics
def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.1  # mse 0.01 -> 20 dB
    np.testing.assert_allclose(E.psnr(x, y).numpy(), [20.0, 20.0], rtol=1e-5)
    assert math.isinf(float(E.psnr(x, x)[0]))


def _naive_ssim(x: torch.Tensor, y: torch.Tensor, win: int = 11, sigma: float = 1.5) -> float:
    """Direct (non-separable) SSIM of one (C, H, W) pair, float64, for reference."""
    t = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-t * t / (2 * sigma * sigma))
    w = torch.outer(g, g)
    w = w / w.sum()
    x, y = x.double(), y.double()
    vals = []
    C, H, W = x.shape
    for c in range(C):
        for i in range(H - win + 1):
            for j in range(W - win + 1):
                a, b = x[c, i:i + win, j:j + win], y[c, i:i + win, j:j + win]
                ma, mb = (w * a).sum(), (w * b).sum()
                va = (w * a * a).sum() - ma * ma
                vb = (w * b * b).sum() - mb * mb
                cov = (w * a * b).sum() - ma * mb
                c1, c2 = 0.01 ** 2, 0.03 ** 2
                vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(torch.stack(vals).mean())


def test_ssim_properties_and_reference():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    assert torch.allclose(E.ssim(x, x), torch.ones(2), atol=1e-6)
    prev = 1.0
    for sd in (0.02, 0.05, 0.1, 0.3):
        v = float(E.ssim(x, (x + sd * torch.randn_like(x)).clamp(0, 1)).mean())
        assert v < prev  # more noise, less similar
        prev = v
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.allclose(E.ssim(x, y), E.ssim(y, x), atol=1e-6)
    assert float(E.ssim(x, y)[1]) == pytest.approx(_naive_ssim(x[1], y[1]), abs=1e-5)
    with pytest.raises(ValueError):
        E.ssim(x, y[:, :, :20])


def test_correlation_and_offset_sweep():
    assert E.correlation(np.ones(10), np.arange(10)) == 0.0  # constant: no linear relation
    assert E.correlation(np.arange(10), 2 * np.arange(10) + 1) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    truths, preds = [], []
    for n in (60, 45):
        t = np.convolve(rng.random(n + 10), np.ones(3) / 3, mode="same")[5:n + 5]
        truths.append(t)
        preds.append(np.concatenate([np.full(2, t[0]), t[:-2]]) * 0.5 + 3.0)  # lags by 2 frames, other scale/bias
    s = E.lip_sync_summary(preds, truths, fps=25)
    assert s["best_offset_ms"] == pytest.approx(80.0)
    assert s["best_correlation"] > 0.95 and s["correlation"] < s["best_correlation"]
    assert [p["offset_ms"] for p in s["sweep"]] == [float(k) for k in range(-200, 201, 40)]
    lead = E.lip_sync_summary([p[2:] for p in preds], [t[:-2] for t in truths], fps=25)
    assert lead["best_offset_ms"] == pytest.approx(0.0)


def test_mouth_vs_speech_finds_the_pauses_of_real_recordings():
    """Real speech (Debian's pocketsphinx-testdata): a jaw that follows the speech envelope scores a high
    speech/pause ratio, a constantly moving one ~1; the noisy audiobook clips have pauses to judge too."""
    from engine.audio import frame_energy, load_audio

    files = E.real_speech_files()
    if not files:
        pytest.skip("pocketsphinx-testdata is not installed (make system-deps)")
    with_pauses = 0
    for f in files:
        x = load_audio(f, 16000)
        n = int(len(x) / 16000 * 25)
        e = frame_energy(x, 25, 16000, n)
        db = 20 * np.log10(np.maximum(e, 1e-10))
        env = np.clip((db - np.percentile(db, 5) - 8.0) / 20.0, 0, 1)  # shut near the noise floor
        r = E.mouth_vs_speech(env, x, 25)
        assert r["speech_frames"] > 0.2 * n, (f.name, r)
        if r["pause_frames"]:
            with_pauses += 1
            assert r["ratio"] > 3 and r["pause_shut_fraction"] > 0.5, (f.name, r)
            assert r["movement_ratio"] > 2 and r["jaw_speech_p90"] > r["jaw_pause_p90"], (f.name, r)
            assert r["level_correlation"] > 0.9
            flat = E.mouth_vs_speech(np.full(n, 0.5) + 0.01 * np.sin(np.arange(n)), x, 25)
            assert 0.8 < flat["ratio"] < 1.25 and flat["pause_shut_fraction"] == 0.0
            assert 0.5 < flat["movement_ratio"] < 2
            # an oracle that reads a shut mouth at 0.02 instead of 0: the movement is the same, the level ratio not
            up = E.mouth_vs_speech(env + 0.02, x, 25)
            assert up["movement_ratio"] == pytest.approx(r["movement_ratio"], rel=1e-6)
    assert with_pauses >= len(files) - 2  # a 1-2 s card utterance may have no 160 ms pause


def test_disentanglement_report_names_the_columns_that_leak():
    """A pose sweep that moves the brows: the report's leak is pose -> expression, made by brow_raise."""
    rng = np.random.default_rng(0)
    K = 8
    cols = [c for _, c in O.COLUMNS]
    sl = O.group_slices()
    reads = {}
    for f, g in E.FACTOR_TO_GROUP.items():
        r = np.tile(O.LOW + O.RANGE / 2, (K, 1)) + rng.normal(0, 1e-4, (K, O.N_OUT)) * O.RANGE
        r[:, sl[g]] += rng.uniform(-0.3, 0.3, (K, sl[g].stop - sl[g].start)) * O.RANGE[sl[g]]
        reads[f] = r
    brow = cols.index("brow_raise")
    reads["pose"][:, brow] += np.linspace(-0.3, 0.3, K) * O.RANGE[brow]
    rep = E._matrix_report(E._variance_matrix(reads))
    assert np.array(rep["variance"]).shape == (4, 4)
    top = rep["leaks"][0]
    assert (top["varied"], top["measured"]) == ("pose", "expression")
    assert top["ratio"] == pytest.approx(rep["ratio"][1][3]) and top["ratio"] >= E.LEAK_REPORTED
    assert next(iter(top["columns"])) == "brow_raise" and top["columns"]["brow_raise"] > 0.9
    assert all(x["ratio"] >= E.LEAK_REPORTED for x in rep["leaks"])
    assert rep["max_off_diagonal_ratio"] == pytest.approx(top["ratio"])


def test_frame_window():
    np.testing.assert_array_equal(E.frame_window(10, None), np.arange(1, 10))
    np.testing.assert_array_equal(E.frame_window(10, 4), np.arange(3, 7))
    np.testing.assert_array_equal(E.frame_window(3, 10), [1, 2])


def test_config_validation(tmp_path):
    with pytest.raises(InputError, match="split"):
        E.EvalConfig(data=tmp_path, out=tmp_path / "r.json", split="dev")
    with pytest.raises(InputError, match="max_frames"):
        E.EvalConfig(data=tmp_path, out=tmp_path / "r.json", max_frames=0)
    with pytest.raises(InputError, match="no clips"):
        E.select_clips(tmp_path, "test", None)


# ============================================================================================ report
@pytest.fixture(scope="module")
def tiny_oracle(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle") / "oracle"
    return O.train_oracle(O.OracleConfig(data=small_corpus, out=out, steps=3, batch_size=8, size=64, render_pool=8,
                                         eval_frames=8, max_real_frames=32))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised tiny model saved as a checkpoint (so no built-in checkpoint is picked up)."""
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import Marionette

    torch.manual_seed(0)
    return save_checkpoint(Marionette(ModelConfig.preset("tiny")), tmp_path_factory.mktemp("ckpt") / "tiny")


def _cfg(small_corpus, out, **kw):
    base = dict(data=small_corpus, out=out, split="all", max_clips=2, max_frames=12,
                disentangle_sources=1, disentangle_values=3, batch_size=16, grid_clips=2)
    base.update(kw)
    return E.EvalConfig(**base)


def _finite(x, path="report"):
    if isinstance(x, dict):
        for k, v in x.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _finite(v, f"{path}[{i}]")
    elif isinstance(x, float):
        assert math.isfinite(x), path


@pytest.fixture(scope="module")
def report(small_corpus, tiny_oracle, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report.json"
    r = E.evaluate(_cfg(small_corpus, out, checkpoint=tiny_ckpt, oracle=tiny_oracle))
    return out, r


def test_report_files_and_structure(report):
    out, r = report
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    md = out.with_suffix(".md").read_text()
    assert "## 1. Factor oracle accuracy" in md and "| copy_source |" in md
    from PIL import Image

    img = Image.open(out.with_suffix(".png"))
    assert img.size[0] == 64 * 10 and img.size[1] > 2 * 64  # source + 3 x (truth, self, commanded); 2 rows
    keys = list(r)
    assert keys.index("oracle") < keys.index("reconstruction")  # the oracle's own accuracy comes first
    assert r["random_weights"] is False and r["model_config"] == "tiny" and len(r["clips"]) == 2
    assert r["frames"] == r["oracle"]["accuracy"]["frames"] == 2 * 12  # max_clips x max_frames
    _finite({k: v for k, v in r.items() if k != "thresholds"})
    for name in ("model", "copy_source", "random_weights"):
        rec = r["reconstruction"][name]
        assert 0 < rec["psnr"] < 100 and -1 <= rec["ssim"] <= 1 and rec["frames"] == r["frames"]
        s = r["control"][name]["summary"]
        assert all(v >= 0 for v in s.values())
        assert s["pose_deg"] < 70
    for name, v in r["disentanglement"].items():
        m = np.array(v["variance"])
        assert m.shape == (4, 4) and (m >= 0).all()
        assert v["rows"] == ["lip", "pose", "eye", "exp"] and v["columns"] == ["mouth", "pose", "eyes", "expression"]
        for i in range(4):
            if m[i, i] > 0:
                assert v["ratio"][i][i] == pytest.approx(1.0)
    assert set(r["disentanglement"]) >= {"model", "random_weights"}
    for v in r["disentanglement"].values():
        for x in v["leaks"]:
            assert x["ratio"] >= E.LEAK_REPORTED and 0 < len(x["columns"]) <= 3
            assert set(x["columns"]) <= {c for g, c in O.COLUMNS if g == x["measured"]}
            assert sum(x["columns"].values()) <= 1.001
    for name, v in r["lip_sync"].items():
        assert -1 <= v["correlation"] <= 1 and -1 <= v["best_correlation"] <= 1
        assert v["best_correlation"] >= v["correlation"]
        assert -200 <= v["best_offset_ms"] <= 200 and v["best_offset_ms"] % 40 == 0
    assert r["lip_sync"]["copy_source"]["best_correlation"] == 0.0  # a still mouth correlates with nothing
    th = r["thresholds"]
    assert th["all_pass"] is False  # an untrained model passes nothing that matters
    assert th["psnr_gain_db"]["value"] == pytest.approx(r["reconstruction"]["model"]["psnr"]
                                                       - r["reconstruction"]["copy_source"]["psnr"])


def test_copy_source_psnr_and_oracle_accuracy_match_direct_computation(report, small_corpus, tiny_oracle):
    _, r = report
    from trainer.data import list_clips

    refs = {f"{c.split}/{c.identity}/{c.name}": c for s in E.SPLITS for c in list_clips(small_corpus, s)}
    psnrs, reads, truths, src_reads = [], [], [], []
    oracle, _ = O.load_oracle(tiny_oracle)
    for key in r["clips"]:
        ref = refs[key]
        truth, _ = E.clip_table(ref)
        video = E.decode_frames(ref.video)
        n = min(len(video), len(truth))
        w = E.frame_window(n, 12)
        f = O.uint8_to_float(video)
        src = F.interpolate(f[:1], size=(64, 64), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        real = F.interpolate(f[w], size=(64, 64), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        mse = ((src - real) ** 2).flatten(1).mean(1).double()
        psnrs += (10 * torch.log10(1 / mse)).tolist()
        reads.append(O.read_factors(oracle, f[w]))
        truths.append(truth[w])
        src_reads.append(np.repeat(O.read_factors(oracle, f[:1]), len(w), 0))
    assert r["reconstruction"]["copy_source"]["psnr"] == pytest.approx(float(np.mean(psnrs)), abs=1e-4)
    acc = O.accuracy(np.concatenate(reads), np.concatenate(truths))
    got = r["oracle"]["accuracy"]["groups"]["pose"]["columns"]["yaw"]["mae"]
    assert got == pytest.approx(acc["groups"]["pose"]["columns"]["yaw"]["mae"], rel=1e-4)
    # against the real frame: copy-source's error is the oracle's source reading against its real-frame reading,
    # and the acceptance figures are the model's errors of that kind
    vs_real = O.accuracy(np.concatenate(src_reads), np.concatenate(reads))
    for g, c in (("eyes", "gaze_x"), ("mouth", "width"), ("pose", "yaw")):
        got = r["control_vs_real"]["copy_source"]["groups"][g]["columns"][c]["mae"]
        assert got == pytest.approx(vs_real["groups"][g]["columns"][c]["mae"], rel=1e-4, abs=1e-6)
    for k in ("gaze_pct", "blink_pct", "mouth_pct", "pose_deg"):
        assert r["thresholds"][k]["value"] == pytest.approx(r["control_vs_real"]["model"]["summary"][k])


def test_rerun_reproduces_and_checkpoint_finds_its_oracle(report, small_corpus, tiny_oracle, tiny_ckpt, tmp_path):
    """The same evaluation again, the checkpoint (copied) now holding its oracle in `<checkpoint>/oracle`:
    every number is reproduced."""
    _, r = report
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    shutil.copytree(tiny_oracle, ckpt / "oracle")
    r2 = E.evaluate(_cfg(small_corpus, tmp_path / "again" / "report.json", checkpoint=ckpt))
    assert r2["checkpoint"] == str(ckpt) and r2["oracle"]["path"] == str(ckpt / "oracle")
    for key in ("clips", "frames", "reconstruction", "control", "control_vs_real", "disentanglement", "lip_sync"):
        assert json.dumps(r2[key]) == json.dumps(r[key]), key
    assert json.dumps(r2["oracle"]["accuracy"]) == json.dumps(r["oracle"]["accuracy"])


def test_missing_oracle_is_an_input_error(small_corpus, tiny_ckpt, tmp_path):
    with pytest.raises(InputError, match="no oracle at .*oracle"):
        E.evaluate(_cfg(small_corpus, tmp_path / "r.json", checkpoint=tiny_ckpt))  # nothing in <ckpt>/oracle
    with pytest.raises(InputError, match="no oracle at"):
        E.evaluate(_cfg(small_corpus, tmp_path / "r.json", checkpoint=tiny_ckpt, oracle=tmp_path / "missing"))
    assert not (tmp_path / "r.json").exists()
