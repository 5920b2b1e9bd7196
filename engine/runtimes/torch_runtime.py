"""`TorchRuntime`: the reference backend (torch eager, CPU or CUDA, any float dtype).

Backend protocol shared with the ONNX Runtime / TensorRT backends: `prepare_avatar`, `generate`,
`encode_audio`, `encode_motion`, `warmup`, `cfg`. Images cross this boundary in [0, 1] (the networks
work in [-1, 1]); everything returned is float32 on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from engine.avatar import AvatarState
from engine.config import ModelConfig
from engine.errors import InputError, MissingDependency
from engine.image import load_portrait
from engine.model import Marionette

log = logging.getLogger(__name__)


class TorchRuntime:
    """Runs a `Marionette` with torch. Takes ownership of the model: moves it to `device`/`dtype` and puts
    it in eval mode (pass a copy if you keep training it)."""

    name = "torch"

    def __init__(self, model: Marionette, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 kernels: bool | None = None):
        """kernels: route G's warps through the fused Triton kernels (kernels.warp). None (default) = off:
        the kernels are opt-in until `benchmarks/kernel_speed.py` has shown them faster end to end on a GPU
        (status: kernels/__init__.py). True without triton raises MissingDependency."""
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type, got {dtype}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.kernels = self._want_kernels(kernels)
        self.model.generator.use_kernels = self.kernels

    def _want_kernels(self, kernels: bool | None) -> bool:
        from kernels import _triton  # noqa: PLC0415 (does not import triton itself)

        if kernels is None:
            kernels = False
            if self.device.type == "cuda":
                log.info("TorchRuntime: fused Triton kernels off (opt-in with kernels=True: not yet measured "
                         "faster end to end on a GPU)")
        elif kernels and not _triton.available():
            raise MissingDependency(f"TorchRuntime(kernels=True) needs Triton; {_triton.INSTALL_HINT}")
        return bool(kernels)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype, non_blocking=True)

    @staticmethod
    def _out(x: torch.Tensor) -> torch.Tensor:
        return x.to(device="cpu", dtype=torch.float32)

    # ---- per avatar
    def prepare_avatar(self, image) -> AvatarState:
        """Portrait (anything `load_portrait` accepts, or an AvatarState, returned moved to this runtime)
        -> cached avatar tensors on this runtime's device and dtype. Runs E_app once."""
        if isinstance(image, AvatarState):
            if image.image_size != self.cfg.image_size:
                raise InputError(f"avatar is {image.image_size}px, this model needs {self.cfg.image_size}px")
            return image.to(self.device, self.dtype)
        img = load_portrait(image, self.cfg.image_size)  # (1,3,S,S) in [0,1]
        with torch.inference_mode():
            source = self._in(img) * 2 - 1
            feat_hi, feat_lo, app = self.model.encode_avatar(source)
        return AvatarState(source=source, feat_hi=feat_hi, feat_lo=feat_lo, app=app)

    # ---- per frame
    def _avatar_args(self, avatars: AvatarState | Sequence[AvatarState], batch: int) -> tuple[torch.Tensor, ...]:
        if isinstance(avatars, AvatarState):
            avatars = [avatars]
        avatars = list(avatars)
        if not avatars:
            raise InputError("generate needs at least one avatar")
        for a in avatars:
            if not isinstance(a, AvatarState):
                raise InputError(f"expected AvatarState, got {type(a).__name__}")
            if a.image_size != self.cfg.image_size:
                raise InputError(f"avatar is {a.image_size}px, this model needs {self.cfg.image_size}px")
        avatars = [a if (a.device == self.device and a.dtype == self.dtype) else a.to(self.device, self.dtype)
                   for a in avatars]
        if len(avatars) == 1:
            return avatars[0].expand(batch)
        if len(avatars) != batch:
            raise InputError(f"got {len(avatars)} avatars for a batch of {batch} latents; "
                             "pass one avatar for all rows or one per row")
        return AvatarState.stack(avatars)

    def generate(self, avatars: AvatarState | Sequence[AvatarState], z: torch.Tensor) -> torch.Tensor:
        """z (B, latents.total); one avatar for all rows or one per row -> (B,3,S,S) float32 in [0,1] on CPU."""
        z = self._z(z)
        args = self._avatar_args(avatars, z.shape[0])
        with torch.inference_mode():
            out = self.model(self._in(z), *args)
            return self._out((out + 1) * 0.5).clamp_(0.0, 1.0)

    # ---- the frame in two phases: the body ahead of the audio, the mouth last (streaming.scheduler)
    @property
    def late_mouth(self) -> bool:
        """Whether the model makes its mouth in a phase of its own (patch models: Generator.body / .mouth)."""
        return self.model.generator.patch is not None

    def generate_body(self, avatars: AvatarState | Sequence[AvatarState], z: torch.Tensor) -> tuple:
        """The frame without the mouth net's change, from a provisional z -> an opaque tuple for
        `generate_mouth`; with the same z, body + mouth = `generate`."""
        z = self._z(z)
        args = self._avatar_args(avatars, z.shape[0])
        with torch.inference_mode():
            return self.model.generator.body(self._in(z), *args)

    def generate_mouth(self, body: tuple, avatars: AvatarState | Sequence[AvatarState], z: torch.Tensor
                       ) -> torch.Tensor:
        """`generate_body`'s result and the final z -> (B,3,S,S) float32 in [0,1] on CPU."""
        z = self._z(z)
        app = self._avatar_args(avatars, z.shape[0])[-1]
        with torch.inference_mode():
            out = self.model.generator.mouth(*body, self._in(z), app)
            return self._out((out + 1) * 0.5).clamp_(0.0, 1.0)

    def _z(self, z) -> torch.Tensor:
        z = torch.as_tensor(z)
        total = self.cfg.latents.total
        if z.dim() == 1:
            z = z.unsqueeze(0)
        if z.dim() != 2 or z.shape[1] != total:
            raise InputError(f"z must be (B, {total}), got {tuple(z.shape)}")
        return z

    def encode_audio(self, mel_windows: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, mel_window) log-mel -> lip latents (B, lip) float32 on CPU."""
        m = torch.as_tensor(mel_windows)
        want = (self.cfg.audio.n_mels, self.cfg.mel_window)
        if m.dim() == 2:
            m = m.unsqueeze(0)
        if m.dim() != 3 or tuple(m.shape[1:]) != want:
            raise InputError(f"mel windows must be (B, {want[0]}, {want[1]}), got {tuple(m.shape)}")
        with torch.inference_mode():
            return self._out(self.model.encode_audio(self._in(m)))

    def encode_motion(self, frames: torch.Tensor, mirror: bool | None = None) -> dict[str, torch.Tensor]:
        """Driving frames (B,3,S,S) in [0,1] -> {"lip", "pose", "eye", "exp"} float32 on CPU; `mirror` (default:
        `cfg.motion_mirror`): read each frame's mirror image too (engine.model.mirror_mean, 2 x E_mot)."""
        f = torch.as_tensor(frames)
        s = self.cfg.image_size
        if f.dim() == 3:
            f = f.unsqueeze(0)
        if f.dim() != 4 or tuple(f.shape[1:]) != (3, s, s):
            raise InputError(f"driving frames must be (B, 3, {s}, {s}) in [0, 1], got {tuple(f.shape)}")
        with torch.inference_mode():
            out = self.model.encode_motion(self._in(f) * 2 - 1,
                                           mirror=self.cfg.motion_mirror if mirror is None else mirror)
            return {k: self._out(v) for k, v in out.items()}

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Runs every per-frame path once per batch size (allocator, kernels, lazy init)."""
        s = self.cfg.image_size
        avatar = self.prepare_avatar(torch.full((1, 3, s, s), 0.5))
        for b in batch_sizes:
            self.generate(avatar, torch.zeros(b, self.cfg.latents.total))
            self.encode_audio(torch.zeros(b, self.cfg.audio.n_mels, self.cfg.mel_window))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def to_uint8_hwc(frames: torch.Tensor) -> np.ndarray:
    """(B,3,S,S) in [0,1] -> (B,S,S,3) uint8 (rounded, clamped)."""
    f = frames.detach()
    if f.dim() == 3:
        f = f.unsqueeze(0)
    if f.dim() != 4 or f.shape[1] != 3:
        raise ValueError(f"frames must be (B,3,H,W), got {tuple(frames.shape)}")
    f = f.to(device="cpu", dtype=torch.float32)
    u8 = (f.clamp(0.0, 1.0) * 255.0).round_().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()
