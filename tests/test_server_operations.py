"""A day of real use (issue 15), against real servers and real aiortc peers on 127.0.0.1: admission control
from the measured round time, dead peers and a reconnecting user's own ghost, draining on shutdown (in
process and a real `marionette serve` on SIGTERM), churn with abrupt exits that leaves nothing behind, and
(slow) a session through a lossy, jittery relay.

No timing assertions: frames are judged by count (sent against ticks, received against sent), and waits
have generous limits that only a broken feature reaches."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time

import numpy as np
import pytest

pytest.importorskip("aiortc")
aiohttp = pytest.importorskip("aiohttp")

from streaming.client import AvatarClient, PcmSource  # noqa: E402
from streaming.fixtures import PeerProcess, ServeProcess, ServerThread  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from streaming.fixtures import responsive_checkpoint

    return responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny")


def _cfg(ck, **kw) -> ServeConfig:
    return ServeConfig(checkpoint=ck, config="tiny", ice_hosts=("127.0.0.1",), **kw)


def _tone(seconds: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * 48000)) / 48000
    return (np.sin(2 * np.pi * hz * t) * 6000).astype(np.int16)


async def _http(method: str, url: str, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, **kw) as r:
            body = await r.read()
            try:
                return r.status, json.loads(body), r.headers
            except ValueError:
                return r.status, body.decode(errors="replace"), r.headers


async def _connect(url, mic=True, **kw) -> AvatarClient:
    c = AvatarClient(url, keep_frames=False)
    await c.connect(mic=PcmSource(_tone(60.0)) if mic else None, **kw)
    await c.wait_first_frame(20)
    return c


async def _wait_for(pred, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


def _counts(server, sid) -> tuple[int, int]:
    s = server.sessions[sid]
    return s.frames_sent, s.frames_dropped


def _load() -> str:
    import os

    return "load average %.1f %.1f %.1f on %d CPUs" % (*os.getloadavg(), os.cpu_count())


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ------------------------------------------------------------------------------- admission control
def _slow_generate(pipeline, per_row_s: float):
    """The pipeline's generator made to take per_row_s per session in the batch (a slower machine)."""
    orig = pipeline.generate

    def generate(avatars, z):
        t0 = time.perf_counter()
        out = orig(avatars, z)
        rest = per_row_s * len(avatars) - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return out

    pipeline.generate = generate
    return orig


def test_offers_past_capacity_get_503_and_running_sessions_keep_their_rate(tiny):
    from streaming.pipeline import Pipeline

    # a machine where a round costs 15 ms per session (warmup included), against a 24 ms budget: one
    # session fits, a second would not (30 ms); whatever else loads the machine only makes rounds longer
    pipeline = Pipeline.load(tiny, "tiny", "torch")
    _slow_generate(pipeline, 0.015)
    with ServerThread(_cfg(tiny, max_sessions=6, round_budget_ms=24.0), pipeline=pipeline) as st:
        srv = st.server

        async def run():
            a = await _connect(st.url)
            try:
                await _wait_for(lambda: 1 in srv.scheduler.round_times.live(), 20, "rounds of one measured")
                control = _counts(srv, a.session)
                await asyncio.sleep(2.5)  # the control window: the session alone, no offers
                before = _counts(srv, a.session)
                refused = []
                for _ in range(3):  # a ramp past capacity: each one refused, none let in
                    c = AvatarClient(st.url, keep_frames=False)
                    c.pc.addTransceiver("audio", direction="sendrecv")
                    c.pc.addTransceiver("video", direction="recvonly")
                    await c.pc.setLocalDescription(await c.pc.createOffer())
                    refused.append(await _http("POST", st.url + "/offer",
                                               json={"sdp": c.pc.localDescription.sdp, "type": "offer"}))
                    await c.pc.close()
                    await asyncio.sleep(0.3)
                health = await _http("GET", st.url + "/healthz")
                info = await _http("GET", st.url + "/info")
                metrics = await _http("GET", st.url + "/metrics")
                await asyncio.sleep(2.0)
                after = _counts(srv, a.session)
                return refused, health, info, metrics, control, before, after
            finally:
                await a.close()

        refused, health, info, metrics, control, before, after = asyncio.run(run())
        for status, body, headers in refused:
            assert status == 503, body
            assert body["reason"] == "overloaded" and "capacity" in body["error"] and body["load"] > 0
            assert int(headers["Retry-After"]) >= 1 and body["retry_after_s"] >= 1
        assert srv.metrics.sessions_rejected.value(reason="overloaded") == 3
        assert srv.metrics.sessions_total.value() == 1
        st_, h, _ = health
        assert st_ == 200 and h["status"] == "ok" and h["admitting"] is False and h["load"] > 0.5
        adm = info[1]["admission"]
        assert adm["admitting"] is False and adm["reason"] == "overloaded" and adm["sessions"] == 1
        assert adm["predicted_round_next_ms"] > adm["round_budget_ms"] == 24.0
        text = metrics[1]
        assert _metric(text, "marionette_admitting") == 0 and _metric(text, "marionette_load") > 0.5
        assert _metric(text, "marionette_round_budget_seconds") == pytest.approx(0.024)
        # the running session kept its frame rate while offers were refused: the refused offers cost it next to
        # nothing, at most two ticks in 25 fewer got their frame than alone (the control window before), and
        # 24 in 25 is always enough
        def share(x, y):
            ticks = (y[0] - x[0]) + (y[1] - x[1])
            assert ticks > 25
            return (y[0] - x[0]) / ticks

        alone, ramp = share(control, before), share(before, after)
        # (CI-like run on the slowest machine: 0.968 alone, 0.921 beside the refused offers, 1.2 ticks in 25 apart)
        assert ramp >= min(24 / 25, alone - 2 / 25), (alone, ramp, adm, _load())


def test_admission_off_and_max_sessions_stays_a_hard_cap(tiny):
    from streaming.pipeline import Pipeline

    pipeline = Pipeline.load(tiny, "tiny", "torch")
    _slow_generate(pipeline, 0.020)
    with ServerThread(_cfg(tiny, max_sessions=2, round_budget_ms=30.0, admission=False), pipeline=pipeline) as st:
        async def run():
            a, b = await _connect(st.url), await _connect(st.url)  # admitted: no prediction consulted
            try:
                status, body, headers = await _http("POST", st.url + "/offer",
                                                    json={"sdp": a.pc.localDescription.sdp, "type": "offer"})
                return status, body, headers
            finally:
                await a.close()
                await b.close()

        status, body, headers = asyncio.run(run())
        assert status == 503 and body["reason"] == "full" and "full" in body["error"] and headers["Retry-After"]


def test_round_time_prediction():
    from streaming.scheduler import RoundTimes

    now = [0.0]
    rt = RoundTimes(min_samples=3, clock=lambda: now[0])
    assert rt.predict(1) == 0.0  # nothing known: nothing refused
    rt.seed({1: 0.010, 2: 0.014})
    assert rt.predict(2) == pytest.approx(0.014) and rt.predict(4) == pytest.approx(0.014 + 2 * 0.004)
    for _ in range(5):
        rt.add(1, 0.020)  # the machine runs twice as slow as at warmup
    assert rt.predict(1) == pytest.approx(0.020)
    assert rt.predict(2) == pytest.approx(0.020 + 0.008)  # the warmup's slope, scaled by 2 (not its stale t(2))
    for _ in range(5):
        rt.add(2, 0.035)
    assert rt.predict(3) == pytest.approx(0.035 + 0.015)  # two live sizes: their slope
    now[0] = 100.0  # measurements that old no longer count: the warmup's again
    assert rt.predict(2) == pytest.approx(0.014)
    rt2 = RoundTimes(min_samples=3, clock=lambda: now[0])
    for _ in range(5):
        rt2.add(1, 0.002)
        rt2.add(2, 0.030)
    assert rt2.predict(3) == pytest.approx(0.030 + 0.015)  # a slope above t(m)/m is noise: capped there
    for _ in range(5):
        rt2.add(1, 0.029)
    assert rt2.predict(3) == pytest.approx(0.030 + 0.0015)  # and at least a tenth of it


# ------------------------------------------------------------------------------------- dead peers
def test_killed_peer_ghost_is_reaped_for_its_reconnecting_client(tiny):
    # peer timeout far away: only ghost reaping can free the slot in this test (and admission control off:
    # on a busy machine it would refuse the second session for another reason)
    with ServerThread(_cfg(tiny, max_sessions=2, peer_timeout_s=60.0, admission=False)) as st:
        srv = st.server
        with PeerProcess(st.url) as peer:
            ghost = peer.session

            async def run():
                a = await _connect(st.url)  # the server is now full
                try:
                    assert len(srv.sessions) == 2
                    peer.kill()  # vanishes without a goodbye
                    g = srv.sessions[ghost]
                    attempts, c = [], None
                    t0 = time.monotonic()
                    while c is None and time.monotonic() - t0 < 30:
                        x = AvatarClient(st.url, keep_frames=False)  # the same client address reconnects
                        try:
                            await x.connect(mic=PcmSource(_tone(30.0)))
                            await x.wait_first_frame(20)
                            c = x
                        except RuntimeError as e:
                            attempts.append(str(e))
                            await x.close()
                            await asyncio.sleep(0.5)
                    try:
                        assert c is not None, attempts[-3:]
                        return (g.close_reason, a.session in srv.sessions, a.pc.connectionState,
                                c.session in srv.sessions, attempts)
                    finally:
                        if c is not None:
                            await c.close()
                finally:
                    await a.close()

            reason, a_alive, a_state, c_alive, attempts = asyncio.run(run())
        assert reason and reason.startswith("replaced"), reason
        assert a_alive and a_state == "connected"  # a live session of the same address is never reaped
        assert c_alive
        assert all("503" in x and "full" in x for x in attempts)  # refused only while the ghost still spoke
        assert srv.metrics.sessions_reaped.value(reason="ghost") == 1


def test_vanished_peer_frees_its_slot(tiny):
    with ServerThread(_cfg(tiny, max_sessions=4, peer_timeout_s=1.5)) as st:
        srv = st.server

        async def run():
            c = await _connect(st.url)
            sid = c.session
            await asyncio.sleep(0.5)
            c.vanish()  # nothing more leaves it: no RTP, RTCP, consent, DTLS close
            try:
                await _wait_for(lambda: sid not in srv.sessions, 30, "the vanished peer's session closing")
            finally:
                await c.close()
            return sid

        sid = asyncio.run(run())
        assert sid not in srv.sessions and not srv.scheduler.sessions


# ---------------------------------------------------------------------------------------- shutdown
def test_drain_says_goodbye_refuses_offers_and_ends_when_sessions_leave(tiny):
    with ServerThread(_cfg(tiny, max_sessions=4, admission=False)) as st:  # (two sessions, whatever the load)
        srv = st.server

        async def run():
            leaver, stayer = await _connect(st.url), await _connect(st.url)
            try:
                drain = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.drain(120.0), st.loop))
                bye = await leaver.wait_message(lambda m: m.get("type") == "goodbye", 10)
                await leaver.close()
                bye2 = await stayer.wait_message(lambda m: m.get("type") == "goodbye", 10)
                offer = await _http("POST", st.url + "/offer", json={"sdp": stayer.pc.localDescription.sdp,
                                                                     "type": "offer"})
                health = await _http("GET", st.url + "/healthz")
                assert not drain.done()  # one session is still there
                await stayer.close()
                result = await asyncio.wait_for(drain, 60)
                return bye, bye2, offer, health, result
            finally:
                await leaver.close()
                await stayer.close()

        bye, bye2, offer, health, result = asyncio.run(run())
        assert bye["reason"] == "server shutting down" and bye["drain_s"] == 120.0 and bye2["type"] == "goodbye"
        status, body, headers = offer
        assert status == 503 and body["reason"] == "draining" and "shutting down" in body["error"]
        assert int(headers["Retry-After"]) >= 1
        assert health[0] == 503 and health[1]["status"] == "draining"
        assert result["left"] == 2 and result["remaining"] == 0 and not result["forced"]


def test_sigterm_drains_and_a_second_signal_forces(tiny):
    from streaming.ice import restrict_host_candidates

    hosts = restrict_host_candidates(["127.0.0.1"])  # this process's client: loopback only
    try:
        with ServeProcess(["--checkpoint", tiny, "--config", "tiny", "--backend", "torch", "--align", "off",
                           "--ice-host", "127.0.0.1", "--offer-rate", "off", "--drain-timeout", "300"]) as sp:
            async def run():
                c = await _connect(sp.url)  # stays: ignores its goodbye
                try:
                    sp.signal(signal.SIGTERM)
                    bye = await c.wait_message(lambda m: m.get("type") == "goodbye", 20)
                    offer = await _http("POST", sp.url + "/offer", json={"sdp": c.pc.localDescription.sdp,
                                                                         "type": "offer"})
                    health = await _http("GET", sp.url + "/healthz")
                    still = sp.proc.poll() is None
                    sp.signal(signal.SIGTERM)  # the second one: close everything now
                    rc = await asyncio.to_thread(sp.wait, 60)  # far less than the 300 s drain
                    return bye, offer, health, still, rc
                finally:
                    await c.close()

            bye, offer, health, still, rc = asyncio.run(run())
            log = sp.log()
        assert bye["type"] == "goodbye" and bye["reason"] == "server shutting down"
        assert offer[0] == 503 and offer[1]["reason"] == "draining"
        assert health[0] == 503 and health[1]["status"] == "draining"
        assert still, "the server exited before the session left or the drain timed out"
        assert rc == 0, log[-3000:]
        assert "SIGTERM again: closing every session now" in log and "drain forced" in log
        assert "server stopped" in log and "Traceback" not in log
    finally:
        hosts.restore()


# ------------------------------------------------------------------------------------------- churn
def _os_threads() -> int:
    from pathlib import Path

    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def _threads() -> tuple[int, int]:
    """(OS threads but the executors' pooled workers, pooled workers): a pool grows on demand up to its
    bound (the server loop's default executor runs aiortc's encoders), which is not a leak."""
    import threading

    pool = sum(1 for t in threading.enumerate() if t.name.startswith(("uvloop_", "asyncio_", "ThreadPoolExecutor")))
    return _os_threads() - pool, pool


def _fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_churn_with_abrupt_exits_leaves_nothing_behind(tiny):
    from streaming.fixtures import CHURN_KINDS as KINDS
    from streaming.fixtures import churn_cycle as run_cycle

    # (admission off: a busy machine must not turn this leak test into one of admission control)
    with ServerThread(_cfg(tiny, max_sessions=8, peer_timeout_s=1.5, connect_timeout_s=2.0, admission=False)) as st:
        srv = st.server

        async def tasks():
            return len(asyncio.all_tasks())

        def settle():
            t0 = time.monotonic()
            while (srv.sessions or srv.scheduler.sessions) and time.monotonic() - t0 < 30:
                time.sleep(0.1)
            # (no gc.collect here: the server's own collection after sessions close must free the codecs and
            # their threads, which reference cycles would otherwise keep until the collector happens to run)
            time.sleep(1.5)

        async def cycles(kinds):
            out = []
            for i, k in enumerate(kinds):
                out.append(await run_cycle(st.url, k, seed=i))
            return out

        rng = random.Random(15)
        asyncio.run(cycles([k for k in KINDS if k != "kill"]))  # warm up: executors, codecs, pools
        settle()
        base = (st.call(tasks), _threads(), _fds())
        kinds = [rng.choice([k for k in KINDS if k != "kill"]) for _ in range(40)]
        results = asyncio.run(cycles(kinds))
        settle()
        # a loaded machine tears the last sessions' codecs down later (CI once saw threads 12 -> 18 at the first
        # look): wait up to 20 s for the counts to come back; a leak grows with the 40 sessions and stays
        t0 = time.monotonic()
        while True:
            after = (st.call(tasks), _threads(), _fds())
            if (after[0] <= base[0] and after[1][0] <= base[1][0] + 1 and after[2] <= base[2]) \
                    or time.monotonic() - t0 > 20:
                break
            time.sleep(0.5)
        assert not srv.sessions and srv.scheduler.sessions == ()
        failed = [r for r in results if not r["ok"] and not r["refused"]]
        assert not failed, failed
        refused = [r for r in results if r["refused"]]  # only ever "full", by ghosts younger than a few seconds
        assert len(refused) <= 4 and all(r["reason"] == "full" for r in refused), refused
        assert after[0] <= base[0], f"server tasks {base[0]} -> {after[0]}"
        # (one native thread a library starts lazily is allowed; a leak grows with the 40 sessions)
        assert after[1][0] <= base[1][0] + 1, f"threads (but pooled workers) {base[1]} -> {after[1]}"
        assert after[1][1] <= 32, f"pooled workers {base[1]} -> {after[1]}"
        assert after[2] <= base[2], f"open fds {base[2]} -> {after[2]}"
        import gc

        from aiortc import RTCPeerConnection

        from streaming.session import Session

        gc.collect()
        alive = [type(o).__name__ for o in gc.get_objects() if type(o) in (Session, RTCPeerConnection)]
        assert not alive, alive


# ------------------------------------------------------------------------------------ loss, jitter
@pytest.mark.slow  # ~15 s: kept out of the default suite's budget
def test_session_survives_loss_and_jitter_and_recovers(tiny):
    from streaming.netem import Impairment, UdpRelay

    with ServerThread(_cfg(tiny, max_sessions=2)) as st:
        srv = st.server
        audio_s = [0.0]  # seconds of audio the client decoded

        def on_audio(t, pts, mono, rate):
            audio_s[0] += len(mono) / rate

        async def window(c, s, seconds):
            def snap():
                tr = s.video_track  # frames that went out (repeats of a held picture included, where made)
                return (len(c.received.video), tr.frames_sent + getattr(tr, "frames_repeated", 0), audio_s[0],
                        c.received.audio[-1][1] / 48000 if c.received.audio else 0.0, srv.clock.now())

            a = snap()
            await asyncio.sleep(seconds)
            b = snap()
            return {"video_rx": b[0] - a[0], "video_tx": b[1] - a[1], "audio_rx_s": b[2] - a[2],
                    "audio_pts_s": b[3] - a[3], "clock_s": b[4] - a[4]}

        async def run():
            relay = await UdpRelay.create(seed=15)
            c = AvatarClient(st.url, keep_frames=False, on_audio=on_audio)
            try:
                await c.connect(mic=PcmSource(_tone(120.0)), relay=relay)
                await c.wait_first_frame(20)
                s = srv.sessions[c.session]
                clean = await window(c, s, 1.5)
                relay.set(Impairment(loss=0.10, jitter_ms=30.0, delay_ms=5.0))
                span = asyncio.ensure_future(window(c, s, 10.0))  # the loss, the recovery and after it
                lossy = await window(c, s, 5.0)
                lossy_stats = relay.stats()
                relay.set(Impairment())
                await asyncio.sleep(2.0)  # recovery
                after = await window(c, s, 3.0)
                span = await span
                stats = await c.request({"type": "stats"}, timeout=10)
                return clean, lossy, after, span, lossy_stats, stats, s.closed
            finally:
                await c.close()
                relay.close()

        clean, lossy, after, span, lossy_stats, stats, closed = asyncio.run(run())
        print("relay: clean", clean, "lossy", lossy, "after", after, "span", span, lossy_stats, "A/V mean",
              stats["av_offset_mean_ms"], "gap ms", stats["audio_gap_ms"], _load())
        assert not closed
        assert lossy_stats["up"]["dropped"] > 20 and lossy_stats["down"]["dropped"] > 20
        assert lossy_stats["down"]["reordered"] > 0
        # under loss: degraded but flowing (frames lost or held, never a stall)
        assert lossy["video_rx"] >= 0.5 * lossy["video_tx"] > 0, lossy
        assert lossy["audio_rx_s"] >= 0.25 * lossy["clock_s"], lossy  # (late packets count as lost)
        # 2 s after the loss stopped: every frame the server sends arrives again, and all the audio
        assert after["video_rx"] >= 0.95 * after["video_tx"] - 2, after
        assert after["audio_rx_s"] >= 0.9 * after["clock_s"], after
        # audio kept its clock: over the 10 s of loss and recovery its timestamps advanced with the server's
        # media clock (not stretched, not squeezed, nothing skipped or doubled), and it went out lined up with
        # the video
        assert abs(span["audio_pts_s"] / span["clock_s"] - 1) < 0.05, span
        assert stats["av_offset_mean_ms"] is not None and abs(stats["av_offset_mean_ms"]) < 20


def test_relay_drops_delays_and_reorders_plain_udp():
    """The relay on its own, between two plain UDP sockets: seeded loss near its rate, bursts, reordering
    under jitter, and nothing lost or reordered once the impairment is lifted."""
    from streaming.netem import Impairment, UdpRelay

    async def run():
        loop = asyncio.get_running_loop()
        got = {"client": [], "server": []}

        class Sink(asyncio.DatagramProtocol):
            def __init__(self, name):
                self.name = name

            def datagram_received(self, data, addr):
                got[self.name].append(int(data))

        ct, _ = await loop.create_datagram_endpoint(lambda: Sink("client"), local_addr=("127.0.0.1", 0))
        stt, _ = await loop.create_datagram_endpoint(lambda: Sink("server"), local_addr=("127.0.0.1", 0))
        cport, sport = ct.get_extra_info("sockname")[1], stt.get_extra_info("sockname")[1]
        line = "a=candidate:1 1 udp 2130706431 127.0.0.1 {} typ host\r\n"
        relay = await UdpRelay.create(seed=3)
        try:
            offer = relay.offer("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n" + line.format(cport))
            answer = relay.answer("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\n" + line.format(sport))
            assert f" {relay.port_b} typ host" in offer and f" {relay.port_a} typ host" in answer
            with pytest.raises(ValueError):
                relay.offer("v=0\r\nm=audio 9 X 96\r\n")  # no candidate to stand in for
            relay.set(up=Impairment(loss=0.1, burst_loss=0.01, burst_len=5, jitter_ms=20.0))
            for i in range(1000):
                ct.sendto(str(i).encode(), ("127.0.0.1", relay.port_a))  # client -> server
                if i % 10 == 0:
                    await asyncio.sleep(0.002)
            await asyncio.sleep(0.3)
            lossy, st = list(got["server"]), relay.stats()["up"]
            relay.set(Impairment())
            got["server"].clear()
            for i in range(200):
                ct.sendto(str(i).encode(), ("127.0.0.1", relay.port_a))
                stt.sendto(str(i).encode(), ("127.0.0.1", relay.port_b))  # server -> client
            await asyncio.sleep(0.3)
            return lossy, st, list(got["server"]), list(got["client"])
        finally:
            relay.close()
            ct.close()
            stt.close()

    lossy, st, clean_up, clean_down = asyncio.run(run())
    assert st["received"] == 1000 and st["dropped"] == 1000 - len(lossy) and st["burst_dropped"] > 0
    assert 0.08 < st["dropped"] / 1000 < 0.25
    assert st["reordered"] > 0 and lossy != sorted(lossy)
    assert clean_up == list(range(200)) and clean_down == list(range(200))
