"""`OrtRuntime`: the ONNX Runtime backend (the CPU default), running an `marionette export` directory.

Same protocol and output layout as `engine.runtimes.torch_runtime.TorchRuntime`: `prepare_avatar` ->
`AvatarState` (CPU float32 tensors), `generate(avatars, z)` -> (B,3,S,S) float32 in [0,1], `encode_audio`,
`encode_motion`, `warmup`, `cfg`, plus `describe()`.

What makes the per-frame path fast here (each measured by benchmarks/backends.py; numbers in its JSON):
* sessions with ORT_ENABLE_ALL (NCHWc conv layouts, fusions), sequential execution, one intra-op pool
  sized to the physical cores, no busy-waiting between ops (`spin`), CPU memory arena and memory
  patterns on (session creation is < 1 s for all four lite graphs, so no optimized-model cache);
* **GridSample offload**: ONNX Runtime's CPU GridSample kernel is ~10x slower than torch's grid_sample on
  the generator's three warps (17 of the 40 ms of a `lite` frame on one core). The generator graph is cut
  at its GridSample nodes into levels: ORT segments (the flow decoder and the sampling grids; the refine net;
  with patches, the anchor steps and the squares' nets) with the warps between them run by
  torch.nn.functional.grid_sample on the same arrays (zero-copy). The exported file itself is
  untouched (TensorRT has a fast native GridSample). `grid_sample="onnxruntime"` keeps the single graph;
* avatar tensors of a batch (one avatar repeated, or one per row) are assembled once and reused while
  the same avatars come back (the server asks for the same sessions tick after tick);
* generator outputs are written by ONNX Runtime straight into a fresh numpy array through IO binding
  (no extra copy), which becomes the returned torch tensor.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.avatar import AvatarState
from engine.config import FACTORS, ModelConfig
from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

GRID_SAMPLE_MODES = ("torch", "onnxruntime")
SPLIT_GRAPHS = ("generator_body", "generator_mouth")  # engine.runtimes.export.SPLIT_GRAPH_NAMES
_AVATAR_CACHE_SIZE = 2  # batches of up to 16 lite avatars are ~62 MB each


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads counted once); >= 1."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        cpu = phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "processor":
                    cpu = int(val)
                elif key == "physical id":
                    phys = val
                elif key == "core id":
                    core = val
                elif not key and cpu is not None:
                    if cpu in allowed and core is not None:
                        cores.add((phys or "0", core))
                    cpu = phys = core = None
        if cpu is not None and cpu in allowed and core is not None:
            cores.add((phys or "0", core))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def _import_ort():
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as e:
        raise MissingDependency(f"onnxruntime is not installed ({e}): pip install 'marionette[onnx]'") from None
    return ort


def portrait_array(image, cfg: ModelConfig) -> np.ndarray:
    """A portrait (anything engine.image.load_portrait takes) -> (1,3,S,S) float32 in [0,1]."""
    from engine.image import load_portrait  # noqa: PLC0415

    return load_portrait(image, cfg.image_size).numpy()


# ------------------------------------------------------------------------------ GridSample offload
@dataclass(frozen=True)
class _Warp:
    x: str
    grid: str
    out: str
    mode: str
    padding_mode: str
    align_corners: bool


@dataclass
class Segment:
    """One ONNX Runtime piece of a split graph: its model (onnx.ModelProto) and the names it reads and writes."""

    model: Any
    inputs: list[str]
    outputs: list[str]


@dataclass
class SplitGraph:
    """A graph cut at its GridSample nodes into levels: segments[0] (ORT) -> levels[0] (torch warps) ->
    segments[1] -> levels[1] -> ... -> segments[-1]. A warp of level k reads what segments <= k and earlier
    levels made; the patch refiner's sampling (anchors carried by the flow, squares cut from the frame and
    pasted back) makes later levels. A segment may be None (nothing to run between two levels)."""

    segments: list[Segment | None]
    levels: list[list[_Warp]]
    constants: dict[str, np.ndarray]  # initializers the warps read directly
    outputs: list[str]

    @property
    def warps(self) -> list[_Warp]:
        return [w for lv in self.levels for w in lv]


def _constant_value(node) -> np.ndarray | None:
    """A Constant node's value (its dense forms), or None for any other node."""
    from onnx import helper, numpy_helper  # noqa: PLC0415

    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    a = node.attribute[0]
    if a.name == "value":
        return numpy_helper.to_array(a.t)
    if a.name in ("value_float", "value_floats"):
        return np.asarray(helper.get_attribute_value(a), np.float32)
    if a.name in ("value_int", "value_ints"):
        return np.asarray(helper.get_attribute_value(a), np.int64)
    return None


_TORCH_GS_MODE = {"bilinear": "bilinear", "linear": "bilinear", "nearest": "nearest", "bicubic": "bicubic",
                  "cubic": "bicubic"}


def split_at_grid_sample(model, any_outputs: bool = False) -> SplitGraph | None:
    """Cut `model` (onnx.ModelProto) at its GridSample nodes into ORT segments and torch warp levels, or None
    where that cannot be done (no GridSample, subgraphs; unless `any_outputs`: no node after the last warp,
    a graph output made by a warp or by a segment before the last). A node's level is the number of
    GridSample nodes on its longest input path. With `any_outputs` the outputs are read from the values
    every piece made (`OrtRuntime._run_env`), not written by the last segment."""
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return None
    inferred = onnx.shape_inference.infer_shapes(model)
    vinfo = {v.name: v for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    inits = {i.name: i for i in g.initializer}
    # Constant nodes become initializers, copied into each segment that reads them: passed from one segment
    # to the next as a value, a constant loses its constness (a Resize's empty `scales` then reads as a
    # `sizes` of no elements, which ONNX Runtime rejects: the TorchScript exporter writes such constants)
    kept = []
    for n in g.node:
        arr = _constant_value(n)
        if arr is None:
            kept.append(n)
        else:
            inits[n.output[0]] = onnx.numpy_helper.from_array(arr, n.output[0])
    outputs = [o.name for o in g.output]

    depth: dict[str, int] = {}
    seg_nodes: dict[int, list] = {}
    warp_nodes: dict[int, list] = {}
    for n in kept:  # ONNX graphs are topologically sorted
        ins = [i for i in n.input if i]
        d = max((depth.get(i, 0) for i in ins), default=0)
        if n.op_type == "GridSample" and n.domain in ("", "ai.onnx"):
            d += 1
            warp_nodes.setdefault(d, []).append(n)
        else:
            seg_nodes.setdefault(d, []).append(n)
        for o in n.output:
            depth[o] = d
    if not warp_nodes:
        return None
    n_levels = max(warp_nodes)
    if not seg_nodes.get(n_levels) and not any_outputs:
        return None
    warp_outs = {o for ns in warp_nodes.values() for n in ns for o in n.output}
    if warp_outs & set(outputs) and not any_outputs:
        return None

    def value_info(name: str):
        v = vinfo.get(name)
        if v is None or not v.type.tensor_type.elem_type:
            raise ValueError(f"no type for {name}")
        return v

    def needs_after(k: int) -> set[str]:  # what warps of level > k and segments > k read
        later = [n for lv, ns in warp_nodes.items() if lv > k for n in ns]
        later += [n for lv, ns in seg_nodes.items() if lv > k for n in ns]
        return {i for n in later for i in n.input if i}

    segments: list[Segment | None] = []
    try:
        for k in range(n_levels + 1):
            nodes = seg_nodes.get(k, [])
            if not nodes:
                segments.append(None)
                continue
            made = {o for n in nodes for o in n.output}
            reads = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in made and i not in inits))
            later = needs_after(k)
            outs = list(dict.fromkeys([o for n in nodes for o in n.output if o in later or o in outputs]))
            used = {i for n in nodes for i in n.input}
            graph = helper.make_graph(nodes, f"{g.name}_{k}", [value_info(i) for i in reads],
                                      [value_info(o) for o in outs],
                                      initializer=[t for name, t in inits.items() if name in used])
            m = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
            onnx.checker.check_model(m)
            segments.append(Segment(m, reads, outs))
    except (ValueError, onnx.checker.ValidationError) as e:
        log.debug("cannot split the graph at GridSample: %s", e)
        return None
    if not any_outputs and any(o not in segments[-1].outputs for o in outputs):
        return None

    def attr(n, key, default):
        for a in n.attribute:
            if a.name == key:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    levels: list[list[_Warp]] = []
    for k in range(1, n_levels + 1):
        lv = []
        for n in warp_nodes.get(k, []):
            mode = attr(n, "mode", "bilinear")
            pad = attr(n, "padding_mode", "zeros")
            if mode not in _TORCH_GS_MODE or pad not in ("zeros", "border", "reflection"):
                return None
            lv.append(_Warp(n.input[0], n.input[1], n.output[0], _TORCH_GS_MODE[mode], pad,
                            bool(attr(n, "align_corners", 0))))
        levels.append(lv)
    consts = {k: onnx.numpy_helper.to_array(inits[k]) for lv in levels for w in lv for k in (w.x, w.grid)
              if k in inits}
    return SplitGraph(segments, levels, consts, list(outputs))


# ------------------------------------------------------------------------------------------- runtime
class OrtRuntime:
    """ONNX Runtime backend over an export directory (see engine.runtimes.export).

    threads: intra-op threads of every session (default: physical cores). grid_sample: "torch" (default:
    the generator's warps run with torch's kernel, see the module docstring) or "onnxruntime" (the
    exported graph as is). spin: let ORT's pool threads busy-wait between ops (off by default: on a
    CPU shared with audio, video encoding and the event loop -- the server's case -- spinning threads
    steal the cores the others need; measured 97 vs 124 ms/frame for lite on 2 loaded cores)."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, *, threads: int | None = None, grid_sample: str = "torch",
                 spin: bool = False):
        from engine.runtimes.export import read_manifest  # noqa: PLC0415

        ort = _import_ort()
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        if self.manifest["format"] != "onnx":
            raise InputError(f"{self.export_dir} holds a {self.manifest['format']!r} export; the onnxruntime "
                             "backend needs --format onnx")
        if grid_sample not in GRID_SAMPLE_MODES:
            raise InputError(f"grid_sample must be one of {', '.join(GRID_SAMPLE_MODES)}, got {grid_sample!r}")
        if threads is not None and threads < 1:
            raise InputError(f"threads must be positive, got {threads}")
        self.cfg = ModelConfig.from_dict(self.manifest["model_config"])
        self.precision = self.manifest.get("precision", "fp32")
        self.threads = threads or physical_cores()
        self.spin = bool(spin)
        self._ort = ort
        graphs = self.manifest["graphs"]
        missing = [n for n in ("generator", "audio_encoder", "avatar_encoder", "motion_encoder") if n not in graphs]
        if missing:
            raise InputError(f"{self.export_dir}: manifest lacks graphs {missing}")
        self._io = {name: ([i["name"] for i in g["inputs"]], [o["name"] for o in g["outputs"]])
                    for name, g in graphs.items()}
        self._audio = self._session(self.export_dir / graphs["audio_encoder"]["file"])
        self._avatar = self._session(self.export_dir / graphs["avatar_encoder"]["file"])
        self._motion = self._session(self.export_dir / graphs["motion_encoder"]["file"])
        gen_path = self.export_dir / graphs["generator"]["file"]
        self._split: SplitGraph | None = None
        if grid_sample == "torch":
            import onnx  # noqa: PLC0415

            self._split = split_at_grid_sample(onnx.load(str(gen_path)))
            if self._split is None:
                log.info("generator has no GridSample to offload; running it as one graph")
        if self._split is not None:
            self._segs = [None if sg is None else self._session(sg.model.SerializeToString())
                          for sg in self._split.segments]
            self._gen = None
        else:
            self._gen = self._session(gen_path)
        self.grid_sample = "torch" if self._split is not None else "onnxruntime"
        # the generator in two phases (body ahead of the audio, the mouth last), when the export has them
        self._phases: dict[str, tuple] = {}
        if all(n in graphs for n in SPLIT_GRAPHS):
            import onnx  # noqa: PLC0415

            for n in SPLIT_GRAPHS:
                m = onnx.load(str(self.export_dir / graphs[n]["file"]))
                sp = split_at_grid_sample(m, any_outputs=True) if grid_sample == "torch" else None
                sess = ([None if sg is None else self._session(sg.model.SerializeToString()) for sg in sp.segments]
                        if sp is not None else self._session(self.export_dir / graphs[n]["file"]))
                self._phases[n] = (sp, sess)
        self._gen_inputs, self._gen_outputs = self._io["generator"]
        self._avatar_names = self._gen_inputs[1:]  # source, feat_hi, feat_lo, app
        self._batches: OrderedDict[tuple, tuple] = OrderedDict()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sessions
    def _session(self, model: Path | bytes):
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = True
        so.enable_mem_pattern = True
        so.log_severity_level = 3
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        src = str(model) if isinstance(model, Path) else model
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": "cpu", "precision": self.precision, "threads": self.threads,
                "grid_sample": self.grid_sample, "spin": self.spin, "export_dir": str(self.export_dir),
                "onnxruntime": self._ort.__version__,
                "checkpoint_hash": self.manifest.get("checkpoint_hash")}

    # ------------------------------------------------------------------ per avatar
    def prepare_avatar(self, image) -> AvatarState:
        """Portrait (anything load_portrait accepts, or an AvatarState) -> AvatarState of CPU float32
        tensors. Runs avatar_encoder.onnx once."""
        s = self.cfg.image_size
        if isinstance(image, AvatarState):
            if image.image_size != s:
                raise InputError(f"avatar is {image.image_size}px, this model needs {s}px")
            return image.to("cpu", torch.float32)
        x = portrait_array(image, self.cfg)
        ins, outs = self._io["avatar_encoder"]
        res = self._avatar.run(outs, {ins[0]: x})
        named = dict(zip(outs, res))
        return AvatarState(*(torch.from_numpy(np.ascontiguousarray(named[n])) for n in self._avatar_names))

    # ------------------------------------------------------------------ per frame
    def _avatar_batch(self, avatars: AvatarState | Sequence[AvatarState], b: int) -> tuple[np.ndarray, ...]:
        if isinstance(avatars, AvatarState):
            avatars = [avatars]
        avatars = list(avatars)
        if not avatars:
            raise InputError("generate needs at least one avatar")
        s = self.cfg.image_size
        for a in avatars:
            if not isinstance(a, AvatarState):
                raise InputError(f"expected AvatarState, got {type(a).__name__}")
            if a.image_size != s:
                raise InputError(f"avatar is {a.image_size}px, this model needs {s}px")
        if len(avatars) not in (1, b):
            raise InputError(f"got {len(avatars)} avatars for a batch of {b} latents; "
                             "pass one avatar for all rows or one per row")
        if len(avatars) == 1 and b == 1:
            return tuple(_as_f32(t) for t in avatars[0].tensors())
        if len(avatars) > 1 and all(a is avatars[0] for a in avatars):
            avatars = avatars[:1]
        key = (b, *(id(a) for a in avatars))
        with self._lock:
            hit = self._batches.get(key)
            if hit is not None:
                self._batches.move_to_end(key)
                return hit[1]
        if len(avatars) == 1:
            arrays = tuple(np.ascontiguousarray(np.broadcast_to(_as_f32(t), (b, *t.shape[1:])))
                           for t in avatars[0].tensors())
        else:
            arrays = tuple(np.concatenate([_as_f32(t) for t in ts], axis=0)
                           for ts in zip(*(a.tensors() for a in avatars)))
        with self._lock:
            self._batches[key] = (tuple(avatars), arrays)  # holds the avatars: their ids stay unique
            while len(self._batches) > _AVATAR_CACHE_SIZE:
                self._batches.popitem(last=False)
        return arrays

    def generate(self, avatars: AvatarState | Sequence[AvatarState], z) -> torch.Tensor:
        """z (B, latents.total); one avatar for all rows or one per row -> (B,3,S,S) float32 in [0,1]."""
        z = self._z(z)
        feeds = dict(zip(self._gen_inputs, (z, *self._avatar_batch(avatars, z.shape[0]))))
        s = self.cfg.image_size
        out = np.empty((z.shape[0], 3, s, s), np.float32)  # ORT writes the frames here (IO binding)
        if self._split is None:
            _run_into(self._gen, feeds, self._gen_outputs[0], out)
        else:
            self._run_split(feeds, out)
        return torch.from_numpy(out)

    # ------------------------------------------------------------------ the frame in two phases
    @property
    def late_mouth(self) -> bool:
        """Whether the export has the generator in two phases (`generate_body` / `generate_mouth`)."""
        return bool(self._phases)

    def generate_body(self, avatars: AvatarState | Sequence[AvatarState], z) -> tuple[np.ndarray, ...]:
        """The frame without the mouth net's change, from a provisional z (B, latents.total) -> an opaque
        tuple for `generate_mouth` (engine.networks.Generator.body)."""
        if not self._phases:
            raise InputError(f"{self.export_dir} has no {' / '.join(SPLIT_GRAPHS)} graphs (re-export it)")
        z = self._z(z)
        ins, outs = self._io["generator_body"]
        env = self._run_env("generator_body", dict(zip(ins, (z, *self._avatar_batch(avatars, z.shape[0])))))
        return tuple(np.ascontiguousarray(env[o]) for o in outs)

    def generate_mouth(self, body: tuple, avatars: AvatarState | Sequence[AvatarState], z) -> torch.Tensor:
        """`generate_body`'s result and the final z -> (B,3,S,S) float32 in [0,1]."""
        z = self._z(z)
        ins, outs = self._io["generator_mouth"]
        app = self._avatar_batch(avatars, z.shape[0])[-1]
        env = self._run_env("generator_mouth", dict(zip(ins, (*body, z, app))))
        return torch.from_numpy(np.ascontiguousarray(env[outs[0]]))

    def _z(self, z) -> np.ndarray:
        z = _as_f32(z)
        total = self.cfg.latents.total
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != total:
            raise InputError(f"z must be (B, {total}), got {tuple(z.shape)}")
        return np.ascontiguousarray(z)

    def _run_env(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run graph `name` (split at its warps when it could be) -> every value it made, by name."""
        sp, sess = self._phases[name]
        outs = self._io[name][1]
        if sp is None:
            return dict(zip(outs, sess.run(outs, feeds)))
        env = dict(feeds)
        env.update(sp.constants)
        for k, (seg, ss) in enumerate(zip(sp.segments, sess)):
            if k > 0:
                self._warps(sp.levels[k - 1], env)
            if seg is not None:
                env.update(zip(seg.outputs, ss.run(seg.outputs, {i: env[i] for i in seg.inputs})))
        return env

    @staticmethod
    def _warps(level: list, env: dict[str, np.ndarray]) -> None:
        with torch.inference_mode():
            for w in level:
                env[w.out] = torch.nn.functional.grid_sample(
                    torch.from_numpy(env[w.x]), torch.from_numpy(env[w.grid]), mode=w.mode,
                    padding_mode=w.padding_mode, align_corners=w.align_corners).numpy()

    def _run_split(self, feeds: dict[str, np.ndarray], out: np.ndarray) -> None:
        sp = self._split
        env = dict(feeds)
        env.update(sp.constants)
        last = len(sp.segments) - 1
        for k, (seg, sess) in enumerate(zip(sp.segments, self._segs)):
            if k > 0:
                with torch.inference_mode():
                    for w in sp.levels[k - 1]:
                        y = torch.nn.functional.grid_sample(torch.from_numpy(env[w.x]), torch.from_numpy(env[w.grid]),
                                                            mode=w.mode, padding_mode=w.padding_mode,
                                                            align_corners=w.align_corners)
                        env[w.out] = y.numpy()
            if seg is None:
                continue
            ins = {i: env[i] for i in seg.inputs}
            if k == last:
                _run_into(sess, ins, sp.outputs[0], out)
            else:
                env.update(zip(seg.outputs, sess.run(seg.outputs, ins)))

    def encode_audio(self, mel_windows) -> torch.Tensor:
        """(B, n_mels, mel_window) log-mel -> lip latents (B, lip) float32."""
        m = _as_f32(mel_windows)
        want = (self.cfg.audio.n_mels, self.cfg.mel_window)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or tuple(m.shape[1:]) != want:
            raise InputError(f"mel windows must be (B, {want[0]}, {want[1]}), got {tuple(m.shape)}")
        ins, outs = self._io["audio_encoder"]
        return torch.from_numpy(self._audio.run(outs, {ins[0]: np.ascontiguousarray(m)})[0])

    def encode_motion(self, frames, mirror: bool | None = None) -> dict[str, torch.Tensor]:
        """Driving frames (B,3,S,S) in [0,1] -> {"lip", "pose", "eye", "exp"} float32; `mirror` (default:
        `cfg.motion_mirror`): read each frame's mirror image too (engine.model.mirror_mean, 2 x E_mot)."""
        f = _as_f32(frames)
        s = self.cfg.image_size
        if f.ndim == 3:
            f = f[None]
        if f.ndim != 4 or tuple(f.shape[1:]) != (3, s, s):
            raise InputError(f"driving frames must be (B, 3, {s}, {s}) in [0, 1], got {tuple(f.shape)}")
        ins, outs = self._io["motion_encoder"]

        def read(x: np.ndarray) -> dict[str, torch.Tensor]:
            res = dict(zip(outs, self._motion.run(outs, {ins[0]: np.ascontiguousarray(x)})))
            return {k: torch.from_numpy(res[k]) for k in FACTORS}

        out = read(f)
        if self.cfg.motion_mirror if mirror is None else mirror:
            from engine.model import mirror_mean

            out = mirror_mean(out, read(f[..., ::-1]))
        return out

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Runs every per-frame path once per batch size (arena growth, NCHWc weight reorders)."""
        s = self.cfg.image_size
        avatar = self.prepare_avatar(torch.full((1, 3, s, s), 0.5))
        for b in batch_sizes:
            self.generate(avatar, np.zeros((b, self.cfg.latents.total), np.float32))
            self.encode_audio(np.zeros((b, self.cfg.audio.n_mels, self.cfg.mel_window), np.float32))
        with self._lock:
            self._batches.clear()


def _run_into(session, feeds: dict[str, np.ndarray], output: str, out: np.ndarray) -> None:
    """session.run with the one output written into the preallocated `out` (no copy of the result)."""
    io = session.io_binding()
    for k, v in feeds.items():
        io.bind_cpu_input(k, np.ascontiguousarray(v))
    io.bind_output(output, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
    session.run_with_iobinding(io)


def _as_f32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu" or x.dtype != torch.float32:
            x = x.to("cpu", torch.float32)
        return x.numpy()
    return np.asarray(x, dtype=np.float32)
