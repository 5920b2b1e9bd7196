"""A self-hosted Pipecat voice bot with the Marionette avatar as its face (a runnable sketch).

Everything runs on your machine: Whisper (speech to text), an Ollama model (the LLM), Piper (text to
speech), Marionette (the talking head), and Pipecat's SmallWebRTC transport with its prebuilt page.

    pip install 'marionette[pipecat,onnx]' 'pipecat-ai[webrtc,runner,silero,whisper,piper]'
    ollama pull llama3.2 && ollama serve            # in another terminal
    python examples/pipecat_bot.py --avatar me.jpg   # then open http://localhost:7860/client

The avatar sits between the TTS and the transport output: it takes the TTS audio, and sends the video
frames (25 fps) together with the same audio, aligned (`video_out_is_live=False` + images marked
`sync_with_audio`, see marionette_integrations/pipecat.py). The model is loaded before the first
connection (loading takes seconds) into a `TalkingHeadPool`: every connection gets its own `TalkingHead`,
and one scheduler thread renders all of them as one batch per frame.

With the avatar on a running `marionette serve` (e.g. a GPU machine) instead of in this process:

    python examples/pipecat_bot.py --remote http://gpu-box:8080 --token "$MARIONETTE_TOKEN"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import LLMRunFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                   LLMUserAggregatorParams)
from pipecat.runner.types import RunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.services.ollama.llm import OLLamaLLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transports.base_transport import TransportParams

try:  # pipecat >= 1.3
    from pipecat.pipeline.worker import PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
except ImportError:  # older pipecat
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineTask

from marionette_integrations import TalkingHeadConfig
from marionette_integrations.pipecat import MarionetteVideoService

AVATAR = os.environ.get("MARIONETTE_AVATAR")  # set from --avatar below
REMOTE = os.environ.get("MARIONETTE_REMOTE")  # set from --remote below: a marionette serve's URL
TOKEN = os.environ.get("MARIONETTE_TOKEN")
POOL = None  # marionette_integrations.pool.TalkingHeadPool: the model, loaded once, shared by every connection


def start_pool():
    global POOL
    from marionette_integrations.pool import TalkingHeadPool

    # the built-in checkpoint when installed, else random weights; its scheduler thread outlives this loop
    POOL = asyncio.run(TalkingHeadPool(TalkingHeadConfig(backend="auto")).start())


async def bot(runner_args: RunnerArguments):
    if REMOTE:
        from marionette_integrations.remote import RemoteTalkingHead

        head = await RemoteTalkingHead(REMOTE, token=TOKEN,
                                       controls=[{"type": "expression", "preset": "happy:0.3"}]).start()
    else:
        head = await POOL.head(avatar=AVATAR, expression="happy:0.3").start()
    width, height = head.frame_size
    transport = await create_transport(runner_args, {
        "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True,
                                          video_out_enabled=True, video_out_is_live=False,
                                          video_out_framerate=25, video_out_width=width,
                                          video_out_height=height),
    })
    stt = WhisperSTTService()
    llm = OLLamaLLMService(model="llama3.2")
    tts = PiperTTSService(voice_id="en_US-ryan-high")
    avatar = MarionetteVideoService(talking_head=head)

    context = LLMContext([{"role": "system", "content": "You are a friendly assistant with a face. Answer in "
                                                        "one or two short spoken sentences."}])
    aggregators = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        vad_analyzer=SileroVADAnalyzer()))

    pipeline = Pipeline([
        transport.input(),
        stt,
        aggregators.user(),
        llm,
        tts,
        avatar,  # TTS audio in; video + the same audio out, aligned
        transport.output(),
        aggregators.assistant(),
    ])
    task = PipelineTask(pipeline)

    @transport.event_handler("on_client_connected")
    async def on_client_connected(transport, client):
        avatar.set_expression("happy", 0.5)  # controls: set_expression / set_pose / set_gaze / blink
        context.add_message({"role": "user", "content": "Say hello and introduce yourself."})
        await task.queue_frames([LLMRunFrame()])

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        await task.cancel()

    runner = PipelineRunner(handle_sigint=runner_args.handle_sigint)
    if hasattr(runner, "add_workers"):
        await runner.add_workers(task)
        await runner.run()
    else:
        await runner.run(task)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--avatar", default=None, help="a portrait photo (default: the built-in avatar)")
    ap.add_argument("--remote", default=None, help="a running marionette serve's URL (the avatar renders there)")
    ap.add_argument("--token", default=None, help="its bearer token (serve --token)")
    known, rest = ap.parse_known_args()
    if known.avatar:
        os.environ["MARIONETTE_AVATAR"] = AVATAR = known.avatar
    if known.remote:
        os.environ["MARIONETTE_REMOTE"] = REMOTE = known.remote
    if known.token:
        os.environ["MARIONETTE_TOKEN"] = TOKEN = known.token
    sys.argv = [sys.argv[0], *rest]
    if not REMOTE:
        start_pool()  # load (and on a CPU export to ONNX once) before the first connection
    from pipecat.runner.run import main

    main()
