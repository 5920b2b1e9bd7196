"""trainer.polish: whether `make builtin` runs the second pass, from the first pass's own stage times."""
from __future__ import annotations

import json

import pytest

from trainer.polish import CALIBRATION_S, SETUP_S, decide, main, projected_seconds, stage_seconds_per_step


def _first_pass(run, per_step: dict[str, float], t0: float = 1.0e9) -> None:
    """A first pass's metrics.jsonl: rows every 50 steps of each stage, `per_step` seconds apart per step."""
    (run / "talk").mkdir(parents=True)
    rows, t = [], t0
    for stage, sps in per_step.items():
        for step in (1, *range(50, 1001, 50)):
            rows.append({"stage": stage, "step": step, "time": t + (step - 1) * sps, "loss": 1.0})
        t += 1000 * sps + 30.0
    (run / "talk" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_polish_runs_where_it_fits_the_budget_and_not_where_it_does_not(tmp_path):
    _first_pass(tmp_path, {"render": 0.8, "state": 0.5, "patch": 0.3, "audio": 0.1})
    assert stage_seconds_per_step(tmp_path / "talk" / "metrics.jsonl") == pytest.approx(
        {"render": 0.8, "state": 0.5, "patch": 0.3, "audio": 0.1})
    want = 0.8 * 1000 + 0.5 * 1000 + 0.3 * 2500 + CALIBRATION_S + 3 * SETUP_S  # the talk preset's state: 1000
    assert projected_seconds(tmp_path / "talk") == pytest.approx(want)
    now = 2.0e9
    (tmp_path / "started").write_text(f"{now - 3600:.0f}\n")  # an hour into a 2.5 h budget: 90 min left
    d = decide(tmp_path, 150 * 60, now=now)
    assert d.run and d.left_s == pytest.approx(5400) and "projected 39 min" in d.reason
    (tmp_path / "started").write_text(f"{now - 130 * 60:.0f}\n")  # 20 min left: the first pass's model is kept
    d = decide(tmp_path, 150 * 60, now=now)
    assert not d.run and "only 20 min" in d.reason
    assert decide(tmp_path, 150 * 60, "on", now=now).run and not decide(tmp_path, 1e9, "off", now=now).run
    (tmp_path / "polish" / "state").mkdir(parents=True)
    (tmp_path / "polish" / "state" / "render.json").write_text("{}")
    assert decide(tmp_path, 150 * 60, now=now).run  # begun: a resumed run finishes it
    with pytest.raises(ValueError, match="force"):
        decide(tmp_path, 1.0, "maybe")


def test_the_polish_cli_skips_quietly_and_fails_loudly(tmp_path, caplog):
    """A skip is not an error (`make builtin` goes on to install the first pass's model); no first pass is."""
    _first_pass(tmp_path, {"render": 5.0, "state": 5.0, "patch": 5.0})  # a very slow machine
    (tmp_path / "started").write_text("0\n")  # started long ago
    with caplog.at_level("INFO", logger="trainer.polish"):
        assert main(["--run", str(tmp_path)]) == 0
    assert "is skipped" in caplog.text and not (tmp_path / "polish").exists()
    assert main(["--run", str(tmp_path / "nothing")]) == 2  # no first pass: an error, not a skip
    (tmp_path / "talk" / "metrics.jsonl").write_text(json.dumps({"stage": "audio", "step": 1, "time": 0}) + "\n")
    assert main(["--run", str(tmp_path)]) == 2  # no timed render stage to project from
