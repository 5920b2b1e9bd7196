"""Offline render: a portrait and a speech recording -> a lip-synced talking-head mp4 with the audio.

Pipeline: load the model and prepare the avatar (E_app once) -> load the audio (16 kHz mono) ->
log-mel -> one lip window per video frame -> E_aud in batches -> compose z per frame (lips from the
audio, gated closed in silence; pose/eyes from a driving video or the idle-motion model; expression
from a driving video, a preset or canonical) -> G in batches -> H.264 (yuv420p) + AAC in an mp4.

Frame count = max(1, round(duration * fps)), so the video matches the audio within one frame.

Real photographs (`align`, default "require" on the command line): the face is found and aligned to the
corpus framing (engine.face), the model animates that crop, and each frame is pasted back into the photo
(`output_size`: the photo at its own size by default, "crop", N or WxH around the face). Driving videos
are face-tracked (engine.face.FaceTracker) and E_mot sees the tracked crops; a driving video in which no
face is found (a corpus clip is already framed) is used whole, as before. The built-in avatar is a corpus
render and is used as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import InputError
from engine.runtimes.backend import read_driving
from engine.image import BUILTIN_AVATAR

log = logging.getLogger(__name__)

AUDIO_BATCH = 64
MOTION_BATCH = 32
GENERATE_BATCH = 16
DRIVING_MODES = ("hold", "loop")
DRIVING_VIEWS = ("model", "one")  # a driving frame read at the model's views | once
ALIGN_MODES = ("require", "auto", "off")  # find the face (error if none) | align if found | use the image as is


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
    # "model": driving frames read at the model's views (`ModelConfig.driving_jitter_px` / `driving_zoom`; the
    # built-in: 27, each with its mirror image); "one": one reading (with the mirror image), ~27x less E_mot
    driving_views: str = "model"
    fps: int = 25
    backend: str = "torch"
    seed: int = 0
    exported: Path | None = None  # a `marionette export` directory for the onnxruntime / tensorrt backends
    precision: str = "fp32"
    threads: int | None = None
    kernels: bool = False  # torch on CUDA: the fused Triton warp kernels (opt-in)
    # real photographs (engine.face): "require" (the CLI's default) finds and aligns the face and fails
    # without one; "auto" aligns when a face is found and otherwise uses the image as it is; "off" (the
    # library default, what engine callers got before) always uses the image as it is
    align: str = "off"
    output_size: str | None = None  # "original" (default), "crop", "N" or "WxH" (around the face)
    face_index: int | None = None  # which face when there are several (0: the largest)
    detector: str | None = None  # face detector (None: the default, engine.face.get_detector)


# ------------------------------------------------------------------------------------ driving video
def encode_driving_video(path: Path, rt, fps: float, n_frames: int, track: bool = False,
                         detector: str | None = None, views: bool = True) -> dict[str, np.ndarray]:
    """A driving video -> its factor latents at the output frame rate, {factor: (m, dim)}.

    Frames are centre-cropped and resized to the model size (as portraits are), or, with `track`, cut
    out around the face followed by engine.face.FaceTracker (frames before the face is first found, and
    whole videos without one, are centre-cropped), and run through
    `read_driving` in batches (the model's views; `views=False`: one `rt.encode_motion` reading); output frame i takes the latest video frame shown at time i / fps.
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
    tracker = None
    if track:
        from engine.face import FaceTracker

        tracker = FaceTracker(detector, crop_size=size)

    def flush():
        if batch:
            out = read_driving(rt, torch.cat(batch)) if views else rt.encode_motion(torch.cat(batch))
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
                rgb = frame.to_ndarray(format="rgb24")
                tf = tracker.update(rgb) if tracker is not None else None
                if tf is not None:
                    from engine.face import crop_with

                    batch.append(torch.from_numpy(crop_with(rgb, tf).copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0)
                else:
                    batch.append(load_portrait(rgb, size))
                if len(batch) >= MOTION_BATCH:
                    flush()
    except InputError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise InputError(f"cannot read driving video {path}: {e}") from None
    flush()
    if not times:
        raise InputError(f"driving video {path} has no frames")
    if tracker is not None:
        if tracker.detections and tracker.lost == len(times):
            log.warning("no face found in driving video %s: using its whole frames (as a corpus clip)", path)
        else:
            log.info("driving video %s: face tracked in %d of %d frames (%d detections)", path,
                     len(times) - tracker.lost, len(times), tracker.detections)
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

    def __init__(self, out: Path, size: int | tuple[int, int], fps: int, sample_rate: int):
        """size: S (S x S frames) or (width, height); odd sides are padded by one pixel (yuv420p)."""
        import av

        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.out.with_name(f".{self.out.name}.partial")
        self._c = av.open(str(self._tmp), mode="w", format="mp4")
        self._v = self._c.add_stream("libx264", rate=fps)
        w, h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self._v.width, self._v.height = w + (w % 2), h + (h % 2)
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
        """(B, H, W, 3) uint8."""
        import av

        for img in rgb:
            ph, pw = self._v.height - img.shape[0], self._v.width - img.shape[1]
            if ph or pw:  # odd size: pad one row/column (yuv420p needs even)
                img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="edge")
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
    if cfg.driving_views not in DRIVING_VIEWS:
        raise InputError(f"--driving-views must be one of {', '.join(DRIVING_VIEWS)}, got {cfg.driving_views!r}")
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
    if cfg.align not in ALIGN_MODES:
        raise InputError(f"--align must be one of {', '.join(ALIGN_MODES)}, got {cfg.align!r}")
    if cfg.output_size is not None:
        from engine.face import parse_output_size

        parse_output_size(cfg.output_size)


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
    avatar = prepare_photo_avatar(rt, avatar_path, align=cfg.align if cfg.avatar is not None else "off",
                                  output_size=cfg.output_size, face_index=cfg.face_index, detector=cfg.detector)

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
            driving[key] = encode_driving_video(Path(path), rt, fps, n_frames, track=cfg.align != "off",
                                                detector=cfg.detector, views=cfg.driving_views == "model")
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
    face = getattr(job.avatar, "face", None)
    out_size = face.output_size if face is not None else (size, size)
    writer = Mp4Writer(Path(out), out_size, job.fps, SAMPLE_RATE)
    try:
        writer.write_audio(job.samples)
        with tqdm(total=job.n_frames, unit="frame", desc="render", disable=None) as bar:
            for s in range(0, job.n_frames, GENERATE_BATCH):
                n = min(GENERATE_BATCH, job.n_frames - s)
                z = torch.from_numpy(job.composer.compose_batch(s, n))
                frames = to_uint8_hwc(rt.generate(job.avatar, z))
                writer.write_frames(face.paste(frames) if face is not None else frames)
                bar.update(n)
        path = writer.close()
    except BaseException:
        writer.abort()
        raise
    log.info("wrote %s: %d frames at %d fps (%.2f s of audio), %dx%d", path, job.n_frames, job.fps,
             len(job.samples) / SAMPLE_RATE, *out_size)
    return path


def prepare_photo_avatar(rt, image, *, align: str = "require", output_size=None, face_index: int | None = None,
                         detector: str | None = None):
    """A portrait -> the backend's avatar. align "off": the image as it is (centre square, resized);
    "require": the face found and aligned (InputError without one), the avatar's `.face` carrying the
    transform and the compositor for `output_size` (default: the photo at its own size); "auto": aligned
    when a face is found, else as it is (logged)."""
    if align == "off":
        if face_index is not None:
            raise InputError("--face-index needs face alignment (--align require or auto)")
        return rt.prepare_avatar(image)
    from engine.face import attach, prepare_portrait

    size = rt.cfg.image_size
    try:
        portrait = prepare_portrait(image, size, output_size=output_size or "original", detector=detector,
                                    face_index=face_index)
    except InputError as e:
        if align != "auto" or not str(e).startswith("no face found"):
            raise
        log.warning("%s; using the image as it is (align auto)", e)
        return rt.prepare_avatar(image)
    tf = portrait.transform
    log.info("face %s aligned (scale %.2f, rotation %+.1f deg%s); output %dx%d", tf.face.describe(), tf.scale,
             tf.angle, ", yaw %+.0f deg" % tf.face.pose[0] if tf.face.pose else "", *portrait.output_size)
    avatar = rt.prepare_avatar(torch.from_numpy(portrait.crop.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0)
    return attach(avatar, portrait)


def render(cfg: RenderConfig) -> Path:
    """Render `cfg.audio` spoken by `cfg.avatar` to `cfg.out` (mp4); returns the output path."""
    return write_render(prepare_render(cfg), Path(cfg.out))
