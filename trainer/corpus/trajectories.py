"""Per-frame factor trajectories of one clip: mouth from the phonemes, head pose, eyes and expression.

Time base: video frame i is sampled at its centre, t_i = (i + 0.5) / fps seconds, and covers audio
samples [i * 16000 / fps, (i + 1) * 16000 / fps).

* Mouth: espeak phonemes -> visemes (a diphthong is two visemes) -> (jaw_open, width, rounding)
  targets blended with Cohen-Massaro style dominance functions, so neighbouring phonemes
  coarticulate (anticipatory rounding before /u/, the jaw that never fully closes for /t/ between two
  vowels) while lip closures (p b m), labiodentals (f v) and rounding (w, u) keep their shape.
  Pauses close the mouth, with a dominance that grows with their length.
* Head pose: a per-clip base pose, slow smooth sway, speech-driven motion whose amplitude follows the
  speech energy, nods on stressed syllables (the most prominent vowel of a word: loud and long), and
  occasionally a large turn (so the corpus covers the whole range of `factors.FACTOR_GROUPS`).
* Eyes: gaze as fixations joined by fast saccades (looking at the listener most of the time, with the
  eyes counter-rotating a little against the head), Poisson blinks with a natural asymmetric shape
  (fast close, slower open, 150-300 ms), now and then a difference between the two lids or a wink.
* Expression: a preset of `factors.EXPRESSION_PRESETS` at an intensity, changing occasionally with a
  smooth transition (slower than speech), plus brow raises on some emphasised words.

Everything is drawn from the `numpy.random.Generator` passed in: the same generator state gives the
same trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter1d

from trainer.corpus import factors
from trainer.corpus.speech import Phoneme

SAMPLE_RATE = 16000

# --------------------------------------------------------------------------------------- visemes
# viseme -> (jaw_open, width, rounding, dominance). Dominance: how strongly the viseme imposes its
# shape on its neighbours' time (high for lip closures and rounding, low for tongue consonants and h).
VISEMES: dict[str, tuple[float, float, float, float]] = {
    "sil": (0.00, 0.00, 0.00, 1.0),   # dominance of a pause is set from its length
    "PP": (0.00, 0.00, 0.00, 4.0),    # p b m: lips pressed together
    "FF": (0.08, 0.10, 0.00, 3.0),    # f v: lower lip to the upper teeth
    "TH": (0.15, 0.15, 0.00, 1.2),    # th: tongue between the teeth
    "DD": (0.18, 0.15, 0.00, 0.6),    # t d n l: tongue tip, the jaw follows the neighbours
    "kk": (0.24, 0.05, 0.00, 0.5),    # k g ng
    "CH": (0.12, -0.35, 0.55, 2.5),   # sh zh ch j: protruded lips
    "SS": (0.07, 0.40, 0.00, 1.5),    # s z: teeth close together, lips spread
    "RR": (0.16, -0.30, 0.50, 1.2),   # r (English, rounded)
    "WW": (0.08, -0.70, 0.95, 3.0),   # w
    "JJ": (0.14, 0.50, 0.00, 1.0),    # y (palatal glide)
    "HH": (0.30, 0.05, 0.00, 0.2),    # h: takes the shape of the next vowel
    "aa": (0.85, 0.05, 0.00, 1.0),    # father, start
    "ae": (0.70, 0.35, 0.00, 1.0),    # trap
    "ah": (0.62, 0.15, 0.00, 1.0),    # strut
    "ax": (0.35, 0.00, 0.00, 0.5),    # schwa (weak)
    "er": (0.32, -0.15, 0.35, 1.0),   # nurse, letter (r-coloured)
    "eh": (0.52, 0.40, 0.00, 1.0),    # dress
    "ey": (0.45, 0.45, 0.00, 1.0),    # face (start)
    "ih": (0.30, 0.50, 0.00, 1.0),    # kit
    "iy": (0.20, 0.75, 0.00, 1.2),    # fleece
    "oh": (0.68, -0.15, 0.45, 1.0),   # lot
    "ao": (0.55, -0.35, 0.70, 1.5),   # thought, north
    "ow": (0.48, -0.40, 0.70, 1.5),   # goat (start)
    "uh": (0.25, -0.50, 0.75, 2.0),   # foot
    "uw": (0.18, -0.75, 1.00, 3.0),   # goose
}
VISEME_NAMES: tuple[str, ...] = tuple(VISEMES)

# espeak-ng English phoneme mnemonics -> visemes (diphthongs: two visemes, the first holding `split`).
_PHONEME_VISEMES: dict[str, tuple[str, ...]] = {
    "p": ("PP",), "b": ("PP",), "m": ("PP",),
    "f": ("FF",), "v": ("FF",),
    "T": ("TH",), "D": ("TH",),
    "t": ("DD",), "d": ("DD",), "n": ("DD",), "l": ("DD",), "t#": ("DD",), "d#": ("DD",), "n-": ("DD",),
    "l/": ("DD",), "L": ("DD",), "?": ("kk",),
    "k": ("kk",), "g": ("kk",), "N": ("kk",), "x": ("kk",),
    "S": ("CH",), "Z": ("CH",), "tS": ("CH",), "dZ": ("CH",),
    "s": ("SS",), "z": ("SS",),
    "r": ("RR",), "r-": ("RR",), "w": ("WW",), "W": ("WW",), "j": ("JJ",), ";": ("JJ",), "h": ("HH",),
    "a": ("ae",), "aa": ("ae",), "a#": ("ah",), "A:": ("aa",), "A@": ("aa", "er"), "A": ("aa",),
    "V": ("ah",), "VR": ("ah", "er"), "0": ("oh",), "0:": ("oh",), "02": ("oh",),
    "@": ("ax",), "@-": ("ax",), "@2": ("ax",), "@5": ("ax",), "@L": ("ax", "DD"), "3": ("er",), "3:": ("er",),
    "E": ("eh",), "E2": ("eh",), "E@": ("eh", "ax"), "e": ("ey",), "e@": ("eh", "ax"), "eI": ("ey", "ih"),
    "I": ("ih",), "I2": ("ih",), "I#": ("ih",), "i": ("iy",), "i:": ("iy",), "i@": ("iy", "ax"),
    "i@3": ("iy", "er"),
    "O": ("ao",), "O:": ("ao",), "O@": ("ao", "ax"), "o@": ("ao", "ax"), "OI": ("ao", "ih"), "o": ("ow",),
    "oU": ("ow", "uh"), "oU#": ("ow", "uh"), "u": ("uw",), "u:": ("uw",), "U": ("uh",), "U@": ("uh", "ax"),
    "aI": ("aa", "ih"), "aI@": ("aa", "ih"), "aI3": ("aa", "er"), "aU": ("aa", "uh"), "aU@": ("aa", "uh"),
}
_VOWEL_INITIALS = set("aAeEiIoOuUV03@")  # (";" is espeak's glide between an /i/ and the next vowel)


def is_vowel(name: str) -> bool:
    return bool(name) and name[0] in _VOWEL_INITIALS


def phoneme_visemes(name: str) -> tuple[str, ...]:
    """The viseme(s) of an espeak phoneme mnemonic; unknown names fall back to their longest known prefix."""
    if name.startswith("_") or not name:
        return ("sil",)
    for k in range(len(name), 0, -1):
        v = _PHONEME_VISEMES.get(name[:k])
        if v is not None:
            return v
    return ("ax",) if is_vowel(name) else ("DD",)


@dataclass(frozen=True)
class Span:
    name: str
    start_ms: float
    end_ms: float

    def to_list(self) -> list:
        return [self.name, round(self.start_ms, 3), round(self.end_ms, 3)]


def viseme_track(phonemes: list[Phoneme]) -> list[Span]:
    """Phonemes -> viseme spans; a diphthong's first viseme takes 55% of its time."""
    out: list[Span] = []
    for p in phonemes:
        vis = phoneme_visemes(p.name)
        if len(vis) == 1 or p.end_ms - p.start_ms < 40:
            out.append(Span(vis[0], p.start_ms, p.end_ms))
        else:
            mid = p.start_ms + 0.55 * (p.end_ms - p.start_ms)
            out.append(Span(vis[0], p.start_ms, mid))
            out.append(Span(vis[1], mid, p.end_ms))
    return out


def frame_times(n_frames: int, fps: float) -> np.ndarray:
    return (np.arange(n_frames, dtype=np.float64) + 0.5) / fps


def mouth_track(visemes: list[Span], times: np.ndarray, articulation: float = 1.0,
                tau_ahead_ms: float = 30.0, tau_behind_ms: float = 22.0) -> np.ndarray:
    """(T, 3) jaw_open, width, rounding at `times` (s) by dominance-weighted blending of viseme targets.

    Each span i has a dominance D_i(t) = alpha_i * exp(-d / tau), d = the distance (ms) from t to the
    span's core (its middle 80%); tau is longer before the span (anticipation) than after it. A pause
    is a closed-mouth target whose dominance grows with its length, so long silences close the mouth
    fully and a 10 ms pause inside a word hardly moves it.
    """
    if not visemes:
        return np.tile(factors.neutral("mouth"), (len(times), 1))
    t_ms = np.asarray(times, np.float64)[:, None] * 1000.0
    start = np.array([s.start_ms for s in visemes])
    end = np.array([s.end_ms for s in visemes])
    centre, half = (start + end) / 2, np.maximum(end - start, 1.0) * 0.4
    targets = np.array([VISEMES[s.name][:3] for s in visemes], np.float64)
    alpha = np.array([VISEMES[s.name][3] for s in visemes], np.float64)
    is_sil = np.array([s.name == "sil" for s in visemes])
    dur = end - start
    alpha[is_sil] = np.clip((dur[is_sil] - 30.0) / 150.0, 0.02, 1.0) * 6.0
    # a long pause dominates its whole length, not just its middle 80%
    half[is_sil] = np.maximum(dur[is_sil] / 2 - 40.0, half[is_sil])
    before = centre[None] - half[None] - t_ms  # > 0: t is before the span's core
    after = t_ms - centre[None] - half[None]
    d_ahead = np.maximum(before, 0.0)
    d_behind = np.maximum(after, 0.0)
    dom = alpha[None] * np.exp(-d_ahead / tau_ahead_ms - d_behind / tau_behind_ms)
    w = dom / np.maximum(dom.sum(1, keepdims=True), 1e-12)
    out = w @ targets
    out[:, 0] *= articulation
    lo, hi = factors.ranges("mouth")
    return np.clip(out, lo, hi).astype(np.float32)


# ----------------------------------------------------------------------------------- speech cues
def frame_energy(samples: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    """(T,) RMS of the audio samples each frame covers."""
    x = np.asarray(samples, np.float64)
    bounds = np.round(np.arange(n_frames + 1) * SAMPLE_RATE / fps).astype(np.int64)
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    bounds = np.clip(bounds, 0, len(x))
    n = np.maximum(bounds[1:] - bounds[:-1], 1)
    return np.sqrt(np.maximum(c[bounds[1:]] - c[bounds[:-1]], 0.0) / n).astype(np.float32)


@dataclass(frozen=True)
class Stress:
    time_s: float     # onset of the stressed vowel
    strength: float   # 0..1, relative prominence within the clip


def stressed_syllables(phonemes: list[Phoneme], samples: np.ndarray) -> list[Stress]:
    """The most prominent vowel of each word (loudness x sqrt(duration)), kept when it stands out.

    espeak's phoneme events carry no stress marks, but its stressed vowels are longer and louder:
    per word the vowel with the highest RMS * sqrt(duration) is its nucleus; nuclei scoring at least
    0.6 of the clip's 90th percentile count as stressed.
    """
    x = np.asarray(samples, np.float64)
    best: dict[int, tuple[float, float]] = {}
    for p in phonemes:
        if not is_vowel(p.name) or p.word < 0 or p.end_ms - p.start_ms < 40:
            continue
        a, b = int(p.start_ms * SAMPLE_RATE / 1000), int(p.end_ms * SAMPLE_RATE / 1000)
        if b <= a:
            continue
        rms = float(np.sqrt(np.mean(x[a:b] ** 2)))
        score = rms * np.sqrt((p.end_ms - p.start_ms) / 1000.0)
        if p.word not in best or score > best[p.word][1]:
            best[p.word] = (p.start_ms / 1000.0, score)
    if not best:
        return []
    scores = np.array([s for _, s in best.values()])
    ref = float(np.percentile(scores, 90)) or 1.0
    return [Stress(t, float(min(s / ref, 1.0))) for t, s in sorted(best.values()) if s >= 0.6 * ref]


# ------------------------------------------------------------------------------------ generators
def _smooth_noise(rng: np.random.Generator, n: int, sigma_frames: float) -> np.ndarray:
    """Unit-variance Gaussian-smoothed white noise of length n (no edge artefacts: generated with margins)."""
    m = int(np.ceil(4 * sigma_frames)) + 1
    w = rng.standard_normal(n + 2 * m)
    y = gaussian_filter1d(w, sigma_frames, mode="constant")[m:m + n]
    return y * np.sqrt(2.0 * np.sqrt(np.pi) * sigma_frames)  # std of Gaussian-filtered white noise


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _bump(t: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Raised cosine of total `width` seconds centred at `centre`, peak 1."""
    u = (t - centre) / (width / 2)
    return np.where(np.abs(u) < 1.0, 0.5 * (1.0 + np.cos(np.pi * u)), 0.0)


def head_pose(rng: np.random.Generator, times: np.ndarray, energy: np.ndarray, stresses: list[Stress],
              fps: float) -> tuple[np.ndarray, dict]:
    """(T, 6) yaw, pitch, roll (deg), tx, ty (fraction of the image), scale; and the events drawn."""
    n = len(times)
    lo, hi = factors.ranges("pose")
    dur = n / fps
    base = np.array([rng.normal(0, 7.0), rng.normal(0, 4.0), rng.normal(0, 3.0),
                     rng.normal(0, 0.015), rng.normal(0, 0.012), rng.uniform(0.95, 1.05)])
    pose = np.tile(base, (n, 1))
    # slow sway (sigma 0.7 s) and faster, speech-modulated motion (sigma 0.2 s)
    sway_amp = np.array([5.0, 3.0, 2.5, 0.012, 0.008, 0.015]) * rng.uniform(0.5, 1.3)
    for k in range(6):
        pose[:, k] += sway_amp[k] * _smooth_noise(rng, n, 0.7 * fps)
    env = gaussian_filter1d(energy.astype(np.float64), 0.15 * fps, mode="nearest")
    env = env / (float(env.max()) + 1e-9)
    talk_amp = np.array([2.0, 1.5, 1.2, 0.004, 0.004, 0.004]) * rng.uniform(0.5, 1.5)
    for k in range(6):
        pose[:, k] += talk_amp[k] * env * _smooth_noise(rng, n, 0.2 * fps)
    pose[:, 1] -= rng.uniform(0.0, 2.0) * env  # a slight lean down while talking
    # nods on stressed syllables: the head dips and comes back (~0.3-0.45 s), peaking just after the onset
    nods = []
    nod_gain = rng.uniform(0.6, 1.4)
    for s in stresses:
        if rng.random() < 0.7:
            amp = nod_gain * (1.5 + 3.5 * s.strength)
            width = rng.uniform(0.3, 0.45)
            lag = rng.uniform(0.02, 0.08)
            pose[:, 1] -= amp * _bump(times, s.time_s + lag, width)
            if rng.random() < 0.3:
                pose[:, 2] += rng.normal(0, 1.0) * _bump(times, s.time_s + lag, width)
            nods.append({"time": round(s.time_s + lag, 4), "degrees": round(float(amp), 3)})
    # occasionally a large turn (or look up/down, or tilt) to cover the range
    turns = []
    if rng.random() < 0.3:
        k = int(rng.choice([0, 0, 0, 1, 2]))
        big = [rng.uniform(18, 35), rng.uniform(10, 22), rng.uniform(8, 16)][k] * rng.choice([-1.0, 1.0])
        t0 = rng.uniform(0.05, 0.6) * dur
        ramp = rng.uniform(0.35, 0.8)
        hold = rng.uniform(0.4, 2.0)
        w = _smoothstep((times - t0) / ramp) - _smoothstep((times - t0 - ramp - hold) / ramp)
        pose[:, k] = pose[:, k] * (1 - 0.5 * w) + big * w
        turns.append({"column": factors.column_names("pose")[k], "start": round(t0, 4),
                      "degrees": round(float(big), 3), "ramp": round(ramp, 4), "hold": round(hold, 4)})
    return np.clip(pose, lo, hi).astype(np.float32), {"nods": nods, "turns": turns}


def eyes(rng: np.random.Generator, times: np.ndarray, yaw: np.ndarray) -> tuple[np.ndarray, dict]:
    """(T, 4) gaze_x, gaze_y, lid_left, lid_right; and the fixations and blinks drawn."""
    n = len(times)
    dur = 2.0 * float(times[-1]) - float(times[-2]) if n > 1 else 2.0 * float(times[0]) if n else 0.0
    # fixations: mostly at the listener (near 0, eyes counter-rotating against the head), sometimes away
    fix_t, fix_xy, centred = [0.0], [], []
    t = 0.0
    while True:
        c = rng.random() < 0.6
        if c:
            xy = (rng.normal(0, 0.12), rng.normal(0.02, 0.10))
        elif rng.random() < 0.15:
            xy = (rng.uniform(-1, 1), rng.uniform(-1, 1))
        else:
            xy = (rng.uniform(-0.85, 0.85), rng.uniform(-0.6, 0.5))
        fix_xy.append(xy)
        centred.append(c)
        t += float(np.clip(rng.lognormal(np.log(0.8), 0.5), 0.2, 3.0))
        if t >= dur:
            break
        fix_t.append(t)
    gx = np.full(n, fix_xy[0][0])
    gy = np.full(n, fix_xy[0][1])
    comp = np.full(n, 1.0 if centred[0] else 0.0)
    saccades = []
    for i in range(1, len(fix_t)):
        (x0, y0), (x1, y1) = fix_xy[i - 1], fix_xy[i]
        amp = float(np.hypot(x1 - x0, y1 - y0))
        sd = 0.025 + 0.03 * amp  # saccade duration grows with amplitude (~25-90 ms)
        w = _smoothstep((times - fix_t[i]) / sd)
        gx = gx + (x1 - x0) * w
        gy = gy + (y1 - y0) * w
        comp = comp + ((1.0 if centred[i] else 0.0) - (1.0 if centred[i - 1] else 0.0)) * w
        saccades.append({"time": round(fix_t[i], 4), "to": [round(x1, 4), round(y1, 4)]})
    gx = gx - 0.6 * comp * (yaw - np.median(yaw)) / 35.0  # counter-rotation (vestibulo-ocular reflex)
    gx += 0.01 * _smooth_noise(rng, n, 2.0)
    gy += 0.01 * _smooth_noise(rng, n, 2.0)

    # blinks: Poisson with a refractory period; fast close, slower open
    rate = rng.uniform(0.2, 0.45)  # per second (12-27 per minute)
    starts = []
    t = rng.exponential(1.0 / rate) * rng.uniform(0.2, 1.0)
    while t < dur:
        starts.append(t)
        t += 0.35 + rng.exponential(1.0 / rate)
    for s in saccades:  # big gaze shifts often come with a blink
        big = abs(s["to"][0]) + abs(s["to"][1]) > 0.9
        if big and rng.random() < 0.3 and all(abs(s["time"] - b) > 0.4 for b in starts):
            starts.append(s["time"] - 0.02)
    starts.sort()
    closure = np.zeros((n, 2))
    blinks = []
    for s in starts:
        d = rng.uniform(0.15, 0.30)
        peak = 1.0 if rng.random() < 0.8 else rng.uniform(0.7, 0.95)
        peaks, offs, kind = [peak, peak], [0.0, 0.0], "both"
        u = rng.random()
        if u < 0.03:  # wink: one eye, longer
            e = int(rng.integers(2))
            peaks[1 - e] = rng.uniform(0.0, 0.15)
            d = rng.uniform(0.3, 0.5)
            kind = ["wink_left", "wink_right"][e]
        elif u < 0.18:  # asymmetric blink: one lid closes less or a little later
            e = int(rng.integers(2))
            peaks[e] *= rng.uniform(0.55, 0.9)
            offs[e] = rng.uniform(0.0, 0.03)
            kind = "asymmetric"
        dc = d * rng.uniform(0.3, 0.4)
        for e in range(2):
            tau = times - s - offs[e]
            c_close = np.sin(0.5 * np.pi * np.clip(tau / dc, 0, 1)) ** 2
            c_open = np.cos(0.5 * np.pi * np.clip((tau - dc) / (d - dc), 0, 1)) ** 2
            shape = np.where(tau < 0, 0.0, np.where(tau < dc, c_close, np.where(tau < d, c_open, 0.0)))
            closure[:, e] = np.maximum(closure[:, e], peaks[e] * shape)
        blinks.append({"time": round(float(s), 4), "duration": round(float(d), 4), "kind": kind})
    base = rng.uniform(0.0, 0.15) + rng.normal(0, 0.03, size=2)
    base = np.clip(base, 0.0, 0.3)
    droop = 0.3 * np.maximum(-gy, 0.0)  # the lids follow the eyes down
    lids = base[None, :] + droop[:, None]
    lids = lids + (1.0 - lids) * closure
    out = np.stack([gx, gy, lids[:, 0], lids[:, 1]], axis=1)
    lo, hi = factors.ranges("eyes")
    return np.clip(out, lo, hi).astype(np.float32), {"blinks": blinks, "saccades": saccades}


def expression(rng: np.random.Generator, times: np.ndarray, stresses: list[Stress]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(T, 6) expression vector, (T,) preset index, (T,) intensity; and the segments drawn.

    The preset label of a frame is the preset that dominates the blend (weight >= 0.5); its
    intensity is the preset's intensity times its blend weight (0 for neutral, whose vector is 0).
    """
    n = len(times)
    dur = 2.0 * float(times[-1]) - float(times[-2]) if n > 1 else 2.0 * float(times[0]) if n else 0.0
    names = factors.PRESET_NAMES
    probs = np.array([0.3] + [0.7 / (len(names) - 1)] * (len(names) - 1))

    def draw(prev: int | None) -> tuple[int, float]:
        while True:
            k = int(rng.choice(len(names), p=probs))
            if k != prev:
                return k, float(rng.uniform(0.35, 1.0))

    segs = [(0.0, *draw(None), 0.0)]  # (start, preset, intensity, transition seconds)
    t = rng.exponential(5.0)
    while t < dur:
        k, a = draw(segs[-1][1])
        segs.append((t, k, a, float(rng.uniform(0.5, 1.2))))
        t += 1.0 + rng.exponential(5.0)
    vec = np.tile(factors.preset_vector(names[segs[0][1]], segs[0][2]).astype(np.float64), (n, 1))
    label = np.full(n, segs[0][1], np.int64)
    inten = np.full(n, 0.0 if names[segs[0][1]] == "neutral" else segs[0][2])
    for (_, k0, a0, _), (t1, k1, a1, tr) in zip(segs[:-1], segs[1:]):
        w = _smoothstep((times - t1) / tr)[:, None]
        v1 = factors.preset_vector(names[k1], a1).astype(np.float64)
        active = (times >= t1)[:, None]
        vec = np.where(active, vec * (1 - w) + v1 * w, vec)
        w1 = w[:, 0]
        take = times >= t1
        new_label = np.where(w1 >= 0.5, k1, k0)
        a_new = np.where(w1 >= 0.5, (0.0 if names[k1] == "neutral" else a1) * w1,
                         (0.0 if names[k0] == "neutral" else a0) * (1 - w1))
        label = np.where(take, new_label, label)
        inten = np.where(take, a_new, inten)
    # brows go up on some emphasised words
    raises = []
    for s in stresses:
        if s.strength > 0.8 and rng.random() < 0.3:
            amp = rng.uniform(0.15, 0.35)
            vec[:, 0] += amp * _bump(times, s.time_s + 0.05, rng.uniform(0.35, 0.6))
            raises.append({"time": round(s.time_s + 0.05, 4), "amount": round(float(amp), 3)})
    lo, hi = factors.ranges("expression")
    segments = [{"start": round(s[0], 4), "preset": names[s[1]], "intensity": round(s[2], 4),
                 "transition": round(s[3], 4)} for s in segs]
    return (np.clip(vec, lo, hi).astype(np.float32), label, inten.astype(np.float32),
            {"segments": segments, "brow_raises": raises})


@dataclass
class ClipTrajectory:
    factors: dict[str, np.ndarray]  # group -> (T, D) float32, + expression_preset (T,) int, expression_intensity (T,)
    visemes: list[Span]
    events: dict = field(default_factory=dict)


def clip_trajectory(rng: np.random.Generator, phonemes: list[Phoneme], samples: np.ndarray, n_frames: int,
                    fps: float) -> ClipTrajectory:
    """All factor trajectories of a clip whose speech is `samples` (16 kHz) with `phonemes` (clip times)."""
    times = frame_times(n_frames, fps)
    vis = viseme_track(phonemes)
    articulation = float(rng.uniform(0.8, 1.15))
    mouth = mouth_track(vis, times, articulation)
    energy = frame_energy(samples, n_frames, fps)
    stresses = stressed_syllables(phonemes, samples)
    pose, pose_ev = head_pose(rng, times, energy, stresses, fps)
    eye, eye_ev = eyes(rng, times, pose[:, 0])
    expr, preset, inten, expr_ev = expression(rng, times, stresses)
    out = {"pose": pose, "eyes": eye, "mouth": mouth, "expression": expr,
           "expression_preset": preset.astype(np.int64), "expression_intensity": inten}
    events = {"articulation": round(articulation, 4),
              "stressed": [[round(s.time_s, 4), round(s.strength, 4)] for s in stresses],
              **pose_ev, **eye_ev, **expr_ev}
    return ClipTrajectory(out, vis, events)
