"""The Pipecat video service in a real Pipecat pipeline, in-process: a source pushing espeak-ng speech as
TTS audio frames (24 kHz, 20 ms chunks, faster than real time as a TTS does), `MarionetteVideoService`, and
a sink collecting what leaves it.

The model is the engine's `lite` network with the z-responsive fixture weights
(`streaming.fixtures.responsive_checkpoint`), as in tests/test_streaming_e2e.py: a freshly initialised
model ignores z, so the mouth could not be seen to move. Most tests use `realtime=False` (every frame
rendered; the clock slips when this shared 2-core machine renders slower than real time): what they check
is the content and the timeline (pts); the last one checks the wall-clock pace and the alignment at
Pipecat's own output transport with `realtime=True`.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("pipecat")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from pipecat.frames.frames import (EndFrame, Frame, InterruptionFrame, OutputImageRawFrame,  # noqa: E402
                                   StartFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.transports.base_output import BaseOutputTransport  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

try:  # pipecat >= 1.3
    from pipecat.pipeline.worker import PipelineWorker as PipelineTask
    from pipecat.workers.runner import WorkerRunner as PipelineRunner
    NEW_RUNNER = True
except ImportError:  # older pipecat
    from pipecat.pipeline.runner import PipelineRunner
    from pipecat.pipeline.task import PipelineTask
    NEW_RUNNER = False

from marionette_integrations import TalkingHead, TalkingHeadConfig  # noqa: E402
from marionette_integrations.pipecat import MarionetteControlFrame, MarionetteVideoService  # noqa: E402
from streaming.fixtures import STATIC_HEAD, espeak, mouth_region, responsive_checkpoint  # noqa: E402

RATE = 24000
NS = 1_000_000_000


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from streaming.pipeline import Pipeline as EnginePipeline

    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "responsive", "lite")
    return EnginePipeline.load(ck, config="lite", backend="torch", threads=1)


@pytest.fixture(scope="module")
def speech():
    return espeak("Hello, how are you?", rate=RATE)


class Sink(FrameProcessor):
    """Collects what the avatar service sends downstream, with arrival times."""

    def __init__(self):
        super().__init__()
        self.items: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        self.items.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, cls):
        return [f for _, f in self.items if isinstance(f, cls)]

    def images(self):
        return self.of(OutputImageRawFrame)

    def speaking_images(self):
        return [f for f in self.images() if f.pts in {a.pts for a in self.of(TTSAudioRawFrame)}]


class TTSSource(FrameProcessor):
    """Pushes speech as a TTS service does: TTSStartedFrame, TTSAudioRawFrames of 20 ms, TTSStoppedFrame."""

    def __init__(self):
        super().__init__()

    async def speak(self, samples: np.ndarray, rate: int = RATE, chunk_ms: int = 20, pace: float = 0.0):
        await self.push_frame(TTSStartedFrame())
        n = rate * chunk_ms // 1000
        for i in range(0, len(samples), n):
            await self.push_frame(TTSAudioRawFrame(samples[i:i + n].tobytes(), rate, 1, context_id="c1"))
            if pace:
                await asyncio.sleep(pace)
        await self.push_frame(TTSStoppedFrame())

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)


def frame_arrays(images) -> np.ndarray:
    w, h = images[0].size
    return np.stack([np.frombuffer(f.image, np.uint8).reshape(h, w, 3) for f in images])


def mouth_dev(frames: np.ndarray, rest: np.ndarray) -> np.ndarray:
    return np.abs(np.stack([mouth_region(f) for f in frames]) - mouth_region(rest)).mean(axis=(1, 2, 3))


class DeviceOutput(BaseOutputTransport):
    """Pipecat's own output transport (its media sender: audio chunking, the audio queue, `sync_with_audio`,
    the video task) writing to a stand-in device that plays audio in real time (a write returns after the
    chunk's duration) and records when each chunk finished and which image was drawn when."""

    def __init__(self, width: int, height: int):
        super().__init__(TransportParams(audio_out_enabled=True, video_out_enabled=True, video_out_is_live=False,
                                         video_out_framerate=25, video_out_width=width, video_out_height=height))
        self.audio_log: list[tuple[float, int]] = []  # (time the chunk finished playing, bytes)
        self.video_log: list[tuple[float, int | None]] = []  # (time drawn, pts of the image)

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame) -> bool:
        await asyncio.sleep(len(frame.audio) / 2 / frame.num_channels / frame.sample_rate)
        self.audio_log.append((time.monotonic(), len(frame.audio)))
        return True

    async def write_video_frame(self, frame) -> bool:
        self.video_log.append((time.monotonic(), frame.pts))
        return True


async def run(service, script, timeout=120, output=None):
    """Run source -> service -> sink [-> output] in a PipelineTask while `script(source, sink, task)` runs."""
    src, sink = TTSSource(), Sink()
    procs = [src, service, sink] + ([output] if output is not None else [])
    task = PipelineTask(Pipeline(procs), enable_rtvi=False, idle_timeout_secs=None)
    runner = PipelineRunner(handle_sigint=False)
    if NEW_RUNNER:
        await runner.add_workers(task)

    async def drive():
        while not sink.images():
            await asyncio.sleep(0.01)
        await script(src, sink, task)
        await task.queue_frame(EndFrame())

    await asyncio.wait_for(asyncio.gather(runner.run() if NEW_RUNNER else runner.run(task), drive()), timeout)
    return sink


def make_service(pipeline, realtime=False, static_head=True, **kw):
    """The service on a TalkingHead sharing the module's model. static_head: pose and gaze held still (as
    tests/test_streaming_e2e.py does), so the mouth region changes only with the lips (the idle sway and
    the nods that follow speech energy move it too)."""
    head = TalkingHead(TalkingHeadConfig(realtime=realtime, controls=STATIC_HEAD if static_head else (), **kw),
                       pipeline=pipeline)
    return MarionetteVideoService(talking_head=head), head


def test_speech_in_aligned_video_and_audio_out_mouth_moves_then_rests(pipeline, speech):
    service, head = make_service(pipeline)

    async def script(src, sink, task):
        while len(sink.images()) < 4:  # idle first
            await asyncio.sleep(0.01)
        await src.speak(speech)
        while not sink.of(TTSStoppedFrame):  # held back until the utterance's last frame went out
            await asyncio.sleep(0.02)
        n = len(sink.images())
        while len(sink.images()) < n + 6:  # idle after
            await asyncio.sleep(0.02)

    t = time.monotonic()
    sink = asyncio.run(run(service, script))
    wall = time.monotonic() - t
    images, audio = sink.images(), sink.of(TTSAudioRawFrame)
    # 25 fps on the media clock: consecutive pts 40 ms apart, no gap, no repeat
    pts = np.array([f.pts for f in images])
    assert (np.diff(pts) == NS // 25).all(), np.unique(np.diff(pts))
    assert images[0].size == (256, 256) and images[0].format == "RGB" and images[0].sync_with_audio
    # every audio frame follows the image of the same instant and carries exactly its 40 ms (at 24 kHz)
    order = [(type(f).__name__, f.pts) for _, f in sink.items if isinstance(f, (OutputImageRawFrame, TTSAudioRawFrame))]
    for i, (kind, p) in enumerate(order):
        if kind == "TTSAudioRawFrame":
            assert order[i - 1] == ("OutputImageRawFrame", p)
    assert all(a.sample_rate == RATE and a.num_frames == RATE // 25 for a in audio)
    # the audio out is the original speech, whole, in order (the last frame padded with silence)
    out = np.concatenate([np.frombuffer(a.audio, np.int16) for a in audio])
    assert len(out) == -(-len(speech) // (RATE // 25)) * (RATE // 25)
    assert np.array_equal(out[:len(speech)], speech) and not out[len(speech):].any()
    # TTSStoppedFrame leaves after the last audio frame
    idx = {id(f): i for i, (_, f) in enumerate(sink.items)}
    assert idx[id(sink.of(TTSStoppedFrame)[0])] > idx[id(audio[-1])]
    # the mouth: moving while the speech plays, shut before it and after it
    frames = frame_arrays(images)
    speaking = np.isin(pts, [a.pts for a in audio])
    first, last = np.flatnonzero(speaking)[[0, -1]]
    assert first >= 4 and last <= len(images) - 6
    dev = mouth_dev(frames, frames[0])
    loud = np.array([np.abs(np.frombuffer(a.audio, np.int16)).max() > 1000 for a in audio])
    sp = dev[speaking][loud]
    quiet = np.r_[dev[:first], dev[last + 2:]]
    print(f"\n{len(images)} frames ({speaking.sum()} with speech) in {wall:.1f} s; mouth deviation: "
          f"speech {sp.mean():.1f}, silence {quiet.mean():.2f} (max {quiet.max():.2f}); {head.stats}")
    assert sp.mean() > 6 and sp.mean() > 5 * quiet.mean()
    assert quiet.max() < 3
    assert head.stats["repeated"] == 0 and head.stats["underruns"] == 0


def test_interruption_flushes_within_one_frame_then_idle(pipeline, speech):
    long = np.concatenate([speech, speech, speech])
    service, head = make_service(pipeline)
    seen = {}

    async def script(src, sink, task):
        await src.speak(long)
        while len(sink.speaking_images()) < 6:
            await asyncio.sleep(0.005)
        seen["last_pts"] = sink.images()[-1].pts
        await task.queue_frame(InterruptionFrame())
        while head.last_interrupt_frame is None:
            await asyncio.sleep(0.005)
        n = len(sink.images())
        while len(sink.images()) < n + 6:
            await asyncio.sleep(0.02)
        # controls through a frame and through methods still act after the interruption
        seen["controls_at"] = head._next_out
        await task.queue_frame(MarionetteControlFrame({"type": "expression", "preset": "happy"}))
        service.set_pose(yaw=20, hold=True)
        n = len(sink.images())
        while len(sink.images()) < n + 10:
            await asyncio.sleep(0.02)

    sink = asyncio.run(run(service, script))
    images, audio = sink.images(), sink.of(TTSAudioRawFrame)
    cut = head.last_interrupt_frame
    k_seen = seen["last_pts"] * 25 // NS
    # the flush point is at most one frame after the last one the sink had when it sent the interruption
    assert cut <= k_seen + 2, (cut, k_seen)
    pts_audio = [a.pts * 25 // NS for a in audio]
    assert max(pts_audio) < cut  # no speech audio after it...
    assert sum(len(a.audio) for a in audio) // 2 < len(long)  # (most of the speech was dropped)
    frames = frame_arrays(images)
    k = np.array([f.pts * 25 // NS for f in images])
    dev = mouth_dev(frames, frames[0])
    before = dev[(k >= cut - 4) & (k < cut - 1)]
    after = dev[(k >= cut) & (k < seen["controls_at"])]
    print(f"\ninterrupt at frame {cut} (sink had {k_seen}); mouth before {np.round(before, 1)}, after "
          f"{np.round(after, 1)}; {head.stats}")
    assert before.mean() > 6
    assert len(after) >= 5 and after.max() < 3  # ...and the mouth is shut from that frame on
    # the expression and the held pose changed the picture afterwards
    assert np.abs(frames[-1].astype(np.float32) - frames[k == cut + 4][0]).mean() > 2


def test_idle_without_audio(pipeline):
    """No TTS audio: idle frames at 25 fps on the media clock, no audio, the lips never opened, and the head
    keeps moving (the idle sway; nothing held still here)."""
    service, head = make_service(pipeline, static_head=False)

    async def script(src, sink, task):
        while len(sink.images()) < 16:
            await asyncio.sleep(0.02)

    sink = asyncio.run(run(service, script))
    images = sink.images()
    pts = np.array([f.pts for f in images])
    assert (np.diff(pts) == NS // 25).all() and not sink.of(TTSAudioRawFrame)
    assert head.stats["speech_frames"] == 0
    frames = frame_arrays(images).astype(np.float32)
    moved = np.abs(frames[1:] - frames[0]).mean(axis=(1, 2, 3))
    print(f"\nidle: {len(images)} frames, mean change from the first {np.round(moved[::4], 2)}")
    assert moved[-5:].mean() > 0.2


def test_realtime_pace_and_alignment_at_pipecats_output_transport(pipeline, speech):
    """realtime=True, through Pipecat's own output transport (non-live video, images `sync_with_audio`) to a
    device playing the audio in real time. The service sends 25 images per second of wall time whatever the
    render speed (a late frame repeats the previous picture), never drops audio, and whenever the transport
    draws a picture the audio played so far is that picture's own 40 ms (within one frame of its sound)."""
    service, head = make_service(pipeline, realtime=True)
    out = DeviceOutput(256, 256)

    async def script(src, sink, task):
        await asyncio.sleep(0.3)
        await src.speak(speech, pace=0.005)  # 20 ms chunks, faster than real time
        while not sink.of(TTSStoppedFrame):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)

    sink = asyncio.run(run(service, script, timeout=60, output=out))
    audio = sink.of(TTSAudioRawFrame)  # what the service sent the transport
    k0 = min(a.pts for a in audio) * 25 // NS  # the first frame with speech
    t_audio = np.array([t for t, _ in out.audio_log])
    # frames of speech played by then (the transport plays at its own rate: it resampled our 24 kHz)
    played = np.cumsum([n // 2 for _, n in out.audio_log]) / (out.sample_rate / 25)
    offsets = []
    for t, pts in out.video_log:
        k_img = None if pts is None else pts * 25 // NS
        if k_img is None or not k0 <= k_img < k0 + len(audio):
            continue  # a picture of silence (before or after the speech; the transport ends with silence)
        i = np.searchsorted(t_audio, t, side="right") - 1
        offsets.append(k0 + (played[i] if i >= 0 else 0) - k_img)  # audio played (frames) - the picture's frame: in [0, 1] when aligned
    offsets = np.array(offsets)
    print(f"\nat the transport: {len(out.video_log)} draws, {len(offsets)} during speech; audio played minus "
          f"picture: min {offsets.min():.2f}, median {np.median(offsets):.2f}, max {offsets.max():.2f} frames; "
          f"{head.stats}; the transport at {out.sample_rate} Hz")
    assert len(offsets) >= 20
    assert offsets.min() >= -0.05 and offsets.max() <= 1.05
    # the pace out of the service (the sink sits between it and the transport)
    arr = [(ts, f) for ts, f in sink.items if isinstance(f, OutputImageRawFrame)]
    tt = np.array([ts for ts, _ in arr])
    pts = np.array([f.pts for _, f in arr])
    assert (np.diff(pts) == NS // 25).all()
    rate = (len(tt) - 1) / (tt[-1] - tt[0])
    late = (tt - tt[0]) - (pts - pts[0]) / NS
    print(f"realtime: {len(tt)} images in {tt[-1] - tt[0]:.2f} s ({rate:.1f} fps), "
          f"{head.stats['frames'] - head.stats['repeated']} rendered in time; lateness p50 "
          f"{1000 * np.median(late):.1f} ms, p95 {1000 * np.percentile(late, 95):.1f} ms")
    assert 23 <= rate <= 26.5
    assert np.percentile(late, 95) < 0.06
    out_pcm = np.concatenate([np.frombuffer(a.audio, np.int16) for a in audio])
    assert np.array_equal(out_pcm[:len(speech)], speech)  # every sample, in order
    assert {a.pts for a in audio} <= set(pts.tolist())


def test_remote_service_speaks_through_a_real_server_mouth_moves_rests_and_interrupt_acks(tmp_path, speech):
    """`MarionetteVideoService(remote=...)`: a real `marionette serve` (ServerThread on 127.0.0.1, the same
    responsive fixture model) renders the avatar; the service sends it the TTS audio over WebRTC and pushes
    the video it gets back with the server's returned (delayed, matching) audio: frames arrive at 25 fps of
    media time, the returned speech comes out whole, the mouth moves with it and rests in the silence, and an
    InterruptionFrame is acknowledged by the server and stops the speech."""
    from streaming.fixtures import ServerThread, mouth_deviation
    from streaming.server import ServeConfig

    long = espeak("This is a much longer sentence that will be interrupted before it ends, surely.", rate=RATE)
    # the `tiny` network (64 px) with the z-responsive weights: a server that keeps up on this shared machine
    # (with the 256 px `lite` one, rounds ran late enough here that its video froze for seconds)
    ck = responsive_checkpoint(tmp_path / "tiny", "tiny")
    cfg = ServeConfig(checkpoint=ck, config="tiny", backend="torch", threads=1, ice_hosts=("127.0.0.1",),
                      max_sessions=2)
    with ServerThread(cfg) as st:
        service = MarionetteVideoService(remote=st.url, controls=list(STATIC_HEAD))
        seen = {}

        async def script(src, sink, task):
            head = service.talking_head

            async def until(cond, what, timeout=40.0):
                t_end = time.monotonic() + timeout
                while not cond():
                    assert time.monotonic() < t_end, f"waited {timeout} s for {what}: {head.stats}"
                    await asyncio.sleep(0.01)

            await until(lambda: len(sink.images()) >= 15, "idle frames")
            seen["speech_from"] = len(sink.images())
            await src.speak(speech)
            # TTSStoppedFrame is held back until the returned speech has ended
            await until(lambda: sink.of(TTSStoppedFrame), "the end of the returned speech")
            n = len(sink.images())
            await until(lambda: len(sink.images()) >= n + 10, "idle frames after the speech")
            seen["second_from"] = len(sink.images())
            n_audio = len(sink.of(TTSAudioRawFrame))
            await src.speak(long)
            await until(lambda: len(sink.of(TTSAudioRawFrame)) >= n_audio + 12, "the second utterance's audio")
            seen["interrupt_at"] = len(sink.images())
            await task.queue_frame(InterruptionFrame())
            await until(lambda: head.interrupt_acks and head.interrupt_acks[-1][1] is not None, "the interrupt's ack")
            n = seen["ack_at"] = len(sink.images())
            await until(lambda: len(sink.images()) >= n + 25, "frames after the interruption")
            seen["stats"] = dict(head.stats)
            seen["acks"] = list(head.interrupt_acks)
            seen["off"] = dict(head._off)

        sink = asyncio.run(run(service, script, timeout=180))
    images, audio = sink.images(), sink.of(TTSAudioRawFrame)
    print("remote head:", seen["stats"])
    # video at 25 fps of the server's media clock (a dropped tick repeats its picture: pts stay consecutive)
    pts = np.array([f.pts for f in images])
    steps = np.diff(pts) // (NS // 25)
    assert (steps >= 1).all() and np.mean(steps == 1) > 0.95, np.unique(steps, return_counts=True)
    assert images[0].size == (64, 64) and images[0].sync_with_audio
    # every audio frame follows the image of the same instant and carries 40 ms of the returned audio (48 kHz)
    order = [(type(f).__name__, f.pts) for _, f in sink.items if isinstance(f, (OutputImageRawFrame, TTSAudioRawFrame))]
    for i, (kind, p) in enumerate(order):
        if kind == "TTSAudioRawFrame":
            assert order[i - 1] == ("OutputImageRawFrame", p)
    assert all(a.sample_rate == 48000 and a.num_frames == 1920 for a in audio)
    # the first utterance came back whole (returned at 48 kHz, not the original 24 kHz): its energy as the server
    # returns it (half of what was sent, -3 dB, as a plain AvatarClient measures the server's returned audio too;
    # its timing may stretch: the server keeps late-arriving microphone audio in place, silence before it)
    first = [a for a in audio if a.pts < images[seen["second_from"]].pts]
    out = np.concatenate([np.frombuffer(a.audio, np.int16) for a in first]).astype(np.float64)
    e_out, e_in = np.sum(out ** 2) / 48000, np.sum(speech.astype(np.float64) ** 2) / RATE
    print(f"first utterance: {len(first)} audio frames, energy returned / sent {e_out / e_in:.2f}")
    assert 0.35 < e_out / e_in < 1.5
    # the mouth: moving with the returned speech, at rest in the silence before and after (head held still)
    frames = frame_arrays(images)
    dev = mouth_deviation(frames)
    level = {a.pts: np.abs(np.frombuffer(a.audio, np.int16)).max() for a in audio}
    loud = np.array([level.get(f.pts, 0) > 3000 for f in images])
    quiet = np.zeros(len(images), bool)
    quiet[:seen["speech_from"]] = True
    stop_idx = next(i for i, f in enumerate(images) if f.pts > first[-1].pts)
    quiet[stop_idx + 3:seen["second_from"]] = True
    print(f"mouth deviation: speech {dev[loud].mean():.1f} (n={loud.sum()}), silence {dev[quiet].mean():.2f} "
          f"(p95 {np.percentile(dev[quiet], 95):.2f})")
    assert loud.sum() > 8 and dev[loud].mean() > 6 and dev[loud].mean() > 4 * dev[quiet].mean()
    assert np.percentile(dev[quiet], 95) < 3
    # aligned: the mouth follows the audio pushed with each picture best at a lag of 0 (+-1 frame)
    rms_of = {a.pts: float(np.sqrt(np.mean(np.frombuffer(a.audio, np.int16).astype(np.float64) ** 2))) for a in audio}
    lv = np.array([rms_of.get(f.pts, 0.0) for f in images])
    span = slice(seen["speech_from"] - 5, seen["second_from"])
    d, v = dev[span], lv[span]
    corr = {lag: float(np.corrcoef(d[max(0, lag):len(d) + min(0, lag)], v[max(0, -lag):len(v) - max(0, lag)])[0, 1])
            for lag in range(-4, 5)}
    print("mouth-audio correlation by lag (frames):", {k: round(c, 2) for k, c in corr.items()})
    assert abs(max(corr, key=corr.get)) <= 1
    # the interruption: acknowledged by the server; the speech stops (most of the long utterance never plays)
    def rms(a):
        return float(np.sqrt(np.mean(np.frombuffer(a.audio, np.int16).astype(np.float64) ** 2)))

    after = [a for a in audio if a.pts > images[seen["ack_at"] + 1].pts]
    second = [a for a in audio if a.pts >= images[seen["second_from"]].pts]
    if after:
        print("acks", seen["acks"], "off", seen["off"], "audio after the ack:", [round(rms(a), 1) for a in after])
    # no speech after the ack (a stray tail at most: quiet, and no more than the hangover's frames)
    assert not [a for a in after if rms(a) > 300] and len(after) <= 10, [round(rms(a), 1) for a in after]
    assert len(second) * 0.04 < 0.6 * len(long) / RATE
    assert seen["stats"]["interrupts"] == 1


def test_two_pipelines_share_one_pool_batched_interrupt_flushes_a_pooled_head(pipeline, speech):
    """Two Pipecat pipelines in one process, each with `MarionetteVideoService(pool=...)`: one model, one
    scheduler thread, rounds of batch size 2; the speaking pipeline's mouth moves, the silent one's does not;
    an InterruptionFrame flushes the pooled head's pending speech."""
    from marionette_integrations.pool import TalkingHeadPool

    long = espeak("This is a much longer sentence that will be interrupted before it ends, surely.", rate=RATE)

    async def main():
        pool = await TalkingHeadPool(TalkingHeadConfig(realtime=False, controls=STATIC_HEAD), pipeline=pipeline).start()
        talker, mute = MarionetteVideoService(pool=pool), MarionetteVideoService(pool=pool)
        done = asyncio.Event()
        seen = {}

        async def speak(src, sink, task):
            await src.speak(long)
            while len(sink.speaking_images()) < 8:
                await asyncio.sleep(0.01)
            await task.queue_frame(InterruptionFrame())
            while talker.talking_head.last_interrupt_frame is None:
                await asyncio.sleep(0.005)
            n = len(sink.images())
            while len(sink.images()) < n + 8:
                await asyncio.sleep(0.02)
            seen["info"] = pool.info()
            done.set()

        async def listen(src, sink, task):
            await done.wait()

        sinks = await asyncio.gather(run(talker, speak), run(mute, listen))
        heads = (talker.talking_head, mute.talking_head)
        await pool.aclose()
        return sinks, seen, heads

    (s_talk, s_mute), seen, (h_talk, h_mute) = asyncio.run(asyncio.wait_for(main(), 240))
    print("pool:", seen["info"])
    assert h_talk.pool is h_mute.pool and seen["info"]["batch_rounds"].get(2, 0) >= 5
    img_t, img_m = s_talk.images(), s_mute.images()
    audio = s_talk.of(TTSAudioRawFrame)
    assert not s_mute.of(TTSAudioRawFrame)
    dev_t = mouth_dev(frame_arrays(img_t), frame_arrays(img_t[:1])[0])
    dev_m = mouth_dev(frame_arrays(img_m), frame_arrays(img_m[:1])[0])
    loud = np.array([f.pts in {a.pts for a in audio if np.abs(np.frombuffer(a.audio, np.int16)).max() > 1000}
                     for f in img_t])
    print(f"mouth deviation: talker speech {dev_t[loud].mean():.1f}, silent pipeline max {dev_m.max():.2f}")
    assert loud.sum() >= 5 and dev_t[loud].mean() > 6 and dev_m.max() < 3
    # the interruption: no speech from its frame on, most of the utterance dropped, the mouth shut after it
    cut = h_talk.last_interrupt_frame
    assert max(a.pts * 25 // NS for a in audio) < cut
    assert sum(len(a.audio) for a in audio) // 2 < len(long) // 2
    after = [i for i, f in enumerate(img_t) if f.pts * 25 // NS >= cut]
    assert after and dev_t[after].max() < 3
