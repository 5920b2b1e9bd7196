"""Offline render: a portrait and a speech recording -> a lip-synced talking-head mp4 with the audio.

Pipeline: load the model and prepare the avatar (E_app once) -> load the audio (16 kHz mono) ->
log-mel -> one lip window per video frame -> E_aud in batches -> compose z per frame (lips from the
audio, gated closed in silence; pose/eyes from a driving video or the idle-motion model; expression
from a driving video, a preset or canonical) -> G in batches -> H.264 (yuv420p) + AAC in an mp4.

Frame count = max(1, round(duration * fps)), so the video matches the audio within one frame.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.image import BUILTIN_AVATAR

log = logging.getLogger(__name__)

AUDIO_BATCH = 64
MOTION_BATCH = 32
GENERATE_BATCH = 16
DRIVING_MODES = ("hold", "loop")


@dataclass(frozen=True, kw_only=True)
class RenderConfig:
    """What `marionette render` parsed (field names as the CLI passes them)."""

    avatar: Path | None = None
    audio: Path
    out: Path
    checkpoint: Path | None = None
    config: str = "lite"
    pose_from: Path | None = None
    eyes_from: Path | None = None
    expression_from: Path | None = None
    expression: str | None = None
    driving: str = "hold"
    fps: int = 25
    backend: str = "torch"
    seed: int = 0
    exported: Path | None = None  # a `marionette export` directory for the onnxruntime / tensorrt backends
    precision: str = "fp32"
    threads: int | None = None
    kernels: bool = False  # torch on CUDA: the fused Triton warp kernels (opt-in)


# ------------------------------------------------------------------------------------ driving video
def encode_driving_video(path: Path, rt, fps: float, n_frames: int) -> dict[str, np.ndarray]:
    """A driving video -> its factor latents at the output frame rate, {factor: (m, dim)}.

    Frames are centre-cropped and resized to the model size (as portraits are), run through
    `rt.encode_motion` in batches; output frame i takes the latest video frame shown at time i / fps.
    Only the first n_frames / fps seconds are read (the rest could never be shown); m covers the
    video's duration (at most n_frames), and the caller holds or loops past it.
    """
    import av

    from engine.image import load_portrait

    path = Path(path)
    if not path.is_file():
        raise InputError(f"driving video not found: {path}")
    size = rt.cfg.image_size
    need_s = n_frames / fps
    times: list[float] = []
    chunks: dict[str, list[np.ndarray]] = {}
    batch: list[torch.Tensor] = []
    frame_dur = None

    def flush():
        if batch:
            out = rt.encode_motion(torch.cat(batch))
            for k, v in out.items():
                chunks.setdefault(k, []).append(np.asarray(v, np.float32))
            batch.clear()

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or 25
            frame_dur = 1.0 / float(rate)
            for k, frame in enumerate(container.decode(stream)):
                t = float(frame.time) if frame.time is not None else k * frame_dur
                if times and t - times[0] >= need_s:
                    break
                times.append(t)
                batch.append(load_portrait(frame.to_ndarray(format="rgb24"), size))
                if len(batch) >= MOTION_BATCH:
                    flush()
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise InputError(f"cannot read driving video {path}: {e}") from None
    flush()
    if not times:
        raise InputError(f"driving video {path} has no frames")
    lat = {k: np.concatenate(v) for k, v in chunks.items()}
    t = np.asarray(times) - times[0]
    order = np.argsort(t, kind="stable")  # decode order is presentation order for sane files
    t = t[order]
    lat = {k: v[order] for k, v in lat.items()}
    duration = t[-1] + frame_dur
    m = int(min(n_frames, max(1, round(duration * fps))))
    idx = np.searchsorted(t, np.arange(m) / fps + 1e-6, side="right") - 1
    idx = np.clip(idx, 0, len(t) - 1)
    return {k: v[idx] for k, v in lat.items()}


# ------------------------------------------------------------------------------------------- writer
class Mp4Writer:
    """H.264 (yuv420p) video + AAC mono audio in an mp4, through PyAV. Written to a temporary file
    beside `out` and renamed on `close()`, so a failed render leaves no half-written mp4."""

    def __init__(self, out: Path, size: int, fps: int, sample_rate: int):
        import av

        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out.with_name(f".{self.out.name}.partial")
        self._c = av.open(str(self._tmp), mode="w", format="mp4")
        self._v = self._c.add_stream("libx264", rate=fps)
        self._v.width = self._v.height = size + (size % 2)
        self._v.pix_fmt = "yuv420p"
        self._v.options = {"crf": "18", "preset": "medium"}
        self._a = self._c.add_stream("aac", rate=sample_rate)
        self._a.layout = "mono"
        self._sr = sample_rate
        self._n = 0

    def write_audio(self, samples: np.ndarray) -> None:
        import av

        if len(samples) == 0:
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.float32)[None], format="fltp",
                                           layout="mono")
        frame.sample_rate = self._sr
        frame.pts = 0
        for p in self._a.encode(frame):
            self._c.mux(p)
        for p in self._a.encode(None):
            self._c.mux(p)

    def write_frames(self, rgb: np.ndarray) -> None:
        """(B, S, S, 3) uint8."""
        import av

        for img in rgb:
            if img.shape[0] != self._v.height:  # odd size: pad one row/column (yuv420p needs even)
                img = np.pad(img, ((0, 1), (0, 1), (0, 0)), mode="edge")
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = self._n
            self._n += 1
            for p in self._v.encode(f):
                self._c.mux(p)

    def close(self) -> Path:
        for p in self._v.encode(None):
            self._c.mux(p)
        self._c.close()
        os.replace(self._tmp, self.out)
        return self.out

    def abort(self) -> None:
        try:
            self._c.close()
        except Exception:  # noqa: BLE001 - best effort on the error path
            pass
        self._tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- render
def _check(cfg: RenderConfig) -> None:
    if cfg.driving not in DRIVING_MODES:
        raise InputError(f"--driving must be one of {', '.join(DRIVING_MODES)}, got {cfg.driving!r}")
    if cfg.fps <= 0:
        raise InputError(f"fps must be positive, got {cfg.fps}")
    from engine.runtimes.backend import AUTO, BACKENDS

    if cfg.backend not in (AUTO, *BACKENDS):
        raise InputError(f"unknown backend {cfg.backend!r}; available: {AUTO}, {', '.join(BACKENDS)}")
    if cfg.expression and cfg.expression_from:
        raise InputError("--expression and --expression-from both set the expression; give one of them")
    if not Path(cfg.audio).is_file():
        raise InputError(f"audio file not found: {cfg.audio}")
    for name in ("pose_from", "eyes_from", "expression_from"):
        p = getattr(cfg, name)
        if p is not None and not Path(p).is_file():
            raise InputError(f"--{name.replace('_', '-')}: driving video not found: {p}")
    if cfg.avatar is not None and not Path(cfg.avatar).is_file():
        raise InputError(f"avatar image not found: {cfg.avatar}")


@dataclass
class RenderJob:
    """Everything `render` needs to write the mp4, prepared (models run on the audio and driving videos)."""

    runtime: object
    avatar: object
    composer: object  # MotionComposer
    samples: np.ndarray  # 16 kHz mono float32
    n_frames: int
    fps: int
    meta: dict


def learned_idle_source(meta: dict, mcfg, fps: int, seed: int = 0, mel=None):
    """The checkpoint's learned idle motion (`engine.idle_model.LearnedIdleSource`, fed `mel` when given)
    when it has one that fits (same fps and mel bands), else None (the caller keeps the procedural
    `IdleSource`). Logs which one runs."""
    from engine.idle_model import LearnedIdleSource, load_idle_model, unfit_reason

    model = load_idle_model(meta.get("checkpoint"), meta)
    if model is None:
        log.info("idle motion: procedural (the checkpoint has no learned idle model)")
        return None
    why = unfit_reason(model, fps, mcfg.audio.n_mels)
    if why:
        log.warning("idle motion: procedural (%s)", why)
        return None
    src = LearnedIdleSource(model, seed=seed, log_floor=mcfg.audio.log_floor)
    if mel is not None:
        src.push_mel(np.asarray(mel, np.float32))
    log.info("idle motion: the checkpoint's learned model")
    return src


def prepare_render(cfg: RenderConfig) -> RenderJob:
    """Validate the inputs, load the model, the avatar and the audio, run E_aud (and E_mot on driving
    videos) and build the per-frame `MotionComposer`."""
    from engine.audio import SAMPLE_RATE, frame_energy, load_audio, log_mel, mel_windows, voice_activity
    from engine.checkpoint import load_model
    from engine.composer import (AudioLipSource, CanonicalSource, IdleSource, MotionComposer, PresetSource,
                                 VideoSource)
    from engine.controls import parse_expression

    _check(cfg)
    fps = int(cfg.fps)

    # audio first: the cheapest thing to get wrong (empty -> InputError "audio is empty")
    samples = load_audio(cfg.audio, SAMPLE_RATE)
    duration = len(samples) / SAMPLE_RATE
    n_frames = max(1, int(round(duration * fps)))

    model, meta = load_model(cfg.checkpoint, config=cfg.config, seed=cfg.seed)  # warns on random weights
    from engine.runtimes.backend import choose_backend, open_backend

    device = choose_backend(cfg.backend)[1]

    rt = open_backend(cfg.backend, checkpoint=cfg.checkpoint, config=cfg.config, seed=cfg.seed,
                      exported=cfg.exported, device=device, precision=cfg.precision, threads=cfg.threads, kernels=cfg.kernels,
                      model=(model, meta))
    mcfg = rt.cfg
    if mcfg.audio.sample_rate != SAMPLE_RATE:
        raise InputError(f"this model expects {mcfg.audio.sample_rate} Hz audio; only {SAMPLE_RATE} Hz is supported")
    lat_cfg = mcfg.latents
    presets = meta.get("expression_presets") or {}
    exp_vec = parse_expression(cfg.expression, presets) if cfg.expression else None  # errors before the work

    avatar_path = cfg.avatar
    if avatar_path is None:
        if not BUILTIN_AVATAR.is_file():
            raise InputError("no built-in avatar is installed; pass a portrait with --avatar")
        avatar_path = BUILTIN_AVATAR
    avatar = rt.prepare_avatar(avatar_path)

    # lips: mel -> one window per video frame -> E_aud, gated closed where the audio is silent
    active = voice_activity(samples, fps, SAMPLE_RATE, n_frames=n_frames)
    energy = frame_energy(samples, fps, SAMPLE_RATE, n_frames=n_frames)
    mel = log_mel(samples, mcfg.audio)
    if not active.any():
        log.info("the audio is silent: rendering the idle face for %.2f s", duration)
        lip = np.zeros((n_frames, lat_cfg.lip), np.float32)
    else:
        lip = np.concatenate([
            np.asarray(rt.encode_audio(mel_windows(mel, mcfg, min(AUDIO_BATCH, n_frames - s), fps=fps, start=s)),
                       np.float32)
            for s in range(0, n_frames, AUDIO_BATCH)])

    # the other factors: a driving video (each file encoded once), else idle motion / preset / canonical
    idle = learned_idle_source(meta, mcfg, fps, seed=cfg.seed, mel=mel)
    if idle is None:
        idle = IdleSource(seed=cfg.seed, fps=fps, energy=energy)
    driving: dict[Path, dict[str, np.ndarray]] = {}

    def video_source(path: Path, factor: str):
        key = Path(path).resolve()
        if key not in driving:
            driving[key] = encode_driving_video(Path(path), rt, fps, n_frames)
        return VideoSource({factor: driving[key][factor]}, mode=cfg.driving)

    sources = {
        "lip": AudioLipSource(lat_cfg.lip, lip, active),
        "pose": video_source(cfg.pose_from, "pose") if cfg.pose_from else idle,
        "eye": video_source(cfg.eyes_from, "eye") if cfg.eyes_from else idle,
    }
    if cfg.expression_from:
        sources["exp"] = video_source(cfg.expression_from, "exp")
    elif exp_vec is not None:
        sources["exp"] = PresetSource(exp_vec, presets, fps=fps)
    else:
        sources["exp"] = CanonicalSource(lat_cfg.exp)
    return RenderJob(runtime=rt, avatar=avatar, composer=MotionComposer(lat_cfg, sources), samples=samples,
                     n_frames=n_frames, fps=fps, meta=meta)


def write_render(job: RenderJob, out: Path) -> Path:
    """Generate the job's frames in batches and write them with its audio to `out` (mp4)."""
    from tqdm import tqdm

    from engine.audio import SAMPLE_RATE
    from engine.runtimes.torch_runtime import to_uint8_hwc

    rt, size = job.runtime, job.runtime.cfg.image_size
    writer = Mp4Writer(Path(out), size, job.fps, SAMPLE_RATE)
    try:
        writer.write_audio(job.samples)
        with tqdm(total=job.n_frames, unit="frame", desc="render", disable=None) as bar:
            for s in range(0, job.n_frames, GENERATE_BATCH):
                n = min(GENERATE_BATCH, job.n_frames - s)
                z = torch.from_numpy(job.composer.compose_batch(s, n))
                writer.write_frames(to_uint8_hwc(rt.generate(job.avatar, z)))
                bar.update(n)
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    log.info("wrote %s: %d frames at %d fps (%.2f s of audio), %dx%d", path, job.n_frames, job.fps,
             len(job.samples) / SAMPLE_RATE, size, size)
    return path


def render(cfg: RenderConfig) -> Path:
    """Render `cfg.audio` spoken by `cfg.avatar` to `cfg.out` (mp4); returns the output path."""
    return write_render(prepare_render(cfg), Path(cfg.out))
