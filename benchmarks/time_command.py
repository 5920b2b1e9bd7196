"""Time a whole command (e.g. `make builtin`) and record the machine's load beside it.

    python benchmarks/time_command.py --out benchmarks/results/builtin_time.json -- make builtin

Writes {"command", "wall_s", "exit_code", "cores", "load": {"median", "max", "samples"}, "started", ...}.
The load average is sampled every --every seconds while the command runs; a median load far above the
core count means the figure was taken on a busy machine and is not a clean one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--every", type=float, default=10.0, help="seconds between load samples")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    a = p.parse_args()
    cmd = a.command[1:] if a.command and a.command[0] == "--" else a.command
    if not cmd:
        p.error("give the command after --")
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(a.every):
            loads.append(os.getloadavg()[0])

    t = threading.Thread(target=sample, daemon=True)
    started = time.time()
    t0 = time.perf_counter()
    t.start()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    rec = {"command": " ".join(cmd), "wall_s": round(wall, 1), "wall_h": round(wall / 3600, 3), "exit_code": rc,
           "cores": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
           "load": {"median": round(statistics.median(loads), 2) if loads else None,
                    "max": round(max(loads), 2) if loads else None, "samples": len(loads)}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rec, indent=2) + "\n")
    print(json.dumps(rec))
    return rc


if __name__ == "__main__":
    sys.exit(main())
