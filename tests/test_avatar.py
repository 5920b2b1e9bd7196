"""Portrait loading/validation and the AvatarState cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from engine.avatar import AvatarState
from engine.config import ModelConfig
from engine.errors import InputError
from engine.image import BACKGROUND, load_portrait
from engine.model import Marionette
from engine.runtimes.torch_runtime import TorchRuntime


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _check(t: torch.Tensor, size: int) -> None:
    assert t.shape == (1, 3, size, size) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


def test_rgb_png_path_and_bytes(tmp_path):
    a = np.zeros((100, 100, 3), np.uint8)
    a[..., 0] = 255
    p = tmp_path / "red.png"
    Image.fromarray(a).save(p)
    for src in (p, str(p), p.read_bytes(), Image.open(p), a):
        t = load_portrait(src, 64)
        _check(t, 64)
        assert torch.allclose(t[0, :, 32, 32], torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)


def test_rgba_composited_over_grey():
    a = np.zeros((80, 80, 4), np.uint8)
    a[..., 1] = 255  # green, fully transparent on the left half
    a[:, 40:, 3] = 255
    t = load_portrait(_encode(Image.fromarray(a)), 80)
    _check(t, 80)
    grey = BACKGROUND[0] / 255
    assert torch.allclose(t[0, :, 40, 5], torch.tensor([grey] * 3), atol=1e-3)
    assert torch.allclose(t[0, :, 40, 75], torch.tensor([0.0, 1.0, 0.0]), atol=1e-3)


def test_grey_palette_jpeg_16bit():
    grey = Image.fromarray(np.full((70, 90), 200, np.uint8))
    t = load_portrait(_encode(grey), 64)
    _check(t, 64)
    assert torch.allclose(t, torch.full_like(t, 200 / 255), atol=2e-3)

    pal = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=16)
    _check(load_portrait(_encode(pal), 64), 64)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    _check(load_portrait(_encode(pal_t, transparency=0), 64), 64)

    jpg = _encode(Image.fromarray(np.full((120, 120, 3), (10, 120, 240), np.uint8)), "JPEG", quality=95)
    t = load_portrait(jpg, 96)
    _check(t, 96)
    assert torch.allclose(t[0, :, 48, 48], torch.tensor([10, 120, 240]) / 255, atol=0.03)

    i16 = Image.fromarray(np.full((64, 64), 65535, np.uint16))
    t = load_portrait(_encode(i16), 64)
    assert torch.allclose(t, torch.ones_like(t), atol=1e-3)


def test_odd_aspect_centre_crop():
    a = np.zeros((100, 300, 3), np.uint8)  # wide: black | white | black
    a[:, 100:200] = 255
    t = load_portrait(a, 50)
    _check(t, 50)
    assert float(t.mean()) > 0.97  # only the white centre survives the crop
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[100:200] = 255
    assert float(load_portrait(tall, 50).mean()) > 0.97


def test_exif_orientation_applied():
    a = np.zeros((64, 128, 3), np.uint8)  # stored landscape; rotated 90 degrees by EXIF -> portrait
    a[:, :64] = 255
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 270 (i.e. 90 CW) on display
    t = load_portrait(_encode(img, "JPEG", exif=exif, quality=95), 64)
    # displayed image is 64 wide x 128 tall; centre crop shows the boundary between white and black
    # horizontally (top/bottom), not vertically
    row_means = t[0].mean(dim=(0, 2))
    col_means = t[0].mean(dim=(0, 1))
    assert float(row_means.max() - row_means.min()) > 0.5
    assert float(col_means.max() - col_means.min()) < 0.2


def test_rejects_tiny_garbage_and_missing(tmp_path):
    with pytest.raises(InputError, match="too small"):
        load_portrait(_encode(Image.new("RGB", (63, 200))), 64)
    with pytest.raises(InputError, match="too small"):
        load_portrait(np.zeros((10, 10, 3), np.uint8), 64)
    with pytest.raises(InputError, match="not a readable image"):
        load_portrait(b"definitely not an image", 64)
    with pytest.raises(InputError, match="empty"):
        load_portrait(b"", 64)
    png = _encode(Image.new("RGB", (128, 128), (1, 2, 3)))
    with pytest.raises(InputError, match="readable"):
        load_portrait(png[: len(png) // 2], 64)  # truncated
    with pytest.raises(InputError, match="does not exist"):
        load_portrait(tmp_path / "missing.png", 64)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(InputError, match="bad.jpg"):
        load_portrait(bad, 64)
    with pytest.raises(InputError, match="shape"):
        load_portrait(np.zeros((64, 64, 2), np.uint8), 64)


def test_tensor_input():
    t = load_portrait(torch.rand(3, 80, 120), 64)
    _check(t, 64)


def test_avatar_state_lite_cache_size():
    torch.manual_seed(0)
    rt = TorchRuntime(Marionette(ModelConfig.preset("lite")))
    a = rt.prepare_avatar(np.full((300, 260, 3), 128, np.uint8))
    s = rt.cfg.image_size
    net = rt.cfg.net
    assert a.source.shape == (1, 3, s, s)
    assert a.feat_hi.shape == (1, net.app_channels[1], s // 2, s // 2)
    assert a.feat_lo.shape == (1, net.app_channels[2], s // 4, s // 4)
    assert a.app.shape == (1, net.app_dim)
    assert -1.0 <= float(a.source.min()) and float(a.source.max()) <= 1.0
    assert a.nbytes() <= 16 * 2**20
    assert a.nbytes() == sum(t.numel() * 4 for t in a.tensors())


def test_avatar_state_stack_and_validation():
    def mk(v: float) -> AvatarState:
        return AvatarState(torch.full((1, 3, 8, 8), v), torch.full((1, 2, 4, 4), v), torch.full((1, 2, 2, 2), v),
                           torch.full((1, 5), v))

    a, b = mk(0.0), mk(1.0)
    st = AvatarState.stack([a, b, a])
    assert [t.shape[0] for t in st] == [3, 3, 3, 3]
    assert float(st[2][1].mean()) == 1.0 and float(st[3][2].mean()) == 0.0
    assert all(x is y for x, y in zip(AvatarState.stack([a]), a.tensors()))
    with pytest.raises(ValueError):
        AvatarState.stack([])
    with pytest.raises(ValueError):
        AvatarState.stack([a, AvatarState(torch.zeros(1, 3, 16, 16), *a.tensors()[1:])])
    with pytest.raises(ValueError):
        AvatarState(torch.zeros(2, 3, 8, 8), *a.tensors()[1:])
    with pytest.raises(Exception):
        a.source = torch.zeros(1)  # frozen
    assert a.to(dtype=torch.float16).nbytes() == a.nbytes() // 2
