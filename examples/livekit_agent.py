"""A LiveKit Agents voice agent with the Marionette avatar as its face, self-hosted (a runnable sketch).

    pip install 'marionette[livekit,onnx]' 'livekit-agents[silero,openai]'
    # a LiveKit server (livekit-server --dev), and LIVEKIT_URL / LIVEKIT_API_KEY / LIVEKIT_API_SECRET set

In-process (the agent's own process renders and publishes the avatar):

    python examples/livekit_agent.py dev

Remote avatar worker (the avatar renders in a worker of its own, e.g. on a GPU machine, which LiveKit
dispatches to the agent's room; the agent sends it the TTS audio over LiveKit's byte streams,
`lk.audio_stream`):

    python -m marionette_integrations.livekit worker --avatar me.jpg      # on each GPU machine (LIVEKIT_* set)
    MARIONETTE_MODE=agent python examples/livekit_agent.py dev            # the agent: AvatarSession

By hand for one named room (no dispatch): `MARIONETTE_MODE=manual python examples/livekit_agent.py dev` and
`MARIONETTE_MODE=worker MARIONETTE_ROOM=my-room python examples/livekit_agent.py`.

The STT / LLM / TTS below are placeholders from livekit-agents' plugins pointed at local servers (an
OpenAI-compatible endpoint such as Ollama's, and a local Whisper / TTS server): put in whichever you run.
The avatar part is `TalkingHead` + `MarionetteVideoGenerator` + livekit-agents' own `AvatarRunner`.
"""

from __future__ import annotations

import asyncio
import os

from livekit import api, rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli, room_io
from livekit.agents.voice.avatar import (AvatarOptions, AvatarRunner, DataStreamAudioOutput,
                                         DataStreamAudioReceiver, QueueAudioOutput)

from marionette_integrations import TalkingHead, TalkingHeadConfig
from marionette_integrations.livekit import AvatarSession, MarionetteVideoGenerator

AVATAR = os.environ.get("MARIONETTE_AVATAR")  # a portrait photo (default: the built-in avatar)
AVATAR_IDENTITY = "marionette-avatar"
SAMPLE_RATE = 24000  # what the TTS gives; any rate works (the avatar keeps it for output)


def make_session() -> AgentSession:
    from livekit.plugins import openai, silero  # livekit-agents[openai,silero]

    return AgentSession(
        vad=silero.VAD.load(),
        stt=openai.STT(base_url="http://localhost:8000/v1", model="whisper-1"),  # a local Whisper server
        llm=openai.LLM.with_ollama(model="llama3.2"),
        tts=openai.TTS(base_url="http://localhost:8880/v1", model="kokoro", voice="af_heart"),  # e.g. Kokoro
    )


async def start_avatar(room: rtc.Room, audio_recv) -> AvatarRunner:
    head = await TalkingHead(TalkingHeadConfig(avatar=AVATAR, expression="happy:0.3")).start()
    width, height = head.frame_size
    runner = AvatarRunner(room, audio_recv=audio_recv, video_gen=MarionetteVideoGenerator(head),
                          options=AvatarOptions(video_width=width, video_height=height, video_fps=head.fps,
                                                audio_sample_rate=SAMPLE_RATE, audio_channels=1))
    await runner.start()
    return runner


server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext):
    await ctx.connect()
    session = make_session()
    if os.environ.get("MARIONETTE_MODE", "inprocess") == "agent":
        # LiveKit dispatches a Marionette avatar worker to this room; it joins as the avatar and publishes on
        # the agent's behalf; the TTS audio goes to it (DataStreamAudioOutput, set by AvatarSession.start)
        await AvatarSession(sample_rate=SAMPLE_RATE).start(session, room=ctx.room)
    elif os.environ.get("MARIONETTE_MODE") == "manual":
        # the same by hand, with a worker started for a named room (avatar_worker below)
        session.output.audio = DataStreamAudioOutput(ctx.room, destination_identity=AVATAR_IDENTITY,
                                                     sample_rate=SAMPLE_RATE)
    else:
        # in-process: the TTS audio goes to a queue the AvatarRunner reads; the runner publishes the avatar's
        # video and the same audio, aligned (the agent's own audio track is turned off)
        queue = QueueAudioOutput(sample_rate=SAMPLE_RATE)
        session.output.audio = queue
        await start_avatar(ctx.room, queue)
    await session.start(agent=Agent(instructions="You are a friendly assistant with a face. Answer in one or two "
                                                 "short spoken sentences."),
                        room=ctx.room, room_options=room_io.RoomOptions(audio_output=False))
    await session.generate_reply(instructions="Say hello and introduce yourself.")


async def avatar_worker(room_name: str) -> None:
    """The remote pattern by hand (MARIONETTE_MODE=worker, for one named room; `python -m
    marionette_integrations.livekit worker` is the dispatched, batched, load-reporting form)."""
    token = (api.AccessToken().with_identity(AVATAR_IDENTITY).with_name("Marionette")
             .with_grants(api.VideoGrants(room_join=True, room=room_name)).to_jwt())
    room = rtc.Room()
    await room.connect(os.environ["LIVEKIT_URL"], token)
    runner = await start_avatar(room, DataStreamAudioReceiver(room))
    try:
        await runner.wait_for_complete()
    finally:
        await runner.aclose()
        await room.disconnect()


if __name__ == "__main__":
    if os.environ.get("MARIONETTE_MODE") == "worker":
        asyncio.run(avatar_worker(os.environ["MARIONETTE_ROOM"]))
    else:
        cli.run_app(server)
