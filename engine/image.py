"""Portrait loading and validation.

`load_portrait` takes a file path, encoded bytes (PNG, JPEG or any format PIL reads), a PIL image, a numpy
array or a tensor and returns a (1, 3, size, size) float32 tensor in [0, 1]:

* EXIF orientation is applied;
* transparency (RGBA, LA, palette with transparency) is composited over neutral mid grey (BACKGROUND,
  128/255), the colour the corpus' plain backgrounds average to and the least surprising under a
  head that moves;
* grey, palette, CMYK, 16-bit and float images become RGB;
* the image is centre-cropped to a square (the short side) and resized with Lanczos;
* unreadable input and images smaller than MIN_SIDE pixels on the short side raise InputError.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch

from engine.errors import InputError

MIN_SIDE = 64
BACKGROUND = (128, 128, 128)
BUILTIN_AVATAR = Path(__file__).resolve().parent / "assets" / "avatar.png"  # the default portrait

# str | Path | bytes | PIL.Image.Image | np.ndarray | torch.Tensor (PIL is imported lazily)
PortraitSource = Union[str, Path, bytes, bytearray, memoryview, np.ndarray, torch.Tensor, object]


def _describe(src: object) -> str:
    if isinstance(src, (str, Path)):
        return f"image {str(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    return f"image ({type(src).__name__})"


def _open(src: object):
    from PIL import Image, UnidentifiedImageError

    what = _describe(src)
    if isinstance(src, Image.Image):
        try:
            src.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{what} cannot be decoded (truncated or corrupt: {e})") from None
        return src
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.exists():
            raise InputError(f"{what} does not exist")
        if not p.is_file():
            raise InputError(f"{what} is not a file")
        try:
            data = p.read_bytes()
        except OSError as e:
            raise InputError(f"{what} cannot be read: {e}") from None
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        raise InputError(f"unsupported portrait type {type(src).__name__}; pass a path, bytes, "
                         "a PIL image or a numpy array")
    if not data:
        raise InputError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"{what} is not a readable image (truncated or corrupt: {e})") from None
    return img


def _to_rgb(img, what: str):
    """Any PIL mode -> 8-bit RGB, transparency composited over BACKGROUND."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        a = np.asarray(img).astype(np.float64)
        top = 1.0 if a.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, BACKGROUND + (255,))
        return Image.alpha_composite(bg, img).convert("RGB")
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise InputError(f"{what} has an unsupported pixel format {img.mode!r}: {e}") from None
    return img


def _array_to_pil(arr: np.ndarray, what: str):
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise InputError(f"{what} must be HxW, HxWx1, HxWx3 or HxWx4, got shape {a.shape}")
    if a.dtype == np.uint8:
        u8 = a
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InputError(f"{what} contains NaN or infinite values")
        u8 = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.uint16:
        u8 = (a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    elif a.dtype == np.bool_:
        u8 = a.astype(np.uint8) * 255
    else:
        raise InputError(f"{what} has unsupported dtype {a.dtype} (use uint8, uint16 or float in [0, 1])")
    return Image.fromarray(np.ascontiguousarray(u8))  # L, RGB or RGBA from the shape


def _tensor_portrait(t: torch.Tensor, size: int) -> torch.Tensor:
    x = t.detach().to(device="cpu", dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] not in (1, 3):
        raise InputError(f"portrait tensor must be (3,H,W) or (1,3,H,W) in [0, 1], got {tuple(t.shape)}")
    if not torch.isfinite(x).all():
        raise InputError("portrait tensor contains NaN or infinite values")
    if x.shape[1] == 1:
        x = x.expand(1, 3, *x.shape[2:])
    h, w = x.shape[2:]
    if min(h, w) < MIN_SIDE:
        raise InputError(f"portrait is too small ({w}x{h}); the short side must be at least {MIN_SIDE} px")
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, :, top:top + s, left:left + s]
    if s != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                            antialias=True)
    return x.clamp(0.0, 1.0).contiguous()


def load_portrait(src: PortraitSource, size: int) -> torch.Tensor:
    """Portrait -> (1, 3, size, size) float32 in [0, 1] (see the module docstring for the rules)."""
    from PIL import Image

    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if isinstance(src, torch.Tensor):
        return _tensor_portrait(src, size)
    img, what = _open_upright(src)
    w, h = img.size
    img = _to_rgb(img, what)
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    if s != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    a = np.asarray(img, dtype=np.float32) / 255.0  # (size, size, 3)
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def _open_upright(src) -> tuple:
    """A path / bytes / array -> (PIL image upright by its EXIF, first frame; a description), MIN_SIDE checked."""
    from PIL import ImageOps

    what = _describe(src)
    img = _array_to_pil(src, what) if isinstance(src, np.ndarray) else _open(src)
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        pass
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"{what} is too small ({w}x{h}); the short side must be at least {MIN_SIDE} px")
    return img, what


def load_rgb(src: PortraitSource) -> np.ndarray:
    """A photograph at its own resolution -> (H, W, 3) uint8 RGB, with load_portrait's rules (EXIF
    orientation, transparency over BACKGROUND, any pixel format to RGB, MIN_SIDE); no crop, no resize.
    Tensors are (3,H,W) or (1,3,H,W) in [0, 1]. What engine.face detects and aligns faces in."""
    if isinstance(src, torch.Tensor):
        x = src.detach().to(device="cpu", dtype=torch.float32)
        if x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise InputError(f"photo tensor must be (3,H,W) or (1,3,H,W) in [0, 1], got {tuple(src.shape)}")
        src = x.expand(3, *x.shape[1:]).permute(1, 2, 0).numpy()
    img, what = _open_upright(src)
    w, h = img.size
    return np.ascontiguousarray(np.asarray(_to_rgb(img, what), dtype=np.uint8))
