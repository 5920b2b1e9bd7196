"""Audio front end: file loading, log-mel (offline and streaming, identical), lip-encoder windows,
per-video-frame energy and a simple voice-activity detector.

Log-mel (one implementation for training, offline rendering and streaming):
  * framing as documented on `AudioConfig`: left-pad `left_pad` zeros, mel frame k covers
    padded[k*hop : k*hop + win_length]; only complete windows, no right padding, so
    n_frames = 0 if N + left_pad < win_length else (N + left_pad - win_length) // hop + 1;
  * periodic Hann window of `win_length`, zero-padded at the end to `n_fft`, |rfft|^2 (power);
  * Slaney-style mel filterbank (the mel scale of Slaney's Auditory Toolbox: linear below 1 kHz,
    logarithmic above; triangles normalised to unit area, "slaney" norm) between f_min and f_max;
  * natural log of max(mel, log_floor).
The spectrum is computed in float64 per frame and cast to float32 at the end, so the streaming
`MelStream` reproduces the offline `log_mel` to ~1e-7 whatever the chunking.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from engine.config import AudioConfig, ModelConfig
from engine.errors import InputError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


# --------------------------------------------------------------------------------------- mel basis
def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mel per 200 Hz) below 1 kHz, log above."""
    f = np.asarray(f, np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    lin = f / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=8)
def mel_filterbank(cfg: AudioConfig) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) float64 Slaney-normalised triangular filters (read-only)."""
    n_bins = cfg.n_fft // 2 + 1
    fft_hz = np.linspace(0.0, cfg.sample_rate / 2, n_bins)
    mel_pts = np.linspace(_hz_to_mel(cfg.f_min), _hz_to_mel(cfg.f_max), cfg.n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_hz[None, :]  # (n_mels + 2, n_bins)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # (n_mels, n_bins)
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]  # slaney area normalisation
    fb = np.ascontiguousarray(weights.T)
    fb.setflags(write=False)
    return fb


@lru_cache(maxsize=8)
def _window(win_length: int) -> np.ndarray:
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win_length) / win_length)  # periodic Hann
    w.setflags(write=False)
    return w


def n_mel_frames(n_samples: int, cfg: AudioConfig) -> int:
    """Mel frames `log_mel` gives for `n_samples` samples (complete windows only)."""
    padded = n_samples + cfg.left_pad
    return 0 if padded < cfg.win_length else (padded - cfg.win_length) // cfg.hop_length + 1


def _frames_to_logmel(frames: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """(T, win_length) float64 frames -> (T, n_mels) float32 log-mel."""
    if frames.shape[0] == 0:
        return np.zeros((0, cfg.n_mels), np.float32)
    spec = np.fft.rfft(frames * _window(cfg.win_length), n=cfg.n_fft, axis=1)
    power = spec.real ** 2 + spec.imag ** 2
    mel = power @ mel_filterbank(cfg)
    return np.log(np.maximum(mel, cfg.log_floor)).astype(np.float32)


def _as_1d_float64(samples) -> np.ndarray:
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    x = np.asarray(samples)
    if x.ndim != 1:
        raise InputError(f"expected 1-D mono samples, got shape {tuple(x.shape)}")
    return x.astype(np.float64, copy=False)


def log_mel(samples, cfg: AudioConfig = AudioConfig()) -> torch.Tensor:
    """1-D float samples at cfg.sample_rate -> (T, n_mels) float32 log-mel (framing: module doc)."""
    x = _as_1d_float64(samples)
    n = n_mel_frames(len(x), cfg)
    if n == 0:
        return torch.zeros((0, cfg.n_mels), dtype=torch.float32)
    padded = np.concatenate([np.zeros(cfg.left_pad), x])
    frames = np.lib.stride_tricks.sliding_window_view(padded, cfg.win_length)[:: cfg.hop_length][:n]
    return torch.from_numpy(_frames_to_logmel(frames, cfg))


class MelStream:
    """Incremental `log_mel`: push chunks of any size, get exactly the frames the offline function
    gives on the concatenation of everything pushed since the last reset.

    Keeps at most win_length + hop_length - 1 samples between calls (the start of the next window).
    """

    def __init__(self, cfg: AudioConfig = AudioConfig()):
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(self.cfg.left_pad, np.float64)
        self.frames_emitted = 0
        self.samples_pushed = 0

    @property
    def buffered_samples(self) -> int:
        return len(self._buf)

    def push(self, chunk) -> torch.Tensor:
        """Append samples; returns the (n_new, n_mels) float32 frames they completed (n_new may be 0)."""
        x = _as_1d_float64(chunk)
        self.samples_pushed += len(x)
        buf = np.concatenate([self._buf, x]) if len(x) else self._buf
        cfg = self.cfg
        n = 0 if len(buf) < cfg.win_length else (len(buf) - cfg.win_length) // cfg.hop_length + 1
        if n == 0:
            self._buf = buf
            return torch.zeros((0, cfg.n_mels), dtype=torch.float32)
        frames = np.lib.stride_tricks.sliding_window_view(buf, cfg.win_length)[:: cfg.hop_length][:n]
        out = _frames_to_logmel(frames, cfg)
        self._buf = buf[n * cfg.hop_length:].copy()
        self.frames_emitted += n
        return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------ files
def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Deterministic polyphase resampling (scipy.signal.resample_poly), float32 out.

    Output length = ceil(len(x) * target / rate)."""
    if rate == target:
        return np.asarray(x, np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(np.asarray(x, np.float64), target // g, rate // g).astype(np.float32)


def load_audio(path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio file PyAV (FFmpeg) can read -> mono float32 at `sample_rate`.

    Stereo is averaged ((L + R) / 2), surround downmixed by FFmpeg, then resampled with `resample`
    (polyphase, deterministic). Raises InputError for a
    missing, unreadable or empty file; logs a warning when more than 1% of the samples are clipped.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file not found: {path}")
    chunks: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"{path} has no audio stream")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate
            to_float = None
            for frame in container.decode(stream):
                if to_float is None:
                    rate = frame.sample_rate or rate
                    # planar float at the native rate: (channels, samples). Mono and stereo keep their
                    # channels (averaged below); surround is downmixed by FFmpeg (centre = dialogue at
                    # full level, the mean of six channels would bury it).
                    surround = len(frame.layout.channels) > 2
                    to_float = av.AudioResampler(format="fltp", layout="mono" if surround else frame.layout,
                                                 rate=frame.sample_rate)
                for f in to_float.resample(frame):
                    chunks.append(f.to_ndarray())
            if to_float is not None:
                for f in to_float.resample(None):
                    chunks.append(f.to_ndarray())
    except InputError:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError, OSError) as e:
        raise InputError(f"cannot read audio from {path}: {e}") from None
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise InputError(f"audio is empty: {path}")
    if not rate:
        raise InputError(f"cannot read audio from {path}: unknown sample rate")
    x = np.concatenate(chunks, axis=1).astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise InputError(f"{path} decodes to non-finite samples")
    x = x.mean(axis=0)
    clipped = float(np.mean(np.abs(x) >= 0.999))
    if clipped > 0.01:
        log.warning("%s: %.1f%% of the samples are clipped; lip sync may suffer", path, 100 * clipped)
    return resample(x, int(rate), sample_rate)


# ------------------------------------------------------------------------------- lip-encoder windows
def window_starts(cfg: ModelConfig, n_frames: int, fps: float | None = None, start: int = 0) -> np.ndarray:
    """First mel frame of the lip windows of video frames start .. start + n_frames - 1, int64.

    At the model's fps this is `cfg.mel_window_start(i)`; at another frame rate (e.g. 30 fps, not a
    whole number of 10 ms hops per frame) the window still ends `mel_future` frames after the mel
    frame holding the end of video frame i: round((i + 1) * hops_per_second / fps) - mel_past.
    """
    frames = np.arange(start, start + n_frames, dtype=np.int64)
    if fps is None or fps == cfg.fps:
        return np.array([cfg.mel_window_start(int(i)) for i in frames], np.int64)
    hops_per_s = cfg.audio.sample_rate / cfg.audio.hop_length
    ends = np.round((frames + 1) * hops_per_s / fps).astype(np.int64)
    return ends - cfg.mel_past


def mel_windows(mel: torch.Tensor, cfg: ModelConfig, n_frames: int, fps: float | None = None,
                start: int = 0) -> torch.Tensor:
    """(T, n_mels) log-mel -> (n_frames, n_mels, cfg.mel_window) windows of the lip encoder for video
    frames start .. start + n_frames - 1.

    Window of video frame i = mel frames [cfg.mel_window_start(i), + mel_window) (`window_starts`
    for an fps other than the model's); frames outside [0, T) are silence (log(log_floor)).
    """
    mel = torch.as_tensor(mel, dtype=torch.float32)
    if mel.ndim != 2:
        raise ValueError(f"mel must be (T, n_mels), got {tuple(mel.shape)}")
    t, n_mels = mel.shape
    w = cfg.mel_window
    if n_frames <= 0:
        return torch.zeros((0, n_mels, w), dtype=torch.float32)
    starts = torch.from_numpy(window_starts(cfg, n_frames, fps, start))
    pad_front = max(0, -int(starts.min()))
    pad_back = max(0, int(starts.max()) + w - t)
    silence = math.log(cfg.audio.log_floor)
    padded = torch.cat([mel.new_full((pad_front, n_mels), silence), mel,
                        mel.new_full((pad_back, n_mels), silence)])
    starts = starts + pad_front
    idx = starts[:, None] + torch.arange(w)[None, :]  # (n_frames, w)
    return padded[idx].transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------ energy and activity
def _frame_bounds(n_samples: int, fps: float, sample_rate: int, n_frames: int | None) -> tuple[int, np.ndarray]:
    if n_frames is None:
        n_frames = int(round(n_samples / sample_rate * fps))
    edges = np.round(np.arange(n_frames + 1) * (sample_rate / fps)).astype(np.int64)
    return n_frames, np.minimum(edges, n_samples)


def frame_energy(samples, fps: float = 25, sample_rate: int = SAMPLE_RATE,
                 n_frames: int | None = None) -> np.ndarray:
    """RMS of the samples of each video frame, (n_frames,) float32.

    Frame i covers samples [round(i*sr/fps), round((i+1)*sr/fps)); n_frames defaults to
    round(duration * fps); frames with no samples left have energy 0.
    """
    x = _as_1d_float64(samples)
    n_frames, edges = _frame_bounds(len(x), fps, sample_rate, n_frames)
    if n_frames == 0:
        return np.zeros(0, np.float32)
    csum = np.concatenate([[0.0], np.cumsum(x * x)])
    sums = csum[edges[1:]] - csum[edges[:-1]]
    counts = edges[1:] - edges[:-1]
    return np.sqrt(np.where(counts > 0, np.maximum(sums, 0) / np.maximum(counts, 1), 0.0)).astype(np.float32)


def voice_activity(samples, fps: float = 25, sample_rate: int = SAMPLE_RATE, n_frames: int | None = None,
                   rel_db: float = -30.0, floor_db: float = -55.0, hangover: int = 2) -> np.ndarray:
    """Offline per-video-frame voice activity, (n_frames,) bool.

    A frame is active when its RMS level is above max(floor_db dBFS, clip level + rel_db), the clip
    level being the 95th percentile of the frame levels. Activity is then widened by `hangover`
    frames on both sides (onsets and releases are not cut) and gaps shorter than 3 frames are filled.
    (The live server uses webrtcvad instead.)
    """
    e = frame_energy(samples, fps, sample_rate, n_frames)
    if len(e) == 0:
        return np.zeros(0, bool)
    db = 20 * np.log10(np.maximum(e.astype(np.float64), 1e-10))
    level = float(np.percentile(db, 95))
    active = db > max(floor_db, level + rel_db)
    if hangover > 0 and active.any():
        k = np.ones(2 * hangover + 1)
        active = np.convolve(active.astype(float), k, mode="same") > 0
    # fill short gaps
    idx = np.flatnonzero(active)
    if len(idx) > 1:
        gaps = np.flatnonzero(np.diff(idx) > 1)
        for g in gaps:
            a, b = idx[g], idx[g + 1]
            if b - a - 1 < 3:
                active[a:b] = True
    return active


def energy_level(rms, low_db: float = -60.0, high_db: float = -20.0) -> np.ndarray:
    """RMS -> 0..1 speech level on an absolute dBFS scale (low_db -> 0, high_db -> 1); the same
    mapping offline and live (no clip-level normalisation needed)."""
    db = 20 * np.log10(np.maximum(np.asarray(rms, np.float64), 1e-10))
    return np.clip((db - low_db) / (high_db - low_db), 0.0, 1.0).astype(np.float32)
