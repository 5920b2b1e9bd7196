"""Offline render end to end with the `tiny` config (random weights or a saved tiny checkpoint), short audio."""

import dataclasses
import shutil
import subprocess
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import engine.checkpoint
import engine.render
from engine.errors import InputError
from engine.render import RenderConfig, encode_driving_video, prepare_render, render, write_render
from marionette.cli import main as cli_main

SR = 16000


@pytest.fixture(autouse=True)
def _no_builtin_checkpoint(monkeypatch):
    """--config tiny must give a random tiny model even if a built-in checkpoint is installed."""
    monkeypatch.setattr(engine.checkpoint, "builtin_checkpoint_dir", lambda: None)


def _write_wav(path: Path, data: np.ndarray, rate: int = SR) -> Path:
    data = np.asarray(data, np.float64)
    if data.ndim == 1:
        data = data[:, None]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _speechlike(seconds: float, rate: int = SR, seed: int = 0) -> np.ndarray:
    """Voiced bursts (syllables) separated by short pauses, with a silent lead-in."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    env = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) * (t > 0.2)
    voiced = np.sin(2 * np.pi * 140 * t) + 0.5 * np.sin(2 * np.pi * 700 * t) + 0.2 * rng.standard_normal(len(t))
    return 0.25 * env * voiced


@pytest.fixture
def portrait(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    img = (rng.random((96, 120, 3)) * 255).astype(np.uint8)
    p = tmp_path / "face.png"
    Image.fromarray(img).save(p)
    return p


@pytest.fixture
def speech(tmp_path) -> Path:
    """Real speech from espeak-ng when installed (22050 Hz mono), else a speech-like signal."""
    p = tmp_path / "speech.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(p), "Hello, how are you?"], check=True, capture_output=True)
        return p
    return _write_wav(p, _speechlike(1.5))


def _driving_video(path: Path, n: int, fps: int = 25, w: int = 80, h: int = 72) -> Path:
    """n frames of a moving bright square (non-square frames: exercises the centre crop)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), 40, np.uint8)
            x = 5 + 5 * i % (w - 20)
            img[20:40, x:x + 15] = (230, 200 - 10 * (i % 10), 60 + 15 * (i % 10))
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


def _probe(path: Path) -> dict:
    with av.open(str(path)) as c:
        kinds = {s.type for s in c.streams}
        v = c.streams.video[0]
        a = c.streams.audio[0]
        info = {"kinds": kinds, "vcodec": v.codec_context.name, "acodec": a.codec_context.name,
                "pix_fmt": v.codec_context.pix_fmt, "size": (v.codec_context.width, v.codec_context.height),
                "audio_rate": a.codec_context.sample_rate}
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        info["audio_s"] = sum(f.samples for f in c.decode(audio=0)) / info["audio_rate"]
    info["frames"] = frames
    return info


def _wav_duration(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def _cfg(**kw) -> RenderConfig:
    kw.setdefault("config", "tiny")
    return RenderConfig(**kw)


# ------------------------------------------------------------------------------------------- tests
def test_cli_render_speech(tmp_path, portrait, speech):
    out = tmp_path / "out" / "talk.mp4"
    rc = cli_main(["render", "--avatar", str(portrait), "--audio", str(speech), "--out", str(out),
                   "--config", "tiny", "--expression", "happy:0.8", "--seed", "3", "--align", "off"])
    assert rc == 0 and out.is_file()
    info = _probe(out)
    assert info["kinds"] == {"video", "audio"}
    assert info["vcodec"] == "h264" and info["acodec"] == "aac" and info["pix_fmt"] == "yuv420p"
    assert info["size"] == (64, 64)
    dur = _wav_duration(speech)
    assert abs(len(info["frames"]) - round(dur * 25)) <= 1
    assert abs(info["audio_s"] - dur) < 0.1  # AAC adds priming/padding samples
    assert not list(out.parent.glob(".*partial"))


def test_render_stereo_44k(tmp_path, portrait):
    x = _speechlike(1.2, rate=44100)
    wav = _write_wav(tmp_path / "stereo.wav", np.stack([x, 0.5 * x], axis=1), 44100)
    out = render(_cfg(avatar=portrait, audio=wav, out=tmp_path / "s.mp4"))
    info = _probe(out)
    assert len(info["frames"]) == 30 and info["frames"][0].shape == (64, 64, 3)
    assert info["audio_rate"] == SR


def test_render_30fps(tmp_path, portrait):
    wav = _write_wav(tmp_path / "a.wav", _speechlike(1.0))
    out = render(_cfg(avatar=portrait, audio=wav, out=tmp_path / "a.mp4", fps=30))
    assert len(_probe(out)["frames"]) == 30


def test_render_silent_audio_idles(tmp_path, portrait):
    wav = _write_wav(tmp_path / "silent.wav", np.zeros(int(1.4 * SR)))
    cfg = _cfg(avatar=portrait, audio=wav, out=tmp_path / "silent.mp4")
    job = prepare_render(cfg)
    assert job.n_frames == 35
    z = job.composer.compose_batch(0, job.n_frames)
    sl = job.runtime.cfg.latents.slices()
    assert not z[:, sl["lip"]].any()  # mouth closed throughout
    assert np.abs(np.diff(z[:, sl["pose"]], axis=0)).sum() > 0  # idle motion moves the head
    out = write_render(job, cfg.out)
    assert len(_probe(out)["frames"]) == 35


def test_render_lip_gated_by_voice_activity(tmp_path, portrait):
    x = np.concatenate([np.zeros(SR), _speechlike(1.0)[int(0.2 * SR):], np.zeros(SR)])
    wav = _write_wav(tmp_path / "gap.wav", x)
    job = prepare_render(_cfg(avatar=portrait, audio=wav, out=tmp_path / "g.mp4"))
    lip = job.composer.compose_batch(0, job.n_frames)[:, job.runtime.cfg.latents.slices()["lip"]]
    assert not lip[:20].any() and not lip[-20:].any()
    assert np.abs(lip[27:40]).sum() > 0


def test_empty_audio_errors(tmp_path, portrait, capsys):
    wav = _write_wav(tmp_path / "empty.wav", np.zeros(0))
    with pytest.raises(InputError, match="audio is empty"):
        render(_cfg(avatar=portrait, audio=wav, out=tmp_path / "e.mp4"))
    rc = cli_main(["render", "--avatar", str(portrait), "--audio", str(wav), "--out", str(tmp_path / "e.mp4"),
                   "--config", "tiny"])
    assert rc == 2 and "audio is empty" in capsys.readouterr().err
    assert not (tmp_path / "e.mp4").exists()


def test_input_errors(tmp_path, portrait, monkeypatch, capsys):
    wav = _write_wav(tmp_path / "a.wav", _speechlike(0.5))
    with pytest.raises(InputError, match="torch"):
        render(_cfg(avatar=portrait, audio=wav, out=tmp_path / "x.mp4", backend="tensorflow"))
    with pytest.raises(InputError, match="hold, loop"):
        render(_cfg(avatar=portrait, audio=wav, out=tmp_path / "x.mp4", driving="bounce"))
    with pytest.raises(InputError, match="not found"):
        render(_cfg(avatar=portrait, audio=tmp_path / "nope.wav", out=tmp_path / "x.mp4"))
    monkeypatch.setattr(engine.render, "BUILTIN_AVATAR", tmp_path / "no-avatar.png")
    with pytest.raises(InputError, match="--avatar"):
        render(_cfg(audio=wav, out=tmp_path / "x.mp4"))
    rc = cli_main(["render", "--avatar", str(portrait), "--audio", str(wav), "--out", str(tmp_path / "x.mp4"),
                   "--config", "tiny", "--expression", "smug:0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "smug" in err and "happy" in err and "surprised" in err
    assert not (tmp_path / "x.mp4").exists()


def test_render_from_checkpoint_with_preset(tmp_path, portrait):
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.model import Marionette

    torch.manual_seed(0)
    ckpt = save_checkpoint(Marionette(ModelConfig.preset("tiny")), tmp_path / "ckpt")
    wav = _write_wav(tmp_path / "a.wav", _speechlike(0.8))
    job = prepare_render(RenderConfig(avatar=portrait, audio=wav, out=tmp_path / "c.mp4", checkpoint=ckpt,
                                      expression="happy:0.5+sad:0.25"))
    presets = job.meta["expression_presets"]
    exp = job.composer.compose(5)[job.runtime.cfg.latents.slices()["exp"]]
    np.testing.assert_allclose(exp, 0.5 * np.float32(presets["happy"]) + 0.25 * np.float32(presets["sad"]),
                               rtol=1e-6, atol=1e-7)
    assert len(_probe(write_render(job, tmp_path / "c.mp4"))["frames"]) == 20


@pytest.mark.parametrize("mode", ["hold", "loop"])
def test_driving_video_shorter_than_audio(tmp_path, portrait, mode):
    video = _driving_video(tmp_path / "drive.mp4", n=10)
    wav = _write_wav(tmp_path / "a.wav", _speechlike(1.2))  # 30 frames
    cfg = _cfg(avatar=portrait, audio=wav, out=tmp_path / f"{mode}.mp4", pose_from=video, eyes_from=video,
               expression_from=video, driving=mode)
    job = prepare_render(cfg)
    z = job.composer.compose_batch(0, job.n_frames)
    sl = job.runtime.cfg.latents.slices()
    for f in ("pose", "eye", "exp"):
        part = z[:, sl[f]]
        assert np.abs(part[:10] - part[0]).max() > 0  # the driving frames differ
        if mode == "hold":
            np.testing.assert_array_equal(part[10:], np.tile(part[9], (20, 1)))
        else:
            np.testing.assert_array_equal(part, part[np.arange(30) % 10])
    # the driving latents are E_mot on the video's frames
    direct = encode_driving_video(video, job.runtime, 25, 30)
    assert direct["pose"].shape[0] == 10
    np.testing.assert_allclose(z[:10, sl["pose"]], direct["pose"], atol=1e-6)
    # at views: the model's (27 for a model that asks for them), or one reading with --driving-views one
    rt = job.runtime
    once = encode_driving_video(video, rt, 25, 30, views=False)
    np.testing.assert_array_equal(once["pose"], direct["pose"])  # this model asks for none
    rt.model.cfg = dataclasses.replace(rt.cfg, driving_jitter_px=2, driving_zoom=0.05)
    many = encode_driving_video(video, rt, 25, 30)
    assert np.abs(many["pose"] - once["pose"]).max() > 1e-4
    np.testing.assert_array_equal(encode_driving_video(video, rt, 25, 30, views=False)["pose"], once["pose"])
    with pytest.raises(InputError, match="--driving-views"):
        prepare_render(dataclasses.replace(cfg, driving_views="all"))
    info = _probe(write_render(job, cfg.out))
    assert len(info["frames"]) == 30


def test_driving_video_other_frame_rate(tmp_path):
    """A 50 fps driving video drives a 25 fps render with every other frame."""
    from engine.checkpoint import load_model
    from engine.runtimes.torch_runtime import TorchRuntime

    model, _ = load_model(None, config="tiny")
    rt = TorchRuntime(model)
    video = _driving_video(tmp_path / "d50.mp4", n=20, fps=50)
    at25 = encode_driving_video(video, rt, 25, 100)
    at50 = encode_driving_video(video, rt, 50, 100)
    assert at25["pose"].shape[0] == 10 and at50["pose"].shape[0] == 20
    np.testing.assert_allclose(at25["pose"], at50["pose"][::2], atol=1e-6)
    with pytest.raises(InputError):
        encode_driving_video(tmp_path / "none.mp4", rt, 25, 10)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(InputError):
        encode_driving_video(bad, rt, 25, 10)


def test_render_onnxruntime_matches_torch(tmp_path, portrait, speech, monkeypatch):
    """The same render through ONNX Runtime (exported on the fly into a fresh cache) decodes to the
    same frames as the torch reference, within codec noise."""
    monkeypatch.setenv("MARIONETTE_CACHE_DIR", str(tmp_path / "cache"))
    outs = {}
    for backend in ("torch", "onnxruntime"):
        outs[backend] = tmp_path / f"{backend}.mp4"
        render(_cfg(avatar=portrait, audio=speech, out=outs[backend], backend=backend, seed=1))
    a, b = _probe(outs["torch"])["frames"], _probe(outs["onnxruntime"])["frames"]
    assert len(a) == len(b) > 0
    diff = np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 12, (diff.mean(), diff.max())


def _checkpoint_with_idle_model(path: Path, fps: int = 25) -> Path:
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.idle_model import IdleModelConfig, IdleMotionModel, save_idle_model
    from engine.model import Marionette

    torch.manual_seed(0)
    idle = IdleMotionModel(IdleModelConfig(hidden=16, audio_dim=8, style_dim=8, fps=fps))
    path.mkdir(parents=True)
    entry = save_idle_model(idle, path)
    return save_checkpoint(Marionette(ModelConfig.preset("tiny")), path, meta={"idle_model": entry})


def test_render_uses_the_checkpoints_learned_idle_model(tmp_path, portrait):
    """A checkpoint with an idle model drives the idle head and eyes with it (seeded, fed the clip's
    log-mel); one whose idle model runs at another frame rate falls back to the procedural source."""
    from engine.audio import load_audio, log_mel
    from engine.composer import IdleSource
    from engine.idle_model import LearnedIdleSource, load_idle_model

    ckpt = _checkpoint_with_idle_model(tmp_path / "ckpt")
    wav = _write_wav(tmp_path / "a.wav", _speechlike(1.2))
    job = prepare_render(RenderConfig(avatar=portrait, audio=wav, out=tmp_path / "c.mp4", checkpoint=ckpt, seed=2))
    assert job.composer.sources["pose"] is job.composer.sources["eye"]
    assert isinstance(job.composer.sources["pose"], LearnedIdleSource)
    ref = LearnedIdleSource(load_idle_model(ckpt), seed=2)
    ref.push_mel(log_mel(load_audio(wav), job.runtime.cfg.audio).numpy())
    sl = job.runtime.cfg.latents.slices()
    z = job.composer.compose_batch(0, job.n_frames)
    np.testing.assert_array_equal(z[:, sl["pose"]], ref.latents(0, job.n_frames, "pose"))
    np.testing.assert_array_equal(z[:, sl["eye"]], ref.latents(0, job.n_frames, "eye"))
    assert z[:, sl["pose"]].std(0).max() > 0
    assert len(_probe(write_render(job, tmp_path / "c.mp4"))["frames"]) == job.n_frames

    other = _checkpoint_with_idle_model(tmp_path / "ckpt30", fps=30)
    job = prepare_render(RenderConfig(avatar=portrait, audio=wav, out=tmp_path / "d.mp4", checkpoint=other))
    assert isinstance(job.composer.sources["pose"], IdleSource)
