"""A LiveKit Agents avatar: `MarionetteVideoGenerator`, a `livekit.agents.voice.avatar.VideoGenerator` that
`AvatarRunner` drives, the model running in the agent's (or the avatar worker's) own process.
`pip install 'marionette[livekit]'`.

In-process (the agent publishes the avatar itself):

    head = await TalkingHead(TalkingHeadConfig(avatar="me.jpg")).start()
    gen = MarionetteVideoGenerator(head)
    w, h = head.frame_size
    runner = AvatarRunner(room, audio_recv=QueueAudioOutput(...), video_gen=gen,
                          options=AvatarOptions(video_width=w, video_height=h, video_fps=25,
                                                audio_sample_rate=24000, audio_channels=1))

Remote avatar worker (a process of its own joins the room and listens on `lk.audio_stream`): the same
generator with `DataStreamAudioReceiver(room)` as `audio_recv`, the agent side using `DataStreamAudioOutput`
(examples/livekit_agent.py shows both).

The interface (livekit-agents 1.x): `push_audio(rtc.AudioFrame | AudioSegmentEnd)`, `clear_buffer()`, and
an async iterator of `rtc.VideoFrame` (RGBA) / `rtc.AudioFrame` / `AudioSegmentEnd`. Each 1/25 s the
iterator gives the video frame, then the audio frame with the same 40 ms of the agent's speech (original
sample rate and channels; none in silence), so `AvatarRunner`'s AV synchronizer gets them together; after an
utterance's last audio it gives `AudioSegmentEnd` (the runner then reports playback finished). With no speech
the avatar idles with the mouth shut. `clear_buffer()` (the user interrupted) drops the pending speech at
once: the next frame has none of it and the mouth shut.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator
    from livekit.agents.voice.avatar import AvatarSession as _BaseAvatarSession
except ModuleNotFoundError as e:  # pragma: no cover - the extra is missing
    raise ModuleNotFoundError(f"{e.name} is missing: the LiveKit avatar needs the `livekit` extra: "
                              "pip install 'marionette[livekit]'") from e

from marionette_integrations.avatar import AvatarFrame, TalkingHead

log = logging.getLogger(__name__)


class MarionetteVideoGenerator(VideoGenerator):
    """See the module doc. `head`: a started `TalkingHead` (its `frame_size` is the video size to publish)."""

    def __init__(self, head: TalkingHead):
        if head.pipeline is None or head.motion is None:
            raise ValueError("start the TalkingHead first: head = await TalkingHead(cfg).start()")
        self.head = head
        self._alpha: np.ndarray | None = None

    # -------------------------------------------------------------------------------- VideoGenerator
    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.head.end_segment()
            return
        self.head.push_audio(bytes(frame.data.cast("B")), frame.sample_rate, frame.num_channels)

    def clear_buffer(self) -> None:
        self.head.interrupt()

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        async for f in self.head.frames():
            yield self.video_frame(f)
            if f.audio is not None:
                yield rtc.AudioFrame(f.audio.tobytes(), f.sample_rate, f.channels, len(f.audio))
            if f.segment_end:
                yield AudioSegmentEnd()

    # ------------------------------------------------------------------------------------- helpers
    def video_frame(self, f: AvatarFrame) -> rtc.VideoFrame:
        h, w = f.image.shape[:2]
        rgba = np.empty((h, w, 4), np.uint8)
        rgba[..., :3] = f.image
        rgba[..., 3] = 255
        return rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, rgba.tobytes())

    def control(self, message: dict) -> None:
        self.head.control(message)

    async def aclose(self) -> None:
        await self.head.aclose()


# ================================================================================ the remote pattern
# The avatar worker: a livekit-agents worker of its own (`python -m marionette_integrations.livekit worker`),
# registered for explicit dispatch under an agent name. The agent side's `AvatarSession.start` dispatches it
# to the agent's room (the AgentDispatch API) with a small JSON metadata; the worker accepts the job as the
# avatar's identity, publishing on the agent's behalf (`lk.publish_on_behalf`), and runs livekit-agents' own
# AvatarRunner: audio from the agent's `lk.audio_stream` byte streams (DataStreamAudioReceiver, which also
# answers `lk.clear_buffer` and sends `lk.playback_started` / `lk.playback_finished`), video and audio from
# MarionetteVideoGenerator on a head of the worker's TalkingHeadPool: every session of the worker is batched by
# one scheduler thread on its GPU (jobs run as threads of the worker process, sharing the pool).
# The worker's load (LiveKit's dispatcher balances on it, and stops sending jobs at `load_threshold`) is
# the pool's: the figure `marionette serve` reports as marionette_load.

import json  # noqa: E402
import re  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

AGENT_NAME = "marionette-avatar"
_IDENTITY = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


@dataclass(frozen=True)
class AvatarJob:
    """What the agent side tells the worker in the dispatch's metadata (JSON)."""

    agent_identity: str  # the agent participant: the audio's sender, the one the avatar publishes for
    avatar_identity: str  # the identity the worker joins as (the agent's DataStreamAudioOutput sends to it)
    avatar: str | None = None  # a name of the worker's avatars (None: its default)
    sample_rate: int = 24000  # what the agent's TTS sends (AvatarOptions.audio_sample_rate)
    controls: tuple = ()  # control messages applied from the first frame (e.g. an expression)

    def __post_init__(self):
        for name in ("agent_identity", "avatar_identity"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _IDENTITY.match(v):
                raise ValueError(f"{name} {v!r}: 1-128 characters of letters, digits and _ . : @ -")
        if self.agent_identity == self.avatar_identity:
            raise ValueError("the avatar needs an identity of its own, not the agent's")
        if self.avatar is not None and (not isinstance(self.avatar, str) or not _IDENTITY.match(self.avatar)):
            raise ValueError(f"avatar {self.avatar!r}: a name of the worker's avatars")
        if not isinstance(self.sample_rate, int) or not 8000 <= self.sample_rate <= 48000:
            raise ValueError(f"sample_rate {self.sample_rate!r}: 8000-48000")
        if not all(isinstance(c, dict) and isinstance(c.get("type"), str) for c in self.controls):
            raise ValueError("controls: a list of control messages ({\"type\": ...})")

    def to_metadata(self) -> str:
        d = {"agent_identity": self.agent_identity, "avatar_identity": self.avatar_identity,
             "sample_rate": self.sample_rate}
        if self.avatar is not None:
            d["avatar"] = self.avatar
        if self.controls:
            d["controls"] = [dict(c) for c in self.controls]
        return json.dumps(d)

    @classmethod
    def from_metadata(cls, text: str | None) -> "AvatarJob":
        try:
            d = json.loads(text or "")
        except ValueError:
            raise ValueError("the dispatch metadata is not JSON (dispatch the worker with AvatarSession)") from None
        if not isinstance(d, dict):
            raise ValueError("the dispatch metadata must be a JSON object")
        unknown = set(d) - {"agent_identity", "avatar_identity", "avatar", "sample_rate", "controls"}
        if unknown:
            raise ValueError(f"unknown dispatch metadata fields: {sorted(unknown)}")
        return cls(agent_identity=d.get("agent_identity"), avatar_identity=d.get("avatar_identity"),
                   avatar=d.get("avatar"), sample_rate=d.get("sample_rate", 24000),
                   controls=tuple(d.get("controls") or ()))


class AvatarSession(_BaseAvatarSession):
    """The agent side of the remote pattern (as livekit-agents' avatar plugins' AvatarSession):

        avatar = AvatarSession(avatar="alice")               # a name the worker knows (None: its default)
        await avatar.start(session, room=ctx.room)          # dispatches a worker, routes the TTS audio to it
        await session.start(agent=..., room=ctx.room, room_options=room_io.RoomOptions(audio_output=False))

    `start` asks LiveKit to dispatch an avatar worker (agent name `agent_name`) to the room, with an `AvatarJob`
    as metadata, and sets `agent_session.output.audio` to a DataStreamAudioOutput aimed at the avatar's
    identity (it waits for the avatar's video track before sending). The API credentials default to the
    job's (LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET)."""

    def __init__(self, *, avatar: str | None = None, agent_name: str = AGENT_NAME, avatar_identity: str | None = None,
                 sample_rate: int = 24000, controls=(), livekit_url: str | None = None, api_key: str | None = None,
                 api_secret: str | None = None):
        super().__init__()
        if not isinstance(agent_name, str) or not _IDENTITY.match(agent_name):
            raise ValueError(f"agent_name {agent_name!r}: the avatar worker's registered name")
        self.avatar = avatar
        self.agent_name = agent_name
        self._identity = avatar_identity
        self.sample_rate = int(sample_rate)
        self.controls = tuple(dict(c) for c in controls)
        self._url, self._key, self._secret = livekit_url, api_key, api_secret
        self.job: AvatarJob | None = None
        self.dispatch = None
        if avatar_identity is not None:  # validated now, as the rest of the job
            AvatarJob(agent_identity="agent", avatar_identity=avatar_identity, avatar=avatar,
                      sample_rate=self.sample_rate, controls=self.controls)

    @property
    def avatar_identity(self) -> str:
        if self._identity is None:
            raise RuntimeError("the avatar's identity is set when the session starts")
        return self._identity

    @property
    def provider(self) -> str:
        return "marionette"

    def make_job(self, agent_identity: str) -> AvatarJob:
        """The job the worker is dispatched with, for the agent participant `agent_identity`."""
        if self._identity is None:
            self._identity = f"{self.agent_name}-{agent_identity}"[:128]
        self.job = AvatarJob(agent_identity=agent_identity, avatar_identity=self._identity, avatar=self.avatar,
                             sample_rate=self.sample_rate, controls=self.controls)
        return self.job

    def dispatch_request(self, room_name: str, agent_identity: str):
        from livekit import api

        return api.CreateAgentDispatchRequest(agent_name=self.agent_name, room=room_name,
                                              metadata=self.make_job(agent_identity).to_metadata())

    async def start(self, agent_session, room: rtc.Room, *, livekit_url: str | None = None,
                    livekit_api_key: str | None = None, livekit_api_secret: str | None = None) -> None:
        import os

        from livekit import api
        from livekit.agents.voice.avatar import DataStreamAudioOutput

        await super().start(agent_session, room)
        req = self.dispatch_request(room.name, room.local_participant.identity)
        url = livekit_url or self._url or os.environ.get("LIVEKIT_URL")
        key = livekit_api_key or self._key or os.environ.get("LIVEKIT_API_KEY")
        secret = livekit_api_secret or self._secret or os.environ.get("LIVEKIT_API_SECRET")
        if not (url and key and secret):
            raise ValueError("the LiveKit URL, API key and secret are needed to dispatch the avatar worker "
                             "(arguments or LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET)")
        async with api.LiveKitAPI(url, key, secret) as lk:
            self.dispatch = await lk.agent_dispatch.create_dispatch(req)
        agent_session.output.audio = DataStreamAudioOutput(room, destination_identity=self.avatar_identity,
                                                           sample_rate=self.sample_rate,
                                                           wait_remote_track=rtc.TrackKind.KIND_VIDEO)


@dataclass
class AvatarWorker:
    """The worker side: a TalkingHeadPool (one model, one scheduler thread batching every session of this
    worker) and the livekit-agents AgentServer that takes jobs for it.

    `avatars`: {name: portrait path} the agents may ask for by name ("default" or the first: the default; none:
    the built-in avatar). `load_threshold`: LiveKit stops dispatching to this worker above it."""

    pool: Any
    avatars: dict = field(default_factory=dict)
    agent_name: str = AGENT_NAME
    load_threshold: float = 0.9
    heads: dict = field(default_factory=dict)  # room name -> the job's TalkingHead

    def __post_init__(self):
        if not isinstance(self.agent_name, str) or not _IDENTITY.match(self.agent_name):
            raise ValueError(f"agent_name {self.agent_name!r}: letters, digits and _ . : @ -")
        if not 0 < float(self.load_threshold) < 1:
            raise ValueError(f"load_threshold {self.load_threshold}: in (0, 1) (LiveKit's production mode)")
        for name, path in self.avatars.items():
            if not _IDENTITY.match(name):
                raise ValueError(f"avatar name {name!r}: letters, digits and _ . : @ -")
            if not Path(path).is_file():
                raise ValueError(f"avatar {name}: {path} is not a file")

    # ------------------------------------------------------------------------------- load
    def load(self) -> float:
        """The worker's load for LiveKit's dispatcher: the pool's (marionette_load), capped at 1."""
        return min(1.0, float(self.pool.load()))

    # ----------------------------------------------------------------------------- a job
    def avatar_path(self, name: str | None):
        if name is None:
            if not self.avatars:
                return None
            return self.avatars.get("default", next(iter(self.avatars.values())))
        if name not in self.avatars:
            raise ValueError(f"avatar {name!r}: this worker has {sorted(self.avatars) or 'only its default'}")
        return self.avatars[name]

    async def on_request(self, req) -> None:
        """Accept a dispatch when its metadata is a valid AvatarJob and the pool takes one more head."""
        from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

        try:
            job = AvatarJob.from_metadata(req.job.metadata)
            self.avatar_path(job.avatar)
        except ValueError as e:
            log.warning("avatar job for room %s refused: %s", getattr(req.room, "name", "?"), e)
            await req.reject()
            return
        if not self.pool.admitting():
            log.warning("avatar job refused: the pool is full (load %.2f)", self.pool.load())
            await req.reject()
            return
        await req.accept(identity=job.avatar_identity, name="Marionette",
                         attributes={ATTRIBUTE_PUBLISH_ON_BEHALF: job.agent_identity})

    async def start_head(self, job: AvatarJob):
        """The job's TalkingHead (on the pool) and its VideoGenerator."""
        fields = {"avatar": self.avatar_path(job.avatar)}
        if job.controls:
            fields["controls"] = tuple(self.pool.config.controls) + tuple(job.controls)
        head = await self.pool.head(**fields).start()
        return head, MarionetteVideoGenerator(head)

    def runner_options(self, head, job: AvatarJob):
        from livekit.agents.voice.avatar import AvatarOptions

        w, h = head.frame_size
        return AvatarOptions(video_width=w, video_height=h, video_fps=head.fps,
                             audio_sample_rate=job.sample_rate, audio_channels=1)

    async def entrypoint(self, ctx) -> None:
        """One avatar session: join as the avatar, take the agent's lk.audio_stream, publish the avatar."""
        from livekit.agents.voice.avatar import AvatarRunner, DataStreamAudioReceiver

        job = AvatarJob.from_metadata(ctx.job.metadata)
        await ctx.connect()
        head, gen = await self.start_head(job)
        self.heads[ctx.room.name] = head
        audio_recv = DataStreamAudioReceiver(ctx.room, sender_identity=job.agent_identity)
        runner = AvatarRunner(ctx.room, audio_recv=audio_recv, video_gen=gen, options=self.runner_options(head, job))

        async def _close():
            await runner.aclose()
            await head.aclose()
            self.heads.pop(ctx.room.name, None)

        ctx.add_shutdown_callback(_close)
        await runner.start()

    def server(self, *, url: str | None = None, api_key: str | None = None, api_secret: str | None = None,
               **server_options):
        """The livekit-agents AgentServer for this worker: explicit dispatch under `agent_name`, jobs as
        threads of this process (they share the pool), load = the pool's."""
        from livekit.agents import AgentServer
        from livekit.agents.worker import JobExecutorType

        srv = AgentServer(job_executor_type=JobExecutorType.THREAD, load_fnc=self.load,
                          load_threshold=float(self.load_threshold), ws_url=url, api_key=api_key,
                          api_secret=api_secret, **server_options)
        srv.rtc_session(self.entrypoint, agent_name=self.agent_name, on_request=self.on_request)
        return srv


def run_avatar_worker(*, url: str | None = None, api_key: str | None = None, api_secret: str | None = None,
                      avatars: dict | None = None, config=None, agent_name: str = AGENT_NAME,
                      max_heads: int = 8, load_threshold: float = 0.9, dev: bool = False,
                      drain_timeout_s: int = 60, http_port: int | None = None) -> None:
    """Load the model (a TalkingHeadPool), register with LiveKit and serve avatar jobs until SIGINT/SIGTERM
    (then drain: no new jobs, up to `drain_timeout_s` for the running ones to end)."""
    import asyncio
    import signal

    from marionette_integrations.avatar import TalkingHeadConfig
    from marionette_integrations.pool import TalkingHeadPool

    pool = TalkingHeadPool(config or TalkingHeadConfig(), max_heads=max_heads)
    worker = AvatarWorker(pool, avatars=dict(avatars or {}), agent_name=agent_name, load_threshold=load_threshold)

    async def serve() -> None:
        await pool.start()
        extra = {} if http_port is None else {"port": int(http_port)}
        srv = worker.server(url=url, api_key=api_key, api_secret=api_secret, **extra)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        run = asyncio.ensure_future(srv.run(devmode=dev))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait([run, stopping], return_when=asyncio.FIRST_COMPLETED)
        try:
            if not run.done():
                log.info("draining: no new avatar jobs; waiting up to %d s for %d running", drain_timeout_s,
                         pool.heads)
                try:
                    await srv.drain(timeout=drain_timeout_s)
                except asyncio.TimeoutError:
                    log.warning("drain timed out; closing the remaining avatar jobs")
                await srv.aclose()
            await run
        finally:
            stopping.cancel()
            await pool.aclose()

    asyncio.run(serve())


def main(argv=None) -> int:
    import argparse
    import os

    ap = argparse.ArgumentParser(prog="python -m marionette_integrations.livekit",
                                 description="The Marionette avatar worker for LiveKit Agents (the remote pattern).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="register an avatar worker with a LiveKit server and take avatar jobs")
    w.add_argument("--url", default=os.environ.get("LIVEKIT_URL"), help="LiveKit server URL (LIVEKIT_URL)")
    w.add_argument("--api-key", default=os.environ.get("LIVEKIT_API_KEY"), help="(LIVEKIT_API_KEY)")
    w.add_argument("--api-secret", default=os.environ.get("LIVEKIT_API_SECRET"), help="(LIVEKIT_API_SECRET)")
    w.add_argument("--avatar", action="append", default=[], metavar="[NAME=]PATH",
                   help="a portrait the agents may ask for by NAME (repeat; the first or 'default' is the default; "
                        "none: the built-in avatar)")
    w.add_argument("--checkpoint", type=Path, default=None)
    w.add_argument("--config", default="lite")
    w.add_argument("--backend", default="auto", help="auto | torch | onnxruntime | tensorrt (as marionette serve)")
    w.add_argument("--threads", type=int, default=None)
    w.add_argument("--agent-name", default=AGENT_NAME, help="the name agents dispatch (default %(default)s)")
    w.add_argument("--max-heads", type=int, default=8, help="sessions this worker takes at most")
    w.add_argument("--load-threshold", type=float, default=0.9,
                   help="LiveKit stops dispatching to this worker above this load (default %(default)s)")
    w.add_argument("--dev", action="store_true", help="livekit-agents' development mode")
    w.add_argument("--drain-timeout", type=int, default=60, help="seconds running jobs get to end on SIGTERM")
    w.add_argument("--http-port", type=int, default=None,
                   help="livekit-agents' health/status HTTP port (default 8081; one per worker on a machine, 0: any)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    avatars = {}
    for i, item in enumerate(a.avatar):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = ("default" if i == 0 else Path(item).stem), item
        avatars[name] = path
    if not (a.url and a.api_key and a.api_secret):
        ap.error("--url, --api-key and --api-secret (or LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET) are needed")
    from marionette_integrations.avatar import TalkingHeadConfig

    try:
        cfg = TalkingHeadConfig(checkpoint=a.checkpoint, config=a.config, backend=a.backend, threads=a.threads)
        run_avatar_worker(url=a.url, api_key=a.api_key, api_secret=a.api_secret, avatars=avatars, config=cfg,
                          agent_name=a.agent_name, max_heads=a.max_heads, load_threshold=a.load_threshold, dev=a.dev,
                          drain_timeout_s=a.drain_timeout, http_port=a.http_port)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
