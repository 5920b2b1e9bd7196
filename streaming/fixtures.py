"""Test and benchmark fixtures made of real parts: speech from espeak-ng with known silences, a
"responsive" random checkpoint, the server on a background thread (`ServerThread`), one recorded
client session (`run_session`) and the analysis helpers the tests and benchmarks share (mouth
region deviation, speech labels on the sender's clock).

Why a responsive checkpoint: the engine zero-initialises the generator's flow and RGB heads, so a
freshly initialised (random-weights) model ignores z entirely and every frame is the portrait: lips,
pose and controls cannot be seen in the video until a trained checkpoint exists. The responsive
checkpoint is the same `Marionette` with those two layers and the audio encoder's output layer
re-drawn at a visible scale (seeded): z then moves pixels (not like a face would; it is still
random), which is what the streaming tests need to see lips follow speech and controls act.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

RESPONSIVE = {"flow_std": 1.5, "head_std": 0.3, "audio_gain": 600.0}


def responsive_checkpoint(out: Path, config: str = "lite", seed: int = 0) -> Path:
    """Write a z-responsive random checkpoint to `out` (see the module doc); returns `out`."""
    import torch

    from engine.checkpoint import default_expression_presets, save_checkpoint
    from engine.config import ModelConfig
    from engine.model import Marionette

    # a random model of `config` (never the built-in checkpoint, whatever is installed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Marionette(ModelConfig.preset(config)).eval()
    meta = {"expression_presets": default_expression_presets(model.cfg)}
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.generator.flow_out.weight.normal_(0, RESPONSIVE["flow_std"], generator=g)
        model.generator.head.weight.normal_(0, RESPONSIVE["head_std"], generator=g)
        model.e_aud.fc[-1].weight.mul_(RESPONSIVE["audio_gain"])
    meta = {"random_weights": True, "responsive_fixture": dict(RESPONSIVE), "seed": seed,
            "expression_presets": meta["expression_presets"]}
    return save_checkpoint(model, Path(out), meta=meta)


def espeak(text: str, rate: int = 48000, voice: str = "en-us", wpm: int = 160) -> np.ndarray:
    """Speech from the espeak-ng command line as int16 mono at `rate` (trailing silence trimmed)."""
    from engine.audio import load_audio

    fd, path = tempfile.mkstemp(suffix=".wav")
    os.close(fd)
    try:
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", path, text], check=True,
                       capture_output=True, timeout=60)
        x = load_audio(path, rate)
    finally:
        os.unlink(path)
    nz = np.flatnonzero(np.abs(x) > 1e-3)
    if len(nz):
        x = x[nz[0]: nz[-1] + 1]
    return (np.clip(x, -1, 1) * 32767).astype(np.int16)


def speech_with_pauses(texts, pause_s: float = 1.0, lead_s: float = 1.0, rate: int = 48000):
    """Utterances separated by digital silence -> (int16 samples, [(start, end) sample index of each
    utterance])."""
    parts = [np.zeros(int(lead_s * rate), np.int16)]
    spans = []
    pos = len(parts[0])
    for t in texts:
        x = espeak(t, rate)
        spans.append((pos, pos + len(x)))
        parts += [x, np.zeros(int(pause_s * rate), np.int16)]
        pos += len(x) + int(pause_s * rate)
    return np.concatenate(parts), spans


class ServerThread:
    """The server on its own event loop (uvloop when available) in a background thread, on
    127.0.0.1 and an ephemeral port: what the tests and the benchmarks run against.

        with ServerThread(ServeConfig(...)) as st:
            st.url; st.server (the AvatarServer); st.call(coroutine_function, *args)
    """

    def __init__(self, cfg, host: str = "127.0.0.1", pipeline=None):
        import dataclasses
        import threading

        self.cfg = dataclasses.replace(cfg, host=host, port=0)
        self.pipeline = pipeline  # a streaming.pipeline.Pipeline already loaded (None: the server loads cfg's)
        self.server = None
        self.loop = None
        self.port = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop = None
        self._thread = threading.Thread(target=self._main, name="marionette-test-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def _main(self) -> None:
        import asyncio

        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        import asyncio

        from aiohttp import web

        from streaming.server import AvatarServer

        self._stop = asyncio.Event()
        self.server = AvatarServer(self.cfg, self.pipeline)
        await self.server.start()
        runner = web.AppRunner(self.server.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        import gc

        gc.collect()  # as run_server: the heap frozen, so the collections after sessions close stay short
        gc.freeze()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await self.server.stop()
            gc.unfreeze()

    def start(self, timeout: float = 180.0) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, *args, timeout: float = 30.0):
        """Run coroutine function fn(*args) on the server's loop; returns its result."""
        import asyncio

        return asyncio.run_coroutine_threadsafe(fn(*args), self.loop).result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------ benchmark helpers
WORDS = ["hello", "yes", "banana", "open the door", "thank you", "good morning", "papa", "maybe",
         "one two three", "okay", "wonderful", "bottle", "marionette", "fine", "see you"]


def offer_sdp() -> str:
    """A real aiortc offer (send/receive audio, receive video) for tests that talk to /offer by hand."""
    import asyncio

    from aiortc import RTCConfiguration, RTCPeerConnection

    async def make():
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp

    return asyncio.run(make())


def mouth_region(frame: np.ndarray) -> np.ndarray:
    """The lower-middle region of a frame (H, W, 3) where the mouth is, as float32."""
    s = frame.shape[0]
    return frame[int(0.6 * s):int(0.9 * s), int(0.3 * s):int(0.7 * s)].astype(np.float32)


def default_checkpoint(tmp_dir: Path, config: str = "lite") -> tuple[Path, str]:
    """The trained built-in checkpoint when installed, else the responsive fixture; (path, what)."""
    from engine.checkpoint import builtin_checkpoint_dir

    b = builtin_checkpoint_dir()
    if b is not None:
        return b, "built-in checkpoint"
    return responsive_checkpoint(Path(tmp_dir) / f"responsive-{config}", config), \
        f"responsive random fixture ({config}; no trained checkpoint installed)"


def send_time_of_sample(sent: list, index: int) -> float | None:
    """When the 20 ms packet holding sample `index` left a PcmSource (its `sent` list)."""
    import bisect

    starts = [p for p, _ in sent]
    i = bisect.bisect_right(starts, index) - 1
    if i < 0 or index >= sent[i][0] + 960:
        return None
    return sent[i][1]


def percentiles(values, ps=(50, 95)) -> dict:
    a = np.asarray(values, np.float64)
    if not len(a):
        return {"n": 0}
    out = {"n": int(len(a)), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    for p in ps:
        out[f"p{p}"] = float(np.percentile(a, p))
    return out


# ---------------------------------------------------------------------------- one recorded session
STATIC_HEAD = ({"type": "source", "factor": "pose", "from": "controls"},
               {"type": "source", "factor": "eye", "from": "controls"})  # only the lips move


async def run_session(url: str, audio, seconds: float, controls=None, actions=(), mic=None, webcam=None) -> dict:
    """Connect a recording `AvatarClient` speaking `audio`, run `actions` ((at_s, async fn(client, mic)),
    at their times), keep it `seconds` in all, close it. Returns the received video (arrival time,
    frames, sender-clock media time), audio (arrival, RMS, media time), the last stats, the actions'
    results."""
    import asyncio
    import time

    from streaming.client import AvatarClient, PcmSource

    mic = mic or PcmSource(audio)
    c = AvatarClient(url)
    await c.connect(mic=mic, controls=list(controls) if controls else None, webcam=webcam)
    await c.wait_first_frame(30)
    t0 = time.monotonic()
    results = {}
    for at, fn in sorted(actions, key=lambda a: a[0]):
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        results[at] = await fn(c, mic)
    await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
    stats = await c.request({"type": "stats"}, timeout=10)
    await c.close()
    v, a = c.received.video, c.received.audio

    def media(kind, pts, rate):  # the sender's clock through the RTCP sender reports, as a browser lines up A/V
        m = c.media_time(kind, c.rtp_of(kind, pts), rate)
        return np.nan if m is None else m

    return {"t": np.array([x[0] for x in v]), "frames": np.stack([x[2] for x in v]),
            "mv": np.array([media("video", x[1], 90000) for x in v]),
            "ta": np.array([x[0] for x in a]), "ra": np.array([x[2] for x in a]),
            "ma": np.array([media("audio", x[1], 48000) for x in a]),
            "stats": stats, "client": c, "mic": mic, "results": results, "t0": t0}


def mouth_deviation(frames: np.ndarray, rest_frames: int = 8) -> np.ndarray:
    """Per frame: mean |mouth region - the mouth region at rest (median of the first frames)|."""
    m = np.stack([mouth_region(f) for f in frames])
    rest = np.median(m[:rest_frames], axis=0)
    return np.abs(m - rest).mean(axis=(1, 2, 3))


def speech_labels(rec: dict, loud: float = 0.01, quiet: float = 1e-3) -> np.ndarray:
    """Per received video frame of `run_session`: 1 speech, 0 silence, -1 in between, from the
    returned audio playing at the frame's instant on the sender's clock (a frame shows the frame
    period of audio centred on its tick; an audio frame covers 20 ms from its timestamp)."""
    ma, ra = rec["ma"], rec["ra"]
    out = []
    for x in rec["mv"]:
        near = ra[(ma > x - 0.04) & (ma < x + 0.02)]
        wide = ra[(ma > x - 0.30) & (ma < x + 0.20)]
        if len(near) and near.max() > loud:
            out.append(1)
        elif len(wide) and wide.max() < quiet:
            out.append(0)
        else:
            out.append(-1)
    return np.array(out)


def speech_ends(rec: dict, loud: float = 0.01, pause_s: float = 0.8) -> list[float]:
    """Sender-clock times at which the returned audio's utterances end (followed by >= pause_s quiet)."""
    ends = rec["ma"][rec["ra"] > loud] + 0.02
    return [float(x) for x, nxt in zip(ends, np.r_[ends[1:], np.inf]) if nxt - x > pause_s]


_PEER_SCRIPT = r"""
import asyncio, sys, numpy as np
from streaming.ice import restrict_host_candidates
from streaming.client import AvatarClient, PcmSource
restrict_host_candidates(["127.0.0.1"])
async def main():
    c = AvatarClient(sys.argv[1], keep_frames=False, decode_video=False)
    await c.connect(mic=PcmSource((np.sin(np.arange(48000 * 60) * 0.03) * 5000).astype(np.int16)))
    await c.wait_first_frame(30)
    print("CONNECTED", c.session, flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


class PeerProcess:
    """A real aiortc peer in its own process, connected to `url` and talking (a tone as its microphone),
    so a test can SIGKILL it and watch the server notice. `with PeerProcess(url) as p:` waits until its
    first frame arrived; `p.session` is its session id, `p.kill()` kills it without goodbye."""

    def __init__(self, url: str):
        import sys

        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, "-c", _PEER_SCRIPT, url], cwd=root, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": str(root)})
        self.session: str | None = None

    def __enter__(self) -> "PeerProcess":
        line = self.proc.stdout.readline()
        if not line.startswith("CONNECTED"):
            self.__exit__()
            raise RuntimeError(f"the peer process did not connect: {line!r}")
        self.session = line.split()[1]
        return self

    def kill(self) -> None:
        import signal

        os.kill(self.proc.pid, signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class ServeProcess:
    """`marionette serve ARGS... --port 0` in its own process (what an operator runs), its log collected on a
    thread; `with ServeProcess([...]) as sp:` waits for "serving on" and knows `sp.url`, `sp.pid`;
    `sp.signal(SIGTERM)`, `sp.wait(timeout)` -> exit status, `sp.log()` -> the log so far."""

    def __init__(self, args, timeout: float = 180.0):
        import sys
        import threading

        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "marionette", "serve", *map(str, args), "--port", "0"],
                                     cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.port: int | None = None
        self.timeout = timeout
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="serve-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import re

        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"serving on http://[^ ]*:(\d+)/", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self) -> "ServeProcess":
        if not self._ready.wait(self.timeout) or self.port is None:
            self.__exit__()
            raise RuntimeError("marionette serve did not start:\n" + self.log()[-4000:])
        return self

    def signal(self, sig) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(5)


# ------------------------------------------------------------------------------------------- churn
# one connect/disconnect cycle each (benchmarks/churn.py, tests/test_server_operations.py):
#   clean        a talking peer that gets video, then closes (DTLS close, SCTP shutdown)
#   vanish       the same, then goes silent without a goodbye (what the server sees of a killed process)
#   kill         a real peer process killed with SIGKILL (streaming.fixtures.PeerProcess; ~2 s to start)
#   no_ice       an offer whose peer never answers ICE (closed hold_s after posting it)
#   no_audio     a video-only offer: no audio m-line, a data channel; gets video, closes
#   mid_message  a talking peer that sends a large control message and closes the channel and itself at once
CHURN_KINDS = ("clean", "vanish", "kill", "no_ice", "no_audio", "mid_message")


async def churn_cycle(url: str, kind: str, seed: int = 0, hold_s: float = 0.3, token: str | None = None) -> dict:
    """One cycle of `kind` against the server at `url` -> {"kind", "ok", "refused", "seconds", "error"?}.
    ok: it went as that kind goes (a 503/429 is "refused", not a failure of the cycle)."""
    import asyncio
    import json
    import time

    import aiohttp
    from aiortc import RTCSessionDescription

    from streaming.client import AvatarClient, PcmSource
    from streaming.rtc import peer_connection

    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    tone = (np.sin(np.arange(48000 * 5) * (0.02 + 0.01 * (seed % 7))) * 5000).astype(np.int16)
    out = {"kind": kind, "ok": False, "refused": False}

    async def post(sdp):
        async with aiohttp.ClientSession() as http:
            async with http.post(url.rstrip("/") + "/offer", json={"sdp": sdp, "type": "offer"},
                                 headers=headers) as r:
                return r.status, await r.json()

    try:
        if kind in ("clean", "vanish", "mid_message"):
            c = AvatarClient(url, keep_frames=False, decode_video=False, token=token)
            try:
                await c.connect(mic=PcmSource(tone))
                await c.wait_first_frame(20)
                await asyncio.sleep(hold_s)
                if kind == "vanish":
                    c.vanish()
                elif kind == "mid_message":
                    # larger than one SCTP chunk (fragmented), over the control limit, and the channel and
                    # the connection closed right behind it
                    c.channel.send(json.dumps({"type": "pose", "yaw": 1.0, "pad": "x" * (96 * 1024 + seed)}))
                    c.channel.close()
            finally:
                await c.close()
        elif kind == "kill":
            def run():
                with PeerProcess(url) as p:
                    p.kill()

            await asyncio.to_thread(run)
        elif kind in ("no_ice", "no_audio"):
            pc = peer_connection()
            try:
                got = asyncio.Event()
                if kind == "no_audio":
                    pc.addTransceiver("video", direction="recvonly")
                    pc.createDataChannel("control")

                    @pc.on("track")
                    def on_track(track):
                        async def first():
                            try:
                                await track.recv()
                                got.set()
                            except Exception:  # noqa: BLE001 - the track ended
                                pass

                        asyncio.ensure_future(first())
                else:
                    pc.addTransceiver("audio", direction="sendrecv")
                    pc.addTransceiver("video", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                status, body = await post(pc.localDescription.sdp)
                if status != 200:
                    raise RuntimeError(f"offer refused: {status} {body}")
                if kind == "no_audio":
                    await pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type="answer"))
                    await asyncio.wait_for(got.wait(), 20)
                await asyncio.sleep(hold_s)  # (no_ice: a client that waits a moment, then gives up)
            finally:
                await pc.close()
        else:
            raise ValueError(f"unknown churn kind {kind!r} (valid: {', '.join(CHURN_KINDS)})")
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported per cycle
        msg = f"{type(e).__name__}: {e}"
        out["refused"] = "offer refused: 503" in msg or "offer refused: 429" in msg
        if out["refused"]:
            import re

            m = re.search(r"'reason': '(\w+)'", msg)
            out["reason"] = m.group(1) if m else msg[15:18]
        out["error"] = msg[:300]
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out
