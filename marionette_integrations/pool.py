"""Several avatars in one process, batched: `TalkingHeadPool` loads the model once and runs one
`streaming.scheduler.Scheduler` (the one `marionette serve` runs) whose thread renders every head's frames,
all heads together as one batch per 40 ms round.

    pool = await TalkingHeadPool(TalkingHeadConfig(checkpoint=..., backend="auto")).start()
    a = await pool.head(avatar="alice.jpg").start()          # TalkingHeads, used exactly as unpooled ones
    b = await pool.head(avatar="bob.jpg", expression="happy").start()
    svc_a = MarionetteVideoService(talking_head=a)            # e.g. two Pipecat pipelines in one bot process
    ...
    await a.aclose(); await b.aclose(); await pool.aclose()

What is shared and what is not. The pool owns the model (`streaming.pipeline.Pipeline`), a `MediaClock` and
the scheduler thread; each head keeps its own avatar, speech, one-clock timeline, motion (idle, controls) and
pacing (`frames()`), as documented in marionette_integrations.avatar. Instead of rendering on a worker thread of
its own, a pooled head is a participant of the scheduler's rounds (`_Member`: the scheduler's session
interface `wants_tick` / `build_job` / `deliver`): each round asks every head for the next frame it has
queued, builds the job (the lip window and gate, the pose / eye / expression latents) on the scheduler thread,
and the scheduler runs E_aud once for all speaking heads and the generator once for all heads. A head renders at
most one frame a round (25 a second: real time); with `realtime=True` a queued frame that a round can no
longer finish by its due time is skipped (the picture before it repeats), as unpooled.

Avatars are prepared (E_app) on the scheduler thread between rounds (`Scheduler.submit`), as `serve` does,
so inference never runs concurrently with itself.

Load. `load()` is the figure `marionette serve` reports as `marionette_load` (streaming/server.py,
`admission`): the round time the current heads are predicted to take (the scheduler's measured round times
per batch size, `RoundTimes.predict`) over the round budget, or heads / `max_heads` when larger; 1.0 and
above is full. `admitting()`: whether one more head's round would still fit. The LiveKit avatar worker
reports it to LiveKit's dispatcher (marionette_integrations.livekit).

The scheduler needs RGB arrays back, not encoded video frames: it is given the pipeline through a thin
proxy whose `to_video_frames` returns the generated RGB frames as they are (no change to the scheduler).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import threading

import numpy as np

from marionette_integrations.avatar import (_NOT_READY, TalkingHead, TalkingHeadConfig, avatar_source,
                                            check_pipeline)

log = logging.getLogger(__name__)


class _RGBPipeline:
    """The pipeline as the scheduler sees it, with the generated RGB frames handed back as they are."""

    def __init__(self, pipeline):
        self._p = pipeline

    def __getattr__(self, name):
        return getattr(self._p, name)

    @staticmethod
    def to_video_frames(frames) -> list:
        return [np.ascontiguousarray(f) for f in frames]


class _Member:
    """One pooled TalkingHead as a participant of the scheduler's rounds (the interface of
    streaming.session.Session the scheduler calls: id, wants_tick, build_job, deliver, fail_from_thread)."""

    _ids = itertools.count(1)

    def __init__(self, pool: "TalkingHeadPool", head: TalkingHead):
        self.pool, self.head = pool, head
        self.id = f"head-{next(self._ids)}"
        # frame k -> (future, epoch, first try); tick -> (frame k, future, lips open, epoch) being rendered
        self._queued: dict[int, tuple[concurrent.futures.Future, int, float | None]] = {}
        self._building: dict[int, tuple[int, concurrent.futures.Future, bool, int]] = {}
        self.closed = False
        self.rendered = 0

    # the head's side (its lock held)
    def queue(self, k: int, epoch: int) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._queued[k] = (fut, epoch, None)
        return fut

    # the scheduler's side (its thread)
    def wants_tick(self, tick: int) -> bool:
        return not self.closed and bool(self._queued)

    def build_job(self, tick: int):
        from streaming.scheduler import FrameJob

        head, sch = self.head, self.pool.scheduler
        self._fail_stale(tick)
        while True:
            with head._lock:
                live = [k for k, (f, e, _) in self._queued.items() if not f.cancelled() and e == head._epoch]
                for k in [k for k in self._queued if k not in live]:
                    fut, _, _ = self._queued.pop(k)
                    if fut.set_running_or_notify_cancel():
                        fut.set_result(None)  # superseded (an interrupt): released as a repeat, if at all
                if not live:
                    return None
                k = min(live)
                fut, epoch, first = self._queued[k]
                if head.cfg.realtime and head._clock() + max(sch.est_round, 0.001) > head.due(k):
                    # this round cannot finish it in time: skipped (the picture before it repeats), try the next
                    self._queued.pop(k)
                    if fut.set_running_or_notify_cancel():
                        fut.set_result(None)
                    continue
                if first is None:
                    first = head._clock()
                    self._queued[k] = (fut, epoch, first)
            got = head._inputs(k, epoch, wait=False, first_try=first)
            if got is _NOT_READY:
                return None  # its speech has not arrived yet: a later round
            with head._lock:
                self._queued.pop(k, None)
                if not fut.set_running_or_notify_cancel():
                    continue
            if got is None:
                fut.set_result(None)
                continue
            z, mel, lips_open = head._latents(k, *got)
            sl = head.pipeline.cfg.latents.slices()
            rest = {f: z[0, sl[f]] for f in ("pose", "eye", "exp")}
            self._building[tick] = (k, fut, lips_open, epoch)
            return FrameJob(session=self, tick=tick, epoch=epoch, avatar=head.avatar, rest=rest,
                            lip=None, mel=mel, gate=1.0 if mel is not None else 0.0)

    def _fail_stale(self, tick: int) -> None:
        """Frames built for an earlier round that never came back (that round failed): released as repeats."""
        for t in [t for t in self._building if t < tick]:
            _, fut, _, _ = self._building.pop(t)
            if not fut.done():
                fut.set_result(None)

    def deliver(self, tick: int, frame, epoch: int, z_lip=None, mouth_only: bool = False) -> None:
        entry = self._building.pop(tick, None)
        if entry is None:
            return
        k, fut, lips_open, ep = entry
        image = np.ascontiguousarray(frame)
        head = self.head
        head._rendered(k, image, lips_open, self.pool.scheduler.est_round)
        self.rendered += 1
        self.pool._count(tick)
        if not fut.done():
            fut.set_result((image, lips_open, ep))

    def fail_from_thread(self, reason: str) -> None:
        log.error("%s: %s", self.id, reason)
        self.close()

    def close(self) -> None:
        self.closed = True
        with self.head._lock:
            queued, self._queued = list(self._queued.values()), {}
        for fut, _, _ in queued:
            if fut.set_running_or_notify_cancel():
                fut.set_result(None)


class TalkingHeadPool:
    """See the module doc. `config`: the model's fields (checkpoint, config, backend, threads, seed, fps,
    output_size) and the defaults of the heads' own fields; `pipeline`: an already loaded Pipeline instead.
    `round_budget_ms`: the round time one more head must fit for `admitting()` (default: the frame period
    minus 4 ms, as `serve`); `max_heads`: a hard cap (`load()` is at least heads / max_heads)."""

    def __init__(self, config: TalkingHeadConfig = TalkingHeadConfig(), *, pipeline=None, max_heads: int = 8,
                 round_budget_ms: float | None = None, lead_s: float | None = None, metrics=None):
        if max_heads < 1:
            raise ValueError(f"max_heads {max_heads}: must be at least 1")
        if config.fps <= 0 or 90000 % config.fps:
            raise ValueError(f"fps {config.fps}: must divide 90000 (e.g. 20, 24, 25, 30)")
        self.config = config
        self.fps = int(config.fps)
        self.pipeline = pipeline
        self.max_heads = int(max_heads)
        period = 1.0 / self.fps
        self.round_budget_s = (round_budget_ms / 1000) if round_budget_ms is not None else max(period * 0.5,
                                                                                                period - 0.004)
        if not self.round_budget_s > 0:
            raise ValueError(f"round budget {round_budget_ms} ms: must be positive")
        self._lead_s = lead_s
        self._metrics = metrics
        self.clock = None
        self.scheduler = None
        self.warmup_times: dict[int, float] = {}
        self._members: dict[int, _Member] = {}
        self._members_lock = threading.Lock()
        self._attaching = 0
        self._ticks: collections.OrderedDict = collections.OrderedDict()  # tick -> frames rendered in its round
        self._ticks_lock = threading.Lock()
        self.batch_rounds: collections.Counter = collections.Counter()  # batch size -> rounds (recent 2000 ticks)

    # ----------------------------------------------------------------------------------- life
    async def start(self) -> "TalkingHeadPool":
        """Load the model (unless given), start the scheduler thread, measure the round times (warmup)."""
        from streaming.clock import MediaClock
        from streaming.pipeline import Pipeline
        from streaming.scheduler import Scheduler

        cfg = self.config
        if self.pipeline is None:
            self.pipeline = await asyncio.to_thread(Pipeline.load, cfg.checkpoint, cfg.config, cfg.backend,
                                                    cfg.seed, cfg.threads)
        p = self.pipeline
        check_pipeline(p)
        p.output_size = cfg.output_size
        self.clock = MediaClock(self.fps)
        self.scheduler = Scheduler(_RGBPipeline(p), self.clock, self._metrics,
                                   lead_s=self._lead_s if self._lead_s is not None else self.clock.period,
                                   name="marionette-pool-scheduler").start()
        src, align = avatar_source(dataclasses.replace(cfg, avatar=None), p)
        state = await self._on_scheduler(p.prepare_avatar, src, align)
        self.warmup_times = await self._on_scheduler(p.warmup, state, (1, 2), 4)
        self.scheduler.round_times.seed(self.warmup_times)
        log.info("marionette pool ready: %s, %d fps, round %.1f ms (1 head), %.1f ms (2 heads)",
                 p.rt.describe().get("name"), self.fps, 1000 * self.warmup_times[1], 1000 * self.warmup_times[2])
        return self

    async def _on_scheduler(self, fn, *args):
        return await asyncio.wrap_future(self.scheduler.submit(fn, *args))

    def head(self, config: TalkingHeadConfig | None = None, **fields) -> TalkingHead:
        """A TalkingHead rendered by this pool (`await head.start()` then use it as any TalkingHead):
        `config`, or the pool's config with `fields` replaced (avatar=..., expression=..., realtime=...)."""
        if config is None:
            config = dataclasses.replace(self.config, **fields)
        elif fields:
            raise ValueError("give a config or fields, not both")
        return TalkingHead(config, pool=self)

    async def attach(self, head: TalkingHead) -> None:
        """Prepare `head`'s avatar on the scheduler thread and make it a participant of the rounds
        (TalkingHead.start calls it)."""
        if self.scheduler is None or not self.scheduler.alive:
            raise RuntimeError("start the pool first: pool = await TalkingHeadPool(...).start()")
        with self._members_lock:
            if len(self._members) + self._attaching >= self.max_heads:
                raise RuntimeError(f"the pool is full ({self.max_heads} heads)")
            self._attaching += 1  # heads of several threads' loops (a LiveKit worker's jobs) attach at once
        try:
            await self._prepare(head)
        finally:
            with self._members_lock:
                self._attaching -= 1
        member = _Member(self, head)
        head._member = member
        with self._members_lock:
            self._members[id(head)] = member
        self.scheduler.add(member)

    async def _prepare(self, head: TalkingHead) -> None:
        p = self.pipeline
        src, align = avatar_source(head.cfg, p)
        if align not in ("off", None):
            portrait = await asyncio.to_thread(p.align_portrait, src, align, False)  # the slow part, off the thread
            if portrait is not None:
                src, align = portrait, None
            elif align == "auto":
                align = "off"
        head.avatar = await self._on_scheduler(p.prepare_avatar, src, align)
        head._setup_motion()
        head.est_render = max(self.scheduler.est_round, self.warmup_times.get(1, 0.04))

    def detach(self, head: TalkingHead) -> None:
        with self._members_lock:
            member = self._members.pop(id(head), None)
        if member is not None:
            self.scheduler.remove(member)
            member.close()

    async def aclose(self) -> None:
        for m in list(self._members.values()):
            await m.head.aclose()
        if self.scheduler is not None:
            await asyncio.to_thread(self.scheduler.stop)

    # ----------------------------------------------------------------------------------- load
    @property
    def heads(self) -> int:
        return len(self._members)

    def load(self, extra: int = 0) -> float:
        """max(predicted round time of the current heads (+ extra) / round budget, heads / max_heads), as
        `marionette serve`'s marionette_load; 1.0 and above: full."""
        if self.scheduler is None:
            return 1.0
        n = self.heads + int(extra)
        return max(self.scheduler.round_times.predict(n) / self.round_budget_s, n / self.max_heads)

    def admitting(self) -> bool:
        """Whether one more head would be taken: under the cap, and its round predicted within the budget
        (the first head is always taken)."""
        n = self.heads
        if self.scheduler is None or n >= self.max_heads:
            return False
        return n == 0 or self.scheduler.round_times.predict(n + 1) <= self.round_budget_s

    def info(self) -> dict:
        sch = self.scheduler
        return {"heads": self.heads, "max_heads": self.max_heads, "load": round(self.load(), 4),
                "admitting": self.admitting(), "round_budget_ms": round(1000 * self.round_budget_s, 2),
                "rounds": sch.rounds if sch else 0, "last_batch": sch.last_batch if sch else 0,
                "skipped_ticks": sch.skipped_ticks if sch else 0,
                "batch_rounds": dict(sorted(self.batch_rounds.items()))}

    def _count(self, tick: int) -> None:
        """A head's frame rendered in tick's round (the scheduler thread): batch sizes per round."""
        with self._ticks_lock:
            n = self._ticks.get(tick, 0)
            if n:
                self.batch_rounds[n] -= 1
                if not self.batch_rounds[n]:
                    del self.batch_rounds[n]
            self._ticks[tick] = n + 1
            self.batch_rounds[n + 1] += 1
            while len(self._ticks) > 2000:
                _, old = self._ticks.popitem(last=False)
                self.batch_rounds[old] -= 1
                if not self.batch_rounds[old]:
                    del self.batch_rounds[old]
