"""`marionette export`: a checkpoint -> ONNX graphs for ONNX Runtime, or TensorRT engines built from them.

An ONNX export directory holds four self-contained graphs (opset 18, torch's dynamo exporter or, with
`--exporter torchscript`, its TorchScript one; weights embedded) and a manifest:

  generator.onnx       per frame:      z (B, latents.total), source (B,3,S,S), feat_hi, feat_lo, app
                                       -> frame (B,3,S,S) in [0, 1]  (G plus the runtime's [-1,1] -> [0,1])
  audio_encoder.onnx   per audio window: mel (B, n_mels, mel_window) -> lip (B, lip)          (E_aud)
  avatar_encoder.onnx  per avatar:     portrait (B,3,S,S) in [0,1] -> source, feat_hi, feat_lo, app  (E_app)
  motion_encoder.onnx  per driving frame: frames (B,3,S,S) in [0,1] -> lip, pose, eye, exp   (E_mot + heads)
  manifest.json        format, precision, opset, checkpoint hash, model config, every graph's input/output
                       names, shapes and dtypes, the parity check against torch, exporter versions, and
                       whether TensorRT 10's ONNX parser takes each graph (`engine.runtimes.opcheck`)

Every input and output has a dynamic batch axis 0 ("batch") and nothing else dynamic. Each graph is run
once through ONNX Runtime right after export and compared with torch; a graph that disagrees is a bug and
fails the export.

Precisions (ONNX): "fp32" is the reference. "int8" quantizes the generator's refine-net convolutions
(static, QLinearConv; the flow decoder, the output layers and the other three graphs stay fp32) and is
kept only if generated frames stay within MIN_PSNR_DB of fp32 on held-out inputs, else the export fails
saying so. "fp16" is refused for ONNX (slower than fp32 on ONNX Runtime's x86 CPU provider, see
FP16_ONNX_REFUSED). `--format tensorrt` exports fp32 ONNX into OUT/onnx/ and builds engines from it
(fp16 = TensorRT's FP16 builder flag; int8 refused: no calibration set), see engine.runtimes.tensorrt_runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.config import FACTORS, ModelConfig
from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 18  # GridSample 16+; torch 2.13's dynamo exporter down-converts lower opsets into graphs ORT rejects
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MIN_PSNR_DB = 35.0  # a reduced precision must stay this close to fp32 on generated frames
FP32_TOLERANCE = 1e-3  # ORT vs torch, max abs, on latents and grids (and on images, but see below), at export time
# an image output (a frame, the body's pre-frame, window and mouth square) may exceed FP32_TOLERANCE on a few
# pixels: bilinear sampling at a high-contrast edge turns ORT's and torch's float rounding of a coordinate (the
# grid within 4e-5, 0.005 px) into up to ~1.5e-3 there (measured: 4 of 393,216 values of one draw). It passes
# if no more than FP32_OUTLIER_FRACTION of its values exceed FP32_TOLERANCE, none exceeds FP32_OUTLIER_MAX and
# the mean stays under FP32_MEAN_TOLERANCE; a wrong graph moves far more pixels, or far more.
FP32_OUTLIER_FRACTION = 1e-4
FP32_OUTLIER_MAX = 1e-2
FP32_MEAN_TOLERANCE = 1e-5
IMAGE_OUTPUTS = frozenset({"frame", "pre", "win", "square"})
GRAPH_NAMES = ("generator", "audio_encoder", "avatar_encoder", "motion_encoder")
# the generator in two phases (a late-bound mouth, `Generator.body` / `.mouth`): exported for patch models in
# fp32 ONNX, where the server makes the body ahead of the audio and the mouth last (streaming.scheduler)
SPLIT_GRAPH_NAMES = ("generator_body", "generator_mouth")


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path | None = None  # None: the built-in checkpoint, else random weights of `config`
    config: str = "lite"
    format: str = "onnx"  # "onnx" | "tensorrt"
    out: Path = Path("export")
    precision: str = "fp32"  # "fp32" | "fp16" | "int8"
    max_batch: int = 16  # TensorRT optimization profile's max; ONNX graphs take any batch
    overwrite: bool = False
    seed: int = 0  # seed of random weights when there is no checkpoint
    exporter: str = "dynamo"  # torch's ONNX exporter (`export_graph`): "dynamo" | "torchscript"


# ------------------------------------------------------------------------------------ graph modules
class GeneratorGraph(nn.Module):
    """G with TorchRuntime.generate's output mapping: (G(z, avatar) + 1) / 2 clamped to [0, 1]."""

    def __init__(self, model):
        super().__init__()
        self.g = model.generator

    def forward(self, z, source, feat_hi, feat_lo, app):
        return ((self.g(z, source, feat_hi, feat_lo, app) + 1) * 0.5).clamp(0.0, 1.0)  # (B,3,S,S)


class GeneratorBodyGraph(nn.Module):
    """G without the mouth net's change (`Generator.body`), from a provisional z: the part of a frame the
    server makes ahead of its audio. -> (pre, win, grid, square), which `GeneratorMouthGraph` finishes."""

    def __init__(self, model):
        super().__init__()
        self.g = model.generator

    def forward(self, z, source, feat_hi, feat_lo, app):
        return self.g.body(z, source, feat_hi, feat_lo, app)


class GeneratorMouthGraph(nn.Module):
    """The mouth net from the final z, pasted into the body's frame (`Generator.mouth`), with
    GeneratorGraph's output mapping: body + mouth with the same z = the generator graph."""

    def __init__(self, model):
        super().__init__()
        self.g = model.generator

    def forward(self, pre, win, grid, square, z, app):
        return ((self.g.mouth(pre, win, grid, square, z, app) + 1) * 0.5).clamp(0.0, 1.0)  # (B,3,S,S)


def _example_mouth_inputs(model, c: ModelConfig, b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """The mouth graph's example: the body's outputs for a random z (and the z, with a moved lip)."""
    z = torch.randn(b, c.latents.total, generator=g) * 0.5
    source, feat_hi, feat_lo, app = _example_avatar(model, c, b, g)
    with torch.no_grad():
        body = model.generator.body(z, source, feat_hi, feat_lo, app)
    z2 = z.clone()
    z2[:, c.latents.slices()["lip"]] = torch.rand(b, c.latents.lip, generator=g) * 0.6
    return (*body, z2, app)


class AudioEncoderGraph(nn.Module):
    """E_aud: (B, n_mels, mel_window) log-mel -> (B, lip) (ground-truth-latent models: unused dims zeroed)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mel):
        return self.model.encode_audio(mel)


class AvatarEncoderGraph(nn.Module):
    """E_app with TorchRuntime.prepare_avatar's input mapping: portrait in [0,1] -> the AvatarState tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, portrait):
        source = portrait * 2 - 1  # (B,3,S,S) in [-1,1]
        feat_hi, feat_lo, app = self.model.encode_avatar(source)  # relative models: + the source's state
        return source, feat_hi, feat_lo, app


class MotionEncoderGraph(nn.Module):
    """E_mot + E_lip/E_pose/E_eye/E_exp: driving frames in [0,1] -> factor latents in FACTORS order."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, frames):
        out = self.model.encode_motion(frames * 2 - 1)
        return tuple(out[k] for k in FACTORS)


@dataclass(frozen=True)
class _GraphSpec:
    module: Callable[[Any], nn.Module]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: Callable[[ModelConfig, int, torch.Generator], tuple[torch.Tensor, ...]]


def _example_avatar(model, cfg: ModelConfig, b: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    s = cfg.image_size
    portrait = torch.rand(b, 3, s, s, generator=g)
    if cfg.patches:
        # a face: the patch nets' squares follow anchors found in the portrait, and on noise those are not a
        # face's (a "mouth" above the "eyes", at the image's edge), where the export check measured ORT and
        # torch 2.4e-3 apart at a square's edge; a real portrait (with a little noise per row) is what runs
        from PIL import Image

        from engine.image import BUILTIN_AVATAR

        if BUILTIN_AVATAR.is_file():
            img = Image.open(BUILTIN_AVATAR).convert("RGB").resize((s, s), Image.BICUBIC)
            face = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)
            portrait = (face.unsqueeze(0) + 0.02 * (portrait - 0.5)).clamp(0, 1)
    with torch.no_grad():
        return AvatarEncoderGraph(model)(portrait)


def graph_specs(model) -> dict[str, _GraphSpec]:
    """What each exported graph is: its module, I/O names and example inputs (batch b, generator g)."""
    cfg = model.cfg
    s = cfg.image_size
    return {
        "generator": _GraphSpec(
            GeneratorGraph, ("z", "source", "feat_hi", "feat_lo", "app"), ("frame",),
            lambda c, b, g: (torch.randn(b, c.latents.total, generator=g) * 0.5, *_example_avatar(model, c, b, g))),
        "generator_body": _GraphSpec(
            GeneratorBodyGraph, ("z", "source", "feat_hi", "feat_lo", "app"), ("pre", "win", "grid", "square"),
            lambda c, b, g: (torch.randn(b, c.latents.total, generator=g) * 0.5, *_example_avatar(model, c, b, g))),
        "generator_mouth": _GraphSpec(
            GeneratorMouthGraph, ("pre", "win", "grid", "square", "z", "app"), ("frame",),
            lambda c, b, g: _example_mouth_inputs(model, c, b, g)),
        "audio_encoder": _GraphSpec(
            AudioEncoderGraph, ("mel",), ("lip",),
            lambda c, b, g: (torch.randn(b, c.audio.n_mels, c.mel_window, generator=g) * 2 - 5,)),
        "avatar_encoder": _GraphSpec(
            AvatarEncoderGraph, ("portrait",), ("source", "feat_hi", "feat_lo", "app"),
            lambda c, b, g: (torch.rand(b, 3, s, s, generator=g),)),
        "motion_encoder": _GraphSpec(
            MotionEncoderGraph, ("frames",), FACTORS,
            lambda c, b, g: (torch.rand(b, 3, s, s, generator=g),)),
    }


# ------------------------------------------------------------------------------------------ helpers
def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401, PLC0415
        import onnxruntime  # noqa: F401, PLC0415
        import onnxscript  # noqa: F401, PLC0415
    except ImportError as e:
        raise MissingDependency(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}): "
                                "pip install 'marionette[onnx]'") from None


def checkpoint_hash(meta: dict, config: str, seed: int) -> str:
    """sha256 of the checkpoint's weights file, or "random:<config>:<seed>" for random weights."""
    from engine.checkpoint import WEIGHTS  # noqa: PLC0415

    ckpt = meta.get("checkpoint")
    if not ckpt:
        return f"random:{config}:{seed}"
    h = hashlib.sha256()
    with open(Path(ckpt) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def exporter_versions() -> dict[str, str]:
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    import onnxscript  # noqa: PLC0415

    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        own = version("marionette")
    except PackageNotFoundError:
        own = "unknown"
    return {"marionette": own, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _io_entry(vi) -> dict[str, Any]:
    from onnx import helper  # noqa: PLC0415

    t = vi.type.tensor_type
    shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
    return {"name": vi.name, "shape": shape, "dtype": str(helper.tensor_dtype_to_np_dtype(t.elem_type))}


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter prints its progress and warns about torchvision; keep our log readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    buf = io.StringIO()
    import warnings  # noqa: PLC0415

    try:
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


EXPORTERS = ("dynamo", "torchscript")


def export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: tuple[str, ...],
                 outputs: tuple[str, ...], opset: int = OPSET, exporter: str = "dynamo") -> str:
    """One module -> one self-contained ONNX file with a dynamic batch axis on every input and output;
    returns the exporter that made it.

    "dynamo" is the default: its graphs are the fastest per frame. "torchscript" (torch's tracing exporter,
    `dynamo=False`, then onnxscript's optimizer) writes graphs with the same frames in a quarter of the time
    (the built-in's six: 12.6 s instead of 52.8 s on 2 cores), but keeps ~185 more small shape ops in the
    generator (946 nodes against 761), 1-4 % slower per frame in ONNX Runtime (benchmarks/export_speed.py):
    for exports made often (tests, experiments), not for serving. Where it fails on a graph, the dynamo
    exporter makes that one."""
    if exporter not in EXPORTERS:
        raise InputError(f"unknown ONNX exporter {exporter!r}; one of {', '.join(EXPORTERS)}")
    if exporter == "torchscript":
        try:
            _export_torchscript(module, example, path, inputs, outputs, opset)
            return exporter
        except Exception as e:  # noqa: BLE001 - an op the tracer cannot write: the dynamo exporter may
            log.warning("the TorchScript exporter failed on %s (%s: %s); using the dynamo exporter",
                        path.name, type(e).__name__, e)
    _export_dynamo(module, example, path, inputs, outputs, opset)
    return "dynamo"


def _export_torchscript(module, example, path, inputs, outputs, opset) -> None:
    import onnx  # noqa: PLC0415

    axes = {name: {0: "batch"} for name in (*inputs, *outputs)}
    with _quiet_exporter(), torch.no_grad():
        want = module.eval()(*example)
        torch.onnx.export(module, example, str(path), input_names=list(inputs), output_names=list(outputs),
                          opset_version=opset, dynamo=False, dynamic_axes=axes, do_constant_folding=True)
    want = want if isinstance(want, (tuple, list)) else (want,)
    # the tracer leaves some outputs' non-batch sizes symbolic (a Resize/GridSample chain): only the batch
    # axis is dynamic, so write the traced sizes into the graph's outputs
    model = onnx.load(str(path))
    for vi, t in zip(model.graph.output, want):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != t.dim():
            raise RuntimeError(f"{path.name}: output {vi.name} has rank {len(dims)}, torch's {t.dim()}")
        for d, size in zip(list(dims)[1:], t.shape[1:]):
            d.ClearField("dim_param")
            d.dim_value = int(size)
    # the tracer writes every shape computation of the dynamic batch as ops (half the generator's nodes are
    # Constant / Shape / Gather / Concat): onnxscript's optimizer folds them, as the dynamo exporter's
    # `optimize=True` does (~3 s for the built-in's generator)
    from onnxscript import optimizer  # noqa: PLC0415

    with _quiet_exporter():
        model = optimizer.optimize(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _export_dynamo(module, example, path, inputs, outputs, opset) -> None:
    import onnx  # noqa: PLC0415

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dyn = {name: {0: batch} for name in inputs}
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(module.eval(), example, str(path), input_names=list(inputs), output_names=list(outputs),
                          opset_version=opset, dynamo=True, external_data=False, dynamic_shapes=dyn,
                          optimize=True, verbose=False)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)


def _ort_session(path: Path):
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _torch_outputs(model, spec: _GraphSpec, example) -> list[np.ndarray]:
    with torch.no_grad():
        out = spec.module(model).eval()(*example)
    out = out if isinstance(out, tuple) else (out,)
    return [o.detach().float().numpy() for o in out]


# ------------------------------------------------------------------------------ reduced precisions
FP16_ONNX_REFUSED = (
    "fp16 ONNX graphs are not offered: ONNX Runtime's CPU provider has no native fp16 convolution on x86 "
    "(a 32-channel 3x3 conv at 128^2 measured 8.0 ms in fp16 vs 2.7 ms in fp32 on this project's CPU), so an "
    "fp16 graph is slower than fp32 here. fp16 is the GPU path: --format tensorrt --precision fp16")


def int8_conv_nodes(model) -> list[str]:
    """Conv nodes of the generator that int8 quantizes: the refine net's hidden convolutions, i.e. those
    downstream of the warps (GridSample) whose output is not a final layer (mouth mask / RGB + alpha head,
    recognised by feeding Slice, Split, DepthToSpace, Sigmoid or Tanh). The flow decoder stays fp32: a
    quantised flow moves pixels and costs ~50 dB of PSNR."""
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    tainted: set[str] = set()
    picked = []
    final_like = {"Slice", "Split", "DepthToSpace", "Sigmoid", "Tanh"}
    for n in model.graph.node:
        if n.op_type == "GridSample" or any(i in tainted for i in n.input):
            tainted.update(n.output)
            if n.op_type == "Conv" and not any(c in final_like for c in consumers.get(n.output[0], [])):
                picked.append(n.name)
    return picked


def calibration_inputs(model, n: int = 16, seed: int = 4321) -> dict[str, np.ndarray]:
    """Generator inputs for int8 calibration: avatars of smooth synthetic portraits (the built-in avatar
    too when installed) and latents ~ N(0, 0.5^2), `n` rows."""
    cfg = model.cfg
    s = cfg.image_size
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, s), torch.linspace(-1, 1, s), indexing="ij")
    portraits = []
    for _ in range(n):
        c = torch.rand(3, 1, 1, generator=g)
        cx, cy, rx, ry = (torch.rand(4, generator=g) * torch.tensor([0.4, 0.4, 0.3, 0.3]) +
                          torch.tensor([-0.2, -0.2, 0.4, 0.5]))
        img = 0.25 + 0.25 * xx * c + 0.1 * yy + 0.05 * torch.randn(3, s, s, generator=g)
        img = img + 0.45 * (((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1).float() * c
        portraits.append(img.clamp(0, 1))
    x = torch.stack(portraits)
    try:
        from engine.image import load_portrait  # noqa: PLC0415
        from engine.image import BUILTIN_AVATAR  # noqa: PLC0415

        if BUILTIN_AVATAR.is_file():
            x[0] = load_portrait(BUILTIN_AVATAR, s)[0]
    except (ImportError, InputError):
        pass
    with torch.no_grad():
        avatar = AvatarEncoderGraph(model)(x)
    z = torch.randn(n, cfg.latents.total, generator=g) * 0.5
    names = graph_specs(model)["generator"].inputs
    return {k: v.numpy() for k, v in zip(names, (z, *avatar))}


def quantize_generator_int8(src: Path, dst: Path, calib: dict[str, np.ndarray]) -> dict[str, Any]:
    """Static int8 quantization (QOperator format: QLinearConv, uint8 activations, int8 per-channel
    weights) of the refine net's convolutions, calibrated (min/max) on `calib`."""
    import onnx  # noqa: PLC0415
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,  # noqa: PLC0415
                                          quantize_static)

    nodes = int8_conv_nodes(onnx.load(str(src), load_external_data=False))
    if not nodes:
        raise InputError("int8: the generator has no refine convolutions to quantize")

    class _Reader(CalibrationDataReader):
        def __init__(self):
            b = next(iter(calib.values())).shape[0]
            self.items = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(b)])

        def get_next(self):
            return next(self.items, None)

    with _quiet_exporter():
        quantize_static(str(src), str(dst), _Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        op_types_to_quantize=["Conv"])
    return {"method": "onnxruntime.quantization.quantize_static (QOperator, uint8 activations, per-channel "
                      "int8 weights, min/max calibration on synthetic portraits)",
            "quantized_nodes": nodes}


def _int8_generator(model, path: Path) -> dict[str, Any]:
    """Replace the fp32 generator at `path` by its int8 version if that holds accuracy (PSNR vs fp32 on
    held-out synthetic avatars and latents, not the calibration ones)."""
    reduced = path.with_suffix(".int8.onnx")
    notes = quantize_generator_int8(path, reduced, calibration_inputs(model))
    feeds = calibration_inputs(model, n=4, seed=97)
    ref = _ort_session(path).run(None, feeds)[0]
    got = _ort_session(reduced).run(None, feeds)[0]
    db = psnr(got, ref)
    if db < MIN_PSNR_DB:
        reduced.unlink()
        raise InputError(f"int8 does not hold accuracy on this checkpoint's generator: PSNR {db:.1f} dB vs fp32 "
                         f"(< {MIN_PSNR_DB} dB); export fp32 instead")
    reduced.replace(path)
    return {**notes, "int8_psnr_db_vs_fp32": db, "int8_max_abs_diff_vs_fp32": float(np.abs(got - ref).max())}


def fp32_parity(name: str, got: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime's output `got` vs torch's `ref` for the output called `name`: its max / mean abs
    difference, how many values exceed FP32_TOLERANCE, and "failed" (why, or "" when it passes): a latent or
    grid must stay within FP32_TOLERANCE everywhere, an image (IMAGE_OUTPUTS) may have a few edge pixels up to
    FP32_OUTLIER_MAX (see FP32_OUTLIER_FRACTION)."""
    if got.shape != ref.shape:
        return {"max_abs": float("inf"), "mean_abs": float("inf"), "n_over": int(ref.size), "size": int(ref.size),
                "failed": f"shape {tuple(got.shape)} != {tuple(ref.shape)}"}
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    n_over = int((~(d <= FP32_TOLERANCE)).sum())  # NaN counts as over
    res = {"max_abs": float(np.nan_to_num(d, nan=np.inf).max()) if d.size else 0.0,
           "mean_abs": float(d.mean()) if d.size else 0.0, "n_over": n_over, "size": int(d.size)}
    if n_over == 0:
        why = ""
    elif name not in IMAGE_OUTPUTS:
        why = f"max abs diff {res['max_abs']:.3g} > {FP32_TOLERANCE}"
    elif n_over > FP32_OUTLIER_FRACTION * d.size:
        why = (f"{n_over} of {d.size} values differ by more than {FP32_TOLERANCE} "
               f"(> {FP32_OUTLIER_FRACTION:g} of them)")
    elif not res["max_abs"] <= FP32_OUTLIER_MAX:
        why = f"max abs diff {res['max_abs']:.3g} > {FP32_OUTLIER_MAX}"
    elif not res["mean_abs"] <= FP32_MEAN_TOLERANCE:
        why = f"mean abs diff {res['mean_abs']:.3g} > {FP32_MEAN_TOLERANCE}"
    else:
        why = ""
    return {**res, "failed": why}


# --------------------------------------------------------------------------------------------- main
def export_onnx(model, out: Path, *, precision: str = "fp32", opset: int = OPSET,
                graphs: tuple[str, ...] = GRAPH_NAMES, exporter: str = "dynamo") -> dict[str, Any]:
    """Export `model`'s graphs into the existing directory `out`; returns the manifest's "graphs" entry
    (and writes no manifest). Each graph is checked against torch with ONNX Runtime."""
    import onnx  # noqa: PLC0415

    specs = graph_specs(model)
    entries: dict[str, Any] = {}
    for name in graphs:
        spec = specs[name]
        t0 = time.perf_counter()
        path = out / f"{name}.onnx"
        log.info("exporting %s ...", path.name)
        how = export_graph(spec.module(model), spec.example(model.cfg, 2, torch.Generator().manual_seed(0)),
                           path, spec.inputs, spec.outputs, opset, exporter)
        # parity: ONNX Runtime vs torch on fresh inputs (batch 2, so the batch axis is exercised)
        example = spec.example(model.cfg, 2, torch.Generator().manual_seed(1234))
        ref = _torch_outputs(model, spec, example)
        feeds = {n: x.numpy() for n, x in zip(spec.inputs, example)}
        got = _ort_session(path).run(list(spec.outputs), feeds)
        parity = {out: fp32_parity(out, a, b) for out, a, b in zip(spec.outputs, got, ref)}
        diff = max(p["max_abs"] for p in parity.values())
        failed = {out: p["failed"] for out, p in parity.items() if p["failed"]}
        if failed:
            raise RuntimeError(f"exported {name} disagrees with torch: "
                               + "; ".join(f"{out}: {why}" for out, why in failed.items()))
        validation: dict[str, Any] = {"fp32_max_abs_diff_vs_torch": diff,
                                      "fp32_parity": {out: {k: v for k, v in p.items() if k != "failed"}
                                                      for out, p in parity.items()}}
        if precision == "int8" and name == "generator":
            validation.update(_int8_generator(model, path))
        m = onnx.load(str(path), load_external_data=False)
        entries[name] = {
            "file": path.name,
            "inputs": [_io_entry(v) for v in m.graph.input],
            "outputs": [_io_entry(v) for v in m.graph.output],
            "dynamic_axes": {v.name: {"0": "batch"} for v in (*m.graph.input, *m.graph.output)},
            "validation": validation,
            "exporter": how,
        }
        log.info("exported %s in %.1f s (%.2f MB, max |ORT - torch| = %.2g)", path.name,
                 time.perf_counter() - t0, path.stat().st_size / 1e6, diff)
    return entries


def _opcheck_entries(out: Path, graphs: dict[str, Any]) -> dict[str, Any]:
    from engine.runtimes.opcheck import check_model  # noqa: PLC0415

    res = {}
    for name, g in graphs.items():
        rep = check_model(out / g["file"], name=name)
        res[name] = {"ok": rep.ok, "errors": rep.errors, "warnings": rep.warnings, "ops": dict(rep.op_counts)}
    return res


def _prepare_out(out: Path) -> Path:
    """A fresh directory beside `out` to export into (renamed to `out` when everything worked)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the export is an ordinary shared directory
    return tmp


def _finish_out(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def build_manifest(model, meta: dict, cfg: ExportConfig, graphs: dict[str, Any], opset: int) -> dict[str, Any]:
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": "onnx",
        "precision": cfg.precision,
        "opset": opset,
        "checkpoint": meta.get("checkpoint"),
        "checkpoint_hash": checkpoint_hash(meta, cfg.config, cfg.seed),
        "random_weights": bool(meta.get("random_weights")),
        "model_config": model.cfg.to_dict(),
        "max_batch": cfg.max_batch,
        "graphs": graphs,
        "exporter": exporter_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_config(cfg: ExportConfig) -> None:
    """Everything about `cfg` that can fail before any work (and before the model is loaded)."""
    if cfg.format not in FORMATS:
        raise InputError(f"unknown format {cfg.format!r}; valid: {', '.join(FORMATS)}")
    if cfg.precision not in PRECISIONS:
        raise InputError(f"unknown precision {cfg.precision!r}; valid: {', '.join(PRECISIONS)}")
    if cfg.exporter not in EXPORTERS:
        raise InputError(f"unknown ONNX exporter {cfg.exporter!r}; valid: {', '.join(EXPORTERS)}")
    if cfg.format == "onnx" and cfg.precision == "fp16":
        raise InputError(FP16_ONNX_REFUSED)
    if cfg.max_batch < 1:
        raise InputError(f"max_batch must be positive, got {cfg.max_batch}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InputError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        if not (out / MANIFEST).is_file():
            raise InputError(f"refusing to replace {out}: it is not an export directory (no {MANIFEST}); "
                             "choose another --out")
    _require_onnx()
    if cfg.format == "tensorrt":
        from engine.runtimes.tensorrt_runtime import (  # noqa: PLC0415
            TRT_INT8_UNSUPPORTED, gpu_info, import_cudart, import_tensorrt)

        if cfg.precision == "int8":
            raise InputError(TRT_INT8_UNSUPPORTED)
        import_tensorrt(), import_cudart(), gpu_info()


def export_model(model, meta: dict, cfg: ExportConfig) -> Path:
    """Export an already loaded model (tests and the ORT backend's on-the-fly cache use this)."""
    _check_config(cfg)
    model = model.to("cpu", torch.float32).eval()
    out = Path(cfg.out)
    tmp = _prepare_out(out)
    try:
        if cfg.format == "onnx":
            names = GRAPH_NAMES + (SPLIT_GRAPH_NAMES if model.cfg.patches and cfg.precision == "fp32" else ())
            graphs = export_onnx(model, tmp, precision=cfg.precision, graphs=names, exporter=cfg.exporter)
            manifest = build_manifest(model, meta, cfg, graphs, OPSET)
            manifest["tensorrt_opcheck"] = _opcheck_entries(tmp, graphs)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        else:
            from engine.runtimes.tensorrt_runtime import build_engines  # noqa: PLC0415

            onnx_dir = tmp / "onnx"
            onnx_dir.mkdir()
            graphs = export_onnx(model, onnx_dir, precision="fp32", exporter=cfg.exporter)
            manifest = build_manifest(model, meta, dataclasses.replace(cfg, precision="fp32", format="onnx"),
                                      graphs, OPSET)
            checks = _opcheck_entries(onnx_dir, graphs)
            manifest["tensorrt_opcheck"] = checks
            (onnx_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
            bad = {k: v["errors"] for k, v in checks.items() if not v["ok"]}
            if bad:
                raise InputError(f"TensorRT 10 cannot parse these graphs as they are: {bad}")
            build_engines(onnx_dir, tmp, manifest, precision=cfg.precision, max_batch=cfg.max_batch)
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%s, %s)", out, cfg.format, cfg.precision)
    return out


def export(cfg: ExportConfig) -> Path:
    """`marionette export`: load the checkpoint (or random weights of cfg.config) and export it."""
    from engine.checkpoint import load_model  # noqa: PLC0415

    _check_config(cfg)
    model, meta = load_model(cfg.checkpoint, config=cfg.config, seed=cfg.seed)
    return export_model(model, meta, cfg)


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """The manifest of an export directory, checked for what a runtime needs."""
    export_dir = Path(export_dir)
    p = export_dir / MANIFEST
    if not p.is_file():
        raise InputError(f"{export_dir} is not an export directory (no {MANIFEST}); "
                         "make one with: marionette export --format onnx --out DIR")
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{p} is not valid JSON ({e})") from None
    missing = [k for k in ("format", "model_config", "graphs") if k not in m]
    if missing:
        raise InputError(f"{p} lacks {', '.join(missing)}")
    return m
