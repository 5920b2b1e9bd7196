"""TensorRT 10 engines built from the exported ONNX graphs, and `TrtRuntime`, the backend that runs them.

Written against the documented TensorRT 10 Python API and cuda-python's runtime bindings; neither can
run on the machines this project is developed on (no TensorRT there), so everything that can be checked
without a GPU is checked elsewhere: `engine.runtimes.opcheck` proves the ONNX graphs use only ops the
TensorRT 10 ONNX parser imports natively, and `check_engine_manifest` (pure Python) is unit-tested.

Build (`build_engines`): for each ONNX graph, `trt.Builder` -> network (explicit batch, the only mode in
TensorRT 10) filled by `trt.OnnxParser` -> builder config (workspace limit, FP16 flag for fp16, one
optimization profile min=1 / opt / max=max_batch on the batch axis of every input, a timing cache file
shared by all graphs and kept between builds) -> `build_serialized_network` -> `<graph>.engine`. The
manifest.json beside the engines records the checkpoint hash, the TensorRT version, the GPU name and
compute capability and every tensor's shape: an engine only runs on the TensorRT version and GPU
architecture that built it, and `TrtRuntime` refuses a mismatch with a message that says how to rebuild.

Run (`TrtRuntime`): one CUDA stream; per engine an execution context and device buffers for max_batch,
pinned host staging buffers; inputs are copied host->device asynchronously, `execute_async_v3` runs
with `set_tensor_address` bindings, outputs are copied back and the stream is synchronised once per
call. An avatar's cached tensors stay on the GPU; `generate` gathers the per-item avatars of a batch
with device-to-device copies, so per frame only the latents go up and the frames come down.
"""

from __future__ import annotations

import ctypes
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

GPU_INSTALL_HINT = ("pip install 'marionette[gpu]' on an NVIDIA machine with a CUDA driver "
                    "(installs TensorRT 10 and cuda-python)")
ENGINE_MANIFEST_FORMAT = "tensorrt"
TIMING_CACHE_NAME = "timing.cache"
TRT_INT8_UNSUPPORTED = ("int8 TensorRT engines need a calibration set, which export does not take; "
                        "use --precision fp16 (the fast path on NVIDIA GPUs) or fp32")


class EngineMismatch(InputError):
    """A TensorRT engine directory built for another GPU architecture or TensorRT version."""


# ------------------------------------------------------------------------------------ lazy imports
def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as e:
        raise MissingDependency(f"TensorRT is not installed ({e}): {GPU_INSTALL_HINT}") from None
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise MissingDependency(f"TensorRT {trt.__version__} is too old, 10.x is needed: {GPU_INSTALL_HINT}")
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6  # noqa: PLC0415
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python  # noqa: PLC0415
        except ImportError as e:
            raise MissingDependency(f"cuda-python is not installed ({e}): {GPU_INSTALL_HINT}") from None
    return cudart


def _cuda_check(cudart, result):
    """cuda-python calls return (err, *values); raise on an error, return the value(s)."""
    if isinstance(result, tuple):
        err, vals = result[0], result[1:]
    else:
        err, vals = result, ()
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        msg = msg.decode() if isinstance(msg, bytes) else msg
        raise RuntimeError(f"CUDA error {int(err)}: {msg}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


def gpu_info(device: int = 0) -> dict[str, str]:
    """Name and compute capability ("8.6") of a CUDA device, from the CUDA runtime."""
    cudart = import_cudart()
    try:
        prop = _cuda_check(cudart, cudart.cudaGetDeviceProperties(device))
    except RuntimeError as e:
        raise MissingDependency(f"no usable NVIDIA GPU/driver ({e}): TensorRT needs one") from None
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


# ---------------------------------------------------------------------------------- manifest check
def check_engine_manifest(manifest: dict[str, Any], *, trt_version: str, gpu_name: str,
                          compute_capability: str) -> list[str]:
    """Refuse an engine directory that cannot run here; return warnings for what merely may be slow.

    A serialized TensorRT engine is specific to the TensorRT version that built it and to the GPU
    architecture (compute capability) it was built on (we build neither version- nor hardware-
    compatible engines). A different GPU model of the same architecture runs, but tactics were timed on
    the builder's GPU, so that is a warning."""
    if manifest.get("format") != ENGINE_MANIFEST_FORMAT:
        raise EngineMismatch(f"not a TensorRT engine directory (manifest format {manifest.get('format')!r})")
    rebuild = ("rebuild the engines on this machine: marionette export --format tensorrt "
               "--checkpoint CKPT --out DIR --overwrite")
    built_trt = str(manifest.get("tensorrt_version", "?"))
    if built_trt != str(trt_version):
        raise EngineMismatch(f"engines were built with TensorRT {built_trt}, this machine has TensorRT "
                             f"{trt_version}; serialized engines only load on the version that built them: "
                             f"{rebuild}")
    gpu = manifest.get("gpu") or {}
    built_cc = str(gpu.get("compute_capability", "?"))
    if built_cc != str(compute_capability):
        raise EngineMismatch(f"engines were built for compute capability {built_cc} ({gpu.get('name', '?')}), "
                             f"this GPU is {gpu_name} with compute capability {compute_capability}: {rebuild}")
    warnings = []
    if str(gpu.get("name", "")) != str(gpu_name):
        warnings.append(f"engines were built on {gpu.get('name')!r}, running on {gpu_name!r} (same compute "
                        f"capability {compute_capability}): they run, but may be slower than engines built here")
    return warnings


# ------------------------------------------------------------------------------------------ build
def _trt_logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(trt, onnx_path: Path, engine_path: Path, *, fp16: bool, max_batch: int, opt_batch: int,
                 timing_cache: Path | None, workspace_bytes: int = 2 << 30) -> dict[str, Any]:
    """Build one serialized engine from an ONNX graph whose inputs have a dynamic axis 0 (batch)."""
    logger = _trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only (and default) mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    io: dict[str, Any] = {"inputs": {}, "outputs": {}}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        if any(d < 0 for d in shape[1:]):
            raise InputError(f"{onnx_path.name}: input {t.name} has a dynamic non-batch axis {shape}; "
                             "only the batch axis may be dynamic")
        rest = shape[1:]
        profile.set_shape(t.name, (1, *rest), (opt_batch, *rest), (max_batch, *rest))
        io["inputs"][t.name] = {"shape": [-1, *rest], "dtype": str(t.dtype)}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io["outputs"][t.name] = {"shape": [-1, *tuple(t.shape)[1:]], "dtype": str(t.dtype)}
    config.add_optimization_profile(profile)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    log.info("built %s in %.1f s (%.1f MB)", engine_path.name, time.perf_counter() - t0,
             engine_path.stat().st_size / 1e6)
    return {"file": engine_path.name, "min_batch": 1, "opt_batch": opt_batch, "max_batch": max_batch, **io}


def build_engines(onnx_dir: Path, out: Path, onnx_manifest: dict[str, Any], *, precision: str, max_batch: int,
                  opt_batch: int | None = None, device: int = 0) -> Path:
    """Build a TensorRT engine per graph of an ONNX export directory into `out` (+ manifest.json)."""
    if precision == "int8":
        raise InputError(TRT_INT8_UNSUPPORTED)
    trt = import_tensorrt()
    gpu = gpu_info(device)
    _cuda_check(import_cudart(), import_cudart().cudaSetDevice(device))
    opt_batch = opt_batch or max(1, min(max_batch, 4))
    cache = out / TIMING_CACHE_NAME
    engines = {}
    for name, g in onnx_manifest["graphs"].items():
        log.info("building TensorRT engine %s (%s, batch 1..%d)", name, precision, max_batch)
        engines[name] = build_engine(trt, onnx_dir / g["file"], out / f"{name}.engine", fp16=precision == "fp16",
                                     max_batch=max_batch, opt_batch=min(opt_batch, max_batch), timing_cache=cache)
    manifest = {k: v for k, v in onnx_manifest.items() if k not in ("format", "graphs")}
    manifest.update({"format": ENGINE_MANIFEST_FORMAT, "precision": precision, "tensorrt_version": trt.__version__,
                     "gpu": gpu, "max_batch": max_batch, "engines": engines, "onnx_graphs": onnx_manifest["graphs"]})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# -------------------------------------------------------------------------------------------- run
@dataclass
class _Buffer:
    name: str
    shape: tuple[int, ...]  # with batch = max_batch
    dtype: np.dtype
    device: int  # device pointer
    host: np.ndarray  # pinned host staging buffer

    @property
    def item_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize


class _Engine:
    """One deserialized engine with its context and max-batch buffers."""

    def __init__(self, trt, cudart, runtime, path: Path, max_batch: int):
        self._cudart = cudart
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"TensorRT could not deserialize {path} (built by another version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.max_batch = max_batch
        self.inputs: dict[str, _Buffer] = {}
        self.outputs: dict[str, _Buffer] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = (max_batch, *tuple(self.engine.get_tensor_shape(name))[1:])
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            dev = _cuda_check(cudart, cudart.cudaMalloc(nbytes))
            host_ptr = _cuda_check(cudart, cudart.cudaMallocHost(nbytes))
            host = np.ctypeslib.as_array((ctypes.c_byte * nbytes).from_address(int(host_ptr))).view(dtype)
            buf = _Buffer(name, shape, dtype, int(dev), host.reshape(shape))
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self.inputs if is_input else self.outputs)[name] = buf
            self.context.set_tensor_address(name, int(dev))

    def stage_input(self, name: str, array: np.ndarray, stream) -> None:
        """Host -> device copy of a (B, ...) input through its pinned buffer (asynchronous)."""
        buf, cudart = self.inputs[name], self._cudart
        b = array.shape[0]
        buf.host[:b] = array
        self.context.set_input_shape(name, (b, *buf.shape[1:]))
        _cuda_check(cudart, cudart.cudaMemcpyAsync(buf.device, buf.host.ctypes.data, b * buf.item_bytes,
                                                   cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def execute(self, batch: int, stream) -> dict[str, np.ndarray]:
        cudart = self._cudart
        if not self.context.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the log above)")
        for buf in self.outputs.values():
            _cuda_check(cudart, cudart.cudaMemcpyAsync(buf.host.ctypes.data, buf.device, batch * buf.item_bytes,
                                                       cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        _cuda_check(cudart, cudart.cudaStreamSynchronize(stream))
        return {name: buf.host[:batch].copy() for name, buf in self.outputs.items()}

    def free(self) -> None:
        for buf in (*self.inputs.values(), *self.outputs.values()):
            self._cudart.cudaFree(buf.device)
            self._cudart.cudaFreeHost(buf.host.ctypes.data)
        self.inputs, self.outputs = {}, {}


class TrtAvatar:
    """An avatar's cached tensors, resident on the GPU (one device buffer per generator avatar input)."""

    def __init__(self, cudart, buffers: dict[str, tuple[int, int]], host: dict[str, np.ndarray]):
        self._cudart = cudart
        self.device = buffers  # name -> (device pointer, bytes)
        self.host = host  # name -> (1, ...) numpy copy (for inspection and parity tests)

    def tensors(self):
        import torch  # noqa: PLC0415

        return tuple(torch.from_numpy(a) for a in self.host.values())

    def nbytes(self) -> int:
        return sum(n for _, n in self.device.values())

    def close(self) -> None:
        for ptr, _ in self.device.values():
            self._cudart.cudaFree(ptr)
        self.device = {}

    def __del__(self):  # best effort; the process may be shutting down
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class TrtRuntime:
    """The TensorRT backend: engines from `marionette export --format tensorrt` on an NVIDIA GPU."""

    name = "tensorrt"

    def __init__(self, engine_dir: Path, *, device: int = 0):
        trt, cudart = import_tensorrt(), import_cudart()
        engine_dir = Path(engine_dir)
        mpath = engine_dir / "manifest.json"
        if not mpath.exists():
            raise InputError(f"{engine_dir} has no manifest.json; make one with marionette export --format tensorrt")
        self.manifest = json.loads(mpath.read_text())
        gpu = gpu_info(device)
        for w in check_engine_manifest(self.manifest, trt_version=trt.__version__, gpu_name=gpu["name"],
                                       compute_capability=gpu["compute_capability"]):
            log.warning("%s", w)
        from engine.config import ModelConfig  # noqa: PLC0415

        self.cfg = ModelConfig.from_dict(self.manifest["model_config"])
        self.precision = self.manifest["precision"]
        self.max_batch = int(self.manifest["max_batch"])
        self._gpu = gpu
        self._trt, self._cudart = trt, cudart
        _cuda_check(cudart, cudart.cudaSetDevice(device))
        self._stream = _cuda_check(cudart, cudart.cudaStreamCreate())
        self._runtime = trt.Runtime(_trt_logger(trt))
        self._engines = {name: _Engine(trt, cudart, self._runtime, engine_dir / e["file"], self.max_batch)
                         for name, e in self.manifest["engines"].items()}
        graphs = self.manifest["onnx_graphs"]
        self._avatar_names = [i["name"] for i in graphs["generator"]["inputs"]][1:]  # after z
        self._z_name = graphs["generator"]["inputs"][0]["name"]
        self._frame_name = graphs["generator"]["outputs"][0]["name"]

    # ------------------------------------------------------------------ Backend protocol
    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": f"cuda ({self._gpu['name']}, sm {self._gpu['compute_capability']})",
                "precision": self.precision, "threads": None, "max_batch": self.max_batch,
                "tensorrt": self._trt.__version__}

    def _run(self, graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        eng = self._engines[graph]
        b = next(iter(inputs.values())).shape[0]
        outs: list[dict[str, np.ndarray]] = []
        for s in range(0, b, self.max_batch):  # chunk batches larger than the profile's max
            e = min(b, s + self.max_batch)
            for name, a in inputs.items():
                eng.stage_input(name, np.ascontiguousarray(a[s:e], dtype=eng.inputs[name].dtype), self._stream)
            outs.append(eng.execute(e - s, self._stream))
        return {k: np.concatenate([o[k] for o in outs]) if len(outs) > 1 else outs[0][k] for k in outs[0]}

    def prepare_avatar(self, image) -> TrtAvatar:
        """Portrait (anything load_portrait takes) or an AvatarState -> avatar tensors resident on the GPU."""
        from engine.avatar import AvatarState  # noqa: PLC0415
        from engine.image import load_portrait  # noqa: PLC0415

        if isinstance(image, TrtAvatar):
            return image
        if isinstance(image, AvatarState):
            if image.image_size != self.cfg.image_size:
                raise InputError(f"avatar is {image.image_size}px, this model needs {self.cfg.image_size}px")
            out = {n: t.detach().float().cpu().numpy() for n, t in zip(self._avatar_names, image.tensors())}
        else:
            eng = self._engines["avatar_encoder"]
            (in_name,) = eng.inputs
            out = self._run("avatar_encoder", {in_name: load_portrait(image, self.cfg.image_size).numpy()})
        cudart, dev, host = self._cudart, {}, {}
        for name in self._avatar_names:
            a = np.ascontiguousarray(out[name][:1], dtype=self._engines["generator"].inputs[name].dtype)
            ptr = _cuda_check(cudart, cudart.cudaMalloc(a.nbytes))
            _cuda_check(cudart, cudart.cudaMemcpy(ptr, a.ctypes.data, a.nbytes,
                                                  cudart.cudaMemcpyKind.cudaMemcpyHostToDevice))
            dev[name], host[name] = (int(ptr), a.nbytes), a
        return TrtAvatar(cudart, dev, host)

    late_mouth = False  # the engines hold the generator in one piece (its round is short on a GPU)

    def generate(self, avatars: Sequence[TrtAvatar] | TrtAvatar, z):
        import torch  # noqa: PLC0415

        z = np.ascontiguousarray(z.detach().cpu().numpy() if hasattr(z, "detach") else z, dtype=np.float32)
        if z.ndim == 1:
            z = z[None]
        if z.ndim != 2 or z.shape[1] != self.cfg.latents.total:
            raise InputError(f"z must be (B, {self.cfg.latents.total}), got {tuple(z.shape)}")
        avatars = [avatars] if isinstance(avatars, TrtAvatar) else list(avatars)
        if len(avatars) == 1:
            avatars = avatars * z.shape[0]
        if len(avatars) != z.shape[0]:
            raise InputError(f"got {len(avatars)} avatars for a batch of {z.shape[0]} latents; "
                             "pass one avatar for all rows or one per row")
        if not all(isinstance(a, TrtAvatar) for a in avatars):
            raise InputError("the tensorrt backend generates from avatars it prepared (prepare_avatar)")
        eng, cudart, frames = self._engines["generator"], self._cudart, []
        for s in range(0, z.shape[0], self.max_batch):
            e = min(z.shape[0], s + self.max_batch)
            for name in self._avatar_names:  # gather per-item avatars on the device
                buf = eng.inputs[name]
                for i, av in enumerate(avatars[s:e]):
                    ptr, nbytes = av.device[name]
                    _cuda_check(cudart, cudart.cudaMemcpyAsync(buf.device + i * buf.item_bytes, ptr, nbytes,
                                                               cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                                               self._stream))
                eng.context.set_input_shape(name, (e - s, *buf.shape[1:]))
            eng.stage_input(self._z_name, z[s:e], self._stream)
            frames.append(eng.execute(e - s, self._stream)[self._frame_name])
        out = frames[0] if len(frames) == 1 else np.concatenate(frames)
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def encode_audio(self, mel_windows):
        import torch  # noqa: PLC0415

        mel = mel_windows.detach().cpu().numpy() if hasattr(mel_windows, "detach") else np.asarray(mel_windows)
        (name,) = self._engines["audio_encoder"].inputs
        (out,) = self._run("audio_encoder", {name: mel}).values()
        return torch.from_numpy(out.astype(np.float32, copy=False))

    def encode_motion(self, frames01, mirror: bool | None = None):
        import torch  # noqa: PLC0415

        x = frames01.detach().cpu().numpy() if hasattr(frames01, "detach") else np.asarray(frames01)
        (name,) = self._engines["motion_encoder"].inputs

        def read(a):
            out = self._run("motion_encoder", {name: np.ascontiguousarray(a)})
            return {k: torch.from_numpy(v.astype(np.float32, copy=False)) for k, v in out.items()}

        res = read(x)
        if self.cfg.motion_mirror if mirror is None else mirror:  # engine.model.mirror_mean: 2 x E_mot
            from engine.model import mirror_mean  # noqa: PLC0415

            res = mirror_mean(res, read(x[..., ::-1]))
        return res

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        for b in batch_sizes:
            for name, eng in self._engines.items():
                inputs = {n: np.zeros((min(b, self.max_batch), *buf.shape[1:]), buf.dtype)
                          for n, buf in eng.inputs.items()}
                self._run(name, inputs)

    def close(self) -> None:
        for eng in self._engines.values():
            eng.free()
        self._engines = {}
        if self._stream is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None
