"""A tiny single-threaded server that synthesises each request with libespeak-ng in a fresh fork.

Why a fork per utterance: libespeak-ng keeps synthesis state between calls (the glottal pulse phase,
the pitch-flutter index, the sample counter, the libc rand() state used for breath noise), so the
same text spoken twice in one process gives different samples and even slightly different
lengths, and re-initialising the library after espeak_Terminate hangs. A freshly initialised
library (3 ms) in a forked child is bit-for-bit reproducible and independent of what was spoken
before, which is what the corpus needs (`--workers` must not change the wav bytes).

Run as `python -I -S _espeak_zygote.py` (no site, no numpy: it stays small and single-threaded,
so fork is safe). Protocol on stdin/stdout, one request at a time:
  request:  one JSON line {"text", "voice", "rate", "pitch", "range", "wordgap"}
  response: 4-byte big-endian header length, the JSON header, then header["nbytes"] bytes of
            native-endian int16 PCM at header["rate"] Hz. header["ok"] false carries "kind"
            (missing, voice, synth, crash) and "message".
The first response, sent unprompted at start-up, is the readiness check (ok, rate, no audio).
This file imports nothing from the project: it is executed as a script.
"""

import ctypes
import ctypes.util
import json
import os
import struct
import sys

AUDIO_OUTPUT_SYNCHRONOUS = 2
INIT_PHONEME_EVENTS = 0x0001
INIT_DONT_EXIT = 0x8000
POS_CHARACTER = 1
CHARS_UTF8 = 1
EVENT_LIST_TERMINATED = 0
EVENT_WORD = 1
EVENT_SENTENCE = 2
EVENT_PHONEME = 7
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4
PARAM_PUNCTUATION, PARAM_CAPITALS, PARAM_WORDGAP, PARAM_INTONATION = 5, 6, 7, 9


class EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class Event(ctypes.Structure):  # espeak_EVENT, speak_lib.h
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", EventId),
    ]


CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(Event))


class Failure(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


def load():
    names = [ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1", "libespeak-ng.so"]
    err = None
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            err = e
    else:
        raise Failure("missing", "libespeak-ng.so.1 could not be loaded (%s)" % err)
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [CALLBACK]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    return lib


def initialise(lib):
    rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, None, INIT_PHONEME_EVENTS | INIT_DONT_EXIT)
    if rate <= 0:
        raise Failure("missing", "libespeak-ng failed to initialise (are its data files, espeak-ng-data, installed?)")
    return rate


def synth(lib, req):
    """In the forked child: initialise, speak, return (header, pcm bytes)."""
    rate = initialise(lib)
    ctypes.CDLL(None).srand(0)  # breath/aspiration noise uses libc rand()
    chunks, events = [], []

    def callback(wav, n, ev):
        if n > 0 and wav:
            chunks.append(ctypes.string_at(wav, 2 * n))
        i = 0
        while ev[i].type != EVENT_LIST_TERMINATED:
            e = ev[i]
            if e.type == EVENT_PHONEME:
                events.append(["p", e.audio_position, e.text_position, e.id.string.decode("utf-8", "replace")])
            elif e.type in (EVENT_WORD, EVENT_SENTENCE):
                events.append(["w" if e.type == EVENT_WORD else "s", e.audio_position, e.text_position, e.id.number])
            i += 1
        return 0

    cb = CALLBACK(callback)
    lib.espeak_SetSynthCallback(cb)
    if lib.espeak_SetVoiceByName(req["voice"].encode("utf-8")) != 0:
        raise Failure("voice", "espeak-ng has no voice %r" % req["voice"])
    for param, value in ((PARAM_RATE, req["rate"]), (PARAM_PITCH, req["pitch"]), (PARAM_RANGE, req["range"]),
                         (PARAM_VOLUME, 100), (PARAM_PUNCTUATION, 0), (PARAM_CAPITALS, 0),
                         (PARAM_WORDGAP, req["wordgap"]), (PARAM_INTONATION, 0)):
        lib.espeak_SetParameter(param, int(value), 0)
    data = req["text"].encode("utf-8") + b"\0"
    buf = ctypes.create_string_buffer(data, len(data))
    err = lib.espeak_Synth(buf, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
    if err != 0:
        raise Failure("synth", "espeak_Synth failed with status %d" % err)
    lib.espeak_Synchronize()
    pcm = b"".join(chunks)
    return {"ok": True, "rate": rate, "events": events, "nbytes": len(pcm)}, pcm


def frame(header, payload=b""):
    h = json.dumps(header).encode("utf-8")
    return struct.pack(">I", len(h)) + h + payload


def write_all(fd, data):
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_all(fd):
    parts = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(parts)
        parts.append(b)


def main():
    out = sys.stdout.buffer
    try:
        lib = load()
        # Readiness: initialise once in a throwaway child so the parent never holds espeak state.
        pid = os.fork()
        if pid == 0:
            try:
                initialise(lib)
                os._exit(0)
            except BaseException:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise Failure("missing", "libespeak-ng failed to initialise (are its data files, espeak-ng-data, installed?)")
        out.write(frame({"ok": True, "rate": 0, "nbytes": 0}))
    except Failure as e:
        out.write(frame({"ok": False, "kind": e.kind, "message": str(e), "nbytes": 0}))
        out.flush()
        return 1
    out.flush()
    for line in sys.stdin.buffer:
        if not line.strip():
            continue
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                header, pcm = synth(lib, req)
                write_all(w, frame(header, pcm))
                code = 0
            except Failure as e:
                write_all(w, frame({"ok": False, "kind": e.kind, "message": str(e), "nbytes": 0}))
                code = 0
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                write_all(w, frame({"ok": False, "kind": "crash", "message": repr(e), "nbytes": 0}))
                code = 1
            os.close(w)
            os._exit(code)
        os.close(w)
        payload = read_all(r)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, 1)) or not payload:
            payload = frame({"ok": False, "kind": "crash", "nbytes": 0,
                             "message": "espeak-ng child exited with status %d" % status})
        out.write(payload)
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
