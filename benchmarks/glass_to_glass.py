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
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streaming.client import AvatarClient, PcmSource  # noqa: E402
from streaming.fixtures import (WORDS, ServerThread, default_checkpoint, espeak, mouth_region,  # noqa: E402
                                percentiles, send_time_of_sample)
from streaming.metrics import histogram_delta  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402

STATIC = [{"type": "source", "factor": "pose", "from": "controls"},
          {"type": "source", "factor": "eye", "from": "controls"}]


class ServerTap:
    """Sees each video frame as it leaves the server's track: tick -> (monotonic time, mouth region)."""

    def __init__(self):
        self.video: dict[int, tuple[float, np.ndarray]] = {}
        self.audio: dict[int, float] = {}  # audio frame j (20 ms) -> when the track handed it out

    def on_video(self, k, frame):
        self.video[k] = (time.monotonic(), mouth_region(frame.to_ndarray(format="rgb24")))

    def on_audio(self, j, frame):
        self.audio[j] = time.monotonic()

    async def aclose(self):
        pass


def _best_shift(delays_for, shifts) -> int:
    """The shift under which the received-minus-sent delays are smallest without being negative (a packet
    is never received before it is sent). A receiver's timestamps count from the first packet it got, so
    when the first packets of a stream were lost, timestamp 0 is not the server's first frame."""
    best, best_med = 0, np.inf
    for d in shifts:
        dl = delays_for(d)
        if len(dl) >= 10:
            med = float(np.median(dl))
            if -0.002 <= med < best_med:
                best, best_med = d, med
    return best


def video_shift(client, tap, k0, per_frame: int) -> int:
    """Ticks to add to k0 + pts / per_frame (90 kHz units a frame: 3600 at 25 fps) to get the server's tick of a
    frame the client received."""
    rx = client.received.video
    return _best_shift(lambda d: [t - tap.video[k][0] for t, pts, _ in rx
                                  if (k := k0 + int(round(pts / per_frame)) + d) in tap.video], range(-2, 10))


def audio_shift(client, tap, j0) -> int:
    """Samples (whole 5 ms packets) to add to a received audio pts to get the server's stream sample."""
    rx = client.received.audio

    def delays(d):
        out = []
        for t, pts, _ in rx:
            j, o = divmod(int(pts) + d, 960)
            if j0 + j in tap.audio:
                out.append(t - tap.audio[j0 + j] - o / 48000)
        return out
    return _best_shift(delays, range(-4 * 240, 40 * 240, 240))

    async def aclose(self):
        pass


def stage_split(onsets_leave, frames, thr, client, sess, tap, period) -> dict:
    """Per speech onset, where the milliseconds between the client sending it and its decoded frame go.

    Every term is measured, on this process's one monotonic clock (client and server share it):
      uplink      the onset packet leaving the client -> its audio in the server's buffer (network, the
                  server's inbound jitter buffer, Opus decode, resampling)
      hold        -> the tick whose frame is the first to open the lips is due (half a frame, lookahead,
                  mel overhang, arrival margin and scheduler lead: the server's designed latency)
      content     -> the tick of the first frame the client sees open past the threshold (the mouth's
                  ramp: frames the model takes to open visibly)
      pacing      that tick due -> its frame handed to the encoder
      encode      -> encoded (the sender's encoder, as timed on the server)
      network     encoded -> the frame's first RTP packet at the client (packetisation, loopback)
      jitter      first packet -> the decoded frame out of the client's receiver (aiortc holds a frame
                  until the next frame's first packet: one frame period)
    """
    t0 = sess.clock.t0
    k0 = sess.video_track.k0
    dk = video_shift(client, tap, k0, int(round(90000 * period)))
    events = [(a + t0, k, snt + t0) for a, k, snt in sess.onset_events]
    rows = []
    for t_leave in onsets_leave:
        cand = [e for e in events if t_leave - 0.005 <= e[0] <= t_leave + 0.3]
        idx = [i for i, f in enumerate(frames) if f[0] > t_leave and f[2] > thr]
        if not cand or not idx or frames[idx[0]][0] - t_leave > 1.0:
            continue
        arrived, k_gate, _sent_gate = cand[0]
        t_dec, pts, _ = frames[idx[0]]
        k_cli = k0 + int(round(pts / (90000 * period))) + dk
        if k_cli not in tap.video:
            continue
        sent = tap.video[k_cli][0]
        first = client.first_packet_time("video", pts)
        due = t0 + sess.clock.video_time(k_cli)
        due_gate = t0 + sess.clock.video_time(k_gate)
        row = {"uplink": arrived - t_leave, "hold": due_gate - arrived, "content": due - due_gate,
               "pacing": sent - due}
        if first is not None:
            row["send_to_first_packet"] = first - sent
            row["jitter"] = t_dec - first
        row["total"] = t_dec - t_leave
        rows.append({key: 1000 * v for key, v in row.items()})
    out = {key: percentiles([r[key] for r in rows if key in r])
           for key in ("uplink", "hold", "content", "pacing", "send_to_first_packet", "jitter", "total")}
    enc_ms = [1000 * x for x in sess.encode_times]
    out["encode (in send_to_first_packet)"] = percentiles(enc_ms)
    out["content_frames"] = percentiles([r["content"] / (1000 * period) for r in rows])
    return out


def client_av_offset(client, sess, tap) -> dict:
    """Audio vs video at the client: each decoded frame's delay behind its media time (the server's
    one clock: video tick k and audio frame j), video minus the audio playing the same instant.
    Positive: the picture arrives after its sound."""
    t0 = sess.clock.t0
    k0, j0 = sess.video_track.k0, sess.audio_track.j0
    if k0 is None or j0 is None:
        return {"n": 0}
    per_frame = 90000 // sess.clock.fps
    dk, da = video_shift(client, tap, k0, per_frame), audio_shift(client, tap, j0)
    adelay = {}
    for t, pts, _rms in client.received.audio:
        j, o = divmod(int(pts) + da, 960)
        if o == 0:  # the packet that starts audio frame j: it plays at audio_time(j)
            adelay[j0 + j] = t - (t0 + sess.clock.audio_time(j0 + j))
    offs = []
    for t, pts, _ in client.received.video:
        k = k0 + int(round(pts / per_frame)) + dk
        media = t0 + sess.clock.video_time(k)
        j = sess.clock.audio_frame_at(sess.clock.video_time(k))
        if j in adelay:
            offs.append(1000 * ((t - media) - adelay[j]))
    res = percentiles(offs, (5, 50, 95))
    if offs:
        res["max_abs"] = float(np.max(np.abs(offs)))
    vd = [1000 * (t - (t0 + sess.clock.video_time(k0 + int(round(pts / per_frame)) + dk)))
          for t, pts, _ in client.received.video]
    res["video_delay_ms"] = percentiles(vd)
    res["audio_delay_ms"] = percentiles([1000 * v for v in adelay.values()])
    res["receiver_timestamp_shift"] = {"video_ticks": dk, "audio_samples": da}
    return res


def client_av_offset_sr(client) -> dict:
    """Audio vs video at the client without the server's internals (its own process): each decoded frame's
    delay behind its RTP timestamp's instant on the sender's clock, through the RTCP sender reports (what a
    browser lines audio and video up with), minus the same delay of the audio playing at that instant. The
    sender reports map a timestamp to when it was *sent*, so a frame sent late within the server's pacing
    grace counts here as on time: the in-process run (`--server thread`) measures against the media clock."""
    epoch_minus_mono = time.time() - time.monotonic()
    aud = []
    for t, pts, _rms in client.received.audio:
        m = client.media_time("audio", client.rtp_of("audio", pts), 48000, at=t)
        if m is not None:
            aud.append((m, t + epoch_minus_mono - m))
    if len(aud) < 10:
        return {"n": 0}
    aud.sort()
    am = np.array([a[0] for a in aud])
    ad = np.array([a[1] for a in aud])
    offs, vd = [], []
    for t, pts, _ in client.received.video:
        m = client.media_time("video", client.rtp_of("video", pts), 90000, at=t)
        if m is None:
            continue
        d = t + epoch_minus_mono - m
        vd.append(1000 * d)
        i = int(np.searchsorted(am, m, side="right")) - 1
        if 0 <= i and m - am[i] < 0.025:  # the audio packet playing at the frame's instant
            offs.append(1000 * (d - ad[i]))
    res = percentiles(offs, (5, 50, 95))
    if offs:
        res["max_abs"] = float(np.max(np.abs(offs)))
    res["video_delay_ms"] = percentiles(vd)
    res["audio_delay_ms"] = percentiles(1000 * ad)
    res["method"] = "RTCP sender reports (send times)"
    return res


class ServeProcess:
    """`python -m marionette serve` in a process of its own, on a free loopback port: what a user runs and
    what a hidden client would talk to. `with ServeProcess(args) as url:`."""

    def __init__(self, args: list[str], log: Path):
        self.args, self.log = args, log
        self.proc = None

    def __enter__(self) -> str:
        import subprocess

        from capacity import free_port, wait_healthy

        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "marionette", "serve", "--host", "127.0.0.1",
                                      "--port", str(port), "--ice-host", "127.0.0.1", *self.args],
                                     cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, self.proc, timeout=600.0)  # the first run exports the model to ONNX (~1-2 min)
        except SystemExit:
            self.__exit__(None, None, None)
            print(Path(self.log).read_text()[-3000:], file=sys.stderr)
            raise
        return url

    def __exit__(self, *exc) -> None:
        import signal
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


CLOSED_LIPS = ("m", "b", "p", "w", "f", "v")  # espeak phonemes said with the lips shut, pressed or nearly shut


def closed_lips_onset(text: str) -> bool:
    """Whether `text` begins with a sound made with closed (or nearly closed) lips: /m b p w f v/. A mouth
    that follows such speech stays shut through that sound (~50-120 ms), which the latency figure then
    includes; the benchmark reports those onsets apart."""
    from trainer.corpus.speech import synthesize

    first = next((ph.name for ph in synthesize(text, rate=160).phonemes if not ph.is_pause), "")
    return first in CLOSED_LIPS


class Utterance(NamedTuple):
    """One thing the client says after a silence: int16 samples at 48 kHz, the index of its onset, and its first
    word when known (to tell words that begin with shut lips apart)."""
    samples: np.ndarray
    onset: int
    first_word: str | None
    name: str


# Real human speech on this machine besides real_speech_files()' WAVs (Debian's pocketsphinx-testdata): raw 16 kHz
# int16 utterances, with the first word where the package's grammars say what is spoken
HUMAN_RAW = {"goforward.raw": "go", "numbers.raw": None, "something.raw": None, "tidigits/dhd.2934z.raw": None}


def _transcribed_first_words(d: Path) -> dict[str, str]:
    """{file stem: first word} from the package's transcriptions ("<s> ten of clubs </s> (001)")."""
    out = {}
    for t in [d / "librivox" / "transcription", d / "cards" / "cards.transcription"]:
        if t.is_file():
            for line in t.read_text().splitlines():
                words = [w for w in line.split() if w not in ("<s>", "</s>")]
                if len(words) >= 2 and words[-1].startswith("("):
                    out[words[-1].strip("()")] = words[0]
    return out


def phrase_onsets(x: np.ndarray, rate: int = 16000, min_pause_s: float = 0.15) -> list[int]:
    """Where speech begins after a pause in a recording with room noise, as sample indices.

    Levels in 10 ms hops, judged against the recording's own floor (5th percentile) and top (95th): a phrase
    starts at a hop louder than max(floor + 15 dB, top - 30 dB) after >= `min_pause_s` of hops under the floor
    + 40 % of that gap (the recording's start counts as a pause if it has 50 ms of it). The onset is then moved
    back, 2.5 ms at a time, to the first sound above floor + 6 dB: the earliest point a listener's meter would
    call speech, so the latency measured from it is not flattered."""
    hop, fine = rate // 100, rate // 400
    n = len(x) // hop
    if n < 10:
        return []
    x = np.asarray(x, np.float64)
    db = 10 * np.log10((x[:n * hop].reshape(n, hop) ** 2).mean(1) + 1e-12)
    floor, top = np.percentile(db, 5), np.percentile(db, 95)
    on = max(floor + 15, top - 30)
    off = floor + 0.4 * (on - floor)
    need = int(round(min_pause_s * 100))
    out, quiet = [], need
    for i in range(n):
        if db[i] < off:
            quiet += 1
        elif db[i] > on:
            if quiet >= need and i >= 5:
                j = i * hop
                lo = max(0, j - (quiet + 1) * hop)
                while j - fine >= lo and 10 * np.log10((x[j - fine:j] ** 2).mean() + 1e-12) > floor + 6:
                    j -= fine
                out.append(j)
            quiet = 0
    return out


def human_utterances(max_s: float = 1.5) -> list[Utterance]:
    """Real human speech cut at its phrase onsets (several speakers: LibriVox readings, CMU test utterances),
    each from 60 ms before its onset (faded in from the room noise) to its end or `max_s` after the onset,
    resampled to 48 kHz; empty where the package is not installed."""
    from engine.audio import load_audio, resample
    from trainer.evaluate import REAL_SPEECH_DIR, real_speech_files

    d = REAL_SPEECH_DIR
    firsts = _transcribed_first_words(d)
    src = [(f.stem, load_audio(f), firsts.get(f.stem)) for f in real_speech_files()]
    src += [(Path(r).stem, np.fromfile(d / r, "<i2").astype(np.float32) / 32768, w)
            for r, w in HUMAN_RAW.items() if (d / r).is_file()]
    out = []
    for stem, x, first in src:
        ons = phrase_onsets(x)
        for k, j in enumerate(ons):
            pre, end = int(0.06 * 16000), min(len(x), j + int(max_s * 16000))
            seg = np.array(x[max(0, j - pre): end], np.float64)
            lead = j - max(0, j - pre)
            seg[:lead] *= np.linspace(0, 1, lead, endpoint=False)
            fade = min(480, len(seg) // 4)
            seg[len(seg) - fade:] *= np.linspace(1, 0, fade)
            y = np.clip(resample(seg.astype(np.float32), 16000, 48000), -1, 1)
            out.append(Utterance((y * 32767).astype(np.int16), lead * 3, first if k == 0 else None, f"{stem}@{j / 16000:.2f}s"))
    return out


def espeak_utterances() -> list[Utterance]:
    """espeak-ng saying the WORDS list (its onset: the first sample above 0.3 % of full scale)."""
    out = []
    for w in WORDS:
        x = espeak(w)
        out.append(Utterance(x, int(np.flatnonzero(np.abs(x.astype(np.int32)) > 0.003 * 32767)[0]), w.split()[0], w))
    return out


def speech_bank(kind: str) -> list[Utterance]:
    """"human" (recordings of real speakers, the default where they are installed) or "espeak"."""
    if kind == "human":
        bank = human_utterances()
        if not bank:
            raise SystemExit("--speech human: no recordings of real speech here (apt-get install "
                             "pocketsphinx-testdata), or use --speech espeak")
        return bank
    return espeak_utterances()


async def run(url: str, server, n_onsets: int, seed: int, audio_prefetch: int | None = 0,
              n_interrupts: int = 5, trace: bool = False, speech: str = "human") -> dict:
    rng = np.random.default_rng(seed)
    bank = speech_bank(speech)
    regions: list[tuple[float, int, np.ndarray]] = []  # (decoded arrival, pts, mouth region at 1/4 size)

    def on_video(t, pts, arr):
        regions.append((t, pts, mouth_region(arr)[::4, ::4]))

    mic = PcmSource()
    c = AvatarClient(url, keep_frames=False, on_video=on_video, audio_prefetch=audio_prefetch)
    await c.connect(mic=mic, controls=STATIC)
    await c.wait_first_frame(30)
    sess = server.server.sessions.get(c.session) if server is not None else None  # None: a server process
    tap = ServerTap()
    if sess is not None:
        sess.taps.append(tap)
    await asyncio.sleep(1.5)
    onsets = []
    for i in range(n_onsets):
        await asyncio.sleep(float(rng.uniform(0.9, 1.5)))  # silence (the mic sends zeros when idle)
        u = bank[i % len(bank)]
        start = mic.append(u.samples)
        onsets.append(start + u.onset)
        await asyncio.sleep(len(u.samples) / 48000 + 0.1)
    # interrupts: a long utterance, cut off 0.8 s in (the client sends {"type": "interrupt"})
    long_speech = espeak("Aaah I am speaking for a long time without stopping and you may interrupt me now aaah",
                         wpm=140)
    interrupts = []
    for i in range(n_interrupts):
        await asyncio.sleep(float(rng.uniform(0.9, 1.5)))
        mic.append(long_speech)
        await asyncio.sleep(0.8)
        mic.clear()  # the speaker stops; what the server holds is what the interrupt must flush
        t_int = time.monotonic()
        await c.request({"type": "interrupt", "until_sample": mic.position})
        interrupts.append(t_int)
        await asyncio.sleep(len(long_speech) / 48000 - 0.8 + 0.3)
    await asyncio.sleep(1.0)
    server_onsets = list(sess.onset_latencies) if sess else []
    stats = await c.request({"type": "stats"})
    latency_ms = sess.latency_s * 1000 if sess else stats.get("latency_ms")
    await c.close()

    # the mouth at rest: the frames of the 0.6 s before the first onset (the head has settled into the
    # static pose by then); every frame's deviation from it
    t = np.array([f[0] for f in regions])
    first = send_time_of_sample(mic.sent, onsets[0]) if onsets else None
    settled = (t > first - 0.7) & (t < first - 0.1) if first is not None else np.arange(len(t)) < 12
    rest = np.median(np.stack([regions[i][2] for i in np.flatnonzero(settled)]), axis=0)
    dev = np.array([float(np.abs(r - rest).mean()) for _, _, r in regions])
    frames = [(tt, pts, d) for (tt, pts, _), d in zip(regions, dev)]
    quiet = dev[settled]
    # "open": clearly above the rest picture's codec noise and a good part of the way to speech
    # "moves": clearly above codec noise (mean |difference| of 1.5 grey levels at least: 0.5 was crossed by
    # noise alone); "open": a quarter of the way to the mouth's 99th-percentile deviation
    thr_move = max(1.5, 4 * float(np.percentile(quiet, 95)))
    thr = max(thr_move, 0.25 * float(np.percentile(dev, 99)))
    moved = []
    for s in onsets:  # the weaker criterion: the mouth starts to move (clearly above codec noise)
        t_leave = send_time_of_sample(mic.sent, s)
        idx = np.flatnonzero((t > (t_leave or np.inf)) & (dev > thr_move))
        if t_leave is not None and len(idx) and t[idx[0]] - t_leave <= 1.0:
            moved.append(1000 * (t[idx[0]] - t_leave))
    decoded, network, misses, leaves = [], [], 0, []
    by_onset: dict[str, list[float]] = {"open_mouth_onset": [], "closed_lips_onset": [], "unknown_first_sound": []}
    shut_first = {u.first_word: closed_lips_onset(u.first_word) for u in bank if u.first_word}
    per_utterance: dict[str, list[float]] = {}
    for i, s in enumerate(onsets):
        t_leave = send_time_of_sample(mic.sent, s)
        if t_leave is None:
            misses += 1
            continue
        idx = np.flatnonzero((t > t_leave) & (dev > thr))
        if not len(idx) or t[idx[0]] - t_leave > 1.0:
            misses += 1
            continue
        leaves.append(t_leave)
        j = idx[0]
        decoded.append(1000 * (t[j] - t_leave))
        u = bank[i % len(bank)]
        kind = "unknown_first_sound" if not u.first_word else \
            "closed_lips_onset" if shut_first[u.first_word] else "open_mouth_onset"
        by_onset[kind].append(decoded[-1])
        per_utterance.setdefault(u.name, []).append(round(decoded[-1], 1))
        first_packet = c.first_packet_time("video", frames[j][1])
        if first_packet is not None:
            network.append(1000 * (first_packet - t_leave))
    # interrupt -> the first decoded frame from which the mouth stays shut (below the "open" threshold) for
    # 300 ms: a mouth that shuts and then reopens on the cut-off speech's tail is not shut yet. ("At rest",
    # below the "moves" threshold, is not the criterion: the rest picture after speech sits at that threshold.)
    cut = []
    for t_int in interrupts:
        after = np.flatnonzero((t > t_int) & (t < t_int + 1.3))
        talking = np.flatnonzero((t > t_int - 0.3) & (t < t_int) & (dev > thr_move))
        if not len(talking):
            continue
        for j in after:
            if t[j] - t_int >= 1.0:
                break
            hold = (t >= t[j]) & (t < t[j] + 0.3)
            if (dev[hold] < thr).all():
                cut.append(1000 * (t[j] - t_int))
                break
    period = 1.0 / (server.server.fps if server is not None else stats.get("target_fps", 25))
    extra = {"trace": {"t": t.tolist(), "pts": [f[1] for f in regions], "dev": dev.tolist(), "interrupts": interrupts,
                       "onsets_leave": [send_time_of_sample(mic.sent, s) for s in onsets]}} if trace else {}
    return {**extra,
        "interrupt_to_decoded_shut_ms": percentiles(cut), "interrupts": len(interrupts),
        "interrupt_server_ms": stats.get("interrupt_latency_ms"),
        "onsets": len(onsets), "missed": misses, "threshold": thr, "threshold_move": thr_move,
        "quiet_frames_over_move_threshold": float((quiet > thr_move).mean()) if len(quiet) else None,
        "client_decoded_ms": percentiles(decoded),
        "client_decoded_ms_by_first_sound": {k: percentiles(v) for k, v in by_onset.items() if v},
        "speech": speech, "utterances": len(bank), "client_decoded_ms_by_utterance": per_utterance,
        "client_decoded_first_move_ms": percentiles(moved), "client_network_ms": percentiles(network),
        "server_ms": percentiles([1000 * x for x in server_onsets]) if sess else stats.get("onset_latency_ms"),
        "stages_ms": stage_split(leaves, frames, thr, c, sess, tap, period) if sess else {},
        "client_av_offset_ms": client_av_offset(c, sess, tap) if sess else client_av_offset_sr(c),
        # what a viewer sees: the lips of a sound reach the screen this much after the sound (the A/V offset of the
        # streams plus the lip lag: at --latency low a frame shows the audio that ends at its tick, 20 ms back)
        "lip_lag_ms": stats.get("lip_lag_ms", 0.0),
        "pipeline_latency_ms": latency_ms, "session_stats": stats,
        "raw": {"client_decoded_ms": decoded, "client_network_ms": network,
                "server_ms": [1000 * x for x in server_onsets]},
    }


CHROMIUM_JS = """
const M = window.marionette, v = document.getElementById('video');
M.g2g = []; const c = document.createElement('canvas'); c.width = 16; c.height = 16;
const ctx = c.getContext('2d', { willReadFrequently: true });
function tick(now, md) {
  // the mouth region (x 0.3-0.7, y 0.6-0.9 of the frame) at 16x16 grey
  ctx.drawImage(v, 0.3 * v.videoWidth, 0.6 * v.videoHeight, 0.4 * v.videoWidth, 0.3 * v.videoHeight, 0, 0, 16, 16);
  const d = ctx.getImageData(0, 0, 16, 16).data, g = new Array(256);
  for (let i = 0; i < 256; i++) g[i] = (d[4 * i] + d[4 * i + 1] + d[4 * i + 2]) / 3;
  M.g2g.push([performance.timeOrigin + md.presentationTime, md.receiveTime ? performance.timeOrigin + md.receiveTime : null,
              md.rtpTimestamp ?? null, g]);
  v.requestVideoFrameCallback(tick);
}
v.requestVideoFrameCallback(tick);
// the browser's own view of A/V sync: each inbound stream's estimatedPlayoutTimestamp (its playout instant in the
// sender's NTP time, from the RTCP sender reports) sampled every 100 ms; video - audio at one moment is how far the
// picture plays behind the sound, as Chromium's own sync module sees it
M.playout = [];
M.playoutTimer = setInterval(() => M.pc.getStats().then(r => {
  const row = [performance.now(), null, null];
  r.forEach(s => { if (s.type === 'inbound-rtp' && s.estimatedPlayoutTimestamp)
                     row[s.kind === 'audio' ? 1 : 2] = s.estimatedPlayoutTimestamp; });
  M.playout.push(row); }), 100);
"""


def chromium_av_offset(tp, tr, rtp, sess, ajb_ms, playout: dict) -> dict:
    """Chromium's audio-vs-video offset (video - audio, ms) per presented frame: the frame's media instant is
    its tick's time on the server's clock (its RTP timestamp counts ticks; the tick of the first is the one
    whose send time its receive time follows by less than a period), its picture is shown at `tp`, and its
    sound, sent `audio_lead_s` before that instant, plays after the audio jitter buffer's mean hold (getStats
    jitterBufferDelay / jitterBufferEmittedCount) and, where Chromium reports it, the playout path's own
    (media-playout totalPlayoutDelay / totalSamplesCount). Loopback transit (< 1 ms) and the output
    device's latency (headless: a fake device) are left out on both sides."""
    if sess is None or ajb_ms is None:
        return {}
    rtp = np.array([np.nan if x is None else float(x) for x in rtp])
    ok = np.isfinite(rtp) & np.isfinite(tr)
    if ok.sum() < 10:
        return {}
    period = sess.clock.period
    r = rtp[ok]
    k_rel = np.round(((r - r[0]) % 2 ** 32) / (90000 * period))
    t0 = sess.clock.t0
    since = tr[ok] - t0 - k_rel * period  # k0 periods + the send, encode and transit of each frame
    k0 = np.floor(np.median(since) / period)
    media = t0 + (k_rel + k0) * period
    play_ms = 0.0
    if playout.get("totalSamplesCount"):
        play_ms = 1000 * playout["totalPlayoutDelay"] / playout["totalSamplesCount"]
    lead = getattr(getattr(sess, "audio_track", None), "lead_s", 0.0) * 1000
    audio_ms = -lead + ajb_ms + play_ms  # after the media instant
    off = 1000 * (tp[ok] - media) - audio_ms
    return {**percentiles(off, ps=(5, 50, 95)), "audio_lead_ms": lead, "audio_jitter_buffer_ms": ajb_ms,
            "audio_playout_path_ms": play_ms, "video_instant_to_presented_ms": percentiles(1000 * (tp[ok] - media))}


def _per_emitted(stats: dict, key: str) -> float | None:
    """A cumulative getStats delay (s, summed over emitted samples or frames) as its mean in ms."""
    n = stats.get("jitterBufferEmittedCount")
    return 1000 * stats[key] / n if n and stats.get(key) is not None else None


def estimated_playout_offset(rows) -> dict:
    """Chromium's own A/V sync figure: per getStats sample, audio's estimatedPlayoutTimestamp - video's (each the
    sender's NTP time of the media that stream plays out now; positive: the picture shows older media than the
    sound plays, i.e. it plays after its sound, as the other offsets here count). Samples 10 s in or later only (the sync
    module settles), and only where both streams report one."""
    d = [r[1] - r[2] for r in rows or [] if r[1] and r[2]]
    if not d:
        return {"n": 0, "note": "this Chromium reports no estimatedPlayoutTimestamp"}
    t0 = rows[0][0]
    late = [r[1] - r[2] for r in rows if r[1] and r[2] and r[0] - t0 > 10000]
    return percentiles(late or d, ps=(5, 50, 95))


def chromium_run(server, n_onsets: int, seed: int, tmp: Path, trace: bool = False, speech: str = "human") -> dict:
    """The same measurement from headless Chromium (the demo page, a fake microphone playing the words
    from a WAV file). Chromium's own capture and send timing are not visible from here, so the clock
    starts when the onset reaches the server (the aiortc run shows the uplink on loopback is ~2 ms,
    plus up to one Opus frame that Chromium's sender fills before sending: 10 ms at low, 20 elsewhere).
    Each presented frame (requestVideoFrameCallback: presentationTime, receiveTime) is read back with its
    mouth region."""
    import shutil
    import wave

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        return {"skipped": "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"}
    rng = np.random.default_rng(seed)
    bank = speech_bank(speech)
    parts = [np.zeros(48000 * 3, np.int16)]
    for i in range(n_onsets):
        parts += [bank[i % len(bank)].samples, np.zeros(int(48000 * rng.uniform(0.9, 1.5)), np.int16)]
    wav = tmp / "mic.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(np.concatenate(parts).astype("<i2").tobytes())
    seconds = sum(len(x) for x in parts) / 48000
    opts = Options()
    opts.binary_location = chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp / 'profile'}", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop",
                 "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
                 "--disable-dev-shm-usage"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    epoch_minus_mono = time.time() - time.monotonic()
    try:
        drv.get(server.url + "/?auto=1")
        t0 = time.monotonic()
        while not drv.execute_script("return window.marionette && window.marionette.session && "
                                     "document.getElementById('video').videoWidth"):
            if time.monotonic() - t0 > 40:
                return {"error": "Chromium never showed the avatar"}
            time.sleep(0.2)
        sid = drv.execute_script("return window.marionette.session")
        sess = server.server.sessions.get(sid)
        for m in STATIC:
            drv.execute_script("window.marionette.send(arguments[0])", m)
        drv.execute_script(CHROMIUM_JS)
        time.sleep(seconds + 1.0)
        stats = drv.execute_script("""
            return window.marionette.pc.getStats().then(r => { const o = {}; r.forEach(s => {
              if (s.type === 'inbound-rtp') o[s.kind] = s;
              if (s.type === 'media-playout') o.playout = s; }); return o; });""")
        playout_rows = drv.execute_script("clearInterval(window.marionette.playoutTimer); return window.marionette.playout")
        rows = []
        while True:  # in chunks: a long run does not fit one reply
            chunk = drv.execute_script("return window.marionette.g2g.splice(0, 300)")
            if not chunk:
                break
            rows += chunk
    finally:
        drv.quit()
    events = list(sess.onset_events) if sess is not None else []
    t0c = sess.clock.t0 if sess is not None else 0.0
    if not rows or not events:
        return {"error": f"no frames ({len(rows)}) or no server onsets ({len(events)})"}
    tp = np.array([r[0] for r in rows]) / 1000 - epoch_minus_mono  # presented, monotonic
    tr = np.array([np.nan if r[1] is None else r[1] for r in rows], np.float64) / 1000 - epoch_minus_mono
    g = np.array([r[3] for r in rows], np.float32)
    # the mouth at rest: the stillest 0.6 s of the 2.5 s before the first onset reached the server (the head
    # may still be settling after the page's controls, or blink, in any one stretch)
    first = events[0][0] + t0c
    best = None
    for back in np.arange(0.1, 2.0, 0.1):
        win = (tp > first - back - 0.6) & (tp < first - back)
        if win.sum() < 5:
            continue
        r = np.median(g[win], axis=0)
        q = float(np.percentile(np.abs(g[win] - r).mean(axis=1), 95))
        if best is None or q < best[0]:
            best = (q, win)
    settled = best[1] if best is not None else np.arange(len(tp)) < 12
    rest = np.median(g[settled], axis=0)
    dev = np.abs(g - rest).mean(axis=1)
    quiet = dev[settled]
    thr_move = max(1.5, 4 * float(np.percentile(quiet, 95)))
    thr = max(thr_move, 0.25 * float(np.percentile(dev, 99)))
    opened, moved, received = [], [], []
    for arrived, _k, _sent in events:
        a = arrived + t0c
        for lst, th in ((opened, thr), (moved, thr_move)):
            idx = np.flatnonzero((tp > a) & (dev > th))
            if len(idx) and tp[idx[0]] - a < 1.0:
                lst.append(1000 * (tp[idx[0]] - a))
                if lst is opened and np.isfinite(tr[idx[0]]):
                    received.append(1000 * (tr[idx[0]] - a))
    v, au = stats.get("video", {}), stats.get("audio", {})
    vjb, ajb = _per_emitted(v, "jitterBufferDelay"), _per_emitted(au, "jitterBufferDelay")
    hold = 1000 * (tp - tr)
    av = chromium_av_offset(tp, tr, [r[2] for r in rows], sess, ajb, stats.get("playout", {}))
    extra = {"trace": {"presented": tp.tolist(), "received": [None if not np.isfinite(x) else x for x in tr],
                       "rtp": [r[2] for r in rows], "dev": dev.tolist(),
                       "onsets_arrived": [e[0] + t0c for e in events], "onset_ticks": [e[1] for e in events]}} \
        if trace else {}
    return {**extra,
        "session_stats": sess.stats() if sess is not None else None,
        "onsets_at_server": len(events), "frames": len(rows), "threshold": thr, "threshold_move": thr_move,
        "server_arrival_to_presented_open_ms": percentiles(opened),
        "server_arrival_to_presented_first_move_ms": percentiles(moved),
        "server_arrival_to_received_open_ms": percentiles(received),
        "receive_to_presented_ms": percentiles(hold[np.isfinite(hold)]),
        "video_jitter_buffer_ms": vjb, "audio_jitter_buffer_ms": ajb,
        # why the audio buffer holds what it holds: the packets' arrival jitter as Chromium measured it, and its
        # buffer's target and minimum (the minimum is what A/V sync or a page asked of it)
        "audio_arrival_jitter_ms": 1000 * au["jitter"] if au.get("jitter") is not None else None,
        "audio_jitter_buffer_target_ms": _per_emitted(au, "jitterBufferTargetDelay"),
        "audio_jitter_buffer_minimum_ms": _per_emitted(au, "jitterBufferMinimumDelay"),
        "video_jitter_buffer_target_ms": _per_emitted(v, "jitterBufferTargetDelay"),
        "audio_minus_video_buffer_ms": None if vjb is None or ajb is None else ajb - vjb,
        "av_offset_ms": av,
        "av_offset_estimated_playout_ms": estimated_playout_offset(playout_rows),
        "video_fps": v.get("framesPerSecond"), "frames_decoded": v.get("framesDecoded"),
        "frames_dropped": v.get("framesDropped"),
        "note": "the clock starts at the onset's arrival at the server; add Chromium's capture and send "
                "(up to one Opus frame: 10 ms at --latency low, which asks for a=ptime:10, else 20) for the "
                "glass-to-glass figure",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onsets", type=int, default=40)
    ap.add_argument("--config", default="lite")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", default="low", help="the server's --latency level: low (its default) | balanced | safe")
    ap.add_argument("--backend", default="auto", help="the server's --backend (auto, as serve: ONNX Runtime on a CPU)")
    ap.add_argument("--threads", type=int, help="the server's inference threads (default: its own)")
    ap.add_argument("--lanes", type=int, help="the server's --lanes (default: its own, auto)")
    ap.add_argument("--avatar", type=Path, help="the server's --avatar (a photograph: aligned, streamed at its "
                                                "--output-size; default: the built-in avatar)")
    ap.add_argument("--fps", type=int, help="the server's --fps (default: serve's own, auto: 50 at --latency low "
                                            "with ONNX Runtime in lanes, else 25)")
    ap.add_argument("--audio-packet-ms", type=float, default=5.0, help="the server's outbound Opus packet length")
    ap.add_argument("--interrupts", type=int, default=5, help="interrupts measured (aiortc client)")
    ap.add_argument("--client", choices=("aiortc", "chromium", "both"), default="both",
                    help="which client measures: aiortc (in this process), headless Chromium, or both in turn")
    ap.add_argument("--client-audio-prefetch", type=int, default=0,
                    help="audio packets the client's aiortc jitter buffer holds (aiortc's own default: 4 = 80 ms)")
    ap.add_argument("--browser-playout", choices=("sync", "asap"), default=None,
                    help="the server's --browser-playout (default: its own, sync): asap asks browsers to show each "
                         "frame as it is decoded (the playout-delay RTP header extension)")
    ap.add_argument("--trace", action="store_true",
                    help="keep every decoded frame's arrival time and mouth deviation, the onsets and interrupts")
    ap.add_argument("--server", choices=("thread", "process"), default="thread",
                    help="thread: the server in this process, its stages split by reading its internals (the default); "
                         "process: `marionette serve` in a process of its own, as a user runs it, measured from the "
                         "aiortc client alone (no stage split; the A/V offset through the RTCP sender reports)")
    ap.add_argument("--speech", choices=("human", "espeak"), default=None,
                    help="what the clients say: human = phrases of recordings of real speakers (Debian's "
                         "pocketsphinx-testdata; the default where installed), espeak = espeak-ng's words")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "glass_to_glass.json")
    a = ap.parse_args(argv)
    if a.speech is None:
        a.speech = "human" if human_utterances() else "espeak"
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ck, what = (a.checkpoint, str(a.checkpoint)) if a.checkpoint else default_checkpoint(Path(tmp), a.config)
        if a.server == "process":
            return _main_process(a, ck, what, Path(tmp))
        cfg = ServeConfig(checkpoint=ck, config=a.config, ice_hosts=("127.0.0.1",), latency=a.latency,
                          backend=a.backend, threads=a.threads, lanes=a.lanes, audio_packet_ms=a.audio_packet_ms,
                          fps=a.fps, avatar=a.avatar,  # fps None: auto, as serve's default
                          browser_playout=a.browser_playout or ServeConfig.browser_playout)
        with ServerThread(cfg) as st:
            t0 = time.time()
            res["loadavg_start"] = os.getloadavg()
            if a.client in ("aiortc", "both"):
                res["aiortc"] = asyncio.run(run(st.url, st, a.onsets, a.seed, a.client_audio_prefetch, a.interrupts, a.trace,
                                                a.speech))
                res["aiortc"]["loadavg_end"] = os.getloadavg()
            if a.client in ("chromium", "both"):
                res["chromium"] = chromium_run(st, a.onsets, a.seed, Path(tmp), a.trace, a.speech)
                res["chromium"]["loadavg_end"] = os.getloadavg()
            res.update({"model": what, "config": st.server.pipeline.cfg.name,
                        "image_size": st.server.pipeline.cfg.image_size, "fps": st.server.fps,
                        "lanes": st.server.lanes,
                        "lookahead_ms": st.server.pipeline.cfg.lookahead_ms,
                        "pipeline_latency_ms": 1000 * st.server.latency_s,
                        "lead_ms": 1000 * st.server.lead_s, "duration_s": time.time() - t0,
                        "latency_level": a.latency, "browser_playout": a.browser_playout or "sync",
                        "client_audio_prefetch": a.client_audio_prefetch,
                        "audio_packet_ms": a.audio_packet_ms,
                        "backend": a.backend, "threads": st.server.pipeline.threads,
                        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                                    "python": platform.python_version()}})
    return _report(a, res)


def _main_process(a, ck: Path, what: str, tmp: Path) -> int:
    """--server process: `marionette serve` with the same options, the aiortc client in this process."""
    from streaming.ice import restrict_host_candidates

    args = ["--checkpoint", str(ck), "--config", a.config, "--latency", a.latency, "--backend", a.backend,
            "--audio-packet-ms", f"{a.audio_packet_ms:g}"]
    if a.threads:
        args += ["--threads", str(a.threads)]
    if a.lanes:
        args += ["--lanes", str(a.lanes)]
    if a.fps:
        args += ["--fps", str(a.fps)]
    if a.avatar:
        args += ["--avatar", str(a.avatar)]
    if a.browser_playout:
        args += ["--browser-playout", a.browser_playout]
    res: dict = {"server": "process", "serve_args": args}
    restrict_host_candidates(["127.0.0.1"])
    with ServeProcess(args, tmp / "serve.log") as url:
        t0 = time.time()
        res["loadavg_start"] = os.getloadavg()
        if a.client in ("aiortc", "both"):
            before = scrape_stages(url)
            res["aiortc"] = asyncio.run(run(url, None, a.onsets, a.seed, a.client_audio_prefetch, a.interrupts, a.trace,
                                            a.speech))
            res["aiortc"]["loadavg_end"] = os.getloadavg()
            # the server's own split, as a user reads it: its /metrics stage histograms over this run
            res["aiortc"]["server_stages_ms"] = histogram_delta(before, scrape_stages(url))
        if a.client in ("chromium", "both"):
            res["chromium"] = {"skipped": "--server process measures the aiortc client only (Chromium's figures start "
                                          "at the onset's arrival at the server, which only --server thread sees)"}
        st = (res.get("aiortc") or {}).get("session_stats") or {}
        from engine.checkpoint import read_checkpoint_config

        mcfg = read_checkpoint_config(ck)[0]
        res.update({"model": what, "config": mcfg.name, "image_size": mcfg.image_size, "lookahead_ms": mcfg.lookahead_ms,
                    "fps": st.get("target_fps"),
                    "pipeline_latency_ms": st.get("latency_ms"), "lead_ms": None, "duration_s": time.time() - t0,
                    "latency_level": a.latency, "browser_playout": a.browser_playout or "sync",
                        "client_audio_prefetch": a.client_audio_prefetch,
                    "audio_packet_ms": a.audio_packet_ms, "backend": a.backend, "threads": a.threads,
                    "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(),
                                "python": platform.python_version()}})
        log = (tmp / "serve.log").read_text()
    res["serve_log_tail"] = log.splitlines()[-20:]
    return _report(a, res)


def scrape_stages(url: str) -> dict:
    """The server's marionette_stage_latency_seconds histograms, read from its /metrics."""
    import urllib.request

    from streaming.metrics import parse_histogram

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return parse_histogram(r.read().decode(), "marionette_stage_latency_seconds")


def _report(a, res: dict) -> int:
    # a run whose server dropped ticks (a busy machine) is not a clean figure: say so
    notes, info = [], []
    for name in ("aiortc", "chromium"):
        st_ = (res.get(name) or {}).get("session_stats") or {}
        sent, dropped = st_.get("frames_sent", 0), st_.get("frames_dropped", 0)
        if sent + dropped:
            share = dropped / (sent + dropped)
            res[name]["dropped_share"] = share
            if share > 0.01:
                notes.append(f"{name}: the server dropped {100 * share:.1f}% of ticks: NOT a clean figure")
            mo = st_.get("frames_mouth_only", 0)
            res[name]["mouth_only_share"] = mo / (sent + dropped)
            if mo:  # a design choice (lanes), not a fault: said, not counted against the figure
                info.append(f"{name}: {100 * mo / (sent + dropped):.1f}% of ticks were mouth-only (lanes: an "
                             f"earlier tick's body, their own mouth): the head and eyes moved at "
                             f"{100 * (sent - mo) / (sent + dropped):.0f}% of the frame rate")
    if max(res["loadavg_start"][0], res["machine"]["load_avg"][0]) > 1.5 * (os.cpu_count() or 1) / 2 + 0.5:
        notes.append(f"load average {res['loadavg_start'][0]:.2f} -> {res['machine']['load_avg'][0]:.2f} on "
                     f"{os.cpu_count()} cores: something else was running")
    res["clean"] = not notes
    res["notes"] = notes
    res["info"] = info
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))

    def fmt(p):
        return f"p50 {p['p50']:.0f} ms, p95 {p['p95']:.0f} ms (n={p['n']})" if p and p.get("n") else "n=0"
    print(f"glass-to-glass ({res['config']} {res['image_size']}px at {res.get('fps')} fps, lookahead "
          f"{res['lookahead_ms']} ms, "
          f"pipeline {res['pipeline_latency_ms']:.0f} ms, --latency {a.latency}, browsers: "
          f"{res.get('browser_playout', 'sync')}, server in its own "
          f"{'process' if res.get('server') == 'process' else 'thread'}; {res['model']})")
    r = res.get("aiortc")
    if r:
        print(f"aiortc client (audio prefetch {a.client_audio_prefetch}):")
        print(f"  onset -> decoded frame, mouth open     : {fmt(r['client_decoded_ms'])}")
        print(f"  onset -> decoded frame, mouth moves    : {fmt(r['client_decoded_first_move_ms'])}")
        for k, v in r["client_decoded_ms_by_first_sound"].items():
            print(f"    words with a {k.replace('_', ' ')}: {fmt(v)}")
        print(f"  onset -> first packet of that frame    : {fmt(r['client_network_ms'])}")
        print(f"  server: onset arrival -> frame sent    : {fmt(r['server_ms'])}")
        st_ = r.get("session_stats") or {}
        print(f"  server: {st_.get('fps')} fps sent, {st_.get('frames_dropped')} ticks dropped, "
              f"{st_.get('frames_mouth_only')} mouth-only, {st_.get('frames_late')} late of {st_.get('frames_sent')}")
        for name, p in r.get("stages_ms", {}).items():
            if isinstance(p, dict) and p.get("n"):
                print(f"    {name:34s}: p50 {p['p50']:6.1f}, p95 {p['p95']:6.1f}")
        if r.get("server_stages_ms"):
            print("  the server's stages (its /metrics over the run; mean exact, p50/p95 within their buckets):")
            for name, p in sorted(r["server_stages_ms"].items()):
                print(f"    {name:34s}: mean {p['mean']:6.1f}, p50 {p['p50']:6.1f}, p95 {p['p95']:6.1f} (n={p['n']})")
        av = r.get("client_av_offset_ms", {})
        if av.get("n"):
            print(f"  A/V offset at the client (video - audio): p5 {av['p5']:.1f}, p50 {av['p50']:.1f}, "
                  f"p95 {av['p95']:.1f} ms, max |{av['max_abs']:.1f}| ms"
                  + (f" ({av['method']})" if av.get("method") else ""))
            lag = r.get("lip_lag_ms") or 0.0
            if lag:
                print(f"    the lips behind their sound (+ the {lag:.0f} ms lip lag): p5 {av['p5'] + lag:.1f}, "
                      f"p50 {av['p50'] + lag:.1f}, p95 {av['p95'] + lag:.1f} ms")
        print(f"  interrupt -> decoded frame, mouth shut for good: {fmt(r['interrupt_to_decoded_shut_ms'])} "
              f"(server: interrupt -> first flushed frame sent {r['interrupt_server_ms']})")
        print(f"  missed onsets {r['missed']}/{r['onsets']}")
    c = res.get("chromium")
    if c:
        if "server_arrival_to_presented_open_ms" not in c:
            print(f"chromium: {c}")
        else:
            print("headless Chromium (from the onset's arrival at the server):")
            print(f"  -> presented frame, mouth open         : {fmt(c['server_arrival_to_presented_open_ms'])}")
            print(f"  -> presented frame, mouth moves        : {fmt(c['server_arrival_to_presented_first_move_ms'])}")
            print(f"  -> that frame received                 : {fmt(c['server_arrival_to_received_open_ms'])}")
            print(f"  frame received -> presented            : {fmt(c['receive_to_presented_ms'])}")
            print(f"  jitter buffers: video {c['video_jitter_buffer_ms']}, audio {c['audio_jitter_buffer_ms']} ms; "
                  f"fps {c['video_fps']}")
            print(f"  audio: arrival jitter {c['audio_arrival_jitter_ms']} ms, buffer target "
                  f"{c['audio_jitter_buffer_target_ms']} / minimum {c['audio_jitter_buffer_minimum_ms']} ms")
            av = c.get("av_offset_ms") or {}
            if av.get("n"):
                print(f"  A/V offset (video - audio, estimated): p5 {av['p5']:.1f}, p50 {av['p50']:.1f}, "
                      f"p95 {av['p95']:.1f} ms (audio sent {av['audio_lead_ms']:.1f} ms ahead, held "
                      f"{av['audio_jitter_buffer_ms']:.1f} + {av['audio_playout_path_ms']:.1f} ms)")
            ep = c.get("av_offset_estimated_playout_ms") or {}
            if ep.get("n"):
                print(f"  A/V offset (video - audio, Chromium's estimatedPlayoutTimestamp): p5 {ep['p5']:.1f}, "
                      f"p50 {ep['p50']:.1f}, p95 {ep['p95']:.1f} ms (n={ep['n']})")
    for n in notes:
        print("  NOTE: " + n)
    for n in info:
        print("  " + n)
    print(f"  load avg {res['loadavg_start']} -> {res['machine']['load_avg']}; -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
