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
