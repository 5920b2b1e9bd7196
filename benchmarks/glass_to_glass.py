"""Glass-to-glass latency of `marionette serve` over 127.0.0.1.

A real aiortc client sends silence, then a short espeak-ng utterance, again and again. For every
speech onset it measures the time from the 20 ms packet holding the onset sample leaving the client
to the first received video frame whose mouth region opens:

  client_decoded_ms  ... to the frame coming out of the client's decoder (aiortc holds each video
                         frame until the next frame's first packet arrives: one frame period)
  client_network_ms  ... to the first RTP packet of that frame reaching the client (before any
                         jitter buffer): what a browser with a 0 ms jitter buffer could show
  server_ms          the server's own view: the onset hop reaching the server -> its first
                         open-mouth frame handed to the encoder (the DESIGN's definition)

and reports p50 / p95 over all onsets, with the server's fixed pipeline latency for reference.

    .venv/bin/python benchmarks/glass_to_glass.py [--onsets 40] [--config lite] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streaming.client import AvatarClient, PcmSource  # noqa: E402
from streaming.fixtures import (WORDS, ServerThread, default_checkpoint, espeak, mouth_region,  # noqa: E402
                                percentiles, send_time_of_sample)
from streaming.server import ServeConfig  # noqa: E402

STATIC = [{"type": "source", "factor": "pose", "from": "controls"},
          {"type": "source", "factor": "eye", "from": "controls"}]


async def run(url: str, server, n_onsets: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bank = [espeak(w) for w in WORDS]
    frames: list[tuple[float, int, float]] = []  # (decoded arrival, pts, mouth deviation)
    rest: list[np.ndarray] = []
    ref = {}

    def on_video(t, pts, arr):
        m = mouth_region(arr)
        if "rest" not in ref:
            rest.append(m)
            if len(rest) == 12:
                ref["rest"] = np.median(np.stack(rest), axis=0)
            return
        frames.append((t, pts, float(np.abs(m - ref["rest"]).mean())))

    mic = PcmSource()
    c = AvatarClient(url, keep_frames=False, on_video=on_video)
    await c.connect(mic=mic, controls=STATIC)
    await c.wait_first_frame(30)
    await asyncio.sleep(1.5)
    onsets = []
    for i in range(n_onsets):
        await asyncio.sleep(float(rng.uniform(0.9, 1.5)))  # silence (the mic sends zeros when idle)
        x = bank[i % len(bank)]
        loud = np.flatnonzero(np.abs(x.astype(np.int32)) > 0.003 * 32767)  # where the voice gate can start
        start = mic.append(x)
        onsets.append(start + int(loud[0]))
        await asyncio.sleep(len(x) / 48000 + 0.1)
    await asyncio.sleep(1.0)
    sid = c.session
    sess = server.server.sessions.get(sid)
    server_onsets = list(sess.onset_latencies) if sess else []
    latency_ms = sess.latency_s * 1000 if sess else None
    stats = await c.request({"type": "stats"})
    await c.close()

    t = np.array([f[0] for f in frames])
    dev = np.array([f[2] for f in frames])
    quiet = dev[: max(1, int(25 * 0.8))]
    # "open": clearly above the rest picture's codec noise and a good part of the way to speech
    thr = max(0.5, 4 * float(np.percentile(quiet, 95)), 0.25 * float(np.percentile(dev, 99)))
    decoded, network, misses = [], [], 0
    for s in onsets:
        t_leave = send_time_of_sample(mic.sent, s)
        if t_leave is None:
            misses += 1
            continue
        idx = np.flatnonzero((t > t_leave) & (dev > thr))
        if not len(idx) or t[idx[0]] - t_leave > 1.0:
            misses += 1
            continue
        j = idx[0]
        decoded.append(1000 * (t[j] - t_leave))
        first_packet = c.first_packet_time("video", frames[j][1])
        if first_packet is not None:
            network.append(1000 * (first_packet - t_leave))
    return {
        "onsets": len(onsets), "missed": misses, "threshold": thr,
        "client_decoded_ms": percentiles(decoded), "client_network_ms": percentiles(network),
        "server_ms": percentiles([1000 * x for x in server_onsets]),
        "pipeline_latency_ms": latency_ms, "session_stats": stats,
        "raw": {"client_decoded_ms": decoded, "client_network_ms": network,
                "server_ms": [1000 * x for x in server_onsets]},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onsets", type=int, default=40)
    ap.add_argument("--config", default="lite")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", default="balanced", help="the server's --latency level: low | balanced | safe")
    ap.add_argument("--backend", default="torch", help="the server's --backend (auto: ONNX Runtime on a CPU)")
    ap.add_argument("--threads", type=int, help="the server's inference threads (default: its own)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "glass_to_glass.json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ck, what = (a.checkpoint, str(a.checkpoint)) if a.checkpoint else default_checkpoint(Path(tmp), a.config)
        cfg = ServeConfig(checkpoint=ck, config=a.config, ice_hosts=("127.0.0.1",), latency=a.latency,
                          backend=a.backend, threads=a.threads)
        with ServerThread(cfg) as st:
            t0 = time.time()
            res = asyncio.run(run(st.url, st, a.onsets, a.seed))
            res.update({"model": what, "config": st.server.pipeline.cfg.name,
                        "image_size": st.server.pipeline.cfg.image_size,
                        "lookahead_ms": st.server.pipeline.cfg.lookahead_ms,
                        "lead_ms": 1000 * st.server.lead_s, "duration_s": time.time() - t0,
                        "latency_level": a.latency, "backend": a.backend, "threads": st.server.pipeline.threads,
                        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()}})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    def fmt(p):
        return f"p50 {p['p50']:.0f} ms, p95 {p['p95']:.0f} ms (n={p['n']})" if p.get("n") else "n=0"
    print(f"glass-to-glass ({res['config']} {res['image_size']}px, lookahead {res['lookahead_ms']} ms, "
          f"pipeline {res['pipeline_latency_ms']:.0f} ms; {res['model']})")
    print(f"  client, decoded frame : {fmt(res['client_decoded_ms'])}")
    print(f"  client, first packet  : {fmt(res['client_network_ms'])}")
    print(f"  server (DESIGN def.)  : {fmt(res['server_ms'])}")
    print(f"  missed onsets {res['missed']}/{res['onsets']}; load avg {res['machine']['load_avg']}; -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
