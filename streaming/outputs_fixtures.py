"""Real parts for testing the outputs: a private nginx-rtmp ingest on 127.0.0.1 that records what it
receives, a reader that pulls a recording back with PyAV, and a WHIP receiver built on aiortc.

nginx-rtmp (Debian: nginx-light + libnginx-mod-rtmp, `make system-deps`) runs as its own instance,
never the system service: a config in a temp dir with `daemon off`, its pid and logs there, the
record directory world-writable (its worker drops privileges; as root it keeps them: `user root`).
`restart()` kills it and starts it again on the same port: a publisher that reconnects shows up as a
new recording file.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

RTMP_MODULE_PATHS = ("/usr/lib/nginx/modules/ngx_rtmp_module.so", "/usr/share/nginx/modules/ngx_rtmp_module.so")


def nginx_rtmp_missing() -> str | None:
    """Why a local nginx-rtmp cannot run here (None when it can)."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return "nginx is not installed (apt-get install nginx-light libnginx-mod-rtmp, or make system-deps)"
    if not any(Path(p).exists() for p in RTMP_MODULE_PATHS):
        return "nginx's RTMP module is not installed (apt-get install libnginx-mod-rtmp, or make system-deps)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NginxRtmp:
    """`with NginxRtmp(tmp_dir) as ng:` publish to `ng.url("name")`; `ng.recordings("name")` lists
    the .flv files it wrote (one per publish), oldest first."""

    def __init__(self, root: Path, port: int | None = None):
        why = nginx_rtmp_missing()
        if why:
            raise RuntimeError(why)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.rec = self.root / "rec"
        self.rec.mkdir(exist_ok=True)
        os.chmod(self.rec, 0o777)
        os.chmod(self.root, 0o755)
        self.port = port or _free_port()
        self.module = next(p for p in RTMP_MODULE_PATHS if Path(p).exists())
        self.conf = self.root / "nginx.conf"
        # as root, nginx's worker would drop to nobody, who cannot reach a private temp dir (pytest's are 0700)
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(f"""load_module {self.module};
{user}daemon off;
master_process on;
worker_processes 1;
pid {self.root}/nginx.pid;
error_log {self.root}/error.log info;
events {{ worker_connections 64; }}
rtmp {{
    server {{
        listen 127.0.0.1:{self.port};
        chunk_size 4096;
        application live {{
            live on;
            record all;
            record_path {self.rec};
            record_unique on;
        }}
    }}
}}
""")
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []

    def url(self, name: str = "stream") -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{name}"

    def start(self, timeout: float = 10.0) -> "NginxRtmp":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(["nice", "-n", "10", nginx, "-c", str(self.conf), "-p", str(self.root)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): {self.error_log()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    self.starts.append(time.monotonic())
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {self.port}: {self.error_log()[-2000:]}")

    def kill(self) -> None:
        """Kill the whole nginx (master and worker) at once, as a crash would."""
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(10)

    def restart(self, down_s: float = 0.0) -> float:
        """Kill, stay down `down_s`, start again; returns the monotonic time it listens again."""
        self.kill()
        time.sleep(down_s)
        self.start()
        return self.starts[-1]

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGQUIT)  # graceful: finish the recordings
            p.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)

    def recordings(self, name: str = "stream") -> list[Path]:
        return sorted(self.rec.glob(f"{name}-*.flv"), key=lambda p: (p.stat().st_mtime, p.name))

    def error_log(self) -> str:
        p = self.root / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def __enter__(self) -> "NginxRtmp":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_recording(path, decode: bool = True, mouth: bool = True) -> dict:
    """A recorded stream -> packet timestamps of both streams (s), and when `decode`: the decoded
    audio (48 kHz mono float, with the pts of its first sample) and per video frame its pts and the
    mean of the mouth region (or the whole frame) in grey levels."""
    import av

    from streaming.fixtures import mouth_region

    out = {"video_pts": [], "audio_pts": [], "frames": [], "frame_pts": [], "audio": [], "audio_t0": None,
           "width": None, "height": None, "fps": None, "codecs": {}}
    with av.open(str(path)) as c:
        vs = c.streams.video[0] if c.streams.video else None
        as_ = c.streams.audio[0] if c.streams.audio else None
        for s in (vs, as_):
            if s is not None:
                out["codecs"][s.type] = s.codec_context.name
        if vs is not None:
            out["fps"] = float(vs.average_rate) if vs.average_rate else None
        rs = av.AudioResampler(format="flt", layout="mono", rate=48000) if decode else None
        for pkt in c.demux():
            if pkt.pts is None:
                continue
            t = float(pkt.pts * pkt.time_base)
            (out["video_pts"] if pkt.stream.type == "video" else out["audio_pts"]).append(t)
            if not decode:
                continue
            for fr in pkt.decode():
                if pkt.stream.type == "video":
                    img = fr.to_ndarray(format="rgb24")
                    out["width"], out["height"] = fr.width, fr.height
                    out["frame_pts"].append(float(fr.pts * fr.time_base) if fr.pts is not None else t)
                    out["frames"].append(mouth_region(img) if mouth else img.astype(np.float32))
                else:
                    if out["audio_t0"] is None:
                        out["audio_t0"] = float(fr.pts * fr.time_base) if fr.pts is not None else t
                    for g in rs.resample(fr):
                        out["audio"].append(g.to_ndarray().reshape(-1))
    out["video_pts"] = np.asarray(out["video_pts"])
    out["audio_pts"] = np.asarray(out["audio_pts"])
    out["frame_pts"] = np.asarray(out["frame_pts"])
    out["audio"] = np.concatenate(out["audio"]) if out["audio"] else np.zeros(0, np.float32)
    return out


def envelope(audio: np.ndarray, t0: float, hop_s: float = 0.01, rate: int = 48000):
    """RMS per hop -> (times of hop starts, rms)."""
    hop = int(rate * hop_s)
    n = len(audio) // hop
    x = audio[:n * hop].reshape(n, hop)
    return t0 + np.arange(n) * hop_s, np.sqrt((x.astype(np.float64) ** 2).mean(axis=1))


def onsets(t: np.ndarray, level: np.ndarray, thresh: float, min_gap_s: float = 0.5) -> list[float]:
    """Times where `level` first rises above `thresh` after at least `min_gap_s` below it."""
    out, last_above = [], -np.inf
    for ti, v in zip(t, level):
        if v > thresh:
            if ti - last_above > min_gap_s:
                out.append(float(ti))
            last_above = ti
    return out


class WhipReceiver:
    """A WHIP endpoint on 127.0.0.1 built on aiohttp + aiortc: answers POSTed offers, records what
    arrives (video frames with their arrival time and pts, audio frames), DELETE ends the session.
    Runs on the caller's event loop: `await rx.start()`, `rx.url`, `await rx.stop()`."""

    def __init__(self, reject: int = 0):
        self.url = None
        self.video: list = []  # (arrival monotonic, pts s, mouth-region mean)
        self.audio: list = []  # (arrival monotonic, pts s, rms)
        self.pcs: list = []
        self.posts = 0
        self.deletes = 0
        self.reject = reject  # answer the first N offers with 503 (exercises the retry)
        self._runner = None
        self._tasks: list = []

    async def start(self) -> "WhipReceiver":
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/whip", self._post)
        app.router.add_delete("/whip/{n}", self._delete)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/whip"
        return self

    async def _post(self, request):
        import asyncio

        from aiohttp import web
        from aiortc import RTCSessionDescription

        from streaming.rtc import peer_connection

        self.posts += 1
        if request.content_type != "application/sdp":
            return web.Response(status=415, text="application/sdp please")
        if self.reject > 0:
            self.reject -= 1
            return web.Response(status=503, text="try again")
        offer = await request.text()
        pc = peer_connection()
        self.pcs.append(pc)

        @pc.on("track")
        def on_track(track):
            self._tasks.append(asyncio.ensure_future(self._pull(track)))

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whip/{len(self.pcs) - 1}"})

    async def _delete(self, request):
        from aiohttp import web

        self.deletes += 1
        n = int(request.match_info["n"])
        if 0 <= n < len(self.pcs):
            await self.pcs[n].close()
        return web.Response(status=200)

    async def _pull(self, track) -> None:
        from streaming.fixtures import mouth_region
        from streaming.rtc import iter_frames

        async for f in iter_frames(track):
            now = time.monotonic()
            ts = float(f.pts * f.time_base) if f.pts is not None else float("nan")
            if track.kind == "video":
                self.video.append((now, ts, float(mouth_region(f.to_ndarray(format="rgb24")).mean()),
                                   f.width, f.height))
            else:
                x = f.to_ndarray().astype(np.float32) / 32768.0
                self.audio.append((now, ts, float(np.sqrt((x ** 2).mean()))))

    async def stop(self) -> None:
        import asyncio

        for pc in self.pcs:
            await pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
