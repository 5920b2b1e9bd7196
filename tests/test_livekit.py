"""The LiveKit Agents avatar (`MarionetteVideoGenerator`) driven as `AvatarRunner` drives it: `push_audio`
with real `livekit.rtc.AudioFrame`s (espeak-ng speech, 48 kHz stereo 10 ms frames as an agent's TTS output
reaches the avatar), `AudioSegmentEnd`, `clear_buffer`, and its async iterator read for video and audio.
No LiveKit server runs here, so the room, the track publication and `AvatarRunner` itself are not run.

The model: the `lite` network with the z-responsive fixture weights, `realtime=False` (every frame
rendered; see tests/test_pipecat.py).
"""

from __future__ import annotations

import asyncio
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("livekit.agents")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, VideoGenerator  # noqa: E402

from marionette_integrations import TalkingHead, TalkingHeadConfig  # noqa: E402
from marionette_integrations.livekit import MarionetteVideoGenerator  # noqa: E402
from streaming.fixtures import STATIC_HEAD, espeak, mouth_region, responsive_checkpoint  # noqa: E402

RATE = 48000


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from streaming.pipeline import Pipeline

    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "responsive", "lite")
    return Pipeline.load(ck, config="lite", backend="torch", threads=1)


def stereo_frames(mono: np.ndarray, rate: int = RATE, ms: int = 10) -> list[rtc.AudioFrame]:
    n = rate * ms // 1000
    st = np.repeat(mono[:, None], 2, axis=1)
    out = []
    for i in range(0, len(st), n):
        chunk = np.zeros((n, 2), np.int16)
        part = st[i:i + n]
        chunk[:len(part)] = part
        out.append(rtc.AudioFrame(chunk.tobytes(), rate, 2, n))
    return out


def test_video_generator_speaks_aligned_then_idles_and_clears(pipeline):
    speech = espeak("Hello there, how are you?", rate=RATE)
    frames_in = stereo_frames(speech)
    total_in = sum(f.samples_per_channel for f in frames_in)

    async def main():
        # pose and gaze held still, so the mouth region changes only with the lips (tests/test_pipecat.py)
        head = await TalkingHead(TalkingHeadConfig(realtime=False, controls=STATIC_HEAD), pipeline=pipeline).start()
        gen = MarionetteVideoGenerator(head)
        assert isinstance(gen, VideoGenerator)
        out: list = []
        it = gen.__aiter__()

        async def take_until(pred, limit=400):
            while len(out) < limit:
                x = await it.__anext__()
                out.append(x)
                if pred(x):
                    return
            raise AssertionError("never happened")

        videos = lambda: [x for x in out if isinstance(x, rtc.VideoFrame)]  # noqa: E731
        await take_until(lambda x: len(videos()) >= 4)  # idle first
        for f in frames_in:
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        await take_until(lambda x: isinstance(x, AudioSegmentEnd))
        n_end = len(videos())
        await take_until(lambda x: len(videos()) >= n_end + 5)  # idle after
        # an interruption: a second utterance cleared after a few frames
        for f in frames_in:
            await gen.push_audio(f)
        n0 = len([x for x in out if isinstance(x, rtc.AudioFrame)])
        await take_until(lambda x: len([y for y in out if isinstance(y, rtc.AudioFrame)]) >= n0 + 6)
        gen.clear_buffer()
        cut = head.last_interrupt_frame
        n_cut = len(videos())
        await take_until(lambda x: len(videos()) >= n_cut + 6)
        await gen.aclose()
        return out, n_end, cut, head

    out, n_end, cut, head = asyncio.run(asyncio.wait_for(main(), 240))
    # the stream: video frames, each followed by the audio of the same 40 ms while speaking
    kinds = ["v" if isinstance(x, rtc.VideoFrame) else "a" if isinstance(x, rtc.AudioFrame) else "e" for x in out]
    assert kinds[0] == "v"
    for i, k in enumerate(kinds):
        if k == "a":
            assert kinds[i - 1] == "v", kinds[i - 3:i + 1]
        if k == "e":
            assert kinds[i - 1] == "a"  # AudioSegmentEnd right after the utterance's last audio
    vids = [x for x in out if isinstance(x, rtc.VideoFrame)]
    assert vids[0].width == 256 and vids[0].height == 256 and vids[0].type == rtc.VideoBufferType.RGBA
    img = np.stack([np.frombuffer(bytes(v.data), np.uint8).reshape(256, 256, 4)[..., :3] for v in vids])
    # video index of each audio frame: the video frame before it
    vid_of_audio, speaking = [], np.zeros(len(vids), bool)
    v = -1
    first_utt_audio = []
    for i, x in enumerate(out):
        if isinstance(x, rtc.VideoFrame):
            v += 1
        elif isinstance(x, rtc.AudioFrame):
            vid_of_audio.append(v)
            speaking[v] = True
            if v < n_end:
                first_utt_audio.append(x)
    # the first utterance: all of it, 40 ms per video frame, original rate and channels
    assert all(a.sample_rate == RATE and a.num_channels == 2 and a.samples_per_channel == RATE // 25
               for a in first_utt_audio)
    got = np.concatenate([np.frombuffer(bytes(a.data), np.int16).reshape(-1, 2)[:, 0] for a in first_utt_audio])
    assert len(got) >= total_in - RATE // 25 and np.array_equal(got[:len(speech)], speech)
    # mouth: open with the speech, shut before and after; shut from the interruption on
    dev = np.abs(np.stack([mouth_region(f) for f in img]) - mouth_region(img[0])).mean(axis=(1, 2, 3))
    s1 = np.flatnonzero(speaking[:n_end])
    loud = np.array([np.abs(np.frombuffer(bytes(a.data), np.int16)).max() > 1000 for a in first_utt_audio])
    sp = dev[np.array(vid_of_audio[:len(first_utt_audio)])[loud]]
    quiet = np.r_[dev[:s1[0]], dev[s1[-1] + 2:n_end + 5]]
    print(f"\n{len(vids)} video frames; mouth deviation speech {sp.mean():.1f}, silence {quiet.mean():.2f} "
          f"(max {quiet.max():.2f}); interrupt at frame {cut}; {head.stats}")
    assert sp.mean() > 6 and sp.mean() > 5 * quiet.mean() and quiet.max() < 3
    # the interruption: no audio after its frame, mouth shut from it on
    assert max(vid_of_audio) < cut
    assert dev[cut:cut + 6].max() < 3
    assert dev[cut - 4:cut - 1].mean() > 6


def test_realtime_through_livekits_av_synchronizer(pipeline):
    """realtime=True, the frames pushed into a real `rtc.AVSynchronizer` (with an `rtc.AudioSource` and an
    `rtc.VideoSource`) exactly as `AvatarRunner._forward_video` does: 25 video frames a second of wall time
    whatever the render speed, every audio sample pushed, `AudioSegmentEnd` after the last of them."""
    speech = espeak("Hello, how are you?", rate=RATE)[:RATE]  # 1 s

    async def main():
        head = await TalkingHead(TalkingHeadConfig(realtime=True), pipeline=pipeline).start()
        gen = MarionetteVideoGenerator(head)
        w, h = head.frame_size
        sync = rtc.AVSynchronizer(audio_source=rtc.AudioSource(RATE, 2, queue_size_ms=100),
                                  video_source=rtc.VideoSource(w, h), video_fps=25, video_queue_size_ms=100)
        log = []

        async def forward():
            async for f in gen:
                if not isinstance(f, AudioSegmentEnd):
                    await sync.push(f)
                log.append((time.monotonic(), f))

        task = asyncio.ensure_future(forward())
        await asyncio.sleep(0.5)
        for i, f in enumerate(stereo_frames(speech)):  # 100 ms every 50 ms: a TTS at twice real time
            await gen.push_audio(f)
            if i % 10 == 9:
                await asyncio.sleep(0.05)
        await gen.push_audio(AudioSegmentEnd())
        await asyncio.sleep(2.0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sync.aclose()
        await gen.aclose()
        return log, head

    log, head = asyncio.run(asyncio.wait_for(main(), 120))
    tv = np.array([t for t, f in log if isinstance(f, rtc.VideoFrame)])
    rate = (len(tv) - 1) / (tv[-1] - tv[0])
    audio = [f for _, f in log if isinstance(f, rtc.AudioFrame)]
    got = np.concatenate([np.frombuffer(bytes(a.data), np.int16).reshape(-1, 2)[:, 0] for a in audio])
    ends = [i for i, (_, f) in enumerate(log) if isinstance(f, AudioSegmentEnd)]
    print(f"\nrealtime via AVSynchronizer: {len(tv)} video frames at {rate:.1f} fps, {len(audio)} audio frames; "
          f"{head.stats}")
    assert 23 <= rate <= 26.5
    assert np.array_equal(got[:len(speech)], speech)
    assert len(ends) == 1 and isinstance(log[ends[0] - 1][1], rtc.AudioFrame)


# ================================================================================= the remote pattern
def test_avatar_session_dispatch_and_job_metadata_are_validated():
    """The agent side's AvatarSession builds the dispatch the worker accepts (AvatarJob as JSON metadata);
    bad identities, fields and metadata are refused before anything is sent."""
    from livekit.agents.voice.avatar import AvatarSession as BaseAvatarSession

    from marionette_integrations.livekit import AGENT_NAME, AvatarJob, AvatarSession

    s = AvatarSession(avatar="alice", sample_rate=16000, controls=[{"type": "expression", "preset": "happy"}])
    assert isinstance(s, BaseAvatarSession) and s.provider == "marionette"
    with pytest.raises(RuntimeError):
        s.avatar_identity  # noqa: B018 - known once started
    req = s.dispatch_request("room-1", "agent-AJ_1")
    assert req.agent_name == AGENT_NAME and req.room == "room-1"
    job = AvatarJob.from_metadata(req.metadata)
    assert job == s.job and job.agent_identity == "agent-AJ_1" and job.avatar_identity == s.avatar_identity
    assert job.avatar == "alice" and job.sample_rate == 16000 and job.controls[0]["preset"] == "happy"
    for bad in ("", "not json", "[1]", '{"agent_identity": "a"}', '{"agent_identity": "a", "avatar_identity": "a"}',
                '{"agent_identity": "a", "avatar_identity": "b", "sample_rate": 100}',
                '{"agent_identity": "a", "avatar_identity": "b c"}',
                '{"agent_identity": "a", "avatar_identity": "b", "avatar": "../etc/passwd"}',
                '{"agent_identity": "a", "avatar_identity": "b", "extra": 1}'):
        with pytest.raises(ValueError):
            AvatarJob.from_metadata(bad)
    with pytest.raises(ValueError):
        AvatarSession(agent_name="no spaces")
    with pytest.raises(ValueError):
        AvatarSession(avatar_identity="x" * 200)


def test_worker_accepts_wires_a_pooled_generator_fed_as_the_datastream_receiver_does_and_reports_load(
        pipeline, tmp_path):
    """The avatar worker without a LiveKit server: its AgentServer (explicit dispatch, jobs as threads, load =
    the pool's), its request handler on real `JobRequest`s (accepted as the avatar's identity on the agent's
    behalf; bad metadata, unknown avatars and a full pool refused), and the generator it gives AvatarRunner
    for a job, fed exactly what DataStreamAudioReceiver yields (the byte stream cut by livekit-agents'
    AudioByteStream into 100 ms frames, then AudioSegmentEnd): aligned frames, the mouth moving with the
    speech and shut after it."""
    from livekit.agents import AgentServer
    from livekit.agents.job import JobRequest
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.agents.utils.audio import AudioByteStream
    from livekit.agents.worker import JobExecutorType
    from livekit.protocol import agent, models

    from marionette_integrations.livekit import AvatarJob, AvatarSession, AvatarWorker
    from marionette_integrations.pool import TalkingHeadPool

    tts_rate = 24000
    speech = espeak("Hello there, how are you?", rate=tts_rate)
    with pytest.raises(ValueError):
        AvatarWorker(pool=None, avatars={"x": tmp_path / "missing.png"})
    with pytest.raises(ValueError):
        AvatarWorker(pool=None, load_threshold=1.5)

    async def main():
        pool = await TalkingHeadPool(TalkingHeadConfig(realtime=False, controls=STATIC_HEAD), pipeline=pipeline,
                                     max_heads=1).start()
        worker = AvatarWorker(pool)
        srv = worker.server(url="ws://127.0.0.1:7880", api_key="key", api_secret="secret")
        assert isinstance(srv, AgentServer) and srv._agent_name == worker.agent_name
        assert srv._job_executor_type == JobExecutorType.THREAD and srv.load_fnc() == worker.load() == 0.0

        decisions = []

        async def on_reject(terminate):
            decisions.append(("reject", None))

        async def on_accept(args):
            decisions.append(("accept", args))

        def request(metadata):
            job = agent.Job(id="AJ_1", type=agent.JobType.JT_ROOM, room=models.Room(name="room-1"),
                            metadata=metadata, agent_name=worker.agent_name)
            return JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)

        session = AvatarSession()
        good = session.dispatch_request("room-1", "agent-AJ_9").metadata
        await worker.on_request(request(good))
        await worker.on_request(request("garbage"))
        await worker.on_request(request(AvatarSession(avatar="nobody").dispatch_request("r", "a").metadata))
        # the job, as the entrypoint starts it (its room part needs a LiveKit server)
        job = AvatarJob.from_metadata(good)
        head, gen = await worker.start_head(job)
        opts = worker.runner_options(head, job)
        assert (opts.video_width, opts.video_height, opts.video_fps) == (*head.frame_size, 25)
        assert opts.audio_sample_rate == tts_rate and opts.audio_channels == 1
        assert pool.heads == 1 and not pool.admitting()
        await worker.on_request(request(good))  # full now (max_heads=1)
        load = srv.load_fnc()
        out = []
        it = gen.__aiter__()
        videos = lambda: [x for x in out if isinstance(x, rtc.VideoFrame)]  # noqa: E731
        while len(videos()) < 4:
            out.append(await it.__anext__())
        bstream = AudioByteStream(sample_rate=tts_rate, num_channels=1, samples_per_channel=tts_rate // 10)
        data = speech.tobytes()
        for i in range(0, len(data), 4000):  # the byte stream's chunks
            for f in bstream.push(data[i:i + 4000]):
                await gen.push_audio(f)
        for f in bstream.flush():
            await gen.push_audio(f)
        await gen.push_audio(AudioSegmentEnd())
        while not any(isinstance(x, AudioSegmentEnd) for x in out):
            out.append(await it.__anext__())
        n_end = len(videos())
        while len(videos()) < n_end + 5:
            out.append(await it.__anext__())
        await gen.aclose()
        await pool.aclose()
        return decisions, out, load

    decisions, out, load = asyncio.run(asyncio.wait_for(main(), 240))
    assert [d[0] for d in decisions] == ["accept", "reject", "reject", "reject"]
    args = decisions[0][1]
    assert args.identity == "marionette-avatar-agent-AJ_9"
    assert args.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-AJ_9"}
    assert 0.0 < load <= 1.0  # one head on a pool of at most one: full
    kinds = ["v" if isinstance(x, rtc.VideoFrame) else "a" if isinstance(x, rtc.AudioFrame) else "e" for x in out]
    for i, k in enumerate(kinds):
        if k == "a":
            assert kinds[i - 1] == "v"
    audio = [x for x in out if isinstance(x, rtc.AudioFrame)]
    assert all(a.sample_rate == tts_rate and a.samples_per_channel == tts_rate // 25 for a in audio)
    got = np.concatenate([np.frombuffer(bytes(a.data), np.int16) for a in audio])
    assert np.array_equal(got[:len(speech)], speech)
    vids = [x for x in out if isinstance(x, rtc.VideoFrame)]
    w, h = vids[0].width, vids[0].height
    img = np.stack([np.frombuffer(bytes(v.data), np.uint8).reshape(h, w, 4)[..., :3] for v in vids])
    dev = np.abs(np.stack([mouth_region(x) for x in img]) - mouth_region(img[0])).mean(axis=(1, 2, 3))
    loud, v = np.zeros(len(vids), bool), -1
    for x in out:
        if isinstance(x, rtc.VideoFrame):
            v += 1
        elif isinstance(x, rtc.AudioFrame):
            loud[v] = np.abs(np.frombuffer(bytes(x.data), np.int16)).max() > 1000
    print(f"mouth deviation: speech {dev[loud].mean():.1f}, silence after {dev[~loud][-5:].max():.2f}; load {load:.2f}")
    assert loud.sum() > 10 and dev[loud].mean() > 6 and dev[~loud][-5:].max() < 3 and dev[:4].max() < 3
