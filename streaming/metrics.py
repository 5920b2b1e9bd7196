"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges and
histograms with labels, safe to update from the scheduler thread and the event loop."""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                   0.3, 0.5, 1.0)
OFFSET_BUCKETS = (-0.04, -0.02, -0.01, -0.005, -0.002, 0.0, 0.002, 0.005, 0.01, 0.02, 0.04)


def _fmt(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._v: dict[tuple, float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            self._v[k] = self._v.get(k, 0.0) + amount

    def value(self, **labels) -> float:
        return self._v.get(self._key(labels), 0.0)

    def total(self) -> float:
        return sum(self._v.values())

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._v.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help, labelnames=(), fn: Callable[[], float] | None = None):
        super().__init__(name, help, labelnames)
        self._v: dict[tuple, float] = {} if labelnames else {(): 0.0}
        self._fn = fn

    def set(self, value: float, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            self._v[k] = float(value)

    def value(self, **labels) -> float:
        if self._fn is not None and not self.labelnames:
            return float(self._fn())
        return self._v.get(self._key(labels), 0.0)

    def remove(self, **labels) -> None:
        with self._lock:
            self._v.pop(self._key(labels), None)

    def render(self) -> list[str]:
        if self._fn is not None:
            return self.header() + [f"{self.name} {_fmt(float(self._fn()))}"]
        with self._lock:
            items = sorted(self._v.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_fmt(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labelnames=(), buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._v: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, value: float, **labels) -> None:
        k = self._key(labels)
        with self._lock:
            row = self._v.get(k)
            if row is None:
                row = self._v[k] = [0] * len(self.buckets) + [0.0, 0]
            for i, b in enumerate(self.buckets):
                if value <= b:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def count(self, **labels) -> int:
        row = self._v.get(self._key(labels))
        return row[-1] if row else 0

    def mean(self, **labels) -> float:
        row = self._v.get(self._key(labels))
        return row[-2] / row[-1] if row and row[-1] else float("nan")

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(r)) for k, r in self._v.items())
        out = self.header()
        for k, row in items:
            for i, b in enumerate(self.buckets):
                le = 'le="%s"' % _fmt(b)
                out.append(f"{self.name}_bucket{_labels(self.labelnames, k, le)} {row[i]}")
            le = 'le="+Inf"'
            out.append(f"{self.name}_bucket{_labels(self.labelnames, k, le)} {row[-1]}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, k)} {_fmt(row[-2])}")
            out.append(f"{self.name}_count{_labels(self.labelnames, k)} {row[-1]}")
        return out


class Registry:
    def __init__(self):
        self._metrics: list[_Metric] = []

    def add(self, m):
        self._metrics.append(m)
        return m

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.render()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Every metric the server exposes at GET /metrics."""

    def __init__(self, sessions_fn: Callable[[], float] = lambda: 0):
        r = self.registry = Registry()
        self.sessions = r.add(Gauge("marionette_sessions", "Sessions currently open", fn=sessions_fn))
        self.sessions_total = r.add(Counter("marionette_sessions_total", "Sessions opened since start"))
        self.sessions_rejected = r.add(Counter("marionette_sessions_rejected_total",
                                               "Offers refused", ["reason"]))
        self.frames_sent = r.add(Counter("marionette_frames_sent_total", "Video frames handed to the encoder"))
        self.frames_dropped = r.add(Counter("marionette_frames_dropped_total",
                                            "Video ticks whose own frame was not sent", ["reason"]))
        self.frames_repeated = r.add(Counter("marionette_frames_repeated_total",
                                             "Dropped video ticks that carried an earlier picture again"))
        self.frames_mouth_only = r.add(Counter("marionette_frames_mouth_only_total",
                                               "Video frames sent whose body a frame before them showed already "
                                               "(lanes: their own mouth on the newest body)"))
        self.audio_frames_sent = r.add(Counter("marionette_audio_frames_sent_total", "Outbound 20 ms audio frames"))
        self.audio_underruns = r.add(Counter("marionette_audio_underrun_samples_total",
                                             "Outbound audio samples due before they arrived (sent as silence)"))
        self.stage_latency = r.add(Histogram("marionette_stage_latency_seconds",
                                             "Per-stage latency of the inference pipeline", ["stage"]))
        self.batch_size = r.add(Histogram("marionette_batch_size", "Sessions per scheduler round",
                                          buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32)))
        self.av_offset = r.add(Histogram("marionette_av_offset_seconds",
                                         "Send time of a video frame minus send time of the audio it shows",
                                         buckets=OFFSET_BUCKETS))
        self.av_offset_last = r.add(Gauge("marionette_av_offset_last_seconds", "Latest A/V offset", ["session"]))
        self.pipeline_latency = r.add(Gauge("marionette_pipeline_latency_seconds",
                                            "Delay from an audio sample arriving to the frame and audio "
                                            "showing it leaving"))
        self.controls = r.add(Counter("marionette_controls_total", "Control messages", ["type", "result"]))
        self.http_requests = r.add(Counter("marionette_http_requests_total", "HTTP requests", ["route", "status"]))
        self.avatars = r.add(Gauge("marionette_avatars", "Avatars prepared and cached"))

    def render(self) -> str:
        return self.registry.render()


# ====================================================================================== reading it back
def parse_histogram(text: str, name: str, label: str = "stage") -> dict[str, dict]:
    """One histogram out of a /metrics text: {value of `label`: {"le": (bounds..., inf), "counts": (cumulative...),
    "sum": s, "count": n}} (a scraper's view, for `histogram_delta` between two scrapes)."""
    import re

    pat = re.compile(r'^%s_(bucket|sum|count)\{([^}]*)\} (\S+)$' % re.escape(name))
    rows: dict[str, dict] = {}
    for line in text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        kind, labels, value = m.groups()
        lab = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
        row = rows.setdefault(lab.get(label, ""), {"buckets": {}, "sum": 0.0, "count": 0})
        if kind == "bucket":
            row["buckets"][float(lab["le"].replace("+Inf", "inf"))] = float(value)
        elif kind == "sum":
            row["sum"] = float(value)
        else:
            row["count"] = int(float(value))
    out = {}
    for k, row in rows.items():
        le = tuple(sorted(row["buckets"]))
        out[k] = {"le": le, "counts": tuple(row["buckets"][b] for b in le), "sum": row["sum"], "count": row["count"]}
    return out


def histogram_quantile(q: float, le: Sequence[float], counts: Sequence[float]) -> float:
    """The q-quantile of a histogram's cumulative bucket `counts` at upper bounds `le`, linear within the bucket it
    falls in (Prometheus' histogram_quantile: the lowest bucket from 0; in the +Inf bucket, the last finite bound).
    NaN without observations. As coarse as the buckets: a 50-75 ms bucket can place a value 12 ms off."""
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(le, counts):
        if c >= rank:
            if math.isinf(b):
                return prev_b
            return prev_b + (b - prev_b) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_b, prev_c = b, c
    return prev_b


def histogram_delta(before: dict[str, dict], after: dict[str, dict], qs: Sequence[float] = (0.5, 0.95),
                    scale: float = 1000.0) -> dict[str, dict]:
    """What each labelled histogram observed between two `parse_histogram` scrapes: {label: {"n", "mean" (exact:
    from the sums), "p50", "p95" (from the buckets)}}, values times `scale` (1000: seconds -> ms)."""
    out = {}
    for k, a in after.items():
        b = before.get(k)
        counts = [x - (b["counts"][i] if b and b["le"] == a["le"] else 0.0) for i, x in enumerate(a["counts"])]
        n = a["count"] - (b["count"] if b else 0)
        if n <= 0:
            continue
        s = a["sum"] - (b["sum"] if b else 0.0)
        out[k] = {"n": n, "mean": scale * s / n,
                  **{f"p{round(100 * q)}": scale * histogram_quantile(q, a["le"], counts) for q in qs}}
    return out
