"""Guarded, lazy Triton import and the dispatch rule every kernel wrapper shares.

Nothing here imports triton at module import time. Interpreter mode (``TRITON_INTERPRET=1``) is decided by
Triton when it is first imported (``@triton.jit`` then returns an interpreted function that runs on CPU
tensors with numpy); it is process-wide, so set the variable before anything imports triton.

Dispatch (``choose``), for ``impl="auto"``:
  * CUDA tensors, triton importable, not interpreting -> the compiled Triton kernel;
  * CPU tensors while interpreting                    -> the Triton kernel, interpreted (tests, debugging);
  * anything else, or autograd recording              -> the pure-PyTorch reference.
``impl="triton"`` forces the kernel (raises when it cannot run), ``impl="reference"`` the reference.
Each (kernel, choice, device) is logged once.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Any

import torch

log = logging.getLogger("kernels")

IMPLS = ("auto", "triton", "reference")
INSTALL_HINT = "install Triton: pip install 'marionette[gpu]' (or pip install triton)"
_TRUE = ("1", "true", "on", "yes")


@lru_cache(maxsize=1)
def _import() -> tuple[Any, Any] | None:
    try:
        import triton  # noqa: PLC0415
        import triton.language as tl  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken install (missing libcuda, ...)
        log.debug("triton unavailable: %s", e)
        return None
    return triton, tl


def available() -> bool:
    """True when triton imports (compiled kernels additionally need a CUDA device)."""
    return _import() is not None


def require_triton() -> tuple[Any, Any]:
    """(triton, triton.language), or ImportError naming what to install."""
    mods = _import()
    if mods is None:
        raise ImportError(f"the Triton kernels need the triton package; {INSTALL_HINT}")
    return mods


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1 when triton was imported)."""
    mods = _import()
    knobs = getattr(mods[0], "knobs", None) if mods is not None else None
    if knobs is not None:  # triton >= 3.4
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE


@lru_cache(maxsize=None)
def log_once(level: int, msg: str) -> None:
    """Log `msg` the first time it is seen (lru_cache keeps the set of messages already logged)."""
    log.log(level, msg)


def choose(name: str, impl: str, *tensors: torch.Tensor | None) -> bool:
    """True: run the Triton kernel `name`; False: run its reference. See the module doc for the rule."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    ts = [t for t in tensors if t is not None]
    device = ts[0].device
    if impl == "reference":
        return False
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in ts)
    if impl == "triton":
        if grad:
            raise RuntimeError(f"kernels.{name}: the Triton kernel is forward-only; call it without autograd "
                               "(torch.no_grad / inference_mode) or use impl='reference'")
        require_triton()
        if device.type == "cpu" and not interpreting():
            raise RuntimeError(f"kernels.{name}: CPU tensors need Triton's interpreter; set TRITON_INTERPRET=1 "
                               "before triton is imported")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"kernels.{name}: unsupported device {device}")
        return True
    if grad:
        log_once(logging.INFO, f"kernels.{name}: PyTorch reference (autograd is recording; kernels are forward-only)")
        return False
    if device.type == "cuda" and available() and not interpreting():
        log_once(logging.INFO, f"kernels.{name}: Triton kernel on {device.type}")
        return True
    if device.type == "cpu" and interpreting() and available():
        log_once(logging.INFO, f"kernels.{name}: Triton kernel in interpreter mode on cpu (TRITON_INTERPRET=1)")
        return True
    why = "triton not installed" if device.type == "cuda" and not available() else f"{device.type} tensors"
    log_once(logging.INFO, f"kernels.{name}: PyTorch reference ({why})")
    return False
