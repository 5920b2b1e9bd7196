"""One inference thread for every session: each video tick it asks every live session for its frame
request, runs the audio encoder, the motion encoder (webcam rows) and the generator once each as a
batch across sessions, and hands each session its frame for that tick.

Timing: the round for tick k starts `lead` seconds before tick k is due (the lead is part of the
pipeline latency, see `server`). If a round would end after its tick (rounds got slower, e.g. more
sessions), the next round targets the first tick it can still make: ticks are skipped, never
queued, and the video tracks count the missing frames as drops. Other work that must not run on
the event loop (preparing an uploaded avatar) is `submit`ted and runs between rounds on the same
thread, so inference is never concurrent with itself.

Admission control reads `round_times`: the recent round durations per batch size (90th percentile),
seeded by the warmup's, and `RoundTimes.predict(n)`, the round time n sessions would take (measured when
n has run lately, else extrapolated from the largest measured batch below n; see `RoundTimes`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class FrameJob:
    """What one session needs generated for one tick (built on the scheduler thread)."""

    session: Any
    tick: int
    epoch: int
    avatar: Any
    rest: dict[str, np.ndarray]  # pose, eye, exp latents
    lip: np.ndarray | None = None  # a lip latent given directly (webcam / closed); None -> from `mel`
    mel: np.ndarray | None = None  # (n_mels, mel_window) when the lips come from audio
    gate: float = 0.0
    webcam: np.ndarray | None = None  # (S,S,3) uint8 driving frame to encode this round
    extra: dict = field(default_factory=dict)


class RoundTimes:
    """Round durations per batch size, and a prediction for a batch size not measured lately.

    `add(n, seconds)` records a regular round of n sessions (the scheduler thread); `seed({n: s})` gives
    the warmup's figures, used while no size has been measured lately. A size counts as measured when
    it has `min_samples` rounds within the last `max_age_s` seconds; its figure is the 90th percentile
    of its last `window` rounds (a round that is usually fast but sometimes slow still loses ticks).
    `predict(n)`: the measured figure of n, else t(m) + (n - m) * b from the largest measured size m
    below n, with b the cost of one more row: the slope between two sizes measured under the same
    conditions (two live sizes, else the warmup's two scaled by how much slower m runs now than at
    warmup), kept between a tenth of and the whole of t(m)/m (t(n) = a + b n with a >= 0 cannot grow
    faster than in proportion, so t(m)/m is the cautious bound used when nothing else is known)."""

    def __init__(self, window: int = 100, min_samples: int = 10, max_age_s: float = 30.0, clock=time.monotonic):
        self.window, self.min_samples, self.max_age_s = window, min_samples, max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[int, collections.deque] = {}  # n -> deque of (monotonic, seconds)
        self._seed: dict[int, float] = {}

    def seed(self, times: dict[int, float]) -> None:
        with self._lock:
            self._seed = {int(n): float(t) for n, t in times.items() if n >= 1 and t > 0}

    def add(self, n: int, seconds: float) -> None:
        if n < 1:
            return
        with self._lock:
            d = self._live.get(n)
            if d is None:
                d = self._live[n] = collections.deque(maxlen=self.window)
            d.append((self._clock(), float(seconds)))

    def live(self) -> dict[int, float]:
        """{batch size: 90th-percentile round seconds} of the sizes measured lately."""
        now = self._clock()
        out = {}
        with self._lock:
            items = [(n, list(d)) for n, d in self._live.items()]
        for n, rows in items:
            recent = [t for at, t in rows if now - at <= self.max_age_s]
            if len(recent) >= self.min_samples:
                out[n] = float(np.percentile(recent, 90))
        return out

    def table(self) -> dict[int, float]:
        """Live figures over the warmup's."""
        with self._lock:
            seed = dict(self._seed)
        return {**seed, **self.live()}

    def predict(self, n: int) -> float:
        if n <= 0:
            return 0.0
        live = self.live()
        with self._lock:
            seed = dict(self._seed)
        # what the machine does now outranks the warmup: the warmup's figures only where nothing is live
        known = live if live else seed
        if not known:
            return 0.0
        if n in known:
            return known[n]
        below = [m for m in known if m < n]
        if not below:  # only larger sizes known: in proportion (an upper bound for n below them)
            m = min(known)
            return known[m] * n / m
        m = max(below)
        tm = known[m]
        b = None
        lower = sorted(x for x in known if x < m)
        if lower:  # two sizes measured under the same conditions
            m2 = lower[-1]
            b = (tm - known[m2]) / (m - m2)
        elif len(seed) >= 2:  # the warmup's slope, scaled by how much slower m runs now than at warmup
            s1, s2 = sorted(seed)[-2:]
            scale = tm / seed[m] if seed.get(m, 0) > 0 else 1.0
            b = (seed[s2] - seed[s1]) / (s2 - s1) * scale
        hi = tm / m
        b = hi if b is None else min(hi, max(0.1 * hi, b))
        return tm + (n - m) * b


class Scheduler:
    def __init__(self, pipeline, clock, metrics=None, lead_s: float | None = None, name: str = "marionette-scheduler"):
        self.pipeline = pipeline
        self.clock = clock
        self.metrics = metrics
        self.lead_s = float(lead_s) if lead_s is not None else clock.period
        self._sessions: tuple = ()
        self._sessions_lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._redo: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.est_round = 0.0  # EWMA of a round's duration (s)
        self.rounds = 0
        self.skipped_ticks = 0
        self.late_rounds = 0
        self.last_batch = 0
        self.errors = 0
        self.round_times = RoundTimes()  # per batch size: what admission control predicts from

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def add(self, session) -> None:
        with self._sessions_lock:
            if session not in self._sessions:
                self._sessions = self._sessions + (session,)

    def remove(self, session) -> None:
        with self._sessions_lock:
            self._sessions = tuple(s for s in self._sessions if s is not session)

    @property
    def sessions(self) -> tuple:
        return self._sessions

    def submit(self, fn: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Run fn on the scheduler thread between rounds; returns a concurrent Future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(RuntimeError("the scheduler is stopped"))
            return fut
        self._jobs.put((fut, fn, args, kwargs))
        self._wake.set()
        return fut

    def request_redo(self, session, tick: int) -> None:
        """Remake `session`'s frame for `tick` as soon as the thread is free (an interrupt flushed
        the one made or being made), if it can still be on time."""
        self._redo.append((session, tick))
        self._wake.set()

    def _run_redos(self) -> None:
        while self._redo:
            try:
                s, k = self._redo.popleft()
            except IndexError:
                return
            if self.clock.now() + self.est_round > self.clock.video_time(k) + 0.012 or not s.wants_tick(k):
                continue  # too late for that tick: the next regular round serves it
            t0 = time.perf_counter()
            try:
                self.round(k, only=(s,))
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("redo round for tick %d failed", k)
            if self.metrics is not None:
                self.metrics.stage_latency.observe(time.perf_counter() - t0, stage="redo")

    # ------------------------------------------------------------------------------------ loop
    def _run_jobs(self, until: float | None) -> None:
        """Run queued jobs; stop when the queue is empty or (if given) clock time `until` has passed."""
        while until is None or self.clock.now() < until:
            try:
                fut, fn, args, kwargs = self._jobs.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)

    def _run(self) -> None:
        clock = self.clock
        k = clock.next_video_tick(clock.now() + self.lead_s)
        while not self._stop.is_set():
            # the first tick a round started now can still make: never work on a tick already lost
            now = clock.now()
            if now + self.est_round > clock.video_time(k):
                k2 = clock.video_tick_at(now + self.est_round) + 1
                self.skipped_ticks += k2 - k
                k = k2
            due = clock.video_time(k) - max(self.lead_s, self.est_round * 1.15)
            # idle until the round is due, running redos and submitted jobs meanwhile
            while not self._stop.is_set():
                self._run_redos()
                self._run_jobs(until=due)
                self._wake.clear()
                if clock.now() >= due:
                    break
                if self._jobs.empty() and not self._redo:
                    clock.wait_until(due, self._wake)
            if self._stop.is_set():
                break
            t0 = time.perf_counter()
            try:
                n = self.round(k)
            except Exception:  # noqa: BLE001 - a bad round must not kill the server
                self.errors += 1
                log.exception("scheduler round for tick %d failed", k)
                n = 0
            dt = time.perf_counter() - t0
            if n:
                self.rounds += 1
                self.est_round = dt if self.rounds == 1 else 0.8 * self.est_round + 0.2 * dt
                self.round_times.add(n, dt)
                if clock.now() > clock.video_time(k):
                    self.late_rounds += 1
                if self.metrics is not None:
                    self.metrics.stage_latency.observe(dt, stage="round")
                    self.metrics.batch_size.observe(n)
            k += 1
            self._run_redos()
        # fail whatever is still queued
        while True:
            try:
                fut, *_ = self._jobs.get_nowait()
            except queue.Empty:
                break
            fut.cancel()

    # ----------------------------------------------------------------------------------- round
    def _observe(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        if self.metrics is not None:
            self.metrics.stage_latency.observe(t - t0, stage=stage)
        return t

    def round(self, k: int, only: tuple | None = None) -> int:
        """Generate tick k for every live session (or just `only`). Returns the batch size."""
        jobs: list[FrameJob] = []
        t = time.perf_counter()
        for s in (self._sessions if only is None else only):
            if not s.wants_tick(k):
                continue
            try:
                job = s.build_job(k)
            except Exception:  # noqa: BLE001
                log.exception("session %s: building the frame request failed; closing it", s.id)
                s.fail_from_thread("internal error while building a frame")
                continue
            if job is not None:
                jobs.append(job)
        if only is None:
            self.last_batch = len(jobs)
        if not jobs:
            return 0
        t = self._observe("prepare", t)
        p = self.pipeline
        # webcam rows: E_mot once per new driving frame
        cam = [j for j in jobs if j.webcam is not None]
        if cam:
            lat = p.encode_motion(np.stack([j.webcam for j in cam]))
            for r, j in enumerate(cam):
                j.session.set_webcam_latents({f: v[r] for f, v in lat.items()})
            t = self._observe("motion_encoder", t)
        # lip rows from audio: E_aud once for all speaking sessions
        aud = [j for j in jobs if j.mel is not None and j.gate > 0]
        if aud:
            lips = p.encode_audio(np.stack([j.mel for j in aud]))
            for r, j in enumerate(aud):
                j.lip = lips[r] * np.float32(j.gate)
            t = self._observe("audio_encoder", t)
        lat_cfg = p.cfg.latents
        sl = lat_cfg.slices()
        z = np.zeros((len(jobs), lat_cfg.total), np.float32)
        for r, j in enumerate(jobs):
            if j.lip is not None:
                z[r, sl["lip"]] = j.lip
            for f in ("pose", "eye", "exp"):
                z[r, sl[f]] = j.rest[f]
        frames = p.generate([j.avatar for j in jobs], z)
        t = self._observe("generate", t)
        out = p.to_video_frames(frames)
        t = self._observe("convert", t)
        for j, f in zip(jobs, out):
            j.session.deliver(j.tick, f, j.epoch, z_lip=j.lip)
        return len(jobs)
