"""Checkpoints: a directory with `model.safetensors` (weights, never pickle) and `config.json`
(`{"format": 1, "model": ModelConfig.to_dict(), "meta": {...}}`), and the built-in checkpoint lookup.

Meta keys the engine reads (all optional in a file; `load_model` fills the defaults):
* "expression_presets": {name: [exp latent values]} -- named points in the expression-latent space
  (a trained checkpoint stores the mean E_exp over the corpus frames of each preset);
* "random_weights": true only for a model `load_model` initialised randomly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.config import ModelConfig
from engine.errors import InputError
from engine.model import Marionette

log = logging.getLogger(__name__)

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "builtin"

# Trainer-independent list of expression presets (the corpus' EXPRESSION_PRESETS names, in this order).
PRESET_NAMES: tuple[str, ...] = ("neutral", "happy", "sad", "angry", "surprised", "disgusted", "fearful")
DEFAULT_PRESET_SCALE = 1.0


def default_expression_presets(cfg: ModelConfig) -> dict[str, list[float]]:
    """Deterministic presets for a model without trained ones: neutral = zeros; the i-th other preset is
    DEFAULT_PRESET_SCALE x the basis vector e_{i-1} of the exp latent when it has enough dimensions, else a
    unit vector drawn from a fixed seed (distinct, reproducible)."""
    n = cfg.latents.exp
    out: dict[str, list[float]] = {}
    others = PRESET_NAMES[1:]
    if n >= len(others):
        vecs = torch.eye(n)[: len(others)]
    else:
        g = torch.Generator().manual_seed(1234)
        vecs = torch.randn(len(others), n, generator=g)
        vecs = vecs / vecs.norm(dim=1, keepdim=True)
    out["neutral"] = [0.0] * n
    for name, v in zip(others, vecs):
        out[name] = [float(x) * DEFAULT_PRESET_SCALE for x in v]
    return out


def _validate_presets(presets: Any, cfg: ModelConfig, where: str) -> dict[str, list[float]]:
    if not isinstance(presets, dict):
        raise InputError(f"{where}: meta.expression_presets must be an object of name -> list of numbers")
    out = {}
    for k, v in presets.items():
        if (not isinstance(v, (list, tuple)) or len(v) != cfg.latents.exp
                or not all(isinstance(x, (int, float)) for x in v)):
            raise InputError(f"{where}: expression preset {k!r} must be {cfg.latents.exp} numbers")
        out[str(k)] = [float(x) for x in v]
    return out


# =================================================================================== save
def save_checkpoint(model: Marionette, path: Path, *, meta: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write `model` to the directory `path` (created; existing files replaced atomically).

    dtype: store floating point weights in this dtype (e.g. torch.float16 halves the size); loading
    always gives the model's own dtype (float32). Returns the directory.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous().clone()
    meta = dict(meta or {})
    try:
        doc = json.dumps({"format": FORMAT, "model": model.cfg.to_dict(), "meta": meta}, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from None
    atomic_write(path / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(path / CONFIG, lambda p: Path(p).write_text(doc + "\n"))
    return path


def atomic_write(dest: Path, write) -> None:
    """Write `dest` through `write(tmp_path)` into a temporary file beside it, then rename: readers see the
    old file or the new one, never half of one; a failed write leaves the old file as it was."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# =================================================================================== load
def _resolve_dir(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name in (WEIGHTS, CONFIG):
            return path.parent
        raise InputError(f"checkpoint {path} must be a directory holding {WEIGHTS} and {CONFIG}")
    return path


def read_checkpoint_config(path: Path) -> tuple[ModelConfig, dict]:
    """The config and meta of a checkpoint directory, without loading weights."""
    d = _resolve_dir(path)
    cfile = d / CONFIG
    if not cfile.is_file():
        raise InputError(f"checkpoint {d}: missing {CONFIG}")
    try:
        doc = json.loads(cfile.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"checkpoint {d}: {CONFIG} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"checkpoint {d}: {CONFIG} must hold a JSON object")
    if doc.get("format") != FORMAT:
        raise InputError(f"checkpoint {d}: unsupported format {doc.get('format')!r} (this engine reads {FORMAT})")
    if not isinstance(doc.get("model"), dict):
        raise InputError(f"checkpoint {d}: {CONFIG} has no model config")
    try:
        cfg = ModelConfig.from_dict(doc["model"])
        cfg.mel_window  # derived geometry must be computable  # noqa: B018
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"checkpoint {d}: unknown or invalid model config ({e})") from None
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict):
        raise InputError(f"checkpoint {d}: meta must be a JSON object")
    return cfg, meta


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[Marionette, dict]:
    """Rebuild the model from the checkpoint's own config and load its weights (any float dtype stored ->
    the model's float32). Returns (model in eval mode on `device`, meta). Bad checkpoints raise InputError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = _resolve_dir(path)
    cfg, meta = read_checkpoint_config(d)
    wfile = d / WEIGHTS
    if not wfile.is_file():
        raise InputError(f"checkpoint {d}: missing {WEIGHTS}")
    try:
        model = Marionette(cfg)
    except (TypeError, ValueError) as e:
        raise InputError(f"checkpoint {d}: its model config cannot be built ({e})") from None
    try:
        state = load_file(str(wfile), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputError(f"checkpoint {d}: {WEIGHTS} is not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise InputError(f"checkpoint {d}: weights do not match its config: {'; '.join(parts)}")
    fixed = {}
    for k, ref in own.items():
        v = state[k]
        if tuple(v.shape) != tuple(ref.shape):
            raise InputError(f"checkpoint {d}: tensor {k} has shape {tuple(v.shape)}, "
                             f"the config needs {tuple(ref.shape)}")
        if v.is_floating_point() != ref.is_floating_point():
            raise InputError(f"checkpoint {d}: tensor {k} has dtype {v.dtype}, expected {ref.dtype}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise InputError(f"checkpoint {d}: tensor {k} contains NaN or infinite values")
        fixed[k] = v.to(ref.dtype)
    model.load_state_dict(fixed, strict=True)
    model.to(device).eval()
    return model, dict(meta)


# =================================================================================== lookup
def builtin_checkpoint_dir() -> Path | None:
    """engine/assets/builtin if it holds a checkpoint (both files), else None."""
    d = BUILTIN_DIR
    if (d / WEIGHTS).is_file() and (d / CONFIG).is_file():
        return d
    return None


RANDOM_FLOW_STD = 0.01  # placeholder (random-weights) models only; see load_model


def load_model(checkpoint: Path | None = None, config: str = "lite", seed: int = 0) -> tuple[Marionette, dict]:
    """The model to run: `checkpoint` if given; else the built-in checkpoint if present; else a randomly
    initialised model of the preset `config` (seeded; logs a WARNING; meta["random_weights"] = True).

    meta always carries "expression_presets" (the checkpoint's, else `default_expression_presets`),
    "random_weights" and "checkpoint" (the directory, or None)."""
    src = Path(checkpoint) if checkpoint is not None else builtin_checkpoint_dir()
    if src is not None:
        model, meta = load_checkpoint(src)
        meta["random_weights"] = bool(meta.get("random_weights", False))
        meta["checkpoint"] = str(src)
        where = f"checkpoint {src}"
    else:
        try:
            cfg = ModelConfig.preset(config)
        except ValueError as e:
            raise InputError(str(e)) from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Marionette(cfg)
            # Training starts G from a zero flow layer (z has no effect until trained). A placeholder
            # model should still visibly respond to its latents (lips follow the audio, the idle head
            # sways), so give the flow layer small random weights: ~0.2 px of flow at z = 0 on lite.
            with torch.no_grad():
                w = model.generator.flow_out.weight
                w.copy_(torch.randn(w.shape) * RANDOM_FLOW_STD)
        model.eval()
        log.warning("no checkpoint given and no built-in checkpoint found: using RANDOM weights "
                    "(config %r, seed %d); the output will not look like a talking head", config, seed)
        meta = {"random_weights": True, "checkpoint": None, "seed": seed}
        where = f"random model {config!r}"
    if "expression_presets" in meta:
        meta["expression_presets"] = _validate_presets(meta["expression_presets"], model.cfg, where)
    else:
        meta["expression_presets"] = default_expression_presets(model.cfg)
    return model, meta


# =================================================================================== ship
BUILTIN_MAX_BYTES = 25_000_000  # the built-in checkpoint ships in the wheel: weights + idle model + oracle
ORACLE_FILES = ("oracle.safetensors", "oracle.json")  # trainer.oracle's directory layout


def install_checkpoint(src: Path, dest: Path = BUILTIN_DIR, *, oracle: Path | None = None,
                       dtype: torch.dtype = torch.float16, max_bytes: int = BUILTIN_MAX_BYTES,
                       head_axes: tuple[float, float, float] | None = None) -> Path:
    """Package a trained checkpoint as the engine's default (`dest`, normally engine/assets/builtin):
    the weights stored in `dtype` (fp16 halves them; loading gives float32 back), its idle model, and
    the factor oracle that evaluates it in `dest/oracle` (so `marionette evaluate` needs no other file).
    `head_axes`: the computed pose warp's head ellipsoid the installed model runs with (ModelConfig.head_axes).

    Refuses random-weights checkpoints and anything over `max_bytes` in all. Built in a temporary
    directory beside `dest`, checked by loading it back, then swapped in: whatever `dest` held stays
    intact until the new one is complete. Returns `dest`.
    """
    import shutil

    from engine.idle_model import WEIGHTS as IDLE_WEIGHTS

    src, dest = _resolve_dir(src), Path(dest)
    model, meta = load_checkpoint(src)
    if head_axes is not None:
        model.cfg = dataclasses.replace(model.cfg, head_axes=tuple(float(x) for x in head_axes))
    if meta.get("random_weights"):
        raise InputError(f"checkpoint {src} holds random weights: only a trained checkpoint can be installed")
    if oracle is not None:
        oracle = Path(oracle)
        missing = [f for f in ORACLE_FILES if not (oracle / f).is_file()]
        if missing:
            raise InputError(f"oracle {oracle} lacks {', '.join(missing)} (train one with `marionette oracle`)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        meta = dict(meta)
        meta["weights_dtype"] = str(dtype).replace("torch.", "")
        save_checkpoint(model, stage, meta=meta, dtype=dtype)
        if meta.get("idle_model"):
            if not (src / IDLE_WEIGHTS).is_file():
                raise InputError(f"checkpoint {src}: its config names an idle model but {IDLE_WEIGHTS} is missing")
            shutil.copy2(src / IDLE_WEIGHTS, stage / IDLE_WEIGHTS)
        if oracle is not None:
            (stage / "oracle").mkdir()
            for f in ORACLE_FILES:
                shutil.copy2(oracle / f, stage / "oracle" / f)
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        if size > max_bytes:
            raise InputError(f"the packaged checkpoint is {size / 1e6:.1f} MB, over the {max_bytes / 1e6:.1f} MB "
                             f"limit (weights in {meta['weights_dtype']}; a smaller config or dtype is needed)")
        load_checkpoint(stage)  # it must load back
        for p in [stage, *stage.rglob("*")]:  # mkdtemp makes 0700: the installed model is for every user
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
        try:
            os.replace(stage, dest)
        except OSError:
            if old is not None:  # put the previous one back
                os.replace(old / dest.name, dest)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("installed %s as %s (%.1f MB, weights in %s%s)", src, dest, size / 1e6, meta["weights_dtype"],
                 ", with its oracle" if oracle is not None else "")
        return dest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
