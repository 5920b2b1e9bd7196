"""Soak of `marionette serve`: sessions that talk for hours, with A/V offset, frame rate, dropped ticks and the
server's RSS recorded per minute and plotted. Designed for 8 hours (--minutes 480); the JSON is rewritten
(atomically) every minute, so a run that is stopped early still leaves a valid record of what it measured.

Per minute and session:
  fps           frames the server sent per second, and video frames the client received (RTP timestamps)
  dropped       video ticks with no frame sent (the server's count: late, stall, flush)
  A/V offset    the server's: video send time minus the send time of the audio it shows (its mean over
                the session so far, and the last value sampled every 10 s); the receiver's: for frames
                that arrived in the minute, the median of (arrival - sender time from the RTCP sender
                reports) of video minus that of audio, which is how a browser lines the two up (a clock
                drift between the tracks grows it)
  audio         underrun and inserted-gap milliseconds (the server's counters)
  RSS           of the server process (also every 10 s), and the load average
At the end: the fitted drift of each A/V offset (ms per hour), the RSS slope after the first minutes
(MB per hour), and the lowest per-minute frame rate.

    .venv/bin/python benchmarks/soak.py [--minutes 480] [--sessions 1] [--model builtin|tiny]
                                        [--loss 0.0 --jitter-ms 0] [--out benchmarks/results/soak]
    .venv/bin/python benchmarks/soak.py --plot-only benchmarks/results/soak.json   # a run stopped early

Each client speaks espeak-ng sentences with pauses in a loop and counts video without decoding it (so the
client costs this machine little). --loss/--jitter-ms put each client behind a streaming.netem relay.
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

from streaming.fixtures import WORDS, ServeProcess, speech_with_pauses  # noqa: E402

RATE = 48000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _clean(o):
    """NaN -> null (strict JSON)."""
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def receiver_offset_ms(c, since: float) -> float | None:
    """Median (arrival - sender time) of video minus that of audio, for RTP timestamps first seen after `since`."""
    def delays(kind, rate):
        out = []
        for ts, t in list(c.rtp_arrival[kind].items()):
            if t >= since:
                m = c.media_time(kind, ts, rate)
                if m is not None:
                    out.append(t - m)
        return out

    v, a = delays("video", 90000), delays("audio", 48000)
    if len(v) < 10 or len(a) < 10:
        return None
    return (float(np.median(v)) - float(np.median(a))) * 1000


class Talker:
    """One client: speech in a loop, video counted, stats requested over the data channel."""

    def __init__(self, url: str, speech: np.ndarray, relay=None):
        from streaming.client import AvatarClient, PcmSource

        self.c = AvatarClient(url, keep_frames=False, decode_video=False)
        self.mic = PcmSource(speech)
        self.speech = speech
        self.queued_to = len(speech)
        self.relay = relay
        self.last = None  # (time, stats, frames seen)

    async def start(self) -> None:
        await self.c.connect(mic=self.mic, relay=self.relay)
        await self.c.wait_first_frame(30)

    def feed(self) -> None:
        if self.queued_to - self.mic.position < 10 * RATE:
            self.mic.append(self.speech)
            self.queued_to += len(self.speech)

    async def stats(self) -> dict:
        return await self.c.request({"type": "stats"}, timeout=10)

    def trim(self) -> None:
        self.c.received.audio.clear()
        self.c.received.video.clear()


def fit_per_hour(minutes, values, skip: float = 0.0) -> float | None:
    pts = [(m, v) for m, v in zip(minutes, values) if v is not None and m > skip]
    if len(pts) < 3:
        return None
    x, y = np.array(pts, float).T
    return float(np.polyfit(x, y, 1)[0] * 60)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[test]'): no plot")
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    rows = res["minutes"]
    for si in range(res["sessions"]):
        m = [r["minute"] for r in rows]
        ss = [r["per_session"][si] for r in rows]
        axes[0, 0].plot(m, [s["av_offset_server_ms"] for s in ss], ".-", label=f"server mean, s{si}")
        axes[0, 0].plot(m, [s["av_offset_receiver_ms"] for s in ss], "x--", label=f"receiver (RTCP), s{si}")
        axes[0, 1].plot(m, [s["fps_sent"] for s in ss], ".-", label=f"new frames sent, s{si}")
        axes[0, 1].plot(m, [s["fps_repeated"] for s in ss], "+:", label=f"repeats sent, s{si}")
        axes[0, 1].plot(m, [s["fps_received"] for s in ss], "x--", label=f"received, s{si}")
        axes[1, 0].plot(m, [s["dropped"] for s in ss], ".-", label=f"s{si}")
    tr = res["rss_trace"]
    axes[1, 1].plot([t / 60 for t, _ in tr], [r for _, r in tr], "-")
    axes[0, 0].set_title("A/V offset (ms)")
    axes[0, 1].set_title("frames per second")
    axes[1, 0].set_title("dropped ticks per minute")
    slope = res["summary"].get("rss_mb_per_hour")
    axes[1, 1].set_title("server RSS (MB)" + (f"; slope {slope:+.1f} MB/h" if slope is not None else ""))
    for ax in axes.flat:
        ax.set_xlabel("minute", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
        ax.legend(fontsize=7)
    loads = res["summary"].get("loadavg") or [float("nan")]
    fig.suptitle(f"soak: {len(rows)} min, {res['sessions']} session(s), {res['model']} model, loss {res['loss']}, "
                 f"jitter {res['jitter_ms']} ms; load average {min(loads):.1f}-{max(loads):.1f} on "
                 f"{res['cpus']} CPUs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


async def main_async(a) -> None:
    from streaming.ice import restrict_host_candidates
    from streaming.netem import Impairment, UdpRelay

    tmp = tempfile.TemporaryDirectory(prefix="soak-")
    args = ["--ice-host", "127.0.0.1", "--offer-rate", "off", "--max-sessions", str(max(8, a.sessions))]
    if a.model == "tiny":
        from streaming.fixtures import responsive_checkpoint

        ck = responsive_checkpoint(Path(tmp.name) / "tiny", "tiny")
        args += ["--checkpoint", str(ck), "--config", "tiny", "--backend", "torch", "--align", "off"]
    restrict_host_candidates(["127.0.0.1"])
    speech, _ = speech_with_pauses([" ".join(WORDS[i::3]) for i in range(3)], pause_s=1.0, lead_s=0.5, rate=RATE)
    out_json, out_png = a.out.with_suffix(".json"), a.out.with_suffix(".png")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with ServeProcess(args) as sp:
        relays, talkers = [], []
        for _ in range(a.sessions):
            relay = None
            if a.loss > 0 or a.jitter_ms > 0:
                relay = await UdpRelay.create(seed=len(relays))
                relay.set(Impairment(loss=a.loss, jitter_ms=a.jitter_ms))
                relays.append(relay)
            t = Talker(sp.url, speech, relay)
            await t.start()
            talkers.append(t)
        info = {"server_pid": sp.pid}
        print(f"soak: {a.sessions} session(s) on {sp.url} ({a.model}), {a.minutes} min", flush=True)
        t_start = time.monotonic()
        res = {"model": a.model, "sessions": a.sessions, "minutes_planned": a.minutes, "loss": a.loss,
               "jitter_ms": a.jitter_ms, "minutes": [], "rss_trace": [], "summary": {}, "cpus": os.cpu_count(),
               **info}
        prev = []
        for t in talkers:
            prev.append((time.monotonic(), await t.stats(), t.c.video_frames_seen))
        offsets_last: list[list[float]] = [[] for _ in talkers]
        minute = 0
        while minute < a.minutes:
            minute_end = t_start + (minute + 1) * a.interval_s
            while time.monotonic() < minute_end:
                await asyncio.sleep(min(10.0, max(0.0, minute_end - time.monotonic())))
                for t in talkers:
                    t.feed()
                res["rss_trace"].append((round(time.monotonic() - t_start, 1), round(rss_mb(sp.pid), 1)))
                for i, t in enumerate(talkers):
                    try:
                        st = await t.stats()
                        if st.get("av_offset_ms") is not None:
                            offsets_last[i].append(st["av_offset_ms"])
                    except Exception:  # noqa: BLE001 - a session that died is handled at the minute's end
                        pass
            minute += 1
            row = {"minute": minute, "rss_mb": round(rss_mb(sp.pid), 1), "loadavg": round(os.getloadavg()[0], 2),
                   "per_session": []}
            for i, t in enumerate(talkers):
                now = time.monotonic()
                try:
                    st = await t.stats()
                except Exception as e:  # noqa: BLE001 - the session died: record it, connect a new one
                    nan = float("nan")
                    row["per_session"].append({
                        "fps_sent": 0.0, "fps_repeated": 0.0, "fps_received": 0.0, "dropped": nan, "drops": {},
                        "av_offset_server_ms": nan, "av_offset_last_ms": nan, "av_offset_max_ms": nan,
                        "av_offset_receiver_ms": nan, "audio_underrun_ms": nan, "audio_gap_ms": nan, "closed": True,
                        "error": f"{type(e).__name__}: {e}"[:200]})
                    print(f"session {i} lost ({type(e).__name__}: {e}); reconnecting", flush=True)
                    res["reconnects"] = res.get("reconnects", 0) + 1
                    try:
                        await t.c.close()
                    except Exception:  # noqa: BLE001
                        pass
                    t = talkers[i] = Talker(sp.url, speech, t.relay)
                    await t.start()
                    prev[i] = (time.monotonic(), await t.stats(), t.c.video_frames_seen)
                    offsets_last[i] = []
                    continue
                seen = t.c.video_frames_seen
                t0, st0, seen0 = prev[i]
                dt = now - t0
                row["per_session"].append({
                    "fps_sent": round((st["frames_sent"] - st0["frames_sent"]) / dt, 2),
                    # a dropped tick may go out as a repeat of the last picture (where the server makes them)
                    "fps_repeated": round((st.get("frames_repeated", 0) - st0.get("frames_repeated", 0)) / dt, 2),
                    "fps_received": round((seen - seen0) / dt, 2),
                    "dropped": st["frames_dropped"] - st0["frames_dropped"],
                    "drops": st["drops"],
                    "av_offset_server_ms": st["av_offset_mean_ms"],
                    "av_offset_last_ms": round(float(np.mean(offsets_last[i])), 2) if offsets_last[i] else None,
                    "av_offset_max_ms": st["av_offset_max_ms"],
                    "av_offset_receiver_ms": None if (r := receiver_offset_ms(t.c, t0)) is None else round(r, 2),
                    "audio_underrun_ms": st["audio_underrun_ms"], "audio_gap_ms": st["audio_gap_ms"],
                    "closed": t.c.pc.connectionState != "connected",
                })
                prev[i] = (now, st, seen)
                offsets_last[i] = []
                t.trim()
            res["minutes"].append(row)
            ps = row["per_session"]
            print(f"min {minute:4d}  fps sent {min(p['fps_sent'] for p in ps):.1f}  received "
                  f"{min(p['fps_received'] for p in ps):.1f}  dropped {sum(p['dropped'] for p in ps):.0f}  "
                  f"A/V server {ps[0]['av_offset_server_ms']} ms receiver {ps[0]['av_offset_receiver_ms']} ms  "
                  f"RSS {row['rss_mb']} MB  load {row['loadavg']}", flush=True)
            summarise(res)
            write_atomic(out_json, json.dumps(_clean(res), indent=1))
        for t in talkers:
            await t.c.close()
        for r in relays:
            r.close()
        res["server_log_tail"] = sp.log()[-2000:]
    summarise(res)
    write_atomic(out_json, json.dumps(_clean(res), indent=1))
    plot(res, out_png)
    print(json.dumps(res["summary"], indent=1))
    print(f"wrote {out_json} and {out_png}")


def summarise(res: dict) -> None:
    rows = res["minutes"]
    if not rows:
        return
    m = [r["minute"] for r in rows]
    s = {"minutes_run": len(rows)}
    skip = 2 if len(rows) > 5 else 0
    for i in range(res["sessions"]):
        ss = [r["per_session"][i] for r in rows]
        s[f"s{i}_fps_sent_min"] = min(x["fps_sent"] for x in ss)
        s[f"s{i}_fps_received_min"] = min(x["fps_received"] for x in ss)
        s[f"s{i}_fps_repeated_max"] = max(x["fps_repeated"] for x in ss)
        s[f"s{i}_dropped_total"] = sum(x["dropped"] for x in ss if x["dropped"] == x["dropped"])  # (not nan)
        s[f"s{i}_av_offset_server_ms_last"] = ss[-1]["av_offset_server_ms"]
        s[f"s{i}_av_offset_receiver_drift_ms_per_hour"] = fit_per_hour(m, [_num(x["av_offset_receiver_ms"]) for x in ss])
        s[f"s{i}_av_offset_last_drift_ms_per_hour"] = fit_per_hour(m, [_num(x["av_offset_last_ms"]) for x in ss])
    tr = res["rss_trace"]
    s["rss_mb_first"], s["rss_mb_last"] = (tr[0][1], tr[-1][1]) if tr else (None, None)
    s["rss_mb_per_hour"] = fit_per_hour([t / 60 for t, _ in tr], [r for _, r in tr], skip=skip)
    s["loadavg"] = [r["loadavg"] for r in rows]
    s["reconnects"] = res.get("reconnects", 0)
    res["summary"] = s


def _num(v):
    return None if v is None or v != v else v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=int, default=480)
    p.add_argument("--interval-s", type=float, default=60.0, help="one row per this many seconds (a 'minute')")
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--model", choices=["builtin", "tiny"], default="builtin")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss through a netem relay (0..1)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak")
    p.add_argument("--plot-only", type=Path, metavar="JSON", help=(
        "summarise and plot a record already written (a run stopped early has its JSON but no plot)"))
    a = p.parse_args()
    if a.plot_only is not None:
        res = json.loads(a.plot_only.read_text())
        summarise(res)
        write_atomic(a.plot_only, json.dumps(_clean(res), indent=1))
        plot(res, a.plot_only.with_suffix(".png"))
        print(json.dumps(res["summary"], indent=1))
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
