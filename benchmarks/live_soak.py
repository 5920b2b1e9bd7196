"""Soak of `marionette live` -> RTMP: N minutes (default 10) of speech from a file, streamed to a local
nginx-rtmp that records it, with the ingest killed and restarted once in the middle.

Reports (benchmarks/results/live_soak.json):
  fps          of the recordings (packets per second of stream time; missing ticks are repeated
               pictures, counted separately) and of the frames the session generated
  A/V offset   per utterance: the first frame whose mouth moves minus the utterance's onset in the
               decoded audio, both on the recording's own timestamps; the mean over the first and the
               last minute, and a fitted drift (ms per minute); plus the stream-timestamp offset
               (audio end vs video end) of each recording
  memory       RSS of the process every 5 s: at 1 minute, at the end, and the slope after minute 1
  recovery     seconds from the restarted ingest listening again to the stream flowing into it
               (and from the kill), and a second recording file that has the rest of the stream
  load         os.getloadavg() at start, every minute and at the end (the machine may be shared)

    .venv/bin/python benchmarks/live_soak.py [--minutes 10] [--restart-at 0.5] [--checkpoint DIR]

Needs nginx-light + libnginx-mod-rtmp (make system-deps) and espeak-ng.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streaming.fixtures import STATIC_HEAD, WORDS, default_checkpoint, espeak  # noqa: E402
from streaming.outputs_fixtures import NginxRtmp, envelope, nginx_rtmp_missing, onsets, read_recording  # noqa: E402

RATE = 48000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    return float("nan")


def speech_track(seconds: float, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """Words from the bank, one every ~2 s (1.2-2.8 s apart, silence between): int16 + onset times."""
    rng = np.random.default_rng(seed)
    bank = [espeak(w) for w in WORDS]
    out = [np.zeros(RATE, np.int16)]
    pos, starts = RATE, []
    while pos < seconds * RATE:
        w = bank[int(rng.integers(len(bank)))]
        starts.append(pos / RATE)
        gap = np.zeros(int(rng.uniform(1.2, 2.8) * RATE), np.int16)
        out += [w, gap]
        pos += len(w) + len(gap)
    return np.concatenate(out), starts


def click_offsets(rec: dict) -> list[tuple[float, float]]:
    """(stream time of the audio onset, mouth onset minus audio onset) for every utterance found.

    The mouth onset is where the mouth region, compared with its own picture just before the word (the
    median of the frames 0.5-0.12 s before the audio onset), first passes half of its change during
    the word. (A reference taken once per recording went wrong when a recording began mid-word: the
    second half of the first 10-minute run then read as 3 ms/min of "drift" that re-analysing the same
    files with this per-word reference does not show.)"""
    t, rms = envelope(rec["audio"], rec["audio_t0"])
    a_on = onsets(t, rms, 0.003, min_gap_s=0.8)
    m = np.stack(rec["frames"])
    fp = rec["frame_pts"]
    out = []
    for a in a_on:
        pre = (fp >= a - 0.5) & (fp < a - 0.12)
        win = (fp >= a - 0.2) & (fp <= a + 0.4)
        if pre.sum() < 3 or win.sum() < 5:
            continue
        dev = np.abs(m - np.median(m[pre], axis=0)).mean(axis=(1, 2, 3))
        base, peak = float(np.median(dev[pre])), float(dev[win].max())
        if peak - base < 2.0:  # the mouth did not visibly move (too short a word): no measurement
            continue
        hit = np.flatnonzero(win & (dev > base + 0.5 * (peak - base)))
        if len(hit):
            out.append((a, float(fp[hit[0]] - a)))
    return out


def analyse_recordings(paths) -> tuple[list[dict], dict | None]:
    """The recordings pulled back: per file its rate, steps, A/V stream-timestamp offsets at start and
    end; and the per-word mouth-onset offsets over all of them (mean, spread, drift)."""
    recordings, allclicks, t_base = [], [], 0.0
    for p in paths:
        p = Path(p)
        r = read_recording(p)
        vp, apts = r["video_pts"], r["audio_pts"]
        dur = float(vp[-1] - vp[0] + 0.04) if len(vp) else 0.0
        clicks = click_offsets(r) if len(r["frames"]) > 50 else []
        co = np.array([o for _, o in clicks]) * 1000
        recordings.append({
            "file": p.name, "video_packets": int(len(vp)), "duration_s": round(dur, 2),
            "fps": round((len(vp) - 1) / (vp[-1] - vp[0]), 3) if len(vp) > 1 else None,
            "frame_step_ms": sorted({round(float(x) * 1000, 1) for x in np.diff(vp)}) if len(vp) > 1 else [],
            "size": [r["width"], r["height"]],
            "av_ts_start_ms": round((vp[0] - apts[0]) * 1000 - 1024 / 48, 2) if len(apts) else None,
            "av_ts_end_ms": round(((apts[-1] + 1024 / 48000) - (vp[-1] + 0.04)) * 1000, 2) if len(apts) else None,
            "audio_s": round(len(apts) * 1024 / 48000, 2),
            "clicks": len(clicks),
            "clicks_mean_ms": round(float(co.mean()), 1) if len(co) else None,
            "clicks_drift_ms_per_min": round(float(np.polyfit([a / 60 for a, _ in clicks], co, 1)[0]), 2)
            if len(co) > 2 else None,
        })
        allclicks += [(t_base + a, o) for a, o in clicks]
        t_base += dur + 1.0
    if not allclicks:
        return recordings, None
    t = np.array([a for a, _ in allclicks])
    o = np.array([x for _, x in allclicks]) * 1000
    first, last = o[t <= t[0] + 60], o[t >= t[-1] - 60]
    slope = float(np.polyfit(t / 60, o, 1)[0]) if len(t) > 2 else None
    clicks = {
        "n": int(len(o)), "mean": round(float(o.mean()), 1), "p5": round(float(np.percentile(o, 5)), 1),
        "p95": round(float(np.percentile(o, 95)), 1), "max_abs": round(float(np.abs(o).max()), 1),
        "first_minute_mean": round(float(first.mean()), 1), "last_minute_mean": round(float(last.mean()), 1),
        "drift_ms_per_min": None if slope is None else round(slope, 2),
        "note": "per word: the mouth half-way into its movement minus the audio onset, on the recording's "
                "timestamps (the model's mouth takes this long to open: a content delay, constant, not a "
                "timing offset; the stream timestamps' A/V offset is av_ts_*); one onset is quantised to the "
                "40 ms frame (+-20 ms) and the 10 ms audio hop"}
    return recordings, clicks


async def soak(args, ckpt: Path, wav: Path, ng: NginxRtmp, report: dict) -> dict:
    from streaming.live import LiveConfig, run_live
    from streaming.outputs import OutputConfig
    from streaming.server import ServeConfig

    seconds = args.minutes * 60
    cfg = LiveConfig(audio_in=str(wav), outputs=(ng.url("soak"),), loop=True, keyboard=False, control=False,
                     initial_controls=STATIC_HEAD, duration_s=seconds + 30,
                     serve=ServeConfig(checkpoint=ckpt, config=args.config, backend=args.backend, port=0,
                                       threads=args.threads),
                     output=OutputConfig())
    stop = asyncio.Event()
    samples, loads = [], []

    async def during(h):
        out = h.outputs[0]
        t0 = time.monotonic()
        while out.frames_out == 0 and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.05)
        t0 = time.monotonic()
        report["started_streaming_after_s"] = round(t0 - report["t_launch"], 2)
        restart_at = args.restart_at * seconds
        restarted = False
        next_sample = next_load = 0.0
        while (el := time.monotonic() - t0) < seconds:
            if el >= next_sample:
                s = h.session
                samples.append({"t_s": round(el, 1), "rss_mb": round(rss_mb(), 1), "frames_sent": s.frames_sent,
                                "frames_dropped": s.frames_dropped, "out_frames": out.frames_out,
                                "out_repeated": out.frames_repeated, "out_dropped": out.frames_dropped})
                next_sample += 5.0
            if el >= next_load:
                loads.append({"t_s": round(el, 1), "loadavg": [round(x, 2) for x in os.getloadavg()]})
                next_load += 60.0
            if not restarted and el >= restart_at:
                restarted = True
                t_kill = time.monotonic()
                up = await asyncio.to_thread(ng.restart, args.down_s)
                n = out.connects
                while out.connects == n and time.monotonic() - up < 60:
                    await asyncio.sleep(0.01)
                back = time.monotonic()
                report["restart"] = {"at_s": round(t_kill - t0, 1), "down_s": args.down_s,
                                     "back_after_ingest_up_s": round(back - up, 3),
                                     "back_after_kill_s": round(back - t_kill, 3),
                                     "reconnect_s": list(out.reconnect_times)}
            await asyncio.sleep(0.2)
        stop.set()

    def ready(h):
        report["_task"] = asyncio.ensure_future(during(h))

    report["t_launch"] = time.monotonic()
    stats = await run_live(cfg, stop=stop, ready=ready)
    await report.pop("_task")
    report["samples"] = samples
    report["loadavg"] = loads + [{"t_s": "end", "loadavg": [round(x, 2) for x in os.getloadavg()]}]
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--restart-at", type=float, default=0.5, help="fraction of the run at which nginx is restarted")
    ap.add_argument("--down-s", type=float, default=1.0, help="how long the ingest stays down")
    ap.add_argument("--checkpoint", type=Path, help="default: the built-in one when installed, else the fixture")
    ap.add_argument("--config", default="lite")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "live_soak.json")
    ap.add_argument("--reanalyse", nargs="+", type=Path, metavar="FLV", help=(
        "recompute the recordings' figures of an earlier report (--out) from its kept recordings"))
    args = ap.parse_args()
    if args.reanalyse:
        report = json.loads(args.out.read_text())
        report["recordings"], clicks = analyse_recordings(sorted(args.reanalyse))
        report["av_offset_clicks_ms"] = clicks
        report["reanalysed"] = "recordings re-read with this version's analysis (per-word mouth reference)"
        args.out.write_text(json.dumps(report, indent=1, default=str))
        print(json.dumps({"recordings": report["recordings"], "av_offset_clicks_ms": clicks}, indent=1))
        return 0
    why = nginx_rtmp_missing()
    if why:
        print(f"live_soak: {why}", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tmp = Path(tempfile.mkdtemp(prefix="live_soak_"))
    ckpt, what = (args.checkpoint, str(args.checkpoint)) if args.checkpoint else default_checkpoint(tmp, args.config)
    audio, _ = speech_track(min(120.0, args.minutes * 60))  # looped by `live --loop`
    from scipy.io import wavfile

    wav = tmp / "speech.wav"
    wavfile.write(wav, RATE, audio)
    report: dict = {"minutes": args.minutes, "checkpoint": what, "backend": args.backend,
                    "input": f"{len(audio) / RATE:.1f} s of espeak-ng words (one every ~2 s), looped",
                    "cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "nice": os.nice(0)}
    with NginxRtmp(tmp / "nginx") as ng:
        stats = asyncio.run(soak(args, ckpt, wav, ng, report))
        time.sleep(0.5)
        recs = ng.recordings("soak")
    report.pop("t_launch", None)
    out = stats["outputs"][0]
    report["session"] = {k: stats.get(k) for k in ("frames_sent", "frames_dropped", "drops", "av_offset_mean_ms",
                                                   "av_offset_max_ms", "round_ms", "latency_ms")}
    report["output"] = {k: out[k] for k in ("connects", "frames_out", "frames_repeated", "frames_dropped",
                                            "audio_frames_out", "added_latency_ms", "reconnect_s", "last_error")}
    # the recordings, pulled back
    report["recordings"], clicks = analyse_recordings(recs)
    if clicks:
        report["av_offset_clicks_ms"] = clicks
    rss = [(s["t_s"], s["rss_mb"]) for s in report["samples"]]
    after = [(t, m) for t, m in rss if t >= 60]
    report["rss_mb"] = {"start": rss[0][1] if rss else None,
                        "at_1min": after[0][1] if after else None, "end": rss[-1][1] if rss else None,
                        "max": max(m for _, m in rss) if rss else None,
                        "slope_mb_per_min_after_1min": round(float(np.polyfit([t / 60 for t, _ in after],
                                                                              [m for _, m in after], 1)[0]), 3)
                        if len(after) > 2 else None}
    s0, s1 = report["samples"][0], report["samples"][-1]
    span = s1["t_s"] - s0["t_s"]
    report["fps"] = {"generated": round((s1["frames_sent"] - s0["frames_sent"]) / span, 2) if span else None,
                     "stream": round((s1["out_frames"] + s1["out_repeated"] - s0["out_frames"] - s0["out_repeated"])
                                     / span, 2) if span else None,
                     "repeated_share": round((s1["out_repeated"] - s0["out_repeated"]) /
                                             max(1, s1["out_frames"] + s1["out_repeated"] - s0["out_frames"]
                                                 - s0["out_repeated"]), 4)}
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    summary = {k: report.get(k) for k in ("fps", "av_offset_clicks_ms", "rss_mb", "restart", "loadavg_start",
                                          "loadavg_end")}
    print(json.dumps(summary, indent=1, default=str))
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
