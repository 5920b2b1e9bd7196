"""The progressive stages (PD-FGC sec. 3.1-3.3, plus the idle-motion model), each an `nn.Module` whose
`forward(batch)` computes the generator-side loss of one step (so one DDP wrapper covers it).

Our generator takes z = [lip, pose, eye, exp] from the factor heads, not PD-FGC's unified motion feature,
which forces these deviations from the paper:

1. motion (PD-FGC 3.1): E_app, E_mot, G0 by cross-frame self-reconstruction, where "G0" is our G driven by
   the unified motion *through all four heads* (E_mot -> E_lip/E_pose/E_eye/E_exp -> z -> G), so the heads
   train here too and stage 1 already gives a working reconstructor. Losses: L1 + (1 - MS-SSIM) + hinge GAN
   + D feature matching (+ VGG19 if the user gives weights) + the motion-reconstruction loss of Eq. 1 with
   the factor oracle's embedding standing in for the 3D face / emotion networks; without an oracle, the
   features of E_mot itself with its weights detached (gradients reach only the image) -- a weaker,
   self-referential stand-in. Either way the term is an L1 relative to the batch spread of the target's
   features (scale-free; blind to the constant part of the features).
2. factors (PD-FGC 3.2): E_mot (and E_app) frozen as in the paper; E_lip / E_aud by InfoNCE whose negatives
   are unsynced windows (and their frames, for the audio->video direction) of the same clip; E_eye by the
   eye-region-swap InfoNCE (anchor = frame b with the eye region of frame c; positive c, negative b); E_pose
   regressed to the ground-truth pose latent and E_eye's first 4 dims to [gaze, lids] (ours: so live
   controls mean what they say; masked out on clips without factor tables); ours: an L1 term pulls E_lip
   and E_aud of synced pairs together (InfoNCE fixes directions only, and G reads either latent). Because
   G reads the heads' outputs, and their meaning changes here, G (and E_exp) stay in the loop with L1 +
   MS-SSIM reconstruction (no GAN in this stage, to keep it cheap), its lip latent from E_aud or E_lip
   (as in stage 3) and zeroed on silent frames, as the runtime gates it.
3. expression (PD-FGC 3.3): everything but E_exp and G frozen; E_exp averaged over a window of augmented
   frames; lip-decorrelation against E_aud features with a memory bank; G reconstructs the centre frame from
   all latents (lip from E_aud or E_lip, gated on silence) with L1 + MS-SSIM + GAN + FM (+ VGG) and the
   motion-level consistency of Eq. 8 computed with our own frozen encoders (E_lip(E_mot(out)) vs E_aud,
   E_eye / E_pose of the output vs of the target -- our stand-ins for the lip-reading and gaze networks)
   plus Eq. 1's motion term. Ours: E_exp of neutral-expression frames is pulled to 0 (`exp_anchor`), so
   the all-zeros latent is the canonical face the engine assumes.
4. idle: `engine.idle_model.IdleMotionModel` (RHM + EDTalk Audio2Pose, see there) by mixture NLL on
   corpus pose / eye tracks (or E_pose / E_eye of the frames for clips without factor tables).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from engine.model import Marionette
from trainer import losses as L
from trainer.config import LossWeights, StageConfig

log = logging.getLogger(__name__)

# Marionette submodules each stage trains
TRAINS: dict[str, tuple[str, ...]] = {
    "motion": ("e_app", "e_mot", "e_lip", "e_pose", "e_eye", "e_exp", "generator"),
    "factors": ("e_lip", "e_aud", "e_pose", "e_eye", "e_exp", "generator"),
    "expression": ("e_exp", "generator"),
    "idle": (),
    # the built-in recipe (trainer.synthetic)
    "render": ("e_app", "e_mot", "e_lip", "e_pose", "e_eye", "e_exp", "generator"),
    "state": ("e_mot", "e_lip", "e_pose", "e_eye", "e_exp"),
    "patch": ("generator.patch",),
    "audio": ("e_aud",),
}
USES_DISC = {"motion": True, "factors": False, "expression": True, "idle": False, "patch": True}
# the supervised losses whose sum the short runs check for a fall (the adversarial terms need not fall)
MAIN_LOSSES = {"motion": ("l1", "ssim", "motion"), "factors": ("lip_nce", "eye_nce", "pose", "eye_reg"),
               "expression": ("l1", "ssim", "decor"), "idle": ("nll",), "render": ("reg",), "state": ("reg",),
               "patch": ("loss",), "audio": ("lip_reg",)}


class StageModule(nn.Module):
    """Base: holds the model; frozen helpers (discriminator, oracle, VGG) are kept out of the module tree
    so DDP neither syncs nor broadcasts them."""

    name = ""

    def __init__(self, model: Marionette, scfg: StageConfig, oracle=None, vgg=None):
        super().__init__()
        self.model = model
        self.scfg = scfg
        self.w: LossWeights = scfg.weights
        self.__dict__["oracle"] = oracle
        self.__dict__["vgg"] = vgg
        self.__dict__["disc"] = None
        self.__dict__["rng"] = torch.Generator().manual_seed(0)  # the loop reseeds it every step

    # ---- shared pieces
    def set_disc(self, disc: nn.Module | None) -> None:
        self.__dict__["disc"] = disc

    def motion_features(self, img: torch.Tensor) -> torch.Tensor:
        """Eq. 1's feature extractor: the oracle's embedding, else E_mot with detached weights."""
        if self.oracle is not None:
            return self.oracle.features((img.float() + 1) * 0.5)
        params = {k: v.detach() for k, v in self.model.e_mot.named_parameters()}
        return functional_call(self.model.e_mot, params, (img,))

    def recon_losses(self, fake: torch.Tensor, real: torch.Tensor, logs: dict, gan: bool,
                     motion: bool) -> torch.Tensor:
        w = self.w
        l1 = L.l1(fake, real)
        ssim = L.ms_ssim_loss(fake, real)
        logs["l1"], logs["ssim"] = l1.detach(), ssim.detach()
        total = w.l1 * l1 + w.ssim * ssim
        if self.vgg is not None and w.vgg:
            v = self.vgg(fake, real)
            logs["vgg"] = v.detach()
            total = total + w.vgg * v
        if gan and self.disc is not None and (w.gan or w.fm):
            feats_f, logits_f = self.disc(fake)
            with torch.no_grad():
                feats_r, _ = self.disc(real)
            g = L.g_hinge(logits_f)
            fm = L.feature_matching(feats_f, feats_r)
            logs["gan_g"], logs["fm"] = g.detach(), fm.detach()
            total = total + w.gan * g + w.fm * fm
        if motion and w.motion:
            mf = self.motion_features(fake)
            with torch.no_grad():
                mr = self.motion_features(real)
            # L1 relative to the batch spread of the target features: scale-free, and blind to the constant
            # part (an untrained E_mot's features are mostly its bias)
            spread = (mr - mr.mean(0, keepdim=True)).abs().mean().clamp(min=1e-6)
            mot = (mf - mr).abs().mean() / spread
            logs["motion"] = mot.detach()
            total = total + w.motion * mot
        with torch.no_grad():
            logs["psnr"] = L.psnr(fake, real)
        return total

    def lr_scale(self, group: str, step: int) -> float:
        """Multiplier of a parameter group's learning rate at `step` (stages may freeze a group mid-way)."""
        return 1.0

    def begin_step(self, step: int) -> None:
        """Called by the loop before each step's forward (stages with a curriculum)."""

    def prepare(self, dataset, device: torch.device) -> None:
        """Called once before the first step of a fresh (not resumed) stage."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_state(self, d: dict[str, torch.Tensor]) -> None:
        pass


def _avatar(model: Marionette, source: torch.Tensor, grad: bool):
    if grad:
        return model.encode_avatar(source)
    with torch.no_grad():
        return model.encode_avatar(source)


# =========================================================================================== stage 1
class MotionStage(StageModule):
    """PD-FGC sec. 3.1: appearance / motion disentanglement by cross-frame self-reconstruction."""

    name = "motion"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m = self.model
        src, tgt, drv = batch["source"], batch["target"], batch["driving"]
        feat_hi, feat_lo, app = m.encode_avatar(src)
        z = m.compose(m.heads(m.e_mot(drv)))
        fake = m.generator(z, src, feat_hi, feat_lo, app)
        logs: dict = {}
        loss = self.recon_losses(fake, tgt, logs, gan=True, motion=True)
        return {"loss": loss, "logs": logs, "fake": fake, "real": tgt}


# =========================================================================================== stage 2
class FactorsStage(StageModule):
    """PD-FGC sec. 3.2: lip-audio and eye-swap contrastive learning, pose (and gaze/lid) regression."""

    name = "factors"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m, w = self.model, self.w
        B, K = batch["neg_mel"].shape[:2]
        with torch.no_grad():  # E_mot is frozen in this stage (PD-FGC: "the pre-trained motion encoder")
            mot = m.e_mot(torch.cat([batch["driving"], batch["eye_anchor"], batch["eye_other"], batch["target"]]))
            m_t, m_anchor, m_other, m_clean = mot.split(B)
            m_neg = m.e_mot(batch["neg_frames"].flatten(0, 1)).view(B, K, -1)
        logs: dict = {}
        # lip <-> audio InfoNCE, both directions, negatives = unsynced windows / frames of the same clip
        v = m.e_lip(m_t)
        a = m.e_aud(batch["mel"])
        a_neg = m.e_aud(batch["neg_mel"].flatten(0, 1)).view(B, K, -1)
        v_neg = m.e_lip(m_neg)
        lip_nce = 0.5 * (L.info_nce(v, a, a_neg) + L.info_nce(a, v, v_neg))
        lip_align = (v - a).abs().mean()  # same space in scale too: G reads E_lip or E_aud latents alike
        logs["lip_nce"], logs["lip_align"] = lip_nce.detach(), lip_align.detach()
        logs["lip_acc"] = L.nce_accuracy(v, a, a_neg)
        # eye-region swap InfoNCE (anchor: b with c's eyes; positive: c; negative: b)
        e_anchor, e_pos, e_neg = m.e_eye(torch.cat([m_anchor, m_other, m_clean])).split(B)
        eye_nce = L.info_nce(e_anchor, e_pos, e_neg.unsqueeze(1))
        logs["eye_nce"] = eye_nce.detach()
        # regression to ground truth (clips with factor tables only)
        has = batch["has_factors"]
        pose = m.e_pose(m_t)
        eye = m.e_eye(m_t)
        pose_l = L.masked_mean(F.smooth_l1_loss(pose, batch["pose"], reduction="none", beta=0.1), has)
        eye_l = L.masked_mean((eye[:, :4] - batch["eyes"]).abs(), has)
        logs["pose"], logs["eye_reg"] = pose_l.detach(), eye_l.detach()
        loss = w.lip_nce * lip_nce + w.lip_align * lip_align + w.eye_nce * eye_nce + w.pose * pose_l + w.eye_reg * eye_l
        # G stays in the loop: reconstruction from the (changing) factor latents
        src, tgt = batch["source"], batch["target"]
        feat_hi, feat_lo, app = _avatar(m, src, grad=False)
        use_audio = (torch.rand(B, generator=self.rng) < self.scfg.audio_lip_prob).to(a.device).unsqueeze(1)
        lip = torch.where(use_audio, a, m.e_lip(m_clean)) * batch["active"].to(v.dtype).unsqueeze(1)
        z = m.compose({"lip": lip, "pose": m.e_pose(m_clean), "eye": m.e_eye(m_clean), "exp": m.e_exp(m_clean)})
        fake = m.generator(z, src, feat_hi, feat_lo, app)
        loss = loss + self.recon_losses(fake, tgt, logs, gan=False, motion=False)
        return {"loss": loss, "logs": logs, "fake": fake, "real": tgt}


# =========================================================================================== stage 3
class ExpressionStage(StageModule):
    """PD-FGC sec. 3.3: in-window averaging, lip-motion decorrelation (memory bank), complementary
    self-reconstruction with all latents through the final G, motion-level consistency."""

    name = "expression"

    def __init__(self, model: Marionette, scfg: StageConfig, oracle=None, vgg=None):
        super().__init__(model, scfg, oracle, vgg)
        lat = model.cfg.latents
        self.__dict__["bank"] = L.MemoryBank(scfg.bank, lat.exp, lat.lip)

    def lr_scale(self, group: str, step: int) -> float:
        if group == "e_exp" and step >= int(round(self.scfg.exp_train_fraction * self.scfg.steps)):
            return 0.0  # PD-FGC: E_exp trains for the first part of the stage, then stays fixed
        return 1.0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        m, w = self.model, self.w
        win = batch["window"]  # (B, W, 3, S, S)
        B, W = win.shape[:2]
        src, tgt = batch["source"], batch["target"]
        with torch.no_grad():
            m_t = m.e_mot(tgt)
            m_win = m.e_mot(win.flatten(0, 1))
            a = m.e_aud(batch["mel"])
            lip_v, pose, eye = m.e_lip(m_t), m.e_pose(m_t), m.e_eye(m_t)
            feat_hi, feat_lo, app = m.encode_avatar(src)
        exp = m.e_exp(m_win).view(B, W, -1).mean(1)  # in-window average (B, exp)
        use_audio = (torch.rand(B, generator=self.rng) < self.scfg.audio_lip_prob).to(a.device).unsqueeze(1)
        active = batch["active"].to(a.dtype).unsqueeze(1)
        lip = torch.where(use_audio, a, lip_v) * active
        z = m.compose({"lip": lip, "pose": pose, "eye": eye, "exp": exp})
        fake = m.generator(z, src, feat_hi, feat_lo, app)
        logs: dict = {}
        loss = self.recon_losses(fake, tgt, logs, gan=True, motion=True)
        if w.decor:
            dec = self.bank.loss(exp, a)
            logs["decor"] = dec.detach()
            loss = loss + w.decor * dec
        if w.consistency:  # Eq. 8 with our frozen encoders (gradients reach the image only)
            m_f = m.e_mot(fake)
            cos = F.cosine_similarity(m.e_lip(m_f), a, dim=1)
            lip_c = L.masked_mean(1 - cos, batch["active"])
            eye_c = (m.e_eye(m_f) - eye).abs().mean()
            pose_c = (m.e_pose(m_f) - pose).abs().mean()
            cons = lip_c + eye_c + pose_c
            logs["consistency"] = cons.detach()
            loss = loss + w.consistency * cons
        if w.exp_anchor:
            neutral = batch["neutral"] & batch["has_factors"]
            anc = L.masked_mean(exp.pow(2), neutral)
            logs["exp_anchor"] = anc.detach()
            loss = loss + w.exp_anchor * anc
        return {"loss": loss, "logs": logs, "fake": fake, "real": tgt}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"bank.{k}": v for k, v in self.bank.state_dict().items()}

    def load_extra_state(self, d: dict[str, torch.Tensor]) -> None:
        sub = {k[5:]: v for k, v in d.items() if k.startswith("bank.")}
        if sub:
            self.bank.load_state_dict(sub)


# ============================================================================================ idle
class IdleStage(StageModule):
    """The learned idle / rhythmic motion model (`engine.idle_model`), by mixture NLL with teacher forcing."""

    name = "idle"
    PREV_NOISE = 0.3  # x delta_std: noise on the teacher-forced previous frame (robustness to own samples)

    def __init__(self, model: Marionette, scfg: StageConfig, idle, oracle=None, vgg=None):
        super().__init__(model, scfg, oracle, vgg)
        self.idle = idle

    def _motion(self, batch) -> torch.Tensor:
        return batch["motion"]

    def prepare(self, dataset, device: torch.device) -> None:
        """delta_std / motion_std from 256 items the run draws from a reserved index range (all ranks alike)."""
        rows, deltas = [], []
        n = 0
        i = 2 ** 61
        while n < 256:
            items = [dataset[i + j] for j in range(16)]
            i += 16
            batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
            mo = self._motion(batch).float().cpu()
            rows.append(mo.flatten(0, 1))
            deltas.append((mo[:, 1:] - mo[:, :-1]).flatten(0, 1))
            n += len(items)
        r, d = torch.cat(rows), torch.cat(deltas)
        self.idle.motion_std.copy_(r.std(0).clamp(min=1e-3))
        self.idle.delta_std.copy_(d.std(0).clamp(min=1e-3))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        mo = self._motion(batch)
        audio = batch["audio"]
        R = self.scfg.ref_frames
        style = self.idle.encode_reference(mo[:, :R], audio[:, :R])
        prev = mo[:, R - 1:-1]
        noise = torch.randn(prev.shape, generator=self.rng).to(prev.device) * self.idle.delta_std * self.PREV_NOISE
        nll = self.idle.nll(style, audio[:, R:], prev + noise, mo[:, R:])
        with torch.no_grad():
            logits, mean, _, _ = self.idle(style, audio[:, R:], prev)
            k = logits.argmax(-1, keepdim=True).unsqueeze(-1).expand(-1, -1, 1, mean.shape[-1])
            pred = prev + mean.gather(2, k).squeeze(2) * self.idle.delta_std
            mae = (pred - mo[:, R:]).abs().mean()
        return {"loss": nll, "logs": {"nll": nll.detach(), "next_mae": mae}, "fake": None, "real": None}

    @torch.no_grad()
    def finalize(self, dataset, device: torch.device, n: int = 256) -> None:
        """default_style = mean reference style over `n` items."""
        styles = []
        i = 2 ** 61 + 10 ** 6
        R = self.scfg.ref_frames
        for s in range(0, n, 16):
            items = [dataset[i + s + j] for j in range(16)]
            batch = {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}
            mo = self._motion(batch)
            styles.append(self.idle.encode_reference(mo[:, :R], batch["audio"][:, :R]).float().cpu())
        self.idle.default_style.copy_(torch.cat(styles).mean(0))


@torch.no_grad()
def pseudo_motion_table(model: Marionette, store, clips, device: torch.device,
                        batch: int = 64) -> dict[str, np.ndarray]:
    """Idle-stage targets for clips without factor tables: {clip key: (T, 10) E_pose + E_eye[:4] of every
    frame} (the heads regress physical units, so these are in the units of the factor tables)."""
    from trainer.data import to_float

    model.eval()
    out = {}
    for ref in clips:
        clip = store.get(ref)
        rows = []
        for s in range(0, clip.n, batch):
            z = model.encode_motion(to_float(clip.frames[s:s + batch]).to(device))
            rows.append(torch.cat([z["pose"], z["eye"][:, :4]], dim=1).float().cpu())
        out[ref.key] = torch.cat(rows).numpy()
    return out


def build_stage(name: str, model: Marionette, scfg: StageConfig, oracle=None, vgg=None, idle=None) -> StageModule:
    if name == "motion":
        return MotionStage(model, scfg, oracle, vgg)
    if name == "factors":
        return FactorsStage(model, scfg, oracle, vgg)
    if name == "expression":
        return ExpressionStage(model, scfg, oracle, vgg)
    if name == "idle":
        return IdleStage(model, scfg, idle, oracle, vgg)
    raise ValueError(f"unknown stage {name!r}")


# ================================================================================ expression presets
@torch.no_grad()
def expression_presets(model: Marionette, store, clips, window: int, device: torch.device,
                       max_clips: int = 200, batch: int = 64) -> dict[str, list[float]] | None:
    """meta["expression_presets"]: for every preset of the corpus, the exp latent at intensity 1, fitted
    through the origin to the window-averaged E_exp of the frames showing it (least squares over frames:
    v = sum(i_t e_t) / sum(i_t^2)); "neutral" is the mean over neutral frames. None without factor tables."""
    from trainer.corpus.factors import PRESET_NAMES
    from trainer.data import to_float

    clips = [c for c in clips if c.factors is not None][:max_clips]
    if not clips:
        return None
    model.eval()
    exps, presets, inten = [], [], []
    for ref in clips:
        clip = store.get(ref)
        out = []
        for s in range(0, clip.n, batch):
            x = to_float(clip.frames[s:s + batch]).to(device)
            out.append(model.e_exp(model.e_mot(x)).float().cpu())
        e = torch.cat(out)
        if window > 1:  # centred moving average, edges clamped (as the training windows)
            idx = torch.clamp(torch.arange(clip.n)[:, None] + torch.arange(window)[None] - window // 2, 0, clip.n - 1)
            e = e[idx].mean(1)
        exps.append(e.numpy())
        presets.append(clip.factors["expression_preset"][: clip.n])
        inten.append(clip.factors["expression_intensity"][: clip.n])
    e, p, it = np.concatenate(exps), np.concatenate(presets), np.concatenate(inten)
    out: dict[str, list[float]] = {}
    for k, name in enumerate(PRESET_NAMES):
        sel = p == k
        if not sel.any():
            continue
        if name == "neutral":
            out[name] = e[sel].mean(0).astype(float).tolist()
        else:
            wts = it[sel].astype(np.float64)
            den = float((wts ** 2).sum())
            if den <= 1e-8:
                continue
            out[name] = ((wts[:, None] * e[sel]).sum(0) / den).astype(float).tolist()
    return out or None
