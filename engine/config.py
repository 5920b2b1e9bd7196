"""Frozen configuration of the model and its audio front end.

A checkpoint stores `ModelConfig.to_dict()` as JSON beside its weights, so a checkpoint rebuilds its
own model (`ModelConfig.from_dict`). Configs are parsed only at the entry point; library code takes
these dataclasses, never argparse namespaces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AudioConfig:
    """16 kHz mono -> 80-band log-mel, 25 ms window, 10 ms hop (4 mel frames per video frame at 25 fps).

    Framing (shared by the offline function and `MelStream`): the signal is left-padded with
    `(win_length - hop_length) // 2` zeros and mel frame k covers padded[k*hop : k*hop + win], so
    mel frame k is centred on the k-th 10 ms hop of the original signal and video frame i at 25 fps
    owns mel frames 4i .. 4i+3. Only complete windows are emitted (no right padding).
    """

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 55.0
    f_max: float = 7600.0
    log_floor: float = 1e-5

    @property
    def left_pad(self) -> int:
        return (self.win_length - self.hop_length) // 2

    @property
    def right_overhang(self) -> int:
        """Samples past the end of hop k that mel frame k still needs."""
        return self.win_length - self.hop_length - self.left_pad


@dataclass(frozen=True)
class LatentConfig:
    """Dimensions of the factor latents z_t = [lip, pose, eye, exp]; all zeros is the canonical face."""

    lip: int = 20
    pose: int = 6
    eye: int = 6  # gaze 2 + blink/lids 4
    exp: int = 10

    @property
    def total(self) -> int:
        return self.lip + self.pose + self.eye + self.exp

    def gt_mask(self) -> list[float]:
        """(total,) 1 where a dimension has a ground-truth meaning (GT_DIMS), 0 where it is unused."""
        out: list[float] = []
        for name in ("lip", "pose", "eye", "exp"):
            n = getattr(self, name)
            k = min(n, GT_DIMS[name])
            out += [1.0] * k + [0.0] * (n - k)
        return out

    def slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for name in ("lip", "pose", "eye", "exp"):
            n = getattr(self, name)
            out[name] = slice(start, start + n)
            start += n
        return out


FACTORS: tuple[str, ...] = ("lip", "pose", "eye", "exp")

# Ground-truth-anchored latents (`ModelConfig.gt_latents`): how many leading dimensions of each factor carry a
# physical meaning; the rest are exactly zero. lip = [jaw_open 0..1, width -1..1, rounding 0..1] (the corpus'
# mouth group), pose = the 6 pose latents (engine.controls), eye = [gaze_x, gaze_y, lid_left, lid_right],
# exp = the corpus' 6 expression weights [brow_raise, brow_furrow, smile, frown, cheek_raise, eye_squint].
GT_DIMS: dict[str, int] = {"lip": 3, "pose": 6, "eye": 4, "exp": 6}
# the renderer's facial landmarks that E_mot's keypoint branch finds (trainer.corpus.face.LANDMARKS; kept equal by
# a test)
N_LANDMARKS = 8
# the landmarks' order in a mirror image (the subject's right and left swap: eyes, cheeks) and which of them are
# the local generators' three anchors (eye_right, eye_left, mouth: `trainer.corpus.face.anchor_points`)
LANDMARK_MIRROR = (1, 0, 2, 3, 4, 5, 7, 6)
LANDMARK_ANCHORS = (0, 1, 2)


@dataclass(frozen=True)
class NetworkConfig:
    """Widths of the networks (the `lite` / `base` / `tiny` presets differ only here)."""

    app_channels: tuple[int, ...] = (16, 32, 64)  # E_app pyramid widths at 256^2 / 128^2 / 64^2
    app_dim: int = 128  # appearance vector
    motion_channels: tuple[int, ...] = (16, 32, 64, 96, 128)  # E_mot
    motion_dim: int = 256  # unified motion feature (PD-FGC stage 1)
    head_hidden: int = 128  # E_lip / E_pose / E_eye / E_exp MLP width
    audio_channels: tuple[int, ...] = (32, 64, 96)  # E_aud
    flow_channels: int = 64  # generator's flow/occlusion decoder width at <= 64^2
    refine_channels: int = 32  # refine net width at 128^2
    mouth_channels: int = 24  # mouth-region branch width (and, x 2/3, the local generators' base width)
    # G's own mouth-region branch (S/4 -> S/2, ~155 MMAC at 256^2). With `patches` the mouth net replaces G's
    # pixels inside the mouth square anyway, so the built-in design drops it and spends a third of it on the
    # local generators' third level (`patch_levels`)
    mouth_branch: bool = True
    patch_levels: int = 2  # the local generators' U-net depth (2: n, n/2; 3: also n/4, a receptive field ~3x wider)
    # the local generators also warp their square (a flow from their n/2 features): smiles, brows and lids move
    # rather than repaint (engine.networks.PatchNet)
    patch_warp: bool = False
    # E_mot's keypoint branch (engine.networks.MotionEncoder): K facial landmarks by soft-argmax, their
    # coordinates appended to the motion feature; 0: none (the feature is the pooled map's projection alone)
    motion_keypoints: int = 0


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lite"
    image_size: int = 256
    fps: int = 25
    past_ms: int = 200  # audio context the lip encoder sees before the end of the frame's own audio
    lookahead_ms: int = 120  # audio context after it: the algorithmic latency floor
    latents: LatentConfig = field(default_factory=LatentConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    net: NetworkConfig = field(default_factory=NetworkConfig)
    # --- the design trained on the renderer's ground truth (the built-in model; see README "The model")
    gt_latents: bool = False  # every latent dimension has a physical meaning (GT_DIMS) or is exactly zero
    relative: bool = False  # G is told the source's state too (estimated once per avatar by E_mot + heads)
    pose_warp: bool = False  # head pose is an explicit 3D warp (engine.geometry.pose_flow); G learns the residual
    # G's refine net is told [z_target, z_source] at every S/4 position (a projection broadcast over the map), so
    # the local features that know "mouth corner here" meet "jaw this open" directly, not only through the flow
    # decoder's 8x8 bottleneck
    local_z: bool = False
    # local generators for the mouth and the eyes on squares of G's frame that follow three anchors found in the
    # portrait (engine.networks.PatchRefiner): where the source has no pixels (mouth opening, shut lids)
    patches: bool = False
    # the eye net is told the source's gaze (True), or finds the source's iris in the square itself (False: the
    # slots stay, zero). The per-avatar state estimator cannot read gaze (E_mot pools the face to 4 x 4; its
    # gaze estimate of the held-out corpus' sources is ~0 whatever they look at), so a net that trusts the
    # told source gaze moves a sideways-looking source's iris by the wrong amount
    eye_source_gaze: bool = True
    # measured after training (benchmarks/mouth_opening.py --calibrate), applied by G in eval mode only: knots
    # (d, d') of a monotone piecewise-linear map of the jaw opening relative to the source's, d = jaw_target -
    # jaw_source -> d'. It makes G open the mouth as far as its training target would for a commanded jaw: the
    # trained G renders small openings too small. Empty: none. Training never sees it.
    jaw_calibration: tuple = ()
    # the state estimator reads a frame and its mirror image and averages the two readings (the mirrored one mapped
    # back: yaw, roll, tx and gaze_x change sign, the lids swap: engine.model.mirror_mean): about half the variance
    # of its head pose, which relative motion turns into the whole head sitting off. Always for the portrait (once
    # per avatar); for driving frames the runtimes' default (render --pose-from, evaluate), but not the live
    # webcam path, where the second E_mot pass would not fit a 2-core round
    motion_mirror: bool = False
    # the local generators' anchors in the portrait are E_mot's keypoints (its eye and mouth landmarks, read with
    # the mirror image too when `motion_mirror`) instead of G.patch's anchor head on E_app's features: on 60
    # held-out identities the head's eye anchors were off by 15-33 px at the 99th percentile (70 px after a short
    # patch stage: a mouth pasted on the cheek), E_mot's keypoints by < 5 px at worst (README "The anchors")
    anchors_from_keypoints: bool = False
    # the portrait (once per avatar) is also read shifted by +-portrait_jitter_px pixels in x and y (a 3 x 3 grid,
    # each with its mirror image when `motion_mirror`; the shifts' readings averaged, the keypoints shifted back):
    # E_mot's reading is not shift-equivariant to a pixel, and the portrait's error is a bias relative motion
    # carries into every frame. 0: one reading (README "The portrait read nine times")
    portrait_jitter_px: int = 0
    # ... and at the zooms 1 -+ portrait_zoom about its centre too (each shift at each zoom; the head's scale and
    # offset read in a zoomed view mapped back). 0: no zoom (README "Driving frames read at 27 views")
    portrait_zoom: float = 0.0
    # driving frames read offline (`render --pose-from`, `evaluate`; engine.runtimes.backend.read_driving) at the
    # same kind of views: 3 x 3 shifts of +-driving_jitter_px, zooms 1 -+ driving_zoom, the readings mapped back
    # and averaged. The live webcam path reads each frame once: 27 E_mot passes do not fit a frame's round
    driving_jitter_px: int = 0
    driving_zoom: float = 0.0
    # the runtime measures, once per avatar, how far G opens this portrait's mouth (the factor oracle's reading
    # of G's frames at a grid of jaws) and maps every commanded jaw so the mouth opens as far as the renderer's
    # would (engine.jaw_map): the global jaw_calibration fits the mean face, and per face G's opening for one
    # command varies ~4x between the 10th and 90th percentile (README "The mouth per avatar"). Needs an oracle
    # (the built-in's ships with it)
    avatar_jaw_map: bool = False
    # pose_warp: the computed warp's head ellipsoid, half-axes (x, y, z) in head units, in training and at run time;
    # empty: engine.geometry's HEAD_AXES (the corpus' mean cranium plus a hair margin). engine.geometry.CRANIUM_AXES
    # moves a rendered face better: run with a G trained on HEAD_AXES it trades disentanglement for PSNR, and a G
    # fine-tuned on it as well (README "The warp's head"); `talk` trains with it from the start (README "The
    # cranium retrain")
    head_axes: tuple = ()

    # --- mel window geometry of the audio encoder (derived) ---
    @property
    def mel_per_frame(self) -> int:
        hop_ms = 1000 * self.audio.hop_length / self.audio.sample_rate
        n = 1000 / self.fps / hop_ms
        if abs(n - round(n)) > 1e-9:
            raise ValueError(f"fps {self.fps} does not give a whole number of mel hops per frame")
        return int(round(n))

    @property
    def mel_past(self) -> int:
        """Mel frames up to and including the frame's own (the window's part that is not lookahead)."""
        return int(round(self.past_ms * self.audio.sample_rate / 1000 / self.audio.hop_length))

    @property
    def mel_future(self) -> int:
        return int(round(self.lookahead_ms * self.audio.sample_rate / 1000 / self.audio.hop_length))

    @property
    def mel_window(self) -> int:
        return self.mel_past + self.mel_future

    def mel_window_start(self, frame: int) -> int:
        """First mel frame of video frame `frame`'s window: [start, start + mel_window)."""
        return (frame + 1) * self.mel_per_frame - self.mel_past

    # --- presets ---
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        presets = {
            "lite": cls(name="lite"),
            "base": cls(name="base", net=NetworkConfig(
                app_channels=(32, 64, 128), app_dim=256, motion_channels=(32, 64, 128, 192, 256),
                motion_dim=512, head_hidden=256, audio_channels=(64, 128, 192), flow_channels=128,
                refine_channels=64, mouth_channels=48)),
            "tiny": cls(name="tiny", image_size=64, net=NetworkConfig(
                app_channels=(8, 16, 16), app_dim=32, motion_channels=(8, 16, 16, 32, 32), motion_dim=64,
                head_hidden=32, audio_channels=(16, 16, 32), flow_channels=16, refine_channels=8,
                mouth_channels=8)),
            # the built-in design: lite's networks with ground-truth latents, relative motion and the explicit
            # pose warp (trained on pairs rendered on the fly: `marionette train --config talk`). No lookahead:
            # through G and the oracle, 0 ms keeps 97 % of the best lip-sync correlation (80 ms), 40 ms 98 %
            # (benchmarks/results/lookahead_curve.md), and every 10 ms of it is 10 ms of latency
            "talk": cls(name="talk", lookahead_ms=0, gt_latents=True, relative=True, pose_warp=True, local_z=True,
                        patches=True, eye_source_gaze=False, motion_mirror=True,
                        anchors_from_keypoints=True, portrait_jitter_px=3, avatar_jaw_map=True,
                        driving_jitter_px=3, driving_zoom=0.04, head_axes=(0.74, 1.02, 0.88),  # CRANIUM_AXES
                        net=NetworkConfig(mouth_branch=False, patch_levels=3, patch_warp=True,
                                          motion_keypoints=N_LANDMARKS)),
            "talk-tiny": cls(name="talk-tiny", image_size=64, lookahead_ms=40, gt_latents=True, relative=True,
                             pose_warp=True, local_z=True, patches=True, eye_source_gaze=False, motion_mirror=True,
                             anchors_from_keypoints=True, portrait_jitter_px=1, net=NetworkConfig(
                                 app_channels=(8, 16, 16), app_dim=32, motion_channels=(8, 16, 16, 32, 32),
                                 motion_dim=64, head_hidden=32, audio_channels=(16, 16, 32), flow_channels=16,
                                 refine_channels=8, mouth_channels=8, mouth_branch=False, patch_levels=3,
                                 patch_warp=True, motion_keypoints=N_LANDMARKS)),
        }
        if name not in presets:
            raise ValueError(f"unknown model config {name!r}; valid: {', '.join(presets)}")
        return dataclasses.replace(presets[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        lat = LatentConfig(**d.pop("latents", {}))
        aud = AudioConfig(**d.pop("audio", {}))
        net = d.pop("net", {})
        net = NetworkConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in net.items()})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields in checkpoint config: {sorted(unknown)}")
        if "head_axes" in d:
            d["head_axes"] = tuple(float(x) for x in d["head_axes"])
            if d["head_axes"] and (len(d["head_axes"]) != 3 or min(d["head_axes"]) <= 0):
                raise ValueError(f"head_axes must be three positive half-axes, got {list(d['head_axes'])}")
        if "jaw_calibration" in d:
            d["jaw_calibration"] = tuple(tuple(float(x) for x in kn) for kn in d["jaw_calibration"])
        return cls(latents=lat, audio=aud, net=net, **d)
