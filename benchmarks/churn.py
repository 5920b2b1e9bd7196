"""Churn: N connect/disconnect cycles against a real `marionette serve` process, a share of them abrupt, with
the server's RSS, OS threads, open file descriptors, asyncio tasks and scheduler sessions sampled every K
cycles (after letting the server settle: every session ended, so a sample shows what was left behind; the
figures while sessions were open are kept beside). Flat or not, with the fitted slopes, in benchmarks/results/churn.json and the curves in churn.png.

Cycle kinds (streaming.fixtures.CHURN_KINDS): clean (talk, get video, close); and abrupt ones: vanish (goes
silent without a goodbye, as a killed process looks from the server), kill (a real peer process killed with
SIGKILL), no_ice (an offer whose peer never does ICE), no_audio (a video-only offer), mid_message (a large
control message, the channel and the connection closed right behind it). A refused offer (503 full /
overloaded) is retried every 0.5 s as a client would (for up to 15 s, then the cycle gives up); every
refusal is counted by reason: ghosts of abrupt peers should never hold slots long enough to refuse many.

"threads" are the server's OS threads but the event loop's pooled executor workers (which grow on demand
up to their bound; reported as pooled_threads). A metric is "flat" when its fitted slope over the cycles after warm-up, times the number of cycles, and its
settled value (after every session has ended) minus the baseline are both within a tolerance: threads 2,
fds 4, tasks 4, scheduler sessions 0 (settled), RSS 16 MB (the allocator keeps some of what it freed).

    .venv/bin/python benchmarks/churn.py [--cycles 1000] [--every 25] [--abrupt 0.5] [--model tiny|builtin]

The default model is the tiny random one (64 px): churn is about the server's lifecycle, and a cycle then
costs ~0.5 s of this machine; --model builtin serves the shipped model (about a core while a session runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streaming.fixtures import CHURN_KINDS, ServeProcess, churn_cycle  # noqa: E402

RETRY_S = 15.0  # how long a refused cycle keeps retrying (every 0.5 s) before it gives up
ABRUPT_MIX = {"vanish": 0.3, "kill": 0.06, "no_ice": 0.24, "no_audio": 0.2, "mid_message": 0.2}
TOLERANCE = {"threads": 2, "fds": 4, "tasks": 4, "scheduler_sessions": 0, "rss_mb": 16}


def proc_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mb"] = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


async def scrape(url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    want = {"marionette_asyncio_tasks": "tasks", "marionette_scheduler_sessions": "scheduler_sessions",
            "marionette_sessions": "sessions", "marionette_executor_threads": "pooled_threads"}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            out[want[name]] = float(value)
    return out


async def sample(sp: ServeProcess, cycle: int, refused: int, failed: int) -> dict:
    s = {"cycle": cycle, "t": round(time.monotonic(), 2), **proc_status(sp.pid), **(await scrape(sp.url)),
         "refused": refused, "failed": failed, "loadavg": round(os.getloadavg()[0], 2)}
    # the event loop's executor grows on demand up to its bound (not a leak): threads are counted without it
    s["os_threads"] = s["threads"]
    s["threads"] = s["threads"] - s.get("pooled_threads", 0)
    return s


async def settle(sp: ServeProcess, timeout: float) -> None:
    """Until the server has no session (and has run its collection, a second after the last one closed)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = await scrape(sp.url)
        if m.get("sessions", 1) == 0 and m.get("scheduler_sessions", 1) == 0:
            await asyncio.sleep(1.5)
            return
        await asyncio.sleep(0.25)


def verdicts(samples: list[dict], baseline: dict, settled: dict, cycles: int) -> dict:
    """Counts against the baseline after warm-up; RSS against the first sample past a tenth of the cycles
    (the allocator keeps the high-water mark of the sessions that were open at once, once)."""
    out = {}
    warm = [s for s in samples if s["cycle"] >= max(1, cycles // 10)]
    for key, tol in TOLERANCE.items():
        xs = np.array([s["cycle"] for s in warm], float)
        ys = np.array([s[key] for s in warm], float)
        slope = float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 3 else float("nan")
        ref = warm[0] if key == "rss_mb" and warm else baseline
        growth = settled[key] - ref[key]
        fitted = slope * cycles
        allow = tol + (0 if key == "rss_mb" else 1)  # counts: one of noise in the fit
        flat = bool(growth <= tol and (np.isnan(fitted) or fitted <= allow))
        if key == "scheduler_sessions":
            flat = settled[key] == 0
        out[key] = {"baseline": ref[key], "settled": settled[key], "growth": round(growth, 3),
                    "slope_per_1000_cycles": round(slope * 1000, 3), "tolerance": tol, "flat": flat}
    return out


def plot(samples: list[dict], settled: dict, verdict: dict, path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[test]'): no plot")
        return
    keys = [("rss_mb", "RSS (MB)"), ("threads", "OS threads"), ("fds", "open fds"), ("tasks", "asyncio tasks"),
            ("scheduler_sessions", "scheduler sessions"), ("refused", "offers refused (cumulative)")]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    x = [s["cycle"] for s in samples]
    for ax, (k, label) in zip(axes.flat, keys):
        ax.plot(x, [s[k] for s in samples], ".-", lw=1, label="settled")
        live = [(s["cycle"], s["live"][k]) for s in samples if "live" in s and s["live"].get(k) is not None]
        if live:
            ax.plot(*zip(*live), ":", color="gray", lw=1, label="while sessions were open")
            ax.legend(fontsize=7)
        if k in settled:
            ax.plot([x[-1]], [settled[k]], "r*", ms=10)
        v = verdict.get(k)
        ax.set_title(label + (f"  {'flat' if v['flat'] else 'GROWS'} ({v['slope_per_1000_cycles']:+.2f}/1000)"
                              if v else ""), fontsize=9)
        ax.set_xlabel("cycle", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def main_async(a) -> dict:
    from streaming.ice import restrict_host_candidates

    rng = random.Random(a.seed)
    tmp = tempfile.TemporaryDirectory(prefix="churn-")
    args = ["--ice-host", "127.0.0.1", "--offer-rate", "off", "--max-sessions", str(a.max_sessions)]
    if a.model == "tiny":
        from streaming.fixtures import responsive_checkpoint

        ck = responsive_checkpoint(Path(tmp.name) / "tiny", "tiny")
        args += ["--checkpoint", str(ck), "--config", "tiny", "--backend", "torch", "--align", "off"]
    restrict_host_candidates(["127.0.0.1"])
    kinds_abrupt = list(ABRUPT_MIX)
    weights = [ABRUPT_MIX[k] for k in kinds_abrupt]
    plan = [rng.choices(kinds_abrupt, weights)[0] if rng.random() < a.abrupt else "clean" for _ in range(a.cycles)]
    with ServeProcess(args) as sp:
        print(f"server pid {sp.pid} at {sp.url} ({a.model}); warming up", flush=True)
        for i, k in enumerate([k for k in CHURN_KINDS]):  # every kind once: executors, codecs, pools
            await churn_cycle(sp.url, k, seed=10_000 + i)
        await settle(sp, 60)
        baseline = await sample(sp, 0, 0, 0)
        samples = [baseline]
        results = []
        refused = failed = gave_up = 0
        refusals: dict[str, int] = {}
        t0 = time.monotonic()
        for i, kind in enumerate(plan, 1):
            # a refused offer (503: full or overloaded) is retried as a client would, after a pause; every
            # refusal is counted, and a cycle refused for RETRY_S in all gives up
            t_cycle = time.monotonic()
            while True:
                r = await churn_cycle(sp.url, kind, seed=i)
                if not r["refused"] or time.monotonic() - t_cycle > RETRY_S:
                    break
                refused += 1
                refusals[r.get("reason", "?")] = refusals.get(r.get("reason", "?"), 0) + 1
                await asyncio.sleep(0.5)
            results.append(r)
            if i % 5 == 0:
                gc.collect()  # this process's own closed peers (their codecs' threads) between cycles
            gave_up += r["refused"]
            failed += (not r["ok"]) and not r["refused"]
            if i % a.every == 0 or i == len(plan):
                # what is left behind, not what open sessions hold: the server settles first (every session
                # ended, its collection run), and the live figures just before are kept beside
                live = await sample(sp, i, refused, failed)
                await settle(sp, 30)
                s = await sample(sp, i, refused, failed)
                s["live"] = {k: live.get(k) for k in ("rss_mb", "threads", "fds", "tasks", "sessions")}
                samples.append(s)
                print(f"cycle {i:5d}  rss {s['rss_mb']:.1f} MB  threads {s['threads']}  fds {s['fds']}  "
                      f"tasks {s.get('tasks')}  sched {s.get('scheduler_sessions')}  sessions {s.get('sessions')}  "
                      f"refused {refused}  failed {failed}  load {s['loadavg']}", flush=True)
        took = time.monotonic() - t0
        await settle(sp, 60)
        settled = await sample(sp, len(plan), refused, failed)
        log_tail = sp.log()[-2000:]
    verdict = verdicts(samples, baseline, settled, len(plan))
    by_kind = {}
    for r in results:
        d = by_kind.setdefault(r["kind"], {"n": 0, "ok": 0, "refused": 0, "seconds": []})
        d["n"] += 1
        d["ok"] += r["ok"]
        d["refused"] += r["refused"]
        d["seconds"].append(r["seconds"])
    for d in by_kind.values():
        d["seconds"] = round(float(np.mean(d["seconds"])), 3)
    errors = [r for r in results if not r["ok"] and not r["refused"]][:20]
    flat = all(v["flat"] for v in verdict.values())
    out = {"cycles": len(plan), "abrupt_share": a.abrupt, "model": a.model, "max_sessions": a.max_sessions,
           "seed": a.seed, "every": a.every, "took_s": round(took, 1), "refused": refused,
           "refusals_by_reason": refusals, "gave_up": gave_up, "failed": failed,
           "flat": flat, "verdict": verdict, "by_kind": by_kind, "baseline": baseline, "settled": settled,
           "samples": samples, "errors": errors, "loadavg_end": list(os.getloadavg()), "cpus": os.cpu_count(),
           "server_log_tail": log_tail}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--every", type=int, default=25, help="sample every K cycles")
    p.add_argument("--abrupt", type=float, default=0.5, help="share of abrupt cycles (default 0.5)")
    p.add_argument("--model", choices=["tiny", "builtin"], default="tiny")
    p.add_argument("--max-sessions", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "churn")
    a = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    res = asyncio.run(main_async(a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out.with_suffix(".json"), json.dumps(res, indent=1))
    title = (f"churn: {res['cycles']} cycles ({a.abrupt:.0%} abrupt), {a.model} model; offers refused "
             f"{res['refused']} {res['refusals_by_reason']}, cycles given up {res['gave_up']}, failed {res['failed']}; "
             f"load {res['loadavg_end'][0]:.1f}: {'FLAT' if res['flat'] else 'NOT FLAT'}")
    plot(res["samples"], res["settled"], res["verdict"], a.out.with_suffix(".png"), title)
    print(title)
    for k, v in res["verdict"].items():
        print(f"  {k:20s} {'flat' if v['flat'] else 'GROWS':5s} baseline {v['baseline']:.1f} settled {v['settled']:.1f} "
              f"slope {v['slope_per_1000_cycles']:+.2f}/1000 cycles (tolerance {v['tolerance']})")
    print(f"wrote {a.out.with_suffix('.json')} and {a.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
