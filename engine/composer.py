"""Per-frame latent composition: z_t = [lip, pose, eye, exp], one source per factor, any mix.

A source gives a factor's latents for video frames: `latents(start, n, factor=None) -> (n, dim)` and
`latent(i, factor=None) -> (dim,)`. Single-factor sources ignore `factor`; multi-factor sources
(`VideoSource` with several factors of a driving video, `IdleSource` with pose and eyes) use it to
pick one, so the same object can serve several factors of one `MotionComposer`:

    idle = IdleSource(seed=0, fps=25, energy=frame_energy(samples))
    lips = AudioLipSource(cfg.latents.lip, lip, active)      # E_aud latents, gated by voice activity
    comp = MotionComposer(cfg.latents, {"lip": lips, "pose": idle, "eye": idle,
                                        "exp": PresetSource("happy:0.6", presets)})
    z = comp.compose_batch(0, n_frames)        # (n_frames, cfg.latents.total) float32

Everything is numpy and a pure function of the frame index and what the source was given
(seeded randomness, no wall clock), so an offline render and the live server compose the same z.
A missing factor is canonical (zeros). Live changes (`FixedSource.set`, `PresetSource.set`) take
effect from the frame after the last one composed unless given `at_frame`.
"""

from __future__ import annotations

import bisect
import math
from typing import Mapping

import numpy as np

from engine.audio import energy_level
from engine.config import FACTORS, LatentConfig
from engine.controls import eye_latent, expression_vector, pose_latent


class Source:
    """Base class: subclasses implement `latents(start, n, factor)`."""

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def latent(self, frame_index: int, factor: str | None = None) -> np.ndarray:
        return self.latents(frame_index, 1, factor)[0]


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _frames(start: int, n: int) -> np.ndarray:
    if n < 0:
        raise ValueError(f"negative frame count {n}")
    return np.arange(start, start + n, dtype=np.int64)


class _Rows:
    """An append-only array with amortised O(1) appends (capacity doubles): live sources get a few
    rows per frame for hours, and re-concatenating everything per push would be quadratic."""

    def __init__(self, shape_tail: tuple[int, ...], dtype):
        self._buf = np.zeros((16, *shape_tail), dtype)
        self.n = 0

    def append(self, rows: np.ndarray) -> None:
        k = len(rows)
        if self.n + k > len(self._buf):
            cap = max(2 * len(self._buf), self.n + k)
            new = np.zeros((cap, *self._buf.shape[1:]), self._buf.dtype)
            new[: self.n] = self._buf[: self.n]
            self._buf = new
        self._buf[self.n:self.n + k] = rows
        self.n += k

    @property
    def data(self) -> np.ndarray:
        """A view of the rows so far (invalidated by the next append)."""
        return self._buf[: self.n]

    def __len__(self) -> int:
        return self.n


# ------------------------------------------------------------------------------------ simple sources
class CanonicalSource(Source):
    """All zeros: the canonical face for the factor."""

    def __init__(self, dim: int):
        self.dim = int(dim)

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:
        return np.zeros((n, self.dim), np.float32)


class FixedSource(Source):
    """A constant latent, settable live. A change starts at `at_frame` (default: the frame after the
    last one asked for) and blends from the value then over `transition_frames` with a smoothstep
    (0 = a step)."""

    def __init__(self, values, transition_frames: int = 0):
        v = np.asarray(values, np.float32).reshape(-1)
        self.dim = v.shape[0]
        self.transition_frames = int(transition_frames)
        self._from = v.copy()
        self._to = v.copy()
        self._t0 = 0
        self._last = -1

    @property
    def value(self) -> np.ndarray:
        """The target value (what the source settles on)."""
        return self._to.copy()

    def set(self, values, at_frame: int | None = None, transition_frames: int | None = None) -> None:
        v = np.asarray(values, np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise ValueError(f"expected {self.dim} values, got {v.shape[0]}")
        at = self._last + 1 if at_frame is None else int(at_frame)
        current = self._values_at(np.array([at]))[0]
        self._from, self._to, self._t0 = current, v.copy(), at
        if transition_frames is not None:
            self.transition_frames = int(transition_frames)

    def _values_at(self, idx: np.ndarray) -> np.ndarray:
        if self.transition_frames <= 0:
            w = (idx >= self._t0).astype(np.float32)
        else:
            w = _smoothstep((idx - self._t0) / self.transition_frames).astype(np.float32)
        return self._from[None, :] + w[:, None] * (self._to - self._from)[None, :]

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:
        idx = _frames(start, n)
        if n:
            self._last = max(self._last, int(idx[-1]))
        return self._values_at(idx).astype(np.float32)


class PresetSource(FixedSource):
    """An expression preset or blend ("happy:0.8", "happy:0.5+sad:0.3", or a vector) times `intensity`;
    a live change (`set`) blends smoothly over `transition_s` (default 300 ms)."""

    def __init__(self, expression, presets: Mapping, intensity: float = 1.0, transition_s: float = 0.3,
                 fps: float = 25):
        self.presets = dict(presets)
        self.intensity = float(intensity)
        super().__init__(expression_vector(expression, self.presets) * self.intensity,
                         transition_frames=int(round(transition_s * fps)))
        self.expression = expression

    def set(self, expression, intensity: float | None = None, at_frame: int | None = None,
            transition_frames: int | None = None) -> None:  # type: ignore[override]
        if intensity is not None:
            self.intensity = float(intensity)
        super().set(expression_vector(expression, self.presets) * self.intensity, at_frame, transition_frames)
        self.expression = expression

    def interpolate(self, a, b, t: float, at_frame: int | None = None) -> None:
        """Set the expression (1 - t) * a + t * b (specs or vectors)."""
        from engine.controls import interpolate_presets

        self.set(interpolate_presets(a, b, t, self.presets), at_frame=at_frame)


class AudioLipSource(Source):
    """Lip latents from E_aud, one per video frame, gated to the closed mouth (zeros) where the frame
    is silent. Offline: give all at once; live: `push` them as they are computed. Frames not yet
    given are closed (zeros)."""

    def __init__(self, dim: int, latents=None, active=None):
        self.dim = int(dim)
        self.reset()
        if latents is not None:
            self.push(latents, active)

    def __len__(self) -> int:
        return len(self._lat)

    def push(self, latents, active=None) -> None:
        lat = np.asarray(latents, np.float32).reshape(-1, self.dim)
        act = np.ones(len(lat), bool) if active is None else np.asarray(active, bool).reshape(-1)
        if len(act) != len(lat):
            raise ValueError(f"{len(lat)} lip latents but {len(act)} activity flags")
        self._lat.append(lat)
        self._active.append(act)

    def reset(self) -> None:
        self._lat = _Rows((self.dim,), np.float32)
        self._active = _Rows((), bool)

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:
        idx = _frames(start, n)
        out = np.zeros((n, self.dim), np.float32)
        ok = (idx >= 0) & (idx < len(self._lat))
        if ok.any():
            sel = idx[ok]
            out[ok] = self._lat.data[sel] * self._active.data[sel, None]
        return out


class VideoSource(Source):
    """A driving video's factor latents (from E_mot), for one or several factors.

    `motion`: {factor: (n_frames, dim)} (e.g. the dict `runtime.encode_motion` gives, restricted to the
    factors wanted) or a single (n_frames, dim) array. Past the video's end: "hold" its last frame or
    "loop" it.
    """

    MODES = ("hold", "loop")

    def __init__(self, motion, mode: str = "hold"):
        if mode not in self.MODES:
            raise ValueError(f"driving mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if isinstance(motion, Mapping):
            self._lat = {k: np.asarray(v, np.float32) for k, v in motion.items()}
        else:
            self._lat = {None: np.asarray(motion, np.float32)}
        lengths = {len(v) for v in self._lat.values()}
        if not self._lat or lengths == {0}:
            raise ValueError("a driving video source needs at least one frame")
        if len(lengths) != 1:
            raise ValueError(f"driving latents of different lengths: {lengths}")
        self.n_frames = lengths.pop()

    @property
    def factors(self) -> tuple:
        return tuple(self._lat)

    def _pick(self, factor: str | None) -> np.ndarray:
        if factor in self._lat:
            return self._lat[factor]
        if len(self._lat) == 1 and (factor is None or None in self._lat):
            return next(iter(self._lat.values()))
        raise KeyError(f"this driving video source has no {factor!r} latents (it has {list(self._lat)})")

    def frame_indices(self, start: int, n: int) -> np.ndarray:
        idx = _frames(start, n)
        if self.mode == "loop":
            return np.mod(idx, self.n_frames)
        return np.clip(idx, 0, self.n_frames - 1)

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:
        return self._pick(factor)[self.frame_indices(start, n)]


# ------------------------------------------------------------------------------------- idle motion
class IdleSource(Source):
    """Procedural idle motion for pose and eyes, seeded and a pure function of the frame index.

    * Head sway: per axis a sum of three slow sinusoids (0.05-0.4 Hz, seeded), amplitude
      base * (1 + speech_gain * speech level), the level being the frame RMS mapped to 0..1 on a
      dBFS scale (`audio.energy_level`) and smoothed (~0.4 s). Small nods (pitch dips of ~2-4 deg,
      0.45 s) on energy peaks (a local maximum of the fast-smoothed level that stands out from the
      last 0.5 s, at most one per 0.8 s), detected one frame late so the live path can do the same.
    * Blinks: a renewal process, intervals 1.2 s + exponential(2.3 s) (mean ~3.5 s, most 2-6 s),
      10% double blinks; each ~200 ms (close in 80 ms, open in 120 ms), both lids.
    * Gaze: small saccades every 0.6-3 s to targets around the centre (sd 0.12 x, 0.08 y), 2-frame jumps.
    Latents are in the units of `engine.controls` (pose_latent / eye_latent).

    `energy`: RMS per video frame (offline: the whole clip; live: `push_energy` as audio arrives).
    Frames past the energy given are treated as silence.
    """

    factors = ("pose", "eye")

    # sway amplitudes at rest: yaw, pitch, roll (deg), tx, ty (fraction of the image)
    SWAY_BASE = np.array([1.8, 1.2, 0.8, 0.004, 0.003], np.float64)
    SPEECH_GAIN = 1.6
    NOD_DEG = 2.5
    NOD_S = 0.45
    BLINK_CLOSE_S = 0.08
    BLINK_OPEN_S = 0.12

    def __init__(self, seed: int = 0, fps: float = 25, energy=None, factor: str | None = None):
        self.seed = int(seed)
        self.fps = float(fps)
        self.factor = factor
        rng = np.random.default_rng([self.seed, 1])
        self._sway_f = rng.uniform(0.05, 0.4, size=(5, 3))
        self._sway_phase = rng.uniform(0, 2 * np.pi, size=(5, 3))
        w = rng.uniform(0.5, 1.0, size=(5, 3))
        self._sway_w = w / w.sum(axis=1, keepdims=True)
        self._blink_rng = np.random.default_rng([self.seed, 2])
        self._blinks: list[int] = []  # start frames, increasing
        self._blink_t = float(self._blink_rng.uniform(0.3, 2.5))
        self._gaze_rng = np.random.default_rng([self.seed, 3])
        self._sacc: list[int] = [0]  # saccade start frames
        self._targets: list[tuple[float, float]] = [(0.0, 0.0)]
        self._sacc_t = float(self._gaze_rng.uniform(0.3, 2.0))
        # energy state (incremental)
        self._env = _Rows((), np.float64)  # slow envelope of the speech level (sway amplitude)
        self._fast = _Rows((), np.float64)  # fast envelope (nods)
        self._nod_starts: list[int] = []  # increasing
        self._nod_depths: list[float] = []  # degrees
        self._nod_scan = 1  # next frame p whose peak status is undecided
        if energy is not None:
            self.push_energy(energy)

    # ----- energy
    def push_energy(self, rms) -> None:
        """Append per-frame RMS (the next frames in order)."""
        lv = energy_level(np.asarray(rms, np.float64).reshape(-1))
        if not len(lv):
            return
        a_slow = 1 - math.exp(-1 / (0.4 * self.fps))
        a_fast = 1 - math.exp(-1 / (0.08 * self.fps))
        env = np.empty(len(lv))
        fast = np.empty(len(lv))
        e = self._env.data[-1] if len(self._env) else 0.0
        f = self._fast.data[-1] if len(self._fast) else 0.0
        for i, x in enumerate(lv):
            e += a_slow * (x - e)
            f += a_fast * (x - f)
            env[i], fast[i] = e, f
        self._env.append(env)
        self._fast.append(fast)
        self._scan_nods()

    def _scan_nods(self) -> None:
        fast = self._fast.data
        look = max(1, int(round(0.5 * self.fps)))
        refractory = int(round(0.8 * self.fps))
        p = self._nod_scan
        while p + 1 < len(fast):
            v = fast[p]
            if v > 0.45 and v >= fast[p - 1] and v > fast[p + 1]:
                base = fast[max(0, p - look):p].min()
                last = self._nod_starts[-1] if self._nod_starts else -10 ** 9
                if v - base > 0.12 and (p + 1) - last >= refractory:
                    self._nod_starts.append(p + 1)
                    self._nod_depths.append(self.NOD_DEG * (0.6 + 0.8 * min(1.0, v)))
            p += 1
        self._nod_scan = p

    def _env_at(self, idx: np.ndarray) -> np.ndarray:
        env = self._env.data
        n = len(env)
        out = np.zeros(len(idx))
        inside = (idx >= 0) & (idx < n)
        out[inside] = env[idx[inside]]
        past = idx >= n
        if past.any() and n:
            a = 1 - math.exp(-1 / (0.4 * self.fps))
            out[past] = env[-1] * (1 - a) ** (idx[past] - (n - 1))
        return out

    # ----- event lists (generated lazily, in order, so they do not depend on the query order)
    def _ensure_blinks(self, last_frame: int) -> None:
        while not self._blinks or self._blinks[-1] <= last_frame:
            start = int(round(self._blink_t * self.fps))
            if self._blinks and start <= self._blinks[-1] + int(round(0.25 * self.fps)):
                start = self._blinks[-1] + int(round(0.25 * self.fps)) + 1
            self._blinks.append(start)
            if self._blink_rng.random() < 0.1:  # double blink
                self._blink_t = start / self.fps + 0.35
            else:
                self._blink_t = start / self.fps + 1.2 + float(self._blink_rng.exponential(2.3))

    def _ensure_saccades(self, last_frame: int) -> None:
        while self._sacc[-1] <= last_frame:
            start = max(int(round(self._sacc_t * self.fps)), self._sacc[-1] + 3)
            x = float(np.clip(self._gaze_rng.normal(0, 0.12), -0.35, 0.35))
            y = float(np.clip(self._gaze_rng.normal(0, 0.08), -0.25, 0.25))
            self._sacc.append(start)
            self._targets.append((x, y))
            self._sacc_t = start / self.fps + float(self._gaze_rng.uniform(0.6, 3.0))

    # ----- factor tracks
    def pose_latents(self, start: int, n: int) -> np.ndarray:
        idx = _frames(start, n)
        t = idx / self.fps
        waves = np.sin(2 * np.pi * self._sway_f[None] * t[:, None, None] + self._sway_phase[None])
        sway = (waves * self._sway_w[None]).sum(axis=2)  # (n, 5) in [-1, 1]
        amp = self.SWAY_BASE[None, :] * (1 + self.SPEECH_GAIN * self._env_at(idx))[:, None]
        phys = sway * amp
        nod_len = max(2, int(round(self.NOD_S * self.fps)))
        first = bisect.bisect_right(self._nod_starts, start - nod_len)
        last = bisect.bisect_left(self._nod_starts, start + n)
        for s, depth in zip(self._nod_starts[first:last], self._nod_depths[first:last]):
            k = idx - s
            m = (k >= 0) & (k < nod_len)
            phys[m, 1] -= depth * np.sin(np.pi * k[m] / nod_len)
        return pose_latent(phys[:, 0], phys[:, 1], phys[:, 2], phys[:, 3], phys[:, 4], np.ones(n))

    def eye_latents(self, start: int, n: int) -> np.ndarray:
        idx = _frames(start, n)
        if n == 0:
            return np.zeros((0, 6), np.float32)
        last = int(idx[-1])
        self._ensure_blinks(last)
        self._ensure_saccades(last)
        # blinks: the latest blink starting at or before each frame (only the blinks near the range)
        b = np.asarray(self._blinks[max(0, bisect.bisect_right(self._blinks, int(idx[0])) - 1):])
        j = np.searchsorted(b, idx, side="right") - 1
        dt = np.where(j >= 0, (idx - b[np.maximum(j, 0)]) / self.fps, np.inf)
        close, open_ = self.BLINK_CLOSE_S, self.BLINK_OPEN_S
        lid = np.where(dt < close, dt / close, np.where(dt < close + open_, 1 - (dt - close) / open_, 0.0))
        lid = np.clip(lid, 0.0, 1.0)
        # gaze: smoothstep over 2 frames from the previous target to the current one
        k0 = max(0, bisect.bisect_right(self._sacc, int(idx[0])) - 2)
        s = np.asarray(self._sacc[k0:])
        tg = np.asarray(self._targets[k0:])
        k = np.maximum(np.searchsorted(s, idx, side="right") - 1, 0)
        prev = tg[np.maximum(k - 1, 0)]
        cur = tg[k]
        w = _smoothstep((idx - s[k] + 1) / 2.0)[:, None]
        gaze = prev + w * (cur - prev)
        return eye_latent(gaze[:, 0], gaze[:, 1], lid, lid)

    def latents(self, start: int, n: int, factor: str | None = None) -> np.ndarray:
        factor = factor or self.factor or "pose"
        if factor == "pose":
            return self.pose_latents(start, n)
        if factor == "eye":
            return self.eye_latents(start, n)
        raise KeyError(f"IdleSource gives pose and eye latents, not {factor!r}")

    @property
    def nod_starts(self) -> list[int]:
        """Start frames of the nods found so far."""
        return list(self._nod_starts)

    def blink_starts(self, until_frame: int) -> list[int]:
        """Start frames of the blinks before `until_frame`."""
        self._ensure_blinks(until_frame)
        return [b for b in self._blinks if b < until_frame]


# ---------------------------------------------------------------------------------------- composer
class MotionComposer:
    """z_t = [lip, pose, eye, exp] from one source per factor (missing factors: canonical zeros)."""

    def __init__(self, latent_cfg: LatentConfig, sources: Mapping[str, Source] | None = None):
        self.cfg = latent_cfg
        self._slices = latent_cfg.slices()
        self._dims = {f: getattr(latent_cfg, f) for f in FACTORS}
        self.sources: dict[str, Source] = {f: CanonicalSource(self._dims[f]) for f in FACTORS}
        for f, s in (sources or {}).items():
            self.set_source(f, s)

    def set_source(self, factor: str, source: Source | None) -> None:
        """Switch a factor's source (None: canonical). Takes effect from the next compose call."""
        if factor not in self._dims:
            raise KeyError(f"unknown factor {factor!r}; factors: {', '.join(FACTORS)}")
        if source is None:
            source = CanonicalSource(self._dims[factor])
        if not hasattr(source, "latents"):
            raise TypeError(f"a source needs latents(start, n, factor); got {type(source).__name__}")
        self.sources[factor] = source

    def compose_batch(self, start: int, n: int) -> np.ndarray:
        out = np.empty((n, self.cfg.total), np.float32)
        for f in FACTORS:
            lat = np.asarray(self.sources[f].latents(start, n, f), np.float32)
            if lat.shape != (n, self._dims[f]):
                raise ValueError(f"the {f} source {type(self.sources[f]).__name__} gave shape {lat.shape}, "
                                 f"expected {(n, self._dims[f])}")
            out[:, self._slices[f]] = lat
        return out

    def compose(self, frame_index: int) -> np.ndarray:
        return self.compose_batch(frame_index, 1)[0]

    def split(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """(…, total) -> {factor: (…, dim)} views."""
        return {f: z[..., s] for f, s in self._slices.items()}
