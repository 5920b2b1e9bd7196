import math
import wave

import numpy as np
import pytest
import torch

from engine.audio import (MelStream, _hz_to_mel, _mel_to_hz, frame_energy, load_audio, log_mel, mel_windows,
                          n_mel_frames, voice_activity)
from engine.config import AudioConfig, ModelConfig
from engine.errors import InputError

CFG = AudioConfig()
SR = CFG.sample_rate


def _speechlike(seconds=1.3, seed=0):
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


def _stream(x, sizes):
    s = MelStream(CFG)
    out, i, k = [], 0, 0
    while i < len(x):
        n = sizes[k % len(sizes)]
        out.append(s.push(x[i:i + n]))
        assert s.buffered_samples < CFG.win_length + CFG.hop_length
        i += n
        k += 1
    return torch.cat(out), s


@pytest.mark.parametrize("chunk", [160, 320, 592, 1])
def test_stream_equals_offline(chunk):
    x = _speechlike(0.6 if chunk == 1 else 1.3)
    offline = log_mel(x, CFG)
    streamed, s = _stream(x, [chunk])
    assert streamed.shape == offline.shape
    assert s.frames_emitted == offline.shape[0]
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=0)


def test_stream_random_chunks_and_reset():
    x = _speechlike(2.0, seed=3)
    rng = np.random.default_rng(7)
    sizes = [int(v) for v in rng.integers(1, 5000, size=200)]
    streamed, s = _stream(x, sizes)
    torch.testing.assert_close(streamed, log_mel(x, CFG), atol=1e-5, rtol=0)
    s.reset()
    assert s.frames_emitted == 0
    again = torch.cat([s.push(x[:8000]), s.push(x[8000:])])
    torch.testing.assert_close(again, log_mel(x, CFG), atol=1e-5, rtol=0)


def test_frame_count_formula():
    for n in [0, 1, 279, 280, 281, 439, 440, 1000, 16000, 16001]:
        expected = 0 if n + CFG.left_pad < CFG.win_length else (n + CFG.left_pad - CFG.win_length) // CFG.hop_length + 1
        assert n_mel_frames(n, CFG) == expected
        assert log_mel(np.zeros(n, np.float32), CFG).shape == (expected, CFG.n_mels)
    # one second at 16 kHz: 99 complete windows, ~100 per second
    assert n_mel_frames(SR, CFG) == 99


def test_mel_frame_alignment():
    """Mel frame k is centred on the k-th hop: an impulse at sample s lands in frames whose window covers it."""
    x = np.zeros(SR // 4, np.float32)
    s = 160 * 10 + 80  # middle of hop 10
    x[s] = 1.0
    m = log_mel(x, CFG)
    loud = torch.nonzero(m.max(dim=1).values > math.log(CFG.log_floor) + 1).flatten().tolist()
    covering = [k for k in range(m.shape[0]) if k * 160 - CFG.left_pad <= s < k * 160 - CFG.left_pad + CFG.win_length]
    assert set(loud) <= set(covering)
    assert 10 in loud


def test_sine_peaks_at_right_band():
    t = np.arange(SR) / SR
    m = log_mel((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), CFG)
    centres = _mel_to_hz(np.linspace(_hz_to_mel(CFG.f_min), _hz_to_mel(CFG.f_max), CFG.n_mels + 2))[1:-1]
    expected = int(np.argmin(np.abs(centres - 1000)))
    peaks = m.argmax(dim=1)
    assert (peaks == expected).all(), (peaks.unique(), expected)


def test_silence_gives_log_floor():
    m = log_mel(np.zeros(SR, np.float32), CFG)
    assert torch.allclose(m, torch.full_like(m, math.log(CFG.log_floor)))


def test_mel_windows_geometry():
    cfg = ModelConfig()
    mel = log_mel(_speechlike(1.0), cfg.audio)
    n = 25
    w = mel_windows(mel, cfg, n)
    assert w.shape == (n, cfg.audio.n_mels, cfg.mel_window)
    silence = math.log(cfg.audio.log_floor)
    for i in [0, 3, 10, 24]:
        s = cfg.mel_window_start(i)
        for j in range(cfg.mel_window):
            k = s + j
            expected = mel[k] if 0 <= k < mel.shape[0] else torch.full((cfg.audio.n_mels,), silence)
            torch.testing.assert_close(w[i, :, j], expected)
    # frame 0's window starts before the audio: padded with silence
    assert cfg.mel_window_start(0) < 0
    assert torch.all(w[0, :, 0] == silence)
    # more video frames than the audio covers: all-silence windows
    w2 = mel_windows(mel[:0], cfg, 3)
    assert torch.all(w2 == silence)


def _write_wav(path, data, rate):
    """data: (n,) or (n, channels) float in -1..1 -> 16-bit PCM wav."""
    data = np.asarray(data)
    if data.ndim == 1:
        data = data[:, None]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def test_load_audio_resamples_stereo(tmp_path):
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = np.zeros_like(left)
    p = tmp_path / "stereo.wav"
    _write_wav(p, np.stack([left, right], axis=1), rate)
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - int(seconds * SR)) <= 1
    # mono = mean of the channels: amplitude 0.25, still 440 Hz
    mid = x[2000:-2000]
    assert abs(np.sqrt(np.mean(mid ** 2)) - 0.25 / math.sqrt(2)) < 0.01
    spec = np.abs(np.fft.rfft(mid))
    assert abs(np.argmax(spec) * SR / len(mid) - 440) < 3
    # deterministic
    assert np.array_equal(x, load_audio(p))


def test_load_audio_16k_mono_passthrough(tmp_path):
    x0 = _speechlike(0.5)
    p = tmp_path / "mono.wav"
    _write_wav(p, x0, SR)
    x = load_audio(p)
    assert len(x) == len(x0)
    assert np.max(np.abs(x - x0)) < 1e-4


def test_load_audio_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(InputError):
        load_audio(garbage)
    empty_file = tmp_path / "zero.wav"
    empty_file.write_bytes(b"")
    with pytest.raises(InputError):
        load_audio(empty_file)
    empty = tmp_path / "empty.wav"
    _write_wav(empty, np.zeros(0), SR)
    with pytest.raises(InputError, match="empty"):
        load_audio(empty)


def test_load_audio_warns_on_clipping(tmp_path, caplog):
    t = np.arange(SR) / SR
    p = tmp_path / "clipped.wav"
    _write_wav(p, np.clip(3 * np.sin(2 * np.pi * 200 * t), -1, 1), SR)
    with caplog.at_level("WARNING"):
        load_audio(p)
    assert "clipped" in caplog.text


def test_frame_energy_and_voice_activity():
    fps = 25
    x = np.zeros(2 * SR, np.float32)
    t = np.arange(SR // 2) / SR
    x[SR // 2:SR] = 0.2 * np.sin(2 * np.pi * 300 * t)  # 0.5 .. 1.0 s
    e = frame_energy(x, fps, SR)
    assert e.shape == (50,)
    assert np.allclose(e[14:24], 0.2 / math.sqrt(2), atol=0.01)
    assert np.all(e[:12] == 0) and np.all(e[26:] == 0)
    vad = voice_activity(x, fps, SR)
    assert vad.shape == (50,)
    assert vad[13:25].all()
    assert not vad[:8].any() and not vad[30:].any()
    assert not voice_activity(np.zeros(SR, np.float32), fps, SR).any()
    # explicit frame count (longer than the audio): padded with zero energy
    assert frame_energy(x, fps, SR, n_frames=60)[50:].sum() == 0
