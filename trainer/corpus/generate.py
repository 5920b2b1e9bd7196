"""`marionette corpus`: render the synthetic talking-head corpus to disk.

Layout (`dataset_layout` reads it; the trainer reads real video in the same layout, minus ground truth):

    DIR/manifest.json                     version, seed, arguments, fps, size, factor groups, presets,
                                          identities (split, renderer identity vector), clip list
    DIR/<split>/<identity>/<clip>.mp4     H.264 (yuv420p) video + AAC audio of the same speech
    DIR/<split>/<identity>/<clip>.wav     16 kHz mono PCM16: the exact samples
    DIR/<split>/<identity>/<clip>.npz     one (T, D) float32 array per factor group, one row per video
                                          frame, + expression_preset (T,) int64, expression_intensity (T,)
    DIR/<split>/<identity>/<clip>.json    text, voice, phoneme / viseme / word timings, events

Alignment: video frame i covers audio samples [i * 16000 / fps, (i + 1) * 16000 / fps); a clip has
round(duration * fps) frames and exactly round(frames * 16000 / fps) samples (frames * 16000 / fps
when fps divides 16000, as 25 does).

Determinism: identity i is drawn from `default_rng([seed, i, 1])` and clip c of identity i from
`default_rng([seed, i, c, 2])`, and espeak-ng is deterministic per utterance (see `speech`), so
factors and wav bytes depend only on the arguments, never on --workers.

Safety: everything is written to a hidden temporary directory next to DIR and moved into place when
complete, so a failed or interrupted run leaves no DIR behind (and an existing DIR untouched).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import time
import wave
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

from engine.errors import InputError
from trainer.corpus import factors, speech
from trainer.corpus.trajectories import clip_trajectory
from trainer.corpus.words import random_sentence

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
SAMPLE_RATE = speech.SAMPLE_RATE
RENDER_BATCH = 32
MIN_SECONDS = 1.0
MAX_SECONDS = 600.0
SIZE_RANGE = (32, 1024)
FPS_RANGE = (10, 60)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class CorpusConfig:
    out: Path
    identities: int
    clips_per_identity: int
    seconds: float
    size: int = 256
    fps: int = 25
    seed: int = 0
    workers: int = 1
    device: str = "cpu"
    overwrite: bool = False


@dataclass
class Timings:
    """Seconds spent per stage (summed over clips, in whichever process did the work)."""

    speech: float = 0.0
    trajectory: float = 0.0
    render: float = 0.0
    encode: float = 0.0
    write: float = 0.0

    def add(self, other: "Timings") -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class CorpusStats:
    clips: int = 0
    frames: int = 0
    video_seconds: float = 0.0
    wall_seconds: float = 0.0
    timings: Timings = field(default_factory=Timings)


# ------------------------------------------------------------------------------------ validation
def validate(cfg: CorpusConfig) -> None:
    """Raise InputError naming the problem for arguments that cannot make a corpus."""

    def whole(name: str, v) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise InputError(f"{name} must be a whole number, got {v!r}")
        return int(v)

    for name in ("identities", "clips_per_identity", "workers"):
        if whole(name, getattr(cfg, name)) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {getattr(cfg, name)}")
    size, fps, seed = whole("size", cfg.size), whole("fps", cfg.fps), whole("seed", cfg.seed)
    if not isinstance(cfg.seconds, (int, float)) or not np.isfinite(cfg.seconds) or cfg.seconds <= 0:
        raise InputError(f"--seconds must be a positive number, got {cfg.seconds!r}")
    if cfg.seconds < MIN_SECONDS:
        raise InputError(f"--seconds {cfg.seconds:g} is too short to hold speech: clips need at least "
                         f"{MIN_SECONDS:g} s (leading silence, a phrase, trailing silence)")
    if cfg.seconds > MAX_SECONDS:
        raise InputError(f"--seconds {cfg.seconds:g} is longer than the {MAX_SECONDS:g} s a clip may last")
    if size <= 0 or size % 8:
        raise InputError(f"--size must be a positive multiple of 8 (the video codec's blocks), got {size}")
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise InputError(f"--size {size} is outside {SIZE_RANGE[0]}..{SIZE_RANGE[1]} pixels")
    if not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise InputError(f"--fps {fps} is outside {FPS_RANGE[0]}..{FPS_RANGE[1]}: lip motion needs at least "
                         f"{FPS_RANGE[0]} frames per second")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")
    if round(MIN_SECONDS * fps) < 2:
        raise InputError(f"--fps {fps} gives fewer than 2 frames per clip")
    dev = str(cfg.device)
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InputError(f"--device {dev}: CUDA is not available on this machine (use --device cpu)")
    elif dev != "cpu":
        raise InputError(f"--device must be cpu or cuda[:N], got {dev!r}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise InputError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
        if not (out / "manifest.json").is_file():
            raise InputError(f"--out {out} is not empty and is not a corpus (no manifest.json); "
                             "refusing to replace it even with --overwrite")


def split_of(index: int, n: int) -> str:
    """Identity `index` of `n` -> train/val/test: ~80/10/10, at least one train identity; with 3 one each."""
    if n >= 3:
        n_eval = max(1, round(0.1 * n))
        n_train = n - 2 * n_eval
    elif n == 2:
        n_eval, n_train = 0, 1
        return "train" if index == 0 else "val"
    else:
        return "train"
    if index < n_train:
        return "train"
    return "val" if index < n_train + n_eval else "test"


def identity_name(index: int) -> str:
    return f"id{index:05d}"


def clip_name(index: int) -> str:
    return f"clip{index:04d}"


def identity_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index, 1])


def clip_rng(seed: int, identity: int, clip: int) -> np.random.Generator:
    return np.random.default_rng([seed, identity, clip, 2])


# ---------------------------------------------------------------------------------------- speech
@dataclass
class ClipSpeech:
    samples: np.ndarray  # (N,) float32, exactly representable as PCM16
    phonemes: list[speech.Phoneme]
    words: list[speech.Word]
    phrases: list[dict]
    voice: dict
    frames: int


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def clip_speech(rng: np.random.Generator, seconds: float, fps: int) -> ClipSpeech:
    """Random phrases in one random voice, with silence before, between and after them.

    The clip lasts about `seconds` (x 0.85..1.15; speech that comes out short gets a longer trailing
    silence); its audio is cut or padded in the trailing silence to exactly round(frames * 16000 / fps)
    samples. The phoneme list tiles the clip: silences are `_` spans.
    """
    base = str(rng.choice(speech.ENGLISH_VOICES))
    variant = "" if rng.random() < 0.25 else str(rng.choice(speech.VARIANTS[1:]))
    voice = {"voice": speech.voice_name(base, variant), "rate": int(rng.integers(130, 231)),
             "pitch": int(rng.integers(25, 81)), "pitch_range": int(rng.integers(20, 91)),
             "word_gap": int(rng.choice([0, 0, 0, 1, 2]))}
    target = seconds * float(rng.uniform(0.85, 1.15))
    lead = min(float(rng.uniform(0.1, 0.5)), 0.15 * target)
    tail = min(float(rng.uniform(0.15, 0.5)), 0.15 * target)
    budget = target - lead - tail
    words_per_s = voice["rate"] / 60.0
    parts: list[tuple[str, speech.Speech]] = []
    gaps: list[float] = []
    used, misses = 0.0, 0
    while misses < 3:
        remaining = budget - used - (gaps[-1] if gaps else 0.0)
        cap = max(1, int(round(remaining * words_per_s * 0.9)))
        n = min(int(rng.integers(2, 9)), cap)
        text = random_sentence(rng, n)
        sp = speech.synthesize(text, voice["voice"], voice["rate"], voice["pitch"], voice["pitch_range"],
                               voice["word_gap"])
        if parts and used + gaps[-1] + sp.duration > budget * 1.05:
            misses += 1
            continue
        if not parts and sp.duration > budget * 1.25 and n > 1 and misses < 2:  # first phrase: try a shorter one
            misses += 1
            continue
        misses = 0 if not parts else misses
        if parts:
            used += gaps[-1]
        parts.append((text, sp))
        used += sp.duration
        if used >= budget * 0.9:
            break
        gaps.append(float(rng.uniform(0.15, 0.7)))
    # assemble: lead, phrase, gap, phrase, ..., tail
    n_lead = int(round(lead * SAMPLE_RATE))
    chunks = [np.zeros(n_lead, np.float32)]
    phonemes: list[speech.Phoneme] = [speech.Phoneme("_", 0.0, 1000.0 * n_lead / SAMPLE_RATE)]
    words: list[speech.Word] = []
    phrases = []
    pos = n_lead
    word_offset, char_offset = 0, 0
    for k, (text, sp) in enumerate(parts):
        if k:
            g = int(round(gaps[k - 1] * SAMPLE_RATE))
            chunks.append(np.zeros(g, np.float32))
            phonemes.append(speech.Phoneme("_", 1000.0 * pos / SAMPLE_RATE, 1000.0 * (pos + g) / SAMPLE_RATE))
            pos += g
        off = 1000.0 * pos / SAMPLE_RATE
        chunks.append(sp.samples)
        if sp.phonemes and sp.phonemes[0].start_ms > 0:  # espeak starts a few ms in: keep the tiling
            phonemes.append(speech.Phoneme("_", off, off + sp.phonemes[0].start_ms))
        phonemes += [speech.Phoneme(p.name, p.start_ms + off, p.end_ms + off,
                                    p.word + word_offset if p.word >= 0 else -1) for p in sp.phonemes]
        words += [speech.Word(w.text, w.start_ms + off, w.char + char_offset) for w in sp.words]
        phrases.append({"text": text, "start_ms": round(off, 3),
                        "end_ms": round(off + 1000.0 * len(sp.samples) / SAMPLE_RATE, 3)})
        pos += len(sp.samples)
        word_offset += len(sp.words)
        char_offset += len(text) + 1
    n_tail = int(round(tail * SAMPLE_RATE))
    total = max(pos + n_tail, int(round(target * SAMPLE_RATE)))  # short speech: a longer trailing silence
    frames = max(1, int(round(total * fps / SAMPLE_RATE)))
    n_samples = int(round(frames * SAMPLE_RATE / fps))
    samples = np.concatenate(chunks + [np.zeros(max(n_samples - pos, 0), np.float32)])[:n_samples]
    end_ms = 1000.0 * n_samples / SAMPLE_RATE
    if pos < n_samples:
        phonemes.append(speech.Phoneme("_", 1000.0 * pos / SAMPLE_RATE, end_ms))
    phonemes = [speech.Phoneme(p.name, min(p.start_ms, end_ms), min(p.end_ms, end_ms), p.word)
                for p in phonemes if p.start_ms < end_ms]
    samples = _to_pcm16(samples).astype(np.float32) / 32767.0  # exactly what the wav stores
    return ClipSpeech(samples, phonemes, words, phrases, voice, frames)


# --------------------------------------------------------------------------------------- writing
def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(_to_pcm16(samples).astype("<i2").tobytes())


class Mp4Writer:
    """H.264 (libx264, yuv420p, crf 18) + AAC mono 16 kHz. Video time base 1/fps, pts = frame index.

    One encoder thread by default: x264's output depends on its thread count, and the same bytes
    whatever --workers is are worth more than the encoder's share of the time (rendering dominates).
    """

    def __init__(self, path: Path, size: int, fps: int, threads: int = 1):
        import av

        self.av = av
        self.fps = fps
        self.container = av.open(str(path), mode="w", format="mp4")
        v = self.container.add_stream("libx264", rate=fps)
        v.width = v.height = size
        v.pix_fmt = "yuv420p"
        v.time_base = Fraction(1, fps)
        v.codec_context.time_base = Fraction(1, fps)
        v.options = {"crf": "18", "preset": "veryfast"}
        if threads:
            v.codec_context.thread_count = threads
        self.video = v
        a = self.container.add_stream("aac", rate=SAMPLE_RATE)
        a.layout = "mono"
        a.bit_rate = 64000
        self.audio = a
        self.n = 0

    def add_frames(self, frames: np.ndarray) -> None:
        """(B, H, W, 3) uint8 RGB."""
        for img in frames:
            fr = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            fr.pts = self.n
            fr.time_base = Fraction(1, self.fps)
            self.n += 1
            for pkt in self.video.encode(fr):
                self.container.mux(pkt)

    def add_audio(self, samples: np.ndarray, chunk: int = 1024) -> None:
        x = np.asarray(samples, np.float32)
        for i in range(0, len(x), chunk):
            part = x[i:i + chunk][None, :]
            fr = self.av.AudioFrame.from_ndarray(np.ascontiguousarray(part), format="flt", layout="mono")
            fr.sample_rate = SAMPLE_RATE
            fr.pts = i
            fr.time_base = Fraction(1, SAMPLE_RATE)
            for pkt in self.audio.encode(fr):
                self.container.mux(pkt)

    def close(self) -> None:
        for pkt in self.video.encode(None):
            self.container.mux(pkt)
        for pkt in self.audio.encode(None):
            self.container.mux(pkt)
        self.container.close()


def _json_dump(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _spans(items) -> list[list]:
    return [[p.name, round(p.start_ms, 3), round(p.end_ms, 3)] for p in items]


# ------------------------------------------------------------------------------------- per clip
@dataclass(frozen=True)
class ClipTask:
    root: str  # the temporary corpus directory
    split: str
    identity: str
    identity_index: int
    clip_index: int
    identity_vector: tuple[float, ...]
    seconds: float
    size: int
    fps: int
    seed: int
    device: str


_RENDERERS: dict[tuple[int, str], object] = {}


def _renderer(size: int, device: str):
    key = (size, device)
    if key not in _RENDERERS:
        from trainer.corpus.face import FaceRenderer

        _RENDERERS[key] = FaceRenderer(size=size, device=device)
    return _RENDERERS[key]


def make_clip(task: ClipTask) -> tuple[dict, Timings]:
    """Speech, trajectories, frames and files of one clip; returns its manifest entry and timings."""
    import torch

    tm = Timings()
    t0 = time.perf_counter()
    rng = clip_rng(task.seed, task.identity_index, task.clip_index)
    sp = clip_speech(rng, task.seconds, task.fps)
    t1 = time.perf_counter()
    tm.speech = t1 - t0
    traj = clip_trajectory(rng, sp.phonemes, sp.samples, sp.frames, task.fps)
    f = traj.factors
    tm.trajectory = time.perf_counter() - t1

    name = clip_name(task.clip_index)
    d = Path(task.root) / task.split / task.identity
    d.mkdir(parents=True, exist_ok=True)
    stem = d / name
    r = _renderer(task.size, task.device)
    ident = torch.as_tensor(np.asarray(task.identity_vector, np.float32))
    writer = Mp4Writer(stem.with_suffix(".mp4"), task.size, task.fps)
    try:
        for i in range(0, sp.frames, RENDER_BATCH):
            j = min(i + RENDER_BATCH, sp.frames)
            t2 = time.perf_counter()
            with torch.no_grad():
                img = r.render(ident.expand(j - i, -1), f["pose"][i:j], f["eyes"][i:j], f["mouth"][i:j],
                               f["expression"][i:j])
                u8 = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            t3 = time.perf_counter()
            writer.add_frames(u8)
            tm.render += t3 - t2
            tm.encode += time.perf_counter() - t3
        t3 = time.perf_counter()
        writer.add_audio(sp.samples)
    finally:
        writer.close()
    tm.encode += time.perf_counter() - t3

    t4 = time.perf_counter()
    write_wav(stem.with_suffix(".wav"), sp.samples)
    np.savez(stem.with_suffix(".npz"), **{k: np.ascontiguousarray(v) for k, v in f.items()})
    duration = sp.frames / task.fps
    rel = f"{task.split}/{task.identity}/{name}"
    doc = {
        "version": LAYOUT_VERSION, "clip": rel, "split": task.split, "identity": task.identity,
        "identity_vector": [float(x) for x in task.identity_vector],
        "fps": task.fps, "size": task.size, "frames": sp.frames, "duration": duration,
        "sample_rate": SAMPLE_RATE, "samples": int(len(sp.samples)),
        "text": " ".join(p["text"] for p in sp.phrases), "phrases": sp.phrases, **sp.voice,
        "phonemes": _spans(sp.phonemes), "visemes": _spans(traj.visemes),
        "words": [[w.text, round(w.start_ms, 3)] for w in sp.words],
        "events": traj.events,
        "alignment": "frame i covers audio samples [i*sample_rate/fps, (i+1)*sample_rate/fps); times in ms",
    }
    _json_dump(stem.with_suffix(".json"), doc)
    tm.write = time.perf_counter() - t4
    entry = {"path": rel, "split": task.split, "identity": task.identity, "clip": name, "frames": sp.frames,
             "duration": duration, "samples": int(len(sp.samples)), "voice": sp.voice["voice"]}
    return entry, tm


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


# ------------------------------------------------------------------------------------- the corpus
def generate_corpus(cfg: CorpusConfig) -> Path:
    """Render the corpus described by `cfg` into `cfg.out` (created, or replaced with --overwrite)."""
    return generate_corpus_with_stats(cfg)[0]


def generate_corpus_with_stats(cfg: CorpusConfig) -> tuple[Path, CorpusStats]:
    from tqdm import tqdm

    from trainer.corpus.face import IDENTITY_FIELDS, sample_identity

    validate(cfg)
    speech.check_available()  # MissingDependency naming the fix, before anything is written
    out = Path(cfg.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = CorpusStats()
    t_start = time.perf_counter()
    n = cfg.identities
    idents = []
    for i in range(n):
        vec = np.asarray(sample_identity(identity_rng(cfg.seed, i)), np.float32)
        idents.append({"name": identity_name(i), "index": i, "split": split_of(i, n),
                       "identity_vector": [float(x) for x in vec]})
    tasks = [ClipTask(root="", split=d["split"], identity=d["name"], identity_index=d["index"], clip_index=c,
                      identity_vector=tuple(d["identity_vector"]), seconds=float(cfg.seconds), size=cfg.size,
                      fps=cfg.fps, seed=cfg.seed, device=str(cfg.device))
             for d in idents for c in range(cfg.clips_per_identity)]
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()  # (not mkdtemp: the corpus gets the usual permissions)
    log.info("rendering %d clips (%d identities x %d) of ~%gs at %dpx %dfps into %s (workers: %d)",
             len(tasks), n, cfg.clips_per_identity, cfg.seconds, cfg.size, cfg.fps, out, cfg.workers)
    try:
        tasks = [ClipTask(**{**asdict(t), "root": str(tmp)}) for t in tasks]
        entries: list[dict] = []
        bar = tqdm(total=len(tasks), desc="corpus", unit="clip", dynamic_ncols=True)
        try:
            workers = min(cfg.workers, len(tasks))
            if workers <= 1:
                results = (make_clip(t) for t in tasks)
                for entry, tm in results:
                    entries.append(entry)
                    stats.timings.add(tm)
                    bar.update(1)
            else:
                ctx = mp.get_context("spawn")
                with ctx.Pool(workers, initializer=_worker_init) as pool:
                    for entry, tm in pool.imap_unordered(make_clip, tasks):
                        entries.append(entry)
                        stats.timings.add(tm)
                        bar.update(1)
        finally:
            bar.close()
        entries.sort(key=lambda e: e["path"])
        stats.clips = len(entries)
        stats.frames = sum(e["frames"] for e in entries)
        stats.video_seconds = sum(e["duration"] for e in entries)
        manifest = {
            "version": LAYOUT_VERSION,
            "kind": "marionette synthetic talking-head corpus",
            "seed": cfg.seed,
            "arguments": {"identities": cfg.identities, "clips_per_identity": cfg.clips_per_identity,
                          "seconds": cfg.seconds, "size": cfg.size, "fps": cfg.fps, "seed": cfg.seed,
                          "workers": cfg.workers, "device": str(cfg.device)},
            "fps": cfg.fps, "size": cfg.size, "sample_rate": SAMPLE_RATE,
            "alignment": "video frame i covers audio samples [i*sample_rate/fps, (i+1)*sample_rate/fps); "
                         "frames = round(duration*fps); samples = round(frames*sample_rate/fps)",
            "factor_groups": factors.manifest_groups(),
            "expression_presets": {"names": list(factors.PRESET_NAMES),
                                   "vectors": {k: list(v) for k, v in factors.EXPRESSION_PRESETS.items()},
                                   "columns": factors.column_names("expression")},
            "per_frame_arrays": {**{g: f"(frames, {factors.dims(g)}) float32" for g in factors.GROUP_NAMES},
                                 "expression_preset": "(frames,) int64 index into expression_presets.names",
                                 "expression_intensity": "(frames,) float32"},
            "identity_fields": list(IDENTITY_FIELDS),
            "identities": idents,
            "splits": {s: [d["name"] for d in idents if d["split"] == s] for s in SPLITS},
            "clips": entries,
            "totals": {"clips": stats.clips, "frames": stats.frames,
                       "duration": round(stats.video_seconds, 6)},
        }
        _json_dump(tmp / "manifest.json", manifest)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats.wall_seconds = time.perf_counter() - t_start
    t = stats.timings
    log.info("wrote %d clips, %d frames (%.1f s of video) in %.1f s: %.2f video s/s, %.1f frames/s "
             "(speech %.1f s, trajectories %.1f s, render %.1f s, encode %.1f s, write %.1f s)",
             stats.clips, stats.frames, stats.video_seconds, stats.wall_seconds,
             stats.video_seconds / max(stats.wall_seconds, 1e-9), stats.frames / max(stats.wall_seconds, 1e-9),
             t.speech, t.trajectory, t.render, t.encode, t.write)
    return out, stats


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out`, replacing an empty or (validated) old corpus."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
