"""Lanes (streaming.scheduler): the bodies of two ticks in flight at once, each on its own one-thread ONNX Runtime
call, the mouth phases in order on the scheduler thread. The built-in model over a real aiortc peer."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("onnxruntime")

from streaming.fixtures import (STATIC_HEAD, ServerThread, mouth_deviation, run_session,  # noqa: E402
                                speech_labels, speech_with_pauses)
from engine.errors import InputError  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def lanes_server(builtin_onnx):
    from engine.checkpoint import builtin_checkpoint_dir

    # fps None: serve's default (auto), 50 at --latency low with ONNX Runtime in two phases and lanes
    cfg = ServeConfig(checkpoint=builtin_checkpoint_dir(), config="talk", backend="onnxruntime",
                      exported=builtin_onnx, ice_hosts=("127.0.0.1",), max_sessions=2, lanes=2, fps=None)
    with ServerThread(cfg) as st:
        yield st


def test_two_lanes_serve_the_builtin_talking_in_order_and_in_sync(lanes_server):
    st = lanes_server
    srv = st.server
    # the runtime was reopened with one inference thread per lane, and the frame is made in two phases
    assert srv.lanes == 2 and srv.pipeline.threads == 1 and srv.pipeline.rt.threads == 1
    assert srv.scheduler.phased and srv.scheduler.lanes == 2
    assert srv.fps == 50 and srv.clock.fps == 50  # --fps auto: a mouth on every tick of 50 a second
    audio, _ = speech_with_pauses(["Hello there, how are you today?", "This is a test of lip sync."],
                                  pause_s=1.5, lead_s=1.5)
    r = asyncio.run(run_session(st.url, audio, len(audio) / 48000 + 0.6, controls=list(STATIC_HEAD)))
    lanes = [t.name for t in threading.enumerate() if t.name.startswith("marionette-lane")]
    assert len(lanes) == 2, lanes  # the bodies ran on the two lane threads
    sch = srv.scheduler
    assert sch.errors == 0 and sch.rounds > 0
    # every tick of the stream reached the client, in order (a tick without its own picture repeats the last)
    mv = r["mv"]
    assert len(mv) > 200 and np.all(np.diff(mv) > 0)
    assert np.median(np.diff(mv)) == pytest.approx(0.02, abs=0.002)
    # a session's idle head and eyes come from the checkpoint's 25 fps learned model, stepped every other tick
    assert srv.pipeline.idle_model is not None and srv.pipeline.idle_model_for(srv.fps) is srv.pipeline.idle_model
    # the mouth (made last, from the newest audio) moves with the speech and rests in the pauses
    dev = mouth_deviation(r["frames"])
    lab = speech_labels(r)
    sp, si = lab == 1, lab == 0
    assert sp.sum() > 20 and si.sum() > 20
    assert dev[sp].mean() > 2 * dev[si].mean(), (dev[sp].mean(), dev[si].mean())
    # sound and picture stay together at the client
    s = r["stats"]
    assert abs(s["av_offset_mean_ms"]) < 20, s
    # ticks no body was made for in time carried their own mouth on the newest body (none on a machine fast enough):
    # the session, the scheduler and /metrics count them alike
    assert 0 <= s["frames_mouth_only"] <= s["frames_sent"] and 0 <= s["body_fps"] <= s["fps"], s
    assert s["frames_mouth_only"] <= srv.metrics.frames_mouth_only.value() <= sch.mouth_only_ticks  # (sent <= made)


def test_lanes_need_the_two_phase_frame(tmp_path):
    from streaming.fixtures import responsive_checkpoint

    ck = responsive_checkpoint(tmp_path / "responsive", "lite")  # no mouth net: one phase only
    cfg = ServeConfig(checkpoint=ck, config="lite", ice_hosts=("127.0.0.1",), lanes=2)
    import aioice.ice

    before = aioice.ice.get_host_addresses
    schedulers = {t for t in threading.enumerate() if t.name == "marionette-scheduler"}
    with pytest.raises(InputError, match="--lanes 2 needs the frame in two phases"):
        with ServerThread(cfg):
            pass
    # and the failed start left nothing behind: the ICE host restriction is undone, the scheduler stopped
    assert aioice.ice.get_host_addresses is before
    assert not [t for t in threading.enumerate() if t.name == "marionette-scheduler" and t not in schedulers]


def test_the_command_line_takes_lanes(monkeypatch):
    import streaming.server
    from marionette.cli import main

    seen = []
    monkeypatch.setattr(streaming.server, "serve", seen.append)
    assert main(["serve"]) == 0 and seen[-1].lanes is None  # auto
    assert main(["serve", "--lanes", "1"]) == 0 and seen[-1].lanes == 1
    assert main(["serve", "--lanes", "auto"]) == 0 and seen[-1].lanes is None
    assert seen[-1].fps is None  # --fps auto by default
    assert main(["serve", "--fps", "30"]) == 0 and seen[-1].fps == 30
    assert seen[-1].browser_playout == "sync"  # browsers hold each frame until its sound plays
    assert main(["serve", "--browser-playout", "asap"]) == 0 and seen[-1].browser_playout == "asap"
    assert main(["serve", "--no-playout-delay"]) == 0 and seen[-1].browser_playout == "sync"
    with pytest.raises(SystemExit) as e:
        main(["serve", "--fps", "fast"])
    assert e.value.code == 2
    for bad in ("0", "two", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--lanes", bad])
        assert e.value.code == 2
