"""One training loop for every stage: AdamW, LR schedule, mixed precision on CUDA, gradient clipping,
checkpoints every N steps and at the end, exact resume, metrics JSONL + a tqdm bar, torchrun DDP.

Per step: the stage module's forward gives the generator-side loss (one DDP wrapper around it), then,
for adversarial stages, the discriminator takes one hinge step on [real; fake.detach()] in a single
forward (its own DDP wrapper). Randomness inside a step comes from a generator seeded by (seed, rank,
step), and the data from `trainer.data.StepSampler`, so a resumed run continues exactly where an
uninterrupted one would be.

Trainer state (`RUN/state/<stage>.safetensors` + `.json`, no pickle): model / discriminator / idle-model
weights, optimiser tensors (safetensors) with the optimiser structure and scalars (JSON), the step, the
torch RNG state and stage extras (the expression stage's memory bank). The loadable model checkpoint
(`RUN/checkpoint/`, `engine.checkpoint` format) is written at the same moments.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from engine.checkpoint import atomic_write
from trainer.config import StageConfig, lr_at
from trainer.losses import d_hinge

log = logging.getLogger(__name__)

STATE_FORMAT = 1


# ======================================================================================= distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module created the process group (and destroys it at the end of `train`)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """torchrun / spawn environment (RANK, WORLD_SIZE, LOCAL_RANK) -> process group (gloo on CPU, NCCL on
    CUDA); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank=rank, world=world, local_rank=local, owned=owned)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_module(module: nn.Module, d: Dist) -> None:
    """Rank 0's parameters and buffers to every rank (used for modules DDP does not wrap)."""
    if not d.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


# ============================================================================================ state
def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimiser state -> (tensors for safetensors, JSON-able structure referencing them)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for pid, st in sd["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                name = f"{prefix}.{pid}.{k}"
                tensors[name] = v.detach().cpu().contiguous().clone()
                entry[k] = {"tensor": name}
            else:
                entry[k] = {"value": v}
        state[str(pid)] = entry
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def optimizer_from_flat(opt: torch.optim.Optimizer, doc: dict, tensors: dict[str, torch.Tensor]) -> None:
    state = {}
    for pid, entry in doc["state"].items():
        state[int(pid)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entry.items()}
    groups = []
    for g in doc["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_state(path: Path, tensors: dict[str, torch.Tensor], doc: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path.with_suffix(".safetensors"), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps({"format": STATE_FORMAT, **doc}, indent=1, sort_keys=True, default=_json_default)
    atomic_write(path.with_suffix(".json"), lambda p: Path(p).write_text(text + "\n"))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    from safetensors.torch import load_file

    j, s = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (j.is_file() and s.is_file()):
        return None
    doc = json.loads(j.read_text())
    if doc.get("format") != STATE_FORMAT:
        from engine.errors import InputError

        raise InputError(f"trainer state {j}: unsupported format {doc.get('format')!r}")
    return load_file(str(s)), doc


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def _unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


# ============================================================================================= loop
@dataclass
class LoopConfig:
    stage: str
    scfg: StageConfig
    run_dir: Path
    device: torch.device
    seed: int
    ckpt_every: int
    log_every: int
    dist: Dist
    progress: bool = True


def amp_settings(device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler): bf16 where CUDA supports it, else fp16 + scaler; CPU: fp32."""
    if device.type != "cuda":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def param_groups(modules: dict[str, nn.Module]) -> list[dict]:
    groups = []
    for name, mod in modules.items():
        params = [p for p in mod.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "name": name})
    return groups


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class MetricsWriter:
    """Appends one JSON object per line to RUN/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def run_loop(lc: LoopConfig, stage_mod: nn.Module, trained: dict[str, nn.Module], disc: nn.Module | None,
             data: Callable[[int], Iterator[dict]], save: Callable[[int, dict[str, torch.Tensor], dict], None],
             resume_state: tuple[dict[str, torch.Tensor], dict] | None) -> int:
    """Train `stage_mod` for lc.scfg.steps steps (from the resumed step if `resume_state`). `trained`: the
    parameter groups ({name: module}); `save(step, tensors, doc)` writes the checkpoint + trainer state.
    Returns the final step."""
    from tqdm import tqdm

    scfg, d, dev = lc.scfg, lc.dist, lc.device
    amp_dtype, use_scaler = amp_settings(dev)
    groups = param_groups(trained)
    if not groups:
        raise ValueError(f"stage {lc.stage}: nothing to train")
    opt_g = torch.optim.AdamW(groups, lr=scfg.lr, betas=scfg.betas, weight_decay=scfg.weight_decay)
    use_d = disc is not None and scfg.lr_d > 0
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=scfg.lr_d, betas=scfg.betas, weight_decay=0.0)
             if use_d else None)
    scaler_g = torch.amp.GradScaler("cuda", enabled=use_scaler)
    scaler_d = torch.amp.GradScaler("cuda", enabled=use_scaler and use_d)

    start = 0
    if resume_state is not None:
        tensors, doc = resume_state
        start = int(doc["step"])
        optimizer_from_flat(opt_g, doc["opt_g"], tensors)
        if opt_d is not None and doc.get("opt_d"):
            optimizer_from_flat(opt_d, doc["opt_d"], tensors)
        if d.main and "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if "scaler_g" in doc and use_scaler:
            scaler_g.load_state_dict(doc["scaler_g"])
        log.info("stage %s: resuming at step %d of %d", lc.stage, start, scfg.steps)

    # DDP wrappers (frozen parameters are excluded by DDP itself)
    g_mod: nn.Module = stage_mod
    d_mod: nn.Module | None = disc
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        g_mod = DDP(stage_mod, device_ids=ids, broadcast_buffers=True, find_unused_parameters=False)
        if disc is not None:
            d_mod = DDP(disc, device_ids=ids) if use_d else disc
            if not use_d:
                broadcast_module(disc, d)
    stage_mod.set_disc(disc if use_d else None)
    stage_mod.train()
    if disc is not None:
        disc.train()

    metrics = MetricsWriter(lc.run_dir / "metrics.jsonl", d.main)
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
    it = data(start)
    acc: dict[str, float] = {}
    n_acc = 0
    t_win = time.perf_counter()
    bar = tqdm(total=scfg.steps, initial=start, unit="step", desc=lc.stage, disable=not (d.main and lc.progress),
               dynamic_ncols=True, leave=True)
    step = start
    try:
        for step in range(start, scfg.steps):
            batch = _to(next(it), dev)
            for g in opt_g.param_groups:
                g["lr"] = lr_at(scfg, step, scfg.lr) * stage_mod.lr_scale(g["name"], step)
            if opt_d is not None:
                for g in opt_d.param_groups:
                    g["lr"] = lr_at(scfg, step, scfg.lr_d)
            stage_mod.rng.manual_seed((lc.seed * 1_000_003 + d.rank * 7919 + step) % (2 ** 63))
            stage_mod.begin_step(step)
            # ---- generator side
            if disc is not None:
                disc.requires_grad_(False)
            with autocast():
                out = g_mod(batch)
            loss = out["loss"]
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"stage {lc.stage}: loss is {float(loss)} at step {step}")
            opt_g.zero_grad(set_to_none=True)
            scaler_g.scale(loss).backward()
            scaler_g.unscale_(opt_g)
            gnorm = (torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], scfg.grad_clip)
                     if scfg.grad_clip > 0 else torch.zeros(()))
            scaler_g.step(opt_g)
            scaler_g.update()
            logs = {k: float(v) for k, v in out["logs"].items()}
            logs["loss"] = float(loss.detach())
            logs["grad_norm"] = float(gnorm)
            # ---- discriminator
            if opt_d is not None:
                disc.requires_grad_(True)
                real, fake = out["real"].detach(), out["fake"].detach()
                with autocast():
                    _, logits = d_mod(torch.cat([real, fake]))
                    n = len(real)
                    loss_d = d_hinge([lg[:n] for lg in logits], [lg[n:] for lg in logits])
                opt_d.zero_grad(set_to_none=True)
                scaler_d.scale(loss_d).backward()
                scaler_d.unscale_(opt_d)
                if scfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), scfg.grad_clip)
                scaler_d.step(opt_d)
                scaler_d.update()
                logs["loss_d"] = float(loss_d.detach())
            for k, v in logs.items():
                acc[k] = acc.get(k, 0.0) + v
            n_acc += 1
            done = step + 1
            bar.update(1)
            if done % lc.log_every == 0 or done == scfg.steps or done == start + 1:
                rec = {k: v / n_acc for k, v in acc.items()}
                if d.enabled:  # mean over ranks (every rank logs at the same steps)
                    keys = sorted(rec)
                    t = torch.tensor([rec[k] for k in keys], dtype=torch.float64,
                                     device=dev if dev.type == "cuda" else "cpu")
                    dist.all_reduce(t)
                    rec = {k: float(v) / d.world for k, v in zip(keys, t.tolist())}
                now = time.perf_counter()
                rec.update(stage=lc.stage, step=done, lr=opt_g.param_groups[0]["lr"],
                           steps_per_s=n_acc / max(now - t_win, 1e-9), time=time.time())
                metrics.write(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", refresh=False)
                acc, n_acc, t_win = {}, 0, now
            if done % lc.ckpt_every == 0 or done == scfg.steps:
                _checkpoint(lc, done, stage_mod, disc, opt_g, opt_d, scaler_g, save)
    finally:
        bar.close()
        stage_mod.set_disc(None)
    return max(step + 1, start) if scfg.steps > start else start


def _checkpoint(lc: LoopConfig, step: int, stage_mod, disc, opt_g, opt_d, scaler_g, save) -> None:
    d = lc.dist
    if d.main:
        tensors, doc = {}, {"stage": lc.stage, "step": step}
        t, doc["opt_g"] = optimizer_to_flat(opt_g, "opt_g")
        tensors.update(t)
        if opt_d is not None:
            t, doc["opt_d"] = optimizer_to_flat(opt_d, "opt_d")
            tensors.update(t)
        if disc is not None:
            tensors.update(_prefixed(disc.state_dict(), "disc"))
        tensors.update(_prefixed(stage_mod.extra_state(), "extra"))
        tensors["rng.torch"] = torch.get_rng_state()
        if scaler_g.is_enabled():
            doc["scaler_g"] = {k: (float(v) if isinstance(v, (int, float)) else v)
                               for k, v in scaler_g.state_dict().items()}
        save(step, tensors, doc)
    barrier(d)


def main_losses_fell(records: list[dict], keys: tuple[str, ...], k: int = 5, margin: float = 0.0) -> dict[str, tuple]:
    """For tests and reports: {key: (mean of the first k, mean of the last k, fell?)} over metric records."""
    out = {}
    for key in keys:
        vals = [r[key] for r in records if key in r and math.isfinite(r[key])]
        if len(vals) < 2 * k:
            continue
        a, b = sum(vals[:k]) / k, sum(vals[-k:]) / k
        out[key] = (a, b, b < a * (1 - margin))
    return out
