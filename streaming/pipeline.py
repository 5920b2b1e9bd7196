"""The engine as the server drives it: one object with numpy in, numpy/av frames out, built from a
checkpoint (or random weights) and a backend name. Everything here runs on the scheduler thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from engine.errors import InputError

log = logging.getLogger(__name__)
_NO_FACE = object()  # align_portrait's remembered "auto, and no face found"


class Pipeline:
    def __init__(self, runtime, meta: dict, threads: int | None = None):
        import torch

        self.rt = runtime
        self.cfg = runtime.cfg
        self.meta = dict(meta)
        self.presets = {k: np.asarray(v, np.float32) for k, v in (meta.get("expression_presets") or {}).items()}
        self.random_weights = bool(meta.get("random_weights", False))
        self.threads = threads
        self._torch = torch
        # real photos (engine.face): "off" uses portraits as they are; "require" finds and aligns the face
        # (InputError without one); "auto" aligns when a face is found. Aligned avatars' frames are pasted
        # back into a frame of `output_size` around the face ("512" -> 512x512; "crop": the model's crop)
        self.face_align = "off"
        self.output_size = "512"
        self._aligned: dict[str, object] = {}  # content id -> FacePortrait aligned off the scheduler thread
        import threading

        self._aligned_lock = threading.Lock()
        self.phase_times: dict[int, tuple[float, float]] = {}  # warmup's two-phase round times (see warmup)
        from engine.idle_model import load_idle_model

        # the learned idle motion model, when the checkpoint has one (small: one GRU step per frame, CPU)
        self.idle_model = load_idle_model(self.meta.get("checkpoint"), self.meta)
        log.info("idle motion: %s", "the checkpoint's learned model" if self.idle_model is not None
                 else "procedural (the checkpoint has no learned idle model)")

    def idle_model_for(self, fps: int):
        """The learned idle model if it runs at `fps`, or at a whole fraction of it (a session steps it once every
        few ticks: `SessionMotion.idle_div`), on this model's mel bands; else None (procedural)."""
        from engine.idle_model import unfit_reason

        m = self.idle_model
        base = fps if m is None or int(fps) % int(m.cfg.fps) else int(m.cfg.fps)
        why = None if m is None else unfit_reason(m, base, self.cfg.audio.n_mels)
        if why:
            log.warning("idle motion: procedural (%s)", why)
            return None
        return m

    @classmethod
    def load(cls, checkpoint: Path | None = None, config: str = "lite", backend: str = "torch", seed: int = 0,
             threads: int | None = None, exported: Path | None = None, precision: str = "fp32",
             kernels: bool = False) -> "Pipeline":
        import torch

        from engine.checkpoint import load_model
        from engine.runtimes.backend import choose_backend, open_backend

        kind, device = choose_backend(backend)
        if not threads:
            # torch: leave a core to the event loop and the video encoders (its own default takes all cores, and
            # its spinning workers starve everything else on a small machine). ONNX Runtime's sessions do not
            # spin (engine.runtimes.ort), and on 2 cores one thread is too few for the built-in model at 256^2:
            # 38.9 ms a frame with one thread, 26.4 with two; glass_to_glass (25 onsets, load ~1.2) counted 105
            # late ticks with one thread, 26 with two
            cores = os.cpu_count() or 2
            threads = cores if kind == "onnxruntime" else max(1, cores - 1)
        torch.set_num_threads(int(threads))
        model, meta = load_model(checkpoint, config=config, seed=seed)
        opener = dict(name=backend, checkpoint=checkpoint, config=config, seed=seed, exported=exported,
                      precision=precision, device=device, model=(model, meta), kernels=kernels)
        out = cls(open_backend(threads=threads, **opener), meta, threads)
        out._opener = opener
        return out

    @property
    def can_reopen(self) -> bool:
        """Whether `reopen` can open this pipeline's runtime again (it was opened by `load`)."""
        return getattr(self, "_opener", None) is not None

    def reopen(self, threads: int) -> None:
        """Open the runtime again with `threads` inference threads (the server's lanes want one each); the
        avatars prepared before stay valid (CPU tensors of the same model). Call it where no inference runs
        (the scheduler thread, or before the server starts); run `warmup` after it."""
        import torch

        from engine.runtimes.backend import open_backend

        if not self.can_reopen:
            raise RuntimeError("this pipeline was not opened by Pipeline.load: nothing to reopen it with")
        torch.set_num_threads(int(threads))
        self.rt = open_backend(threads=int(threads), **self._opener)
        self.threads = int(threads)
        self.phase_times = {}

    # ---------------------------------------------------------------------------------- avatars
    def prepare_avatar(self, src, align: str | None = None):
        """Path, encoded bytes, PIL image, or an engine.face.FacePortrait -> AvatarState (InputError on a
        bad image). With face alignment (`align`, default self.face_align) the face is found and aligned
        (engine.face) unless `align_portrait` already did it for these bytes on another thread, and the
        state carries the FacePortrait (`state.face`) whose compositor `generate` pastes frames back with."""
        from engine.face import FacePortrait, attach

        mode = self.face_align if align is None else align
        if isinstance(src, FacePortrait):  # aligned already (align_portrait on a worker thread)
            mode, portrait = "given", src
        elif mode == "off":
            return self.rt.prepare_avatar(src)
        else:
            portrait = None
        if portrait is None and isinstance(src, (bytes, bytearray, memoryview)):
            with self._aligned_lock:
                portrait = self._aligned.pop(self._content_id(bytes(src)), None)
        if portrait is None:
            portrait = self.align_portrait(src, mode, keep=False)
        if portrait is None or portrait is _NO_FACE:  # auto, and no face: the image as it is
            return self.rt.prepare_avatar(src)
        crop = self._torch.from_numpy(portrait.crop.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return attach(self.rt.prepare_avatar(crop), portrait)

    @staticmethod
    def _content_id(data: bytes) -> str:
        from streaming.avatars import AvatarStore

        return AvatarStore.content_id(data)

    def align_portrait(self, src, align: str | None = None, keep: bool = True):
        """Find and align the face of a portrait (the slow part of preparing an uploaded avatar: detection
        and landmarks, ~0.1-0.3 s): run it on a worker thread, never the event loop or the scheduler.
        -> engine.face.FacePortrait, or None ("auto" and no face). keep: remember the result for these
        bytes, so the scheduler's `prepare_avatar` only runs E_app."""
        from engine.face import prepare_portrait

        mode = self.face_align if align is None else align
        if mode == "off":
            return None
        try:
            portrait = prepare_portrait(src, self.cfg.image_size, output_size=self.output_size)
        except InputError as e:
            if mode == "auto" and str(e).startswith("no face found"):
                log.info("%s; using the image as it is (align auto)", e)
                portrait = _NO_FACE
            else:
                raise
        if keep and isinstance(src, (bytes, bytearray, memoryview)):
            with self._aligned_lock:
                self._aligned[self._content_id(bytes(src))] = portrait
                while len(self._aligned) > 8:  # uploads aligned but never prepared (a failed E_app)
                    self._aligned.pop(next(iter(self._aligned)))
        return None if portrait is _NO_FACE else portrait

    # -------------------------------------------------------------------------------- per frame
    def encode_audio(self, mels: np.ndarray) -> np.ndarray:
        out = self.rt.encode_audio(self._torch.from_numpy(np.ascontiguousarray(mels, np.float32)))
        return np.asarray(out, np.float32)

    def encode_motion(self, frames_u8: np.ndarray) -> dict[str, np.ndarray]:
        x = self._torch.from_numpy(np.ascontiguousarray(frames_u8)).permute(0, 3, 1, 2).float().div_(255.0)
        # one reading per webcam frame, not the mirror pair (`ModelConfig.motion_mirror`): it runs inside the
        # frame's round, where a second E_mot pass (0.29 GMAC) would cost 25 fps on 2 CPU cores
        out = self.rt.encode_motion(x, mirror=False)
        return {k: np.asarray(v, np.float32) for k, v in out.items()}

    def generate(self, avatars: list, z: np.ndarray):
        """-> (B, S, S, 3) uint8; rows whose avatar came from an aligned photo are pasted back into its
        frame (engine.face.Compositor), and then a list of (H, W, 3) uint8 frames is returned."""
        from engine.runtimes.torch_runtime import to_uint8_hwc

        frames = to_uint8_hwc(self.rt.generate(self._broadcast(avatars), self._torch.from_numpy(z)))
        return self._paste(avatars, frames)

    @staticmethod
    def _broadcast(avatars: list):
        return avatars[0] if all(a is avatars[0] for a in avatars) else avatars  # one for every row: no copy

    @staticmethod
    def _paste(rows: list, frames: np.ndarray):
        faces = [getattr(a, "face", None) for a in rows]
        if all(f is None or f.compositor is None for f in faces):
            return frames
        return [f.paste(fr[None])[0] if f is not None else fr for f, fr in zip(faces, frames)]

    @property
    def concurrent_prepare(self) -> bool:
        """Whether `prepare_avatar` may run on another thread while frames are being made: ONNX Runtime's sessions
        and torch on a CPU are safe to call from two threads (TensorRT's execution contexts and CUDA are not, so
        there it runs on the scheduler thread, between rounds)."""
        if getattr(self.rt, "name", "") == "onnxruntime":
            return True
        dev = getattr(self.rt, "device", None)
        return getattr(self.rt, "name", "") == "torch" and dev is not None and dev.type == "cpu"

    # the frame in two phases (streaming.scheduler): the body ahead of the audio, the mouth net last
    @property
    def late_mouth(self) -> bool:
        """Whether the runtime makes the mouth in a phase of its own (patch models on torch / ONNX Runtime)."""
        return bool(getattr(self.rt, "late_mouth", False))

    def generate_body(self, avatars: list, z: np.ndarray):
        """Everything of the frames but the mouth net's change, from a provisional z (the lips one frame
        old) -> an opaque value for `generate_mouth`."""
        return self.rt.generate_body(self._broadcast(avatars), self._torch.from_numpy(z))

    def generate_mouth(self, body, avatars: list, z: np.ndarray):
        """`generate_body`'s value and the final z -> frames as `generate` returns them."""
        from engine.runtimes.torch_runtime import to_uint8_hwc

        frames = to_uint8_hwc(self.rt.generate_mouth(body, self._broadcast(avatars), self._torch.from_numpy(z)))
        return self._paste(avatars, frames)

    @staticmethod
    def to_video_frames(frames_u8: np.ndarray) -> list:
        """(B,S,S,3) uint8 -> av.VideoFrame in yuv420p (what the VP8/H.264 encoders take), off the loop."""
        import av

        return [av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p")
                for f in frames_u8]

    # ---------------------------------------------------------------------------------- timing
    def warmup(self, avatar, batch_sizes=(1, 2), repeats: int = 8) -> dict[int, float]:
        """Run every per-frame path; returns the 90th-percentile round time per batch size (s)."""
        out = {}
        s = self.cfg.image_size
        lat = self.cfg.latents
        for b in batch_sizes:
            z = np.zeros((b, lat.total), np.float32)
            mel = np.zeros((b, self.cfg.audio.n_mels, self.cfg.mel_window), np.float32)
            times = []
            for i in range(repeats + 2):
                t = time.perf_counter()
                self.encode_audio(mel)
                self.to_video_frames(self.generate([avatar] * b, z))
                if i >= 2:
                    times.append(time.perf_counter() - t)
            out[b] = float(np.percentile(times, 90))
        # the two phases' own (`phase_times`: {batch: (body, mouth + E_aud + conversion)}, 90th percentiles)
        self.phase_times = {}
        if self.late_mouth:
            for b in batch_sizes:
                z = np.zeros((b, lat.total), np.float32)
                mel = np.zeros((b, self.cfg.audio.n_mels, self.cfg.mel_window), np.float32)
                body_t, mouth_t = [], []
                for i in range(repeats + 2):
                    t0 = time.perf_counter()
                    body = self.generate_body([avatar] * b, z)
                    t1 = time.perf_counter()
                    self.encode_audio(mel)
                    self.to_video_frames(self.generate_mouth(body, [avatar] * b, z))
                    if i >= 2:
                        body_t.append(t1 - t0)
                        mouth_t.append(time.perf_counter() - t1)
                self.phase_times[b] = (float(np.percentile(body_t, 90)), float(np.percentile(mouth_t, 90)))
        self.encode_motion(np.zeros((1, s, s, 3), np.uint8))
        return out


def mouth_time_beside_bodies(pipeline, avatar, lanes: int, repeats: int = 12) -> float:
    """The mouth phase's 90th-percentile time (s) while `lanes` bodies run beside it, each on a thread of its own at
    the lanes' lower priority: what the mouth takes when the server runs lanes (measured alone it took about half
    of what it takes served, and a lead sized on that made half the frames late)."""
    from streaming.scheduler import LANE_NICE, lower_priority

    lat, s = pipeline.cfg.latents, pipeline.cfg
    z = np.zeros((1, lat.total), np.float32)
    mel = np.zeros((1, s.audio.n_mels, s.mel_window), np.float32)
    body = pipeline.generate_body([avatar], z)
    stop = threading.Event()

    def spin():
        lower_priority(LANE_NICE)
        while not stop.is_set():
            pipeline.generate_body([avatar], z)

    threads = [threading.Thread(target=spin, name=f"marionette-warmup-lane{i}", daemon=True) for i in range(lanes)]
    for t in threads:
        t.start()
    times = []
    try:
        time.sleep(0.05)
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            pipeline.encode_audio(mel)
            pipeline.to_video_frames(pipeline.generate_mouth(body, [avatar], z))
            if i >= 2:
                times.append(time.perf_counter() - t0)
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return float(np.percentile(times, 90))


def placeholder_portrait(size: int = 256):
    """A drawn stand-in portrait (PIL image) for when the engine ships no built-in avatar."""
    from PIL import Image, ImageDraw, ImageFilter

    s = size
    img = Image.new("RGB", (s, s), (128, 128, 128))
    d = ImageDraw.Draw(img)
    u = s / 256
    d.rectangle([0, int(200 * u), s, s], fill=(70, 80, 110))  # shoulders
    d.ellipse([int(98 * u), int(150 * u), int(158 * u), int(215 * u)], fill=(214, 170, 140))  # neck
    d.ellipse([int(62 * u), int(28 * u), int(194 * u), int(196 * u)], fill=(226, 184, 152))  # face
    d.chord([int(56 * u), int(18 * u), int(200 * u), int(120 * u)], 180, 360, fill=(70, 48, 36))  # hair
    for x in (100, 156):
        d.ellipse([int((x - 14) * u), int(96 * u), int((x + 14) * u), int(112 * u)], fill=(250, 250, 250))
        d.ellipse([int((x - 6) * u), int(98 * u), int((x + 6) * u), int(110 * u)], fill=(60, 90, 130))
        d.line([int((x - 16) * u), int(86 * u), int((x + 14) * u), int(84 * u)], fill=(70, 48, 36),
               width=max(1, int(4 * u)))  # brows
    d.polygon([(int(128 * u), int(112 * u)), (int(118 * u), int(140 * u)), (int(134 * u), int(140 * u))],
              fill=(205, 160, 130))  # nose
    d.chord([int(104 * u), int(148 * u), int(152 * u), int(170 * u)], 0, 180, fill=(170, 80, 80))  # lips
    return img.filter(ImageFilter.GaussianBlur(radius=max(0.5, 1.2 * u)))
