"""Learned idle / rhythmic motion: head pose, blinks and gaze from speech and a short reference motion.

Follows the head-motion learner of "Talking-head Generation with Rhythmic Head Motion" (Chen et al.,
ECCV 2020, sec. 3.3: an encoder f reads the reference motion h_{1:tau} with its audio x_{1:tau}, and the
audio x_{tau+1:T} drives the extrapolation) and the probabilistic pose of EDTalk's Audio2Pose (sample
diverse motion instead of regressing the mean, which freezes the head). Our deviations, for a model that
runs per frame inside a live stream:

* Causal and recurrent: a GRU steps once per video frame on that frame's audio (the mean log-mel of its
  own mel frames, which `MelStream` and `log_mel` give identically), so the live path needs no
  lookahead and one step costs microseconds.
* The reference encoder's output (a style vector s) conditions every step and initialises the state,
  instead of generating the weights of a linear layer (RHM's f -> W).
* Probabilistic by a mixture density output (K diagonal Gaussians over the per-frame change of the 10
  motion values, normalised by their training std) instead of a GAN (RHM) or a normalising flow (EDTalk):
  trained by negative log-likelihood with teacher forcing, sampled with a seeded generator at run time.
* It also produces blinks and gaze (RHM: head pose only; PD-FGC's eyes come from a driving video).

Motion values (10) in latent units: the pose latent (6, `engine.controls.pose_latent`) and the first four
entries of the eye latent [gaze_x, gaze_y, lid_left, lid_right].

On disk it travels inside a Marionette checkpoint directory: `idle_model.safetensors` + the checkpoint
meta's "idle_model" entry (its `IdleModelConfig`). `load_idle_model(dir)` gives None when a checkpoint has
none (the runtime then keeps the procedural `engine.composer.IdleSource`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.composer import Source
from engine.networks import MEL_CENTER, MEL_SCALE

WEIGHTS = "idle_model.safetensors"
META_KEY = "idle_model"
MOTION_DIM = 10  # pose latent 6 + gaze 2 + lids 2
LOG_STD_MIN, LOG_STD_MAX = -7.0, 2.0


@dataclass(frozen=True)
class IdleModelConfig:
    n_mels: int = 80
    audio_dim: int = 32
    hidden: int = 128
    style_dim: int = 32
    n_mix: int = 4
    fps: int = 25
    mel_per_frame: int = 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IdleModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown IdleModelConfig fields {sorted(unknown)}")
        return cls(**d)


class IdleMotionModel(nn.Module):
    """Phi (RHM sec. 3.3) made recurrent and probabilistic (see the module docstring).

    * ``encode_reference(motion (B,Tr,10), audio (B,Tr,n_mels)) -> style (B, style_dim)`` (RHM's f)
    * ``forward(style, audio (B,T,n_mels), prev (B,T,10), h0=None) -> (logits (B,T,K), mean (B,T,K,10),
      log_std (B,T,K,10), h)``: the mixture over the normalised change of frame t given the motion of
      frame t-1 (teacher forcing; `prev` is the previous frame's motion).
    * ``nll(...)`` the training loss; ``step(...)`` one sampled frame at run time.
    Buffers: ``delta_std`` (10) normalises the per-frame change (set from the training data) and
    ``default_style`` (style_dim) is the mean reference style, used when no reference is given.
    """

    def __init__(self, cfg: IdleModelConfig = IdleModelConfig()):
        super().__init__()
        self.cfg = cfg
        a, h, s, k = cfg.audio_dim, cfg.hidden, cfg.style_dim, cfg.n_mix
        self.audio_in = nn.Sequential(nn.Linear(cfg.n_mels, a), nn.LeakyReLU(0.2), nn.Linear(a, a))
        self.ref_rnn = nn.GRU(MOTION_DIM + a, h, batch_first=True)
        self.ref_out = nn.Linear(h, s)
        self.h_init = nn.Linear(s, h)
        self.rnn = nn.GRU(a + MOTION_DIM + s, h, batch_first=True)
        self.out = nn.Linear(h, k * (1 + 2 * MOTION_DIM))
        self.register_buffer("delta_std", torch.ones(MOTION_DIM))
        self.register_buffer("motion_std", torch.ones(MOTION_DIM))
        self.register_buffer("default_style", torch.zeros(s))

    # ---- pieces
    def audio_features(self, mel: torch.Tensor) -> torch.Tensor:
        """(B,T,n_mels) mean log-mel per frame -> (B,T,audio_dim)."""
        return self.audio_in((mel - MEL_CENTER) / MEL_SCALE)

    def _norm_motion(self, m: torch.Tensor) -> torch.Tensor:
        return m / self.motion_std

    def encode_reference(self, motion: torch.Tensor, mel: torch.Tensor) -> torch.Tensor:
        """RHM's f: reference motion (B,Tr,10) + its audio (B,Tr,n_mels) -> style (B, style_dim)."""
        x = torch.cat([self._norm_motion(motion), self.audio_features(mel)], dim=-1)
        _, h = self.ref_rnn(x)  # (1,B,H)
        return torch.tanh(self.ref_out(h[0]))

    def initial_state(self, style: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.h_init(style)).unsqueeze(0)  # (1,B,H)

    def forward(self, style: torch.Tensor, mel: torch.Tensor, prev: torch.Tensor,
                h0: torch.Tensor | None = None):
        b, t, _ = mel.shape
        k = self.cfg.n_mix
        x = torch.cat([self.audio_features(mel), self._norm_motion(prev),
                       style.unsqueeze(1).expand(b, t, -1)], dim=-1)
        y, h = self.rnn(x, self.initial_state(style) if h0 is None else h0)
        o = self.out(y)  # (B,T,K*(1+2D))
        logits = o[..., :k]
        mean = o[..., k:k + k * MOTION_DIM].reshape(b, t, k, MOTION_DIM)
        log_std = o[..., k + k * MOTION_DIM:].reshape(b, t, k, MOTION_DIM).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return logits, mean, log_std, h

    def nll(self, style: torch.Tensor, mel: torch.Tensor, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per frame and value of the normalised change target - prev."""
        logits, mean, log_std, _ = self(style, mel, prev)
        d = ((target - prev) / self.delta_std).unsqueeze(2)  # (B,T,1,D)
        z = (d - mean) * torch.exp(-log_std)
        comp = -0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)  # (B,T,K,D)
        ll = torch.logsumexp(F.log_softmax(logits, dim=-1) + comp.sum(-1), dim=-1)  # (B,T)
        return -ll.mean() / MOTION_DIM

    @torch.no_grad()
    def step(self, style: torch.Tensor, mel: torch.Tensor, prev: torch.Tensor, h: torch.Tensor,
             gen: torch.Generator, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame: style (B,s), mel (B,n_mels), prev (B,10), h (1,B,H) -> (motion (B,10), h)."""
        logits, mean, log_std, h = self(style, mel.unsqueeze(1), prev.unsqueeze(1), h)
        logits, mean, log_std = logits[:, 0], mean[:, 0], log_std[:, 0]
        probs = F.softmax(logits, dim=-1)
        kk = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (B,)
        mu = mean[torch.arange(len(kk)), kk]
        sd = torch.exp(log_std[torch.arange(len(kk)), kk]) * temperature
        eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
        delta = (mu + sd * eps) * self.delta_std
        return prev + delta, h


# ========================================================================================= on disk
def save_idle_model(model: IdleMotionModel, checkpoint_dir: Path) -> dict:
    """Write the weights into `checkpoint_dir` (next to model.safetensors). Returns the meta entry to store
    under meta["idle_model"] of the checkpoint's config.json (the caller saves the checkpoint meta)."""
    from safetensors.torch import save_file

    from engine.checkpoint import atomic_write

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(Path(checkpoint_dir) / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    return {"config": model.cfg.to_dict(), "weights": WEIGHTS}


def load_idle_model(checkpoint_dir: Path | None, meta: dict | None = None,
                    device: str | torch.device = "cpu") -> IdleMotionModel | None:
    """The idle model of a checkpoint directory, or None when it has none. `meta`: the checkpoint's meta
    (read from its config.json when not given)."""
    from engine.errors import InputError

    if checkpoint_dir is None:
        return None
    d = Path(checkpoint_dir)
    if meta is None:
        try:
            meta = json.loads((d / "config.json").read_text()).get("meta") or {}
        except (OSError, ValueError):
            return None
    entry = meta.get(META_KEY)
    if not entry or not (d / WEIGHTS).is_file():
        return None
    from safetensors.torch import load_file

    try:
        model = IdleMotionModel(IdleModelConfig.from_dict(entry.get("config", {})))
        model.load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        raise InputError(f"checkpoint {d}: idle model does not load ({e})") from None
    return model.to(device).eval()


def unfit_reason(model: IdleMotionModel, fps: int, n_mels: int) -> str | None:
    """Why `model` cannot drive a stream at `fps` on `n_mels` mel bands (None: it can)."""
    if model.cfg.fps != int(fps) or model.cfg.n_mels != int(n_mels):
        return (f"the checkpoint's idle model runs at {model.cfg.fps} fps on {model.cfg.n_mels} mel bands, "
                f"not {int(fps)} fps on {int(n_mels)}")
    return None


# ====================================================================================== run time
class LearnedIdleSource(Source):
    """Pose and eye latents from an `IdleMotionModel`, a composer `Source` like `IdleSource`.

    Feed audio either as log-mel rows (`push_mel`, any number at a time: offline the whole `log_mel`, live
    what `MelStream` emits; frame i uses the mean of mel rows [i*k, (i+1)*k), k = mel per frame) or, when
    the caller knows which rows belong to which video frame (the live server), as one mean row per frame
    (`push_frame_mel`). Frames are generated in order, once, with a generator seeded by `seed`; a frame
    asked for before its audio arrived is generated with silence (like `IdleSource`, which treats missing
    energy as silence). Memory is bounded: consumed audio is dropped and only the last `history` frames
    of motion are kept (asking for older frames is an error). `reference`: optional (motion (T,10) in
    latent units, mel (T, n_mels)) that sets the style; else the model's mean training style.
    """

    factors = ("pose", "eye")

    def __init__(self, model: IdleMotionModel, seed: int = 0, reference=None, temperature: float = 1.0,
                 log_floor: float = 1e-5, history: int = 4096, max_backlog: int | None = None):
        self.model = model.eval()
        # live use: audio of at most this many frames waits for generation; older is dropped (and those
        # frames, if ever asked for, are skipped), so a source nobody reads (the head held by controls)
        # neither grows nor, when read again, catches up on minutes of frames in one round
        self.max_backlog = None if max_backlog is None else max(1, int(max_backlog))
        self.cfg = model.cfg
        self.temperature = float(temperature)
        self.history = max(1, int(history))
        self._gen = torch.Generator().manual_seed(int(seed))
        self._silence = math.log(log_floor)
        p = next(model.parameters())
        self._dev = p.device
        with torch.no_grad():
            if reference is not None:
                m, a = reference
                self._style = model.encode_reference(torch.as_tensor(m, dtype=torch.float32, device=self._dev)[None],
                                                     torch.as_tensor(a, dtype=torch.float32, device=self._dev)[None])
            else:
                self._style = model.default_style.unsqueeze(0).to(self._dev)
            self._h = model.initial_state(self._style)
        self._prev = torch.zeros(1, MOTION_DIM, device=self._dev)
        n = self.cfg.n_mels
        self._rows = np.zeros((0, n), np.float32)  # raw mel rows not yet grouped into a frame
        self._feat: deque[np.ndarray] = deque()  # per-frame mean mel of frames _feat_base, _feat_base + 1, ...
        self._feat_base = 0
        self._ring = np.zeros((self.history, MOTION_DIM), np.float32)  # motion of frame i at row i % history
        self._n_done = 0  # frames generated

    def push_mel(self, mel) -> None:
        """Log-mel rows (n, n_mels) continuing the stream; every k rows make one frame's audio."""
        m = np.asarray(mel, np.float32).reshape(-1, self.cfg.n_mels)
        rows = np.concatenate([self._rows, m]) if len(self._rows) else m
        k = self.cfg.mel_per_frame
        n = len(rows) // k
        if n:
            self.push_frame_mel(rows[:n * k].reshape(n, k, -1).mean(1))
        self._rows = rows[n * k:].copy()

    def push_frame_mel(self, frame_mel) -> None:
        """One mean log-mel row per video frame (n, n_mels), continuing from the last frame pushed."""
        for r in np.asarray(frame_mel, np.float32).reshape(-1, self.cfg.n_mels):
            if self._feat_base + len(self._feat) < self._n_done:  # that frame was already generated silent
                self._feat_base += 1
                continue
            self._feat.append(r)
        if self.max_backlog is not None and len(self._feat) > self.max_backlog:
            drop = len(self._feat) - self.max_backlog
            for _ in range(drop):
                self._feat.popleft()
            self._feat_base += drop
            if self._n_done < self._feat_base:  # those frames will never be generated: start after them
                self._n_done = self._feat_base
                self._prev = torch.zeros_like(self._prev)

    def _frame_mel(self, i: int) -> np.ndarray:
        while self._feat and self._feat_base < i:  # drop audio of frames already generated
            self._feat.popleft()
            self._feat_base += 1
        if self._feat and self._feat_base == i:
            self._feat_base += 1
            return self._feat.popleft()
        return np.full(self.cfg.n_mels, self._silence, np.float32)

    def _ensure(self, last: int) -> None:
        n0 = self._n_done
        if last < n0:
            return
        with torch.no_grad():
            for i in range(n0, last + 1):
                mel = torch.from_numpy(self._frame_mel(i)).to(self._dev)[None]
                self._prev, self._h = self.model.step(self._style, mel, self._prev, self._h, self._gen,
                                                      self.temperature)
                self._prev[:, 6:10].clamp_(-1.0, 1.0)
                self._prev[:, 8:10].clamp_(0.0, 1.0)
                self._ring[i % self.history] = self._prev[0].cpu().numpy()
                self._n_done = i + 1

    def motion(self, start: int, n: int) -> np.ndarray:
        """(n, 10) motion values of frames start .. start + n - 1 (negative frames: canonical)."""
        if n <= 0:
            return np.zeros((0, MOTION_DIM), np.float32)
        self._ensure(start + n - 1)
        idx = np.arange(start, start + n)
        ok = idx >= 0
        if ok.any() and idx[ok].min() < self._n_done - self.history:
            raise ValueError(f"frame {int(idx[ok].min())} is older than the {self.history} frames kept")
        out = np.zeros((n, MOTION_DIM), np.float32)
        out[ok] = self._ring[idx[ok] % self.history]
        return out

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:
        factor = factor or "pose"
        m = self.motion(start, n)
        if factor == "pose":
            return m[:, :6].copy()
        if factor == "eye":
            return np.concatenate([m[:, 6:10], np.zeros((n, 2), np.float32)], axis=1)
        raise KeyError(f"LearnedIdleSource gives pose and eye latents, not {factor!r}")
