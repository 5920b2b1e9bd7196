"""Headless Chromium as the client (slow): the demo page at / with `?auto=1`, a fake microphone
playing espeak-ng speech with silences from a WAV file, 127.0.0.1 only. Reads what the browser
decoded (getStats, and the video element drawn into a canvas) back through selenium."""

from __future__ import annotations

import shutil
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from streaming.fixtures import ServerThread, responsive_checkpoint, speech_with_pauses  # noqa: E402
from streaming.server import ServeConfig  # noqa: E402


def _write_wav(path: Path, x: np.ndarray, rate: int = 48000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(x.astype("<i2").tobytes())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "responsive", "lite")
    with ServerThread(ServeConfig(checkpoint=ck, ice_hosts=("127.0.0.1",))) as st:
        yield st


@pytest.fixture()
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    audio, _ = speech_with_pauses(["Hello from the browser, can you see my lips?"], pause_s=2.0, lead_s=1.0)
    wav = tmp_path / "mic.wav"
    _write_wav(wav, audio)
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
                 "--allow-loopback-in-peer-connection", "--autoplay-policy=no-user-gesture-required",
                 "--disable-dev-shm-usage"]:
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(fn, timeout, what):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_chromium_fake_microphone_drives_the_avatar(server, browser):
    browser.get(server.url + "/?auto=1")
    _wait(lambda: browser.execute_script("return window.marionette && window.marionette.session"), 30, "a session")
    video = _wait(lambda: browser.execute_script(
        "const v = window.marionette.browserStats.video; return v && v.framesDecoded > 50 ? v : null"), 40,
        "decoded frames")
    assert (video["frameWidth"], video["frameHeight"]) == (256, 256)
    sid = browser.execute_script("return window.marionette.session")
    assert sid in server.server.sessions
    # read decoded frames from the page: the mouth region over ~8 s of speech and silence
    samples = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8:
        s = browser.execute_script("return window.marionette.sampleRegion()")
        if s:
            samples.append(np.array(s["pixels"], np.float32))
        time.sleep(0.05)
    px = np.stack(samples)
    rest = np.median(px, axis=0)  # more silence than speech in the looped file
    dev = np.abs(px - rest).mean(axis=1)
    assert (dev < 3).mean() > 0.2, "the mouth never rests"
    assert (dev > 6).mean() > 0.1, "the mouth never moves"
    # controls from the page change the frames; the server answers with stats on the channel
    before = np.array(browser.execute_script("return window.marionette.sampleRegion(0, 0, 1, 1, 32)")["pixels"], np.float32)
    browser.execute_script("window.marionette.send({type: 'source', factor: 'pose', from: 'controls'});"
                           "window.marionette.send({type: 'pose', yaw: 30, pitch: 15, roll: 0, transition_ms: 0});")
    time.sleep(1.0)
    after = np.array(browser.execute_script("return window.marionette.sampleRegion(0, 0, 1, 1, 32)")["pixels"], np.float32)
    assert np.abs(after - before).mean() > 2
    stats = _wait(lambda: browser.execute_script("return window.marionette.stats"), 10, "stats")
    assert stats["type"] == "stats" and stats["fps"] >= 10, stats  # a functional check; the rate is tested with aiortc
    assert stats["audio_frames_in"] > 100 and not browser.execute_script("return window.marionette.errors")
    browser.execute_script("document.getElementById('stop').click()")
    _wait(lambda: sid not in server.server.sessions, 10, "the session to close")
