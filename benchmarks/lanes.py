"""Lanes (streaming.scheduler): what two bodies in flight, each on a one-thread ONNX Runtime call, buy on this CPU.

Two measurements, the built-in model, ONNX Runtime:
  raw     frames/s of the whole two-phase frame (body + mouth) from one caller with `--threads` inference threads,
          and from `--lanes` callers at once with one thread each (nothing else running);
  served  `marionette serve` in-process with --lanes 1 and with --lanes N, one real aiortc peer speaking real
          recorded speech (pocketsphinx-testdata) for --seconds: pictures per second with a body made for
          their tick in time, bodies shown per second (lanes: on time, or done late and shown by the next tick),
          mouth-only pictures per second (lanes: a body already shown, the tick's own mouth phase), ticks skipped
          (sent as repeats), the pipeline latency and the A/V offset the client saw.
          The client runs in this process, on the same cores: a loaded figure, like a real one-machine test.

    python benchmarks/lanes.py                      # writes benchmarks/results/lanes.json

Each figure comes with the machine's load average before and after it.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REAL_SPEECH = "/usr/share/pocketsphinx/test/data/librivox/*.wav"


def raw(threads: int, lanes: int, frames: int) -> dict:
    import torch

    from engine.checkpoint import builtin_checkpoint_dir
    from engine.runtimes.backend import open_backend

    out = {"load_before": os.getloadavg()[0]}
    for callers, n_threads in ((1, threads), (lanes, 1)):
        torch.set_num_threads(n_threads)
        be = open_backend("onnxruntime", checkpoint=Path(builtin_checkpoint_dir()), config="talk", threads=n_threads)
        s = be.cfg.image_size
        av = be.prepare_avatar(torch.rand(1, 3, s, s))
        z = torch.zeros(1, be.cfg.latents.total)
        for _ in range(3):
            be.generate_mouth(be.generate_body(av, z), av, z)

        def work():
            for _ in range(frames):
                be.generate_mouth(be.generate_body(av, z), av, z)

        t0 = time.perf_counter()
        ts = [threading.Thread(target=work) for _ in range(callers)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        dt = time.perf_counter() - t0
        out[f"{callers}x{n_threads}thread"] = {"frames_per_s": round(callers * frames / dt, 2),
                                               "ms_per_frame": round(1000 * dt / (callers * frames), 2)}
    out["load_after"] = os.getloadavg()[0]
    return out


def served(lanes: int, seconds: float) -> dict:
    from engine.audio import load_audio
    from engine.checkpoint import builtin_checkpoint_dir
    from streaming.fixtures import STATIC_HEAD, ServerThread, run_session
    from streaming.server import ServeConfig

    wavs = sorted(glob.glob(REAL_SPEECH))
    if not wavs:
        raise SystemExit(f"no real speech at {REAL_SPEECH}: `make system-deps` installs pocketsphinx-testdata")
    speech = np.concatenate([(load_audio(w, 48000) * 32767).astype(np.int16) for w in wavs[:3]])
    speech = speech[: int(48000 * seconds)]
    cfg = ServeConfig(checkpoint=builtin_checkpoint_dir(), config="talk", backend="onnxruntime",
                      ice_hosts=("127.0.0.1",), max_sessions=2, lanes=lanes)
    load0 = os.getloadavg()[0]
    with ServerThread(cfg) as st:
        srv, sch = st.server, st.server.scheduler
        r0, k0, m0, b0 = sch.rounds, sch.skipped_ticks, sch.mouth_only_ticks, sch.bodies_shown
        t0 = time.monotonic()
        r = asyncio.run(run_session(st.url, speech, seconds, controls=list(STATIC_HEAD)))
        dt = time.monotonic() - t0
        s = r["stats"]
        out = {"lanes": srv.lanes, "threads": srv.pipeline.threads,
               "phase_ms_alone": [round(1000 * x, 1) for x in srv.pipeline.phase_times.get(1, ())],
               "pictures_per_s": round((sch.rounds - r0) / dt, 2),
               "bodies_shown_per_s": round((sch.bodies_shown - b0) / dt, 2) if srv.lanes > 1 else None,
               "mouth_only_per_s": round((sch.mouth_only_ticks - m0) / dt, 2),
               "skipped_ticks_per_s": round((sch.skipped_ticks - k0) / dt, 2),
               "est_body_ms": round(1000 * sch.est_body, 1), "est_mouth_ms": round(1000 * sch.est_mouth, 1),
               "latency_ms": s.get("latency_ms"), "av_offset_mean_ms": s.get("av_offset_mean_ms"),
               "av_offset_max_ms": s.get("av_offset_max_ms"), "onset_latency_ms": s.get("onset_latency_ms"),
               "client_frames_per_s": round(len(r["t"]) / dt, 2), "errors": sch.errors}
    out["load_before"], out["load_after"] = load0, os.getloadavg()[0]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="one caller's threads (the default serve)")
    p.add_argument("--lanes", type=int, default=2)
    p.add_argument("--frames", type=int, default=30, help="frames per caller in the raw measurement")
    p.add_argument("--seconds", type=float, default=20.0, help="length of each served session")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "lanes.json")
    a = p.parse_args()
    res = {"machine": {"cpus": os.cpu_count()}, "raw": raw(a.threads, a.lanes, a.frames),
           "served": [served(1, a.seconds), served(a.lanes, a.seconds)]}
    r1, r2 = res["served"]
    # bodies shown per second: with lanes a body done late is still shown (by the next tick); with one lane every
    # body is on time or not made
    shown2 = r2["bodies_shown_per_s"] if r2.get("bodies_shown_per_s") is not None else r2["pictures_per_s"]
    res["served_ratio_pictures"] = round(shown2 / max(r1["pictures_per_s"], 1e-9), 2)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
