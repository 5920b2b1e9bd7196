"""How many concurrent 25 fps sessions `marionette serve` holds on this machine, and the memory each
added session costs.

The server runs in its own process (so its RSS is its own), restricted to 127.0.0.1. Sessions are
added one at a time by real aiortc peers in this process that speak continuously (espeak-ng), so
every session runs the audio encoder every tick, the worst case. The peers count the video frames
they receive without decoding them (decoding N streams would steal the server's CPU on a small
machine). After each addition the run settles, then measures for a window: the server's frame rate
per session (its stats), frames the peers received, the scheduler's round time, and the server RSS.
It stops after the first step at which a session falls below --min-fps (but adds at least
--memory-sessions sessions, so the memory slope is measured even on a machine that holds fewer).

    .venv/bin/python benchmarks/capacity.py [--config lite] [--max-sessions 8] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streaming.client import AvatarClient, PcmSource  # noqa: E402
from streaming.fixtures import WORDS, default_checkpoint, espeak  # noqa: E402

_SERVER = r"""
import json, logging, sys
from pathlib import Path
from streaming.server import ServeConfig, serve
logging.basicConfig(level=logging.WARNING)
d = json.loads(sys.argv[1])
d["checkpoint"] = Path(d["checkpoint"]) if d.get("checkpoint") else None
d["ice_hosts"] = tuple(d["ice_hosts"])
serve(ServeConfig(**d))
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_healthy(url: str, proc, timeout: float = 180.0) -> None:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, never a proxy
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode})")
        try:
            with opener.open(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not become healthy")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_json(url: str):
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.json()


class Talker:
    """A peer that speaks continuously and counts received frames."""

    def __init__(self, url: str, speech: np.ndarray):
        self.mic = PcmSource()
        self.speech = speech
        self.client = AvatarClient(url, keep_frames=False, decode_video=False)
        self._task = None

    async def start(self):
        await self.client.connect(mic=self.mic)
        await self.client.wait_first_frame(30)
        self._task = asyncio.ensure_future(self._talk())

    async def _talk(self):
        while True:
            self.mic.append(self.speech)
            await asyncio.sleep(len(self.speech) / 48000)

    async def stop(self):
        if self._task:
            self._task.cancel()
        await self.client.close()


async def run(url: str, pid: int, max_sessions: int, settle: float, window: float, min_fps: float,
              memory_sessions: int) -> dict:
    speech = np.concatenate([espeak(w) for w in WORDS[:6]])
    await asyncio.sleep(1.0)
    steps = [{"sessions": 0, "rss_mb": rss_mb(pid)}]
    talkers: list[Talker] = []
    try:
        for n in range(1, max_sessions + 1):
            t = Talker(url, speech)
            try:
                await t.start()
            except Exception as e:  # noqa: BLE001 - e.g. 503 at --max-sessions
                steps.append({"sessions": n, "error": f"{type(e).__name__}: {e}"})
                break
            talkers.append(t)
            await asyncio.sleep(settle)
            before = {s["session"]: s for s in (await http_json(url + "/sessions"))["sessions"]}
            seen0 = [x.client.video_frames_seen for x in talkers]
            t0, c0 = time.monotonic(), cpu_seconds(pid)
            await asyncio.sleep(window)
            dt = time.monotonic() - t0
            cpu = (cpu_seconds(pid) - c0) / dt
            after = {s["session"]: s for s in (await http_json(url + "/sessions"))["sessions"]}
            seen = [(x.client.video_frames_seen - s0) / dt for x, s0 in zip(talkers, seen0)]
            fps = [(after[k]["frames_sent"] - before[k]["frames_sent"]) / dt for k in after if k in before]
            drops = sum(after[k]["frames_dropped"] - before[k]["frames_dropped"] for k in after if k in before)
            any_s = next(iter(after.values()))
            step = {"sessions": n, "rss_mb": rss_mb(pid), "server_fps_min": min(fps), "server_fps_mean": float(np.mean(fps)),
                    "received_fps_min": min(seen), "dropped_per_s": drops / dt, "round_ms": any_s["round_ms"],
                    "batch": any_s["batch"], "server_cpu_cores": cpu, "load_avg_1m": os.getloadavg()[0]}
            steps.append(step)
            print(f"  {n} session(s): server fps min {step['server_fps_min']:.1f} mean {step['server_fps_mean']:.1f}, "
                  f"received min {step['received_fps_min']:.1f}, round {step['round_ms']:.1f} ms, "
                  f"server CPU {step['server_cpu_cores']:.2f} cores, RSS {step['rss_mb']:.0f} MB, "
                  f"load {step['load_avg_1m']:.1f}", flush=True)
            if min(fps) < min_fps and n >= memory_sessions:
                break
    finally:
        for t in talkers:
            await t.stop()
    held = []
    for s in steps[1:]:  # the largest count at which it held, every smaller count included
        if s.get("server_fps_min", 0) < min_fps or s.get("received_fps_min", 0) < min_fps:
            break
        held.append(s["sessions"])
    rss = [(s["sessions"], s["rss_mb"]) for s in steps if "rss_mb" in s]
    per_session = None
    if len(rss) >= 3:
        xs = np.array([r[0] for r in rss[1:]], float)
        ys = np.array([r[1] for r in rss[1:]], float)
        per_session = float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 else None
    return {"steps": steps, "capacity": max(held) if held else 0, "min_fps": min_fps,
            "rss_first_session_mb": rss[1][1] - rss[0][1] if len(rss) > 1 else None,
            "rss_per_added_session_mb": per_session}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="lite", help="model config when no built-in checkpoint is installed")
    ap.add_argument("--checkpoint", type=Path, help="default: the built-in checkpoint")
    ap.add_argument("--backend", default="torch", help="torch | onnxruntime")
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server (default: its own)")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--window", type=float, default=6.0)
    ap.add_argument("--min-fps", type=float, default=24.0)
    ap.add_argument("--memory-sessions", type=int, default=4,
                    help="add at least this many sessions (for the memory slope) even past capacity")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "capacity.json")
    a = ap.parse_args(argv)
    from streaming.ice import restrict_host_candidates

    restrict_host_candidates(["127.0.0.1"])
    with tempfile.TemporaryDirectory() as tmp:
        ck, what = (a.checkpoint, str(a.checkpoint)) if a.checkpoint else default_checkpoint(Path(tmp), a.config)
        port = free_port()
        cfg = {"host": "127.0.0.1", "port": port, "checkpoint": str(ck), "config": a.config,
               "ice_hosts": ["127.0.0.1"], "max_sessions": a.max_sessions + 1, "threads": a.threads,
               "admission": False,  # measured past the point where admission control would refuse
               "backend": a.backend}
        proc = subprocess.Popen([sys.executable, "-c", _SERVER, json.dumps(cfg)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc)
            print(f"server on port {port} ({a.config}, threads {a.threads or 'default'})")
            res = asyncio.run(run(f"http://127.0.0.1:{port}", proc.pid, a.max_sessions, a.settle, a.window, a.min_fps,
                                  min(a.memory_sessions, a.max_sessions)))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    res.update({"model": what, "config": a.config, "backend": a.backend, "threads": a.threads, "cpus": os.cpu_count(),
                "load_after": os.getloadavg()[0]})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(f"capacity: {res['capacity']} concurrent {a.config} sessions at >= {a.min_fps:g} fps on {os.cpu_count()} CPUs; "
          f"RSS first session {res['rss_first_session_mb'] or float('nan'):.0f} MB, per added session "
          f"{res['rss_per_added_session_mb'] or float('nan'):.1f} MB -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
