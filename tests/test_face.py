"""Real photographs in (engine.face): detection, alignment to the corpus framing, paste-back, tracking, and
`render --avatar PHOTO` end to end. The photos are real portraits shipped inside packages of the test extra
(matplotlib's grace_hopper.jpg, scikit-image's astronaut.png) and transformed variants of them whose
geometry is known, so the hand-checked eye centres of the originals give the truth for every variant."""

from __future__ import annotations

import math
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError

pytest.importorskip("dlib", reason="the default face detector (dlib-bin) is not installed")
mpl = pytest.importorskip("matplotlib")
skimage_data = pytest.importorskip("skimage.data")

from engine import face as F  # noqa: E402

GRACE = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
ASTRO = Path(skimage_data.__file__).parent / "astronaut.png"
COFFEE = Path(skimage_data.__file__).parent / "coffee.png"
# pupil centres read off 24x magnified crops (pixel centres; +-1.5 px): image-left eye, image-right eye
REF_EYES = {"grace": np.array([[223.8, 190.0], [304.5, 187.5]]), "astro": np.array([[202.5, 101.0], [246.0, 103.0]])}
PHOTOS = {"grace": GRACE, "astro": ASTRO}


def _load(name: str) -> np.ndarray:
    return F.load_photo(PHOTOS[name])


def _similarity(angle_deg: float, scale: float, centre_in, centre_out) -> np.ndarray:
    """(2,3) mapping photo -> variant: rotate by angle (counter-clockwise in the image) and scale about
    centre_in, which lands on centre_out."""
    a = math.radians(angle_deg)
    A = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    t = np.asarray(centre_out, float) - A @ np.asarray(centre_in, float)
    return np.concatenate([A, t[:, None]], 1)


def _variant(photo: np.ndarray, eyes: np.ndarray, kind: str):
    """A transformed photo and where its reference eyes are (image-left first)."""
    h, w = photo.shape[:2]
    c = ((w - 1) / 2, (h - 1) / 2)
    if kind == "original":
        return photo, eyes
    if kind == "grey":
        g = (photo.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5).astype(np.uint8)
        return np.repeat(g[..., None], 3, 2), eyes
    if kind == "mirror":
        m = eyes.copy()
        m[:, 0] = w - 1 - m[:, 0]
        return np.ascontiguousarray(photo[:, ::-1]), m[::-1]
    size, m = {
        "rotated": ((w + 160, h + 160), _similarity(20.0, 1.0, c, ((w + 159) / 2, (h + 159) / 2))),
        "rotated-cw": ((w + 160, h + 160), _similarity(-25.0, 1.0, c, ((w + 159) / 2, (h + 159) / 2))),
        "scaled": ((int(w * 0.6), int(h * 0.6)), _similarity(0.0, 0.6, c, ((w * 0.6 - 1) / 2, (h * 0.6 - 1) / 2))),
        "off-centre": ((w + 500, h + 300), _similarity(0.0, 1.0, c, (w + 300, h / 2 + 250))),
        "small-in-large": ((1400, 1100), _similarity(0.0, 0.7, c, (1000, 300))),
    }[kind]
    out = F.warp_affine(photo, F._invert(m), size[0], size[1], resample="bicubic", fill=(90, 110, 100))
    return out, eyes @ m[:, :2].T + m[:, 2]


VARIANTS = ["original", "rotated", "rotated-cw", "scaled", "off-centre", "grey", "small-in-large", "mirror"]


# ------------------------------------------------------------------------------------------- framing
def test_template_is_the_corpus_framing():
    """TEMPLATE_256 equals the renderer's eye and mouth centres (mean over identities at zero pose),
    computed with the renderer's own geometry (camera, head ellipsoid, identity sampler)."""
    import torch

    from trainer.corpus import face as R

    rng = np.random.default_rng(3)
    ids = torch.from_numpy(np.stack([R.sample_identity(rng) for _ in range(400)]))
    pose = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).expand(len(ids), 6)
    p = R._derive(ids, pose)
    es, ey, ym = (p["f"](n).view(-1) for n in ("eye_spacing", "eye_y", "mouth_y"))
    a1, b1, c1 = p["a1"].view(-1), p["b1"].view(-1), p["c1"].view(-1)
    ze = c1 * (1 - (es / a1) ** 2 - (ey / b1) ** 2).sqrt()  # the eyes are painted on the cranium's surface
    zm = c1 * (1 - (ym / b1) ** 2).sqrt()
    pts = torch.stack([torch.stack([-es, ey, ze], -1), torch.stack([es, ey, ze], -1),
                       torch.stack([torch.zeros_like(ym), ym, zm], -1)], 1)  # (B,3,3) head space
    world = p["centre"].view(-1, 1, 3) + torch.einsum("bij,bkj->bki", p["R"], pts)
    col, row = R._project_points(world, 256)
    measured = torch.stack([col, row], -1).mean(0).numpy()
    np.testing.assert_allclose(measured, F.TEMPLATE_256, atol=0.6)


# ------------------------------------------------------------------------------------ real photographs
@pytest.mark.parametrize("name", ["grace", "astro"])
@pytest.mark.parametrize("kind", VARIANTS)
def test_real_photo_variants_align_to_the_corpus_framing(name, kind):
    photo, eyes = _variant(_load(name), REF_EYES[name], kind)
    crop, tf = F.align(photo)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    e = tf.apply(eyes)  # the hand-checked pupils, in the crop
    assert abs(e[1, 1] - e[0, 1]) <= 3.0, e  # the eye line is level
    assert e[0, 0] < e[1, 0]
    np.testing.assert_allclose(e, F.TEMPLATE_256[:2], atol=7.0)  # and where the corpus has its eyes
    assert abs(np.hypot(*(e[1] - e[0])) - 53.5) < 8  # the corpus' face size


def test_detector_eye_centres_match_the_hand_reference():
    det = F.get_detector()
    for name, ref in REF_EYES.items():
        face = det.detect(_load(name))[0]
        err = np.hypot(*(face.eyes - ref).T)
        assert err.max() < 4.0, (name, face.eyes, ref)
        assert abs(face.pose[0]) < 15  # frontal portraits


def test_largest_face_is_taken_and_face_index_picks_another(caplog):
    grace, astro = _load("grace"), _load("astro")
    canvas = np.full((700, 1200, 3), 120, np.uint8)
    canvas[50:650, 40:552] = grace  # face ~190 px wide
    canvas[100:612, 650:1162] = astro  # face ~90 px wide
    with caplog.at_level("INFO", logger="engine.face"):
        crop, tf = F.align(canvas)
    assert "faces" in caplog.text and "largest" in caplog.text
    e = tf.apply(REF_EYES["grace"] + [40, 50])
    np.testing.assert_allclose(e, F.TEMPLATE_256[:2], atol=7.0)
    ranked = F.get_detector().detect(canvas)
    i = next(k for k, f in enumerate(ranked) if f.box[0] > 600 and f.box[1] < 300)  # the astronaut's face
    crop, tf = F.align(canvas, face_index=i)
    e = tf.apply(REF_EYES["astro"] + [650, 100])
    np.testing.assert_allclose(e, F.TEMPLATE_256[:2], atol=7.0)
    with pytest.raises(InputError, match="face index 9"):
        F.align(canvas, face_index=9)


# ---------------------------------------------------------------------------------------------- errors
def test_blank_image_is_refused():
    with pytest.raises(InputError, match="no face found.*blank"):
        F.align(np.full((400, 300, 3), 180, np.uint8))


def test_image_without_a_face_is_refused():
    with pytest.raises(InputError, match="no face found"):
        F.align(COFFEE)


def test_rendered_portraits_are_found_and_kept_in_their_framing():
    """The synthetic corpus' faces (what the built-in avatar and held-out corpus portraits are) score lower
    than photographs: the detector's second look finds them, and one already framed as the model's own is
    resized, not moved by the landmarks' few-pixel error."""
    from trainer.corpus.face import FaceRenderer
    from trainer.corpus.face_identity import sample_identity

    rng = np.random.default_rng(2024)
    n = 12
    ident = np.stack([sample_identity(rng) for _ in range(n)]).astype(np.float32)
    pose = np.zeros((n, 6), np.float32)
    pose[:, 5] = 1.0
    pose[:, :3] = rng.uniform(-6, 6, (n, 3))
    imgs = (FaceRenderer(256).render(ident, pose).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    found = kept = 0
    for im in imgs:
        try:
            a = F.align(im)
        except InputError:
            continue
        found += 1
        kept += int(np.array_equal(a.crop, im))
    assert found >= n - 1 and kept >= n // 2, (found, kept)


def test_tiny_face_is_refused_with_the_minimum():
    small = F.warp_affine(_load("astro"), F._invert(_similarity(0, 0.3, (255.5, 255.5), (300, 300))), 600, 600,
                          fill=(200, 200, 200))
    with pytest.raises(InputError, match=rf"too small.*minimum is {F.MIN_FACE_PX} px"):
        F.align(small)


def test_head_turn_estimate_and_limit():
    """Landmarks of the generic face turned by a known yaw/pitch (orthographic) read back within a few
    degrees; a face whose pose is past the limit is refused with the limit in the message."""
    X = F._POSE_MODEL
    for yaw, pitch in [(0, 0), (20, 0), (-30, 10), (50, -5)]:
        y, p = math.radians(yaw), math.radians(pitch)
        ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        rx = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
        cam = X @ (rx @ ry).T
        pts = np.stack([300 + 0.4 * cam[:, 0], 200 - 0.4 * cam[:, 1]], 1)
        est = F.estimate_pose(pts)
        assert abs(est[0] - yaw) < 3 and abs(est[1] - pitch) < 3, (yaw, pitch, est)
    # a real photo squeezed into a profile-like asymmetry: move the nose/mouth landmarks sideways
    det = F.get_detector()
    face = det.detect(_load("grace"))[0]
    assert abs(face.pose[0]) < 15
    lm = face.landmarks.copy()
    iod = np.hypot(*(face.eyes[1] - face.eyes[0]))
    lm[27:36, 0] += 0.9 * iod  # nose far to one side, as in a strongly turned head
    lm[48:68, 0] += 0.6 * iod
    lm[6:11, 0] += 0.5 * iod
    turned = F.estimate_pose(lm[list(F._POSE_IDX)])
    assert abs(turned[0]) > F.MAX_YAW_DEG


# ------------------------------------------------------------------------------------------ paste-back
def _ring(comp: "F.Compositor", lo: float, hi: float) -> np.ndarray:
    """Output pixels (boolean image) where the warped paste mask is between lo and hi."""
    x0, y0, x1, y1 = comp.region
    h, w = comp.background.shape[:2]
    out = np.zeros((h, w), bool)
    m = comp.region_mask[..., 0]
    out[y0:y1, x0:x1] = (m > lo) & (m < hi)
    return out


def test_paste_back_keeps_the_photo_and_shows_no_seam():
    photo = _load("grace")
    crop, tf = F.align(photo)
    rng = np.random.default_rng(0)
    # an "animated" crop: another colour cast (a generator's drift), noise, and the mouth region changed
    frame = crop.astype(np.float32) + np.array([18.0, -6.0, -14.0]) + rng.normal(0, 2, crop.shape)
    frame[150:185, 100:160] *= 0.5
    frame = np.clip(frame, 0, 255).astype(np.uint8)
    comp = F.Compositor(photo, tf, "original", source_crop=crop)
    out = comp.paste(frame)
    assert out.shape == photo.shape
    # far from the face: identical to the photo (the mask is exactly zero there)
    inv = tf.inverse()
    centre = inv @ np.array([127.5, 127.5, 1.0])
    yy, xx = np.mgrid[0:photo.shape[0], 0:photo.shape[1]]
    far = np.hypot(xx - centre[0], yy - centre[1]) > 0.55 * 256 / tf.scale  # the mask's ellipse: < 0.5
    assert far.sum() > 0.25 * far.size
    np.testing.assert_array_equal(out[far], photo[far])
    # the face changed (the mouth region was darkened)
    mouth = inv @ np.array([130.0, 167.0, 1.0])
    mx, my = int(round(mouth[0])), int(round(mouth[1]))
    assert np.abs(out[my - 5:my + 5, mx - 5:mx + 5].astype(int) - photo[my - 5:my + 5, mx - 5:mx + 5]).mean() > 20
    # no seam: across the feather (the ring where the mask goes from 0 to 1) the output stays within a few
    # levels of the photo, so neither a box nor a colour step shows
    ring = _ring(comp, 0.02, 0.98)
    assert ring.sum() > 500
    mad = np.abs(out[ring].astype(float) - photo[ring]).mean()
    assert mad < 4.0, mad
    # ...which the colour match is what buys: without it the cast shows along the same ring
    plain = F.Compositor(photo, tf, "original").paste(frame)
    assert np.abs(plain[ring].astype(float) - photo[ring]).mean() > mad + 3.0


def test_paste_back_output_sizes():
    photo = _load("astro")
    crop, tf = F.align(photo)
    for spec, size in [("original", (512, 512)), ("512", (512, 512)), ("640x360", (640, 360)), ("crop", (256, 256)),
                       (300, (300, 300))]:
        out = F.paste_back(crop, photo, tf, spec, source_crop=crop)
        assert (out.shape[1], out.shape[0]) == size, spec
    # 512 around the face: the face is near the frame's centre and at least as large as in the photo
    comp = F.Compositor(photo, tf, "512", source_crop=crop)
    eyes = F.frame_window(tf, 512, 512) @ np.c_[REF_EYES["astro"], np.ones(2)].T
    assert abs(eyes[0].mean() - 256) < 60 and np.hypot(*(eyes[:, 1] - eyes[:, 0])) > 40
    assert comp.paste(crop).shape == (512, 512, 3)
    for bad in ("big", "0", "12x12x3", "99999"):
        with pytest.raises(InputError):
            F.parse_output_size(bad)


# -------------------------------------------------------------------------------------------- tracking
def test_tracker_follows_a_moving_face_and_keeps_small_motion():
    photo = _load("astro")
    frames, truth = [], []
    for i in range(30):
        # small sway for 15 frames, then the camera pans 160 px (and zooms) over 5 frames and stays
        pan = min(max(i - 15, 0), 5) / 5.0
        m = _similarity(3.0 * math.sin(i / 3), 1.0 + 0.25 * pan, (255.5, 255.5),
                        (320 + 4 * math.sin(i / 2) - 160 * pan, 260 + 20 * pan))
        frames.append(F.warp_affine(photo, F._invert(m), 640, 520, fill=(100, 100, 100)))
        truth.append(REF_EYES["astro"] @ m[:, :2].T + m[:, 2])
    tracker = F.FaceTracker(detect_every=10)
    tfs = [tracker.update(f) for f in frames]
    assert all(t is not None for t in tfs) and tracker.lost == 0
    assert tracker.detections <= 5  # detect, then follow with landmarks
    # inside the dead zone the framing holds still, so the sway stays in the crops (pose for E_mot)
    np.testing.assert_allclose(tfs[3].matrix, tfs[12].matrix, atol=1e-9)
    sway = [tfs[k].apply(truth[k])[0, 0] for k in range(13)]
    assert np.ptp(sway) > 3
    # after the pan the face is still framed like the corpus, within the dead zone's slack
    e = tfs[-1].apply(truth[-1])
    np.testing.assert_allclose(e, F.TEMPLATE_256[:2], atol=0.08 * 256 + 6)
    crops = list(F.track_crops(frames[:3]))
    assert crops[0][0].shape == (256, 256, 3) and crops[0][1] is not None


# -------------------------------------------------------------------------------------- render, end to end
def _wav(path: Path, seconds: float = 0.8) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * 150 * t) * (np.sin(2 * np.pi * 3 * t) > 0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((x * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def _no_builtin(monkeypatch):
    import engine.checkpoint

    monkeypatch.setattr(engine.checkpoint, "builtin_checkpoint_dir", lambda: None)


def test_cli_render_photo_pastes_into_the_photo(tmp_path, _no_builtin, capsys):
    import av

    from marionette.cli import main

    wav = _wav(tmp_path / "a.wav")
    photo = tmp_path / "astro.jpg"
    from PIL import Image

    Image.fromarray(F.load_photo(ASTRO)[:500, :498]).save(photo, quality=95)
    out = tmp_path / "o.mp4"
    assert main(["render", "--avatar", str(photo), "--audio", str(wav), "--out", str(out), "--config", "tiny",
                 "--backend", "torch"]) == 0
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert frames[0].shape == (500, 498, 3) and len(frames) == 20
    src = np.asarray(Image.open(photo).convert("RGB")).astype(int)
    assert np.abs(frames[5][400:, :100].astype(int) - src[400:, :100]).mean() < 3  # the photo around it
    out2 = tmp_path / "o2.mp4"
    assert main(["render", "--avatar", str(photo), "--audio", str(wav), "--out", str(out2), "--config", "tiny",
                 "--backend", "torch", "--output-size", "320x240"]) == 0
    with av.open(str(out2)) as c:
        assert (c.streams.video[0].codec_context.width, c.streams.video[0].codec_context.height) == (320, 240)
    # no face: a clear error, exit status 2, nothing written
    blank = tmp_path / "blank.png"
    Image.new("RGB", (300, 300), (128, 128, 128)).save(blank)
    capsys.readouterr()
    rc = main(["render", "--avatar", str(blank), "--audio", str(wav), "--out", str(tmp_path / "n.mp4"),
               "--config", "tiny", "--backend", "torch"])
    assert rc == 2 and "no face found" in capsys.readouterr().err and not (tmp_path / "n.mp4").exists()


# ------------------------------------------------------------------------------------------------ serve
def test_serve_aligns_uploads_and_streams_the_face_pasted_back(tmp_path):
    """`serve --align require --output-size 320x240`: a real photo uploads (aligned off the event loop),
    its session streams 320x240 frames holding the photo around the face; uploads without a usable face get
    a clear 400 and the server keeps serving."""
    pytest.importorskip("aiortc")
    import asyncio
    import io
    import json as _json

    import aiohttp
    from PIL import Image

    from streaming.client import AvatarClient, PcmSource
    from streaming.fixtures import ServerThread, responsive_checkpoint
    from streaming.server import ServeConfig

    ck = responsive_checkpoint(tmp_path / "tiny", "tiny")
    cfg = ServeConfig(checkpoint=ck, config="tiny", ice_hosts=("127.0.0.1",), max_sessions=2, peer_timeout_s=2.0,
                      align="require", output_size="320x240")

    def png(img) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    async def post(url, data):
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/avatars", data=data, headers={"Content-Type": "image/png"}) as r:
                return r.status, _json.loads(await r.read())

    photo = _load("astro")
    with ServerThread(cfg) as st:
        st_, body = asyncio.run(post(st.url, png(photo)))
        assert st_ == 201, body
        state = st.server.avatars.get(body["id"]).state
        assert state.face is not None and state.face.output_size == (320, 240)
        for bad, why in [(np.full((300, 300, 3), 128, np.uint8), "no face found"),
                         (F.load_photo(COFFEE), "no face found")]:
            code, err = asyncio.run(post(st.url, png(bad)))
            assert code == 400 and why in err["error"], err
        assert len(st.server.avatars) == 2  # nothing stored for the refused ones

        async def session():
            c = AvatarClient(st.url, keep_frames=True)
            await c.connect(mic=PcmSource(np.zeros(48000 * 2, np.int16)), avatar=body["id"])
            await c.wait_first_frame(20)
            await asyncio.sleep(0.5)
            frames = [f for _, _, f in c.received.video if f is not None]
            await c.close()
            return frames

        frames = asyncio.run(session())
        assert frames and frames[-1].shape == (240, 320, 3)
        # the photo around the face: the frame's corner region is the photo's (through the VP8 codec)
        bg = state.face.compositor.background
        assert np.abs(frames[-1][:30, :30].astype(int) - bg[:30, :30]).mean() < 12
        async def health():
            async with aiohttp.ClientSession() as s:
                async with s.get(st.url + "/healthz") as r:
                    return r.status
        assert asyncio.run(health()) == 200


def test_driving_video_is_tracked_before_the_motion_encoder(tmp_path):
    """render's driving-video path with tracking: E_mot sees the FaceTracker's crops of the decoded frames
    (not the centre-cropped frames), and a video without a face falls back to whole frames."""
    import av
    import torch

    from engine.checkpoint import load_model
    from engine.render import encode_driving_video
    from engine.runtimes.torch_runtime import TorchRuntime

    photo = _load("astro")
    path = tmp_path / "drive.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 480, 400, "yuv420p"
        for i in range(12):
            m = _similarity(2.0 * math.sin(i / 2), 1.0, (255.5, 255.5), (300 + 3 * i, 240))
            f = av.VideoFrame.from_ndarray(F.warp_affine(photo, F._invert(m), 480, 400, fill=(90, 90, 90)), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    torch.manual_seed(0)
    model, _ = load_model(None, config="tiny")

    class Seen:  # the real runtime, recording what E_mot is given
        def __init__(self, rt):
            self.rt, self.cfg, self.frames = rt, rt.cfg, []

        def encode_motion(self, x):
            self.frames.append(x.clone())
            return self.rt.encode_motion(x)

    rt = Seen(TorchRuntime(model))
    size = rt.cfg.image_size
    # one reading per frame (the model's views, `read_driving`, are tested on their own)
    tracked = encode_driving_video(path, rt, 25, 12, track=True, views=False)
    seen_tracked = torch.cat(rt.frames)
    rt.frames.clear()
    encode_driving_video(path, rt, 25, 12, track=False, views=False)
    seen_whole = torch.cat(rt.frames)
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    crops = [cr for cr, tf in F.track_crops(frames, size)]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    assert seen_tracked.shape == x.shape == (12, 3, size, size)
    torch.testing.assert_close(seen_tracked, x)
    assert (seen_tracked - seen_whole).abs().mean() > 0.05  # not the centre-cropped frames
    assert tracked["pose"].shape[0] == 12
    # no face in the video: whole frames, as before
    blank = tmp_path / "blank.mp4"
    with av.open(str(blank), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 96, 96, "yuv420p"
        for i in range(4):
            f = av.VideoFrame.from_ndarray(np.full((96, 96, 3), 60 + 20 * i, np.uint8), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    rt.frames.clear()
    encode_driving_video(blank, rt, 25, 4, track=True)
    a = torch.cat(rt.frames)
    rt.frames.clear()
    encode_driving_video(blank, rt, 25, 4, track=False)
    torch.testing.assert_close(a, torch.cat(rt.frames))
