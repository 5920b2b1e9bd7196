"""A/V offset of `marionette serve` over a long run (default 10 minutes), over 127.0.0.1.

A real aiortc client speaks short espeak-ng utterances separated by silence for the whole run and
receives the avatar. Two measurements, both reported per minute and as a drift (slope):

  content offset (what a viewer sees): for every utterance, the sender-clock time of the first
      received video frame whose mouth opens minus the sender-clock time of the first loud received
      audio sample. Sender-clock times come from the RTP timestamps through the RTCP sender reports
      (the NTP <-> RTP mapping a browser uses to line audio and video up), so receiver-side buffering
      does not enter. A frame shows the frame period of audio centred on its tick, so one onset is
      quantised to +-20 ms at 25 fps; the mean and the drift are what matter.
  send offset (the one-clock claim): for every video tick, the time the frame left the server's
      video track minus the time the audio playing at that instant left the audio track.

    .venv/bin/python benchmarks/av_offset.py [--minutes 10] [--config lite]
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

from streaming.client import AvatarClient, PcmSource  # noqa: E402
from streaming.fixtures import WORDS, ServerThread, default_checkpoint, espeak, mouth_region, percentiles  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402

STATIC = [{"type": "source", "factor": "pose", "from": "controls"},
          {"type": "source", "factor": "eye", "from": "controls"}]


async def run(url: str, server, minutes: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    bank = [espeak(w) for w in WORDS]
    video: list[tuple[float, int, float]] = []  # (decoded arrival, pts, mouth deviation)
    audio: list[tuple[float, int, int]] = []  # (arrival, pts, index of the first loud sample or -1)
    ref: dict = {"rest": []}

    def on_video(t, pts, arr):
        m = mouth_region(arr)
        if len(ref["rest"]) < 12:
            ref["rest"].append(m)
            if len(ref["rest"]) == 12:
                ref["median"] = np.median(np.stack(ref["rest"]), axis=0)
            return
        video.append((t, int(pts), float(np.abs(m - ref["median"]).mean())))

    def on_audio(t, pts, mono, rate):
        loud = np.flatnonzero(np.abs(mono) > 0.003)  # about where the server's voice gate starts (-50 dBFS)
        audio.append((t, int(pts), int(loud[0]) if len(loud) else -1))

    mic = PcmSource()
    c = AvatarClient(url, keep_frames=False, on_video=on_video, on_audio=on_audio)
    await c.connect(mic=mic, controls=STATIC)
    await c.wait_first_frame(30)
    await asyncio.sleep(1.5)
    t_start = time.monotonic()
    utterances = 0
    while time.monotonic() - t_start < minutes * 60:
        await asyncio.sleep(float(rng.uniform(0.8, 1.6)))
        x = bank[utterances % len(bank)]
        mic.append(x)
        utterances += 1
        await asyncio.sleep(len(x) / 48000 + 0.1)
    await asyncio.sleep(1.0)
    sess = server.server.sessions.get(c.session)
    send = list(sess.av_offsets) if sess else []
    stats = await c.request({"type": "stats"})
    await c.close()

    # ---- content offsets, utterance by utterance, on the sender's clock
    tv = np.array([v[0] for v in video])
    dev = np.array([v[2] for v in video])
    # "open": clearly above the rest picture's codec noise and a good part of the way to speech
    thr = max(0.5, 4 * float(np.percentile(dev[:20], 95)), 0.25 * float(np.percentile(dev, 99)))
    loud_audio = [(t, pts, i) for t, pts, i in audio if i >= 0]
    # onsets in the received audio: a loud frame after >= 0.5 s of quiet frames
    onsets = []
    last_loud = -1e9
    for t, pts, i in loud_audio:
        if t - last_loud > 0.5:
            onsets.append((t, pts + i))
        last_loud = t
    content = []
    for t_a, sample_pts in onsets:
        rtp_a = c.rtp_of("audio", sample_pts)
        ma = c.media_time("audio", rtp_a, 48000, at=t_a) if rtp_a is not None else None
        idx = np.flatnonzero((tv > t_a - 0.3) & (tv < t_a + 0.5) & (dev > thr))
        if ma is None or not len(idx):
            continue
        j = idx[0]
        rtp_v = c.rtp_of("video", video[j][1])
        mv = c.media_time("video", rtp_v, 90000, at=video[j][0])
        if mv is None:
            continue
        content.append((t_a - t_start, 1000 * (mv - ma)))
    content_arr = np.array(content) if content else np.zeros((0, 2))
    send_arr = np.array([(t - t_start, 1000 * o) for t, o in send]) if send else np.zeros((0, 2))

    def per_minute(arr):
        out = []
        for m in range(int(np.ceil(minutes))):
            sel = arr[(arr[:, 0] >= 60 * m) & (arr[:, 0] < 60 * (m + 1)), 1] if len(arr) else []
            if len(sel):
                out.append({"minute": m, "n": int(len(sel)), "mean_ms": float(np.mean(sel)),
                            "max_abs_ms": float(np.max(np.abs(sel)))})
        return out

    def drift(arr):
        if len(arr) < 3:
            return None
        slope = np.polyfit(arr[:, 0], arr[:, 1], 1)[0]
        return float(slope * 60)  # ms per minute

    return {
        "minutes": minutes, "utterances": utterances, "onsets_matched": int(len(content_arr)),
        "content_offset_ms": percentiles(content_arr[:, 1] if len(content_arr) else [], (5, 50, 95)),
        "content_drift_ms_per_min": drift(content_arr), "content_per_minute": per_minute(content_arr),
        "send_offset_ms": percentiles(send_arr[:, 1] if len(send_arr) else [], (1, 50, 99)),
        "send_max_abs_ms": float(np.max(np.abs(send_arr[:, 1]))) if len(send_arr) else None,
        "send_drift_ms_per_min": drift(send_arr), "send_per_minute": per_minute(send_arr),
        "session_stats": stats, "threshold": thr,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--config", default="lite")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "av_offset.json")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ck, what = (a.checkpoint, str(a.checkpoint)) if a.checkpoint else default_checkpoint(Path(tmp), a.config)
        cfg = ServeConfig(checkpoint=ck, config=a.config, ice_hosts=("127.0.0.1",))
        with ServerThread(cfg) as st:
            res = asyncio.run(run(st.url, st, a.minutes, a.seed))
            res.update({"model": what, "config": st.server.pipeline.cfg.name, "fps": cfg.fps,
                        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    co, so = res["content_offset_ms"], res["send_offset_ms"]
    print(f"A/V offset over {a.minutes:g} min ({res['config']}, {res['model']})")
    if co.get("n"):
        print(f"  content (mouth onset vs audio onset, sender clock): mean {co['mean']:+.1f} ms, "
              f"p5 {co['p5']:+.1f}, p95 {co['p95']:+.1f}, n={co['n']}; drift {res['content_drift_ms_per_min']:+.3f} ms/min")
    if so.get("n"):
        print(f"  send (video tick vs its audio leaving the tracks): mean {so['mean']:+.2f} ms, p1 {so['p1']:+.2f}, "
              f"p99 {so['p99']:+.2f}, max |{res['send_max_abs_ms']:.1f}| ms; drift {res['send_drift_ms_per_min']:+.4f} ms/min")
    print(f"  load avg {res['machine']['load_avg']} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
