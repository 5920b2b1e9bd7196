"""`marionette train`: run one progressive stage, or all of them in order, into a run directory.

    RUN/checkpoint/            the model (engine.checkpoint format: `marionette render --checkpoint RUN/checkpoint`),
                               + idle_model.safetensors after the idle stage; meta: "train" (stage, step),
                               "expression_presets" (after the expression stage), "idle_model"
    RUN/state/<stage>.*        trainer state for --resume (safetensors + JSON)
    RUN/state/progress.json    completed stages
    RUN/metrics.jsonl          one record per logged step (stage, step, losses, lr, steps_per_s)
    RUN/train_config.json      the TrainConfig of the latest invocation
    RUN/cache/                 decoded clips at the model's size (.npy)

A stage other than `motion` starts from `init` if given, else from RUN/checkpoint (the previous stage's
result); `--stage all` runs motion -> factors -> expression -> idle, `steps` (if given) applying to each.
Under torchrun every process runs `train`; rank 0 writes files; `batch_size` is per process.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import operator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import WEIGHTS, load_checkpoint, read_checkpoint_config, save_checkpoint
from engine.config import ModelConfig
from engine.errors import InputError
from engine.model import Marionette
from trainer import config as C
from trainer.loop import Dist, LoopConfig, barrier, broadcast_module, init_distributed, load_state, run_loop, save_state

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
STATE = "state"


@dataclass(frozen=True)
class TrainConfig:
    """Everything `marionette train` passes (field names = the CLI's long options)."""

    stage: str = "all"  # motion | factors | expression | idle | all
    data: Path = Path("corpus")  # DIR/<split>/<identity>/<clip>.{mp4,wav[,npz,json]}
    config: str = "talk"  # talk | talk-tiny | tiny | lite | base
    out: Path = Path("runs/lite")  # run directory
    steps: int | None = None  # per stage; default: the preset's
    batch_size: int | None = None  # per process; default: the preset's
    lr: float | None = None  # generator-side lr (D's scales with it); default: the preset's
    resume: bool = False  # continue from RUN/state (skips completed stages of --stage all)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    seed: int = 0
    ckpt_every: int = 1000  # steps between checkpoints (always one at the end of a stage)
    vgg_weights: Path | None = None  # torchvision VGG19 weights (.safetensors): enables the perceptual loss
    workers: int = 2  # data-loader worker processes (0: load in the training process)
    log_every: int = 50  # steps between metrics records
    oracle: Path | None = None  # trained factor oracle directory: features for the motion-reconstruction loss
    init: Path | None = None  # start (non-motion stages) from this checkpoint instead of RUN/checkpoint
    lookahead_ms: int | None = None  # E_aud's audio after the frame; default: the checkpoint continued, else the preset's
    progress: bool = True  # tqdm bar on stderr (rank 0)
    freeze: tuple[str, ...] = ()  # submodules (dotted paths) kept as they are although the stage trains them

    def stages(self) -> tuple[str, ...]:
        order = C.preset(self.config).order
        if self.stage == "all":
            return order
        if self.stage not in order:
            raise InputError(f"unknown stage {self.stage!r} for --config {self.config}; valid: {', '.join(order)}, all")
        return (self.stage,)

    def first_stage(self) -> str:
        return C.preset(self.config).order[0]


SYNTHETIC = ("render", "state", "patch", "audio")  # stages of trainer.synthetic (the others: trainer.stages)
NEEDS_CORPUS = ("motion", "factors", "expression", "idle", "audio")  # "render", "state", "patch" draw their own
NEEDS_LABELS = ("audio",)  # stages that read the synthetic corpus' per-frame factor tables (.npz)


def _to_dev(batch: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) for k, v in batch.items()}


def _device(cfg: TrainConfig, d: Dist) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {cfg.device}: CUDA is not available on this machine")
        dev = torch.device(f"cuda:{d.local_rank}") if (d.enabled or want == "cuda") else torch.device(want)
        torch.cuda.set_device(dev)
        return dev
    if want != "cpu":
        raise InputError(f"unknown device {cfg.device!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def _check(cfg: TrainConfig) -> None:
    C.preset(cfg.config)
    cfg.stages()
    if any(st in NEEDS_CORPUS for st in cfg.stages()) and not Path(cfg.data).is_dir():
        raise InputError(f"--data {cfg.data}: not a directory")
    for name in ("steps", "batch_size", "ckpt_every", "log_every"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or v <= 0):
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if cfg.workers < 0:
        raise InputError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.lookahead_ms is not None and (not isinstance(cfg.lookahead_ms, int) or not 0 <= cfg.lookahead_ms <= 1000):
        raise InputError(f"--lookahead-ms must be a whole number of ms in 0..1000, got {cfg.lookahead_ms!r}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise InputError(f"--lr must be positive, got {cfg.lr}")
    if cfg.vgg_weights is not None and not Path(cfg.vgg_weights).is_file():
        raise InputError(f"--vgg {cfg.vgg_weights}: file not found")


class _Run:
    """Files of a run directory."""

    def __init__(self, out: Path):
        self.dir = Path(out)
        self.ckpt = self.dir / CHECKPOINT
        self.state = self.dir / STATE

    def state_path(self, stage: str) -> Path:
        return self.state / stage  # <stage>.json + <stage>.safetensors

    def progress(self) -> dict:
        p = self.state / "progress.json"
        return json.loads(p.read_text()) if p.is_file() else {"completed": []}

    def mark_done(self, stage: str) -> None:
        prog = self.progress()
        if stage not in prog["completed"]:
            prog["completed"].append(stage)
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "progress.json").write_text(json.dumps(prog, indent=1) + "\n")

    def reset_progress(self, stages: tuple[str, ...]) -> None:
        prog = self.progress()
        prog["completed"] = [s for s in prog["completed"] if s not in stages]
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / "progress.json").write_text(json.dumps(prog, indent=1) + "\n")


def _upgrade_patch_nets(model: Marionette, ck_cfg: ModelConfig, arch: dict, seed: int, src: Path,
                        eye_source_gaze: bool) -> Marionette:
    """The `patch` stage from a checkpoint of the same design but an older generator layout: G without its own
    mouth branch (`NetworkConfig.mouth_branch`) and/or local generators of another depth (`patch_levels`) or
    without their warp (`patch_warp`). Every weight that exists in both is kept; a new third level and a new
    warp start as nothing (their `lift`, `flow` and `basis` are zero), so training begins from the checkpoint's
    own frames but for the dropped branch. `eye_source_gaze` (ModelConfig) is taken from the preset too: the
    same weights, the eye net no longer told the source's gaze."""
    torch.manual_seed(seed + 7)
    fresh = Marionette(dataclasses.replace(ck_cfg, eye_source_gaze=eye_source_gaze,
                                           net=dataclasses.replace(ck_cfg.net, **arch)))
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    new_ok = (".down2.", ".deep1.", ".deep2.", ".lift.", ".flow.", ".basis")
    gone_ok = ("generator.mouth64.", "generator.mouth128.", "generator.mouth_out.")
    bad = [k for k in missing if not (k.startswith("generator.patch.") and any(t in k for t in new_ok))]
    bad += [k for k in unexpected if not k.startswith(gone_ok)]
    if bad:
        raise InputError(f"checkpoint {src} does not match the new generator layout beyond the mouth branch and "
                         f"the local generators' depth: {bad[:4]}")
    log.info("stage patch: %s's weights in the new layout (%s, eye_source_gaze=%s; %d new tensors, %d dropped)",
             src, ", ".join(f"{k}={v}" for k, v in arch.items()), eye_source_gaze, len(missing), len(unexpected))
    return fresh


def _carry_idle_model(src: Path, ckpt: Path, meta: dict) -> None:
    """A checkpoint whose meta names an idle model holds its weights beside it: a stage started from another
    checkpoint (--init) keeps the meta, so it copies the file too (else `install-builtin` and `serve` would
    find the entry and no weights)."""
    import shutil

    from engine.idle_model import WEIGHTS as IDLE_WEIGHTS

    if not meta.get("idle_model") or not (Path(src) / IDLE_WEIGHTS).is_file():
        return
    ckpt.mkdir(parents=True, exist_ok=True)
    if (Path(src) / IDLE_WEIGHTS).resolve() != (ckpt / IDLE_WEIGHTS).resolve():
        shutil.copy2(Path(src) / IDLE_WEIGHTS, ckpt / IDLE_WEIGHTS)


def _upgrade_estimator(model: Marionette, ck_cfg: ModelConfig, mcfg: ModelConfig, seed: int, src: Path) -> Marionette:
    """The checkpoint's model with the state estimator's design of `mcfg` (E_mot's keypoint branch, the mirror
    reading): the `state` stage trains the estimator, E_mot + heads, and nothing else reads them. Every weight
    whose shape still fits is kept (E_mot's body and projection, the heads' deeper layers, everything outside
    the estimator); the rest start fresh."""
    from trainer.nets import init_weights

    torch.manual_seed(seed + 7)
    new_cfg = dataclasses.replace(ck_cfg, motion_mirror=mcfg.motion_mirror,
                                  anchors_from_keypoints=mcfg.anchors_from_keypoints, net=dataclasses.replace(
        ck_cfg.net, motion_keypoints=mcfg.net.motion_keypoints))
    fresh = init_weights(Marionette(new_cfg))
    own = fresh.state_dict()
    keep = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
    fresh.load_state_dict(keep, strict=False)
    redo = sorted(k for k in own if k not in keep)
    if any(not k.startswith(("e_mot.", "e_lip.", "e_pose.", "e_eye.", "e_exp.")) for k in redo):
        raise InputError(f"checkpoint {src} does not match beyond its state estimator")
    log.info("stage state: E_mot's keypoint branch %d -> %d, mirror reading %s -> %s (%d tensors start fresh)",
             ck_cfg.net.motion_keypoints, mcfg.net.motion_keypoints, ck_cfg.motion_mirror, mcfg.motion_mirror,
             len(redo))
    return fresh


def _initial_model(cfg: TrainConfig, run: _Run, stage: str, mcfg: ModelConfig) -> tuple[Marionette, dict]:
    src = None
    if cfg.init is not None:
        src = Path(cfg.init)
    elif stage != cfg.first_stage() and (run.ckpt / WEIGHTS).is_file():
        src = run.ckpt
    if src is not None:
        ck_cfg, _ = read_checkpoint_config(src)
        if ck_cfg.name != mcfg.name or ck_cfg.image_size != mcfg.image_size:
            raise InputError(f"checkpoint {src} is a {ck_cfg.name!r} model at {ck_cfg.image_size}px; "
                             f"--config {cfg.config} trains {mcfg.name!r} at {mcfg.image_size}px")
        if ck_cfg.lookahead_ms != mcfg.lookahead_ms and stage != "audio":
            raise InputError(f"checkpoint {src} has a {ck_cfg.lookahead_ms} ms lookahead; this run trains "
                             f"{mcfg.lookahead_ms} ms (its audio encoder's window differs): start a new run, or "
                             "retrain only the audio encoder (--stage audio)")
        model, meta = load_checkpoint(src)
        if mcfg.patches and not ck_cfg.patches and stage == "patch":  # a checkpoint from before the patch stage
            from trainer.nets import init_weights

            torch.manual_seed(cfg.seed + 5)
            fresh = init_weights(Marionette(dataclasses.replace(ck_cfg, patches=True)))
            missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
            if unexpected or any(not k.startswith("generator.patch.") for k in missing):
                raise InputError(f"checkpoint {src} does not match --config {cfg.config} beyond its patch nets")
            log.info("stage patch: new local generators on %s (its checkpoint had none)", src)
            model = fresh
        arch = {"mouth_branch": mcfg.net.mouth_branch, "patch_levels": mcfg.net.patch_levels,
                "patch_warp": mcfg.net.patch_warp}
        if stage == "patch" and ck_cfg.patches and (any(getattr(ck_cfg.net, k) != v for k, v in arch.items())
                                                    or ck_cfg.eye_source_gaze != mcfg.eye_source_gaze):
            model = _upgrade_patch_nets(model, ck_cfg, arch, cfg.seed, src, mcfg.eye_source_gaze)
        if stage == "state" and (ck_cfg.net.motion_keypoints, ck_cfg.motion_mirror) != \
                (mcfg.net.motion_keypoints, mcfg.motion_mirror):
            model = _upgrade_estimator(model, ck_cfg, mcfg, cfg.seed, src)
        if ck_cfg.lookahead_ms != mcfg.lookahead_ms:  # the audio stage: a new E_aud for the new window
            from trainer.nets import init_weights

            torch.manual_seed(cfg.seed + 3)
            fresh = Marionette(mcfg)
            init_weights(fresh)
            keep = {k: v for k, v in model.state_dict().items() if not k.startswith("e_aud.")}
            fresh.load_state_dict(keep, strict=False)
            log.info("stage audio: a new %d ms audio encoder (the checkpoint's had %d ms)", mcfg.lookahead_ms,
                     ck_cfg.lookahead_ms)
            model = fresh
        meta.pop("random_weights", None)
        _carry_idle_model(src, run.ckpt, meta)
        log.info("stage %s starts from %s", stage, src)
        return model, meta
    if stage != cfg.first_stage():
        log.warning("stage %s: no checkpoint in %s and no --init: starting from random weights", stage, run.ckpt)
    from trainer.nets import init_weights

    torch.manual_seed(cfg.seed)
    return init_weights(Marionette(mcfg)), {}


def train(cfg: TrainConfig) -> Path:
    """Train `cfg.stage` (or all stages) into `cfg.out`; returns the checkpoint directory RUN/checkpoint."""
    from trainer.data import ClipStore, StageDataset, list_clips, make_loader
    from trainer.nets import Discriminator, VGG19Perceptual
    from trainer.stages import TRAINS, USES_DISC, build_stage, expression_presets

    _check(cfg)
    # Denormal floats (tiny Adam moments, gradients near G's zero-initialised output layers) made CPU steps
    # 30x slower (measured: 10 s instead of 0.3 s per tiny step); flushing them to zero changes no result.
    torch.set_flush_denormal(True)
    d = init_distributed("cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
                         else "cpu")
    dev = _device(cfg, d)
    preset = C.preset(cfg.config)
    mcfg = ModelConfig.preset(preset.model)
    run = _Run(cfg.out)
    lookahead = cfg.lookahead_ms
    if lookahead is None:  # continuing a model: keep its lookahead
        src = cfg.init if cfg.init is not None else (run.ckpt if (run.ckpt / WEIGHTS).is_file() else None)
        if src is not None and cfg.stages()[0] != cfg.first_stage():
            lookahead = read_checkpoint_config(src)[0].lookahead_ms
    if lookahead is not None and lookahead != mcfg.lookahead_ms:
        mcfg = dataclasses.replace(mcfg, lookahead_ms=int(lookahead))
        log.info("lookahead %d ms (preset %s: %d ms)", lookahead, preset.model,
                 ModelConfig.preset(preset.model).lookahead_ms)
    stages = cfg.stages()
    if d.main:
        run.dir.mkdir(parents=True, exist_ok=True)
        (run.dir / "train_config.json").write_text(
            json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
                       indent=1, sort_keys=True) + "\n")
        if not cfg.resume:  # a fresh run of these stages: forget their progress and stale trainer states
            run.reset_progress(stages)
            for st in stages:
                for ext in (".json", ".safetensors"):
                    run.state_path(st).with_suffix(ext).unlink(missing_ok=True)
    barrier(d)

    clips = list_clips(cfg.data, "train") if any(st in NEEDS_CORPUS for st in stages) else []
    if not clips and any(st in NEEDS_CORPUS for st in stages):
        raise InputError(f"no training clips under {cfg.data} (expected {cfg.data}/train/<identity>/<clip>.mp4)")
    labelled = [st for st in stages if st in NEEDS_LABELS]
    if labelled and not any(c.factors is not None for c in clips):
        # real video (`marionette ingest`) has no per-frame ground truth: say so before any stage runs
        raise InputError(
            f"stage {', '.join(labelled)} needs per-frame ground-truth factor tables (<clip>.npz, written by "
            f"`marionette corpus`); {cfg.data} has none (real video, e.g. from `marionette ingest`). On real video "
            "run --config tiny|lite|base (motion, factors, expression, idle: no labels needed), or with "
            "--config talk only --stage render, state, patch or idle")
    store = ClipStore(mcfg, cache_dir=run.dir / "cache", lru=preset.clip_cache)
    sound_store = ClipStore(mcfg, cache_dir=run.dir / "cache", lru=max(preset.clip_cache, 256), frames=False)
    oracle = None
    if cfg.oracle is not None:
        from trainer.oracle import load_oracle

        oracle, _ = load_oracle(cfg.oracle, device=dev)
        oracle.requires_grad_(False)
    vgg = VGG19Perceptual(cfg.vgg_weights).to(dev) if cfg.vgg_weights is not None else None

    model: Marionette | None = None
    meta: dict = {}
    for stage in stages:
        if cfg.resume and stage in run.progress()["completed"]:
            log.info("stage %s already completed in %s: skipping", stage, run.dir)
            model = None  # the next stage reloads RUN/checkpoint
            continue
        scfg = C.override(preset.stage(stage), steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr)
        state = load_state(run.state_path(stage)) if cfg.resume else None
        if state is not None and state[1].get("stage") != stage:
            raise InputError(f"trainer state {run.state_path(stage)} belongs to stage {state[1].get('stage')!r}")
        if state is not None and int(state[1]["step"]) >= scfg.steps:
            log.info("stage %s: saved state is at step %s >= %d steps: nothing to do", stage, state[1]["step"],
                     scfg.steps)
        if state is not None:
            # the model as saved (a run started from --init keeps that checkpoint's jaw calibration); states
            # from before the config was saved rebuild it from the preset
            saved = state[1].get("model_config")
            model = Marionette(ModelConfig.from_dict(saved) if saved else mcfg)
            model.load_state_dict({k[6:]: v for k, v in state[0].items() if k.startswith("model.")})
            meta = dict(state[1].get("meta", {}))
        elif model is None:
            model, meta = _initial_model(cfg, run, stage, mcfg)
        if state is None and stage in ("motion", "factors", "expression"):
            meta.pop("expression_presets", None)  # they depend on E_mot / E_exp: recomputed after `expression`
        model.to(dev)
        model.requires_grad_(False)
        for name in TRAINS[stage]:
            operator.attrgetter(name)(model).requires_grad_(True)
        for name in cfg.freeze:
            try:
                operator.attrgetter(name)(model).requires_grad_(False)
            except AttributeError:
                raise InputError(f"--freeze {name}: the model has no such submodule") from None
        broadcast_module(model, d)

        idle = None
        if stage == "idle":
            from engine.idle_model import IdleModelConfig, IdleMotionModel

            torch.manual_seed(cfg.seed + 4)
            idle = IdleMotionModel(IdleModelConfig(n_mels=mcfg.audio.n_mels, fps=mcfg.fps,
                                                   mel_per_frame=mcfg.mel_per_frame)).to(dev)
            if state is not None:
                idle.load_state_dict({k[5:]: v for k, v in state[0].items() if k.startswith("idle.")})
        disc = None
        if USES_DISC.get(stage, False) and scfg.lr_d > 0:
            torch.manual_seed(cfg.seed + 1)
            disc = (Discriminator(model.generator.patch.mouth_res, base=32) if stage == "patch"  # mouth squares
                    else Discriminator.for_model(mcfg.name, mcfg.image_size)).to(dev)
            if state is not None:
                disc.load_state_dict({k[5:]: v for k, v in state[0].items() if k.startswith("disc.")})
        if stage in SYNTHETIC:
            from trainer import synthetic

            stage_mod = synthetic.build(stage, model, scfg, oracle=oracle, vgg=vgg).to(dev)
        else:
            stage_mod = build_stage(stage, model, scfg, oracle=oracle, vgg=vgg, idle=idle).to(dev)
        if state is not None:
            stage_mod.load_extra_state({k[6:]: v for k, v in state[0].items() if k.startswith("extra.")})

        # the sound and the factor tables only: the audio stage, and idle where the clips have factor tables
        sound_only = stage == "audio" or (stage == "idle" and any(c.factors is not None for c in clips))
        ds = (StageDataset(clips, mcfg, stage, scfg, preset.augment, cfg.seed, sound_store if sound_only else store)
              if stage in NEEDS_CORPUS else None)
        if stage == "idle" and ds.pseudo:  # real video without factor tables: E_pose / E_eye as targets
            from trainer.stages import pseudo_motion_table

            log.info("idle stage: no factor tables; targets are E_pose / E_eye of the %d clips", len(ds.clips))
            ds.motion_table = pseudo_motion_table(model, store, ds.clips, dev)
        if stage == "idle" and state is None:
            stage_mod.prepare(ds, dev)
        trained = ({"idle": idle} if stage == "idle" else {n: operator.attrgetter(n)(model) for n in TRAINS[stage]})

        def data(start: int, ds=ds, scfg=scfg, stage=stage):
            if stage in ("render", "patch"):  # pairs rendered on the fly (on the GPU in this process, on a CPU in workers)
                from trainer.synthetic import PairRenderer, render_batches

                n_ids = max(1, scfg.batch_size // scfg.per_id)
                from trainer.synthetic import PATCH_ONE_FACTOR, PATCH_SMALL_JAW

                extra = ({"one_factor": PATCH_ONE_FACTOR, "small_jaw": PATCH_SMALL_JAW, "region": False}
                         if stage == "patch" else {})
                make = PairRenderer(mcfg, n_ids, scfg.per_id, seed=cfg.seed * 7919 + d.rank,
                                    device=dev if dev.type == "cuda" else "cpu", **extra)
                return render_batches(make, start, 0 if dev.type == "cuda" else min(cfg.workers, 1),
                                      reuse=scfg.reuse if dev.type != "cuda" else 1)
            if stage == "state":  # a pool of rendered frames, rendered once (on the training device)
                from trainer.synthetic import StatePool

                pool = StatePool(mcfg, scfg.pool, scfg.batch_size, seed=cfg.seed * 7919 + 17 + d.rank, device=dev)
                return (_to_dev(pool(s), dev) for s in itertools.count(start))
            return make_loader(ds, scfg.batch_size, start, d.rank, d.world, cfg.workers, pin=dev.type == "cuda")

        def save(step: int, tensors: dict, doc: dict, stage=stage, model=model, idle=idle, meta=meta,
                 scfg=scfg) -> None:
            meta["train"] = {"stage": stage, "step": step, "steps": scfg.steps, "config": cfg.config}
            if idle is not None:
                from engine.idle_model import save_idle_model

                meta["idle_model"] = save_idle_model(idle, run.ckpt)
            save_checkpoint(model, run.ckpt, meta=meta)
            tensors.update({f"model.{k}": v for k, v in model.state_dict().items()})
            if idle is not None:
                tensors.update({f"idle.{k}": v for k, v in idle.state_dict().items()})
            doc["meta"] = meta
            doc["model_config"] = model.cfg.to_dict()
            save_state(run.state_path(stage), tensors, doc)

        lc = LoopConfig(stage=stage, scfg=scfg, run_dir=run.dir, device=dev, seed=cfg.seed,
                        ckpt_every=cfg.ckpt_every, log_every=cfg.log_every, dist=d, progress=cfg.progress)
        run_loop(lc, stage_mod, trained, disc, data, save, state)

        # ---- end of stage: what the engine reads from the checkpoint
        if stage == "render" and d.main and mcfg.gt_latents:
            from trainer.synthetic import gt_expression_presets

            meta["expression_presets"] = gt_expression_presets(mcfg)  # the latent is the corpus' expression
            save_checkpoint(model, run.ckpt, meta=meta)
        if stage == "expression" and d.main:
            presets = expression_presets(model, store, clips, scfg.window, dev)
            if presets:
                meta["expression_presets"] = presets
                save_checkpoint(model, run.ckpt, meta=meta)
        if stage == "idle":
            stage_mod.finalize(ds, dev)
            if d.main:
                from engine.idle_model import save_idle_model

                meta["idle_model"] = save_idle_model(idle, run.ckpt)
                save_checkpoint(model, run.ckpt, meta=meta)
        if d.main:
            run.mark_done(stage)
        barrier(d)
        model.requires_grad_(False)
    if d.owned:
        import torch.distributed as dist

        barrier(d)
        dist.destroy_process_group()
    return run.ckpt
