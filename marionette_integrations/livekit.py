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

import numpy as np

try:
    from livekit import rtc
    from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator
except ModuleNotFoundError as e:  # pragma: no cover - the extra is missing
    raise ModuleNotFoundError(f"{e.name} is missing: the LiveKit avatar needs the `livekit` extra: "
                              "pip install 'marionette[livekit]'") from e

from marionette_integrations.avatar import AvatarFrame, TalkingHead


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
