"""The glass-to-glass benchmark's real-voice onsets (benchmarks/glass_to_glass.py): where a phrase starts in a
recording with room noise, and the phrases cut from the real speech installed here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def g2g():
    pytest.importorskip("aiortc")
    spec = importlib.util.spec_from_file_location("glass_to_glass", ROOT / "benchmarks" / "glass_to_glass.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("glass_to_glass", mod)
    spec.loader.exec_module(mod)
    return mod


def test_phrase_onsets_find_the_first_audible_sound_after_each_pause(g2g):
    """Room noise at -60 dBFS, two phrases: each rises from a soft start (-50 dBFS, 30 ms, under the level that detects a phrase) to speech level. The
    onset is the soft start (the first sound 6 dB over the floor), not where the loud part begins, and a short
    dip inside a phrase is not a new onset."""
    rng = np.random.default_rng(0)
    sr = 16000
    x = rng.normal(0, 0.001, 4 * sr)  # -60 dBFS

    def phrase(at_s: float, dur_s: float) -> int:
        i = int(at_s * sr)
        soft, loud = int(0.03 * sr), int(dur_s * sr)
        x[i:i + soft] += rng.normal(0, 0.003, soft)  # -50 dBFS: under the detection level
        x[i + soft:i + soft + loud] += 0.3 * np.sin(2 * np.pi * 180 * np.arange(loud) / sr)
        return i

    a = phrase(0.5, 0.8)
    x[int(0.9 * sr):int(0.95 * sr)] = rng.normal(0, 0.001, int(0.05 * sr))  # a 50 ms dip: not a pause
    b = phrase(2.2, 0.6)
    on = g2g.phrase_onsets(x.astype(np.float32), sr)
    assert len(on) == 2, on
    for got, want in zip(on, (a, b)):
        assert abs(got - want) <= 0.005 * sr, (got, want)  # within 5 ms of the soft start (the loud part: +30 ms)


def test_human_utterances_are_real_phrases_at_48k_with_their_onsets(g2g):
    from trainer.evaluate import real_speech_files

    if not real_speech_files():
        pytest.skip("no recordings of real speech here (apt-get install pocketsphinx-testdata)")
    bank = g2g.human_utterances()
    assert len(bank) >= 10
    for u in bank:
        assert u.samples.dtype == np.int16 and 0.3 * 48000 < len(u.samples) <= 1.6 * 48000
        head, tail = u.samples[:u.onset].astype(np.float64), u.samples[u.onset:u.onset + 4800].astype(np.float64)
        assert np.sqrt((tail ** 2).mean()) > 4 * np.sqrt((head ** 2).mean() + 1), u.name  # speech after, not before
    words = {u.first_word for u in bank if u.first_word}
    assert {"he", "five", "go"} <= words  # from the package's transcriptions and grammar
