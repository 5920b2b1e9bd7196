"""Streaming parts on their own: the media clock, control validation, ICE restriction, Prometheus
text, the inbound audio path (resampling, VAD gating, flush, gaps), per-session motion and the
scheduler's batching. Real components throughout (webrtcvad, av, the engine's tiny model)."""

from __future__ import annotations

import asyncio
import math
import shutil
import time

import av
import numpy as np
import pytest

from streaming import controls as C
from streaming.audio_in import HOP48, InboundAudio
from streaming.clock import AUDIO_SAMPLES, MediaClock
from streaming.metrics import ServerMetrics

pytest.importorskip("aiortc")
pytest.importorskip("webrtcvad")

CTX = C.ControlContext(presets={"neutral": [0.0] * 10, "happy": [1.0] + [0.0] * 9, "sad": [0.0, 1.0] + [0.0] * 8},
                       exp_dim=10)


# ------------------------------------------------------------------------------------------- clock
def test_clock_video_and_audio_share_one_timeline():
    t = [100.0]
    clk = MediaClock(25, time_fn=lambda: t[0])
    assert clk.now() == 0.0
    assert clk.video_time(25) == pytest.approx(1.0)
    assert clk.audio_time(50) == pytest.approx(1.0)  # 50 x 20 ms
    # over ten minutes the two tracks' due times for the same instant are identical
    for k in (0, 1, 12345, 15000):
        j = k * 2  # 25 fps: two 20 ms audio frames per video tick
        assert clk.video_time(k) == clk.audio_time(j)
    assert clk.video_pts(15000, 0) == 15000 * 3600
    assert clk.audio_pts(30000, 0) == 30000 * AUDIO_SAMPLES
    t[0] = 100.0 + 0.039
    assert clk.video_tick_at(clk.now()) == 0
    assert clk.next_video_tick() == 1
    t[0] = 100.0 + 0.04
    assert clk.video_tick_at(clk.now()) == 1


def test_clock_sleep_until_never_wakes_early():
    clk = MediaClock(25)

    async def run():
        woke = []
        for k in range(1, 6):
            late = await clk.sleep_until(clk.video_time(k))
            woke.append((k, clk.now(), late))
        return woke

    for k, now, late in asyncio.run(run()):
        assert now >= clk.video_time(k) and late >= 0.0


# ---------------------------------------------------------------------------------------- controls
@pytest.mark.parametrize("msg,typ", [
    ({"type": "pose", "yaw": 10, "pitch": -5, "roll": 2}, C.Pose),
    ({"type": "gaze", "x": 0.3, "y": -0.2}, C.Gaze),
    ({"type": "blink"}, C.Blink),
    ({"type": "expression", "preset": "happy", "intensity": 0.8}, C.Expression),
    ({"type": "expression", "preset": "happy:0.5+sad:0.3"}, C.Expression),
    ({"type": "expression", "vector": [0.1] * 10}, C.Expression),
    ({"type": "source", "factor": "pose", "from": "webcam"}, C.Source),
    ({"type": "source", "factor": "eyes", "from": "idle"}, C.Source),
    ({"type": "interrupt", "id": 7}, C.Interrupt),
    ({"type": "stats"}, C.StatsRequest),
])
def test_valid_controls_parse(msg, typ):
    assert isinstance(C.parse_control(msg, CTX), typ)


@pytest.mark.parametrize("msg,needle", [
    ({"type": "dance"}, "unknown control type"),
    ({"yaw": 3}, "type"),
    ([1, 2], "JSON object"),
    ({"type": "pose", "yaw": "left"}, "number"),
    ({"type": "pose", "yaw": 1e9}, "outside"),
    ({"type": "pose", "yaw": float("nan")}, "finite"),
    ({"type": "pose", "yaw": True}, "number"),
    ({"type": "pose", "yaw": 1, "wiggle": 2}, "unknown field"),
    ({"type": "gaze", "x": 2}, "outside"),
    ({"type": "expression", "preset": "smug"}, "unknown expression preset"),
    ({"type": "expression", "preset": "happy:9"}, "outside"),
    ({"type": "expression", "preset": "happy", "vector": [0] * 10}, "exactly one"),
    ({"type": "expression", "vector": [0] * 3}, "10 numbers"),
    ({"type": "source", "factor": "nose", "from": "idle"}, "unknown factor"),
    ({"type": "source", "factor": "pose", "from": "audio"}, "cannot come from"),
    ({"type": "blink", "eye": "left"}, "unknown field"),
])
def test_bad_controls_are_rejected_with_a_message(msg, needle):
    with pytest.raises(C.ControlError, match=needle):
        C.parse_control(msg, CTX)


def test_control_batches_are_all_or_nothing_and_size_limited():
    with pytest.raises(C.ControlError, match=r"control\[1\]"):
        C.parse_controls([{"type": "blink"}, {"type": "nope"}], CTX)
    assert len(C.parse_controls([{"type": "blink"}, {"type": "interrupt"}], CTX)) == 2
    with pytest.raises(C.ControlError, match="not valid JSON"):
        C.decode_message("{nope")
    with pytest.raises(C.ControlError, match="larger"):
        C.decode_message("x" * (C.MAX_MESSAGE_BYTES + 1))


# --------------------------------------------------------------------------------------------- ICE
def test_ice_restriction_uses_aioices_seam_and_restores_it():
    import aioice.ice

    from streaming.ice import filter_remote_candidates, restrict_host_candidates

    original = aioice.ice.get_host_addresses
    assert "127.0.0.1" not in original(use_ipv4=True, use_ipv6=False)  # why the option exists
    h = restrict_host_candidates(["127.0.0.1"])
    try:
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
        assert h.loopback_only
    finally:
        h.restore()
    assert aioice.ice.get_host_addresses is original
    with pytest.raises(ValueError, match="not an address of this machine"):
        restrict_host_candidates(["203.0.113.7"])
    with pytest.raises(ValueError, match="IP address"):
        restrict_host_candidates(["localhost"])
    sdp = ("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
           "a=candidate:1 1 udp 2130706431 10.1.2.3 5000 typ host\r\n"
           "a=candidate:2 1 udp 2130706431 127.0.0.1 5001 typ host\r\n"
           "a=candidate:3 1 udp 2130706431 abcd.local 5002 typ host\r\n")
    out = filter_remote_candidates(sdp, loopback_only=True)
    assert "127.0.0.1 5001" in out and "10.1.2.3" not in out and ".local" not in out
    assert filter_remote_candidates(sdp, loopback_only=False) == sdp


def test_ice_gathers_only_the_restricted_host():
    from aiortc import RTCConfiguration, RTCPeerConnection

    from streaming.ice import restrict_host_candidates

    async def gather():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return [line for line in sdp.splitlines() if line.startswith("a=candidate")]

    h = restrict_host_candidates(["127.0.0.1"])
    try:
        cands = asyncio.run(gather())
    finally:
        h.restore()
    assert cands and all(" 127.0.0.1 " in c for c in cands)


# ----------------------------------------------------------------------------------------- metrics
def test_metrics_render_prometheus_text():
    m = ServerMetrics(sessions_fn=lambda: 3)
    m.frames_sent.inc(5)
    m.frames_dropped.inc(2, reason="late")
    m.stage_latency.observe(0.012, stage="generate")
    m.stage_latency.observe(0.5, stage="generate")
    m.av_offset.observe(-0.003)
    text = m.render()
    assert "# TYPE marionette_sessions gauge\nmarionette_sessions 3\n" in text
    assert "marionette_frames_sent_total 5" in text
    assert 'marionette_frames_dropped_total{reason="late"} 2' in text
    assert 'marionette_stage_latency_seconds_bucket{stage="generate",le="0.015"} 1' in text
    assert 'marionette_stage_latency_seconds_bucket{stage="generate",le="+Inf"} 2' in text
    assert 'marionette_stage_latency_seconds_count{stage="generate"} 2' in text
    assert "marionette_av_offset_seconds_count 1" in text
    for line in text.splitlines():  # every sample line is "name{labels} value"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1].replace("+Inf", "inf"))


def test_an_onset_whose_tick_was_dropped_is_timed_to_the_next_frame_sent():
    """A speech onset's tick that went out as a repeat (dropped) is counted at the first frame sent after it (which
    shows it too), not left out: leaving it out hid the onsets a busy machine made slow. An interrupt forgets the
    onsets whose frames it flushed."""
    from engine.config import ModelConfig
    from engine.model import Marionette
    from engine.runtimes.torch_runtime import TorchRuntime
    from streaming.pipeline import Pipeline
    from streaming.session import Session

    pipe = Pipeline(TorchRuntime(Marionette(ModelConfig.preset("tiny"))), {})

    async def main():
        clock = MediaClock(25)
        s = Session("t", None, clock=clock, scheduler=None, pipeline=pipe, metrics=ServerMetrics(), avatar_id="a",
                    avatar=None, latency_s=0.04, lead_s=0.01)
        t0 = clock.t0
        s._onsets_pending[10] = clock.video_time(10) - 0.05  # its tick (10) dropped: the next frame sent is 11
        s.note_video_sent(11, t0 + clock.video_time(11) + 0.002)
        assert len(s.onset_latencies) == 1
        assert s.onset_latencies[0] == pytest.approx(0.05 + 0.04 + 0.002)
        assert s.onset_events[0][1] == 11 and not s._onsets_pending
        s._onsets_pending[20] = clock.video_time(20) - 0.05
        s.note_video_sent(19, t0 + clock.video_time(19))  # before the onset's tick: still waiting
        assert len(s.onset_latencies) == 1 and 20 in s._onsets_pending
        s.interrupt()
        s.note_video_sent(21, t0 + clock.video_time(21))
        assert len(s.onset_latencies) == 1 and not s._onsets_pending
        text = s.metrics.registry.render()
        assert 'marionette_stage_latency_seconds_count{stage="speech_onset_to_frame_sent"} 1' in text

    asyncio.run(main())


def test_stage_histograms_read_back_between_two_scrapes():
    """parse_histogram + histogram_delta on the server's own /metrics text: the observations between two scrapes,
    exact means, quantiles within their bucket (Prometheus histogram_quantile)."""
    from streaming.metrics import histogram_delta, histogram_quantile, parse_histogram

    name = "marionette_stage_latency_seconds"
    m = ServerMetrics()
    for v in (0.004, 0.004, 0.004):  # before the window: not counted
        m.stage_latency.observe(v, stage="encode")
    before = parse_histogram(m.render(), name)
    vals = np.linspace(0.041, 0.049, 20)  # all in the 40-50 ms bucket
    for v in vals:
        m.stage_latency.observe(float(v), stage="encode")
    m.stage_latency.observe(0.012, stage="round")
    m.stage_latency.observe(2.0, stage="round")  # past the last finite bucket
    after = parse_histogram(m.render(), name)
    d = histogram_delta(before, after)
    assert d["encode"]["n"] == 20 and d["encode"]["mean"] == pytest.approx(1000 * vals.mean())
    assert 40 <= d["encode"]["p50"] <= 50 and 40 <= d["encode"]["p95"] <= 50
    assert d["round"]["n"] == 2 and d["round"]["p95"] == pytest.approx(1000.0)  # +Inf: the last finite bound
    assert histogram_quantile(0.5, (0.01, 0.02, float("inf")), (0, 10, 10)) == pytest.approx(0.015)
    assert math.isnan(histogram_quantile(0.5, (0.01, float("inf")), (0, 0)))
    assert parse_histogram("", name) == {}


# ----------------------------------------------------------------------------------- inbound audio
def _frames(x48: np.ndarray, stereo: bool = True, rate: int = 48000, chunk: int = 960):
    for i in range(0, len(x48) - chunk + 1, chunk):
        c = x48[i:i + chunk]
        data = np.stack([c, c], 1).reshape(1, -1) if stereo else c.reshape(1, -1)
        f = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo" if stereo else "mono")
        f.sample_rate = rate
        f.pts = i
        yield i, f


def _feed(a: InboundAudio, x48, stereo=True, t0=0.02):
    for i, f in _frames(x48, stereo):
        a.push(f, t0 + i / 48000)


@pytest.fixture(scope="module")
def speech48():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from streaming.fixtures import espeak

    return espeak("Hello there, this is a test of the voice gate.")


def _frame_gates(a: InboundAudio):
    return np.array([a.gate(h, 4) for h in range(0, a.n_hops - 4, 4)])


def test_vad_gate_follows_speech_and_closes_within_100ms(speech48):
    sil = np.zeros(48000, np.int16)
    a = InboundAudio(0.2)
    _feed(a, np.concatenate([sil, speech48, sil]))  # browsers' 48 kHz stereo
    g = _frame_gates(a)
    hop_start, hop_end = 100, 100 + len(speech48) // HOP48
    frames = np.flatnonzero(g)
    assert frames.size > 0
    first, last_end = frames[0] * 4, frames[-1] * 4 + 4
    assert hop_start - 4 <= first <= hop_start + 4  # opens at the onset
    assert last_end <= hop_end + 10  # closed within 100 ms of the speech end
    assert g[: hop_start // 4 - 1].sum() == 0 and g[(hop_end + 10) // 4 + 1:].sum() == 0
    assert g[hop_start // 4: hop_end // 4].mean() > 0.6  # open through most of the speech


@pytest.mark.parametrize("kind", ["hiss", "hum", "loud-hiss"])
def test_vad_gate_stays_shut_on_noise(kind):
    rng = np.random.default_rng(0)
    n = 48000 * 3
    if kind == "hum":
        x = np.sin(np.arange(n) * 2 * np.pi * 120 / 48000) * 0.1
    else:
        x = rng.normal(0, 0.1 if kind == "loud-hiss" else 0.01, n)
    a = InboundAudio(0.2)
    _feed(a, (x * 32767).astype(np.int16))
    assert _frame_gates(a).sum() == 0


def test_vad_finds_speech_in_noise(speech48):
    rng = np.random.default_rng(1)
    x = np.concatenate([np.zeros(48000, np.int16), speech48, np.zeros(24000, np.int16)]).astype(np.float64)
    x += rng.normal(0, 0.005 * 32767, len(x))
    a = InboundAudio(0.2)
    _feed(a, np.clip(x, -32768, 32767).astype(np.int16), stereo=False)
    g = _frame_gates(a)
    assert g[:24].sum() == 0 and g[25: 25 + len(speech48) // 1920].mean() > 0.5


def test_inbound_audio_is_positioned_on_the_clock_and_flushable(speech48):
    lat = 0.2
    a = InboundAudio(lat)
    x = np.concatenate([np.zeros(9600, np.int16), speech48])
    _feed(a, x, t0=1.0)
    # anchor: stream position n nominally arrived at anchor + n/48000; played lat later
    assert a.anchor == pytest.approx(1.0 - 960 / 48000, abs=1e-6)
    assert a.offset48 % HOP48 == 0
    t_play = 1.5
    p = a.position_at(t_play)
    assert p / 48000 == pytest.approx(t_play - lat - a.anchor, abs=0.011)
    pcm, missing = a.read48(9600, 960)
    assert np.array_equal(pcm, x[9600:10560]) and missing == 0
    _, missing = a.read48(a.n48 - 480, 960)
    assert missing == 480  # not arrived yet
    a.flush()
    pcm, _ = a.read48(9600, 960)
    assert not pcm.any()  # flushed audio is silence
    assert a.gate(0, a.n_hops) == 0.0


def test_the_cut_off_speech_tail_after_a_flush_does_not_reopen_the_gate(speech48):
    """An interrupt flushes mid-word; the next 20 ms decoded still carry the word's tail (codec and
    resampler delay). No frame after the flush may open the lips on it (it reopened the mouth for 1-2
    frames after every interrupt)."""
    a = InboundAudio(0.2)
    sil = np.zeros(48000, np.int16)
    frames20 = speech48[:len(speech48) // 960 * 960].reshape(-1, 960).astype(np.float32)
    loud = np.convolve((frames20 ** 2).mean(1), np.ones(3), "valid")  # 60 ms windows
    cut = (int(np.argmax(loud)) + 1) * 960  # mid-vowel, where the loudest 60 ms of the phrase are
    _feed(a, np.concatenate([sil, speech48[:cut]]))
    assert _frame_gates(a).sum() > 0  # it was talking
    a.flush()
    flush_hop = a.flush_before // HOP48
    t0 = 0.02 + a.n48 / 48000
    tail = speech48[cut:cut + 960]  # 20 ms of the word after the cut
    for i, f in _frames(np.concatenate([tail, sil])):
        a.push(f, t0 + i / 48000)
    assert max(a.gate(h, 4) for h in range(flush_hop - 3, a.n_hops - 4)) == 0.0


def test_gap_in_the_inbound_stream_keeps_later_audio_in_place():
    a = InboundAudio(0.2, anchor_settle_s=0.1)
    tone = (np.sin(np.arange(48000) * 0.05) * 8000).astype(np.int16)
    frames = list(_frames(tone))
    for i, f in frames[:25]:
        a.push(f, 0.02 + i / 48000)
    n_before = a.n48
    # the sender goes quiet for 300 ms (DTX / muted), then continues
    for i, f in frames[25:]:
        a.push(f, 0.02 + i / 48000 + 0.3)
    assert a.inserted_samples == pytest.approx(0.3 * 48000, abs=HOP48)
    assert a.n48 == len(frames) * 960 + a.inserted_samples
    assert a.n48 > n_before


def test_timestamp_jump_inserts_exactly_what_the_sender_skipped():
    a = InboundAudio(0.2, anchor_settle_s=0.1)
    tone = (np.sin(np.arange(48000) * 0.05) * 8000).astype(np.int16)
    frames = list(_frames(tone))
    skip = 12000  # 250 ms of DTX: no packets, the RTP timestamps run on
    for i, f in frames[:25]:
        a.push(f, 0.02 + i / 48000)
    for i, f in frames[25:]:
        f.pts = i + skip
        a.push(f, 0.02 + (i + skip) / 48000)
    assert a.inserted_samples == skip
    assert a.n48 == len(frames) * 960 + skip


def test_stall_then_burst_keeps_the_stream_in_place():
    """A sender that stalls 0.6 s and then sends what it held, a frame every 5 ms until it has caught up
    (timestamps contiguous): nothing is inserted, so the audio after the burst keeps its place on the
    clock (it used to be pushed 0.6 s late for good: the lips of a client whose loop was busy once moved
    0.6 s behind its voice)."""
    a = InboundAudio(0.2, anchor_settle_s=0.1)
    tone = (np.sin(np.arange(48000 * 3) * 0.05) * 8000).astype(np.int16)
    frames = list(_frames(tone))
    stall_from, stall_s = 50, 0.6
    t_resume = 0.02 + frames[stall_from][0] / 48000 + stall_s
    for j, (i, f) in enumerate(frames):
        t = 0.02 + i / 48000
        if j >= stall_from:
            t = max(t, t_resume + (j - stall_from) * 0.005)
        a.push(f, t)
    assert a.inserted_samples == 0 and a.dropped_samples == 0
    assert a.n48 == len(frames) * 960
    # what arrives on time still plays `latency` after it arrived: the last frame's end is where it was sent
    last_start, _ = frames[-1]
    assert a.position_at(0.02 + last_start / 48000 + 0.2) == pytest.approx(a.n48, abs=HOP48)


def _jittered_push(a: InboundAudio, x48: np.ndarray, t0: float, late_every: int | None, late_s: float,
                   prev: float = -1.0) -> float:
    """Push x48 in 20 ms frames; with late_every, every late_every-th frame arrives late_s late and the ones
    after it queue behind it (in-order delivery, 1 ms apart). Returns the last arrival time."""
    for j, (i, f) in enumerate(_frames(x48)):
        t = t0 + i / 48000
        if late_every and j % late_every == late_every - 1:
            t += late_s
        t = max(t, prev + 0.001)
        a.push(f, t)
        prev = t
    return prev


def _talk_and_pause(speech48: np.ndarray, cycles: int, pause_s: float = 1.0) -> tuple[np.ndarray, list]:
    sil = np.zeros(int(pause_s * 48000), np.int16)
    parts, spans, n = [sil], [], len(sil)
    for _ in range(cycles):
        spans.append((n, n + len(speech48)))
        parts += [speech48, sil]
        n += len(speech48) + len(sil)
    return np.concatenate(parts), spans


def test_adaptive_margin_moves_the_stream_later_in_pauses_and_back_when_calm(speech48):
    """Audio arriving later than the margin allows (every 10th packet 35 ms late) moves the session's stream
    later, 10 ms at a time and only in pauses (the 10 ms it repeats are silence), until the margin covers
    the lateness; once the network is calm again it comes back to where it started."""
    start = 0.06
    a = InboundAudio(start, anchor_settle_s=0.5, margin_s=0.015, adapt_max_s=0.06, adapt_window_s=2.0,
                     adapt_calm_s=2.0)
    x, spans = _talk_and_pause(speech48, 5)
    t_end = _jittered_push(a, x, 0.02, late_every=10, late_s=0.035)
    ups = list(a.adaptations)
    assert ups and all(b > c for (_, b), (_, c) in zip(ups[1:], ups))  # later, step by step
    assert a.effective_margin_s() >= 0.035  # the margin now covers the lateness
    assert a.latency_s - start <= 0.06 + 1e-9
    for t, _ in ups:  # each step was taken in a pause: what plays around it is silence
        p = a.position_at(t)
        assert np.abs(x[max(0, p - 1440):p + 1440].astype(np.float64)).max() < 100, t
        assert not any(s0 - 480 <= p <= s1 + 480 for s0, s1 in spans), t
    # the network calms down: the stream comes back, in pauses too, to the latency it started with
    x2, _ = _talk_and_pause(speech48, 6)
    _jittered_push(a, x2, t_end + 0.02 - len(x) / 48000 + len(x) / 48000, late_every=None, late_s=0.0, prev=t_end)
    assert len(a.adaptations) > len(ups)
    assert a.latency_s == pytest.approx(start, abs=1e-9)


def test_fixed_margin_when_adaptation_is_off(speech48):
    a = InboundAudio(0.06, anchor_settle_s=0.5, margin_s=0.015, adapt_max_s=0.0, adapt_window_s=2.0)
    x, _ = _talk_and_pause(speech48, 4)
    off = None
    for j, (i, f) in enumerate(_frames(x)):
        a.push(f, 0.02 + i / 48000 + (0.035 if j % 10 == 9 else 0.0))
        if j == 100:
            off = a.offset48
    assert a.steps_taken == 0 and not a.adaptations and a.offset48 == off and a.latency_s == 0.06


def test_lip_lag_moves_the_frame_audio_to_end_at_its_tick():
    """A frame's audio: the frame period centred on its tick, or with a 20 ms lip lag (latency `low`) the
    period that ends at the tick."""
    from types import SimpleNamespace

    from streaming.session import Session

    def hops(lag48: int, k: int) -> tuple[int, int, int]:
        ns = SimpleNamespace(fps=25, lip_lag48=lag48)
        ns._p48 = lambda kk, off: Session._p48(ns, kk, off)
        return Session.frame_hops(ns, k, 0)

    # tick 10 plays at 0.4 s = hop 40 of the 10 ms hops
    assert hops(0, 10) == (38, 4, 42)
    assert hops(960, 10) == (36, 4, 40)


# ------------------------------------------------------------------------------------------ motion
@pytest.fixture(scope="module")
def tiny_pipeline():
    from streaming.pipeline import Pipeline

    return Pipeline.load(None, "tiny", threads=1)


def test_session_motion_controls(tiny_pipeline):
    from streaming.motion import SessionMotion

    p = tiny_pipeline
    m = SessionMotion(p.cfg, p.presets, 25, seed=0)
    a = m.compose_rest(0)
    b = m.compose_rest(5)
    assert not np.allclose(a["pose"], b["pose"])  # idle sway: the head never freezes
    m.apply(C.Source("pose", "controls"))
    m.apply(C.Pose(yaw=30.0, transition_ms=0))
    assert m.compose_rest(6)["pose"][0] == pytest.approx(1.0)  # yaw / 30
    assert np.allclose(m.compose_rest(6)["pose"], m.compose_rest(7)["pose"])  # exactly the command
    m.apply(C.Source("eye", "controls"))  # no idle blinks: only the commanded one
    m.apply(C.Blink())
    lids = [m.compose_rest(i)["eye"][2] for i in range(8, 16)]
    assert max(lids) == pytest.approx(1.0) and lids[-1] == 0.0
    m.apply(C.Expression(preset="happy", intensity=0.5, transition_ms=0))
    assert np.allclose(m.compose_rest(17)["exp"], 0.5 * p.presets["happy"])
    m.apply(C.Source("exp", "idle"))
    assert not m.compose_rest(18)["exp"].any()


def test_session_motion_uses_the_checkpoints_learned_idle_model(tmp_path):
    """A checkpoint with an idle model: the session's idle head and eyes come from it, fed each frame's
    own audio (the mean log-mel of its hops), and commands still add to the idle pose."""
    import torch

    from engine.audio import log_mel
    from engine.checkpoint import save_checkpoint
    from engine.config import ModelConfig
    from engine.idle_model import IdleModelConfig, IdleMotionModel, LearnedIdleSource, save_idle_model
    from engine.model import Marionette
    from streaming.motion import SessionMotion
    from streaming.pipeline import Pipeline

    torch.manual_seed(0)
    idle = IdleMotionModel(IdleModelConfig(hidden=16, audio_dim=8, style_dim=8))
    d = tmp_path / "ckpt"
    d.mkdir()
    save_checkpoint(Marionette(ModelConfig.preset("tiny")), d, meta={"idle_model": save_idle_model(idle, d)})
    p = Pipeline.load(d, threads=1)
    assert p.idle_model is not None and p.idle_model_for(30) is None
    m = SessionMotion(p.cfg, p.presets, 25, seed=5, idle_model=p.idle_model_for(25))
    x = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    for i in range(0, len(x), 320):
        m.push_audio(x[i:i + 320])
    m.push_energy_until(20, lambda i: 0.0, lambda i: (4 * i, 4))
    ref = LearnedIdleSource(p.idle_model, seed=5)
    ref.push_frame_mel(log_mel(x, p.cfg.audio).numpy()[:84].reshape(21, 4, -1).mean(1))
    want = ref.latents(0, 21, "pose")
    got = np.stack([m.compose_rest(i)["pose"] for i in range(21)])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got.std(0).max() > 0
    eye = ref.latents(0, 22, "eye")[21]
    assert np.allclose(m.compose_rest(21)["eye"][:2], eye[:2], atol=1e-4)  # frame 21: generated silent
    m.apply(C.Pose(yaw=15.0, transition_ms=0))
    assert m.compose_rest(22)["pose"][0] == pytest.approx(ref.latents(22, 1, "pose")[0, 0] + 0.5, abs=1e-4)

    # a stream at twice the model's rate (50 fps on the 25 fps model) steps it once every two ticks, on the two
    # ticks' hops together: tick i shows the model's frame (i + 1) // 2 - 1, the newest whose ticks have both come
    assert p.idle_model_for(50) is p.idle_model and p.idle_model_for(60) is None
    m2 = SessionMotion(p.cfg, p.presets, 50, seed=5, idle_model=p.idle_model_for(50))
    assert m2.idle_div == 2
    for i in range(0, len(x), 320):
        m2.push_audio(x[i:i + 320])
    m2.push_energy_until(41, lambda i: 0.0, lambda i: (2 * i, 2))
    got2 = np.stack([m2.compose_rest(i)["pose"] for i in range(1, 42, 2)])
    np.testing.assert_allclose(got2, want, atol=1e-4)
    np.testing.assert_allclose(m2.compose_rest(40)["pose"], want[19], atol=1e-4)  # tick 40: frame 20 not complete


def test_mel_windows_match_the_offline_front_end(tiny_pipeline):
    import torch

    from engine.audio import log_mel
    from streaming.motion import SessionMotion

    p = tiny_pipeline
    m = SessionMotion(p.cfg, p.presets, 25)
    x = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    for i in range(0, len(x), 333):
        m.push_audio(x[i:i + 333])
    ref = log_mel(x, p.cfg.audio).numpy()
    w, complete = m.mel_window(20)
    assert complete
    assert np.allclose(w.T, ref[20:20 + p.cfg.mel_window], atol=1e-5)
    w, complete = m.mel_window(len(ref) - 5)
    assert not complete and np.allclose(w.T[5:], math.log(p.cfg.audio.log_floor))
    assert isinstance(torch.from_numpy(w), torch.Tensor)


# --------------------------------------------------------------------------------------- scheduler
class _Sink:
    """A minimal session for the scheduler: always wants a frame, records what it gets."""

    def __init__(self, sid, avatar, total):
        self.id = sid
        self.avatar = avatar
        self.total = total
        self.got: dict[int, object] = {}

    def wants_tick(self, k):
        return True

    def build_job(self, k):
        from streaming.scheduler import FrameJob

        return FrameJob(session=self, tick=k, epoch=0, avatar=self.avatar,
                        rest={"pose": np.zeros(6, np.float32), "eye": np.zeros(6, np.float32),
                              "exp": np.zeros(10, np.float32)})

    def deliver(self, k, frame, epoch, z_lip=None, mouth_only=False):
        self.got[k] = frame

    def fail_from_thread(self, reason):  # pragma: no cover
        raise AssertionError(reason)


def test_scheduler_batches_sessions_each_tick_off_the_calling_thread(tiny_pipeline):
    import threading

    from streaming.pipeline import placeholder_portrait
    from streaming.scheduler import Scheduler

    p = tiny_pipeline
    clock = MediaClock(25)
    metrics = ServerMetrics()
    sch = Scheduler(p, clock, metrics, lead_s=0.02).start()
    try:
        avatar = sch.submit(p.prepare_avatar, placeholder_portrait(p.cfg.image_size)).result(30)
        assert sch.submit(threading.current_thread).result(5).name == "marionette-scheduler"
        sinks = [_Sink(f"s{i}", avatar, p.cfg.latents.total) for i in range(3)]
        for s in sinks:
            sch.add(s)
        t0 = time.monotonic()
        while metrics.batch_size.count() < 10 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        for s in sinks:
            sch.remove(s)
    finally:
        sch.stop()
    ticks = [set(s.got) for s in sinks]
    common = set.intersection(*ticks)
    # every session served in the same rounds (the last one may have lost a session being removed)
    assert len(common) >= 10 and len(set.union(*ticks) - common) <= 1
    f = sinks[0].got[min(common)]
    assert (f.width, f.height) == (p.cfg.image_size, p.cfg.image_size)
    assert metrics.batch_size.count() >= 10 and metrics.batch_size.mean() == pytest.approx(3, abs=0.2)
    assert not sch.alive


class _PhasedSink(_Sink):
    """A session with the two-phase request: the body's lip is `provisional`, the mouth's `final`."""

    def __init__(self, sid, avatar, total, lip_dim, fail_finish=False):
        super().__init__(sid, avatar, total)
        self.provisional = np.full(lip_dim, 0.0, np.float32)
        self.final = np.full(lip_dim, 0.5, np.float32)
        self.calls: list[tuple[str, int, float]] = []
        self.fail_finish = fail_finish
        self.lips: dict[int, object] = {}

    def begin_job(self, k):
        self.calls.append(("begin", k, time.monotonic()))
        job = self.build_job(k)
        job.lip = self.provisional
        return job

    def finish_job(self, job):
        self.calls.append(("finish", job.tick, time.monotonic()))
        if self.fail_finish:
            raise RuntimeError("the audio part failed")
        job.lip = self.final
        return job

    def deliver(self, k, frame, epoch, z_lip=None, mouth_only=False):
        self.got[k] = frame
        self.lips[k] = z_lip


def test_two_phase_rounds_make_the_body_ahead_and_the_mouth_from_the_final_lip():
    """A patch model's rounds in two phases (streaming.scheduler): each tick's body is made from the
    provisional lip before its audio part is asked for, the mouth from the final lip; the frame delivered is
    body(provisional) + mouth(final), not the whole frame of either; a session whose audio part fails keeps
    its row with a shut mouth."""
    import torch

    from streaming.pipeline import Pipeline, placeholder_portrait
    from streaming.scheduler import Scheduler

    torch.manual_seed(0)
    p = Pipeline.load(None, "talk-tiny", threads=1)
    with torch.no_grad():  # a mouth net that answers its lip (a fresh one's output layer is zero)
        p.rt.model.generator.patch.mouth_net.out.weight.normal_(0, 0.3)
        p.rt.model.generator.flow_out.weight.normal_(0, 0.05)
    assert p.late_mouth
    clock = MediaClock(25)
    metrics = ServerMetrics()
    sch = Scheduler(p, clock, metrics, lead_s=0.01).start()
    try:
        avatar = sch.submit(p.prepare_avatar, placeholder_portrait(p.cfg.image_size)).result(30)
        p.warmup(avatar, batch_sizes=(1, 2), repeats=2)
        assert set(p.phase_times) == {1, 2} and all(b > 0 and m > 0 for b, m in p.phase_times.values())
        lat = p.cfg.latents
        ok = _PhasedSink("ok", avatar, lat.total, lat.lip)
        bad = _PhasedSink("bad", avatar, lat.total, lat.lip, fail_finish=True)
        sch.body_lead_s = 0.02
        assert sch.phased and sch.start_lead_s >= 0.03
        sch.add(ok)
        sch.add(bad)
        t0 = time.monotonic()
        while len(ok.got) < 8 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        sch.remove(ok)
        sch.remove(bad)
    finally:
        sch.stop()
    assert len(ok.got) >= 8 and set(ok.got) == set(bad.got)
    # per tick: begin, then finish (never finish before its begin; the next begin after this finish)
    seq = [(c, k) for c, k, _ in ok.calls]
    for k in ok.got:
        assert seq.index(("begin", k)) < seq.index(("finish", k)) < seq.index(("begin", k + 1)) \
            if ("begin", k + 1) in seq else True
    # every round in two phases but the one the loop was already waiting for when the phases were set
    assert metrics.stage_latency.count(stage="generate_body") >= len(ok.got) - 1
    assert metrics.stage_latency.count(stage="generate_mouth") >= len(ok.got) - 1
    k = max(ok.got)
    assert np.array_equal(ok.lips[k], ok.final) and bad.lips[k] is None

    def frame(z_body, z_mouth):
        zb, zm = np.zeros((1, lat.total), np.float32), np.zeros((1, lat.total), np.float32)
        zb[0, lat.slices()["lip"]], zm[0, lat.slices()["lip"]] = z_body, z_mouth
        return p.to_video_frames(p.generate_mouth(p.generate_body([avatar], zb), [avatar], zm))[0].to_ndarray()

    got = ok.got[k].to_ndarray()
    want = frame(ok.provisional, ok.final)
    assert np.abs(got.astype(int) - want).max() <= 1
    assert np.abs(got.astype(int) - frame(ok.final, ok.final)).max() > 1  # the body read the provisional lip
    assert np.abs(got.astype(int) - frame(ok.provisional, ok.provisional)).max() > 1  # the mouth the final
    shut = frame(ok.provisional, np.zeros(lat.lip, np.float32))
    assert np.abs(bad.got[k].to_ndarray().astype(int) - shut).max() <= 1


class _SlowBodyPipeline:
    """A two-phase pipeline whose body takes far longer than a frame period (a slow CPU) and whose mouth is quick:
    a frame records which tick's body it was made on, the lip it was finished with and the pose it carries."""

    late_mouth = True

    def __init__(self, body_s):
        from types import SimpleNamespace

        from engine.config import LatentConfig

        self.cfg = SimpleNamespace(latents=LatentConfig())
        self.body_s = body_s

    def generate_body(self, avatars, z):
        time.sleep(self.body_s)
        sl = self.cfg.latents.slices()
        return {"pose": z[:, sl["pose"]].copy()}

    def generate_mouth(self, body, avatars, z):
        sl = self.cfg.latents.slices()
        return [(float(body["pose"][r, 0]), float(z[r, sl["lip"]][0]), float(z[r, sl["pose"]][0]))
                for r in range(len(z))]

    def encode_audio(self, mel):  # pragma: no cover - the sink gives its lips directly
        raise AssertionError("no audio here")

    def to_video_frames(self, frames):
        return list(frames)


class _TickSink(_PhasedSink):
    """Each tick's pose says its tick (pose[0] = k), its final lip says it too (lip[0] = k / 1000)."""

    interrupt_every = 0  # an interrupt (the epoch goes up by one) every so many ticks built
    epochs: dict

    def begin_job(self, k):
        job = super().begin_job(k)
        job.rest["pose"] = np.full(self.total_pose, float(k), np.float32)
        if self.interrupt_every:
            job.epoch = self.epochs[k] = sum(c == "begin" for c, _, _ in self.calls) // self.interrupt_every
        return job

    def finish_job(self, job):
        job = super().finish_job(job)
        job.lip = np.full_like(self.final, job.tick / 1000.0)
        return job

    def deliver(self, k, frame, epoch, z_lip=None, mouth_only=False):
        self.got[k] = (frame, mouth_only)


def test_lanes_fill_the_ticks_no_body_makes_with_the_newest_body_and_their_own_mouth():
    """A body that takes 4 periods on each of two lanes makes about half the ticks: the others are not skipped
    but made from the newest body there is (its pose) and their own mouth (their own tick's lip); a picture is
    flagged mouth-only when its body was shown already."""
    from streaming.scheduler import Scheduler

    p = _SlowBodyPipeline(body_s=0.16)
    lat = p.cfg.latents
    clock = MediaClock(25)
    sch = Scheduler(p, clock, ServerMetrics(), lead_s=0.01)
    sch.lanes = 2
    sch.est_body, sch.est_mouth = 0.16, 0.002
    sch.body_lead_s = 0.02
    sch.start()
    sink = _TickSink("s", object(), lat.total, lat.lip)
    sink.total_pose = lat.pose
    sink.interrupt_every, sink.epochs = 13, {}
    try:
        sch.add(sink)
        t0 = time.monotonic()
        while len(sink.got) < 60 and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        sch.remove(sink)
    finally:
        sch.stop()
    ks = sorted(sink.got)
    assert len(ks) >= 60 and sch.errors == 0
    span = range(ks[5], ks[-1] + 1)
    made = [k for k in span if k in sink.got]
    # nearly every tick has a picture of its own (not those between an interrupt and the first body after it)
    assert len(made) >= 0.8 * len(span), (len(made), len(span))
    bodies = {k: sink.got[k][0][0] for k in made}
    for k in made:
        body_tick, lip, pose = sink.got[k][0]
        assert body_tick == pose and body_tick <= k  # one body's pose, never a later tick's
        assert lip == pytest.approx(k / 1000.0)  # every picture's mouth reads its own tick's audio
    own = [k for k in made if bodies[k] == k]
    assert 0.15 * len(made) <= len(own) <= 0.75 * len(made), (len(own), len(made))  # bodies for about half
    prev = None
    for k in made:  # bodies shown in order; mouth-only exactly where the body was shown by the picture before
        if prev is not None:
            assert bodies[k] >= bodies[prev]
            if k == prev + 1:
                assert sink.got[k][1] == (bodies[k] == bodies[prev]), (k, sink.got[k], sink.got[prev])
        prev = k
    only = [k for k in made if sink.got[k][1]]
    assert 0.25 * len(made) <= len(only) <= 0.75 * len(made), (len(only), len(made))
    assert sch.mouth_only_ticks >= len(only) and sch.bodies_shown >= len(made) - len(only)
    # after an interrupt no picture is made from a body of before it (that body's jaw read the flushed speech)
    assert len(set(sink.epochs.values())) >= 5
    assert all(sink.epochs[bodies[k]] == sink.epochs[k] for k in made), \
        [(k, bodies[k]) for k in made if sink.epochs[bodies[k]] != sink.epochs[k]]


def test_the_mouth_phase_is_timed_beside_running_bodies_for_the_lanes_lead():
    """`--latency balanced|safe` with lanes size the lead on the mouth phase timed while `lanes` bodies run (on 2
    cores about twice its time alone): the bodies run during the timing, on their own threads, and stop after."""
    import threading

    from streaming.pipeline import mouth_time_beside_bodies

    class _Pipe(_SlowBodyPipeline):
        def __init__(self):
            super().__init__(body_s=0.004)
            from types import SimpleNamespace

            self.cfg = SimpleNamespace(latents=self.cfg.latents, audio=SimpleNamespace(n_mels=4), mel_window=6)
            self.bodies = 0
            self.body_threads = set()
            self.during = []

        def generate_body(self, avatars, z):
            self.bodies += 1
            self.body_threads.add(threading.current_thread().name)
            return super().generate_body(avatars, z)

        def encode_audio(self, mel):
            assert mel.shape == (1, 4, 6)
            self.during.append(self.bodies)

        def generate_mouth(self, body, avatars, z):
            time.sleep(0.003)
            return super().generate_mouth(body, avatars, z)

    p = _Pipe()
    t = mouth_time_beside_bodies(p, object(), lanes=2, repeats=6)
    assert 0.003 <= t < 0.5
    assert len(p.during) == 8 and p.during[-1] > p.during[0]  # bodies kept running while the mouth was timed
    assert {n for n in p.body_threads if n.startswith("marionette-warmup-lane")} == {"marionette-warmup-lane0",
                                                                                    "marionette-warmup-lane1"}
    assert not [th for th in threading.enumerate() if th.name.startswith("marionette-warmup-lane")]


def test_uploads_are_prepared_off_the_scheduler_thread_where_the_runtime_allows_it():
    """An upload's preparation (E_app, E_mot: 40-160 ms) on the scheduler thread would hold every session's frames:
    on ONNX Runtime / torch on a CPU it runs on a thread of its own; where concurrency is not safe (TensorRT) it
    stays a scheduler job."""
    import concurrent.futures
    import threading

    from streaming.avatars import AvatarStore

    class _Sched:
        def __init__(self):
            self.jobs = 0

        def submit(self, fn, *a):
            self.jobs += 1
            f = concurrent.futures.Future()
            f.set_result(fn(*a))
            return f

    class _Pipe:
        def __init__(self, concurrent_prepare):
            self.concurrent_prepare = concurrent_prepare
            self.threads = []

        def prepare_avatar(self, data):
            self.threads.append(threading.current_thread().name)
            return ("state", len(data))

    async def go(store, data):
        return await store.add(data)

    for allowed in (True, False):
        sch, pipe = _Sched(), _Pipe(allowed)
        store = AvatarStore(sch, pipe)
        try:
            entry, created = asyncio.run(go(store, b"x" * 10))
            assert created and entry.state == ("state", 10)
            again, created = asyncio.run(go(store, b"x" * 10))
            assert not created and again is entry and len(pipe.threads) == 1  # once per content
        finally:
            store.close()
        if allowed:
            assert sch.jobs == 0 and pipe.threads[0].startswith("marionette-avatar")
        else:
            assert sch.jobs == 1 and pipe.threads[0] == threading.current_thread().name


def test_inbound_audio_takes_any_rate_and_layout_even_changing_midstream():
    a = InboundAudio(0.2)
    t = 0.02
    for rate, stereo in [(48000, True), (16000, False), (44100, True)]:
        n = rate // 50
        x = (np.sin(np.arange(rate) * 2 * np.pi * 200 / rate) * 8000).astype(np.int16)
        for i in range(0, rate - n + 1, n):
            c = x[i:i + n]
            data = np.stack([c, c], 1).reshape(1, -1) if stereo else c.reshape(1, -1)
            f = av.AudioFrame.from_ndarray(data, format="s16", layout="stereo" if stereo else "mono")
            f.sample_rate = rate
            a.push(f, t)
            t += 0.02
    assert a.n48 == pytest.approx(3 * 48000, abs=3 * 960)  # three seconds, whatever came in
    assert a.n16 == pytest.approx(a.n48 / 3, abs=64)


def test_ice_servers_parse_and_bad_ones_are_input_errors():
    from engine.errors import InputError
    from streaming.ice import ice_servers
    from streaming.server import AvatarServer, ServeConfig

    s = ice_servers(["stun:stun.example.org:3478", "turn:alice:secret@turn.example.org:3478?transport=tcp"])
    assert s[0].urls == "stun:stun.example.org:3478" and s[0].username is None
    assert s[1].urls == "turn:turn.example.org:3478?transport=tcp" and (s[1].username, s[1].credential) == ("alice", "secret")
    assert ice_servers([]) == []  # none by default: nothing is contacted
    with pytest.raises(InputError, match="--ice-server"):
        AvatarServer(ServeConfig(ice_servers=("http://nope",)))
