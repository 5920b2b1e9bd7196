"""A Pipecat video service: the Marionette avatar speaking the bot's TTS, self-hosted (the model runs in the
bot's own process). `pip install 'marionette[pipecat]'`.

    avatar = MarionetteVideoService(avatar="me.jpg")            # or talking_head=await TalkingHead(...).start()
    pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, avatar, transport.output(), assistant_agg])
    transport params: video_out_enabled=True, video_out_is_live=False, video_out_framerate=25,
                      video_out_width=avatar.width, video_out_height=avatar.height

It sits between the TTS and the transport output, where Pipecat's Simli and Tavus services sit:

* TTS audio (`TTSAudioRawFrame` or any `OutputAudioRawFrame` going downstream, any sample rate, mono or
  stereo) is taken out of the stream and given to a `TalkingHead` (marionette_integrations.avatar), which
  resamples a copy to the model's 16 kHz for the lips and keeps the original for output;
* every 1/25 s it pushes an `OutputImageRawFrame` (RGB) followed by the `TTSAudioRawFrame` with the same
  40 ms of the original audio (none in silence), both stamped with the same `pts` (the frame's media time).
  The image is marked `sync_with_audio`, so the output transport shows it only once the audio before it
  has been written: picture and sound leave the transport aligned. (With `video_out_is_live=True` the
  transport draws only images that are not audio-synced: pass `sync_with_audio=False` then.)
* with no TTS audio the avatar idles (head sway, blinks, saccades) with the mouth shut;
* `InterruptionFrame` (the user barged in) drops the pending speech at once: the next frame pushed carries
  none of it and shows the mouth shut;
* `TTSStoppedFrame` ends the utterance; it is held back and pushed after the utterance's last audio frame,
  so the transport's "bot stopped speaking" comes when the avatar stops, not when the TTS did;
* controls: `set_expression`, `set_pose`, `set_gaze`, `blink`, `control(message)` (the JSON messages of
  `marionette serve`), or a `MarionetteControlFrame(message)` sent down the pipeline.

Where the model runs: in this process (a TalkingHead of its own, or `pool=` a TalkingHeadPool shared with other
pipelines, batched by one scheduler thread), or on a running `marionette serve` (`remote="http://host:8080"`,
`token=`: marionette_integrations.remote.RemoteTalkingHead; the images then come with the server's returned
audio, which it delays to match its video, and an InterruptionFrame sends {"type": "interrupt"} on the data
channel).

Inference runs on the TalkingHead's worker thread, never on the event loop; frames are paced by one clock
(the TalkingHead's, pull-based), at most `max_ahead` frames in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass, field

try:
    from pipecat.frames.frames import (CancelFrame, ControlFrame, EndFrame, Frame, OutputAudioRawFrame,
                                       OutputImageRawFrame, StartFrame, TTSAudioRawFrame, TTSStoppedFrame)
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ModuleNotFoundError as e:  # pragma: no cover - the extra is missing
    raise ModuleNotFoundError(f"{e.name} is missing: the Pipecat service needs the `pipecat` extra: "
                              "pip install 'marionette[pipecat]'") from e

try:  # pipecat >= 0.0.8x: InterruptionFrame; older releases: StartInterruptionFrame
    from pipecat.frames.frames import InterruptionFrame as _Interruption
except ImportError:  # pragma: no cover - older pipecat
    from pipecat.frames.frames import StartInterruptionFrame as _Interruption

from marionette_integrations.avatar import AvatarFrame, TalkingHead, TalkingHeadConfig

log = logging.getLogger(__name__)


@dataclass
class MarionetteControlFrame(ControlFrame):
    """A control message for the avatar, as `marionette serve` takes them on its data channel:
    {"type": "expression", "preset": "happy", "intensity": 0.8}, {"type": "pose", "yaw": 15},
    {"type": "gaze", "x": 0.3}, {"type": "blink"}, {"type": "source", "factor": "pose", "from": "controls"}."""

    message: dict = field(default_factory=dict)


class MarionetteVideoService(FrameProcessor):
    """See the module doc. Either give a started `talking_head` (loading the model takes seconds; do it before
    the pipeline starts) or the `TalkingHeadConfig` fields (avatar=..., checkpoint=..., backend=...), and the
    model is loaded when the pipeline's StartFrame arrives. With `pool=` (a started
    `marionette_integrations.pool.TalkingHeadPool`) the head is one of the pool's (the fields override the pool's
    config): several pipelines in one process share one model and one scheduler thread, batched. With
    `remote="http://host:8080"` (and `token=`, `avatar=<an avatar id the server knows>`, `controls=[...]`) the
    avatar is rendered by a running `marionette serve` (marionette_integrations.remote.RemoteTalkingHead): the
    TTS audio goes to it over WebRTC and its video comes back with its own (delayed, matching) audio."""

    def __init__(self, *, talking_head: TalkingHead | None = None, config: TalkingHeadConfig | None = None,
                 pool=None, remote: str | None = None, token: str | None = None, sync_with_audio: bool = True,
                 drain_timeout_s: float = 30.0, name: str | None = None, **head_options):
        super().__init__(name=name)
        if talking_head is not None and (config is not None or head_options or pool is not None or remote):
            raise ValueError("give a started talking_head or its configuration, not both")
        if remote is not None:
            if config is not None or pool is not None:
                raise ValueError("remote=: the server has the model; give no config or pool")
            from marionette_integrations.remote import RemoteTalkingHead

            talking_head = RemoteTalkingHead(remote, token=token, **head_options)  # avatar=<id>, controls=...
        elif token is not None:
            raise ValueError("token= is the remote server's bearer token: give remote= too")
        self._pool = pool  # a started marionette_integrations.pool.TalkingHeadPool: batched with its other heads
        if talking_head is None:
            if pool is not None:
                config = config or dataclasses.replace(pool.config, **head_options)
            else:
                config = config or TalkingHeadConfig(**head_options)
        self._head = talking_head
        self._config = config
        self._sync = bool(sync_with_audio)
        self._drain_timeout = float(drain_timeout_s)
        self._task: asyncio.Task | None = None
        self._held_stops: list[TTSStoppedFrame] = []
        self._context_id = None
        self._started = False
        self.frames_out = 0

    # ------------------------------------------------------------------------------- the avatar
    @property
    def talking_head(self) -> TalkingHead | None:
        return self._head

    @property
    def width(self) -> int:
        return self._head.frame_size[0]

    @property
    def height(self) -> int:
        return self._head.frame_size[1]

    def control(self, message: dict) -> None:
        self._head.control(message)

    def set_expression(self, preset: str | None = "neutral", intensity: float = 1.0, **kw) -> None:
        self._head.set_expression(preset, intensity, **kw)

    def set_pose(self, yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0, **kw) -> None:
        self._head.set_pose(yaw, pitch, roll, **kw)

    def set_gaze(self, x: float = 0.0, y: float = 0.0, **kw) -> None:
        self._head.set_gaze(x, y, **kw)

    def blink(self) -> None:
        self._head.blink()

    # ---------------------------------------------------------------------------------- frames
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, EndFrame):
            await self._stop(drain=True)
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop(drain=False)
            await self.push_frame(frame, direction)
        elif isinstance(frame, _Interruption):
            if self._head is not None and self._started:
                self._head.interrupt()
            self._held_stops.clear()
            await self.push_frame(frame, direction)
        elif (isinstance(frame, OutputAudioRawFrame) and direction == FrameDirection.DOWNSTREAM
              and self._started):
            if isinstance(frame, TTSAudioRawFrame):
                self._context_id = frame.context_id
            self._head.push_audio(frame.audio, frame.sample_rate, frame.num_channels)
        elif isinstance(frame, TTSStoppedFrame) and self._started:
            self._head.end_segment()
            self._held_stops.append(frame)  # pushed after the utterance's last frame
        elif isinstance(frame, MarionetteControlFrame):
            if self._head is not None:
                try:
                    self._head.control(frame.message)
                except ValueError as e:  # streaming.controls.ControlError
                    await self.push_error(error_msg=f"bad avatar control {frame.message!r}: {e}")
        else:
            await self.push_frame(frame, direction)

    async def _start(self) -> None:
        if self._started:
            return
        if self._head is None:
            self._head = TalkingHead(self._config, pool=self._pool)
        ready = getattr(self._head, "ready", None)
        if ready is None:
            ready = self._head.pipeline is not None and self._head.motion is not None
        if not ready:
            await self._head.start()
        self._started = True
        self._task = self.create_task(self._output())

    async def _stop(self, drain: bool) -> None:
        if not self._started:
            return
        head = self._head
        if drain:  # let the speech already given play out
            head.end_segment()
            loop = asyncio.get_running_loop()
            until = loop.time() + self._drain_timeout
            while not head.idle and loop.time() < until and self._task is not None and not self._task.done():
                await asyncio.sleep(0.02)
        self._started = False
        if self._task is not None:
            await self.cancel_task(self._task)
            self._task = None
        await head.aclose()
        for f in self._held_stops:
            await self.push_frame(f)
        self._held_stops.clear()

    async def _output(self) -> None:
        async for f in self._head.frames():
            await self._push_avatar_frame(f)

    async def _push_avatar_frame(self, f: AvatarFrame) -> None:
        h, w = f.image.shape[:2]
        img = OutputImageRawFrame(image=f.image.tobytes(), size=(w, h), format="RGB")
        img.sync_with_audio = self._sync
        img.pts = f.pts_ns
        await self.push_frame(img)
        if f.audio is not None:
            try:
                a = TTSAudioRawFrame(audio=f.audio.tobytes(), sample_rate=f.sample_rate, num_channels=f.channels,
                                     context_id=self._context_id)
            except TypeError:  # pipecat releases whose TTSAudioRawFrame has no context_id
                a = TTSAudioRawFrame(audio=f.audio.tobytes(), sample_rate=f.sample_rate, num_channels=f.channels)
            a.pts = f.pts_ns
            await self.push_frame(a)
        self.frames_out += 1
        if f.segment_end and self._held_stops:
            stops, self._held_stops = self._held_stops, []
            for s in stops:
                await self.push_frame(s)
