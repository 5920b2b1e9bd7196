"""`AvatarState`: what E_app computes once per portrait and G reads every frame."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class AvatarState:
    """The cached per-avatar tensors, in the generator's argument order after z.

    source  (1, 3, S, S)        portrait in [-1, 1]
    feat_hi (1, C1, S/2, S/2)   E_app features
    feat_lo (1, C2, S/4, S/4)   E_app features
    app     (1, app_dim)        E_app appearance vector

    All four live on one device with one dtype (the runtime's). ~3.9 MB for `lite` at 256^2 in fp32.
    Compared by identity (tensors have no useful ==).

    face: for an avatar made from a photograph, its `engine.face.FacePortrait` (the alignment transform
    and the compositor that pastes frames back into the photo); None for a portrait used as it is.
    jaw_map: its `engine.jaw_map.JawMap` (how far to command G's jaw for this portrait's mouth to open as
    asked), measured by a runtime with `ModelConfig.avatar_jaw_map`; None: the commanded jaw as it is.
    """

    source: torch.Tensor
    feat_hi: torch.Tensor
    feat_lo: torch.Tensor
    app: torch.Tensor
    face: Any = None
    jaw_map: Any = None

    def __post_init__(self) -> None:
        for name in ("source", "feat_hi", "feat_lo", "app"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"AvatarState.{name} must be a tensor, got {type(t).__name__}")
            if t.shape[0] != 1:
                raise ValueError(f"AvatarState.{name} must have batch size 1, got shape {tuple(t.shape)}")
        if self.source.dim() != 4 or self.source.shape[1] != 3 or self.source.shape[2] != self.source.shape[3]:
            raise ValueError(f"AvatarState.source must be (1,3,S,S), got {tuple(self.source.shape)}")

    @property
    def image_size(self) -> int:
        return int(self.source.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def dtype(self) -> torch.dtype:
        return self.source.dtype

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(source, feat_hi, feat_lo, app): G's arguments after z."""
        return (self.source, self.feat_hi, self.feat_lo, self.app)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "AvatarState":
        return AvatarState(*(t.to(device=device, dtype=dtype) for t in self.tensors()), face=self.face,
                           jaw_map=self.jaw_map)

    def expand(self, batch: int) -> tuple[torch.Tensor, ...]:
        """The tensors broadcast to `batch` rows (views, no copy): one avatar for every row."""
        return tuple(t.expand(batch, *t.shape[1:]) for t in self.tensors())

    @staticmethod
    def stack(avatars: Sequence["AvatarState"]) -> tuple[torch.Tensor, ...]:
        """Per-row avatars -> G's avatar arguments batched along dim 0 (row i is avatars[i])."""
        if not avatars:
            raise ValueError("AvatarState.stack needs at least one avatar")
        first = avatars[0]
        for a in avatars[1:]:
            for x, y in zip(a.tensors(), first.tensors()):
                if x.shape != y.shape or x.device != y.device or x.dtype != y.dtype:
                    raise ValueError(
                        "avatars to stack differ in shape, device or dtype "
                        f"({tuple(x.shape)} {x.device} {x.dtype} vs {tuple(y.shape)} {y.device} {y.dtype})")
        if len(avatars) == 1:
            return first.tensors()
        return tuple(torch.cat(ts, dim=0) for ts in zip(*(a.tensors() for a in avatars)))
