"""torchrun DDP on CPU: 2 processes on the gloo backend train every stage of the tiny config a few steps;
both ranks finish, rank 0 writes the checkpoint, and the trained parameters are identical on both ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

WORKER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import trainer.train as T

    out_dir = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    real_loop = T.run_loop

    def observed_loop(lc, stage_mod, trained, *args, **kwargs):
        # the real loop; afterwards this rank's trained parameters, for the cross-rank comparison
        step = real_loop(lc, stage_mod, trained, *args, **kwargs)
        flat = torch.cat([p.detach().flatten().cpu() for m in trained.values() for p in m.parameters()])
        np.save(out_dir / f"{lc.stage}.rank{rank}.npy", flat.numpy())
        (out_dir / f"{lc.stage}.rank{rank}.world").write_text(f"{lc.dist.rank} {lc.dist.world}")
        return step

    T.run_loop = observed_loop
    ckpt = T.train(T.TrainConfig(stage="all", data=Path(sys.argv[1]), config="tiny", out=out_dir / "run",
                                 steps=3, batch_size=2, workers=0, log_every=1, ckpt_every=2, seed=3,
                                 progress=False, device="cpu"))
    (out_dir / f"done.rank{rank}").write_text(str(ckpt))
''')


def test_torchrun_two_cpu_processes_gloo(small_corpus, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(script), str(small_corpus), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    # both ranks finished and returned the checkpoint directory
    for r in (0, 1):
        assert (tmp_path / f"done.rank{r}").read_text().endswith("checkpoint")
    run = tmp_path / "run"
    # rank 0 wrote a loadable checkpoint with everything the engine reads
    from engine.checkpoint import load_checkpoint
    from engine.idle_model import load_idle_model

    model, meta = load_checkpoint(run / "checkpoint")
    assert meta["train"]["stage"] == "idle" and meta["train"]["step"] == 3
    assert load_idle_model(run / "checkpoint") is not None
    assert set(json.loads((run / "state" / "progress.json").read_text())["completed"]) == {
        "motion", "factors", "expression", "idle"}
    # identical parameters on both ranks after every stage (gradients averaged, same updates)
    for stage in ("motion", "factors", "expression", "idle"):
        for r in (0, 1):  # each process trained as its own rank of a 2-process group (different data)
            assert (tmp_path / f"{stage}.rank{r}.world").read_text() == f"{r} 2"
        a = np.load(tmp_path / f"{stage}.rank0.npy")
        b = np.load(tmp_path / f"{stage}.rank1.npy")
        assert a.shape == b.shape and np.array_equal(a, b), \
            f"{stage}: ranks diverged (max |diff| {np.abs(a - b).max()})"
    # metrics are logged once (rank 0), averaged over ranks, for every step of every stage
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in recs] == [(s, i) for s in ("motion", "factors", "expression", "idle")
                                                      for i in (1, 2, 3)]
