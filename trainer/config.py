"""Training presets: one frozen `StageConfig` per progressive stage, grouped in a `TrainPreset`
(`tiny`, `lite`, `base`; the model sizes are `engine.config.ModelConfig.preset(name)`).

Learning rates follow PD-FGC's supplement in ratio (D ~ 1/10 of G in stage 1, E_exp/G = 1/2 in
stage 3), scaled up for our much smaller networks and shorter runs; the loss weights are ours (PD-FGC
has no L1/MS-SSIM term and weights GAN 1, VGG 10: we weight the adversarial term low because our
runs are short and the generator is a warp, see `LossWeights`).

Batch sizes are per process: under torchrun the global batch is `batch_size x world_size`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

STAGES: tuple[str, ...] = ("motion", "factors", "expression", "idle")  # the progressive recipe (PD-FGC)
SYNTHETIC_STAGES: tuple[str, ...] = ("render", "state", "patch", "audio", "idle")  # the built-in recipe (trainer.synthetic)


@dataclass(frozen=True)
class LossWeights:
    """Weights of every loss term (a term with weight 0 is not computed)."""

    l1: float = 1.0  # pixel L1 (images in [-1, 1])
    ssim: float = 1.0  # 1 - multi-scale SSIM
    vgg: float = 10.0  # VGG19 perceptual (only with a user-supplied weights file; PD-FGC's weight)
    gan: float = 0.05  # hinge GAN, generator side
    fm: float = 1.0  # discriminator feature matching (L1 over D's features)
    motion: float = 1.0  # PD-FGC Eq. 1 motion reconstruction (oracle features, else frozen E_mot features)
    lip_nce: float = 1.0  # lip-audio InfoNCE (PD-FGC Eq. 2-3)
    lip_align: float = 1.0  # ours: L1 between E_lip and E_aud of synced pairs (G reads either, so scale matters too)
    eye_nce: float = 1.0  # eye-region-swap InfoNCE (PD-FGC Eq. 4)
    pose: float = 1.0  # E_pose regression to the ground-truth pose latent (PD-FGC Eq. 5)
    eye_reg: float = 3.0  # E_eye's first 4 dims regressed to [gaze_x, gaze_y, lid_left, lid_right]
    decor: float = 1.0  # lip-motion decorrelation (PD-FGC Eq. 6)
    consistency: float = 1.0  # motion-level consistency (PD-FGC Eq. 8): lip / eye / pose of the output
    exp_anchor: float = 0.1  # ours: E_exp of neutral-expression frames -> 0 (so zeros = canonical face)


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch_size: int
    lr: float  # generator side (encoders, heads, G, idle model)
    lr_d: float = 0.0  # discriminator (0: no adversarial training in this stage)
    warmup: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio x lr) | "step" (x step_gamma every step_every) | "constant"
    min_lr_ratio: float = 0.1
    step_every: int = 80_000  # PD-FGC: x0.5 every 80k iterations
    step_gamma: float = 0.5
    betas: tuple[float, float] = (0.5, 0.999)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max global grad norm per optimizer (0: off)
    weights: LossWeights = field(default_factory=LossWeights)
    # stage-specific knobs
    n_negatives: int = 8  # factors: unsynced windows of the same clip per item (PD-FGC: 8)
    min_offset: int = 5  # factors: a negative is at least this many frames from the positive
    window: int = 13  # expression: in-window averaging (PD-FGC: 13)
    bank: int = 512  # expression: decorrelation memory bank (PD-FGC: 512)
    exp_train_fraction: float = 1.0  # expression: E_exp trains for this fraction of the steps, then freezes
    audio_lip_prob: float = 0.5  # expression: G gets E_aud's lip latent (else E_lip's) with this probability
    ref_frames: int = 20  # idle: reference motion length (frames)
    seq_frames: int = 30  # idle: predicted sequence length (frames)
    per_id: int = 4  # render: targets rendered per source identity (batch_size / per_id identities per step)
    pool: int = 4096  # state: frames rendered once up front, batches drawn from them
    # render, patch: each rendered batch serves this many consecutive steps (each with its own augmentation and
    # jitter). On a CPU these stages wait for the renderer (a patch step computes in ~0.4 s, its 18 renders take
    # ~0.7 s on the core the training leaves free)
    reuse: int = 1


@dataclass(frozen=True)
class AugmentConfig:
    """Motion-branch augmentation (PD-FGC sec. 3.1 / 3.3): colour jitter on the driving frame only; the small
    affine is applied to the driving frame and the target alike (see `trainer.data`)."""

    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.03  # fraction of a full turn (channel mixing approximation)
    rotate_deg: float = 3.0
    scale: float = 0.03
    translate: float = 0.02  # fraction of the image size
    window_rotate_deg: float = 5.0  # expression stage: per-frame augmentation of the window
    window_scale: float = 0.05


@dataclass(frozen=True)
class TrainPreset:
    name: str
    model: str  # engine ModelConfig preset
    stages: dict[str, StageConfig]
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    clip_cache: int = 16  # decoded clips kept in memory per data-loader worker

    def stage(self, name: str) -> StageConfig:
        return self.stages[name]

    @property
    def order(self) -> tuple[str, ...]:
        """The stages `--stage all` runs, in order."""
        return tuple(self.stages)


def _tiny() -> TrainPreset:
    # few steps, 64 px: the default-suite end-to-end test; learning rates high so losses move in tens of steps
    return TrainPreset(name="tiny", model="tiny", clip_cache=64, stages={
        # lr 2e-3 with beta1 0.5 collapsed G after ~80-240 steps (PSNR 27 -> 9 dB); 1e-3 with beta1 0.9 is stable.
        # 400 steps: a fresh G copies the source, a strong baseline that the losses only leave after motion
        # transfer starts (step ~100-300 in 16 measured runs; by step 400 l1+ssim+motion fell 20-60% in all)
        "motion": StageConfig(steps=400, batch_size=4, lr=1e-3, lr_d=1e-4, warmup=0, min_lr_ratio=0.5,
                              betas=(0.9, 0.999)),
        "factors": StageConfig(steps=40, batch_size=4, lr=2e-3, warmup=0, min_lr_ratio=0.5, n_negatives=4),
        # a fine-tuning stage: a fresh Adam at 2e-3 on the stage-2 G degrades it (measured), so 3e-4 + warm-up
        "expression": StageConfig(steps=30, batch_size=4, lr=3e-4, lr_d=3e-5, warmup=5, min_lr_ratio=0.5,
                                  window=5, bank=64),
        "idle": StageConfig(steps=60, batch_size=8, lr=3e-3, warmup=0, min_lr_ratio=0.3, betas=(0.9, 0.999),
                            ref_frames=15, seq_frames=30),
    })


def _lite() -> TrainPreset:
    return TrainPreset(name="lite", model="lite", stages={
        "motion": StageConfig(steps=200_000, batch_size=24, lr=2e-4, lr_d=2e-5, warmup=1000),
        "factors": StageConfig(steps=100_000, batch_size=32, lr=1e-4, lr_d=0.0, warmup=1000),
        "expression": StageConfig(steps=150_000, batch_size=16, lr=1e-4, lr_d=1.75e-5, warmup=1000,
                                  exp_train_fraction=0.3),
        "idle": StageConfig(steps=30_000, batch_size=64, lr=1e-3, warmup=500, betas=(0.9, 0.999),
                            ref_frames=50, seq_frames=75),  # needs clips >= 5 s
    })


def _base() -> TrainPreset:
    # PD-FGC's own learning rates and schedule (step decay x0.5 every 80k)
    return TrainPreset(name="base", model="base", stages={
        "motion": StageConfig(steps=400_000, batch_size=24, lr=5e-5, lr_d=5e-6, warmup=2000, schedule="step"),
        "factors": StageConfig(steps=200_000, batch_size=32, lr=1e-5, warmup=2000, schedule="step",
                               step_gamma=0.93, step_every=200_000),
        "expression": StageConfig(steps=300_000, batch_size=16, lr=2e-5, lr_d=3.5e-6, warmup=2000,
                                  schedule="step", exp_train_fraction=40_000 / 300_000),
        "idle": StageConfig(steps=60_000, batch_size=64, lr=5e-4, warmup=1000, betas=(0.9, 0.999),
                            ref_frames=75, seq_frames=125),  # needs clips >= 8 s
    })


def _talk() -> TrainPreset:
    # The built-in model (see trainer.synthetic and README "The model"), sized for <= 2.5 h on 2 CPU cores, and
    # timed on the slower of the two 2-core machines this project has had (README "The budget": 2 h 15 min)
    return TrainPreset(name="talk", model="talk", stages={
        "render": StageConfig(steps=2000, batch_size=8, lr=1e-3, warmup=100, min_lr_ratio=0.05,
                              betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, per_id=4, reuse=2),
        "state": StageConfig(steps=1000, batch_size=32, lr=5e-4, warmup=50, min_lr_ratio=0.05,
                             betas=(0.9, 0.99), weight_decay=0.0, pool=4096),
        "patch": StageConfig(steps=5000, batch_size=8, lr=1e-3, warmup=50, min_lr_ratio=0.05,
                             betas=(0.9, 0.99), weight_decay=0.0, grad_clip=1.0, per_id=4, reuse=2),
        "audio": StageConfig(steps=1500, batch_size=64, lr=1e-3, warmup=100, min_lr_ratio=0.05,
                             betas=(0.9, 0.99)),
        "idle": StageConfig(steps=1500, batch_size=32, lr=3e-3, warmup=100, min_lr_ratio=0.1,
                            betas=(0.9, 0.999), ref_frames=50, seq_frames=75),
    })


def _talk_tiny() -> TrainPreset:
    # the default suite's end-to-end run of the built-in recipe (64 px, seconds)
    return TrainPreset(name="talk-tiny", model="talk-tiny", clip_cache=64, stages={
        "render": StageConfig(steps=60, batch_size=4, lr=2e-3, warmup=0, min_lr_ratio=0.5, betas=(0.9, 0.99),
                              per_id=2),
        "state": StageConfig(steps=80, batch_size=16, lr=2e-3, warmup=0, min_lr_ratio=0.3, betas=(0.9, 0.99),
                             pool=128),
        "patch": StageConfig(steps=30, batch_size=4, lr=2e-3, warmup=0, min_lr_ratio=0.5, betas=(0.9, 0.99),
                             per_id=2),
        "audio": StageConfig(steps=30, batch_size=16, lr=2e-3, warmup=0, min_lr_ratio=0.5, betas=(0.9, 0.99)),
        "idle": StageConfig(steps=20, batch_size=8, lr=3e-3, warmup=0, min_lr_ratio=0.3, betas=(0.9, 0.999),
                            ref_frames=15, seq_frames=30),
    })


PRESETS = {"tiny": _tiny, "lite": _lite, "base": _base, "talk": _talk, "talk-tiny": _talk_tiny}


def preset(name: str) -> TrainPreset:
    if name not in PRESETS:
        from engine.errors import InputError

        raise InputError(f"unknown training config {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]()


def override(stage: StageConfig, *, steps: int | None = None, batch_size: int | None = None,
             lr: float | None = None) -> StageConfig:
    """The stage config with the command line's overrides; `lr` scales the discriminator's lr in proportion."""
    kw: dict = {}
    if steps is not None:
        kw["steps"] = int(steps)
    if batch_size is not None:
        kw["batch_size"] = int(batch_size)
    if lr is not None:
        kw["lr"] = float(lr)
        kw["lr_d"] = stage.lr_d * float(lr) / stage.lr if stage.lr > 0 else stage.lr_d
    return dataclasses.replace(stage, **kw)


def lr_at(stage: StageConfig, step: int, base_lr: float) -> float:
    """Learning rate at optimiser step `step` (0-based) of a stage: linear warm-up, then the schedule."""
    if stage.warmup > 0 and step < stage.warmup:
        return base_lr * (step + 1) / stage.warmup
    if stage.schedule == "constant":
        return base_lr
    if stage.schedule == "step":
        return base_lr * stage.step_gamma ** (step // max(1, stage.step_every))
    if stage.schedule == "cosine":
        import math

        span = max(1, stage.steps - stage.warmup)
        t = min(1.0, max(0.0, (step - stage.warmup) / span))
        lo = base_lr * stage.min_lr_ratio
        return lo + (base_lr - lo) * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {stage.schedule!r}; valid: cosine, step, constant")
