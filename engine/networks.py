"""The networks of Marionette: PD-FGC's factor encoders with a real-time warping generator.

Symbols follow PD-FGC (Wang et al., CVPR 2023, sections 3.1-3.3):

* ``E_app``  appearance encoder  -> :class:`AppearanceEncoder` (run once per avatar, its output is cached)
* ``E_mot``  motion encoder      -> :class:`MotionEncoder`     (the unified motion feature, stage 1)
* ``E_lip``, ``E_pose``, ``E_eye``, ``E_exp`` -> :class:`FactorHead` (fine-grained factor latents, stages 2-3)
* ``E_aud``  audio encoder       -> :class:`AudioEncoder`      (mel window -> lip latent, same space as E_lip)
* ``G``      image generator     -> :class:`Generator`

PD-FGC's generator is a StyleGAN2 decoder modulated per frame (15-36 GMAC/frame). ``G`` here is a warping
generator instead: everything heavy that depends only on the portrait is computed once by ``E_app`` and
cached; per frame, a small decoder turns the factor latents z into a dense flow and an occlusion mask at
S/4 (64^2 for S = 256), the cached S/2 and S/4 features and the S x S source image are warped with
``F.grid_sample``, and a shallow refine net at <= S/2 (with a mouth-region branch that paints what the
source does not contain: teeth, tongue, mouth interior) produces the frame. Weights are fixed (no per-frame
style modulation), so G exports to ONNX with a dynamic batch axis, batches across sessions and quantises.

All convolutions are plain ``Conv2d`` + ``LeakyReLU(0.2)``; no normalisation layers, so every output row
depends on its own input row only (a batch of N equals N single calls).

Tensor conventions: images are (B, 3, S, S) in [-1, 1]; S must be a multiple of 32 and >= 64.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.geometry import HEAD_AXES, pose_flow
from kernels.warp import warp_cat

# ---- constants that are not (yet) NetworkConfig fields ------------------------------------------
LEAK = 0.2  # LeakyReLU slope everywhere
DECODER_START_DIV = 32  # G's flow decoder starts at S/32 (8^2 at S = 256) and doubles up to S/4
OCC_INIT = 3.0  # occlusion logit bias at init: sigmoid(3) = 0.95, the warped features pass almost unchanged
ALPHA_INIT = 4.0  # final blend logit bias at init: sigmoid(4) = 0.98 of the warped source image
MOUTH_MASK_INIT = 0.0  # mouth-branch mask logit bias at init (at -2 a trained talk model left the branch unused:
# its mask stayed at 0.002 everywhere)
RESIDUAL_FLOW_MAX = 0.05  # pose_warp: |learned residual| <= this (grid units; 6 px at 256^2). Unbounded, the
# first talk run learned a residual that cancelled ~80% of the computed pose flow and painted a blurred face
LOCAL_Z = 16  # local_z channels
MEL_CENTER = -5.0  # E_aud input normalisation of natural-log mel power: (mel - MEL_CENTER) / MEL_SCALE
MEL_SCALE = 3.0
AUDIO_HIDDEN = 256  # E_aud's last hidden layer
MOTION_POOL = 4  # E_mot pools its last feature map to at most 4 x 4 before the linear layer
KP_FEATURE_GAIN = 10.0  # E_mot's keypoints enter the motion feature x this: a 1 px move (0.008 grid units) is a
# change the heads' first layer sees, as large as the pooled features' own
# patches (ModelConfig.patches): the local generators' squares, in units of the face scale d (the diagonal of
# the eye-eye and eye-mid-to-mouth distances, ~72 px at 256^2); sized from the renderer's own bounds of what the
# mouth painter (0.92 d wide, 0.25 d above to 0.60 d below the mouth centre, chin included) and each eye
# painter (0.46 x 0.35 d, centred 0.04-0.07 d above the eye centre) can touch
MOUTH_SIDE, MOUTH_DOWN = 1.04, 0.17  # side; centre below the mouth anchor
EYE_SIDE, EYE_UP = 0.56, 0.05
# d outside this (grid units) means the anchors are not a face's: the squares keep a sane size instead of collapsing
# to a point (where tiny numeric differences between runtimes blow up) or covering the frame. Measured d: 0.45-0.65
# on held-out corpus clips (the corpus framing); on real photos aligned by engine.face over pose sweeps up to 30 deg,
# 0.40-0.57 (grace_hopper) and 0.54-0.65 (astronaut); a whole unaligned photograph read as a face reached 1.2.
# The bound also sizes the crops the changes are pasted in (PatchRefiner.crop_side): it was 1.5, and below 1.0
# the frames are bit-identical to before; the paste had covered the whole frame.
FACE_SCALE_MIN, FACE_SCALE_MAX = 0.15, 1.0
MOUTH_RES, EYE_RES = 1 / 4, 1 / 8  # patch resolution as a fraction of S (64 and 32 px at 256^2: ~1.2 frame px
# per patch px for the mouth; at 48 px its thin openings were blurred away)
PATCH_FEATHER = 0.2  # the pasted change fades to 0 over this outer fraction of each half-side
ANCHOR_SHARPEN = 4.0  # the soft-argmax reads the anchor maps to this power: the map's faint mass far from its
# peak (a mouth map at 0.05 over half the face) otherwise drags the mean tens of pixels off (measured)
ANCHOR_ITERS = 4  # fixed-point steps that carry a source anchor through the backward flow

__all__ = [
    "AppearanceEncoder", "MotionEncoder", "FactorHead", "AudioEncoder", "Generator", "PatchRefiner", "PatchNet",
    "count_macs", "grid_sample_macs",
]


def conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class ConvAct(nn.Sequential):
    """Conv2d (same padding, optional stride 2) + LeakyReLU."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1):
        super().__init__(conv(cin, cout, k, stride), nn.LeakyReLU(LEAK, inplace=True))


class ResBlock(nn.Module):
    """x + conv(act(conv(x))), then LeakyReLU; width preserved."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = conv(c, c)
        self.conv2 = conv(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.leaky_relu(self.conv1(x), LEAK))
        return F.leaky_relu(x + h, LEAK)


def _check_size(s: int) -> None:
    if s % DECODER_START_DIV or s < 64:
        raise ValueError(f"image_size must be a multiple of {DECODER_START_DIV} and >= 64, got {s}")


# =================================================================================== E_app
class AppearanceEncoder(nn.Module):
    """E_app: portrait -> cached feature pyramid + appearance vector (PD-FGC sec. 3.1).

    (B,3,S,S) in [-1,1] -> feat_hi (B, C1, S/2, S/2), feat_lo (B, C2, S/4, S/4), app (B, app_dim),
    with (C0, C1, C2) = ``net.app_channels`` (C0 is the width of the stem at S x S).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_size(cfg.image_size)
        c0, c1, c2 = cfg.net.app_channels
        d = cfg.net.app_dim
        self.stem = ConvAct(3, c0)  # (B,C0,S,S)
        self.hi = nn.Sequential(ConvAct(c0, c1, stride=2), ResBlock(c1))  # (B,C1,S/2,S/2)
        self.lo = nn.Sequential(ConvAct(c1, c2, stride=2), ResBlock(c2))  # (B,C2,S/4,S/4)
        self.glob = nn.Sequential(ConvAct(c2, 2 * c2, stride=2), ConvAct(2 * c2, d, stride=2))  # (B,d,S/16,S/16)
        self.fc = nn.Linear(d, d)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.stem(img)
        feat_hi = self.hi(h)
        feat_lo = self.lo(feat_hi)
        app = self.fc(self.glob(feat_lo).mean(dim=(2, 3)))  # (B, app_dim)
        return feat_hi, feat_lo, app


# =================================================================================== E_mot
class MotionEncoder(nn.Module):
    """E_mot: driving frame (B,3,S,S) in [-1,1] -> unified motion feature (B, motion_dim (+ 2K)) (PD-FGC sec. 3.1).

    One stride-2 stage per entry of ``net.motion_channels`` (S -> S/2^n), average-pooled to at most
    MOTION_POOL^2 positions, flattened (keeps where things are, which pose needs) and projected.

    With ``net.motion_keypoints`` = K > 0 a keypoint branch finds K facial landmarks (the renderer's
    `trainer.corpus.face.LANDMARKS`, supervised in the `render` and `state` stages): the deepest map, projected
    and upsampled, joins the S/8 map (a top-down path: the deep map knows which part of the face is where, the
    S/8 map where exactly), two convs make K heatmaps and a soft-argmax reads their coordinates (B,K,2) in
    grid units (x right, y down). They are appended to the feature, so the factor heads read pose from
    points located to about half a pixel instead of from a 4 x 4 pooled map (pooled, head pose was off by 1-2
    degrees and 1 px, which cost G 2.3 dB of PSNR against the true pose: README "The state estimator finds
    landmarks").
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_size(cfg.image_size)
        layers, cin = [], 3
        for c in cfg.net.motion_channels:
            layers += [ConvAct(cin, c, stride=2), ConvAct(c, c)]
            cin = c
        self.body = nn.Sequential(*layers)
        s = cfg.image_size
        for _ in cfg.net.motion_channels:
            s = (s + 1) // 2
        self.pool = max(1, s // MOTION_POOL)  # kernel of the fixed average pool (exports as AveragePool)
        s_out = s // self.pool
        self.fc = nn.Linear(cin * s_out * s_out, cfg.net.motion_dim)
        self.n_kp = int(cfg.net.motion_keypoints)
        if self.n_kp:
            if len(cfg.net.motion_channels) < 4:
                raise ValueError("motion_keypoints needs at least 4 E_mot stages (the S/8 map and a deeper one)")
            c8 = cfg.net.motion_channels[2]
            self.kp_tap = 2 * 3 - 1  # index in body of the S/8 map (the third stage's second conv)
            n8 = cfg.image_size // 8
            self.kp_up = n8 // s  # the deepest map (S/2^n) -> S/8
            self.kp_lateral = ConvAct(cin, c8, k=1)
            self.kp_head = nn.Sequential(ConvAct(c8, c8), ConvAct(c8, c8), conv(c8, self.n_kp))
            self.register_buffer("kp_grid", _base_grid(n8).reshape(1, -1, 2), persistent=False)  # (1,n8*n8,2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if not self.n_kp:
            h = self.body(frames)  # (B, C, S/2^n, S/2^n)
            return self.fc(self._pool(h).flatten(1))  # (B, motion_dim)
        h, h8 = frames, None
        for i, layer in enumerate(self.body):
            h = layer(h)
            if i == self.kp_tap:
                h8 = h  # (B, c8, S/8, S/8)
        top = F.interpolate(self.kp_lateral(h), scale_factor=float(self.kp_up), mode="nearest")  # (B,c8,S/8,S/8)
        logit = self.kp_head(h8 + top).flatten(2)  # (B,K,S/8*S/8)
        kp = torch.einsum("bkp,qpc->bkc", torch.softmax(logit, dim=-1), self.kp_grid)  # (B,K,2)
        feat = self.fc(self._pool(h).flatten(1))  # (B, motion_dim)
        return torch.cat([feat, KP_FEATURE_GAIN * kp.flatten(1)], dim=1)  # (B, motion_dim + 2K)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(h, self.pool) if self.pool > 1 else h

    @staticmethod
    def keypoints(feature: torch.Tensor, k: int) -> torch.Tensor:
        """The K keypoints (B,K,2) inside a motion feature (B, motion_dim + 2K)."""
        return feature[:, feature.shape[1] - 2 * k:].reshape(-1, k, 2) / KP_FEATURE_GAIN


# =================================================================================== E_lip / E_pose / E_eye / E_exp
class FactorHead(nn.Module):
    """E_lip / E_pose / E_eye / E_exp: MLP, unified motion feature (B, motion_dim) -> factor latent (B, dim)
    (PD-FGC sec. 3.2 for lip/pose/eye, sec. 3.3 for expression)."""

    def __init__(self, motion_dim: int, hidden: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(motion_dim, hidden), nn.LeakyReLU(LEAK, inplace=True),
            nn.Linear(hidden, hidden), nn.LeakyReLU(LEAK, inplace=True),
            nn.Linear(hidden, dim))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.mlp(m)


# =================================================================================== E_aud
class AudioEncoder(nn.Module):
    """E_aud: log-mel window (B, n_mels, T) -> lip latent (B, lip), in the space of E_lip (PD-FGC sec. 3.2,
    lip-audio contrastive learning). Wav2Lip-sized 2-D conv net over (mel band, time); T = cfg.mel_window
    (past + lookahead), so the lookahead is a config choice. ~0.09 GMAC for lite at T = 32.

    Input is the natural-log mel power of the audio front end; it is normalised inside as
    (mel - MEL_CENTER) / MEL_SCALE, so callers pass the front end's output unchanged.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a0, a1, a2 = cfg.net.audio_channels
        self.n_mels, self.window = cfg.audio.n_mels, cfg.mel_window
        self.body = nn.Sequential(
            ConvAct(1, a0), ConvAct(a0, a0),  # (B,a0,M,T)
            ConvAct(a0, a1, stride=2), ConvAct(a1, a1),  # (B,a1,M/2,T/2)
            ConvAct(a1, a2, stride=2), ConvAct(a2, a2),  # (B,a2,M/4,T/4)
            ConvAct(a2, a2, stride=2),  # (B,a2,M/8,T/8)
        )
        m, t = self.n_mels, self.window
        for _ in range(3):
            m, t = (m + 1) // 2, (t + 1) // 2
        self.fc = nn.Sequential(nn.Linear(a2 * m * t, AUDIO_HIDDEN), nn.LeakyReLU(LEAK, inplace=True),
                                nn.Linear(AUDIO_HIDDEN, cfg.latents.lip))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = ((mel - MEL_CENTER) / MEL_SCALE).unsqueeze(1)  # (B,1,M,T)
        return self.fc(self.body(x).flatten(1))  # (B, lip)


# =================================================================================== G
def _base_grid(n: int) -> torch.Tensor:
    """Identity sampling grid (1, n, n, 2) for grid_sample(align_corners=False): pixel centres in [-1, 1]."""
    v = (torch.arange(n, dtype=torch.float32) * 2 + 1) / n - 1
    gy, gx = torch.meshgrid(v, v, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def _up(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class Generator(nn.Module):
    """G: factor latents + cached avatar tensors -> frame (PD-FGC sec. 3.3's generator, made warping).

    ``forward(z, source, feat_hi, feat_lo, app)``:
      z       (B, latents.total)    [lip, pose, eye, exp]; all zeros = canonical face
      source  (B, 3, S, S)          portrait in [-1, 1]
      feat_hi (B, C1, S/2, S/2)     E_app features
      feat_lo (B, C2, S/4, S/4)     E_app features
      app     (B, app_dim)          E_app appearance vector
    -> (B, 3, S, S) in [-1, 1].

    Stages (each a method, so they can be timed and counted separately):
      flow():   [z, app] -> MLP to S/32 -> 3 x (upsample, conv) -> S/4; a 1x1 guide from feat_lo joins at
                S/4 (so the flow knows where the face is) -> flow (B,2,S/4,S/4) in normalised grid units
                (backward warp: output p samples input at p + flow(p)), occlusion (B,1,S/4,S/4) in (0,1),
                and decoder features m (B, fc/2 (+ LOCAL_Z with local_z), S/4, S/4). The flow output layer is
                zero-initialised, so a fresh G warps by the identity and reproduces (almost) the source.
      warp():   grid_sample of feat_lo at S/4, feat_hi at S/2 (flow bilinearly upsampled), each times the
                occlusion, and of the 3-channel source at S x S.
      refine(): S/4: [warped feat_lo, m] -> 1x1 -> conv (2rc); mouth branch (NetworkConfig.mouth_branch): conv
                (mc) at S/4 -> up -> conv at S/2 -> rc features + mask, blended into the S/2 features;
                S/2: [up(S/4), warped feat_hi] -> 1x1 -> residual block (rc) -> conv to 4 x 4 channels -> pixel
                shuffle -> RGB (tanh) + alpha at S x S; frame = alpha * warped source + (1 - alpha) * RGB. The
                head is zero-initialised with the alpha bias at ALPHA_INIT, so at init the frame is 0.98 x the
                warped source.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        s = cfg.image_size
        _check_size(s)
        n = cfg.net
        c1, c2 = n.app_channels[1], n.app_channels[2]
        fc, rc, mc = n.flow_channels, n.refine_channels, n.mouth_channels
        self.size = s
        self.s0 = s // DECODER_START_DIV
        self.fc_ch = fc
        self.app_dim = n.app_dim
        self.relative = cfg.relative
        self.pose_warp = cfg.pose_warp
        self.head_axes = tuple(cfg.head_axes) or HEAD_AXES  # the computed warp's head ellipsoid
        lat = cfg.latents
        self.pose_slice = lat.slices()["pose"]
        self.jaw_index = lat.slices()["lip"].start  # lip[0] is the jaw opening (GT_DIMS)
        # physical pose = latent * scale + offset (engine.model.POSE_LATENT_SCALE / _OFFSET)
        self.register_buffer("pose_scale", torch.tensor([30.0, 20.0, 15.0, 0.08, 0.08, 0.1]), persistent=False)
        self.register_buffer("pose_offset", torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0]), persistent=False)
        z_in = lat.total * (2 if cfg.relative else 1)  # relative: [z_target, z_source]
        self.z_total = lat.total
        # --- flow/occlusion decoder (S/32 -> S/4)
        self.fc = nn.Linear(z_in + n.app_dim, fc * self.s0 * self.s0)
        self.dec16 = ConvAct(fc, fc)  # S/16
        self.dec32 = ConvAct(fc, fc // 2)  # S/8
        self.guide = ConvAct(c2, fc // 4, k=1)  # S/4, from the cached feat_lo
        pw = 2 if cfg.pose_warp else 0  # the computed pose flow joins the decoder at S/4
        self.dec64 = ConvAct(fc // 2 + fc // 4 + pw, fc // 2)  # S/4
        self.flow_out = conv(fc // 2, 3)  # 2 flow + 1 occlusion logit
        # local_z: [z_target, z_source] -> LOCAL_Z channels broadcast over S/4, appended to m (see ModelConfig)
        self.local_z = nn.Linear(z_in, LOCAL_Z) if cfg.local_z else None
        mz = LOCAL_Z if cfg.local_z else 0
        nn.init.zeros_(self.flow_out.weight)
        with torch.no_grad():
            self.flow_out.bias.copy_(torch.tensor([0.0, 0.0, OCC_INIT]))
        # --- refine at S/4
        self.r64_in = ConvAct(c2 + fc // 2 + mz, 2 * rc, k=1)
        self.r64 = ConvAct(2 * rc, 2 * rc)
        # --- mouth-region branch (S/4 -> S/2): paints what the source lacks, blended by its own mask (optional:
        # NetworkConfig.mouth_branch; with patches the mouth net paints the mouth instead)
        self.mouth_branch = n.mouth_branch
        if n.mouth_branch:
            self.mouth64 = ConvAct(2 * rc, mc)
            self.mouth128 = ConvAct(mc, mc)
            self.mouth_out = conv(mc, rc + 1, k=1)  # rc features + 1 mask logit
            with torch.no_grad():
                self.mouth_out.bias[rc].fill_(MOUTH_MASK_INIT)
        # --- refine at S/2 and the S x S head
        self.r128_in = ConvAct(2 * rc + c1, rc, k=1)
        self.r128 = ResBlock(rc)
        self.head = conv(rc, 4 * 4)  # (rgb 3 + alpha 1) x 2 x 2 -> pixel shuffle to S x S
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[12:16].fill_(ALPHA_INIT)  # pixel_shuffle: out channel c <- in channels 4c .. 4c+3
        self.rc = rc
        # --- local generators for the mouth and the eyes (ModelConfig.patches)
        self.patch = PatchRefiner(cfg) if cfg.patches else None
        # --- the jaw calibration (ModelConfig.jaw_calibration), eval mode only: d' = d + sum_i c_i relu(d - x_i)
        knots = [(float(a), float(b)) for a, b in cfg.jaw_calibration]
        self.jaw_knots = len(knots)
        if knots:
            if not cfg.relative:
                raise ValueError("ModelConfig.jaw_calibration needs relative (it maps the jaw relative to the source's)")
            xs, ys = zip(*sorted(knots))
            if xs[0] != 0.0 or ys[0] != 0.0 or any(b <= a for a, b in zip(xs, xs[1:])) or \
                    any(b < a for a, b in zip(ys, ys[1:])):
                raise ValueError(f"jaw_calibration must start at (0, 0) and rise: {knots}")
            slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)] + [1.0]
            coef = [slopes[0] - 1.0] + [slopes[i] - slopes[i - 1] for i in range(1, len(slopes))]
            self.register_buffer("jaw_x", torch.tensor(xs), persistent=False)
            self.register_buffer("jaw_c", torch.tensor(coef), persistent=False)
        # route warp + concatenations through kernels.warp (set by TorchRuntime; off for training and export)
        self.use_kernels = False
        for k, n_ in (("grid_lo", s // 4), ("grid_hi", s // 2), ("grid_full", s)):
            self.register_buffer(k, _base_grid(n_), persistent=False)  # (1, n, n, 2)

    # ---- stages
    def flow(self, z: torch.Tensor, feat_lo: torch.Tensor, app: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b = z.shape[0]
        zin = [z]
        if self.relative:  # app = [appearance (app_dim), source state (latents.total) (, anchors (6))]
            z_src = app[:, self.app_dim:self.app_dim + self.z_total]
            zin.append(z_src)
            app = app[:, : self.app_dim]
        h = F.leaky_relu(self.fc(torch.cat(zin + [app], dim=1)), LEAK)
        h = h.view(b, self.fc_ch, self.s0, self.s0)  # (B,fc,S/32,S/32)
        h = self.dec16(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B,fc,S/16,S/16)
        h = self.dec32(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B,fc/2,S/8,S/8)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B,fc/2,S/4,S/4)
        parts = [h, self.guide(feat_lo)]
        base = None
        if self.pose_warp:  # explicit 3D warp from the target's pose (and the source's, when relative)
            p_t = z[:, self.pose_slice] * self.pose_scale + self.pose_offset
            p_s = (zin[1][:, self.pose_slice] * self.pose_scale + self.pose_offset if self.relative
                   else self.pose_offset.expand_as(p_t))
            base = pose_flow(p_t, p_s, self.size // 4, self.head_axes)  # (B,2,S/4,S/4)
            parts.append(base)
        m = self.dec64(torch.cat(parts, dim=1))  # (B,fc/2,S/4,S/4)
        o = self.flow_out(m)  # (B,3,S/4,S/4)
        # learned residual on the computed warp, bounded so that it refines the geometry and cannot undo it
        fl = o[:, :2] if base is None else base + RESIDUAL_FLOW_MAX * torch.tanh(o[:, :2])
        if self.local_z is not None:
            n = m.shape[-1]
            zl = F.leaky_relu(self.local_z(torch.cat(zin, dim=1)), LEAK)[:, :, None, None]  # (B,LOCAL_Z,1,1)
            m = torch.cat([m, zl.expand(-1, -1, n, n)], dim=1)  # (B,fc/2+LOCAL_Z,S/4,S/4)
        return fl, torch.sigmoid(o[:, 2:3]), m

    def warp(self, flow: torch.Tensor, occ: torch.Tensor, source: torch.Tensor, feat_hi: torch.Tensor,
             feat_lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s = self.size

        def sample(x: torch.Tensor, base: torch.Tensor, fl: torch.Tensor) -> torch.Tensor:
            grid = base + fl.permute(0, 2, 3, 1)  # (B,n,n,2)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        w_lo = sample(feat_lo, self.grid_lo, flow) * occ  # (B,C2,S/4,S/4)
        flow_hi, occ_hi = _up(flow, s // 2), _up(occ, s // 2)
        w_hi = sample(feat_hi, self.grid_hi, flow_hi) * occ_hi  # (B,C1,S/2,S/2)
        w_src = sample(source, self.grid_full, _up(flow, s))  # (B,3,S,S)
        return w_lo, w_hi, w_src

    def refine(self, m: torch.Tensor, w_lo: torch.Tensor, w_hi: torch.Tensor, w_src: torch.Tensor
               ) -> torch.Tensor:
        r = self._refine_lo(torch.cat([w_lo, m], dim=1))  # (B,2rc,S/4,S/4)
        x_hi = torch.cat([F.interpolate(r, scale_factor=2.0, mode="nearest"), w_hi], dim=1)  # (B,2rc+C1,S/2,S/2)
        return self._refine_hi(r, x_hi, w_src)

    def _refine_lo(self, x_lo: torch.Tensor) -> torch.Tensor:
        """[warped feat_lo, m] (B,C2+fc/2,S/4,S/4) -> r (B,2rc,S/4,S/4)."""
        return self.r64(self.r64_in(x_lo))

    def _refine_hi(self, r: torch.Tensor, x_hi: torch.Tensor, w_src: torch.Tensor) -> torch.Tensor:
        """r, [up(r), warped feat_hi] (B,2rc+C1,S/2,S/2), warped source -> frame (B,3,S,S)."""
        h = self.r128_in(x_hi)  # (B,rc,S/2,S/2)
        if self.mouth_branch:
            mo = self.mouth64(r)  # (B,mc,S/4,S/4)
            mo = self.mouth_out(self.mouth128(F.interpolate(mo, scale_factor=2.0, mode="nearest")))  # (B,rc+1,S/2,S/2)
            mouth, mmask = mo[:, : self.rc], torch.sigmoid(mo[:, self.rc:])
            h = h + mmask * (mouth - h)  # (B,rc,S/2,S/2): mouth region painted by the branch
        h = F.pixel_shuffle(self.head(self.r128(h)), 2)  # (B,4,S,S)
        rgb, alpha = torch.tanh(h[:, :3]), torch.sigmoid(h[:, 3:4])
        return alpha * w_src + (1 - alpha) * rgb  # (B,3,S,S)

    def forward(self, z: torch.Tensor, source: torch.Tensor, feat_hi: torch.Tensor, feat_lo: torch.Tensor,
                app: torch.Tensor, patches: bool = True) -> torch.Tensor:
        if self.jaw_knots and not self.training:
            z = self.calibrate_jaw(z, app)
        flow, occ, m = self.flow(z, feat_lo, app)
        if self.use_kernels:
            frame, w_src = self._forward_fused(flow, occ, m, source, feat_hi, feat_lo)
        else:
            w_lo, w_hi, w_src = self.warp(flow, occ, source, feat_hi, feat_lo)
            frame = self.refine(m, w_lo, w_hi, w_src)
        if self.patch is not None and patches:  # patches=False: the warping generator alone (its training stage)
            k = self.app_dim + self.z_total
            anchors = app[:, k:k + 2 * PatchRefiner.N_ANCHORS].reshape(-1, PatchRefiner.N_ANCHORS, 2)
            frame = self.patch(frame, z, app[:, self.app_dim:k], flow, anchors, w_src)
        return frame

    # ---- the frame in two phases (a late-bound mouth: the streaming path's latency)
    def body(self, z: torch.Tensor, source: torch.Tensor, feat_hi: torch.Tensor, feat_lo: torch.Tensor,
             app: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything of the frame except the mouth net's change, from a *provisional* z (its lip may be a
        frame old): -> MouthInputs (pre (B,3,S,S), win (B,1,S,S), grid (B,S,S,2), square (B,3,n,n)), which
        `mouth(inputs, z, app)` finishes with the final z. With the same z, body + mouth == forward.
        Needs patches (the mouth square is what makes the mouth)."""
        if self.patch is None:
            raise ValueError("body/mouth need ModelConfig.patches")
        if self.jaw_knots and not self.training:
            z = self.calibrate_jaw(z, app)
        flow, occ, m = self.flow(z, feat_lo, app)
        w_lo, w_hi, w_src = self.warp(flow, occ, source, feat_hi, feat_lo)
        frame = self.refine(m, w_lo, w_hi, w_src)
        k = self.app_dim + self.z_total
        anchors = app[:, k:k + 2 * PatchRefiner.N_ANCHORS].reshape(-1, PatchRefiner.N_ANCHORS, 2)
        return self.patch.body(frame, z, app[:, self.app_dim:k], flow, anchors, w_src)

    def mouth(self, pre: torch.Tensor, win: torch.Tensor, grid: torch.Tensor, square: torch.Tensor,
              z: torch.Tensor, app: torch.Tensor) -> torch.Tensor:
        """The mouth net's change from the final z, pasted into `body`'s frame -> (B,3,S,S) in [-1,1]."""
        if self.jaw_knots and not self.training:
            z = self.calibrate_jaw(z, app)
        z_s = app[:, self.app_dim:self.app_dim + self.z_total]
        return self.patch.mouth(pre, win, grid, square, z, z_s)

    def calibrate_jaw(self, z: torch.Tensor, app: torch.Tensor) -> torch.Tensor:
        """z (B, latents.total) with its jaw (lip[0]) moved by ModelConfig.jaw_calibration, relative to the
        source's jaw (in app); below the source's jaw (closing an open mouth) the map is the identity."""
        j = self.jaw_index  # lip[0]: the jaw opening
        js = app[:, self.app_dim + j:self.app_dim + j + 1]  # (B,1) the source's jaw
        d = z[:, j:j + 1] - js  # (B,1)
        d2 = d + (F.relu(d - self.jaw_x) * self.jaw_c).sum(dim=1, keepdim=True)  # (B,1)
        return torch.cat([z[:, :j], js + d2, z[:, j + 1:]], dim=1)

    def _forward_fused(self, flow: torch.Tensor, occ: torch.Tensor, m: torch.Tensor, source: torch.Tensor,
                       feat_hi: torch.Tensor, feat_lo: torch.Tensor) -> torch.Tensor:
        """warp() + refine() with each warp, its occlusion product and the concatenation after it in one
        kernels.warp.warp_cat call (a Triton kernel on CUDA, the identical PyTorch reference elsewhere)."""
        x_lo = warp_cat(feat_lo, flow, occ, m)  # (B,C2+fc/2,S/4,S/4) = cat([w_lo, m])
        r = self._refine_lo(x_lo)  # (B,2rc,S/4,S/4)
        x_hi = warp_cat(feat_hi, flow, occ, r, extra_first=True)  # (B,2rc+C1,S/2,S/2) = cat([up(r), w_hi])
        w_src = warp_cat(source, flow)  # (B,3,S,S)
        return self._refine_hi(r, x_hi, w_src), w_src


# =================================================================================== local generators
class PatchNet(nn.Module):
    """One local generator: a square of the frame (B,3,n,n) and its conditioning (B,k) -> the change to paste
    (B,3,n,n). A two-level U-net: conv at n, stride-2 conv to n/2 where the conditioning joins (twice), up,
    merged with the full-resolution skip and the conditioning by a 1x1, and a zero-initialised output conv
    (a fresh net changes nothing). With levels=3 a third level at n/4 (stride-2 conv, the conditioning joins
    twice) is added back into n/2 through a zero-initialised 1x1 (`lift`): the receptive field grows from about
    +-6 to +-18 square pixels (an iris crossing the eye, a mouth corner drawn up by a smile), and a two-level
    net's weights load into it unchanged in function.

    With ``warp_res`` (the square's side n; NetworkConfig.patch_warp) the net also moves what is there: a flow
    (B,2,n/2,n/2) from the n/2 features, in the square's grid units, upsampled and applied to the square, so the
    change is warp(x) - x + paint. A smile draws the lip corners up, a raised brow or a squinting lid moves a few
    pixels: a displacement, which an additive change of 16 channels did not learn (the oracle read +0.02 of a
    commanded +0.87 smile). ``pairs`` ((target, source) column indices into the conditioning) adds a learned
    linear basis to that flow: flow += sum_p (cond[t_p] - cond[s_p]) * B_p, B_p (2, n/4, n/4) in the square's
    frame, so each factor's change moves the square by its own field (LivePortrait moves keypoints by such
    offsets), zero when target and source agree. Flow conv and basis start at zero: a checkpoint without them
    loads unchanged in function."""

    def __init__(self, k: int, c: int, levels: int = 2, warp_res: int = 0, pairs: tuple = ()):
        super().__init__()
        if levels not in (2, 3):
            raise ValueError(f"PatchNet levels must be 2 or 3, got {levels}")
        if warp_res < 0 or warp_res % 2:
            raise ValueError(f"PatchNet warp_res must be an even square side (0: no warp), got {warp_res}")
        self.inp = ConvAct(3, c)
        self.down = ConvAct(c, 2 * c, stride=2)
        self.mid1 = ConvAct(2 * c + k, 2 * c)
        self.mid2 = ConvAct(2 * c + k, 2 * c)
        self.levels = levels
        if levels == 3:
            self.down2 = ConvAct(2 * c, 4 * c, stride=2)
            self.deep1 = ConvAct(4 * c + k, 4 * c)
            self.deep2 = ConvAct(4 * c + k, 4 * c)
            self.lift = conv(4 * c, 2 * c, k=1)
        self.warp_res = int(warp_res)
        self.basis_res = 0
        if warp_res:
            self.flow = conv(2 * c, 2)
            nn.init.zeros_(self.flow.weight)
            nn.init.zeros_(self.flow.bias)
            self.register_buffer("grid", _base_grid(warp_res), persistent=False)
            if pairs:
                m = self.basis_res = max(4, warp_res // 4)
                self.basis = nn.Parameter(torch.zeros(len(pairs), 2 * m * m))  # (P, 2*m*m)
                self.register_buffer("pair_t", torch.tensor([t for t, _ in pairs]), persistent=False)
                self.register_buffer("pair_s", torch.tensor([s for _, s in pairs]), persistent=False)
        elif pairs:
            raise ValueError("PatchNet pairs need warp_res")
        self.merge = ConvAct(3 * c + k, c, k=1)  # the conditioning joins at full resolution too (a thin opening
        # is a line one or two pixels tall: the n/2 bottleneck alone gave "shut below jaw 0.45")
        self.out = conv(c, 3)
        # Kaiming (fan-in, LeakyReLU) inside: PyTorch's default init shrinks the signal ~3x per layer, so the
        # conditioning reached the output ~30x weaker than the patch; the output conv starts at zero
        inner = [self.inp, self.down, self.mid1, self.mid2, self.merge]
        if levels == 3:
            inner += [self.down2, self.deep1, self.deep2]
            nn.init.zeros_(self.lift.weight)
            nn.init.zeros_(self.lift.bias)
        for mod in inner:
            nn.init.kaiming_normal_(mod[0].weight, a=LEAK, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(mod[0].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x0 = self.inp(x)  # (B,c,n,n)
        h = self.down(x0)  # (B,2c,n/2,n/2)
        cm = cond[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])  # (B,k,n/2,n/2)
        h = self.mid1(torch.cat([h, cm], dim=1))
        h = self.mid2(torch.cat([h, cm], dim=1))
        if self.levels == 3:
            d = self.down2(h)  # (B,4c,n/4,n/4)
            cd = cond[:, :, None, None].expand(-1, -1, d.shape[2], d.shape[3])  # (B,k,n/4,n/4)
            d = self.deep1(torch.cat([d, cd], dim=1))
            d = self.deep2(torch.cat([d, cd], dim=1))
            h = h + self.lift(F.interpolate(d, scale_factor=2.0, mode="nearest"))  # (B,2c,n/2,n/2)
        moved = None
        if self.warp_res:
            fl = self.flow(h)  # (B,2,n/2,n/2) grid units of the square
            if self.basis_res:
                d = cond.index_select(1, self.pair_t) - cond.index_select(1, self.pair_s)  # (B,P)
                m = self.basis_res
                fl = fl + _up((d @ self.basis).view(-1, 2, m, m), fl.shape[-1])
            fl = _up(fl, self.warp_res)  # (B,2,n,n)
            moved = F.grid_sample(x, self.grid + fl.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                                  align_corners=False) - x  # (B,3,n,n)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # (B,2c,n,n)
        cf = cond[:, :, None, None].expand(-1, -1, x0.shape[2], x0.shape[3])  # (B,k,n,n)
        paint = self.out(self.merge(torch.cat([h, x0, cf], dim=1)))  # (B,3,n,n)
        return paint if moved is None else moved + paint


class PatchRefiner(nn.Module):
    """P: new content where the source has no pixels for it (the mouth opening, teeth, closing lids, a moved
    iris), made by two small local generators on squares of G's frame that follow the face.

    Geometry is computed, not learned, except where the three anchors are in the portrait:
      * ``source_anchors(feat_lo)``: a small head on E_app's S/4 features -> soft-argmax -> (B,3,2) grid
        coordinates of [eye at the image's left (subject's right), eye at the image's right, mouth centre]
        (supervised with the renderer's ground truth); run once per avatar, carried at the end of `app`. With
        `ModelConfig.anchors_from_keypoints` (the built-in) E_mot's keypoints give them instead and this head is
        unused (`Marionette.encode_avatar`);
      * ``target_anchors(a_s, flow)``: where G's backward flow carries them in the frame (p = a_s - flow(p),
        a few fixed-point steps);
      * ``boxes(a_t)``: squares from the anchors: axis along the eye line, side from the face scale d;
      * ``apply(frame, z_t, z_s, a_t)``: each square is sampled (the right-hand eye mirrored, so one eye net
        serves both), its net turns [square, target and source factor values] into a change, and the change
        is pasted back through the inverse map with a feathered edge: frame + sum_k W_k * change_k, computed
        only inside a crop of the frame that holds the square (``_place``; W_k is 0 outside it), gathered and
        scattered back by flat index: the eyes' crops are 106 px at 256^2, 17 % of the frame each.
    The mouth net is told lip [jaw, width, rounding] and expression of target and source; the eye net the
    eye's lid, gaze and expression of target and source (the source's gaze only with
    ModelConfig.eye_source_gaze; without it the net finds the source's iris in the square).
    Needs ``gt_latents`` and ``relative``."""

    N_ANCHORS = 3

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not (cfg.gt_latents and cfg.relative):
            raise ValueError("ModelConfig.patches needs gt_latents and relative")
        from engine.config import GT_DIMS

        s = cfg.image_size
        c2 = cfg.net.app_channels[2]
        sl = cfg.latents.slices()
        self.lip = list(range(sl["lip"].start, sl["lip"].start + GT_DIMS["lip"]))
        self.exp = list(range(sl["exp"].start, sl["exp"].start + GT_DIMS["exp"]))
        e = sl["eye"].start  # [gaze_x, gaze_y, lid_left, lid_right]
        self.gaze_x, self.gaze_y, self.lid = e, e + 1, (e + 3, e + 2)  # lid of the image-left / image-right eye
        self.source_gaze = 1.0 if cfg.eye_source_gaze else 0.0  # 0: the net finds the source's iris itself
        k_m = 2 * (len(self.lip) + len(self.exp))
        k_e = 2 * (3 + len(self.exp))
        c = max(8, cfg.net.mouth_channels * 2 // 3)
        self.mouth_res = max(8, int(round(s * MOUTH_RES / 2)) * 2)
        self.eye_res = max(4, int(round(s * EYE_RES / 2)) * 2)
        # per avatar (its output travels in the avatar's `app` vector), so it can afford a few 3x3 layers
        self.anchor = nn.Sequential(ConvAct(c2, 32), ConvAct(32, 32), conv(32, self.N_ANCHORS))
        warp = cfg.net.patch_warp
        nl, nx = len(self.lip), len(self.exp)
        # the (target, source) columns of `conditions` whose change moves the square: mouth lip + expression,
        # eye lid + expression (not gaze: without eye_source_gaze the source's is not given)
        m_pairs = tuple((i, nl + i) for i in range(nl)) + tuple((2 * nl + i, 2 * nl + nx + i) for i in range(nx))
        ne = 6  # the eye conditioning before its expression: lid target / source, gaze target x y, source x y
        e_pairs = ((0, 1),) + tuple((ne + i, ne + nx + i) for i in range(nx))
        self.mouth_net = PatchNet(k_m, c, cfg.net.patch_levels, self.mouth_res if warp else 0, m_pairs if warp else ())
        self.eye_net = PatchNet(k_e, c, cfg.net.patch_levels, self.eye_res if warp else 0, e_pairs if warp else ())
        n = s // 4
        self.register_buffer("grid_lo", _base_grid(n), persistent=False)  # (1,n,n,2)
        self.register_buffer("grid_full", _base_grid(s), persistent=False)
        self.register_buffer("grid_mouth", _base_grid(self.mouth_res), persistent=False)
        self.register_buffer("grid_eye", _base_grid(self.eye_res), persistent=False)
        # each change is pasted inside a crop of the frame that holds its square at any angle and any face scale
        # up to FACE_SCALE_MAX (the frame outside it is untouched: the window there is 0), not over the whole frame
        self.size = s
        # (the mouth's paste covers the frame: its crop would be 193 px at 256^2, and scattering it back cost the
        # late, latency-bound mouth phase 1.6 ms more than the whole-frame paste: phase_times_crops.json)
        self.crop_eye = self.crop_side(s, EYE_SIDE)
        self.register_buffer("ramp_eye", torch.arange(self.crop_eye), persistent=False)  # int64

    # ---- anchors
    def anchor_maps(self, feat_lo: torch.Tensor) -> torch.Tensor:
        """feat_lo (B,C2,S/4,S/4) -> (B,3,S/4*S/4) log-probabilities of each anchor's position."""
        logit = self.anchor(feat_lo)  # (B,3,n,n)
        b, k, n, _ = logit.shape
        return torch.log_softmax(logit.reshape(b, k, n * n), dim=-1)

    def source_anchors(self, feat_lo: torch.Tensor, logp: torch.Tensor | None = None) -> torch.Tensor:
        """feat_lo (B,C2,S/4,S/4) -> (B,3,2) anchor coordinates in the portrait (soft-argmax of the head's
        maps). Run once per avatar (`Marionette.encode_avatar`)."""
        if logp is None:
            logp = self.anchor_maps(feat_lo)
        p = torch.softmax(logp * ANCHOR_SHARPEN, dim=-1)  # (B,3,n*n)
        g = self.grid_lo.reshape(1, -1, 2)  # (1,n*n,2)
        return torch.einsum("bkp,qpc->bkc", p, g)  # (B,3,2)

    @staticmethod
    def target_anchors(a_s: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Source anchors (B,3,2) -> frame anchors: the points p with p + flow(p) = a_s (flow (B,2,n,n) backward,
        as G.warp uses it)."""
        p = a_s
        for _ in range(ANCHOR_ITERS):
            f = F.grid_sample(flow, p.unsqueeze(2), mode="bilinear", padding_mode="border",
                              align_corners=False)  # (B,2,3,1)
            p = a_s - f[..., 0].transpose(1, 2)
        return p

    @staticmethod
    def boxes(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Anchors (B,3,2) -> centres (B,3,2), half-sides (B,3), unit axes u (B,2) along the eye line and v (B,2)
        down the face; squares in the order [image-left eye, image-right eye, mouth]."""
        e0, e1, mo = a[:, 0], a[:, 1], a[:, 2]
        ee = e1 - e0
        ln = ee.norm(dim=-1, keepdim=True).clamp(min=1e-4)
        u = ee / ln  # (B,2)
        v = torch.stack([-u[:, 1], u[:, 0]], dim=-1)  # (B,2) y is down
        em = (mo - 0.5 * (e0 + e1)).norm(dim=-1, keepdim=True)
        d = (ln * ln + em * em).sqrt().clamp(FACE_SCALE_MIN, FACE_SCALE_MAX)  # (B,1) face scale
        c0 = e0 - EYE_UP * d * v
        c1 = e1 - EYE_UP * d * v
        cm = mo + MOUTH_DOWN * d * v
        half = torch.cat([d * (EYE_SIDE / 2), d * (EYE_SIDE / 2), d * (MOUTH_SIDE / 2)], dim=1)  # (B,3)
        return torch.stack([c0, c1, cm], dim=1), half, u, v

    def square(self, img: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
        """Square k (0, 1: eyes, the right one mirrored; 2: mouth) of `img` (B,3,S,S) at anchors a (B,3,2), at
        its net's resolution (B,3,n,n) (training: the mouth discriminator's input)."""
        centre, half, u, v = self.boxes(a)
        g = self.grid_mouth if k == 2 else self.grid_eye
        sx = -1.0 if k == 1 else 1.0
        c, h = centre[:, k], half[:, k].view(-1, 1, 1, 1)
        grid = c.view(-1, 1, 1, 2) + h * (g[..., :1] * sx * u.view(-1, 1, 1, 2) + g[..., 1:] * v.view(-1, 1, 1, 2))
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # ---- the local generators
    def conditions(self, z_t: torch.Tensor, z_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> mouth (B,k_m), image-left eye (B,k_e), image-right eye (B,k_e, gaze x mirrored)."""
        mouth = torch.cat([z_t[:, self.lip], z_s[:, self.lip], z_t[:, self.exp], z_s[:, self.exp]], dim=1)
        eyes = []
        for k, sign in ((0, 1.0), (1, -1.0)):
            lid = self.lid[k]
            eyes.append(torch.cat([z_t[:, lid:lid + 1], z_s[:, lid:lid + 1],
                                   sign * z_t[:, self.gaze_x:self.gaze_x + 1], z_t[:, self.gaze_y:self.gaze_y + 1],
                                   self.source_gaze * sign * z_s[:, self.gaze_x:self.gaze_x + 1],
                                   self.source_gaze * z_s[:, self.gaze_y:self.gaze_y + 1],
                                   z_t[:, self.exp], z_s[:, self.exp]], dim=1))
        return mouth, eyes[0], eyes[1]

    @staticmethod
    def crop_side(s: int, side: float) -> int:
        """Frame pixels of the crop that holds a square of `side` x the face scale at FACE_SCALE_MAX, turned to
        any angle (its half-diagonal), plus 2 px each way for the crop's rounding; at most the frame."""
        half_px = FACE_SCALE_MAX * side / 2 * s / 2
        return min(s, int(math.ceil(2 * math.sqrt(2) * half_px)) + 4)

    def _crop_index(self, centre: torch.Tensor, k: int) -> torch.Tensor | None:
        """Square k's centre (B,2) in grid units -> the flat frame indices (B,1,W*W) of its W x W crop, placed
        around the centre and kept inside the frame (int64: exact at any precision); None for the mouth (its
        paste covers the frame)."""
        if k == 2:
            return None
        s = self.size
        ramp = self.ramp_eye  # (W,)
        w = ramp.shape[0]
        px = (centre.float() + 1.0) * (s / 2) - 0.5  # (B,2) pixel coordinates (x, y)
        o = torch.floor(px - (w - 1) / 2 + 0.5).clamp(0, s - w).long()  # (B,2) the crop's top-left pixel
        ys, xs = o[:, 1:2] + ramp, o[:, 0:1] + ramp  # (B,W)
        return (ys[:, :, None] * s + xs[:, None, :]).reshape(-1, 1, w * w)  # (B,1,W*W)

    @staticmethod
    def take(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """x (B,C,S,S), crop indices (B,1,W*W) -> the crop (B,C,W,W) (None: the whole frame)."""
        if idx is None:
            return x
        b, c = x.shape[:2]
        w = math.isqrt(idx.shape[-1])
        return torch.gather(x.flatten(2), 2, idx.expand(b, c, -1)).reshape(b, c, w, w)

    @staticmethod
    def put(x: torch.Tensor, idx: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """x (B,C,S,S) with its crop (indices (B,1,W*W)) replaced by v (B,C,W,W) -> (B,C,S,S) (None: v)."""
        if idx is None:
            return v
        b, c = x.shape[:2]
        return torch.scatter(x.flatten(2), 2, idx.expand(b, c, -1), v.flatten(2)).reshape(x.shape)

    def _place(self, a_t: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Square k's geometry at frame anchors a_t: its sampling grid (B,n,n,2), the crop's flat frame indices
        (B,1,W*W) (None for the mouth, whose crop is the frame: W = S), the crop's pixels in the square's
        coordinates (B,W,W,2) (the paste-back grid) and its feathered window (B,1,W,W) (0 outside the square, so
        the frame outside the crop is untouched)."""
        centre, half, u, v = self.boxes(a_t)
        g = self.grid_mouth if k == 2 else self.grid_eye  # (1,n,n,2)
        sx = -1.0 if k == 1 else 1.0  # the image-right eye is sampled mirrored
        c, h = centre[:, k], half[:, k].view(-1, 1, 1, 1)  # (B,2), (B,1,1,1)
        px, py = g[..., :1] * sx, g[..., 1:]  # (1,n,n,1)
        grid = c.view(-1, 1, 1, 2) + h * (px * u.view(-1, 1, 1, 2) + py * v.view(-1, 1, 1, 2))  # (B,n,n,2)
        idx = self._crop_index(c, k)  # (B,1,W*W) or None: the whole frame
        if idx is None:
            gq = self.grid_full  # (1,S,S,2)
        else:
            b, w = idx.shape[0], math.isqrt(idx.shape[-1])
            gq = torch.gather(self.grid_full.reshape(1, -1, 2).expand(b, -1, -1), 1,
                              idx.reshape(b, -1, 1).expand(-1, -1, 2)).reshape(b, w, w, 2)  # (B,W,W,2) its pixels
        # back: frame pixel q -> patch coordinates ((q - c).u / h * sx, (q - c).v / h)
        q = gq - c.view(-1, 1, 1, 2)  # (B,W,W,2)
        qx = (q * u.view(-1, 1, 1, 2)).sum(-1, keepdim=True) / h * sx
        qy = (q * v.view(-1, 1, 1, 2)).sum(-1, keepdim=True) / h
        edge = torch.maximum(qx.abs(), qy.abs()).permute(0, 3, 1, 2)  # (B,1,W,W): 1 on the square's border
        win = ((1.0 - edge) / PATCH_FEATHER).clamp(0.0, 1.0)
        return grid, idx, torch.cat([qx, qy], dim=-1), win

    def body(self, frame: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor, flow: torch.Tensor,
             a_s: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`forward` without the mouth net: the eyes applied, the mouth square cut and its window and paste
        grid computed -> (pre (B,3,S,S): the frame with `base` inside the mouth window, win (B,1,S,S),
        grid (B,S,S,2), square (B,3,n,n)); `mouth` adds the net's change. Same arithmetic as `apply`."""
        out = self.apply(frame, z_t, z_s, self.target_anchors(a_s, flow), base=base, squares=(0, 1), clamp=False,
                         with_anchors=True)
        out, a_t = out
        grid, _, back, win = self._place(a_t, 2)
        square = F.grid_sample(base, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out + win * (base - out), win, back, square

    def mouth(self, pre: torch.Tensor, win: torch.Tensor, grid: torch.Tensor, square: torch.Tensor,
              z_t: torch.Tensor, z_s: torch.Tensor) -> torch.Tensor:
        """`body`'s outputs and the final z -> the frame (B,3,S,S) in [-1,1]: the mouth net's change pasted."""
        delta = self.mouth_net(square, self.conditions(z_t, z_s)[0])  # (B,3,n,n)
        back = F.grid_sample(delta, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (pre + win * back).clamp(-1.0, 1.0)

    def apply(self, frame: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor, a_t: torch.Tensor,
              base: torch.Tensor | None = None, with_window: bool = False, squares=(0, 1, 2),
              clamp: bool = True, with_anchors: bool = False):
        """frame (B,3,S,S) in [-1,1], z_t, z_s (B,total), frame anchors a_t (B,3,2) -> refined frame (and, with
        `with_window`, the union (B,1,S,S) of the feathered paste windows). Inside each square the frame
        becomes base + the net's change, base (default: the frame) being what the net reads: G's pose-warped
        source image at run time (sharp, the source's own mouth and eyes at the target pose), the renderer's
        source-moved-to-the-target-pose in training. Each square works in its crop (`_place`)."""
        if base is None:
            base = frame
        cond = self.conditions(z_t, z_s)
        out = frame
        win_all = []
        for k in squares:
            net = self.mouth_net if k == 2 else self.eye_net
            grid, idx, back_grid, win = self._place(a_t, k)
            patch = F.grid_sample(base, grid, mode="bilinear", padding_mode="border", align_corners=False)
            delta = net(patch, cond[0] if k == 2 else cond[1 + k])  # (B,3,n,n)
            back = F.grid_sample(delta, back_grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)  # (B,3,W,W)
            o = self.take(out, idx)
            out = self.put(out, idx, o + win * (self.take(base, idx) - o + back))
            if with_window:
                win_all.append(self.put(torch.zeros_like(out[:, :1]), idx, win))
        if clamp:
            out = out.clamp(-1.0, 1.0)
        if with_anchors:
            return out, a_t
        if with_window:
            return out, torch.stack(win_all, 0).amax(0)
        return out

    def forward(self, frame: torch.Tensor, z_t: torch.Tensor, z_s: torch.Tensor, flow: torch.Tensor,
                a_s: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """G's frame (B,3,S,S), z_target, z_source (B,total), G's flow (B,2,S/4,S/4), the portrait's anchors
        a_s (B,3,2), G's warped source image `base` (B,3,S,S) -> frame."""
        return self.apply(frame, z_t, z_s, self.target_anchors(a_s, flow), base=base)


# =================================================================================== cost accounting
def grid_sample_macs(input_shape: Any, grid_shape: Any, interpolation_mode: int = 0, *args: Any,
                     **kwargs: Any) -> int:
    """MACs of one grid_sampler_2d: taps per output element (bilinear 4, nearest 1, bicubic 16) x C x outputs."""
    taps = {0: 4, 1: 1, 2: 16}.get(int(interpolation_mode), 4)
    n, c = input_shape[0], input_shape[1]
    return taps * n * c * grid_shape[1] * grid_shape[2]


def _grid_flops(input_shape, grid_shape, interpolation_mode=0, *args, out_shape=None, **kwargs) -> int:
    return 2 * grid_sample_macs(input_shape, grid_shape, interpolation_mode)


def _bilinear_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    n = 1
    for d in out_shape:
        n *= d
    return 2 * 4 * n


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Multiply-accumulates of ``fn(*args, **kwargs)`` under torch.utils.flop_counter.FlopCounterMode
    (MACs = FLOPs / 2), with grid_sample (4 MACs per bilinear output element and channel) and bilinear
    upsampling (4 per output element) added, which the counter does not know. Elementwise ops are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten.grid_sampler_2d: _grid_flops, aten.upsample_bilinear2d: _bilinear_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() // 2
