"""The built-in recipe's second pass, "the polish" (README "The polish"): G's stages once more, from the first
pass's model, at a lower learning rate (a warm restart): `render` 1000 steps and `patch` 2500 at lr 3e-4, and
`state` (the estimator) again at its own settings, into RUN/polish. Measured on 2026-12-03: +0.35 dB of PSNR over
copy-source on the held-out corpus the first pass missed the bar on, 34 min on the faster 2-core machine.

`make builtin` runs it only where it fits the recipe's wall-time budget (2.5 h on 2 cores): what it will cost is
projected from the first pass's own stage times on this machine (each stage's seconds per step times the polish's
steps) plus the jaw calibration, and compared with what is left of the budget since the run started
(RUN/started, written by the Makefile). A polish already begun is finished (a resumed run does not change its mind).

    python -m trainer.polish --run RUN [--budget-min 150] [--force auto|on|off] [--device cpu]

decides, logs why, and trains RUN/polish when it runs (each stage resumable, as `marionette train --resume`);
exit status 0 either way, 2 when there is no first pass to judge by.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# (stage, steps, lr) of the polish; None: the preset's (trainer.config `talk`)
STAGES: tuple[tuple[str, int | None, float | None], ...] = (("render", 1000, 3e-4), ("state", None, None),
                                                              ("patch", 2500, 3e-4))
CALIBRATION_S = 120.0  # the jaw calibration after it (benchmarks/mouth_opening.py --calibrate: ~1 min measured)
SETUP_S = 60.0  # per stage: loading, the state stage's frame pool (~20 s measured), the first checkpoint


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: str
    projected_s: float | None = None
    left_s: float | None = None


def stage_seconds_per_step(metrics: Path) -> dict[str, float]:
    """Seconds per step of each stage in a run's metrics.jsonl (rows every few steps with a wall `time`): the span
    between a stage's first and last row over the steps between them."""
    rows: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "stage" in r and "step" in r and "time" in r:
            rows.setdefault(r["stage"], []).append((int(r["step"]), float(r["time"])))
    out = {}
    for stage, v in rows.items():
        (s0, t0), (s1, t1) = min(v), max(v)
        if s1 > s0 and t1 > t0:
            out[stage] = (t1 - t0) / (s1 - s0)
    return out


def projected_seconds(first_run: Path, config: str = "talk") -> float:
    """The polish's wall time on this machine, from the first pass's stage times (RUN/talk/metrics.jsonl)."""
    from trainer import config as C

    metrics = first_run / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"no {metrics}: the first pass has not run in {first_run.parent}")
    per_step = stage_seconds_per_step(metrics)
    preset = C.preset(config)
    total = CALIBRATION_S
    for stage, steps, _ in STAGES:
        if stage not in per_step:
            raise ValueError(f"{first_run / 'metrics.jsonl'} has no timed rows of stage {stage!r}")
        total += per_step[stage] * (steps if steps is not None else preset.stage(stage).steps) + SETUP_S
    return total


def started(run: Path) -> bool:
    """Whether the polish in RUN/polish has begun (a stage's trainer state or a completed stage)."""
    state = run / "polish" / "state"
    return state.is_dir() and any(state.iterdir())


def decide(run: Path, budget_s: float, force: str = "auto", now: float | None = None) -> Decision:
    """Whether `make builtin` polishes the first pass's model in RUN (see the module docstring)."""
    if force not in ("auto", "on", "off"):
        raise ValueError(f"force must be auto, on or off, got {force!r}")
    if force != "auto":
        return Decision(force == "on", f"forced {force} (POLISH={force})")
    if started(run):
        return Decision(True, f"already begun in {run / 'polish'}: finishing it")
    projected = projected_seconds(run / "talk")
    stamp = run / "started"
    if not stamp.is_file():
        return Decision(False, f"no {stamp} (the run's start): cannot tell what is left of the budget", projected)
    left = budget_s - ((time.time() if now is None else now) - float(stamp.read_text().split()[0]))
    if projected <= left:
        return Decision(True, f"projected {projected / 60:.0f} min, {left / 60:.0f} min of the budget left",
                        projected, left)
    return Decision(False, f"projected {projected / 60:.0f} min but only {left / 60:.0f} min of the "
                           f"{budget_s / 60:.0f} min budget left: the first pass's model is the one installed "
                           "(POLISH=on runs it anyway)", projected, left)


def polish(run: Path, *, config: str = "talk", device: str = "auto", steps: int | None = None, workers: int = 1,
           progress: bool = True) -> Path:
    """Train STAGES into RUN/polish from RUN/talk/checkpoint (its lookahead kept), each stage resumed where it
    stopped (completed ones are skipped) -> RUN/polish/checkpoint. `steps` overrides every stage's (tests)."""
    from engine.checkpoint import read_checkpoint_config
    from trainer.train import TrainConfig, train

    init = run / "talk" / "checkpoint"
    lookahead = read_checkpoint_config(init)[0].lookahead_ms
    ck = run / "polish" / "checkpoint"
    for i, (stage, n, lr) in enumerate(STAGES):
        first = {"init": init, "lookahead_ms": lookahead} if i == 0 else {}
        ck = train(TrainConfig(stage=stage, config=config, data=run / "corpus", out=run / "polish",
                               steps=steps if steps is not None else n, lr=lr, device=device, workers=workers,
                               ckpt_every=250, resume=True, progress=progress, **first))
    return ck


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer.polish", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the built-in's run directory (BUILTIN_RUN)")
    ap.add_argument("--budget-min", type=float, default=150.0, help="the recipe's wall-time budget in minutes")
    ap.add_argument("--force", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        d = decide(a.run, a.budget_min * 60.0, a.force)
    except ValueError as e:
        log.error("the polish: %s", e)
        return 2
    log.info("the polish %s: %s", "runs" if d.run else "is skipped", d.reason)
    if d.run:
        polish(a.run, device=a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
