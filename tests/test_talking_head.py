"""The framework-neutral core of the voice-agent integrations (`marionette_integrations.TalkingHead`, which
the Pipecat service and the LiveKit video generator wrap), without either framework installed, so the default
suite covers it: TTS speech at 24 kHz in, 25 fps frames out each carrying its own 40 ms of the original
speech, the mouth moving with the speech and shut in silence, and an interruption that drops the rest.

The model: the `tiny` network with the z-responsive fixture weights (64 px), `realtime=False` (every frame is
rendered; the pacing itself is tested with the frameworks in tests/test_pipecat.py / test_livekit.py)."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed", allow_module_level=True)

from marionette_integrations import TalkingHead, TalkingHeadConfig  # noqa: E402
from streaming.fixtures import STATIC_HEAD, espeak, mouth_region, responsive_checkpoint  # noqa: E402

RATE = 24000  # a common TTS rate (not the engine's 16 kHz)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from streaming.pipeline import Pipeline

    ck = responsive_checkpoint(tmp_path_factory.mktemp("ckpt") / "responsive", "lite")
    return Pipeline.load(ck, config="lite", backend="torch", threads=1)


def test_speech_in_aligned_frames_out_mouth_follows_and_interrupt_drops_the_rest(pipeline):
    speech = espeak("Hello there, how are you today?", rate=RATE)

    async def main():
        head = await TalkingHead(TalkingHeadConfig(realtime=False, controls=STATIC_HEAD), pipeline=pipeline).start()
        out = []
        it = head.frames().__aiter__()
        for _ in range(4):  # idle first
            out.append(await it.__anext__())
        for i in range(0, len(speech), RATE // 50):  # 20 ms TTS chunks
            head.push_audio(speech[i:i + RATE // 50], RATE, 1)
        head.end_segment()
        while not out[-1].segment_end:
            out.append(await it.__anext__())
        n_end = len(out)
        for _ in range(5):
            out.append(await it.__anext__())
        # a second utterance, interrupted after a few frames
        head.push_audio(speech, RATE, 1)
        while sum(f.speaking for f in out[n_end + 5:]) < 6:
            out.append(await it.__anext__())
        head.interrupt()
        cut = head.last_interrupt_frame
        for _ in range(8):
            out.append(await it.__anext__())
        await head.aclose()
        return out, n_end, cut

    out, n_end, cut = asyncio.run(asyncio.wait_for(main(), 180))
    assert [f.index for f in out] == list(range(out[0].index, out[0].index + len(out)))  # one clock, no gaps
    first = [f for f in out[:n_end] if f.speaking]
    # each speaking frame carries its own 40 ms of the original speech, at its own rate: all of it, in order
    assert all(f.sample_rate == RATE and f.audio.shape == (RATE // 25, 1) for f in first)
    got = np.concatenate([f.audio[:, 0] for f in first])
    assert np.array_equal(got[:len(speech)], speech)
    # the mouth: open with the speech, shut in the silence around it (head held still)
    img = np.stack([f.image for f in out])
    dev = np.abs(np.stack([mouth_region(x) for x in img]) - mouth_region(img[0])).mean(axis=(1, 2, 3))
    loud = np.array([f.speaking and np.abs(f.audio).max() > 1000 for f in out[:n_end]])
    quiet = np.array([not f.speaking for f in out[:n_end + 5]])
    print(f"mouth deviation: speech {dev[:n_end][loud].mean():.1f}, silence {dev[:n_end + 5][quiet].mean():.2f}")
    assert dev[:n_end][loud].mean() > 6 and dev[:n_end + 5][quiet].max() < 3
    # the interruption: no speech from its frame on, the mouth shut
    after = [f for f in out if f.index >= cut]
    assert after and not any(f.speaking for f in after)
    assert max(dev[i] for i, f in enumerate(out) if f.index >= cut) < 3


def test_pooled_heads_share_one_scheduler_batched_each_mouth_follows_its_own_audio(pipeline):
    """Two TalkingHeads of one TalkingHeadPool: rendered by one scheduler thread (the one `serve` runs), both in
    the same rounds (batch size 2), and each head's lips follow its own speech: one speaks, one is silent."""
    import threading

    from marionette_integrations.pool import TalkingHeadPool

    speech = espeak("Hello there, how are you today?", rate=RATE)

    async def main():
        pool = await TalkingHeadPool(TalkingHeadConfig(realtime=False, controls=STATIC_HEAD),
                                     pipeline=pipeline).start()
        talker = await pool.head().start()
        mute = await pool.head().start()
        assert pool.heads == 2 and talker.pipeline is mute.pipeline is pool.pipeline
        threads = {t.name for t in threading.enumerate()}
        assert "marionette-pool-scheduler" in threads and not any(n.startswith("marionette-avatar") for n in threads)
        out = {talker: [], mute: []}
        batches = []
        talking, done = asyncio.Event(), asyncio.Event()

        async def pull(head, n_idle):
            it = head.frames().__aiter__()
            while True:
                f = await it.__anext__()
                out[head].append(f)
                batches.append(pool.scheduler.last_batch)
                if head is talker and len(out[head]) == n_idle:
                    talking.set()
                    for i in range(0, len(speech), RATE // 50):  # 20 ms TTS chunks
                        head.push_audio(speech[i:i + RATE // 50], RATE, 1)
                    head.end_segment()
                if head is talker and any(g.segment_end for g in out[head]) and len(out[head]) > n_idle + 3:
                    done.set()
                    return
                if head is mute and done.is_set():
                    return

        task_mute = asyncio.create_task(pull(mute, 0))
        await pull(talker, 4)
        await asyncio.wait_for(task_mute, 120)
        info = pool.info()
        members = [m.rendered for m in pool._members.values()]
        await pool.aclose()
        return out[talker], out[mute], batches, info, members

    ta, tm, batches, info, rendered = asyncio.run(asyncio.wait_for(main(), 240))
    print("pool:", info, "rendered per head:", rendered)
    # one scheduler rendered both heads' frames, and rounds carried both of them at once
    assert info["batch_rounds"].get(2, 0) >= 5 and 2 in batches
    assert all(n > 20 for n in rendered)
    for frames in (ta, tm):
        assert [f.index for f in frames] == list(range(frames[0].index, frames[0].index + len(frames)))
    # the talker: its own speech, all of it, in order; its mouth open with it and shut in silence
    got = np.concatenate([f.audio[:, 0] for f in ta if f.speaking])
    assert np.array_equal(got[:len(speech)], speech)
    ref = mouth_region(ta[0].image)
    dev_a = np.array([np.abs(mouth_region(f.image) - ref).mean() for f in ta])
    loud = np.array([f.speaking and np.abs(f.audio).max() > 1000 for f in ta])
    quiet = np.array([not f.speaking for f in ta])
    # the silent head: no speech, never an open mouth, while the other one spoke in the same rounds
    dev_m = np.array([np.abs(mouth_region(f.image) - mouth_region(tm[0].image)).mean() for f in tm])
    print(f"mouth deviation: talker speech {dev_a[loud].mean():.1f}, talker silence {dev_a[quiet].max():.2f}, "
          f"silent head {dev_m.max():.2f}")
    assert loud.sum() > 10 and dev_a[loud].mean() > 6 and dev_a[quiet].max() < 3
    assert not any(f.speaking or f.lips_open for f in tm) and dev_m.max() < 3
