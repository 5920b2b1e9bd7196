"""The `Backend` protocol every runtime implements, and `open_backend`, the one way to get one.

    backend = open_backend("onnxruntime", checkpoint=ckpt)          # exports to a cache on first use
    avatar = backend.prepare_avatar("face.png")                     # once per portrait
    frames = backend.generate([avatar] * 4, z)                       # (4,3,S,S) float32 in [0,1], CPU
    lips = backend.encode_audio(mel_windows)                         # (B, lip)

Backends: "torch" (engine.runtimes.torch_runtime.TorchRuntime, the reference; CPU or CUDA),
"onnxruntime" (engine.runtimes.ort.OrtRuntime, the CPU default), "tensorrt"
(engine.runtimes.tensorrt_runtime.TrtRuntime, NVIDIA GPUs).
Avatars are backend-specific handles: pass a backend only the avatars it prepared (torch and onnxruntime
both use `AvatarState`, so theirs are interchangeable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from engine.config import ModelConfig
from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
AUTO = "auto"  # the fastest backend this machine has (choose_backend)
PRECISIONS = ("fp32", "fp16", "int8")
CACHE_ENV = "MARIONETTE_CACHE_DIR"


@runtime_checkable
class Backend(Protocol):
    """What render and the server call. Every tensor returned is float32 on the CPU."""

    cfg: ModelConfig

    def prepare_avatar(self, image: Any) -> Any:
        """Portrait (path, bytes, PIL image, array, tensor in [0,1]) -> cached per-avatar state (E_app, once)."""

    def generate(self, avatars: Any, z: Any) -> torch.Tensor:
        """z (B, latents.total) with one avatar for every row or one per row -> (B,3,S,S) in [0,1]."""

    def encode_audio(self, mel_windows: Any) -> torch.Tensor:
        """(B, n_mels, mel_window) log-mel windows -> lip latents (B, lip)."""

    def encode_motion(self, frames: Any, mirror: bool | None = None) -> dict[str, torch.Tensor]:
        """Driving frames (B,3,S,S) in [0,1] -> {"lip", "pose", "eye", "exp"} latents; `mirror` (default:
        `cfg.motion_mirror`): each frame read with its mirror image too (2 x E_mot)."""

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run every per-frame path once per batch size, so the first real frame is not slow."""

    def describe(self) -> dict[str, Any]:
        """{"name", "device", "precision", "threads", ...} for logs, /stats and benchmarks."""


class TorchBackend:
    """TorchRuntime with `describe()` (everything else is the runtime's own)."""

    name = "torch"

    def __init__(self, runtime, precision: str):
        self.runtime = runtime
        self.precision = precision

    def __getattr__(self, item: str):
        return getattr(self.runtime, item)

    @property
    def cfg(self) -> ModelConfig:
        return self.runtime.cfg

    def prepare_avatar(self, image):
        return self.runtime.prepare_avatar(image)

    def generate(self, avatars, z):
        return self.runtime.generate(avatars, z)

    def encode_audio(self, mel_windows):
        return self.runtime.encode_audio(mel_windows)

    def encode_motion(self, frames, mirror: bool | None = None):
        return self.runtime.encode_motion(frames, mirror)

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        self.runtime.warmup(batch_sizes)

    def describe(self) -> dict[str, Any]:
        dev = self.runtime.device
        return {"name": self.name, "device": str(dev), "precision": self.precision,
                "threads": torch.get_num_threads() if dev.type == "cpu" else None, "torch": torch.__version__}


def read_driving(backend: Backend, frames: Any) -> dict[str, torch.Tensor]:
    """Driving frames (B,3,S,S) in [0,1] read offline (`render --pose-from`, `evaluate`) -> {"lip", "pose", "eye",
    "exp"}: `backend.encode_motion` (with its mirror default) at every view of `ModelConfig.driving_jitter_px` and
    `driving_zoom` (`engine.model.reading_views`), each view's reading mapped back and the views averaged; one
    reading where both are 0. The live webcam path does not come here: its frame has one E_mot pass."""
    from engine.model import reading_views, unview_state, view_frames  # noqa: PLC0415

    cfg = backend.cfg
    views = reading_views(cfg.driving_jitter_px, cfg.driving_zoom)
    if len(views) == 1:
        return backend.encode_motion(frames)
    f = torch.as_tensor(frames, dtype=torch.float32)
    if f.dim() == 3:
        f = f.unsqueeze(0)
    b = f.shape[0]
    parts = [backend.encode_motion(view_frames(f, [v])) for v in views]  # a view at a time: memory stays B frames
    stacked = {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}
    return unview_state(stacked, views, b)


# ---------------------------------------------------------------------------------------- opening
def open_backend(name: str, *, checkpoint: Path | None = None, config: str = "lite", seed: int = 0,
                 exported: Path | None = None, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, model: tuple[Any, dict] | None = None,
                 kernels: bool = False) -> Backend:
    """A ready backend by name; for a model with `ModelConfig.avatar_jaw_map`, wrapped so that each avatar gets
    its jaw map (`engine.jaw_map.calibrated`). The arguments are `_open_backend`'s."""
    from engine.jaw_map import calibrated  # noqa: PLC0415

    return calibrated(_open_backend(name, checkpoint=checkpoint, config=config, seed=seed, exported=exported,
                                    device=device, precision=precision, threads=threads, model=model,
                                    kernels=kernels), checkpoint)


def _open_backend(name: str, *, checkpoint: Path | None = None, config: str = "lite", seed: int = 0,
                  exported: Path | None = None, device: str = "cpu", precision: str = "fp32",
                  threads: int | None = None, model: tuple[Any, dict] | None = None,
                  kernels: bool = False) -> Backend:
    """A ready backend by name.

    checkpoint/config/seed: the model (engine.checkpoint.load_model: a checkpoint directory, else the
    built-in one, else random weights of `config`). exported: an `marionette export` directory to run
    (onnxruntime: --format onnx; tensorrt: --format tensorrt); onnxruntime exports to a cache directory
    ($MARIONETTE_CACHE_DIR or ~/.cache/marionette/onnx) on first use when it is None. device: "cpu",
    "cuda", "cuda:N". precision: fp32 | fp16 | int8 (what each backend offers differs; the error says).
    threads: CPU threads (onnxruntime: its sessions' intra-op pool, default physical cores; torch:
    torch.set_num_threads, which is process-wide). model: an already loaded (model, meta) from
    engine.checkpoint.load_model, used instead of loading checkpoint/config/seed again (torch takes
    ownership of it: it is moved to the device and put in eval mode). kernels: the torch backend on CUDA
    runs G's warps through the fused Triton kernels (`kernels.warp`; opt-in, needs triton)."""
    if name == AUTO:
        name, device = choose_backend(name)
        if name == "tensorrt" and exported is None:
            name = "torch"  # TensorRT runs an exported engine (`marionette export --format tensorrt`)
        log.info("backend auto: %s on the %s", name, "CPU" if device == "cpu" else "GPU")
        if name == "onnxruntime" and exported is None:
            try:
                return _open_ort(checkpoint, config, seed, exported, device, precision, threads, model)
            except (MissingDependency, InputError, RuntimeError, OSError) as e:  # auto always gives a backend
                log.warning("backend auto: onnxruntime could not run this model (%s); using torch", e)
                name = "torch"
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; valid: {AUTO}, {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be a positive number, got {threads}")
    if name == "torch":
        return _open_torch(checkpoint, config, seed, exported, device, precision, threads, model, kernels)
    if name == "onnxruntime":
        if kernels:
            raise InputError("kernels are a torch-backend option (CUDA); onnxruntime runs its own")
        return _open_ort(checkpoint, config, seed, exported, device, precision, threads, model)
    if kernels:
        raise InputError(f"kernels are a torch-backend option (CUDA); the {name} backend has its own")
    return _open_trt(checkpoint, exported, device, precision)


def choose_backend(name: str, device: str | None = None) -> tuple[str, str]:
    """(backend, device) for a backend name that may be "auto": on an NVIDIA GPU TensorRT when it is
    installed, else torch on CUDA; on a CPU onnxruntime when it is installed (0.74x torch's time per frame
    on 2 cores, benchmarks/results/backends.json), else torch. Named backends get their natural device
    (onnxruntime: cpu; tensorrt: cuda; torch: cuda when there is one) unless `device` says otherwise."""
    import importlib.util  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    if name == AUTO:
        if device is not None and _torch_device_type(device) == "cpu":
            cuda = False
        if cuda:
            name = "tensorrt" if importlib.util.find_spec("tensorrt") is not None else "torch"
        else:
            name = "onnxruntime" if importlib.util.find_spec("onnxruntime") is not None else "torch"
        log.debug("backend auto: %s (%s)", name, "NVIDIA GPU" if cuda else "CPU")
    elif name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; valid: {AUTO}, {', '.join(BACKENDS)}")
    if device is None:
        device = {"onnxruntime": "cpu", "tensorrt": "cuda"}.get(name, "cuda" if cuda else "cpu")
    return name, device


def _load(checkpoint, config, seed, model):
    if model is not None:
        return model
    from engine.checkpoint import load_model  # noqa: PLC0415

    return load_model(checkpoint, config=config, seed=seed)


def _open_torch(checkpoint, config, seed, exported, device, precision, threads, model, kernels=False) -> Backend:
    from engine.runtimes.torch_runtime import TorchRuntime  # noqa: PLC0415

    if exported is not None:
        raise InputError("the torch backend runs checkpoints, not exported graphs; drop `exported` or use "
                         "backend onnxruntime / tensorrt")
    dev = _torch_device(device)
    if precision == "int8":
        raise InputError("the torch backend has no int8 path; use fp32, fp16 (CUDA) or backend onnxruntime "
                         "with an int8 export")
    if precision == "fp16" and dev.type != "cuda":
        raise InputError("fp16 torch runs on CUDA only (CPU half-precision convolutions are slow); use "
                         "device='cuda' or precision='fp32'")
    if threads is not None:
        torch.set_num_threads(threads)
    net, _ = _load(checkpoint, config, seed, model)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    if kernels and dev.type != "cuda":
        raise InputError("the fused kernels run on CUDA only; drop kernels or use device='cuda'")
    return TorchBackend(TorchRuntime(net, device=dev, dtype=dtype, kernels=kernels or None), precision)


def _torch_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r} ({e}); valid: cpu, cuda, cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but this torch build sees no CUDA GPU")
    return dev


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "marionette"


def _source_digest() -> str:
    """Code that shapes an exported graph: a change in any of these files invalidates cached exports."""
    engine_dir = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in ("networks.py", "model.py", "geometry.py", "runtimes/export.py", "config.py"):
        p = engine_dir / f
        h.update(p.read_bytes() if p.exists() else b"")
    return h.hexdigest()


def _model_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(model, precision: str) -> Path:
    """Where the cached ONNX export of `model` lives: keyed by the weights, the code that shapes the graphs,
    the precision and the exporter versions, so any change makes a new export."""
    from engine.runtimes.export import exporter_versions  # noqa: PLC0415

    key = hashlib.sha256(json.dumps({
        "weights": _model_digest(model), "code": _source_digest(), "precision": precision,
        "config": model.cfg.to_dict(), "versions": exporter_versions()}, sort_keys=True).encode()).hexdigest()[:20]
    return cache_root() / "onnx" / f"{model.cfg.name}-{precision}-{key}"


def cached_export(model, meta: dict, *, config: str, seed: int, precision: str) -> Path:
    """The ONNX export of `model` from the cache, made now if absent."""
    from engine.runtimes.export import MANIFEST, ExportConfig, export_model  # noqa: PLC0415

    out = cache_path(model, precision)
    if (out / MANIFEST).is_file():
        log.info("using the cached ONNX export %s", out)
        return out
    log.info("exporting the model to ONNX once (cached in %s) ...", out)
    return export_model(model, meta, ExportConfig(config=config, format="onnx", out=out, precision=precision,
                                                  overwrite=True, seed=seed))


def _open_ort(checkpoint, config, seed, exported, device, precision, threads, model) -> Backend:
    from engine.runtimes.ort import OrtRuntime, _import_ort  # noqa: PLC0415

    _import_ort()
    if _torch_device_type(device) != "cpu":
        raise InputError(f"the onnxruntime backend runs on the CPU (device {device!r} asked for); for a GPU use "
                         "backend torch (device cuda) or tensorrt")
    if exported is None:
        net, meta = _load(checkpoint, config, seed, model)
        exported = cached_export(net, meta, config=config, seed=seed, precision=precision)
    else:
        from engine.runtimes.export import checkpoint_hash, read_manifest  # noqa: PLC0415

        manifest = read_manifest(Path(exported))
        have = manifest.get("precision", "fp32")
        if precision != have and precision != "fp32":
            raise InputError(f"{exported} holds a {have} export, {precision} asked for; export it again with "
                             f"--precision {precision}")
        if checkpoint is not None:
            want = checkpoint_hash({"checkpoint": str(checkpoint)}, config, seed)
            if manifest.get("checkpoint_hash") != want:
                raise InputError(f"{exported} was exported from another checkpoint "
                                 f"({manifest.get('checkpoint_hash')}) than {checkpoint} ({want})")
            _same_config(manifest, checkpoint, exported)
    return OrtRuntime(Path(exported), threads=threads)


def _same_config(manifest: dict, checkpoint, exported) -> None:
    """The export's model config is the checkpoint's: config-only changes (a jaw calibration, where the anchors come
    from) leave the weights, and so the checkpoint hash, as they were."""
    from engine.checkpoint import read_checkpoint_config  # noqa: PLC0415
    from engine.config import ModelConfig  # noqa: PLC0415

    have = manifest.get("model_config")
    if have is not None and ModelConfig.from_dict(have) != read_checkpoint_config(Path(checkpoint))[0]:
        raise InputError(f"{exported} was exported with another model config than {checkpoint} has now (a "
                         "recalibrated or reconfigured checkpoint): export it again")


def _torch_device_type(device: str) -> str:
    d = str(device).split(":")[0]
    if d not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {device!r}; valid: cpu, cuda, cuda:N")
    return d


def _open_trt(checkpoint, exported, device, precision) -> Backend:
    from engine.runtimes.tensorrt_runtime import TrtRuntime, import_cudart, import_tensorrt  # noqa: PLC0415

    import_tensorrt(), import_cudart()  # MissingDependency with the pip command where they are absent
    if _torch_device_type(device) != "cuda":
        raise InputError(f"the tensorrt backend runs on an NVIDIA GPU; pass device='cuda' (got {device!r})")
    if exported is None:
        raise InputError("the tensorrt backend needs engines built on this machine: marionette export "
                         "--format tensorrt --out DIR, then pass exported=DIR")
    rt = TrtRuntime(Path(exported), device=int(str(device).split(":")[1]) if ":" in str(device) else 0)
    if precision != "fp32" and precision != rt.precision:
        raise InputError(f"{exported} holds {rt.precision} engines, {precision} asked for")
    if checkpoint is not None:
        from engine.runtimes.export import checkpoint_hash  # noqa: PLC0415

        want = checkpoint_hash({"checkpoint": str(checkpoint)}, "", 0)
        if rt.manifest.get("checkpoint_hash") != want:
            raise InputError(f"{exported} was built from another checkpoint than {checkpoint}")
        _same_config(rt.manifest, checkpoint, exported)
    return rt


__all__ = ["Backend", "BACKENDS", "TorchBackend", "open_backend", "read_driving", "cached_export", "cache_path", "cache_root"]
