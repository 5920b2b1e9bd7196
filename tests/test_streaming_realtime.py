"""The issue's real-time claims, timed (slow: excluded from the default suite because wall-clock
rates and latencies fail on a machine shared with other heavy jobs; run with `make test-slow` on a
quiet machine). Same server and client as test_streaming_e2e.py: lite config, 256x256, 127.0.0.1.

  * >= 24 fps of 256x256 video received for the whole run, no stall;
  * the two outbound tracks leave within 20 ms of each other for the same instant (one clock);
  * `interrupt`: the rest picture leaves at once (<= 15 ms), the first frame made after the flush within three
    ticks (+ the 12 ms grace);
  * a peer killed mid-stream is cleaned up within seconds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("aiortc")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from streaming.fixtures import (STATIC_HEAD, PeerProcess, ServerThread, espeak, responsive_checkpoint,  # noqa: E402
                                run_session, speech_with_pauses)
from streaming.server import ServeConfig  # noqa: E402



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "responsive", "lite")
    cfg = ServeConfig(checkpoint=ck, config="lite", ice_hosts=("127.0.0.1",), peer_timeout_s=3.0)
    with ServerThread(cfg) as st:
        yield st


def _load() -> str:
    return "load average %.1f %.1f %.1f on %d CPUs" % (*os.getloadavg(), os.cpu_count())


def test_full_frame_rate_and_one_clock(server):
    audio, _ = speech_with_pauses(["Hello there, how are you today?", "This is a test of lip sync."],
                                  pause_s=1.5, lead_s=1.0)
    r = asyncio.run(run_session(server.url, audio, len(audio) / 48000 + 0.5, controls=list(STATIC_HEAD)))
    t, st = r["t"], r["stats"]
    assert r["frames"].shape[1:] == (256, 256, 3)
    fps = (len(t) - 1) / (t[-1] - t[0])
    assert fps >= 24.0, f"received {fps:.2f} fps ({st['drops']}, round {st['round_ms']} ms; {_load()})"
    assert np.diff(t).max() < 0.25, f"a {np.diff(t).max():.2f} s stall ({_load()})"
    assert st["av_offset_max_ms"] <= 20 and abs(st["av_offset_mean_ms"]) < 5, (st, _load())


def test_interrupt_within_one_tick(server):
    speech = espeak("Aaaah I am speaking for a long time without stopping and now you may interrupt me", wpm=140)

    async def interrupts(c, mic):
        for _ in range(5):
            await c.request({"type": "interrupt"})
            await asyncio.sleep(0.45)

    r = asyncio.run(run_session(server.url, np.concatenate([np.zeros(24000, np.int16), speech]), 4.0,
                                controls=list(STATIC_HEAD), actions=[(1.2, interrupts)]))
    rest = r["stats"]["interrupt_rest_sent_ms"]  # the tick being waited for goes out at once, mouth at rest
    assert rest["n"] == 5 and rest["p95"] <= 15, (rest, _load())
    # the first frame made after the flush: the tick after the one the rest picture took, or the one after that
    # when its frame was already made (the lead) and there was no time left to remake it (it repeats the rest
    # picture): due within three ticks (+ the grace)
    lat = r["stats"]["interrupt_latency_ms"]
    assert lat["n"] == 5 and lat["p95"] <= 3 * 1000 / 25 + 15, (lat, _load())


def test_a_killed_peer_is_gone_within_seconds(server):
    with PeerProcess(server.url) as peer:
        victim = peer.session
        time.sleep(1.0)
        t0 = time.monotonic()
        peer.kill()
        while victim in server.server.sessions and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        gone = time.monotonic() - t0
        assert victim not in server.server.sessions
        assert gone < server.cfg.peer_timeout_s + 2.0, f"{gone:.1f} s ({_load()})"
