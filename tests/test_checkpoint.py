"""Checkpoint round trip, fp16 storage, validation errors and `load_model`'s fallbacks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from engine import checkpoint as ckpt
from engine.checkpoint import (PRESET_NAMES, builtin_checkpoint_dir, default_expression_presets, load_checkpoint,
                               load_model, save_checkpoint)
from engine.config import ModelConfig
from engine.errors import InputError
from engine.model import Marionette


def _model(seed: int = 0) -> Marionette:
    torch.manual_seed(seed)
    m = Marionette(ModelConfig.preset("tiny")).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # make the zero-initialised layers non-trivial too
        for p in m.generator.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _outputs(m: Marionette) -> tuple[torch.Tensor, ...]:
    s = m.cfg.image_size
    g = torch.Generator().manual_seed(7)
    img = torch.rand(2, 3, s, s, generator=g) * 2 - 1
    z = torch.randn(2, m.cfg.latents.total, generator=g)
    mel = torch.randn(2, m.cfg.audio.n_mels, m.cfg.mel_window, generator=g)
    with torch.no_grad():
        hi, lo, app = m.e_app(img)
        f = m.encode_motion(img)
        return (m(z, img, hi, lo, app), m.e_aud(mel), hi, lo, app, *f.values())


def test_round_trip_identical(tmp_path):
    m = _model()
    meta = {"step": 12, "expression_presets": {"neutral": [0.0] * 10, "happy": [0.5] * 10}}
    d = save_checkpoint(m, tmp_path / "ck", meta=meta)
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    doc = json.loads((d / "config.json").read_text())
    assert doc["format"] == 1 and doc["model"]["name"] == "tiny" and doc["meta"]["step"] == 12
    m2, meta2 = load_checkpoint(d)
    assert meta2 == meta
    assert m2.cfg == m.cfg and not m2.training
    for a, b in zip(_outputs(m), _outputs(m2)):
        assert torch.equal(a, b)
    # load_model with an explicit checkpoint keeps its presets and says the weights are not random
    m3, meta3 = load_model(d)
    assert meta3["random_weights"] is False and meta3["expression_presets"]["happy"] == [0.5] * 10
    # the weights file alone is accepted as the checkpoint path
    m4, _ = load_checkpoint(d / "model.safetensors")
    assert torch.equal(_outputs(m4)[0], _outputs(m)[0])


def test_fp16_stored_loads_into_fp32(tmp_path):
    m = _model()
    d16 = save_checkpoint(m, tmp_path / "half", dtype=torch.float16)
    d32 = save_checkpoint(m, tmp_path / "full")
    size16 = (d16 / "model.safetensors").stat().st_size
    assert size16 < 0.6 * (d32 / "model.safetensors").stat().st_size
    m2, _ = load_checkpoint(d16)
    assert all(p.dtype == torch.float32 for p in m2.parameters())
    a, b = _outputs(m)[0], _outputs(m2)[0]
    assert (a - b).abs().max() < 0.05


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    d = save_checkpoint(_model(), tmp_path / "ck")
    (d / "model.safetensors").unlink()
    with pytest.raises(InputError, match="missing model.safetensors") as e:
        load_checkpoint(d)
    assert str(d) in str(e.value)

    d = save_checkpoint(_model(), tmp_path / "ck2")
    (d / "config.json").unlink()
    with pytest.raises(InputError, match="missing config.json"):
        load_checkpoint(d)

    d = save_checkpoint(_model(), tmp_path / "ck3")
    (d / "model.safetensors").write_bytes(b"garbage that is not safetensors")
    with pytest.raises(InputError, match="safetensors"):
        load_checkpoint(d)

    d = save_checkpoint(_model(), tmp_path / "ck4")
    (d / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        load_checkpoint(d)


def test_config_errors(tmp_path):
    d = save_checkpoint(_model(), tmp_path / "ck")
    doc = json.loads((d / "config.json").read_text())

    bad = dict(doc, format=99)
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="format"):
        load_checkpoint(d)

    bad = json.loads(json.dumps(doc))
    bad["model"]["colour"] = "blue"
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="config") as e:
        load_checkpoint(d)
    assert str(d) in str(e.value)

    bad = json.loads(json.dumps(doc))
    bad["model"]["net"]["warp_levels"] = 3
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(InputError, match="config"):
        load_checkpoint(d)


def test_shape_mismatch(tmp_path):
    d = save_checkpoint(_model(), tmp_path / "ck")
    doc = json.loads((d / "config.json").read_text())
    doc["model"]["net"]["app_dim"] = 48  # weights were saved for app_dim 32
    (d / "config.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match="shape") as e:
        load_checkpoint(d)
    assert str(d) in str(e.value)


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_checkpoint(_model(), tmp_path / "ck")
    state = load_file(str(d / "model.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(InputError, match="missing 1 tensors"):
        load_checkpoint(d)


def test_load_model_random_fallback(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(ckpt, "BUILTIN_DIR", tmp_path / "no_builtin")
    assert builtin_checkpoint_dir() is None
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        m, meta = load_model(None, config="tiny", seed=3)
    assert any(r.levelno == logging.WARNING and "random" in r.getMessage().lower() for r in caplog.records)
    assert meta["random_weights"] is True
    assert list(meta["expression_presets"]) == list(PRESET_NAMES)
    assert meta["expression_presets"]["neutral"] == [0.0] * m.cfg.latents.exp
    vecs = [tuple(v) for v in meta["expression_presets"].values()]
    assert len(set(vecs)) == len(vecs)  # distinct
    # seeded: same seed -> same weights, different seed -> different weights; global RNG untouched
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    m2, meta2 = load_model(None, config="tiny", seed=3)
    assert torch.equal(torch.rand(1), before)
    assert meta2["expression_presets"] == meta["expression_presets"]
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    m3, _ = load_model(None, config="tiny", seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m3.state_dict().values()))
    with pytest.raises(InputError, match="unknown model config"):
        load_model(None, config="huge")


def test_builtin_lookup(monkeypatch, tmp_path):
    builtin = tmp_path / "builtin"
    monkeypatch.setattr(ckpt, "BUILTIN_DIR", builtin)
    builtin.mkdir()
    assert builtin_checkpoint_dir() is None  # empty directory: no checkpoint
    save_checkpoint(_model(), builtin, meta={"note": "built in"})
    assert builtin_checkpoint_dir() == builtin
    m, meta = load_model(None, config="lite")  # the built-in one wins over the config name
    assert m.cfg.name == "tiny" and meta["note"] == "built in" and meta["random_weights"] is False
    assert list(meta["expression_presets"]) == list(PRESET_NAMES)  # defaults filled in


def test_bad_presets_rejected(tmp_path):
    d = save_checkpoint(_model(), tmp_path / "ck", meta={"expression_presets": {"happy": [1.0, 2.0]}})
    with pytest.raises(InputError, match="happy"):
        load_model(d)


def test_default_presets_small_exp_dim():
    cfg = ModelConfig.preset("tiny")
    import dataclasses

    from engine.config import LatentConfig

    cfg = dataclasses.replace(cfg, latents=LatentConfig(exp=4))
    p = default_expression_presets(cfg)
    assert all(len(v) == 4 for v in p.values())
    assert len({tuple(v) for v in p.values()}) == len(p)


def test_install_checkpoint_packages_fp16_idle_and_oracle(tmp_path):
    """install-builtin: fp16 weights that load back close to the trained ones, the idle model and the
    oracle beside them; random weights, a missing oracle file and an oversize package are refused and leave
    the installed one untouched."""
    from engine.idle_model import IdleModelConfig, IdleMotionModel, load_idle_model, save_idle_model
    from marionette.cli import main as cli_main
    from trainer.oracle import FactorOracle, OracleNetConfig, load_oracle, save_oracle

    torch.manual_seed(0)
    model = Marionette(ModelConfig.preset("tiny"))
    src = tmp_path / "run" / "checkpoint"
    src.mkdir(parents=True)
    entry = save_idle_model(IdleMotionModel(IdleModelConfig(hidden=16, audio_dim=8, style_dim=8)), src)
    save_checkpoint(model, src, meta={"idle_model": entry, "train": {"stage": "idle"}})
    oracle = save_oracle(FactorOracle(OracleNetConfig(size=32, channels=(8, 8), embed_dim=16)), tmp_path / "oracle")
    dest = tmp_path / "assets" / "builtin"
    assert cli_main(["install-builtin", "--checkpoint", str(src), "--oracle", str(oracle), "--dest", str(dest)]) == 0
    got, meta = load_checkpoint(dest)
    assert meta["weights_dtype"] == "float16" and meta["train"] == {"stage": "idle"}
    for (k, a), b in zip(model.state_dict().items(), got.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, atol=2e-3, rtol=1e-3, msg=k)
    assert load_idle_model(dest) is not None
    load_oracle(dest / "oracle")
    before = sorted(p.name for p in dest.rglob("*"))

    save_checkpoint(model, tmp_path / "rnd", meta={"random_weights": True})
    with pytest.raises(InputError, match="random weights"):
        ckpt.install_checkpoint(tmp_path / "rnd", dest)
    (tmp_path / "bad_oracle").mkdir()
    with pytest.raises(InputError, match="oracle.json"):
        ckpt.install_checkpoint(src, dest, oracle=tmp_path / "bad_oracle")
    with pytest.raises(InputError, match="over the"):
        ckpt.install_checkpoint(src, dest, oracle=oracle, max_bytes=10_000)
    assert sorted(p.name for p in dest.rglob("*")) == before
    assert [p.name for p in dest.parent.iterdir()] == ["builtin"]  # no temporary directories left behind
    # --head-axes: the installed model's computed warp runs with that head ellipsoid (the weights unchanged)
    assert got.cfg.head_axes == ()
    assert cli_main(["install-builtin", "--checkpoint", str(src), "--dest", str(dest),
                     "--head-axes", "0.74,1.02,0.88"]) == 0
    got2, _ = load_checkpoint(dest)
    assert got2.cfg.head_axes == (0.74, 1.02, 0.88) and got2.generator.head_axes == (0.74, 1.02, 0.88)
    for a, b in zip(got.state_dict().values(), got2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(SystemExit):
        cli_main(["install-builtin", "--checkpoint", str(src), "--dest", str(dest), "--head-axes", "0.7,1"])
