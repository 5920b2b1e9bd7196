"""Typed control messages ("the strings") and their validation.

The same JSON objects arrive on the `control` data channel and on `POST /sessions/{id}/controls`:

    {"type": "pose", "yaw": 10, "pitch": -5, "roll": 0}          degrees; missing axes are 0
    {"type": "gaze", "x": 0.3, "y": -0.2}                        -1..1 (+x subject's left, +y up)
    {"type": "blink"}
    {"type": "expression", "preset": "happy", "intensity": 0.8}  or "preset": "happy:0.5+sad:0.3",
    {"type": "expression", "vector": [..exp dims..]}             or a raw latent
    {"type": "source", "factor": "pose", "from": "webcam" | "idle" | "controls"}
    {"type": "interrupt"}  (+ "until_sample": the sender's microphone position in 48 kHz samples, to drop
                            audio it sent before interrupting that is still on its way)
    {"type": "stats"}                                            ask for a stats message now

Any message may carry an "id" (string or number) that the answer echoes. Parsing is strict: an
unknown type, an unknown field, a wrong type, a non-finite number or a value out of range raises
`ControlError` with a message naming what was wrong, and nothing is applied.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from engine.controls import INTENSITY_RANGE, parse_expression
from engine.errors import InputError

MAX_MESSAGE_BYTES = 16 * 1024
MAX_BATCH = 64

# physical ranges accepted (about twice the corpus' pose range, which maps to latents in [-1, 1])
POSE_RANGE = {"yaw": 60.0, "pitch": 40.0, "roll": 30.0}
VECTOR_LIMIT = 5.0  # |raw latent value|
TRANSITION_MS_MAX = 5000.0

FACTOR_ALIASES = {"pose": "pose", "head": "pose", "eye": "eye", "eyes": "eye", "gaze": "eye",
                  "exp": "exp", "expression": "exp", "lip": "lip", "lips": "lip", "mouth": "lip"}
# which sources each factor may take
SOURCES = {
    "pose": ("idle", "controls", "webcam"),
    "eye": ("idle", "controls", "webcam"),
    "exp": ("idle", "controls", "webcam"),  # exp "idle" = the neutral face
    "lip": ("audio", "controls", "webcam"),  # lip "controls" = closed mouth
}


class ControlError(InputError):
    """A malformed or unknown control message; the message says what was wrong."""


@dataclass(frozen=True)
class Pose:
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    transition_ms: float | None = None


@dataclass(frozen=True)
class Gaze:
    x: float = 0.0
    y: float = 0.0
    transition_ms: float | None = None


@dataclass(frozen=True)
class Blink:
    pass


@dataclass(frozen=True)
class Expression:
    preset: str | None = None  # a preset name or a blend spec; None with a vector
    intensity: float = 1.0
    vector: tuple[float, ...] | None = None
    transition_ms: float | None = None


@dataclass(frozen=True)
class Source:
    factor: str  # lip | pose | eye | exp
    source: str  # audio | idle | controls | webcam


@dataclass(frozen=True)
class Interrupt:
    # the client's microphone position (48 kHz samples since its first) when it interrupted: audio it had
    # sent before that and that arrives after the interrupt (in flight, or not yet taken in) is dropped too
    until_sample: int | None = None


@dataclass(frozen=True)
class StatsRequest:
    pass


Control = Union[Pose, Gaze, Blink, Expression, Source, Interrupt, StatsRequest]


@dataclass(frozen=True)
class ControlContext:
    """What validation needs to know about the model: preset names and the expression size."""

    presets: Mapping[str, Sequence[float]]
    exp_dim: int


# ------------------------------------------------------------------------------------- field helpers
def _number(msg: Mapping[str, Any], key: str, default: float | None, lo: float, hi: float) -> float | None:
    if key not in msg:
        return default
    v = msg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ControlError(f"{msg.get('type')}: {key!r} must be a number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ControlError(f"{msg.get('type')}: {key!r} must be finite")
    if not lo <= v <= hi:
        raise ControlError(f"{msg.get('type')}: {key!r}={v:g} is outside {lo:g}..{hi:g}")
    return v


def _string(msg: Mapping[str, Any], key: str) -> str:
    if key not in msg:
        raise ControlError(f"{msg.get('type')}: missing {key!r}")
    v = msg[key]
    if not isinstance(v, str) or not v.strip():
        raise ControlError(f"{msg.get('type')}: {key!r} must be a non-empty string")
    if len(v) > 256:
        raise ControlError(f"{msg.get('type')}: {key!r} is too long")
    return v.strip()


def _check_fields(msg: Mapping[str, Any], allowed: Sequence[str]) -> None:
    extra = sorted(set(msg) - set(allowed) - {"type", "id"})
    if extra:
        raise ControlError(f"{msg['type']}: unknown field(s) {', '.join(map(repr, extra))}; "
                           f"allowed: {', '.join(allowed) or '(none)'}")


def _transition(msg: Mapping[str, Any]) -> float | None:
    return _number(msg, "transition_ms", None, 0.0, TRANSITION_MS_MAX)


# ------------------------------------------------------------------------------------------- parsing
def parse_control(msg: Any, ctx: ControlContext) -> Control:
    """One decoded JSON object -> a typed control (raises ControlError)."""
    if not isinstance(msg, Mapping):
        raise ControlError(f"a control message must be a JSON object, got {type(msg).__name__}")
    t = msg.get("type")
    if not isinstance(t, str):
        raise ControlError("a control message needs a string \"type\" "
                           "(pose, gaze, blink, expression, source, interrupt, stats)")
    if "id" in msg and not (isinstance(msg["id"], (str, int)) and not isinstance(msg["id"], bool)):
        raise ControlError("\"id\" must be a string or an integer")
    if t == "pose":
        _check_fields(msg, ("yaw", "pitch", "roll", "transition_ms"))
        vals = {k: _number(msg, k, 0.0, -lim, lim) for k, lim in POSE_RANGE.items()}
        return Pose(transition_ms=_transition(msg), **vals)
    if t == "gaze":
        _check_fields(msg, ("x", "y", "transition_ms"))
        return Gaze(x=_number(msg, "x", 0.0, -1.0, 1.0), y=_number(msg, "y", 0.0, -1.0, 1.0),
                    transition_ms=_transition(msg))
    if t == "blink":
        _check_fields(msg, ())
        return Blink()
    if t == "expression":
        _check_fields(msg, ("preset", "intensity", "vector", "transition_ms"))
        has_p, has_v = "preset" in msg, "vector" in msg
        if has_p == has_v:
            raise ControlError("expression: give exactly one of \"preset\" (a name or a blend like "
                               "\"happy:0.5+sad:0.3\") or \"vector\" (a raw latent)")
        intensity = _number(msg, "intensity", 1.0, *INTENSITY_RANGE)
        if has_p:
            spec = _string(msg, "preset")
            try:  # the engine's parser: names, blends and intensities exactly as `render --expression`
                parse_expression(spec, ctx.presets)
            except InputError as e:
                raise ControlError(f"expression: {e}") from None
            return Expression(preset=spec, intensity=intensity, transition_ms=_transition(msg))
        vec = msg["vector"]
        if not isinstance(vec, list) or len(vec) != ctx.exp_dim:
            raise ControlError(f"expression: \"vector\" must be a list of {ctx.exp_dim} numbers")
        out = []
        for i, v in enumerate(vec):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ControlError(f"expression: vector[{i}] is not a finite number")
            if abs(v) > VECTOR_LIMIT:
                raise ControlError(f"expression: vector[{i}]={v:g} is outside -{VECTOR_LIMIT:g}..{VECTOR_LIMIT:g}")
            out.append(float(v))
        return Expression(vector=tuple(out), intensity=intensity, transition_ms=_transition(msg))
    if t == "source":
        _check_fields(msg, ("factor", "from"))
        f = _string(msg, "factor").lower()
        if f not in FACTOR_ALIASES:
            raise ControlError(f"source: unknown factor {f!r}; factors: lip, pose, eye, exp")
        factor = FACTOR_ALIASES[f]
        src = _string(msg, "from").lower()
        if src not in SOURCES[factor]:
            raise ControlError(f"source: factor {factor!r} cannot come from {src!r}; "
                               f"choose {', '.join(SOURCES[factor])}")
        return Source(factor=factor, source=src)
    if t == "interrupt":
        _check_fields(msg, ("until_sample",))
        until = _number(msg, "until_sample", None, 0, 2 ** 53)
        return Interrupt(until_sample=None if until is None else int(until))
    if t == "stats":
        _check_fields(msg, ())
        return StatsRequest()
    raise ControlError(f"unknown control type {t!r}; valid: pose, gaze, blink, expression, source, interrupt, stats")


def decode_message(data: str | bytes) -> Any:
    """Raw channel/HTTP payload -> JSON value (ControlError if too big or not JSON)."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_MESSAGE_BYTES:
            raise ControlError(f"message is larger than {MAX_MESSAGE_BYTES} bytes")
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise ControlError("message is not UTF-8 text") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise ControlError(f"message is larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ControlError(f"message is not valid JSON: {e}") from None


def parse_controls(value: Any, ctx: ControlContext) -> list[Control]:
    """One control object or a list of them -> typed controls. All are validated before any is
    returned, so a bad element rejects the whole batch."""
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_BATCH:
        raise ControlError(f"at most {MAX_BATCH} controls per request")
    out = []
    for i, m in enumerate(items):
        try:
            out.append(parse_control(m, ctx))
        except ControlError as e:
            raise ControlError(f"control[{i}]: {e}" if len(items) > 1 else str(e)) from None
    return out


def message_id(msg: Any) -> Any:
    return msg.get("id") if isinstance(msg, Mapping) else None
