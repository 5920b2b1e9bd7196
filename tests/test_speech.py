"""espeak-ng speech with phoneme timing (real libespeak-ng)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InputError, MissingDependency
from trainer.corpus import speech
from trainer.corpus.words import ALL_WORDS, random_sentence

TEXT = "Hello world, this is a test of the speech."


def test_synthesize_gives_16k_samples_and_ordered_phonemes():
    s = speech.synthesize(TEXT, "en-us", 170, 50)
    assert s.sample_rate == 16000 and s.samples.dtype == np.float32 and s.samples.ndim == 1
    assert 1.0 < s.duration < 4.0
    assert np.abs(s.samples).max() <= 1.0 and np.abs(s.samples).max() > 0.05
    names = [p.name for p in s.phonemes]
    assert "h" in names and "oU" in names and any(p.is_pause for p in s.phonemes)
    starts = [p.start_ms for p in s.phonemes]
    assert starts == sorted(starts)
    assert all(p.start_ms <= p.end_ms <= 1000 * s.duration + 1e-6 for p in s.phonemes)
    assert [w.text for w in s.words][:2] == ["Hello", "world"]


def test_same_arguments_same_samples_regardless_of_history():
    a = speech.synthesize(TEXT, "en-us", 170, 50)
    speech.synthesize("Something else entirely, in another voice!", "en+f3", 300, 90)  # would leak state
    b = speech.synthesize(TEXT, "en-us", 170, 50)
    assert np.array_equal(a.samples, b.samples) and a.phonemes == b.phonemes


def test_voices_rates_and_pitches_change_the_speech():
    base = speech.synthesize(TEXT, "en-us", 170, 50)
    faster = speech.synthesize(TEXT, "en-us", 260, 50)
    assert faster.duration < 0.8 * base.duration
    other = speech.synthesize(TEXT, "en+f3", 170, 80)
    assert len(other.samples) != len(base.samples) or not np.array_equal(other.samples, base.samples)


def test_pauses_are_silent_in_the_audio():
    s = speech.synthesize("One two three. Four five six.", "en-us", 160, 50)
    long_pauses = [p for p in s.phonemes if p.is_pause and p.end_ms - p.start_ms > 100]
    assert long_pauses
    voiced_rms = np.sqrt(np.mean(s.samples ** 2))
    for p in long_pauses:
        a, b = int((p.start_ms + 20) * 16), int((p.end_ms - 20) * 16)
        seg = s.samples[a:b]
        assert np.sqrt(np.mean(seg ** 2)) < 0.1 * voiced_rms


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="no voice"):
        speech.synthesize("hello", "xx-nonexistent")
    with pytest.raises(InputError, match="empty"):
        speech.synthesize("   ")
    with pytest.raises(InputError, match="rate"):
        speech.synthesize("hello", rate=5)


def test_missing_library_names_the_fix(monkeypatch):
    monkeypatch.setattr(speech.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(speech, "_can_load", lambda name: False)
    monkeypatch.setattr(speech, "_HELPER", speech._Helper())
    with pytest.raises(MissingDependency, match="apt-get install espeak-ng"):
        speech.synthesize("hello")


def test_random_sentences_are_seeded():
    assert len(ALL_WORDS) >= 300
    a = [random_sentence(np.random.default_rng(3), n) for n in (1, 4, 9)]
    b = [random_sentence(np.random.default_rng(3), n) for n in (1, 4, 9)]
    assert a == b
    assert [len(s.split()) for s in a] == [1, 4, 9]
    assert a[0][-1] in ".?!"
