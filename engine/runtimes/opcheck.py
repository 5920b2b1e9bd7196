"""Will TensorRT 10's ONNX parser take this graph as it is? A check that needs no GPU and no TensorRT.

It walks an exported ONNX graph (and its subgraphs) and reports, before anyone builds an engine:
  * every node is in the default ONNX domain and its op is one the TensorRT 10 ONNX parser imports
    natively (no custom domain, so no plugin needed);
  * the restrictions the parser documents for the ops we may emit hold (GridSample and Resize modes,
    constant `axes`/`K` inputs, pooling dilations, ...);
  * the default-domain opset is inside the range the parser accepts;
  * tensor types are ones TensorRT has;
  * every graph input/output dimension is static except the dynamic (batch) axes we allow.

The operator table is written from the onnx-tensorrt operator support matrix (docs/operators.md of the
TensorRT 10.x releases) and its changelog for the ops added during 10.x. It is a static list: when a new
TensorRT release adds ops, add them here with the release that added them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import onnx
from onnx import TensorProto

# The default ONNX domain ops that the TensorRT 10.0 ONNX parser imports natively ("Y" rows of the
# support matrix). Ops whose support came later in 10.x are in `_ADDED_IN`.
TRT10_SUPPORTED_OPS: frozenset[str] = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# ops the parser gained during 10.x (changelog of onnx-tensorrt): op -> first TensorRT release with it
_ADDED_IN: dict[str, tuple[int, int]] = {
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15), "TensorScatter": (10, 15),
}

# ops the matrix lists as not supported ("N" rows), named in the message so it is specific
TRT10_UNSUPPORTED_OPS: frozenset[str] = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool
MaxUnpool MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
OptionalHasElement QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

# default-domain opset range the parser accepts ("supports operators in the inclusive range of opset
# 9 to opset N"): 20 for 10.0, 24 by 10.15
_OPSET_MIN = 9
_OPSET_MAX = {(10, 0): 20, (10, 15): 24}

# GridSample (TensorRT >= 8.5, IGridSampleLayer): 4-D input; linear / nearest / cubic interpolation
# (opset 16 names them bilinear / nearest / bicubic, opset 20 linear / nearest / cubic); padding zeros
# (kFILL), border (kCLAMP), reflection (kREFLECT); align_corners 0 or 1.
GRIDSAMPLE_MODES = frozenset({"bilinear", "linear", "nearest", "bicubic", "cubic"})
GRIDSAMPLE_PADDING = frozenset({"zeros", "border", "reflection"})
RESIZE_COORD_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                                "align_corners"})
RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})

TRT_TENSOR_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32,
                              TensorProto.INT64, TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL,
                              TensorProto.DOUBLE})

# inputs that must be build-time constants: op -> (input index, what it is)
_CONST_INPUTS: dict[str, tuple[int, str]] = {
    **{op: (1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                  "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "TopK": (1, "K"),
    "CumSum": (1, "axis"),
    "OneHot": (1, "depth"),
}


@dataclass
class OpCheckReport:
    """What the check found in one graph. `ok` is False when any error was found."""

    name: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    op_counts: Counter = field(default_factory=Counter)
    opset: int | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.name}: {'OK' if self.ok else 'NOT buildable as is'} for TensorRT 10 " \
               f"(opset {self.opset}, {sum(self.op_counts.values())} nodes, ops: " \
               f"{', '.join(f'{k} x{v}' for k, v in sorted(self.op_counts.items()))})"
        lines = [head] + [f"  error: {e}" for e in self.errors] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _version_tuple(v: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, tuple):
        return v
    parts = [int(p) for p in str(v).split(".")[:2] if p.isdigit()]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def supported_ops(trt_version: str | tuple[int, int] = (10, 0)) -> frozenset[str]:
    """The default-domain ops TensorRT `trt_version` (10.x) imports natively."""
    v = _version_tuple(trt_version)
    return TRT10_SUPPORTED_OPS | {op for op, since in _ADDED_IN.items() if v >= since}


def max_opset(trt_version: str | tuple[int, int] = (10, 0)) -> int:
    v = _version_tuple(trt_version)
    return max(n for since, n in _OPSET_MAX.items() if v >= since) if v >= (10, 0) else 17


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            val = onnx.helper.get_attribute_value(a)
            return val.decode() if isinstance(val, bytes) else val
    return default


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _check_graph(graph: onnx.GraphProto, rep: OpCheckReport, ops: frozenset[str], version: tuple[int, int],
                 ranks: Mapping[str, int], outer_consts: set[str], path: str) -> None:
    consts = set(outer_consts) | {i.name for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            consts.update(n.output)
    for n in graph.node:
        where = f"{path}{n.op_type} node {n.name or '(unnamed)'}"
        rep.op_counts[n.op_type] += 1
        if n.domain not in ("", "ai.onnx"):
            rep.errors.append(f"{where}: op of custom domain {n.domain!r}; TensorRT would need a plugin")
            continue
        if n.op_type not in ops:
            if n.op_type in _ADDED_IN:
                since = ".".join(map(str, _ADDED_IN[n.op_type]))
                rep.errors.append(f"{where}: needs TensorRT >= {since} (checking against "
                                  f"{version[0]}.{version[1]})")
            elif n.op_type in TRT10_UNSUPPORTED_OPS:
                rep.errors.append(f"{where}: listed as NOT supported by the TensorRT 10 ONNX parser")
            else:
                rep.errors.append(f"{where}: not in the TensorRT 10 ONNX parser's supported operators")
            continue
        _check_restrictions(n, where, rep, consts, ranks, version)
        for a in n.attribute:  # If / Loop / Scan bodies
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                _check_graph(g, rep, ops, version, ranks, consts, f"{where} > ")


def _check_restrictions(n: onnx.NodeProto, where: str, rep: OpCheckReport, consts: set[str],
                        ranks: Mapping[str, int], version: tuple[int, int]) -> None:
    op = n.op_type
    if op == "GridSample":
        mode = _attr(n, "mode", "bilinear" if rep.opset is not None and rep.opset < 20 else "linear")
        pad = _attr(n, "padding_mode", "zeros")
        if mode not in GRIDSAMPLE_MODES:
            rep.errors.append(f"{where}: GridSample mode {mode!r} not supported")
        if pad not in GRIDSAMPLE_PADDING:
            rep.errors.append(f"{where}: GridSample padding_mode {pad!r} not supported")
        r = ranks.get(n.input[0])
        if r is not None and r != 4:
            rep.errors.append(f"{where}: GridSample input must be 4-D, got rank {r}")
    elif op == "Resize":
        mode = _attr(n, "mode", "nearest")
        ctm = _attr(n, "coordinate_transformation_mode", "half_pixel")
        if mode not in RESIZE_MODES:
            rep.errors.append(f"{where}: Resize mode {mode!r} not supported (nearest, linear)")
        if ctm not in RESIZE_COORD_MODES:
            rep.errors.append(f"{where}: Resize coordinate_transformation_mode {ctm!r} not supported")
        if mode == "nearest" and _attr(n, "nearest_mode", "round_prefer_floor") not in RESIZE_NEAREST_MODES:
            rep.errors.append(f"{where}: Resize nearest_mode {_attr(n, 'nearest_mode')!r} not supported")
        if _attr(n, "antialias", 0):
            rep.errors.append(f"{where}: Resize antialias is not supported")
        if _attr(n, "keep_aspect_ratio_policy", "stretch") != "stretch":
            rep.errors.append(f"{where}: Resize keep_aspect_ratio_policy must be 'stretch'")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        if any(d != 1 for d in _attr(n, "dilations", []) or []):
            rep.errors.append(f"{where}: {op} dilations must be empty or all ones")
        if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
            rep.errors.append(f"{where}: MaxPool `Indices` output is not supported")
        r = ranks.get(n.input[0])
        if op != "LpPool" and r is not None and r not in (4, 5):
            rep.errors.append(f"{where}: {op}: 2D or 3D pooling only, got input rank {r}")
    elif op == "ScatterND" and _attr(n, "reduction", "none") != "none":
        rep.errors.append(f"{where}: ScatterND reduction other than 'none' is not supported")
    elif op == "Dropout" and len(n.input) > 2 and n.input[2] and n.input[2] not in consts:
        rep.errors.append(f"{where}: Dropout `training_mode` must be a constant False")
    elif op in ("Squeeze", "Unsqueeze") and len(n.input) > 1 and n.input[1] and n.input[1] not in consts \
            and version < (10, 7):
        rep.errors.append(f"{where}: {op} `axes` must be a constant before TensorRT 10.7")
    elif op == "Slice" and len(n.input) > 3 and n.input[3] and n.input[3] not in consts and version < (10, 3):
        rep.errors.append(f"{where}: Slice `axes` must be a constant before TensorRT 10.3")
    elif op == "Pad" and len(n.input) > 3 and n.input[3] and n.input[3] not in consts and version < (10, 4):
        rep.errors.append(f"{where}: Pad `axes` must be a constant before TensorRT 10.4")
    if op in _CONST_INPUTS:
        idx, what = _CONST_INPUTS[op]
        if op == "CumSum" and version >= (10, 8):
            return
        if len(n.input) > idx and n.input[idx] and n.input[idx] not in consts:
            rep.errors.append(f"{where}: {op} `{what}` must be a build-time constant (an initializer)")


def check_model(model: onnx.ModelProto | str | Path, *, name: str | None = None,
                dynamic_axes: Mapping[str, Iterable[int]] | None = None,
                trt_version: str | tuple[int, int] = (10, 0)) -> OpCheckReport:
    """Check one ONNX model for TensorRT 10. `dynamic_axes` maps a graph input/output name to the axes
    allowed to be dynamic; any name not in it may have a dynamic axis 0 (batch) and nothing else."""
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        model = onnx.load(str(model), load_external_data=False)
    rep = OpCheckReport(name=name or model.graph.name or "model")
    version = _version_tuple(trt_version)

    for imp in model.opset_import:  # other domains' imports matter only through their nodes (checked below)
        if imp.domain in ("", "ai.onnx"):
            rep.opset = imp.version
    if rep.opset is None:
        rep.errors.append("no default-domain opset import")
    elif not _OPSET_MIN <= rep.opset <= max_opset(version):
        rep.errors.append(f"opset {rep.opset} outside the parser's range {_OPSET_MIN}..{max_opset(version)}")
    if model.functions:
        rep.warnings.append(f"{len(model.functions)} local function(s) in the model: calls to them are reported "
                            "as custom-domain nodes; export with inlining (the default) to check their ops")

    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception as e:  # shape inference is a help, never a gate
        rep.warnings.append(f"shape inference failed ({e}); rank checks skipped")
        inferred = model
    ranks: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        d = _dims(vi)
        if d is not None:
            ranks[vi.name] = len(d)

    _check_graph(model.graph, rep, supported_ops(version), version, ranks, set(), "")

    # tensor types and static dims of the graph I/O
    dyn = {k: set(v) for k, v in (dynamic_axes or {}).items()}
    inits = {i.name for i in model.graph.initializer}
    for kind, vis in (("input", [i for i in model.graph.input if i.name not in inits]),
                      ("output", list(model.graph.output))):
        for vi in vis:
            et = vi.type.tensor_type.elem_type
            if et not in TRT_TENSOR_TYPES:
                rep.errors.append(f"graph {kind} {vi.name!r}: element type "
                                  f"{TensorProto.DataType.Name(et)} has no TensorRT equivalent")
            elif et == TensorProto.DOUBLE:
                rep.warnings.append(f"graph {kind} {vi.name!r} is DOUBLE: TensorRT casts it down to FLOAT")
            dims = _dims(vi)
            if dims is None:
                rep.errors.append(f"graph {kind} {vi.name!r} has no shape")
                continue
            allowed = dyn.get(vi.name, {0})
            for ax, d in enumerate(dims):
                if isinstance(d, int) and d > 0:
                    continue
                if ax not in allowed:
                    rep.errors.append(f"graph {kind} {vi.name!r} axis {ax} is dynamic ({d!r}); only axes "
                                      f"{sorted(allowed)} may be")
    for init in model.graph.initializer:
        if init.data_type == TensorProto.DOUBLE:
            rep.warnings.append(f"initializer {init.name!r} is DOUBLE: TensorRT casts it down to FLOAT")
            break
    return rep


def check_export_dir(export_dir: str | Path, trt_version: str | tuple[int, int] = (10, 0)) -> list[OpCheckReport]:
    """Check every ONNX graph an `marionette export --format onnx` directory holds."""
    export_dir = Path(export_dir)
    files = sorted(export_dir.glob("*.onnx"))
    if not files:
        raise FileNotFoundError(f"no .onnx files in {export_dir}")
    return [check_model(f, trt_version=trt_version) for f in files]
