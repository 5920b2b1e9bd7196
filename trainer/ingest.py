"""`marionette ingest VIDEOS... --out DIR`: real talking-head video -> the corpus layout the trainer reads.

Per input video (any container and codec the installed FFmpeg/PyAV decodes):

1. frames are taken at the corpus' 25 fps (output frame k shows the source frame on screen at
   t0 + k / 25, so 30, 29.97, 50 fps or variable-rate sources all come out at 25 fps);
2. the speech is decoded to 16 kHz mono (`engine.audio.load_audio`, the trainer's own loader) and lined
   up with the frames by the streams' start times;
3. shot cuts are found by a frame-difference detector (colour histogram + thumbnail difference between
   consecutive frames) and by the face tracker (a detection that lands far from the followed face);
4. within a shot the face is followed by `engine.face.FaceTracker` in strict mode: a full dlib detection
   on the first frame, every `detect_every` frames and after every loss, the 68-point landmark model in
   between, smoothed, with the crop held still inside a dead zone (so head motion stays in the crop, as
   in the corpus, where the camera is fixed and the head moves) and framed exactly as `engine.face.align`
   frames portraits (eyes and mouth on the corpus template, `TEMPLATE_256`);
5. frames count only once a full detection confirms them: frames followed by landmarks since the last
   detection are held back and kept when the next detection finds the same face, dropped otherwise;
   frames with no face, several faces (another face at least half the followed one's width), a face
   smaller than `min_face` or no speech under them (the audio track ends early or starts late) end the
   clip; a piece of a shot shorter than `min_seconds` is skipped and one longer than `max_seconds` is cut
   into clips of at most that length;
6. every kept clip is written as the synthetic corpus writes its clips (`trainer.corpus.generate`),
   minus the ground truth:

    DIR/manifest.json                       layout version 1, "source": "ingest", fps, size, speakers
                                            ("identities", with their split), clip list
    DIR/<split>/<speaker>/<clip>.mp4        H.264 256x256 25 fps + AAC, the face-tracked crops
    DIR/<split>/<speaker>/<clip>.wav        16 kHz mono PCM16, exactly frames * 640 samples
    DIR/<split>/<speaker>/<clip>.face.npz   per frame: landmarks (T, 68, 2) in crop pixels, pose (T, 3)
                                            yaw/pitch/roll degrees estimated from them (corpus signs; NaN
                                            where the detector gives none), transform (T, 2, 3) source
                                            pixel -> crop pixel, source_time (T,) s, detected (T,) bool
    DIR/<split>/<speaker>/<clip>.json       source video, speaker, times in the source, detector, settings
    DIR/ingest_report.json                  per video: clips, skipped spans with their reason, cuts, errors
    DIR/.ingest/                            per-video records (resumption), the lock, work in progress

   (no `<clip>.npz`: that name is the synthetic corpus' ground-truth factor table, which real video lacks;
   `marionette train` then runs the stages that need no labels, see `trainer.train`).

Speakers and splits: one speaker per video (`speaker_from="file"`), or the video's folder ("folder"),
the folder above it ("folder2": VoxCeleb2's id/video/clip.mp4), or the first group of a regular
expression searched in the path ("re:REGEX"). A speaker's split is drawn from a hash of its name
(`split_for`: `val_fraction` to val, `test_fraction` to test, the rest to train), so it does not depend
on which videos one run sees, and once a speaker has a split it keeps it on later runs; while the train
split would be empty the first new speaker goes to train.

Resumption and atomic writes: a video is worked on in DIR/.ingest/partial/<video id>/ and its clips are
moved into the layout each with its .mp4 last (the trainer lists clips by their .mp4, so a clip it sees
is complete); then DIR/.ingest/videos/<video id>.json records it as done and the manifest and report are
rewritten (write to a temporary file, then rename). A rerun skips videos recorded as done (same size and
modification time) and clears what a killed run left: the partial folder and clips of unfinished videos.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import wave
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import InputError

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
INGEST_VERSION = 1
SAMPLE_RATE = 16000
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".mts",
                    ".wmv", ".3gp", ".ogv")
SPLITS = ("train", "val", "test")
WORK = ".ingest"
REPORT = "ingest_report.json"
# cut detection (consecutive frames, 32x32 thumbnails): a cut when the colour histograms differ by more
# than CUT_HIST (L1 / 2, 0..1) and the thumbnails by more than CUT_DIFF (mean |a - b| / 255), or the
# thumbnails alone by more than CUT_DIFF_ALONE. A talking head under a fixed camera: hist ~0.02-0.08,
# diff ~0.005-0.03; a cut between different shots: hist > 0.4, diff > 0.1.
CUT_HIST, CUT_DIFF, CUT_DIFF_ALONE = 0.35, 0.08, 0.25
# a detection that lands this far from the followed face (eye midpoint moved by > JUMP_IOD interocular
# distances, or the interocular distance changed by more than the ratio JUMP_SCALE) is a cut as well
JUMP_IOD, JUMP_SCALE = 0.5, 1.35
OTHER_FACE = 0.5  # another face at least this fraction of the followed face's width counts as "several"


@dataclass(frozen=True)
class IngestConfig:
    """Everything `marionette ingest` passes (field names = the CLI's long options)."""

    videos: tuple[Path, ...]  # files, or folders searched for VIDEO_EXTENSIONS
    out: Path
    speaker_from: str = "file"  # file | folder | folder2 | re:REGEX
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    min_seconds: float = 2.0  # shorter pieces are skipped (the tiny/talk idle stage needs 1.8-5 s clips)
    max_seconds: float = 20.0  # longer pieces are cut into clips of at most this
    min_face: int = 80  # smallest face kept (its box width in source pixels; the crop upsamples smaller ones)
    size: int = 256  # crop size (the corpus' and the model's framing at 256x256)
    fps: int = 25
    detector: str = "dlib"
    detect_every: int = 10  # full detections at least this often (frames); landmarks follow in between
    progress: bool = True  # tqdm bar on stderr (per video; with workers, one over the videos)
    workers: int = 1  # videos ingested at once, each in its own process (one core each)


@dataclass
class _Rec:
    """One output frame waiting to be committed to a clip."""

    k: int  # output frame index in the video
    t: float  # source time (s)
    crop: np.ndarray
    landmarks: np.ndarray  # (68, 2) crop pixels (NaN: none)
    pose: np.ndarray  # (3,) degrees (NaN: none)
    matrix: np.ndarray  # (2, 3)
    detected: bool


@dataclass
class _Clip:
    name: str
    writer: object
    k0: int
    recs_meta: list = field(default_factory=list)  # (t, landmarks, pose, matrix, detected) per frame

    @property
    def n(self) -> int:
        return len(self.recs_meta)


# ============================================================================================ names
def sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return s or "unnamed"


def video_id(path: Path) -> str:
    """A file-system-safe id unique per source file: its stem and 8 hex digits of its absolute path."""
    p = Path(path).resolve()
    return f"{sanitize(p.stem)}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"


def speaker_of(path: Path, speaker_from: str) -> str:
    p = Path(path)
    if speaker_from == "file":
        return sanitize(p.stem)
    if speaker_from == "folder":
        return sanitize(p.resolve().parent.name)
    if speaker_from == "folder2":
        return sanitize(p.resolve().parent.parent.name)
    if speaker_from.startswith("re:"):
        m = re.search(speaker_from[3:], str(p))
        if m is None or not m.groups() or not m.group(1):
            raise InputError(f"--speaker-from {speaker_from!r}: no match (with a first group) in {str(p)!r}")
        return sanitize(m.group(1))
    raise InputError(f"--speaker-from must be file, folder, folder2 or re:REGEX, got {speaker_from!r}")


def split_for(speaker: str, val_fraction: float, test_fraction: float) -> str:
    """train / val / test for a speaker, from a hash of its name (independent of the other speakers)."""
    u = int(hashlib.sha1(speaker.encode()).hexdigest()[:8], 16) / 2.0 ** 32
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def find_videos(inputs, out: Path | None = None) -> list[Path]:
    """Files as given (any extension) and video files under folders, deduplicated, sorted per input."""
    found: list[Path] = []
    seen: set[Path] = set()
    out_r = Path(out).resolve() if out is not None else None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            cands = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in VIDEO_EXTENSIONS)
        elif p.is_file():
            cands = [p]
        else:
            raise InputError(f"video {p} not found")
        for q in cands:
            r = q.resolve()
            if out_r is not None and (r == out_r or out_r in r.parents):
                continue  # the output folder's own clips
            if r not in seen:
                seen.add(r)
                found.append(q)
    if not found:
        raise InputError(f"no videos found in {', '.join(map(str, inputs))} "
                         f"(folders are searched for {', '.join(VIDEO_EXTENSIONS)})")
    return found


def validate(cfg: IngestConfig) -> None:
    if not cfg.videos:
        raise InputError("ingest needs at least one video or folder")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise InputError(f"--{name.split('_')[0]} must be a fraction in [0, 1), got {v}")
    if cfg.val_fraction + cfg.test_fraction >= 1.0:
        raise InputError("--val + --test must leave some speakers for train (sum < 1)")
    if not cfg.min_seconds > 0 or not cfg.max_seconds >= cfg.min_seconds:
        raise InputError(f"need 0 < --min-seconds <= --max-seconds, got {cfg.min_seconds} and {cfg.max_seconds}")
    if cfg.size % 8 or not 32 <= cfg.size <= 1024:
        raise InputError(f"--size must be a multiple of 8 in 32..1024, got {cfg.size}")
    if not 10 <= cfg.fps <= 60:
        raise InputError(f"--fps must be in 10..60, got {cfg.fps}")
    if cfg.min_face < 16:
        raise InputError(f"--min-face must be at least 16 px, got {cfg.min_face}")
    if cfg.workers < 1:
        raise InputError(f"--workers must be positive, got {cfg.workers}")
    if cfg.detect_every < 1:
        raise InputError(f"--detect-every must be positive, got {cfg.detect_every}")
    if cfg.speaker_from.startswith("re:"):
        try:
            rx = re.compile(cfg.speaker_from[3:])
        except re.error as e:
            raise InputError(f"--speaker-from {cfg.speaker_from!r}: bad regular expression: {e}") from None
        if rx.groups < 1:
            raise InputError(f"--speaker-from {cfg.speaker_from!r}: the expression needs a group, e.g. "
                             r"re:([A-Za-z]+)_\d+")
    elif cfg.speaker_from not in ("file", "folder", "folder2"):
        raise InputError(f"--speaker-from must be file, folder, folder2 or re:REGEX, got {cfg.speaker_from!r}")


# ============================================================================================ files
def _write_json(path: Path, doc) -> None:
    """Atomic: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_wav(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(pcm, "<i2").tobytes())


@contextlib.contextmanager
def _lock(work: Path):
    import fcntl

    work.mkdir(parents=True, exist_ok=True)
    f = open(work / "lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise InputError(f"another `marionette ingest` is writing to {work.parent} (lock {work / 'lock'})") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# ============================================================================================ media
def _time_of(frame, stream, index: int) -> float:
    if frame.pts is not None and stream.time_base is not None:
        return float(frame.pts * stream.time_base)
    rate = float(stream.average_rate) if stream.average_rate else 25.0
    return index / rate


def upright(frame) -> np.ndarray:
    """A decoded frame as HxWx3 uint8, turned as its display matrix says (phones store portrait video
    sideways with a rotation in the container: `VideoFrame.rotation`, degrees counter-clockwise)."""
    rgb = frame.to_ndarray(format="rgb24")
    k = int(round(float(getattr(frame, "rotation", 0) or 0) / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def frames_at(path: Path, fps: int) -> Iterator[tuple[int, float, np.ndarray]]:
    """(k, source time, HxWx3 uint8) for output frame k = 0, 1, ... at `fps`: the source frame on screen
    at t0 + k / fps (t0: the first frame's time), up to the end of the last source frame."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot open video {path}: {e}") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream")
        st = container.streams.video[0]
        st.thread_type = "AUTO"
        src_rate = float(st.average_rate) if st.average_rate else float(fps)
        k, t0, prev, prev_t, prev_rgb = 0, None, None, None, None
        eps = 1e-6
        try:
            for i, fr in enumerate(container.decode(st)):
                t = _time_of(fr, st, i)
                if t0 is None:
                    t0 = t
                # every output time before this frame shows the previous one
                while prev is not None and t0 + k / fps < t - eps:
                    if prev_rgb is None:
                        prev_rgb = upright(prev)
                    yield k, prev_t, prev_rgb
                    k += 1
                prev, prev_t, prev_rgb = fr, t, None
        except (av.error.FFmpegError, ValueError) as e:
            if prev is None:
                raise InputError(f"cannot decode video {path}: {e}") from None
            log.warning("%s: decoding stopped at %.2f s (%s); keeping what came before", path, prev_t, e)
        if prev is None:
            raise InputError(f"video {path} has no frames")
        end = prev_t + 1.0 / src_rate  # the last frame stays on screen one source frame period
        while t0 + k / fps < end - eps:
            if prev_rgb is None:
                prev_rgb = upright(prev)
            yield k, prev_t, prev_rgb
            k += 1


def audio_and_offset(path: Path) -> tuple[np.ndarray, int]:
    """The video's speech as 16 kHz mono PCM16 and the index of the sample at the first video frame."""
    import av

    from engine.audio import load_audio

    try:
        with av.open(str(path)) as c:
            if not c.streams.audio:
                raise InputError(f"{path} has no audio stream (training needs the speech)")
            v, a = c.streams.video[0] if c.streams.video else None, c.streams.audio[0]

            def start(s) -> float:
                return float(s.start_time * s.time_base) if s is not None and s.start_time is not None else 0.0

            offset = int(round((start(v) - start(a)) * SAMPLE_RATE))
    except av.error.FFmpegError as e:
        raise InputError(f"cannot open video {path}: {e}") from None
    x = load_audio(path, SAMPLE_RATE)
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)
    return pcm, offset


def _samples(pcm: np.ndarray, offset: int, k0: int, k1: int, fps: int) -> np.ndarray:
    """PCM16 under output frames [k0, k1): zeros where the audio does not reach."""
    a = offset + int(round(k0 * SAMPLE_RATE / fps))
    n = int(round(k1 * SAMPLE_RATE / fps)) - int(round(k0 * SAMPLE_RATE / fps))
    out = np.zeros(n, np.int16)
    lo, hi = max(a, 0), min(a + n, len(pcm))
    if hi > lo:
        out[lo - a:hi - a] = pcm[lo:hi]
    return out


class CutDetector:
    """Shot cuts from consecutive frames: colour histogram distance and thumbnail difference."""

    def __init__(self, hist: float = CUT_HIST, diff: float = CUT_DIFF, diff_alone: float = CUT_DIFF_ALONE):
        self.hist, self.diff, self.diff_alone = hist, diff, diff_alone
        self._prev = None
        self.last = (0.0, 0.0)

    @staticmethod
    def features(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        step = max(1, min(rgb.shape[0], rgb.shape[1]) // 128)  # a cheap decimation first: large frames
        small = np.ascontiguousarray(rgb[::step, ::step])
        th = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BOX), np.float32)
        q = (th // 32).astype(np.int64)  # 8 levels per channel
        h = np.bincount((q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel(), minlength=512).astype(np.float32)
        return th, h / h.sum()

    def update(self, rgb: np.ndarray) -> bool:
        th, h = self.features(rgb)
        prev, self._prev = self._prev, (th, h)
        if prev is None:
            return False
        hd = 0.5 * float(np.abs(h - prev[1]).sum())
        dd = float(np.abs(th - prev[0]).mean()) / 255.0
        self.last = (hd, dd)
        return (hd > self.hist and dd > self.diff) or dd > self.diff_alone


# ============================================================================================ one video
class _VideoJob:
    """Frames of one video -> clips in `work` (a partial folder); what was skipped and why."""

    def __init__(self, cfg: IngestConfig, path: Path, vid: str, work: Path, pcm: np.ndarray, offset: int):
        from engine.face import FaceTracker

        self.cfg, self.path, self.vid, self.work = cfg, path, vid, work
        self.pcm, self.offset = pcm, offset
        self.tracker = FaceTracker(cfg.detector, crop_size=cfg.size, detect_every=cfg.detect_every, strict=True,
                                   min_face=cfg.min_face)
        self.cuts = CutDetector()
        self.min_frames = max(1, int(math.ceil(cfg.min_seconds * cfg.fps)))
        self.max_frames = max(self.min_frames, int(math.floor(cfg.max_seconds * cfg.fps)))
        self.pending: list[_Rec] = []
        self.clip: _Clip | None = None
        self.clips: list[dict] = []
        self.skipped: list[list] = []  # [k0, k1, reason] runs of output frames
        self.cut_frames: list[int] = []
        self.n_clips = 0
        self.frames = 0
        self.force_detect = False
        # the output frames the speech covers whole: [k_audio0, k_audio1)
        spf = SAMPLE_RATE / cfg.fps
        self.k_audio0 = max(0, int(math.ceil(-offset / spf - 1e-9)))
        self.k_audio1 = max(0, int(math.floor((len(pcm) - offset) / spf + 1e-9)))

    # ---------------------------------------------------------------- bookkeeping
    def _skip(self, k0: int, k1: int, reason: str) -> None:
        if k1 <= k0:
            return
        last = self.skipped[-1] if self.skipped else None
        if last is not None and last[2] == reason and last[1] == k0:
            last[1] = k1
        else:
            self.skipped.append([k0, k1, reason])

    def _record(self, rgb: np.ndarray, k: int, t: float, tf, face) -> _Rec:
        from engine.face import _POSE_IDX, crop_with, estimate_pose

        crop = crop_with(rgb, tf)
        if face is not None and face.landmarks is not None:
            lm = tf.apply(face.landmarks).astype(np.float32)
            pose = np.asarray(estimate_pose(lm[list(_POSE_IDX)]), np.float32) if len(lm) == 68 else \
                np.full(3, np.nan, np.float32)
        else:
            lm, pose = np.full((68, 2), np.nan, np.float32), np.full(3, np.nan, np.float32)
        return _Rec(k, t, crop, lm, pose, tf.matrix.astype(np.float32), bool(self.tracker.confirmed))

    def _upsample(self, rgb: np.ndarray):
        from engine.face import DETECT_MAX_SIDE, HOG_WINDOW_PX

        h, w = rgb.shape[:2]
        return 0 if self.cfg.min_face * min(1.0, DETECT_MAX_SIDE / max(h, w)) >= HOG_WINDOW_PX else None

    def _significant(self, face) -> list:
        return [f for f in self.tracker.faces if f.width >= OTHER_FACE * face.width]

    def _same_face(self, faces, ref) -> bool:
        """One significant face in `faces`, where `ref` (the followed face) is."""
        if not faces:
            return False
        big = [f for f in faces if f.width >= OTHER_FACE * faces[0].width]
        if len(big) != 1:
            return False
        return not self._jump(ref, big[0])

    @staticmethod
    def _jump(a, b) -> bool:
        if a is None or b is None:
            return False
        ia = float(np.hypot(*(a.eyes[1] - a.eyes[0])))
        ib = float(np.hypot(*(b.eyes[1] - b.eyes[0])))
        if ia < 1e-6 or ib < 1e-6:
            return False
        moved = float(np.hypot(*(a.eyes.mean(0) - b.eyes.mean(0)))) / ia
        return moved > JUMP_IOD or not (1.0 / JUMP_SCALE < ib / ia < JUMP_SCALE)

    # ---------------------------------------------------------------- clips
    def _commit(self, recs: list[_Rec]) -> None:
        from trainer.corpus.generate import Mp4Writer

        for r in recs:
            if self.clip is None:
                name = f"{self.vid}_{self.n_clips:03d}"
                self.n_clips += 1
                self.clip = _Clip(name, Mp4Writer(self.work / f"{name}.mp4", self.cfg.size, self.cfg.fps), r.k)
            self.clip.writer.add_frames(r.crop[None])
            self.clip.recs_meta.append((r.t, r.landmarks, r.pose, r.matrix, r.detected))
            if self.clip.n >= self.max_frames:
                self._close_clip()

    def _close_clip(self) -> None:
        c, self.clip = self.clip, None
        if c is None:
            return
        k0, k1 = c.k0, c.k0 + c.n
        pcm = _samples(self.pcm, self.offset, k0, k1, self.cfg.fps)
        c.writer.add_audio(pcm.astype(np.float32) / 32767.0)
        c.writer.close()
        if c.n < self.min_frames:
            for ext in (".mp4",):
                (self.work / f"{c.name}{ext}").unlink(missing_ok=True)
            self.n_clips -= 1
            self._skip(k0, k1, "too_short")
            return
        _write_wav(self.work / f"{c.name}.wav", pcm)
        t, lm, pose, mat, det = (np.stack(v) for v in zip(*c.recs_meta))
        with open(self.work / f"{c.name}.face.npz", "wb") as f:
            np.savez(f, landmarks=lm.astype(np.float32), pose=pose.astype(np.float32),
                     transform=mat.astype(np.float32), source_time=t.astype(np.float64), detected=det.astype(bool))
        doc = {"clip": c.name, "source": str(self.path.resolve()), "start_s": float(t[0]),
               "end_s": float(t[-1] + 1.0 / self.cfg.fps), "frames": c.n, "fps": self.cfg.fps,
               "sample_rate": SAMPLE_RATE, "duration": c.n / self.cfg.fps, "size": self.cfg.size,
               "detector": self.cfg.detector, "ingest_version": INGEST_VERSION,
               "landmarks_frames": int(np.isfinite(lm[:, 0, 0]).sum())}
        _write_json(self.work / f"{c.name}.json", doc)
        self.clips.append({"clip": c.name, "frames": c.n, "duration": c.n / self.cfg.fps,
                           "start_s": doc["start_s"], "end_s": doc["end_s"]})

    def _end(self, reason: str, last_rgb: np.ndarray | None) -> None:
        """The piece being built ends (a cut, a loss, the video's end): pending frames are kept if a
        detection on the last of them finds the followed face there, otherwise skipped as `reason`."""
        if self.pending:
            ok = False
            if last_rgb is not None and self._pending_face is not None:
                self.tracker.detections += 1
                ok = self._same_face(self.tracker.det.detect(last_rgb, upsample=self._upsample(last_rgb)),
                                     self._pending_face)
            if ok:
                self._commit(self.pending)
            else:
                self._skip(self.pending[0].k, self.pending[-1].k + 1, reason)
            self.pending = []
        self._close_clip()

    # ---------------------------------------------------------------- frames
    def run(self, bar=None) -> None:
        cfg = self.cfg
        prev_rgb, k_end = None, 0
        self._pending_face = None
        for k, t, rgb in frames_at(self.path, cfg.fps):
            self.frames += 1
            k_end = k + 1
            if bar is not None:
                bar.update(1)
            if self.cuts.update(rgb):
                self.cut_frames.append(k)
                self._end("no_face", prev_rgb)
                self.tracker.reset()
                self._prev_face = self._pending_face = None
            if not self.k_audio0 <= k < self.k_audio1:  # video without its speech: of no use for training
                self._end("no_audio", prev_rgb)
                self._skip(k, k + 1, "no_audio")
                self._prev_face = self._pending_face = None
                prev_rgb = rgb
                continue
            tf = self.tracker.update(rgb, detect=self.force_detect)
            face = self.tracker.face
            if face is not None and self.tracker.confirmed and self._jump(self._prev_face, face):
                # the detector found the face elsewhere: a cut the frame difference missed
                self.cut_frames.append(k)
                self._end("no_face", prev_rgb)
                self.tracker.reset()
                self._pending_face = None
                tf = self.tracker.update(rgb, detect=True)
                face = self.tracker.face
            self.force_detect = False
            reason = None
            if face is None and self.tracker.holding and self.pending:
                # a detector miss being retried while the landmarks do not fit: the framing is held and the
                # frame waits with the others for the next detection (kept if it finds the face)
                self.pending.append(self._record(rgb, k, t, tf, None))
                prev_rgb = rgb
                continue
            if face is None:
                reason = "no_face"
            elif self.tracker.detected and len(self._significant(face)) > 1:
                reason = "several_faces"
                self.force_detect = True  # look again on the next frame
            elif face.width < cfg.min_face:
                reason = "small_face"
            if reason is not None:
                self._end(reason, prev_rgb)
                self._skip(k, k + 1, reason)
                self._prev_face = self._pending_face = None
            else:
                rec = self._record(rgb, k, t, tf, face)
                if self.tracker.confirmed:  # a detection found it: what was pending is the same face
                    self._commit(self.pending + [rec])
                    self.pending = []
                else:
                    self.pending.append(rec)
                self._pending_face = face
                if self.tracker.confirmed:
                    self._prev_face = face  # the jump test compares detections with detections
            prev_rgb = rgb
        self._end("no_face", prev_rgb)
        self.k_end = k_end

    _prev_face = None


# ============================================================================================ the run
@dataclass
class IngestSummary:
    videos: int = 0
    done: int = 0
    skipped_done: int = 0
    failed: int = 0
    clips: int = 0
    frames_in: int = 0
    frames_out: int = 0
    seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames_in / self.seconds if self.seconds > 0 else 0.0


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _clip_files(out: Path, split: str, speaker: str, name: str) -> list[Path]:
    d = out / split / speaker
    return [d / f"{name}{ext}" for ext in (".wav", ".face.npz", ".json", ".mp4")]  # the .mp4 last


def _remove_video_clips(out: Path, vid: str) -> int:
    """Clips of video `vid` in the layout (left by a killed run or an outdated record)."""
    n = 0
    for split in SPLITS:
        d = out / split
        if not d.is_dir():
            continue
        for f in d.glob(f"*/{glob_escape(vid)}_*"):
            if re.fullmatch(re.escape(vid) + r"_\d{3,}\..*", f.name):
                f.unlink()
                n += 1
    return n


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _load_records(work: Path) -> dict[str, dict]:
    recs = {}
    d = work / "videos"
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                recs[p.stem] = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                log.warning("ingest record %s is unreadable: its video is ingested again", p)
    return recs


def _is_done(rec: dict | None, path: Path, out: Path) -> bool:
    if not rec or rec.get("status") != "done":
        return False
    size, mtime = _stat(path)
    if rec.get("size") != size or rec.get("mtime_ns") != mtime:
        return False
    return all(f.is_file() for c in rec.get("clips", [])
               for f in _clip_files(out, rec["split"], rec["speaker"], c["clip"]))


def _write_manifest(cfg: IngestConfig, out: Path, records: dict[str, dict]) -> None:
    done = [r for r in records.values() if r.get("status") == "done"]
    speakers: dict[str, str] = {}
    clips = []
    for r in sorted(done, key=lambda r: (SPLITS.index(r["split"]), r["speaker"], r["video_id"])):
        speakers.setdefault(r["speaker"], r["split"])
        for c in r["clips"]:
            clips.append({"path": f"{r['split']}/{r['speaker']}/{c['clip']}", "split": r["split"],
                          "identity": r["speaker"], "clip": c["clip"], "frames": c["frames"],
                          "duration": c["duration"], "source": r["video"], "start_s": c["start_s"]})
    manifest = {"version": LAYOUT_VERSION, "source": "ingest", "ingest_version": INGEST_VERSION,
                "fps": cfg.fps, "size": cfg.size, "sample_rate": SAMPLE_RATE,
                "factor_groups": {},  # no ground truth: real video
                "per_frame": "<clip>.face.npz: landmarks (T,68,2) crop px, pose (T,3) yaw/pitch/roll deg, "
                             "transform (T,2,3), source_time (T,), detected (T,)",
                "identities": [{"name": s, "split": sp} for s, sp in sorted(speakers.items())],
                "splits": {sp: sorted(s for s, v in speakers.items() if v == sp) for sp in SPLITS},
                "clips": clips}
    _write_json(out / "manifest.json", manifest)


def _write_report(cfg: IngestConfig, out: Path, records: dict[str, dict], run: dict) -> None:
    videos = []
    for r in sorted(records.values(), key=lambda r: r.get("video", "")):
        videos.append({k: r.get(k) for k in ("video", "video_id", "speaker", "split", "status", "error", "clips",
                                             "skipped", "cuts", "frames_in", "frames_out", "seconds",
                                             "frames_per_s", "loadavg", "detections")})
    done = [r for r in records.values() if r.get("status") == "done"]
    totals = {"videos": len(records), "done": len(done),
              "failed": sum(r.get("status") == "failed" for r in records.values()),
              "clips": sum(len(r["clips"]) for r in done), "frames_out": sum(r.get("frames_out", 0) for r in done),
              "frames_in": sum(r.get("frames_in", 0) for r in done),
              "skipped_frames": {}}
    for r in done:
        for s in r.get("skipped", []):
            totals["skipped_frames"][s["reason"]] = totals["skipped_frames"].get(s["reason"], 0) + s["frames"]
    _write_json(out / REPORT, {"ingest_version": INGEST_VERSION, "settings": _settings(cfg), "last_run": run,
                               "totals": totals, "videos": videos})


def _settings(cfg: IngestConfig) -> dict:
    d = asdict(cfg)
    d.pop("videos")
    d.pop("progress")
    d["out"] = str(d["out"])
    return d


def _assign_splits(cfg: IngestConfig, speakers: list[str], records: dict[str, dict]) -> dict[str, str]:
    """Speaker -> split: earlier runs' choices kept, new speakers by `split_for`, train never left empty."""
    known = {r["speaker"]: r["split"] for r in records.values() if r.get("status") == "done"}
    out = dict(known)
    new = sorted(set(speakers) - set(known))
    for s in new:
        out[s] = split_for(s, cfg.val_fraction, cfg.test_fraction)
    if new and "train" not in out.values():
        out[new[0]] = "train"
        log.info("speaker %s goes to train (its hash drew a held-out split, but no speaker would be left "
                 "to train on)", new[0])
    return out


def ingest(cfg: IngestConfig) -> IngestSummary:
    """Ingest `cfg.videos` into `cfg.out` (see the module docstring); returns what this run did."""
    validate(cfg)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / WORK).is_dir():
        raise InputError(f"--out {out} is not empty and was not made by `marionette ingest` (no {WORK}/): "
                         "choose a new or empty folder")
    videos = find_videos(cfg.videos, out)
    speakers = {str(v): speaker_of(v, cfg.speaker_from) for v in videos}  # every name checked before any work
    from engine.face import get_detector

    get_detector(cfg.detector)  # a missing detector fails now, not after the first video
    work = out / WORK
    summary = IngestSummary(videos=len(videos))
    with _lock(work):
        st_path = work / "settings.json"
        if st_path.is_file():
            prev = json.loads(st_path.read_text())
            for key in ("size", "fps"):
                if prev.get(key) != getattr(cfg, key):
                    raise InputError(f"{out} holds clips made with --{key} {prev.get(key)}; this run asks for "
                                     f"{getattr(cfg, key)}: use another --out")
        _write_json(st_path, _settings(cfg))
        shutil.rmtree(work / "partial", ignore_errors=True)  # what a killed run was working on
        records = _load_records(work)
        for vid, r in records.items():  # a record not "done" is a video to do again: clear its clips
            if r.get("status") != "done":
                _remove_video_clips(out, vid)
        splits = _assign_splits(cfg, list(speakers.values()), records)
        run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "videos": len(videos), "workers": cfg.workers}
        t_run = time.perf_counter()
        todo = []
        for i, path in enumerate(videos):
            vid = video_id(path)
            if _is_done(records.get(vid), path, out):
                log.info("[%d/%d] %s: already ingested (%d clips), skipped", i + 1, len(videos), path,
                         len(records[vid]["clips"]))
                summary.skipped_done += 1
                continue
            speaker = speakers[str(path)]
            todo.append((cfg, path, vid, speaker, splits[speaker], out, work, i, len(videos)))
        for rec in _run_jobs(cfg, todo):
            vid = rec["video_id"]
            records[vid] = rec
            _write_json(work / "videos" / f"{vid}.json", rec)
            if rec["status"] == "done":
                summary.done += 1
                summary.clips += len(rec["clips"])
                summary.frames_in += rec["frames_in"]
                summary.frames_out += rec["frames_out"]
                summary.seconds += rec["seconds"]
            else:
                summary.failed += 1
            _write_manifest(cfg, out, records)
            _write_report(cfg, out, records, run)
        run.update(seconds=round(time.perf_counter() - t_run, 2), ingested=summary.done,
                   already_done=summary.skipped_done, failed=summary.failed)
        _write_manifest(cfg, out, records)
        _write_report(cfg, out, records, run)
        shutil.rmtree(work / "partial", ignore_errors=True)
    log.info("ingest: %d videos (%d ingested, %d already done, %d failed), %d new clips, %d of %d frames kept%s; "
             "report %s", summary.videos, summary.done, summary.skipped_done, summary.failed, summary.clips,
             summary.frames_out, summary.frames_in,
             f", {summary.frames_per_s:.1f} frames/s" if summary.seconds else "", out / REPORT)
    return summary


def _worker_init(level: int) -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _job(args: tuple) -> dict:
    return _ingest_one(*args)


def _run_jobs(cfg: IngestConfig, todo: list[tuple]) -> Iterator[dict]:
    """Each video's record as it finishes: in this process, or in `cfg.workers` spawned ones (each video
    whole in one worker, its clips moved into the layout there; records, manifest and report stay here)."""
    if cfg.workers <= 1 or len(todo) <= 1:
        for args in todo:
            yield _ingest_one(*args)
        return
    import multiprocessing as mp

    jobs = [(replace(a[0], progress=False),) + a[1:] for a in todo]
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="ingest", unit="video", disable=None, dynamic_ncols=True)
    ctx = mp.get_context("spawn")
    try:
        with ctx.Pool(min(cfg.workers, len(jobs)), initializer=_worker_init,
                      initargs=(logging.getLogger().getEffectiveLevel(),)) as pool:
            for rec in pool.imap_unordered(_job, jobs):
                if bar is not None:
                    bar.update(1)
                yield rec
    finally:
        if bar is not None:
            bar.close()


def _ingest_one(cfg: IngestConfig, path: Path, vid: str, speaker: str, split: str, out: Path, work: Path,
                i: int, n: int) -> dict:
    size, mtime = _stat(path)
    rec = {"video": str(path.resolve()), "video_id": vid, "speaker": speaker, "split": split, "size": size,
           "mtime_ns": mtime, "clips": [], "skipped": [], "cuts": []}
    _remove_video_clips(out, vid)
    part = work / "partial" / vid
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    t0 = time.perf_counter()
    bar = None
    try:
        pcm, offset = audio_and_offset(path)
        job = _VideoJob(cfg, path, vid, part, pcm, offset)
        if cfg.progress:
            from tqdm import tqdm

            total = None
            with contextlib.suppress(Exception):
                import av

                with av.open(str(path)) as c:
                    d = c.duration
                    total = int(d / 1_000_000 * cfg.fps) if d else None
            bar = tqdm(total=total, desc=f"[{i + 1}/{n}] {path.name}", unit="frame", leave=False, disable=None,
                       dynamic_ncols=True)
        job.run(bar)
    except InputError as e:
        shutil.rmtree(part, ignore_errors=True)
        log.error("[%d/%d] %s: %s (listed in %s)", i + 1, n, path, e, REPORT)
        rec.update(status="failed", error=str(e))
        return rec
    finally:
        if bar is not None:
            bar.close()
    secs = time.perf_counter() - t0
    # into the layout: each clip's .mp4 last, so every clip the trainer lists is complete
    for c in job.clips:
        for src_ext, dst in zip((".wav", ".face.npz", ".json", ".mp4"),
                                _clip_files(out, split, speaker, c["clip"])):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part / f"{c['clip']}{src_ext}", dst)
    shutil.rmtree(part, ignore_errors=True)
    fps = cfg.fps
    skipped = [{"start_s": round(k0 / fps, 3), "end_s": round(k1 / fps, 3), "frames": k1 - k0, "reason": why}
               for k0, k1, why in job.skipped]
    frames_out = sum(c["frames"] for c in job.clips)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    rec.update(status="done", clips=job.clips, skipped=skipped, cuts=[round(k / fps, 3) for k in job.cut_frames],
               frames_in=job.frames, frames_out=frames_out, seconds=round(secs, 3),
               frames_per_s=round(job.frames / secs, 2) if secs > 0 else None, loadavg=load,
               detections=job.tracker.detections)
    why = {}
    for s in skipped:
        why[s["reason"]] = why.get(s["reason"], 0) + s["frames"]
    log.info("[%d/%d] %s -> %s/%s: %d clips, %d of %d frames kept%s, %d cuts; %.1f s (%.1f frames/s)", i + 1, n,
             path, split, speaker, len(job.clips), frames_out, job.frames,
             (" (skipped: " + ", ".join(f"{v} {k}" for k, v in why.items()) + ")") if why else "",
             len(job.cut_frames), secs, job.frames / max(secs, 1e-9))
    return rec


__all__ = ["IngestConfig", "IngestSummary", "ingest", "split_for", "speaker_of", "video_id", "find_videos",
           "frames_at", "CutDetector", "REPORT"]
