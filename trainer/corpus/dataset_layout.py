"""Reading the corpus layout `generate` writes (see its module docstring): the manifest, the clip list,
and one clip's arrays. The trainer's own reader (`trainer.data`) reads the same files; this one is
small, strict and exact (no resizing, no caching), for tests, previews and tools."""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import InputError
from trainer.corpus import factors

SUPPORTED_VERSIONS = (1,)


def load_manifest(corpus_dir: Path) -> dict:
    """manifest.json of a corpus, checked for the fields readers rely on."""
    path = Path(corpus_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{corpus_dir} is not a corpus: it has no manifest.json (make one with `marionette corpus`)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a corpus manifest (expected a JSON object)")
    if doc.get("version") not in SUPPORTED_VERSIONS:
        raise InputError(f"{path}: unsupported corpus layout version {doc.get('version')!r} "
                         f"(this reader knows {', '.join(map(str, SUPPORTED_VERSIONS))})")
    missing = [k for k in ("fps", "size", "factor_groups", "identities", "clips") if k not in doc]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}")
    return doc


@dataclass(frozen=True)
class ClipEntry:
    root: Path
    path: str  # "<split>/<identity>/<clip>", no extension
    split: str
    identity: str
    name: str
    frames: int
    duration: float

    def file(self, ext: str) -> Path:
        return self.root / f"{self.path}{ext}"

    @property
    def mp4(self) -> Path:
        return self.file(".mp4")

    @property
    def wav(self) -> Path:
        return self.file(".wav")

    @property
    def npz(self) -> Path:
        return self.file(".npz")

    @property
    def json(self) -> Path:
        return self.file(".json")


def iter_clips(corpus_dir: Path, split: str | None = None, manifest: dict | None = None) -> Iterator[ClipEntry]:
    """The manifest's clips (optionally of one split), in manifest order."""
    root = Path(corpus_dir)
    doc = manifest if manifest is not None else load_manifest(root)
    for c in doc["clips"]:
        if split is None or c["split"] == split:
            yield ClipEntry(root=root, path=c["path"], split=c["split"], identity=c["identity"], name=c["clip"],
                            frames=int(c["frames"]), duration=float(c["duration"]))


def identity_vectors(manifest: dict) -> dict[str, np.ndarray]:
    """identity name -> the renderer's identity vector (float32)."""
    return {d["name"]: np.asarray(d["identity_vector"], np.float32) for d in manifest["identities"]}


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """PCM16 mono wav -> float32 samples in [-1, 1] (x / 32767, as the writer scaled them), sample rate."""
    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise InputError(f"{path}: expected 16-bit mono PCM, got {w.getsampwidth() * 8}-bit "
                                 f"x {w.getnchannels()} channels")
            rate = w.getframerate()
            data = w.readframes(w.getnframes())
    except (OSError, wave.Error, EOFError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    return np.frombuffer(data, "<i2").astype(np.float32) / 32767.0, rate


@dataclass
class ClipData:
    entry: ClipEntry
    factors: dict[str, np.ndarray]  # group -> (T, D) float32, expression_preset (T,), expression_intensity (T,)
    samples: np.ndarray  # (N,) float32, 16 kHz
    sample_rate: int
    meta: dict  # the clip json


def load_clip(entry: ClipEntry, audio: bool = True) -> ClipData:
    """One clip's factor arrays, (optionally) its wav samples and its json."""
    try:
        with np.load(entry.npz) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {entry.npz}: {e}") from None
    missing = [g for g in factors.GROUP_NAMES if g not in arrays]
    if missing:
        raise InputError(f"{entry.npz} lacks factor groups {missing}")
    try:
        meta = json.loads(entry.json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {entry.json}: {e}") from None
    samples, rate = read_wav(entry.wav) if audio else (np.zeros(0, np.float32), int(meta.get("sample_rate", 16000)))
    return ClipData(entry=entry, factors=arrays, samples=samples, sample_rate=rate, meta=meta)
