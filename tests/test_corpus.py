"""The synthetic corpus end to end: real espeak-ng speech, rendered frames, mp4/wav/npz/json on disk."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError, MissingDependency
from trainer.corpus import factors, generate, speech
from trainer.corpus.dataset_layout import identity_vectors, iter_clips, load_clip, load_manifest
from trainer.corpus.generate import CorpusConfig, clip_rng, clip_speech, generate_corpus, split_of
from trainer.corpus.trajectories import clip_trajectory, frame_times, mouth_track, viseme_track

# the arguments of the `small_corpus` fixture (tests/conftest.py), which the regeneration test reproduces
SMALL = dict(identities=3, clips_per_identity=2, seconds=2.0, size=64, fps=25, seed=7)


def _decode(path: Path) -> tuple[np.ndarray, dict]:
    import av

    with av.open(str(path)) as c:
        v = c.streams.video[0]
        info = {"has_audio": bool(c.streams.audio), "duration": c.duration / 1e6,
                "video_duration": float(v.duration * v.time_base), "fps": float(v.average_rate)}
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_duration"] = float(a.duration * a.time_base)
            info["audio_rate"] = a.rate
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(v)])
    return frames, info


def _cfg(out: Path, **kw) -> CorpusConfig:
    return CorpusConfig(out=out, **{**SMALL, **kw})


# ------------------------------------------------------------------------------------------ layout
def test_manifest_and_layout(small_corpus, small_corpus_args):
    assert small_corpus_args == SMALL
    m = load_manifest(small_corpus)
    a = SMALL
    assert m["version"] == 1 and m["seed"] == a["seed"] and m["fps"] == a["fps"] and m["size"] == a["size"]
    assert m["arguments"]["identities"] == 3 and m["arguments"]["clips_per_identity"] == 2
    assert m["factor_groups"] == json.loads(json.dumps(factors.manifest_groups()))
    assert m["expression_presets"]["names"] == list(factors.PRESET_NAMES)
    # one identity per split, identity vectors stored (re-renderable)
    assert {s: len(v) for s, v in m["splits"].items()} == {"train": 1, "val": 1, "test": 1}
    vecs = identity_vectors(m)
    assert len(vecs) == 3 and all(v.shape == (len(m["identity_fields"]),) for v in vecs.values())
    clips = list(iter_clips(small_corpus))
    assert len(clips) == len(m["clips"]) == 6
    assert {c.split for c in clips} == {"train", "val", "test"}
    for s in ("train", "val", "test"):
        assert len(list(iter_clips(small_corpus, s))) == 2
    on_disk = sorted(p.relative_to(small_corpus).as_posix() for p in small_corpus.rglob("*") if p.is_file())
    expected = sorted(["manifest.json"] + [f"{c.path}{e}" for c in clips for e in (".mp4", ".wav", ".npz", ".json")])
    assert on_disk == expected
    assert not list(small_corpus.parent.glob(".*partial*"))
    durations = [c.duration for c in clips]
    assert min(durations) >= 1.0 and max(durations) <= 3.0 and len(set(durations)) > 1  # vary around --seconds


def test_every_clip_is_aligned(small_corpus):
    m = load_manifest(small_corpus)
    fps, size = m["fps"], m["size"]
    for c in iter_clips(small_corpus, manifest=m):
        d = load_clip(c)
        T = c.frames
        assert T == round(c.duration * fps)
        for g in factors.GROUP_NAMES:
            arr = d.factors[g]
            assert arr.shape == (T, factors.dims(g)) and arr.dtype == np.float32
            lo, hi = factors.ranges(g)
            assert (arr >= lo - 1e-6).all() and (arr <= hi + 1e-6).all(), g
        assert d.factors["expression_preset"].shape == (T,)
        assert d.factors["expression_intensity"].shape == (T,)
        assert set(np.unique(d.factors["expression_preset"])) <= set(range(len(factors.PRESET_NAMES)))
        with wave.open(str(c.wav)) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert w.getnframes() == T * 16000 // fps  # 640 samples per frame at 25 fps, exactly
        assert len(d.samples) == T * 16000 // fps
        frames, info = _decode(c.mp4)
        assert abs(len(frames) - T) <= 1 and frames.shape[1:] == (size, size, 3)
        assert info["has_audio"] and info["audio_rate"] == 16000 and info["fps"] == fps
        wav_s = len(d.samples) / 16000
        for k in ("duration", "video_duration", "audio_duration"):
            assert abs(info[k] - wav_s) <= 1.0 / fps, (k, info[k], wav_s)
        meta = d.meta
        assert meta["frames"] == T and meta["identity"] == c.identity and meta["text"]
        assert meta["voice"] and meta["rate"] and meta["phonemes"] and meta["visemes"]
        assert len(meta["identity_vector"]) == len(m["identity_fields"])
        # the phoneme track tiles the clip
        ph = meta["phonemes"]
        assert ph[0][1] == 0 and abs(ph[-1][2] - 1000 * c.duration) < 1e-3
        assert all(abs(a[2] - b[1]) < 1e-3 for a, b in zip(ph, ph[1:]))


def test_frames_show_the_stored_factors(small_corpus):
    """Frame 0 of an mp4 matches a fresh render from the stored identity vector and factors (codec noise)."""
    import torch

    from trainer.corpus.face import FaceRenderer

    m = load_manifest(small_corpus)
    c = next(iter_clips(small_corpus, "train", manifest=m))
    d = load_clip(c, audio=False)
    r = FaceRenderer(size=m["size"])
    ident = identity_vectors(m)[c.identity]
    img = r.render(ident, *(d.factors[g][:1] for g in ("pose", "eyes", "mouth", "expression")))
    ref = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().astype(np.float32)
    frames, _ = _decode(c.mp4)
    assert np.abs(frames[0].astype(np.float32) - ref).mean() < 4.0


# --------------------------------------------------------------------------------------- speech cues
def test_mouth_follows_the_phonemes(small_corpus):
    fps = load_manifest(small_corpus)["fps"]
    speech_jaw, silent_jaw = [], []
    for c in iter_clips(small_corpus):
        d = load_clip(c, audio=False)
        jaw = d.factors["mouth"][:, 0]
        t = frame_times(c.frames, fps) * 1000
        pauses = [(p[1], p[2]) for p in d.meta["phonemes"] if p[0].startswith("_")]
        voiced = [(p[1], p[2]) for p in d.meta["phonemes"] if not p[0].startswith("_")]
        for i, ti in enumerate(t):
            dist = min((max(a - ti, ti - b, 0.0) for a, b in voiced), default=1e9)
            if any(a <= ti < b for a, b in pauses) and dist > 120:
                silent_jaw.append(jaw[i])
            elif any(a <= ti < b for a, b in voiced):
                speech_jaw.append(jaw[i])
    assert len(silent_jaw) > 10 and len(speech_jaw) > 50
    assert max(silent_jaw) < 0.03  # silence closes the mouth
    assert np.mean(speech_jaw) > 0.12 and np.mean(speech_jaw) > 5 * np.mean(silent_jaw) + 0.05
    assert np.percentile(speech_jaw, 95) > 0.3  # and speech opens it


def test_lip_closure_and_rounding_visemes():
    """/p b m/ close the lips, /u/ rounds them, /i/ spreads them, with coarticulation in between."""
    from trainer.corpus.speech import Phoneme

    ph = [Phoneme("_", 0, 300), Phoneme("m", 300, 400), Phoneme("A:", 400, 600), Phoneme("p", 600, 700),
          Phoneme("u:", 700, 900), Phoneme("s", 900, 980), Phoneme("i:", 980, 1180), Phoneme("_", 1180, 1600)]
    t = np.array([0.15, 0.35, 0.5, 0.65, 0.8, 1.08, 1.5])
    m = mouth_track(viseme_track(ph), t)
    jaw, width, rnd = m[:, 0], m[:, 1], m[:, 2]
    assert jaw[0] < 0.01 and jaw[-1] < 0.01          # silence: closed
    assert jaw[1] < 0.1 and jaw[3] < 0.1             # m, p: lips together
    assert jaw[2] > 0.6                              # ah: open
    assert rnd[4] > 0.7 and width[4] < -0.4          # oo: rounded
    assert width[5] > 0.5 and rnd[5] < 0.2           # ee: spread


def test_trajectories_have_blinks_saccades_nods_and_stay_in_range():
    counts = {"blinks": 0, "saccades": 0, "nods": 0, "segments": 0}
    big = 0.0
    for c in range(12):
        rng = clip_rng(0, 0, c)
        sp = clip_speech(rng, 4.0, 25)
        tr = clip_trajectory(rng, sp.phonemes, sp.samples, sp.frames, 25)
        for g in factors.GROUP_NAMES:
            lo, hi = factors.ranges(g)
            assert (tr.factors[g] >= lo).all() and (tr.factors[g] <= hi).all()
        for k in counts:
            counts[k] += len(tr.events[k])
        big = max(big, float(np.abs(tr.factors["pose"][:, 0]).max()))
        lids = tr.factors["eyes"][:, 2:]
        for b in tr.events["blinks"]:
            i = int(b["time"] * 25 + 2)
            if b["kind"] == "both" and i < len(lids):
                assert lids[max(i - 2, 0):i + 4].max() > 0.5
    assert counts["blinks"] >= 6 and counts["saccades"] >= 10 and counts["nods"] >= 12
    assert counts["segments"] > 12  # expression changes sometimes
    assert big > 15  # occasionally a large turn


def test_nods_follow_stressed_syllables():
    """Head pitch dips after the stressed syllables: pitch velocity correlates with speech onsets."""
    rng = clip_rng(5, 0, 0)
    sp = clip_speech(rng, 6.0, 25)
    tr = clip_trajectory(rng, sp.phonemes, sp.samples, sp.frames, 25)
    t = frame_times(sp.frames, 25)
    nods = tr.events["nods"]
    assert nods
    pitch = tr.factors["pose"][:, 1]
    for n in nods:
        i = int(np.argmin(np.abs(t - n["time"])))
        window = pitch[max(i - 8, 0):i + 9]
        assert window.min() < pitch[max(i - 8, 0)] or window.min() < pitch[min(i + 8, len(pitch) - 1)]


# ------------------------------------------------------------------------------------ determinism
def test_clip_generation_is_deterministic_and_seeded():
    def clip(seed):
        rng = clip_rng(seed, 1, 0)
        sp = clip_speech(rng, 2.0, 25)
        return sp, clip_trajectory(rng, sp.phonemes, sp.samples, sp.frames, 25)

    (a, ta), (b, tb), (c, tc) = clip(7), clip(7), clip(8)
    assert np.array_equal(a.samples, b.samples) and a.phonemes == b.phonemes
    for k in ta.factors:
        assert np.array_equal(ta.factors[k], tb.factors[k])
    assert len(a.samples) != len(c.samples) or not np.array_equal(a.samples, c.samples)
    assert not np.array_equal(ta.factors["pose"][:5], tc.factors["pose"][:5])


def test_regeneration_with_workers_is_identical(small_corpus, tmp_path):
    """Same seed again, in 2 worker processes: the same factors and wav bytes, frames within codec noise.
    (clips are seeded per (seed, identity, clip), so the first clip of each identity is comparable)."""
    out = generate_corpus(_cfg(tmp_path / "again", clips_per_identity=1, workers=2))
    m1, m2 = load_manifest(small_corpus), load_manifest(out)
    assert m1["identities"] == m2["identities"]
    for c2 in iter_clips(out, manifest=m2):
        c1 = next(c for c in iter_clips(small_corpus, manifest=m1) if c.path == c2.path)
        assert c1.wav.read_bytes() == c2.wav.read_bytes()
        with np.load(c1.npz) as z1, np.load(c2.npz) as z2:
            assert sorted(z1.files) == sorted(z2.files)
            for k in z1.files:
                assert np.array_equal(z1[k], z2[k]), k
        j1, j2 = json.loads(c1.json.read_text()), json.loads(c2.json.read_text())
        assert j1 == j2
        f1, _ = _decode(c1.mp4)
        f2, _ = _decode(c2.mp4)
        assert f1.shape == f2.shape and np.abs(f1.astype(np.int16) - f2.astype(np.int16)).mean() < 1.0


def test_different_seed_gives_different_identities():
    from trainer.corpus.face import sample_identity

    a = sample_identity(generate.identity_rng(7, 0))
    b = sample_identity(generate.identity_rng(8, 0))
    assert not np.array_equal(a, b)


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kw, message", [
    ({"identities": 0}, "--identities"),
    ({"clips_per_identity": -1}, "--clips-per-identity"),
    ({"workers": 0}, "--workers"),
    ({"size": 60}, "multiple of 8"),
    ({"size": 8}, "--size"),
    ({"seconds": 0.5}, "too short"),
    ({"seconds": -2.0}, "--seconds"),
    ({"fps": 2}, "--fps"),
    ({"seed": -1}, "--seed"),
    ({"device": "tpu"}, "--device"),
])
def test_bad_arguments_are_input_errors(tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        generate_corpus(_cfg(tmp_path / "c", **kw))
    assert not (tmp_path / "c").exists()
    assert not list(tmp_path.iterdir())


def test_existing_directory_is_left_alone(tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="--overwrite"):
        generate_corpus(_cfg(out))
    with pytest.raises(InputError, match="not a corpus"):  # --overwrite only ever replaces a corpus
        generate_corpus(_cfg(out, overwrite=True))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        generate_corpus(_cfg(tmp_path / "file"))


class _BlankRenderer:
    def __init__(self, size):
        self.size = size

    def render(self, identity, pose, eyes, mouth, expression):
        import torch

        return torch.zeros(len(pose), 3, self.size, self.size)


@pytest.mark.parametrize("exc", [RuntimeError("renderer exploded"), KeyboardInterrupt()])
def test_failed_generation_leaves_nothing(tmp_path, monkeypatch, exc):
    calls = []
    real = generate.make_clip

    def flaky(task):
        calls.append(task)
        if len(calls) == 2:
            raise exc
        return real(task)

    monkeypatch.setattr(generate, "make_clip", flaky)
    monkeypatch.setattr(generate, "_renderer", lambda size, device: _BlankRenderer(size))  # fast; files still written
    with pytest.raises(type(exc)):
        generate_corpus(_cfg(tmp_path / "c", identities=2, clips_per_identity=1, seconds=1.0))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_corpus(tmp_path, monkeypatch):
    out = tmp_path / "c"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')

    def boom(task):
        raise RuntimeError("boom")

    monkeypatch.setattr(generate, "make_clip", boom)
    with pytest.raises(RuntimeError):
        generate_corpus(_cfg(out, overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["c"] and json.loads((out / "manifest.json").read_text()) == {"old": True}


def test_missing_espeak_is_reported_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(speech.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(speech, "_can_load", lambda name: False)
    monkeypatch.setattr(speech, "_HELPER", speech._Helper())
    with pytest.raises(MissingDependency, match="apt-get install espeak-ng"):
        generate_corpus(_cfg(tmp_path / "c"))
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_bad_input_cleanly(tmp_path, capsys):
    from marionette.cli import main

    rc = main(["corpus", "--out", str(tmp_path / "c"), "--identities", "1", "--clips-per-identity", "1",
               "--seconds", "2", "--size", "60"])
    assert rc == 2 and "multiple of 8" in capsys.readouterr().err


def test_splits_are_by_identity():
    assert [split_of(i, 1) for i in range(1)] == ["train"]
    assert [split_of(i, 2) for i in range(2)] == ["train", "val"]
    assert [split_of(i, 3) for i in range(3)] == ["train", "val", "test"]
    s = [split_of(i, 20) for i in range(20)]
    assert (s.count("train"), s.count("val"), s.count("test")) == (16, 2, 2)


# ----------------------------------------------------------------------------------------- preview
def test_preview_contact_sheet(small_corpus, tmp_path):
    from PIL import Image

    from trainer.corpus.preview import CELL, columns, make_preview, sheet_size

    out = make_preview(small_corpus, tmp_path / "sheet.png", identities=1)
    img = Image.open(out)
    assert img.format == "PNG" and img.size == sheet_size(1)
    a = np.asarray(img.convert("RGB")).astype(np.int16)
    from trainer.corpus.preview import HEADER, LABEL_W

    cells = [a[HEADER:HEADER + CELL, LABEL_W + j * CELL:LABEL_W + (j + 1) * CELL] for j in range(len(columns()))]
    # every sweep column differs from the neutral face (each factor visibly changes the render)
    assert all(np.abs(cells[j] - cells[0]).mean() > 0.005 for j in range(1, len(cells)))
    with pytest.raises(InputError, match="manifest"):
        make_preview(tmp_path, tmp_path / "x.png")
