"""A real aiortc peer for the server: sends speech as its microphone, receives the avatar video and
the delayed audio, speaks the control channel. Used by the tests and the benchmarks, and a starting
point for integrators (a TTS agent would feed `PcmSource.append` instead of a file).

Only ever give it loopback URLs in tests; ICE uses no STUN/TURN servers.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import av
import numpy as np
from aiortc import RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streaming.rtc import iter_frames, peer_connection, receiver_of, shorten_audio_jitter_buffer

RATE = 48000
PTIME_SAMPLES = 960
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)


class PcmSource(MediaStreamTrack):
    """A microphone made of int16 mono 48 kHz samples, paced in real time (20 ms frames).

    `append(samples)` queues more audio; when the queue runs dry it sends silence. For each frame it
    records when it left (`sent`: list of (first sample index, monotonic time)), so a benchmark knows
    when a given sample left the client. Frames go out as stereo with both channels the same (as browsers
    send them): given mono, aiortc's Opus encoder upmixes at -3 dB, so the server heard it 3 dB quieter."""

    kind = "audio"

    def __init__(self, samples: np.ndarray | None = None, channels: int = 2):
        super().__init__()
        self._buf = np.zeros(0, np.int16)
        self._pos = 0  # samples sent so far (the index of the next sample)
        self._start: float | None = None
        self.channels = channels
        self.sent: list[tuple[int, float]] = []
        if samples is not None:
            self.append(samples)

    def append(self, samples: np.ndarray) -> int:
        """Queue samples after what is queued (or now, if idle); returns the index of the first one."""
        x = np.asarray(samples)
        if x.dtype != np.int16:
            x = (np.clip(x, -1, 1) * 32767).astype(np.int16)
        first = self._pos + len(self._buf)  # _buf[0] is always sample index _pos
        self._buf = np.concatenate([self._buf, x])
        return first

    def clear(self) -> None:
        """Stop sending what is queued (the caller stops talking)."""
        self._buf = np.zeros(0, np.int16)

    @property
    def position(self) -> int:
        return self._pos

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._pos / RATE - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        n = PTIME_SAMPLES
        chunk = self._buf[:n]
        self._buf = self._buf[n:]
        if len(chunk) < n:
            chunk = np.concatenate([chunk, np.zeros(n - len(chunk), np.int16)])
        if self.channels == 2:
            data = np.stack([chunk, chunk], axis=1).reshape(1, -1)
            layout = "stereo"
        else:
            data = chunk.reshape(1, -1)
            layout = "mono"
        frame = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate = RATE
        frame.pts = self._pos
        frame.time_base = Fraction(1, RATE)
        self.sent.append((self._pos, time.monotonic()))
        if len(self.sent) > 200000:
            del self.sent[:100000]
        self._pos += n
        return frame


class SyntheticCamera(MediaStreamTrack):
    """A webcam made of pictures: `picture(t_seconds) -> (H, W, 3) uint8`, paced at `fps`."""

    kind = "video"

    def __init__(self, picture: Callable[[float], np.ndarray], fps: int = 25):
        super().__init__()
        self.picture = picture
        self.fps = fps
        self._start: float | None = None
        self._n = 0

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        else:
            wait = self._start + self._n / self.fps - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(self.picture(self._n / self.fps)), format="rgb24")
        frame.pts = self._n * 90000 // self.fps
        frame.time_base = Fraction(1, 90000)
        self._n += 1
        return frame


@dataclass
class Received:
    video: list = field(default_factory=list)  # (arrival monotonic, pts, ndarray (S,S,3) or None)
    audio: list = field(default_factory=list)  # (arrival monotonic, pts, rms)
    messages: list = field(default_factory=list)  # decoded JSON from the control channel


class AvatarClient:
    def __init__(self, base_url: str, *, keep_frames: bool = True, on_video: Callable | None = None,
                 on_audio: Callable | None = None, keep_audio: bool = False, audio_prefetch: int | None = 0,
                 decode_video: bool = True, token: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.token = token  # the server's bearer token (`serve --token`), if it has one
        self.session_key: str | None = None  # this session's own key (its /sessions/{id} routes want it)
        self.pc = peer_connection()  # no STUN/TURN, max-bundle
        self.session: str | None = None
        self.channel = None
        self.received = Received()
        self.keep_frames = keep_frames
        self.keep_audio = keep_audio
        self.audio_prefetch = audio_prefetch  # 0: each audio packet at once (aiortc's default, 4, holds 4 packets)
        self.audio_pcm: list[np.ndarray] = []
        self.on_video = on_video
        self.on_audio = on_audio
        self._tasks: list[asyncio.Task] = []
        self._channel_open = asyncio.Event()
        self._first_video = asyncio.Event()
        self._message_waiters: list = []
        self.decode_video = decode_video
        self.video_frames_seen = 0
        self.rtp_arrival: dict[str, dict[int, float]] = {"audio": {}, "video": {}}
        self.sender_reports: dict[str, list] = {"audio": [], "video": []}
        self.rtp_origin: dict[str, int] = {}  # decoded frames' pts count from the first RTP timestamp

    async def connect(self, mic: MediaStreamTrack | None = None, webcam: MediaStreamTrack | None = None,
                      avatar: str | None = None, controls=None, timeout: float = 20.0, relay=None) -> dict:
        """Offer, answer, wait for the control channel. `relay`: a `streaming.netem.UdpRelay` (or anything
        with `offer(sdp)` and `answer(sdp)`) that the media then crosses."""
        import aiohttp

        pc = self.pc
        if mic is not None:
            pc.addTransceiver(mic, direction="sendrecv")
        else:
            pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        if webcam is not None:
            pc.addTransceiver(webcam, direction="sendonly")
        self.channel = pc.createDataChannel("control")

        @self.channel.on("open")
        def _open():
            self._channel_open.set()

        @self.channel.on("message")
        def _msg(data):
            try:
                m = json.loads(data)
            except ValueError:
                return
            self.received.messages.append(m)
            for pred, fut in list(self._message_waiters):
                if not fut.done() and pred(m):
                    fut.set_result(m)

        @pc.on("track")
        def _track(track):
            if track.kind == "audio" and self.audio_prefetch is not None:
                shorten_audio_jitter_buffer(pc, track, self.audio_prefetch)
            self._hook_receiver(track)
            if track.kind == "video":
                self._tasks.append(asyncio.ensure_future(self._pull_video(track)))
            else:
                self._tasks.append(asyncio.ensure_future(self._pull_audio(track)))

        await pc.setLocalDescription(await pc.createOffer())
        offer = pc.localDescription.sdp
        body = {"sdp": relay.offer(offer) if relay is not None else offer, "type": "offer"}
        if avatar is not None:
            body["avatar"] = avatar
        if controls is not None:
            body["controls"] = controls
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with aiohttp.ClientSession() as http:
            async with http.post(self.base_url + "/offer", json=body, headers=headers) as r:
                answer = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"offer refused: {r.status} {answer}")
        self.session = answer["session"]
        self.session_key = answer.get("session_key")
        sdp = relay.answer(answer["sdp"]) if relay is not None else answer["sdp"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=answer["type"]))
        await asyncio.wait_for(self._channel_open.wait(), timeout)
        return answer

    def _hook_receiver(self, track) -> None:
        """Record, per kind, when the first RTP packet of each media timestamp arrived (before any
        jitter buffer or decoder) and every RTCP sender report (NTP wall time <-> RTP timestamp),
        which is what a browser uses to line audio and video up. With decode_video=False video
        packets are only counted (load generators for the capacity benchmark)."""
        from aiortc.rtp import RtcpSrPacket

        kind = track.kind
        rx = receiver_of(self.pc, track)
        if rx is None:
            return
        first = self.rtp_arrival[kind]
        srs = self.sender_reports[kind]
        orig_rtp, orig_rtcp = rx._handle_rtp_packet, rx._handle_rtcp_packet

        async def on_rtp(packet, arrival_time_ms):
            if kind not in self.rtp_origin:
                self.rtp_origin[kind] = packet.timestamp
            if packet.timestamp not in first and packet.payload:  # empty ones are padding / frame-end hints
                first[packet.timestamp] = time.monotonic()
                if len(first) > 4096:
                    for k in list(first)[:2048]:
                        del first[k]
                if kind == "video":
                    self.video_frames_seen += 1
            if kind == "video" and not self.decode_video:
                return
            await orig_rtp(packet, arrival_time_ms)

        async def on_rtcp(packet):
            if isinstance(packet, RtcpSrPacket):
                ntp = packet.sender_info.ntp_timestamp
                wall = (ntp >> 32) - NTP_EPOCH_OFFSET + (ntp & 0xFFFFFFFF) / 2 ** 32
                srs.append((time.monotonic(), wall, packet.sender_info.rtp_timestamp))
                if len(srs) > 2000:
                    del srs[:1000]
            await orig_rtcp(packet)

        rx._handle_rtp_packet = on_rtp
        rx._handle_rtcp_packet = on_rtcp

    def rtp_of(self, kind: str, pts: int) -> int | None:
        """The RTP timestamp of a decoded frame (aiortc's decoded pts start at 0)."""
        o = self.rtp_origin.get(kind)
        return None if o is None else (o + int(pts)) % 2 ** 32

    def first_packet_time(self, kind: str, pts: int) -> float | None:
        r = self.rtp_of(kind, pts)
        return None if r is None else self.rtp_arrival[kind].get(r)

    def media_time(self, kind: str, rtp_ts: int, rate: int, at: float | None = None) -> float | None:
        """Sender wall time (s) of an RTP timestamp through a sender report (the latest received
        before monotonic time `at`, default the latest)."""
        srs = self.sender_reports[kind]
        if not srs:
            return None
        pick = srs[-1]
        if at is not None:
            before = [x for x in srs if x[0] <= at]
            pick = before[-1] if before else srs[0]
        _, wall, ref = pick
        d = (rtp_ts - ref) % 2 ** 32
        if d >= 2 ** 31:
            d -= 2 ** 32
        return wall + d / rate

    async def wait_first_frame(self, timeout: float = 20.0) -> None:
        if not self.decode_video:
            t0 = time.monotonic()
            while self.video_frames_seen == 0:
                if time.monotonic() - t0 > timeout:
                    raise asyncio.TimeoutError
                await asyncio.sleep(0.02)
            return
        await asyncio.wait_for(self._first_video.wait(), timeout)

    async def _pull_video(self, track) -> None:
        async for frame in iter_frames(track):
            t = time.monotonic()
            arr = frame.to_ndarray(format="rgb24") if (self.keep_frames or self.on_video) else None
            if self.on_video is not None:
                self.on_video(t, frame.pts, arr)
            self.received.video.append((t, frame.pts, arr if self.keep_frames else None))
            self._first_video.set()

    async def _pull_audio(self, track) -> None:
        async for frame in iter_frames(track):
            t = time.monotonic()
            x = frame.to_ndarray()
            if frame.format.name.startswith("s16"):
                mono = x.reshape(-1, len(frame.layout.channels)).mean(axis=1) if not frame.format.is_planar \
                    else x.mean(axis=0)
                mono = mono.astype(np.float32) / 32768.0
            else:
                mono = x.reshape(-1).astype(np.float32)
            rms = float(np.sqrt(np.mean(mono * mono))) if len(mono) else 0.0
            if self.on_audio is not None:
                self.on_audio(t, frame.pts, mono, frame.sample_rate)
            self.received.audio.append((t, frame.pts, rms))
            if self.keep_audio:
                self.audio_pcm.append(mono)

    def send(self, msg) -> None:
        self.channel.send(msg if isinstance(msg, str) else json.dumps(msg))

    async def wait_message(self, pred: Callable[[dict], bool], timeout: float = 5.0) -> dict:
        for m in self.received.messages:
            if pred(m):
                return m
        fut = asyncio.get_running_loop().create_future()
        self._message_waiters.append((pred, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._message_waiters = [w for w in self._message_waiters if w[1] is not fut]

    async def request(self, msg: dict, timeout: float = 5.0) -> dict:
        """Send a control with a fresh id and wait for its answer (ack, stats or error)."""
        mid = f"r{time.monotonic_ns()}"
        self.send({**msg, "id": mid})
        return await self.wait_message(lambda m: m.get("id") == mid, timeout)

    def vanish(self) -> None:
        """Go silent without a goodbye, as a killed process would: from now on nothing this peer sends
        leaves (no RTP, RTCP, consent, DTLS close, SCTP abort); `close()` afterwards frees it locally."""
        vanish(self.pc)

    async def close(self) -> None:
        await self.pc.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


def vanish(pc) -> None:
    """Make an aiortc peer connection send nothing more (see `AvatarClient.vanish`): every datagram its ICE
    sockets would send is dropped. aioice sends through `StunProtocol.send_data` / `send_stun` only."""

    def drop(*args, **kwargs):
        return None

    async def adrop(*args, **kwargs):
        return None

    for t in list(getattr(pc, "_RTCPeerConnection__iceTransports", ())):
        conn = getattr(getattr(t, "_connection", None), "_protocols", None)  # aioice.Connection
        for proto in list(conn or ()):
            proto.send_data = adrop
            proto.send_stun = drop
