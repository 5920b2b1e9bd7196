"""`marionette ingest`: real talking-head video -> the corpus layout, then `marionette train` on it.

The video is real in every part that matters: a real photograph (scikit-image's astronaut, matplotlib's
grace_hopper) moved and scaled over time, a clip of the synthetic corpus' renderer, a shot with no face
(scikit-image's coffee) and one with two faces, cut together, with real recorded speech (LibriVox, from
pocketsphinx-testdata) as 48 kHz stereo AAC, in an H.264 mp4 at 30 fps written by PyAV."""

from __future__ import annotations

import json
import math
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError

pytest.importorskip("dlib", reason="the default face detector (dlib-bin) is not installed")
mpl = pytest.importorskip("matplotlib")
skimage_data = pytest.importorskip("skimage.data")
av = pytest.importorskip("av")

from engine import face as F  # noqa: E402

GRACE = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
ASTRO = Path(skimage_data.__file__).parent / "astronaut.png"
COFFEE = Path(skimage_data.__file__).parent / "coffee.png"
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
SPEECH = [LIBRIVOX / f"sense_and_sensibility_01_austen_64kb-{n}.wav" for n in ("0870", "0880")]
W, H, SRC_FPS = 480, 360, 30
ASTRO_EYES = np.array([[202.5, 101.0], [246.0, 103.0]])  # tests/test_face.py's hand reference
# the shots (seconds at 30 fps): what the ingest must find
SHOTS = [("astro", 2.0), ("corpus", 2.0), ("coffee", 0.6), ("two", 0.6), ("astro2", 2.0)]


def _similarity(angle_deg: float, scale: float, centre_in, centre_out) -> np.ndarray:
    a = math.radians(angle_deg)
    A = scale * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    t = np.asarray(centre_out, float) - A @ np.asarray(centre_in, float)
    return np.concatenate([A, t[:, None]], 1)


def _speech() -> np.ndarray:
    parts = []
    for p in SPEECH:
        if not p.is_file():
            pytest.skip(f"{p} missing (the Makefile installs pocketsphinx-testdata)")
        with wave.open(str(p)) as w:
            assert w.getframerate() == 16000 and w.getnchannels() == 1
            parts.append(np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0)
    return np.concatenate(parts)


def _corpus_frames(n: int, size: int) -> np.ndarray:
    """A talking corpus face: the renderer's identity with a little head motion and the jaw moving."""
    import torch

    from trainer.corpus.face import FaceRenderer
    from trainer.corpus.face_identity import sample_identity

    ident = sample_identity(np.random.default_rng(5)).astype(np.float32)
    t = np.arange(n) / 25.0
    pose = np.zeros((n, 6), np.float32)
    pose[:, 0] = 6 * np.sin(2 * np.pi * 0.4 * t)
    pose[:, 1] = 3 * np.sin(2 * np.pi * 0.3 * t)
    pose[:, 5] = 1.0
    mouth = np.zeros((n, 3), np.float32)
    mouth[:, 0] = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) * 0.6
    with torch.no_grad():
        x = FaceRenderer(size).render(ident, pose, mouth=mouth)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def make_video(path: Path) -> dict:
    """Write the test video; returns the shot boundaries (s) and the speech samples (16 kHz)."""
    astro = F.load_photo(ASTRO)
    grace = F.load_photo(GRACE)
    coffee = F.load_photo(COFFEE)
    n_corpus = int(round(SHOTS[1][1] * SRC_FPS))
    corpus = _corpus_frames(n_corpus, 320)
    frames = []
    for name, secs in SHOTS:
        for i in range(int(round(secs * SRC_FPS))):
            if name in ("astro", "astro2"):  # the photo swaying, drifting and zooming a little: a live face
                s = 1.45 + (0.06 * i / 78 if name == "astro" else -0.04 * i / 78)
                m = _similarity(3.0 * math.sin(i / 9), s, ASTRO_EYES.mean(0),
                                (240 + 6 * math.sin(i / 7) + (0 if name == "astro" else 30), 150 + 3 * math.cos(i / 5)))
                img = F.warp_affine(astro, F._invert(m), W, H, resample="bicubic", fill=(40, 60, 80))
            elif name == "corpus":
                img = np.full((H, W, 3), 128, np.uint8)
                img[20:340, 80:400] = corpus[i]
            elif name == "coffee":  # no face: a slow pan over a cup of coffee
                img = np.ascontiguousarray(coffee[20 + i:20 + i + H, 60 + i:60 + i + W])
            else:  # two faces side by side
                img = np.full((H, W, 3), 200, np.uint8)
                m1 = _similarity(0, 1.2, ASTRO_EYES.mean(0), (120, 140))
                img[:, :240] = F.warp_affine(astro, F._invert(m1), 240, H, fill=(200, 200, 200))
                m2 = _similarity(0, 0.65, (264, 189), (120, 140))
                img[:, 240:] = F.warp_affine(grace, F._invert(m2), 240, H, fill=(200, 200, 200))
            frames.append(img)
    speech = _speech()[: int(len(frames) / SRC_FPS * 16000)]
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=SRC_FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        v.options = {"preset": "veryfast", "crf": "20"}
        a = c.add_stream("aac", rate=48000)
        a.layout = "stereo"
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, SRC_FPS)
            for p in v.encode(f):
                c.mux(p)
        res = av.AudioResampler(format="fltp", layout="stereo", rate=48000)
        pcm = (speech * 32767).astype(np.int16)
        for i in range(0, len(pcm), 1600):
            fr = av.AudioFrame.from_ndarray(pcm[None, i:i + 1600], format="s16", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = 16000, i, Fraction(1, 16000)
            for o in res.resample(fr):
                for p in a.encode(o):
                    c.mux(p)
        for o in res.resample(None):
            for p in a.encode(o):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        for p in a.encode(None):
            c.mux(p)
    bounds = np.cumsum([0.0] + [s for _, s in SHOTS])
    return {"bounds": bounds, "speech": speech}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The test video, ingested once through the CLI (module-scoped: several tests read the result)."""
    from marionette.cli import main

    d = tmp_path_factory.mktemp("ingest")
    video = d / "talk.mp4"
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the renderer's few frames: one thread is as fast and does not fight other work
    try:
        info = make_video(video)
    finally:
        torch.set_num_threads(n)
    out = d / "corpus"
    rc = main(["ingest", str(video), "--out", str(out), "--min-seconds", "1.8"])
    assert rc == 0
    return {"video": video, "out": out, **info}


# ------------------------------------------------------------------------------------------------ units
def test_speaker_names_and_splits(tmp_path):
    from trainer.ingest import IngestConfig, find_videos, speaker_of, split_for, validate

    p = Path("/data/vox/id00012/abc123/00001.mp4")
    assert speaker_of(p, "file") == "00001"
    assert speaker_of(p, "folder2") == "id00012"
    assert speaker_of(Path("/d/WDA_BarackObama_000.mp4"), r"re:_([A-Za-z]+)_\d+\.mp4$") == "BarackObama"
    with pytest.raises(InputError, match="no match"):
        speaker_of(Path("/d/x.mp4"), r"re:/id(\d+)/")
    # a speaker's split depends on its name only; over many names the fractions hold
    names = [f"spk{i}" for i in range(2000)]
    s = [split_for(n, 0.1, 0.2) for n in names]
    assert s == [split_for(n, 0.1, 0.2) for n in names]
    assert abs(s.count("val") / 2000 - 0.1) < 0.03 and abs(s.count("test") / 2000 - 0.2) < 0.03
    with pytest.raises(InputError, match="needs a group"):
        validate(IngestConfig(videos=(p,), out=tmp_path, speaker_from="re:abc"))
    with pytest.raises(InputError, match="no videos found"):
        find_videos([tmp_path])
    with pytest.raises(InputError, match="not found"):
        find_videos([tmp_path / "missing.mp4"])


# ------------------------------------------------------------------------------------------ end to end
def test_layout_clips_and_report(ingested):
    from trainer.corpus.dataset_layout import load_manifest
    from trainer.data import list_clips

    out = ingested["out"]
    man = load_manifest(out)
    assert man["source"] == "ingest" and man["fps"] == 25 and man["size"] == 256
    report = json.loads((out / "ingest_report.json").read_text())
    (v,) = report["videos"]
    assert v["status"] == "done" and v["speaker"] == "talk"
    assert v["split"] == "train"  # the only speaker: never held out
    b = ingested["bounds"]
    # three face shots -> three clips, each within its shot; the coffee and two-face shots skipped
    starts = sorted(c["start_s"] for c in v["clips"])
    assert len(starts) == 3, v
    for c, (k0, k1) in zip(sorted(v["clips"], key=lambda c: c["start_s"]), [(b[0], b[1]), (b[1], b[2]), (b[4], b[5])]):
        assert k0 - 0.05 <= c["start_s"] and c["end_s"] <= k1 + 0.05, (c, k0, k1)
        assert c["duration"] >= 1.8 and c["end_s"] - c["start_s"] > 0.9 * (k1 - k0), c
    reasons = {}
    for s in v["skipped"]:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + s["frames"]
    assert 13 <= reasons.get("no_face", 0) <= 20, v["skipped"]  # the coffee shot: 15 frames
    assert 12 <= reasons.get("several_faces", 0) <= 16, v["skipped"]  # the two-face shot: 15 frames
    for t in b[1:5]:  # every cut found within a frame
        assert min(abs(c - t) for c in v["cuts"]) <= 0.05, (t, v["cuts"])
    assert len(v["cuts"]) <= 5
    # the trainer's reader sees exactly these clips, without factor tables
    clips = list_clips(out, "train")
    assert len(clips) == 3 and all(c.factors is None and c.audio is not None for c in clips)
    assert {c.name for c in clips} == {c["clip"] for c in v["clips"]}
    assert not any(out.glob("*/*/*.npz")) or all(p.name.endswith(".face.npz") for p in out.glob("*/*/*.npz"))


def test_clips_are_25fps_crops_in_the_model_framing_with_aligned_speech(ingested):
    from trainer.data import list_clips

    out = ingested["out"]
    speech = ingested["speech"]
    for ref in list_clips(out, "train"):
        meta = json.loads(ref.meta.read_text())
        with av.open(str(ref.video)) as c:
            st = c.streams.video[0]
            assert st.average_rate == 25 and (st.width, st.height) == (256, 256)
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
        with wave.open(str(ref.audio)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            wav = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767.0
        n = len(frames)
        assert n == meta["frames"] and len(wav) == n * 640
        with np.load(ref.video.with_suffix(".face.npz")) as z:
            lm, pose, det = z["landmarks"], z["pose"], z["detected"]
        assert lm.shape == (n, 68, 2) and pose.shape == (n, 3) and det.any()
        ok = np.isfinite(lm[:, 0, 0])
        assert ok.mean() > 0.9
        # the eyes where the corpus framing puts them (the tracker's dead zone lets the head move a little)
        eyes = np.stack([lm[ok, 36:42].mean(1), lm[ok, 42:48].mean(1)], 1)
        np.testing.assert_allclose(np.median(eyes, 0), F.TEMPLATE_256[:2], atol=0.08 * 256 + 6)
        assert np.nanmax(np.abs(pose[:, 0])) < 40
        # the speech lined up with the source: the clip's samples are the source's at its start time
        a = int(round(meta["start_s"] * 16000))
        m = min(len(wav), len(speech) - a - 160)
        assert m > 16000
        r = np.corrcoef(speech[a:a + m], wav[:m])[0, 1]
        assert r > 0.9, (ref.name, r)
        lag_r = np.corrcoef(speech[a + 160:a + 160 + m], wav[:m])[0, 1]  # 10 ms off: clearly worse
        assert r > lag_r + 0.1, (r, lag_r)


def test_rerun_skips_finished_videos_and_clears_leftovers(ingested, tmp_path):
    from marionette.cli import main
    from trainer.ingest import WORK

    out = ingested["out"]
    files = sorted(p for p in out.rglob("*") if p.is_file() and WORK not in p.parts)
    stamp = {p: p.stat().st_mtime_ns for p in files}
    # what a killed run leaves: its partial folder
    junk = out / WORK / "partial" / "other-video" / "x_000.mp4"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"half an mp4")
    rc = main(["ingest", str(ingested["video"]), "--out", str(out), "--min-seconds", "1.8"])
    assert rc == 0
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["last_run"]["already_done"] == 1 and report["last_run"]["ingested"] == 0
    assert not (out / WORK / "partial").exists()
    assert {p: p.stat().st_mtime_ns for p in files if p.name not in ("manifest.json", "ingest_report.json")} == \
        {p: t for p, t in stamp.items() if p.name not in ("manifest.json", "ingest_report.json")}


@pytest.fixture
def one_thread():
    """One intra-op thread (as tests/test_trainer.py): on this shared 2-core machine two OpenMP threads
    contending with other work made these few steps 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_tiny_runs_on_the_ingested_corpus(ingested, tmp_path, capsys, one_thread):
    from marionette.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--config", "tiny", "--data", str(ingested["out"]), "--out", str(run), "--steps", "2",
               "--batch", "2", "--workers", "0", "--log-every", "1", "--device", "cpu"])
    assert rc == 0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in recs} == {"motion", "factors", "expression", "idle"}
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert (run / "checkpoint").is_dir()
    # the built-in recipe's audio stage needs the synthetic corpus' labels: a clear error, before any work
    rc = main(["train", "--config", "talk", "--stage", "audio", "--data", str(ingested["out"]),
               "--out", str(tmp_path / "run2"), "--device", "cpu"])
    assert rc == 2
    assert "needs per-frame ground-truth" in capsys.readouterr().err


def test_bad_inputs_are_listed_not_fatal(tmp_path):
    """A file that is no video and a video without speech: reported as failed, the run goes on."""
    from trainer.ingest import IngestConfig, ingest

    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    mute = tmp_path / "mute.mp4"
    with av.open(str(mute), "w") as c:
        v = c.add_stream("libx264", rate=25)
        v.width = v.height = 64
        v.pix_fmt = "yuv420p"
        for i in range(5):
            f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 50 * i, np.uint8), format="rgb24")
            f.pts = i
            for p in v.encode(f):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    out = tmp_path / "out"
    s = ingest(IngestConfig(videos=(bad, mute), out=out, progress=False))
    assert s.failed == 2 and s.done == 0
    report = json.loads((out / "ingest_report.json").read_text())
    errs = {Path(v["video"]).name: v["error"] for v in report["videos"]}
    assert "cannot open" in errs["notes.mp4"] and "no audio stream" in errs["mute.mp4"]
    with pytest.raises(InputError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "x.txt").write_text("x")
        ingest(IngestConfig(videos=(mute,), out=tmp_path / "other", progress=False))


def make_simple_video(path: Path, seconds: float, x0: float = 240.0, audio_seconds: float | None = None) -> None:
    """The astronaut photo swaying, with speech: one plain talking-head shot."""
    astro = F.load_photo(ASTRO)
    speech = _speech()
    n = int(round(seconds * SRC_FPS))
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=SRC_FPS)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        v.options = {"preset": "veryfast"}
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(n):
            m = _similarity(3.0 * math.sin(i / 9), 1.45, ASTRO_EYES.mean(0), (x0 + 6 * math.sin(i / 7), 150))
            f = av.VideoFrame.from_ndarray(F.warp_affine(astro, F._invert(m), W, H, fill=(40, 60, 80)), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, SRC_FPS)
            for p in v.encode(f):
                c.mux(p)
        pcm = (speech[: int((seconds if audio_seconds is None else audio_seconds) * 16000)] * 32767).astype(np.int16)
        for i in range(0, len(pcm), 1024):
            fr = av.AudioFrame.from_ndarray(pcm[None, i:i + 1024], format="s16", layout="mono")
            fr.sample_rate, fr.pts, fr.time_base = 16000, i, Fraction(1, 16000)
            for p in a.encode(fr):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
        for p in a.encode(None):
            c.mux(p)


@pytest.mark.slow
def test_killed_ingest_leaves_only_complete_clips_and_resumes(tmp_path):
    """SIGKILL in the middle of the second of three videos: the trainer sees only complete clips of the
    first, the manifest lists only them; the rerun (two worker processes) skips the first and finishes the
    others, no duplicates."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from trainer.data import list_clips

    videos = []
    for i, name in enumerate(("anna", "bert", "carl")):
        p = tmp_path / f"{name}.mp4"
        make_simple_video(p, 6.0, x0=200.0 + 30 * i)
        videos.append(p)
    out = tmp_path / "corpus"
    cmd = [sys.executable, "-m", "marionette", "ingest", *map(str, videos), "--out", str(out), "--val", "0",
           "--test", "0", "--max-seconds", "2.5", "--min-seconds", "1.8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).resolve().parents[1])
    t_end = time.monotonic() + 120
    killed = False
    try:
        while time.monotonic() < t_end and proc.poll() is None:
            done = list((out / ".ingest" / "videos").glob("*.json")) if (out / ".ingest" / "videos").is_dir() else []
            part = list((out / ".ingest" / "partial").glob("bert-*/*.mp4")) if done else []
            if done and part:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
    assert killed, "the ingest finished before it could be killed"
    clips = list_clips(out, "train")
    assert clips and {c.identity for c in clips} == {"anna"}, [c.key for c in clips]
    for c in clips:  # every clip the trainer lists is complete
        assert c.audio is not None and c.video.with_suffix(".face.npz").is_file() and c.meta is not None
        with av.open(str(c.video)) as cont:
            assert cont.streams.video[0].frames > 0 or sum(1 for _ in cont.decode(video=0)) > 0
    man = json.loads((out / "manifest.json").read_text())
    assert {c["identity"] for c in man["clips"]} == {"anna"} and len(man["clips"]) == len(clips)
    first = {c.key for c in clips}
    # the rerun with two worker processes (one video each)
    r = subprocess.run(cmd + ["--workers", "2"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "ingest_report.json").read_text())
    assert report["last_run"]["already_done"] == 1 and report["last_run"]["ingested"] == 2
    clips = list_clips(out, "train")
    assert {c.identity for c in clips} == {"anna", "bert", "carl"}
    assert first <= {c.key for c in clips}
    per = {s: [c for c in clips if c.identity == s] for s in ("anna", "bert", "carl")}
    assert all(len(v) == len(per["anna"]) for v in per.values()), {k: len(v) for k, v in per.items()}
    assert not (out / ".ingest" / "partial").exists()


def test_frames_come_upright_and_at_25_fps(tmp_path):
    """A phone's portrait video is stored sideways with a display rotation: frames come out upright (the face
    findable); 30 fps in -> 25 fps out, each output frame the source frame on screen at its time."""
    from trainer.ingest import frames_at

    astro = F.load_photo(ASTRO)
    up = F.warp_affine(astro, F._invert(_similarity(0, 1.2, ASTRO_EYES.mean(0), (180, 200))), 360, 480)
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=30)
        stored = np.ascontiguousarray(np.rot90(up, -1))  # the sensor's landscape frame
        v.width, v.height, v.pix_fmt = stored.shape[1], stored.shape[0], "yuv420p"
        v.set_display_rotation(90)
        for i in range(30):
            f = av.VideoFrame.from_ndarray(stored, format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 30)
            for p in v.encode(f):
                c.mux(p)
        for p in v.encode(None):
            c.mux(p)
    out = list(frames_at(path, 25))
    assert len(out) == 25 and [k for k, _, _ in out] == list(range(25))
    k, t, rgb = out[0]
    assert rgb.shape == (480, 360, 3)
    assert np.abs(rgb.astype(int) - up).mean() < 6  # upright, not sideways
    assert F.get_detector().detect(rgb), "no face in the upright frame"
    # output frame k shows source frame floor(k * 30 / 25): the times say so
    np.testing.assert_allclose([t for _, t, _ in out], [math.floor(k * 30 / 25 + 1e-9) / 30 for k in range(25)],
                               atol=1e-6)


def test_frames_past_the_speech_are_skipped(tmp_path):
    """The audio track ends a second before the picture: those frames are listed as no_audio, not kept with
    silence (a mouth moving over silence would teach lip sync wrong)."""
    from trainer.ingest import IngestConfig, ingest

    video = tmp_path / "short_audio.mp4"
    make_simple_video(video, 3.0, audio_seconds=2.0)
    out = tmp_path / "out"
    s = ingest(IngestConfig(videos=(video,), out=out, min_seconds=1.0, progress=False))
    assert s.done == 1 and s.clips == 1
    (v,) = json.loads((out / "ingest_report.json").read_text())["videos"]
    (clip,) = v["clips"]
    # (AAC pads the speech to whole 64 ms packets: the decoded track may run up to one packet longer)
    assert clip["start_s"] == 0.0 and 1.9 <= clip["duration"] <= 2.08, clip
    no_audio = [x for x in v["skipped"] if x["reason"] == "no_audio"]
    assert 23 <= sum(x["frames"] for x in no_audio) <= 25 and 2.0 <= no_audio[0]["start_s"] <= 2.08, v["skipped"]
    assert no_audio[-1]["end_s"] == 3.0
