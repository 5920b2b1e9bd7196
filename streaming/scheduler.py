"""One inference thread for every session: each video tick it asks every live session for its frame
request, runs the audio encoder, the motion encoder (webcam rows) and the generator once each as a
batch across sessions, and hands each session its frame for that tick.

Timing: the round for tick k starts `lead` seconds before tick k is due (the lead is part of the
pipeline latency, see `server`). If a round would end after its tick (rounds got slower, e.g. more
sessions), the next round targets the first tick it can still make: ticks are skipped, never
queued, and the video tracks count the missing frames as drops. Other work that must not run on
the event loop (preparing an uploaded avatar) is `submit`ted and runs between rounds on the same
thread, so inference is never concurrent with itself.

Two phases (`body_lead_s` set and a runtime that has them, `Pipeline.late_mouth`): only the mouth net
reads the newest audio, so a round is split. The *body* of tick k (G, the eyes, the mouth square cut,
from the pose / eye / expression latents and the previous frame's lip: 44-57 dB from the frame made with
the current lip) runs `body_lead` before the mouth is due; the *mouth* (the session's audio window, E_aud,
the mouth net and its paste, the colour conversion: ~3 ms of the ~27 on 2 CPU cores) runs `lead` before
tick k is due. The pipeline latency then holds only the mouth's lead, not the whole round's. Redos are
whole rounds.

Lanes (`lanes` > 1, two phases only): on a CPU too slow for one frame a period, the bodies of `lanes` ticks are
in flight at once, each on a lane thread with single-threaded inference (the server reopens the runtime with one
thread, `Pipeline.reopen`): served on the slowest 2-core machine, 8.8-9.0 pictures/s with one lane, 14.0-14.6
with two (`benchmarks/lanes.py`). The scheduler thread still walks the ticks: it builds each tick's
requests and hands the body to a lane `body_lead` before its mouth is due, and runs each mouth phase itself, in
order, when it is due; everything that touches a session stays on the scheduler thread. A tick's body reads a
lip a few frames old (the mouth still reads the newest audio). No redos in lanes: a flushed tick is served by
the next regular one.

Mouth-only ticks (lanes): a tick that no body can be made for in time is not skipped while a body of the same
sessions exists: its mouth phase runs on the newest body there is (its pose, eyes and expression; the newest
audio's lip, E_aud and the mouth net as for any tick), so the mouth, which is what a listener watches, moves on
every tick and a speech onset is shown on the first tick that reads it, whatever the bodies' rate. A body not done
when its tick's mouth is due is not waited for (the wait made that tick and the ones after it late): that tick is
mouth-only too, and the body, once done, is the newest for the ticks after it. The head and eyes move at the rate
bodies are done (`bodies_shown`); `mouth_only_ticks` counts the pictures that showed a body already shown, and a
session's stats say how many it sent.

Admission control reads `round_times`: the recent round durations per batch size (90th percentile),
seeded by the warmup's, and `RoundTimes.predict(n)`, the round time n sessions would take (measured when
n has run lately, else extrapolated from the largest measured batch below n; see `RoundTimes`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


LANE_NICE = 5  # lane threads run this much nicer than the rest: the mouth phase, audio and encoding go first


def lower_priority(nice: int) -> None:
    """This thread's scheduling priority, `nice` steps lower (Linux: per thread; elsewhere nothing)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
    except (AttributeError, OSError):  # not Linux, or not allowed: the lanes run at the process' priority
        pass


@dataclass
class BodyRecord:
    """Lanes: a tick's body and what it was made for (the sessions, avatars, epochs and pose / eye / expression
    rows); `body` None while `fut` (its lane's future) runs."""

    tick: int
    sessions: tuple
    avatars: tuple
    epochs: tuple
    rests: list
    body: Any = None
    fut: concurrent.futures.Future | None = None

    @classmethod
    def of(cls, k: int, jobs: list, body=None, fut=None) -> "BodyRecord":
        return cls(k, tuple(j.session for j in jobs), tuple(j.avatar for j in jobs), tuple(j.epoch for j in jobs),
                   [j.rest for j in jobs], body, fut)

    def serves(self, jobs: list) -> bool:
        """Whether this body can make these jobs' pictures: the same sessions, avatars and epochs (after an
        interrupt a body's jaw still reads the speech it flushed)."""
        return (self.sessions == tuple(j.session for j in jobs) and self.epochs == tuple(j.epoch for j in jobs)
                and all(a is j.avatar for a, j in zip(self.avatars, jobs)))


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
        self.body_lead_s: float | None = None  # two phases: how long before the mouth phase the body starts
        self.est_body = 0.0  # EWMAs of the two phases (s)
        self.est_mouth = 0.0
        self.lanes = 1  # bodies in flight at once (two phases only; see the module docstring)
        self.mouth_only_ticks = 0  # lanes: ticks made from a body an earlier tick showed, and their own mouth
        self.bodies_shown = 0  # lanes: pictures that showed a body for the first time (their own or a late one)
        self._shown_body = -1  # lanes: the tick of the body the last picture showed
        self._last_body: BodyRecord | None = None  # lanes: the newest body done
        self._late_bodies: list[BodyRecord] = []  # lanes: bodies not done when their mouth was due (still running)

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
        if self.lanes > 1:  # lanes: the next regular tick serves a flushed one (a redo would race the lanes)
            self._redo.clear()
            return
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

    @property
    def phased(self) -> bool:
        """Whether rounds run in two phases (body ahead of the audio, the mouth last)."""
        return self.body_lead_s is not None and bool(getattr(self.pipeline, "late_mouth", False))

    def _body_lead(self) -> float:
        return max(self.body_lead_s or 0.0, self.est_body * 1.15)

    @property
    def start_lead_s(self) -> float:
        """How long before a tick is due the first work for it starts (a new session's first tick is later)."""
        return self.lead_s + (self._body_lead() if self.phased else 0.0)

    # ------------------------------------------------------------------------------------ loop
    def _wait_until(self, due: float) -> None:
        """Idle until clock time `due`, running redos and submitted jobs meanwhile."""
        clock = self.clock
        while not self._stop.is_set():
            self._run_redos()
            self._run_jobs(until=due)
            self._wake.clear()
            if clock.now() >= due:
                break
            if self._jobs.empty() and not self._redo:
                clock.wait_until(due, self._wake)

    def _sleep_until(self, due: float) -> None:
        """Idle until clock time `due`, running nothing (between a body and its mouth)."""
        while not self._stop.is_set() and self.clock.now() < due:
            self._wake.clear()
            self.clock.wait_until(due, self._wake)

    def _account(self, k: int, n: int, dt: float) -> None:
        if not n:
            return
        self.rounds += 1
        self.est_round = dt if self.rounds == 1 else 0.8 * self.est_round + 0.2 * dt
        self.round_times.add(n, dt)
        if self.clock.now() > self.clock.video_time(k):
            self.late_rounds += 1
        if self.metrics is not None:
            self.metrics.stage_latency.observe(dt, stage="round")
            self.metrics.batch_size.observe(n)

    def _run_phased(self) -> None:
        if self.lanes > 1:
            self._run_lanes()
            return
        clock = self.clock
        k = clock.next_video_tick(clock.now() + self.start_lead_s)
        while not self._stop.is_set():
            now = clock.now()
            if now + self.est_body + self.est_mouth > clock.video_time(k):  # lost: the first tick still on time
                k2 = clock.video_tick_at(now + self.est_body + self.est_mouth) + 1
                self.skipped_ticks += k2 - k
                k = k2
            mouth_lead = max(self.lead_s, self.est_mouth * 1.15)
            self._wait_until(clock.video_time(k) - mouth_lead - self._body_lead())
            if self._stop.is_set():
                break
            t0 = time.perf_counter()
            try:
                jobs, body = self.body_round(k)
            except Exception:  # noqa: BLE001 - a bad round must not kill the server
                self.errors += 1
                log.exception("scheduler body round for tick %d failed", k)
                jobs, body = [], None
            t_body = time.perf_counter() - t0
            n = 0
            t_mouth = 0.0
            if jobs:
                self._sleep_until(clock.video_time(k) - mouth_lead)
                t1 = time.perf_counter()
                try:
                    n = self.mouth_round(jobs, body)
                except Exception:  # noqa: BLE001
                    self.errors += 1
                    log.exception("scheduler mouth round for tick %d failed", k)
                t_mouth = time.perf_counter() - t1
            self._phase_times(n, t_body, t_mouth)
            self._account(k, n, t_body + t_mouth)
            k += 1
            self._run_redos()
        self._cancel_jobs()

    def _run_lanes(self) -> None:
        """Two phases with the bodies of `lanes` ticks in flight: this thread walks the ticks, builds each
        tick's requests and hands its body to a pool of `lanes` lane threads `body_lead` before its mouth is
        due, then runs the mouth phase of each tick in order (the audio, E_aud, the mouth net, the delivery)
        when it is due. Everything that touches a session stays on this thread; only the bodies run beside it."""
        clock = self.clock
        pool = concurrent.futures.ThreadPoolExecutor(self.lanes, thread_name_prefix="marionette-lane",
                                                     initializer=lower_priority, initargs=(LANE_NICE,))
        pending: collections.OrderedDict[int, tuple] = collections.OrderedDict()  # tick -> (jobs, body future, t0)
        try:
            k = clock.next_video_tick(clock.now() + self.start_lead_s)  # the next tick whose body starts
            while not self._stop.is_set():
                mouth_lead = max(self.lead_s, self.est_mouth * 1.15)
                t_body = clock.video_time(k) - mouth_lead - self._body_lead()
                first = next(iter(pending), None)
                t_mouth = clock.video_time(first) - mouth_lead if first is not None else float("inf")
                busy = [f for _, f, _ in pending.values() if f is not None and not f.done()]
                busy += [b.fut for b in self._late_bodies if not b.fut.done()]  # a late body still holds its lane
                if len(busy) >= self.lanes:  # no free lane: the next thing is the first mouth, a lane freed, or
                    # tick k lost (no lane can make its body in time): it is made mouth-only now, not skipped
                    # when a lane frees, by which time its mouth would be late too
                    t_lost = clock.video_time(k) - self.est_body - self.est_mouth
                    if clock.now() >= t_lost:
                        self.skipped_ticks += 1 - self._queue_mouth_only(k, k + 1, pending)
                        k += 1
                        continue
                    concurrent.futures.wait(busy, timeout=max(0.0, min(t_mouth, t_lost) - clock.now()),
                                            return_when=concurrent.futures.FIRST_COMPLETED)
                    if clock.now() >= t_mouth and first is not None:
                        self._lane_mouth(first, *pending.pop(first))
                    continue
                self._wait_until(min(t_body, t_mouth))
                if self._stop.is_set():
                    break
                if first is not None and t_mouth <= t_body:
                    self._lane_mouth(first, *pending.pop(first))
                    continue
                now = clock.now()
                if now + self.est_body + self.est_mouth > clock.video_time(k):  # lost: the first tick still on time
                    k2 = clock.video_tick_at(now + self.est_body + self.est_mouth) + 1
                    filled = self._queue_mouth_only(k, k2, pending)
                    self.skipped_ticks += k2 - k - filled
                    k = k2
                    continue
                t0 = time.perf_counter()
                try:
                    jobs = self._jobs_for(k, None, phased=True)
                    if jobs:
                        self._webcams(jobs, self._observe("prepare", t0))
                        pending[k] = (jobs, pool.submit(self._timed_body, [j.avatar for j in jobs], self._z(jobs)),
                                      t0)
                except Exception:  # noqa: BLE001 - a bad tick must not kill the server
                    self.errors += 1
                    log.exception("scheduler body for tick %d failed", k)
                k += 1
        finally:
            for _, fut, _ in pending.values():
                if fut is not None:
                    fut.cancel()
            self._late_bodies.clear()
            pool.shutdown(wait=True)
            self._cancel_jobs()

    def _queue_mouth_only(self, k: int, k2: int, pending: collections.OrderedDict) -> int:
        """Ticks k..k2-1 have no body in time: queue a mouth-only phase (body None) for each whose mouth can
        still be on time, while a body exists or is on its way. Returns how many were queued."""
        if self._last_body is None and not pending:
            return 0
        clock = self.clock
        need = max(self.lead_s, self.est_mouth * 1.15)
        n = 0
        for kk in range(k, k2):
            if clock.now() + need > clock.video_time(kk):
                continue  # its mouth would be late too: skipped
            t0 = time.perf_counter()
            try:
                jobs = self._jobs_for(kk, None, phased=True)
            except Exception:  # noqa: BLE001
                self.errors += 1
                log.exception("scheduler: the request for mouth-only tick %d failed", kk)
                continue
            if jobs:
                pending[kk] = (jobs, None, t0)
                n += 1
        return n

    def _body_for(self, jobs: list[FrameJob]) -> BodyRecord | None:
        """The newest body done (late ones that finished since included) if it can make these jobs' pictures."""
        for late in [b for b in self._late_bodies if b.fut.done()]:
            last = self._last_body
            if late.fut.exception() is None and (last is None or late.tick > last.tick):
                late.body = late.fut.result()[0]
                self._last_body = late
        last = self._last_body
        self._late_bodies = [b for b in self._late_bodies if not b.fut.done() and (last is None or b.tick > last.tick)]
        return last if last is not None and last.serves(jobs) else None

    def _timed_body(self, avatars: list, z: np.ndarray) -> tuple[Any, float]:
        """A lane's work: the body, and how long it took (its own time, two lanes sharing the cores)."""
        t = time.perf_counter()
        body = self.pipeline.generate_body(avatars, z)
        t = self._observe("generate_body", t) - t
        return body, t

    def _lane_mouth(self, k: int, jobs: list[FrameJob], fut: concurrent.futures.Future, t0: float) -> None:
        """The mouth phase of tick k once its body (from a lane) is there."""
        if fut is not None and not fut.done() and self._body_for(jobs) is not None:
            # another body can make this picture: wait for its own only while the mouth would still be done by the
            # tick; past that the mouth does not wait (a wait makes this tick and the ones after it late): the tick
            # is made mouth-only, and its body, once done, serves the mouth-only ticks after it
            concurrent.futures.wait([fut], timeout=max(0.0, self.clock.video_time(k) - self.clock.now()
                                                       - self.est_mouth))
            if not fut.done():
                self._late_bodies.append(BodyRecord.of(k, jobs, fut=fut))
                fut = None
        if fut is None:
            self._mouth_only(k, jobs)
            return
        n, t_body, t_mouth = 0, 0.0, 0.0
        try:
            body, t_body = fut.result()
            t1 = time.perf_counter()
            n = self.mouth_round(jobs, body)
            t_mouth = time.perf_counter() - t1
            self._last_body = BodyRecord.of(k, jobs, body=body)
            self._shown_body = k
            self.bodies_shown += 1
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("scheduler mouth for tick %d failed", k)
        self._phase_times(n, t_body, t_mouth)
        self._account(k, n, t_body + t_mouth)

    def _mouth_only(self, k: int, jobs: list[FrameJob]) -> None:
        """Tick k from the newest body (the same sessions, avatars and epochs) and its own mouth phase; where there
        is none (a session joined, changed its avatar or was interrupted since) the tick is skipped as before."""
        last = self._body_for(jobs)
        if last is None:
            self.skipped_ticks += 1
            return
        fresh = last.tick != self._shown_body  # a late body no picture has shown yet
        for j, rest in zip(jobs, last.rests):
            j.rest = rest  # the body's pose / eye / expression: the mouth net reads what the body was made with
            j.extra["mouth_only"] = not fresh
        try:
            self.mouth_round(jobs, last.body)
            self._shown_body = last.tick
            if fresh:
                self.bodies_shown += 1
            else:
                self.mouth_only_ticks += 1
        except Exception:  # noqa: BLE001
            self.errors += 1
            log.exception("scheduler mouth-only tick %d failed", k)

    def _phase_times(self, n: int, t_body: float, t_mouth: float) -> None:
        """The two phases' EWMAs, from a round that made `n` frames (before `_account` counts it)."""
        if n:
            first = self.rounds == 0
            self.est_body = t_body if first else 0.8 * self.est_body + 0.2 * t_body
            self.est_mouth = t_mouth if first else 0.8 * self.est_mouth + 0.2 * t_mouth

    def _cancel_jobs(self) -> None:
        while True:
            try:
                fut, *_ = self._jobs.get_nowait()
            except queue.Empty:
                break
            fut.cancel()

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
            if self.phased:  # two phases were configured after the start (the server's warmup)
                self._run_phased()
                return
            # the first tick a round started now can still make: never work on a tick already lost
            now = clock.now()
            if now + self.est_round > clock.video_time(k):
                k2 = clock.video_tick_at(now + self.est_round) + 1
                self.skipped_ticks += k2 - k
                k = k2
            # idle until the round is due, running redos and submitted jobs meanwhile
            self._wait_until(clock.video_time(k) - max(self.lead_s, self.est_round * 1.15))
            if self._stop.is_set():
                break
            t0 = time.perf_counter()
            try:
                n = self.round(k)
            except Exception:  # noqa: BLE001 - a bad round must not kill the server
                self.errors += 1
                log.exception("scheduler round for tick %d failed", k)
                n = 0
            self._account(k, n, time.perf_counter() - t0)
            k += 1
            self._run_redos()
        self._cancel_jobs()  # fail whatever is still queued

    # ----------------------------------------------------------------------------------- round
    def _observe(self, stage: str, t0: float) -> float:
        t = time.perf_counter()
        if self.metrics is not None:
            self.metrics.stage_latency.observe(t - t0, stage=stage)
        return t

    def _jobs_for(self, k: int, only: tuple | None, phased: bool) -> list[FrameJob]:
        jobs: list[FrameJob] = []
        for s in (self._sessions if only is None else only):
            if not s.wants_tick(k):
                continue
            try:
                begin = getattr(s, "begin_job", None) if phased else None
                job = begin(k) if begin is not None else s.build_job(k)
            except Exception:  # noqa: BLE001
                log.exception("session %s: building the frame request failed; closing it", s.id)
                s.fail_from_thread("internal error while building a frame")
                continue
            if job is not None:
                jobs.append(job)
        if only is None:
            self.last_batch = len(jobs)
        return jobs

    def _webcams(self, jobs: list[FrameJob], t: float) -> float:
        """Webcam rows: E_mot once per new driving frame."""
        cam = [j for j in jobs if j.webcam is not None]
        if cam:
            lat = self.pipeline.encode_motion(np.stack([j.webcam for j in cam]))
            for r, j in enumerate(cam):
                j.session.set_webcam_latents({f: v[r] for f, v in lat.items()})
            t = self._observe("motion_encoder", t)
        return t

    def _lips(self, jobs: list[FrameJob], t: float) -> float:
        """Lip rows from audio: E_aud once for all speaking sessions."""
        aud = [j for j in jobs if j.mel is not None and j.gate > 0]
        if aud:
            lips = self.pipeline.encode_audio(np.stack([j.mel for j in aud]))
            for r, j in enumerate(aud):
                j.lip = lips[r] * np.float32(j.gate)
            t = self._observe("audio_encoder", t)
        return t

    def _z(self, jobs: list[FrameJob]) -> np.ndarray:
        lat_cfg = self.pipeline.cfg.latents
        sl = lat_cfg.slices()
        z = np.zeros((len(jobs), lat_cfg.total), np.float32)
        for r, j in enumerate(jobs):
            if j.lip is not None:
                z[r, sl["lip"]] = j.lip
            for f in ("pose", "eye", "exp"):
                z[r, sl[f]] = j.rest[f]
        return z

    def _deliver(self, jobs: list[FrameJob], frames, t: float) -> None:
        out = self.pipeline.to_video_frames(frames)
        self._observe("convert", t)
        for j, f in zip(jobs, out):
            j.session.deliver(j.tick, f, j.epoch, z_lip=j.lip, mouth_only=bool(j.extra.get("mouth_only")))

    def round(self, k: int, only: tuple | None = None) -> int:
        """Generate tick k for every live session (or just `only`) in one piece. Returns the batch size."""
        t = time.perf_counter()
        jobs = self._jobs_for(k, only, phased=False)
        if not jobs:
            return 0
        t = self._observe("prepare", t)
        t = self._webcams(jobs, t)
        t = self._lips(jobs, t)
        frames = self.pipeline.generate([j.avatar for j in jobs], self._z(jobs))
        self._deliver(jobs, frames, self._observe("generate", t))
        return len(jobs)

    def body_round(self, k: int) -> tuple[list[FrameJob], Any]:
        """The first phase of tick k: every live session's request without its audio, and the body of its
        frame from the provisional lip -> (jobs, body) for `mouth_round`."""
        t = time.perf_counter()
        jobs = self._jobs_for(k, None, phased=True)
        if not jobs:
            return [], None
        t = self._observe("prepare", t)
        t = self._webcams(jobs, t)
        body = self.pipeline.generate_body([j.avatar for j in jobs], self._z(jobs))
        self._observe("generate_body", t)
        return jobs, body

    def mouth_round(self, jobs: list[FrameJob], body) -> int:
        """The second phase: the audio of each request (the newest there is), E_aud, the mouth net and its
        paste, the conversion, and each frame delivered. Returns the batch size."""
        t = time.perf_counter()
        for j in jobs:
            finish = getattr(j.session, "finish_job", None)
            if finish is None:
                continue
            try:
                finish(j)
            except Exception:  # noqa: BLE001 - the row stays (the body has it), with its mouth shut
                log.exception("session %s: the audio part of the frame request failed", j.session.id)
                j.lip, j.mel = None, None
        t = self._observe("prepare_audio", t)
        t = self._lips(jobs, t)
        frames = self.pipeline.generate_mouth(body, [j.avatar for j in jobs], self._z(jobs))
        self._deliver(jobs, frames, self._observe("generate_mouth", t))
        return len(jobs)
