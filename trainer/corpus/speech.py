"""Speech with ground-truth phoneme timing: libespeak-ng through ctypes.

The espeak-ng command line prints phonemes without times; the library gives them: initialised with
synchronous output and phoneme events, its synth callback receives the audio (22050 Hz int16) and
events whose `audio_position` is the phoneme's start in ms. We resample to 16 kHz deterministically
(polyphase 320/441) and turn the events into `Phoneme(name, start_ms, end_ms)` spans.

libespeak-ng keeps synthesis state between calls (pulse phase, pitch flutter, rand()), so speaking
the same text twice in one process gives different samples, and it cannot be re-initialised in
place (espeak_Terminate + espeak_Initialize hangs). Each utterance is therefore spoken by a freshly
initialised library in a forked child of a small single-threaded helper process
(`_espeak_zygote.py`, one per Python process, started on first use, ~3 ms per utterance): the
result depends only on the arguments, never on what was spoken before or in which worker.
"""

from __future__ import annotations

import atexit
import ctypes.util
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np

from engine.errors import InputError, MissingDependency

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
RATE_RANGE = (80, 450)  # words per minute espeak accepts without its sonic speed-up
PITCH_RANGE = (0, 99)
INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu; the library is libespeak-ng1)"

# Voices and variants shipped by espeak-ng 1.51 (Debian's espeak-ng-data); the corpus draws from these.
ENGLISH_VOICES: tuple[str, ...] = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                                   "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS: tuple[str, ...] = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
                             "klatt", "klatt2", "klatt4", "croak", "Alex", "Andy", "annie", "aunty", "boris",
                             "david", "ed", "grandpa", "john", "linda", "max", "michel", "norbert",
                             "quincy", "rob", "steph", "steph2", "travis", "victor", "zac")


def voice_name(base: str, variant: str = "") -> str:
    return f"{base}+{variant}" if variant else base


@dataclass(frozen=True)
class Phoneme:
    """One phoneme: espeak's mnemonic (`h`, `@`, `oU`, `tS`; pauses start with `_`) and its span in ms."""

    name: str
    start_ms: float
    end_ms: float
    word: int = -1  # index into Speech.words; -1 for pauses

    @property
    def is_pause(self) -> bool:
        return self.name.startswith("_")


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: float
    char: int  # offset of the word in the spoken text


@dataclass
class Speech:
    samples: np.ndarray  # (N,) float32 at 16 kHz, mono, in [-1, 1]
    phonemes: list[Phoneme] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    sample_rate: int = SAMPLE_RATE

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


class _Helper:
    """The per-process espeak helper (`_espeak_zygote.py`) and the lock that serialises its use."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.owner = 0  # pid of the process that started `proc` (a forked child must start its own)

    def ensure(self) -> None:
        """Start the helper unless this process already has a live one (call with the lock held)."""
        if self.proc is not None and self.owner != os.getpid():
            self.proc = None  # inherited through fork: the parent's helper, not ours to talk to or close
        if self.proc is None or self.proc.poll() is not None:
            self._start()

    def _read_frame(self) -> tuple[dict, bytes]:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout

        def exactly(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                b = out.read(n - len(buf))
                if not b:
                    raise RuntimeError("the espeak-ng helper process exited unexpectedly")
                buf += b
            return bytes(buf)

        (n,) = struct.unpack(">I", exactly(4))
        header = json.loads(exactly(n))
        return header, exactly(int(header.get("nbytes", 0)))

    def _start(self) -> None:
        if not (ctypes.util.find_library("espeak-ng") or _can_load("libespeak-ng.so.1")):
            raise MissingDependency(f"espeak-ng (libespeak-ng.so.1) is not installed; {INSTALL_HINT}")
        script = Path(__file__).with_name("_espeak_zygote.py")
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self.owner = os.getpid()
        header, _ = self._read_frame()
        log.debug("espeak-ng helper started (pid %d)", self.proc.pid)
        if not header.get("ok"):
            self.close()
            raise MissingDependency(f"espeak-ng is not usable: {header.get('message')}; {INSTALL_HINT}")

    def request(self, req: dict) -> tuple[dict, bytes]:
        with self.lock:
            self.ensure()
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write((json.dumps(req) + "\n").encode("utf-8"))
                return self._read_frame()
            except (BrokenPipeError, RuntimeError):
                self.close()
                raise RuntimeError("the espeak-ng helper process died while synthesising") from None

    def close(self) -> None:
        p, self.proc = self.proc, None
        if p is None or self.owner != os.getpid():
            return
        try:
            if p.stdin:
                p.stdin.close()
            p.wait(timeout=5)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            p.kill()
        finally:
            if p.stdout:
                p.stdout.close()


def _can_load(name: str) -> bool:
    try:
        ctypes.CDLL(name)
        return True
    except OSError:
        return False


_HELPER = _Helper()
atexit.register(_HELPER.close)


def check_available() -> None:
    """Raise MissingDependency (naming the fix) unless libespeak-ng loads and initialises."""
    with _HELPER.lock:
        _HELPER.ensure()


def resample_to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """Deterministic polyphase resampling to 16 kHz (float32 out)."""
    from scipy.signal import resample_poly

    if rate == SAMPLE_RATE:
        return np.asarray(x, np.float32)
    g = gcd(SAMPLE_RATE, rate)
    return resample_poly(np.asarray(x, np.float64), SAMPLE_RATE // g, rate // g).astype(np.float32)


def synthesize(text: str, voice: str = "en-us", rate: int = 170, pitch: int = 50, pitch_range: int = 50,
               word_gap: int = 0) -> Speech:
    """Speak `text` -> 16 kHz mono float32 samples + phoneme and word events (ms from the start).

    `voice`: an espeak-ng voice, optionally with a variant (`en-us`, `en-gb`, `en+f3`, `en-us+m2`);
    `rate`: words per minute (80..450); `pitch`, `pitch_range`: 0..99; `word_gap`: extra pause
    between words in units of 10 ms. A phoneme ends where the next one starts; the last one ends
    at the end of the audio. The same arguments always give the same samples.
    """
    if not text or not text.strip():
        raise InputError("nothing to speak: the text is empty")
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise InputError(f"speech rate {rate} is outside {RATE_RANGE[0]}..{RATE_RANGE[1]} words per minute")
    for what, v in (("pitch", pitch), ("pitch range", pitch_range)):
        if not PITCH_RANGE[0] <= v <= PITCH_RANGE[1]:
            raise InputError(f"{what} {v} is outside {PITCH_RANGE[0]}..{PITCH_RANGE[1]}")
    if word_gap < 0:
        raise InputError(f"word gap {word_gap} must be >= 0")
    header, pcm = _HELPER.request({"text": text, "voice": voice, "rate": int(rate), "pitch": int(pitch),
                                   "range": int(pitch_range), "wordgap": int(word_gap)})
    if not header.get("ok"):
        kind, msg = header.get("kind"), header.get("message", "")
        if kind == "voice":
            raise InputError(f"{msg} (try en-us, en, en+f3, en-us+m2)")
        if kind == "missing":
            raise MissingDependency(f"{msg}; {INSTALL_HINT}")
        raise RuntimeError(f"espeak-ng failed: {msg}")
    x = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
    samples = resample_to_16k(x, int(header["rate"]))
    np.clip(samples, -1.0, 1.0, out=samples)
    return Speech(samples=samples, **_spans(header["events"], text, 1000.0 * len(samples) / SAMPLE_RATE))


def _spans(events: list, text: str, total_ms: float) -> dict:
    """Events -> phoneme spans (end = next start) and words (text from the character offsets)."""
    word_starts: list[tuple[float, int]] = []
    starts: list[tuple[str, float, int]] = []
    for kind, pos, text_pos, value in events:
        if kind == "w":
            word_starts.append((float(pos), int(text_pos) - 1))  # text_position is 1-based
        elif kind == "p" and value:
            starts.append((value, float(pos), -1 if value.startswith("_") else max(len(word_starts) - 1, 0)))
    words = []
    for start, char in word_starts:
        i = max(char, 0)
        j = i
        while j < len(text) and not text[j].isspace():
            j += 1
        words.append(Word(text[i:j].strip(".,;:!?\"'"), start, i))
    phonemes = []
    for i, (name, start, w) in enumerate(starts):
        end = starts[i + 1][1] if i + 1 < len(starts) else total_ms
        start = min(start, total_ms)
        phonemes.append(Phoneme(name, start, min(max(end, start), total_ms), w if words else -1))
    return {"phonemes": phonemes, "words": words}
