"""`Marionette`: every network of the engine in one module, built from a `ModelConfig`.

Per avatar (once):         E_app(portrait)                      -> source, feat_hi, feat_lo, app (an AvatarState)
Per driving frame:         E_mot(frame) -> E_lip/E_pose/E_eye/E_exp -> factor latents
Per audio window:          E_aud(mel window)                    -> lip latent (same space as E_lip)
Per output frame:          G(z, source, feat_hi, feat_lo, app)  -> frame

z = [lip, pose, eye, exp] in the order and with the sizes of `cfg.latents` (`LatentConfig.slices()`);
all zeros is the canonical face. The latents' meaning:

* lip (20): free, learnt (lip-audio contrastive, PD-FGC sec. 3.2); E_aud and E_lip share this space.
* pose (6): fixed physical meaning, regressed by the trainer (POSE_LATENT_SCALE):
      [yaw / 30 deg, pitch / 20 deg, roll / 15 deg, tx / 0.08, ty / 0.08, (scale - 1) / 0.1]
  (rotations in degrees, translations as a fraction of the image size, scale relative to canonical framing;
  the units of the corpus' "pose" factor group).
* eye (6): [gaze_x, gaze_y, lid_left, lid_right, free, free]: gaze -1..1 (x: subject's left is +, y: up is +),
  lids 0 = open .. 1 = closed (the corpus' "eyes" group); the last two are free (learnt).
* exp (10): free, learnt (PD-FGC sec. 3.3). Named points in it ("expression presets") travel in the
  checkpoint's meta; see `engine.checkpoint.default_expression_presets`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import FACTORS, LANDMARK_ANCHORS, LANDMARK_MIRROR, ModelConfig
from engine.networks import AppearanceEncoder, AudioEncoder, FactorHead, Generator, MotionEncoder

# Physical meaning of the pose latent: latent = value / scale (see the module docstring).
POSE_LATENT_NAMES: tuple[str, ...] = ("yaw", "pitch", "roll", "tx", "ty", "scale")
POSE_LATENT_SCALE: tuple[float, ...] = (30.0, 20.0, 15.0, 0.08, 0.08, 0.1)
POSE_LATENT_OFFSET: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # latent = (value - offset) / scale
# Physical meaning of the eye latent: the first four entries are the values themselves; the rest are free.
EYE_LATENT_NAMES: tuple[str, ...] = ("gaze_x", "gaze_y", "lid_left", "lid_right")


class Marionette(nn.Module):
    """All networks of the engine (PD-FGC's E_app, E_mot, E_lip, E_pose, E_eye, E_exp, E_aud and G).

    Submodules: ``e_app, e_mot, e_lip, e_pose, e_eye, e_exp, e_aud, generator``. ``forward`` is G.
    Image inputs are (B, 3, S, S) in [-1, 1] (the runtime converts from [0, 1]).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        lat, net = cfg.latents, cfg.net
        if cfg.motion_mirror and not cfg.gt_latents:
            raise ValueError("motion_mirror needs gt_latents (mirroring a reading needs its dimensions' meanings)")
        if cfg.anchors_from_keypoints and not (cfg.patches and net.motion_keypoints == len(LANDMARK_MIRROR)):
            raise ValueError("anchors_from_keypoints needs patches and E_mot's keypoint branch on the renderer's "
                             f"{len(LANDMARK_MIRROR)} landmarks (net.motion_keypoints)")
        self.e_app = AppearanceEncoder(cfg)
        self.e_mot = MotionEncoder(cfg)
        mdim = net.motion_dim + 2 * net.motion_keypoints  # E_mot's feature (with its keypoints' coordinates)
        self.e_lip = FactorHead(mdim, net.head_hidden, lat.lip)
        self.e_pose = FactorHead(mdim, net.head_hidden, lat.pose)
        self.e_eye = FactorHead(mdim, net.head_hidden, lat.eye)
        self.e_exp = FactorHead(mdim, net.head_hidden, lat.exp)
        self.e_aud = AudioEncoder(cfg)
        self.generator = Generator(cfg)

        # ground-truth latents: the dimensions without a meaning are exactly zero (engine.config.GT_DIMS)
        mask = cfg.latents.gt_mask() if cfg.gt_latents else [1.0] * cfg.latents.total
        self.register_buffer("latent_mask", torch.tensor(mask), persistent=False)

    # ---- per avatar
    def encode_avatar(self, portrait: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E_app: (B,3,S,S) in [-1,1] -> feat_hi (B,C1,S/2,S/2), feat_lo (B,C2,S/4,S/4), app (B,app_dim);
        with `cfg.relative`, app is [appearance (app_dim), the portrait's own state z_src (latents.total)],
        z_src estimated by E_mot + heads (run once per avatar); with `cfg.patches`, followed by the portrait's
        three anchors (6: eyes and mouth, grid coordinates): E_mot's keypoints with `cfg.anchors_from_keypoints`
        (the same E_mot passes as z_src), else G.patch's anchor head on feat_lo."""
        feat_hi, feat_lo, app = self.e_app(portrait)
        read = self.cfg.relative or self.cfg.anchors_from_keypoints
        z_src, kp = self.read_portrait(portrait) if read else (None, None)
        if self.cfg.relative:
            app = torch.cat([app, z_src], dim=1)
        if self.cfg.patches:  # and where its eyes and mouth are (G.patch's anchors, (B,3,2) flattened)
            anchors = (kp[:, list(LANDMARK_ANCHORS)] if self.cfg.anchors_from_keypoints
                       else self.generator.patch.source_anchors(feat_lo))
            app = torch.cat([app, anchors.flatten(1)], dim=1)
        return feat_hi, feat_lo, app

    def source_state(self, portrait: torch.Tensor) -> torch.Tensor:
        """The state z (B, latents.total) the portrait itself shows (E_mot + heads; read with its mirror image
        too when `cfg.motion_mirror`: once per avatar, so the second pass costs nothing per frame)."""
        return self.read_portrait(portrait)[0]

    def read_portrait(self, portrait: torch.Tensor, jitter: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """E_mot + heads on the portrait (and its mirror image when `cfg.motion_mirror`) -> (its state z (B, total),
        its keypoints (B,K,2) in grid units, or None without E_mot's keypoint branch). Mirrored readings are mapped
        back and averaged (`mirror_mean`; keypoints on the renderer's landmarks: x negated, left and right swapped;
        other keypoint sets are the plain reading's). With `cfg.portrait_jitter_px` d > 0 and/or `cfg.portrait_zoom`
        (and `jitter`), read at every `reading_views` view (3 x 3 shifts of +-d px, zooms 1 -+ zoom), each view's
        reading mapped back (`unview_state`, `unview_keypoints`) and the views averaged."""
        k = self.cfg.net.motion_keypoints
        b = portrait.shape[0]
        views = (reading_views(self.cfg.portrait_jitter_px, self.cfg.portrait_zoom) if jitter
                 else reading_views(0, 0.0))
        if len(views) > 1:  # (nB,3,S,S): the portrait's content moved by (dx, dy) px and zoomed by k
            portrait = view_frames(portrait, views)
        feat = self.e_mot(portrait)
        out = self.heads(feat)
        kp = MotionEncoder.keypoints(feat, k) if k else None
        if self.cfg.motion_mirror:
            feat_m = self.e_mot(torch.flip(portrait, dims=[3]))
            out = mirror_mean(out, self.heads(feat_m))
            if k == len(LANDMARK_MIRROR):
                kp = 0.5 * (kp + mirror_keypoints(MotionEncoder.keypoints(feat_m, k)))
        if len(views) > 1:  # the views' mean, each view's reading mapped back first
            out = unview_state(out, views, b)
            if kp is not None:
                kp = unview_keypoints(kp, views, b, portrait.shape[-1])
        return self.compose(out), kp

    # ---- per driving frame
    def motion_feature(self, frames: torch.Tensor) -> torch.Tensor:
        """E_mot: (B,3,S,S) in [-1,1] -> unified motion feature (B, motion_dim)."""
        return self.e_mot(frames)

    def heads(self, motion: torch.Tensor) -> dict[str, torch.Tensor]:
        """E_lip/E_pose/E_eye/E_exp on a unified motion feature -> {"lip", "pose", "eye", "exp"}."""
        out = {"lip": self.e_lip(motion), "pose": self.e_pose(motion), "eye": self.e_eye(motion),
               "exp": self.e_exp(motion)}
        if self.cfg.gt_latents:
            out = {k: v * self.latent_mask[s] for (k, v), s in zip(out.items(), self.cfg.latents.slices().values())}
        return out

    def encode_motion(self, frames: torch.Tensor, mirror: bool = False) -> dict[str, torch.Tensor]:
        """(B,3,S,S) in [-1,1] -> {"lip": (B,lip), "pose": (B,pose), "eye": (B,eye), "exp": (B,exp)}; `mirror`:
        the mean of the frame's reading and its mirror image's, mapped back (`mirror_mean`: 2 x E_mot)."""
        out = self.heads(self.e_mot(frames))
        if not mirror:
            return out
        return mirror_mean(out, self.heads(self.e_mot(torch.flip(frames, dims=[3]))))

    # ---- per audio window
    def encode_audio(self, mel: torch.Tensor) -> torch.Tensor:
        """E_aud: (B, n_mels, mel_window) log-mel -> lip latent (B, lip)."""
        lip = self.e_aud(mel)
        if self.cfg.gt_latents:
            lip = lip * self.latent_mask[self.cfg.latents.slices()["lip"]]
        return lip

    # ---- latents
    def compose(self, factors: Mapping[str, torch.Tensor], batch: int | None = None) -> torch.Tensor:
        """Concatenate factor latents into z (B, latents.total); a missing factor is canonical (zeros)."""
        unknown = set(factors) - set(FACTORS)
        if unknown:
            raise ValueError(f"unknown factors {sorted(unknown)}; valid: {', '.join(FACTORS)}")
        ref = next(iter(factors.values()), None)
        if batch is None:
            batch = 1 if ref is None else ref.shape[0]
        p = next(self.parameters())
        dev, dt = (p.device, p.dtype) if ref is None else (ref.device, ref.dtype)
        parts = []
        for name in FACTORS:
            n = getattr(self.cfg.latents, name)
            v = factors.get(name)
            if v is None:
                v = torch.zeros(batch, n, device=dev, dtype=dt)
            elif tuple(v.shape) != (batch, n):
                raise ValueError(f"factor {name!r} has shape {tuple(v.shape)}, expected {(batch, n)}")
            parts.append(v.to(device=dev, dtype=dt))
        return torch.cat(parts, dim=1)

    def split(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """z (B, latents.total) -> {"lip", "pose", "eye", "exp"} (views)."""
        return {k: z[:, s] for k, s in self.cfg.latents.slices().items()}

    # ---- per output frame
    def forward(self, z: torch.Tensor, source: torch.Tensor, feat_hi: torch.Tensor, feat_lo: torch.Tensor,
                app: torch.Tensor) -> torch.Tensor:
        """G: z (B,total) + avatar tensors (batched) -> (B,3,S,S) in [-1,1]."""
        return self.generator(z, source, feat_hi, feat_lo, app)

    def reconstruct(self, source: torch.Tensor, driving: torch.Tensor) -> torch.Tensor:
        """Self-reconstruction (training): appearance of `source`, every factor from `driving` via E_mot + heads."""
        feat_hi, feat_lo, app = self.encode_avatar(source)
        z = self.compose(self.encode_motion(driving))
        return self.generator(z, source, feat_hi, feat_lo, app)


def mirror_latent(factor: str, v: torch.Tensor) -> torch.Tensor:
    """A ground-truth factor latent (B, n) (`ModelConfig.gt_latents`) read from a horizontally mirrored frame ->
    the unmirrored frame's: yaw, roll, tx and gaze_x change sign, the lids swap (the corpus' camera is centred
    and its faces symmetric; every other ground-truth dimension is symmetric)."""
    if factor == "pose":  # [yaw, pitch, roll, tx, ty, scale]
        sign = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0, 1.0], dtype=v.dtype, device=v.device)
        return torch.cat([v[:, :6] * sign, v[:, 6:]], dim=1)
    if factor == "eye":  # [gaze_x, gaze_y, lid_left, lid_right]
        return torch.cat([-v[:, :1], v[:, 1:2], v[:, 3:4], v[:, 2:3], v[:, 4:]], dim=1)
    return v


def mirror_keypoints(kp: torch.Tensor) -> torch.Tensor:
    """Keypoints (B,K,2) found in a horizontally mirrored frame -> the unmirrored frame's: x negated, the subject's
    right and left landmarks swapped (`engine.config.LANDMARK_MIRROR`)."""
    if kp.shape[1] != len(LANDMARK_MIRROR):
        raise ValueError(f"mirroring needs the {len(LANDMARK_MIRROR)} renderer landmarks, got {kp.shape[1]} keypoints")
    sign = torch.tensor([-1.0, 1.0], dtype=kp.dtype, device=kp.device)
    return kp[:, list(LANDMARK_MIRROR)] * sign


def mirror_mean(reading: Mapping[str, torch.Tensor], mirrored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state estimator's mirror reading (`ModelConfig.motion_mirror`): the mean of a frame's reading and its
    mirror image's mapped back. Its head pose has about half the variance (measured on held-out identities: the
    relative yaw error 1.25 -> 0.82 degrees, G's PSNR over copy-source +0.5 dB)."""
    return {k: 0.5 * (v + mirror_latent(k, mirrored[k])) for k, v in reading.items()}


# ---------------------------------------------------------------------------- reading a frame at several views
def reading_views(shift_px: int, zoom: float) -> list[tuple[int, int, float]]:
    """The views (dx, dy, k) of a frame the state estimator reads and averages: its content moved by the 3 x 3
    shifts of +-shift_px pixels (0: none), each at the zooms 1 - zoom, 1, 1 + zoom about the frame's centre (0:
    1 only). E_mot's reading is neither shift- nor scale-equivariant to the pixel, and the views' mean is a steadier
    head pose (README "The portrait read nine times", "Driving frames read at 27 views")."""
    if shift_px < 0 or not 0.0 <= zoom < 0.5:
        raise ValueError(f"reading views need shift_px >= 0 and 0 <= zoom < 0.5, got {shift_px}, {zoom}")
    d = int(shift_px)
    shifts = [(dx, dy) for dy in (-d, 0, d) for dx in (-d, 0, d)] if d > 0 else [(0, 0)]
    zooms = (1.0 - zoom, 1.0, 1.0 + zoom) if zoom > 0 else (1.0,)
    return [(dx, dy, k) for k in zooms for dx, dy in shifts]


def view_frames(frames: torch.Tensor, views: list[tuple[int, int, float]]) -> torch.Tensor:
    """(B,C,S,S) -> (nB,C,S,S), view-major: each view's content zoomed by k about the centre, then moved by
    (dx, dy) px, the border repeated. Unzoomed views are exact pixel shifts."""
    s = frames.shape[-1]
    d = max(max(abs(dx), abs(dy)) for dx, dy, _ in views)
    pad = F.pad(frames, (d, d, d, d), mode="replicate") if d > 0 else frames
    out = []
    for dx, dy, k in views:
        if k == 1.0:
            out.append(pad[:, :, d - dy:d - dy + s, d - dx:d - dx + s])
            continue
        # output u (grid units) shows input (u - t) / k: content scaled by k about the centre, moved by t
        t = (2.0 * dx / s, 2.0 * dy / s)
        theta = torch.tensor([[1.0 / k, 0.0, -t[0] / k], [0.0, 1.0 / k, -t[1] / k]], dtype=frames.dtype,
                             device=frames.device).expand(frames.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(frames.shape), align_corners=False)
        out.append(F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=False))
    return torch.cat(out, dim=0)


def unview_state(reading: Mapping[str, torch.Tensor], views: list[tuple[int, int, float]], b: int
                 ) -> dict[str, torch.Tensor]:
    """The factor readings {factor: (nB, n)} of `view_frames`' views -> their mean (B, n), each view's head pose
    mapped back first: a zoom k multiplies the head's scale and its offset from the centre (pose latent entries 3-5,
    ground-truth units). Shifts are symmetric, so their offsets cancel in the mean."""
    n = len(views)
    out = {}
    for name, v in reading.items():
        v = v.reshape(n, b, *v.shape[1:])
        if name == "pose" and any(k != 1.0 for _, _, k in views):
            k = torch.tensor([kk for _, _, kk in views], dtype=v.dtype, device=v.device).view(n, 1)
            s5 = POSE_LATENT_SCALE[5]
            tx, ty = v[..., 3] / k, v[..., 4] / k
            scale = ((POSE_LATENT_OFFSET[5] + s5 * v[..., 5]) / k - POSE_LATENT_OFFSET[5]) / s5
            v = torch.cat([v[..., :3], tx[..., None], ty[..., None], scale[..., None], v[..., 6:]], dim=-1)
        out[name] = v.mean(0)
    return out


def unview_keypoints(kp: torch.Tensor, views: list[tuple[int, int, float]], b: int, s: int) -> torch.Tensor:
    """Keypoints (nB,K,2) in grid units found in `view_frames`' views -> their mean (B,K,2), each view's mapped
    back (a view shows the point p at k p + t)."""
    n = len(views)
    t = torch.tensor([[2.0 * dx / s, 2.0 * dy / s] for dx, dy, _ in views], dtype=kp.dtype, device=kp.device)
    k = torch.tensor([kk for _, _, kk in views], dtype=kp.dtype, device=kp.device)
    kp = kp.reshape(n, b, *kp.shape[1:])
    return ((kp - t[:, None, None, :]) / k[:, None, None, None]).mean(0)
