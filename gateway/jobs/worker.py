"""run(job): take a queued job, route it to a backend, store its images, finish it.

One fetch loop per process reads as many queue entries as it has free slots; each job
runs as a task (no thread per job). A heartbeat keeps the entries and the concurrency
leases of running jobs alive; entries whose worker went silent for a lease are claimed
again. A job that has been started `job_max_tries` times without ending (it keeps
killing workers) is failed and refunded. Only this module decides between retrying and
failing with a refund.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from gateway import metrics, telemetry
from gateway.artifacts import ArtifactStore, StorageUnavailable
from gateway.cache import Cache
from gateway.config import Settings
from gateway.errors import ProviderError
from gateway.events import Events
from gateway.images import UnreadableImage, normalize_image
from gateway.jobs.model import Job
from gateway.jobs.queue import Queue
from gateway.jobs.store import JobStore
from gateway.providers.base import ImageParams, Output
from gateway.routing import JobCancelled, JobFailed, Result, Router
from gateway.store import keys
from gateway.store.redis import RefusedRedis, store_trouble
from gateway.timeouts import set_within
from gateway.webhooks import Webhooks

log = structlog.get_logger("gateway.worker")

SWEEP_EVERY = 3600.0
#: seconds without a read after which a queue consumer holding no entry is a worker gone
#: (a live one reads, or renews what it holds, far more often); deleted at the hourly sweep
CONSUMER_GONE = 3600.0
FETCH_BATCH = 256  # entries taken per read: thousands queued start as a ramp, not a herd
#: images downloaded and stored at once: a burst of completions (thousands of callbacks in
#: a few seconds) queues here instead of holding every image in memory at once
STORING_AT_ONCE = 256
CANCEL_AGAIN = 0.1  # seconds: how soon a task that ignored its cancel is cancelled again
#: seconds between two looks at another shard's identical job this one waits for (rare:
#: one per shard and request in flight)
LEAD_POLL = 1.0


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel `task` until it has ended. One cancel can be lost on Python 3.11: its
    `asyncio.wait_for`, through which redis-py reads a reply, returns the result of a
    read that completed as the cancel arrived and drops the cancel (fixed in 3.12). A
    job's task then ran on, polling its upstream beside the worker that took it over,
    until the next heartbeat cancelled it again."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_AGAIN)


@dataclass(slots=True, eq=False)
class Running:
    """A job this worker runs, and the hooks its upstream wait calls back (bound
    methods: no closures kept per job while it waits)."""

    worker: Worker
    entry_id: str
    job_key: str
    job: Job | None = None  # once started
    task: asyncio.Task[None] | None = None

    def save_upstream(self, upstream: dict[str, Any]) -> Awaitable[None]:
        assert self.job is not None  # only called once started
        return self.worker._save_upstream(self.job, upstream)

    def progress(self, meta: dict[str, Any]) -> Awaitable[None]:
        assert self.job is not None
        return self.worker._progress(self.job, meta)

    async def cancelled(self) -> bool:
        return self.job_key in self.worker.cancelled


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        store: JobStore,
        queue: Queue,
        router: Router,
        artifacts: ArtifactStore,
        events: Events,
        consumer: str,
        cache: Cache,
        webhooks: Webhooks | None = None,
        clock: Callable[[], float] = time.time,
        keyspace: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`keyspace`: looked at each heartbeat, raises `RefusedRedis` once the keyspace
        has more shards than this worker reads (`store/shards.py`); the worker then stops
        and keeps the refusal in `refused`."""
        self.keyspace = keyspace
        self.refused: RefusedRedis | None = None
        self.webhooks = webhooks
        self.cache = cache
        self.settings = settings
        self.store = store
        self.queue = queue
        self.router = router
        self.artifacts = artifacts
        self.events = events
        self.consumer = consumer
        self.clock = clock
        self.capacity = settings.workers
        self.lease_ms = int(settings.job_lease_seconds * 1000)
        self.running: dict[str, Running] = {}
        self.waiting = 0  # of those, the jobs waiting for another shard's (`_lead`)
        self.last_sweep = 0.0
        self.sweeping: asyncio.Task[None] | None = None
        self.freed = asyncio.Event()
        self.storing = asyncio.Semaphore(STORING_AT_ONCE)
        self.cancelled: set[str] = set()  # keys of running jobs cancelled by their owner
        self.stopping: set[asyncio.Task[None]] = set()  # `stop_task`s of jobs taken over

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- the loops ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, grace: float = 10.0) -> None:
        """Fetch and run jobs until `stop` is set; then let running jobs finish for
        `grace` seconds. Jobs still running after that stay pending in the queue (their
        upstream ids stored) and are resumed by another worker."""
        await self.queue.ensure_group()
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        watcher = asyncio.create_task(self._watch_cancellations(stop))
        deliveries = asyncio.create_task(self.webhooks.run(stop)) if self.webhooks else None
        reading = telemetry.Streak("queue read")
        try:
            while not stop.is_set():
                free = min(self._free(), FETCH_BATCH)
                if free <= 0:
                    self.freed.clear()
                    await set_within(self.freed, 1.0)
                    continue
                try:
                    entries = await self.queue.read(self.consumer, free, block_ms=1000)
                    reading.ok()
                except Exception as exc:  # Redis away: keep the loop alive, try again
                    with contextlib.suppress(Exception):
                        if await self.queue.regroup(exc):  # Redis came back empty
                            log.warning("queue group made again", error=str(exc))
                            continue
                    reading.failed(exc)
                    await asyncio.sleep(1.0)
                    continue
                for entry_id, job_key in entries:
                    self._spawn(entry_id, job_key)
        finally:
            tasks = [r.task for r in self.running.values() if r.task is not None]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=grace)
                await asyncio.gather(*map(stop_task, pending))
            loops = [heartbeat, watcher, *([self.sweeping] if self.sweeping else [])]
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            if deliveries:
                await deliveries

    def _free(self) -> int:
        """How many more jobs this process may take."""
        return self.capacity - len(self.running) + self.waiting

    def _spawn(self, entry_id: str, job_key: str) -> None:
        if entry_id in self.running:
            return
        running = self.running[entry_id] = Running(self, entry_id, job_key)
        # Named after its entry, which `_done` frees: no closure per job.
        running.task = asyncio.create_task(self.process(running), name=entry_id)
        running.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.pop(task.get_name(), None)
        self.freed.set()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        period = self.settings.job_lease_seconds / 3
        trouble = telemetry.Streak("heartbeat")
        while not stop.is_set():
            await set_within(stop, period)
            try:
                if self.keyspace is not None:
                    await self.keyspace()
                await self.beat()
                rescued = await self.cache.rescue(self.now_ms(), self.router.configured)
                await self._announce(rescued)
                idle = self.sweeping is None or self.sweeping.done()
                if idle and self.clock() - self.last_sweep > SWEEP_EVERY:
                    # Beside the heartbeat, not in it: listing a large bucket can take
                    # longer than a lease, and the leases must be renewed meanwhile.
                    self.last_sweep = self.clock()
                    self.sweeping = asyncio.create_task(self._sweep_logged())
                trouble.ok()
            except RefusedRedis as exc:  # its jobs are left to workers that read them all
                log.error("worker stopping", reason=str(exc))
                self.refused = exc
                stop.set()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    await self.queue.regroup(exc)  # Redis came back empty: the next beat runs
                trouble.failed(exc)

    async def _sweep_logged(self) -> None:
        try:
            await self.sweep()
        except Exception as exc:  # the store away, say: the next try is an hour later
            log.warning("sweeping outputs failed", error=str(exc))
        try:
            forgotten = await self.queue.forget_gone(self.consumer, int(CONSUMER_GONE * 1000))
            if forgotten:
                log.info("forgot the queue's readers gone", count=forgotten)
        except Exception as exc:
            log.warning("forgetting the queue's readers gone failed", error=str(exc))

    async def beat(self) -> None:
        """Renew what this worker runs; take over what silent workers left behind."""
        # Not those being stopped (`stop_task`): theirs are another worker's now.
        running = [r for r in self.running.values() if not (r.task and r.task.cancelling())]
        lost_now = set(await self.queue.touch(self.consumer, [r.entry_id for r in running]))
        for lost in lost_now:
            # Another worker took the job over while this one could not renew it: it runs
            # it now (resuming its upstream job); stopped here, it is not run twice.
            taken = self.running.get(lost)
            if taken is not None and taken.task is not None:
                log.warning("job taken over by another worker", entry=lost, job=taken.job_key)
                stopping = asyncio.create_task(stop_task(taken.task))
                self.stopping.add(stopping)  # kept until done: a task is only weakly held
                stopping.add_done_callback(self.stopping.discard)
        running = [r for r in running if r.entry_id not in lost_now]
        await self.store.renew_leases(
            [r.job for r in running if r.job is not None], self.now_ms() + self.lease_ms
        )
        free = self._free()
        if free > 0:
            for entry_id, job_key in await self.queue.reclaim(self.consumer, self.lease_ms, free):
                log.info("reclaimed job", entry=entry_id, job=job_key)
                self._spawn(entry_id, job_key)

    async def sweep(self) -> int:
        """Remove outputs past retention. Their job records expire first (they are set
        to live `retention` from completion, the files an hour longer), so `jobs` never
        lists a job whose images are gone."""
        self.last_sweep = self.clock()
        cutoff = self.clock() - self.settings.retention_days * 86400 - SWEEP_EVERY
        removed = await self.artifacts.sweep(cutoff)
        if removed:
            log.info("swept outputs past retention", removed=removed)
        return removed

    # -- one job -----------------------------------------------------------------------

    async def process(self, running: Running) -> None:
        """Start the job, run it, end it. One coroutine for the job's whole life (the
        upstream wait below it): a worker holds thousands of them at once."""
        entry_id, job_key = running.entry_id, running.job_key
        job = await self._start(entry_id, job_key)
        if job is None:
            return
        running.job = job
        attempt = job.attempts
        _on_its_lines(job)
        attributes = (
            {"gateway.job_id": job.id, "gateway.attempt": attempt} if telemetry.ENABLED else None
        )
        with telemetry.span("job", parent=job.trace, attributes=attributes):
            if attempt > self.settings.job_max_tries:
                await self._end(job, "failed", error=f"gave up after {attempt - 1} attempts")
                await self.queue.ack(entry_id)
                return
            await self.events.publish(job)
            log.info("job started")
            try:
                deadline = (
                    self.router.clock()
                    + self.settings.job_deadline_seconds
                    - (self.clock() - job.created_at / 1000)
                )
                # Not a job whose upstream call was sent already: it resumes that.
                if job.cache_key and self.cache.across_shards and not job.upstream:
                    leader = await self._lead(job, running, deadline)
                    if leader is not None:
                        await self._complete_as(job, leader)
                        await self.queue.ack(entry_id)
                        return
                attributes = {"gateway.service": job.provider} if telemetry.ENABLED else None
                with telemetry.span("render", attributes=attributes) as span:
                    result = await self.router.execute(
                        job.provider,
                        ImageParams(**job.params),
                        resume=job.upstream,
                        save_upstream=running.save_upstream,
                        progress=running.progress,
                        cancelled=running.cancelled,
                        deadline=deadline,
                        key=job_key,
                    )
                    if span is not None:
                        span.set_attribute("gateway.backend", result.backend)
                await self._complete(job, result)
            except JobCancelled:
                await self._end(job, "cancelled")
            except JobFailed as exc:
                log.info("job failed", error=str(exc))
                await self._end(
                    job, "failed", error=str(exc), backend=exc.backend, rejected=exc.rejected
                )
            except asyncio.CancelledError:
                # stays pending: resumed elsewhere
                log.info("job handed off at shutdown")
                raise
            except StorageUnavailable as exc:
                # The output store failed or went away (mid-upload, say): nothing
                # completed. As with the store below, the entry stays pending and is
                # claimed again after its lease: a new attempt (its upstream job
                # resumed, or its images fetched again), failed and refunded after
                # `job_max_tries`.
                log.warning("output storage unavailable; job left for a retry", error=str(exc))
                return
            except Exception as exc:
                if store_trouble(exc):
                    # The store went away mid-job: not the job's fault. Leave its entry
                    # pending; it is claimed again after its lease and resumes upstream.
                    log.warning("store unreachable; job left for a retry", error=repr(exc))
                    return
                log.exception("job crashed")
                await self._end(job, "failed", error="internal error while running the job")
            await self.queue.ack(entry_id)

    async def _start(self, entry_id: str, job_key: str) -> Job | None:
        """The job's record, as started; None when there is nothing to run (its entry
        acknowledged)."""
        try:
            job = await self.store.start(job_key, self.now_ms(), self.lease_ms)
            while job is not None and job.status == "queued":  # its waiting client left it
                _on_its_lines(job)
                error = "cancelled: its client left before it started"
                if await self._end(job, "cancelled", error=error, only_from="left"):
                    job = None
                else:  # the same request came back for it meanwhile: it runs after all
                    job = await self.store.start(job_key, self.now_ms(), self.lease_ms)
        except Exception as exc:
            if store_trouble(exc):
                raise  # left pending: taken again once its lease has passed
            # Redis refused to start it (a Lua error, WRONGTYPE): so would every retry.
            log.exception("job could not be started; failing it", job=job_key)
            try:
                job = await self.store.get_by_key(job_key)
            except Exception as unreadable:
                if store_trouble(unreadable):
                    raise
                # A record no code can read (damaged by hand): no retry reads it either.
                log.exception("job record unreadable; left for an operator", job=job_key)
                job = None
            if job is not None and not job.ended:
                _on_its_lines(job)
                await self._end(job, "failed", error="internal error while starting the job")
            await self.queue.ack(entry_id)
            return None
        if job is None:  # gone, or ended (cancelled while queued, say)
            await self.queue.ack(entry_id)
        return job

    async def _save_upstream(self, job: Job, upstream: dict[str, Any]) -> None:
        """Record the upstream's job id, retrying while the store is in trouble: the
        upstream has taken (and will bill) the job, so giving up here would submit it
        again on the retry. Bounded by the job's deadline."""
        give_up = job.created_at / 1000 + self.settings.job_deadline_seconds
        delay = 0.2
        while True:
            try:
                await self.store.save_upstream(job, upstream)
                return
            except Exception as exc:
                if not store_trouble(exc) or self.clock() + delay > give_up:
                    raise
                log.warning(
                    "could not store the upstream id yet; retrying", job_id=job.id, error=repr(exc)
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _watch_cancellations(self, stop: asyncio.Event, period: float = 1.0) -> None:
        """Read the shards' cancellation logs once a `period`: one round trip for every
        running job, where a status read per job per poll cost thousands a second."""
        reading = telemetry.Streak("reading cancellations")
        while not stop.is_set():
            await set_within(stop, period)
            if not self.running:
                continue
            try:
                found = await self.store.recently_cancelled(
                    self.settings.redis_shards, self.now_ms()
                )
                reading.ok()
            except Exception as exc:
                reading.failed(exc)
                continue
            if not found and not self.cancelled:
                continue  # the usual second: nothing cancelled, no set of every job built
            running = {r.job_key for r in self.running.values()}
            newly = (found & running) - self.cancelled
            self.cancelled = (self.cancelled & running) | (found & running)
            for key in newly:  # a job waiting upstream sleeps until its next poll: wake it
                self.router.upstream.nudge(key)

    async def _progress(self, job: Job, meta: dict[str, Any]) -> None:
        await self.store.save_progress(job, {**job.metadata, **meta})
        await self.events.publish(job)

    async def _lead(self, job: Job, running: Running, deadline: float) -> Job | None:
        """With several shards, before the upstream call: lead the identical requests of
        every shard, or wait for the job of another shard that leads them
        (docs/api.md#cache). None: this job leads, and runs; else that job, completed.
        While it waits it takes none of the process's `workers` places: the leader's
        entry may be one this process has to take over."""
        holder = await self.cache.lead(job)
        if holder == running.job_key:
            return None
        self.waiting += 1
        self.freed.set()
        marked = False  # its metadata says what it waits for, while it does
        try:
            while holder != running.job_key:
                # The leader's record is watched, not the lead: the lead stays after the
                # leader completed, and goes when it failed.
                leader = await self.store.get_by_key(holder)
                if leader is None or leader.status not in ("queued", "processing"):
                    if leader and leader.status == "completed" and self._takes(job, leader):
                        return leader
                    # It failed or was cancelled, or its images are not this job's to take.
                    holder = await self.cache.lead(job, instead_of=holder)  # or another's
                    continue
                if not marked:
                    marked = True
                    await running.progress({"coalesced": True})
                if await running.cancelled():
                    raise JobCancelled()
                if self.router.clock() >= deadline:
                    raise JobFailed("ran out of time waiting for an identical request")
                await asyncio.sleep(LEAD_POLL)
        finally:
            self.waiting -= 1
        # It leads after all (the leader failed), and takes a place again: none is read
        # while the process is over its places, and this one runs once it is not.
        while len(self.running) - self.waiting > self.capacity:
            self.freed.clear()
            await set_within(self.freed, 1.0)
        if marked:  # it waits no more
            await self.store.save_progress(
                job, {k: v for k, v in job.metadata.items() if k != "coalesced"}
            )
            await self.events.publish(job)
        return None

    def _takes(self, job: Job, leader: Job) -> bool:
        """Whether `job` takes the images of `leader`, completed: as a hit would, while
        they are kept (admit.lua); a preview (`_complete`) only if the two were in flight
        together, as its own shard's waiters do."""
        completed = leader.completed_at or 0
        if not self._kept(job, leader.metadata):
            return completed >= job.created_at
        return completed + self.cache.retention_ms - 60_000 > self.now_ms()

    async def _complete_as(self, job: Job, leader: Job) -> None:
        """Completed with the images of another shard's identical job, free as a request
        joined in its own shard is (its charge refunded); its own waiters with it."""
        now = self.now_ms()
        metadata = {
            **leader.metadata,
            "cached": True,
            "coalesced": True,
            "duration": round((now - job.created_at) / 1000, 3),
        }
        width, height = leader.width or 0, leader.height or 0
        ended = await self.store.finish(
            job,
            "completed",
            now,
            refund=True,
            urls=leader.urls,
            width=width,
            height=height,
            metadata=metadata,
            joined=True,
        )
        if ended:
            # It ran on no backend (docs/api.md#metrics).
            metrics.job_ended(job.provider, metrics.NO_BACKEND, "completed")
            log.info("job completed with an identical job's images", leader=leader.id)
            await self._settle(job, now, leader.urls, width, height, leader.metadata, leader)
        await self.events.publish_stored(keys.job(job.account, job.id))

    async def _complete(self, job: Job, result: Result) -> None:
        fmt = job.params.get("output_format", "png")
        urls: list[str] = []
        sizes: list[tuple[int, int]] = []
        seeds: list[int | None] = []
        said = result.metadata.get("seeds") or []  # the submission's, image by image (Krea's)
        for i, output in enumerate(result.outputs):
            try:
                url, width, height = await self._store_output(result, output, fmt)
            except (JobFailed, StorageUnavailable):
                await self._discard(urls)  # the images stored before this one
                raise
            urls.append(url)
            sizes.append((width, height))
            seeds.append(output.seed if output.seed is not None or i >= len(said) else said[i])
        if not urls:
            raise JobFailed(f"{result.backend} returned no images", result.backend)
        now = self.now_ms()
        width, height = sizes[0]
        seed = seeds[0] if seeds[0] is not None else job.params.get("seed")
        metadata = {
            **{k: v for k, v in result.metadata.items() if v is not None},
            "width": width,
            "height": height,
            "seed": seed,
            "seeds": [s if s is not None else seed for s in seeds],
            "backend": result.backend,
            "cached": False,
            "duration": round((now - job.created_at) / 1000, 3),
            "attempts": job.attempts,
        }
        ended = await self.store.finish(
            job,
            "completed",
            now,
            refund=False,
            urls=urls,
            width=width,
            height=height,
            metadata=metadata,
        )
        if ended:
            metrics.job_completed(job.provider, result.backend, metadata["duration"], job.cost)
            log.info("job completed", backend=result.backend, duration=metadata["duration"])
        keep = False
        if not ended:  # cancelled meanwhile: the images are nobody's
            await self._discard(urls)
        elif job.cache_key:
            keep = await self._settle(job, now, urls, width, height, metadata)
        # Its lead (several shards) stays until it lapses once its images are kept: an
        # identical job of another shard that starts meanwhile (admitted before they were
        # cached in its shard) takes them too. A preview's goes: no later request gets it.
        if not keep:
            await self.cache.unlead(job)
        await self.events.publish_stored(keys.job(job.account, job.id))

    async def _settle(
        self,
        job: Job,
        now: int,
        urls: list[str],
        width: int,
        height: int,
        metadata: dict[str, Any],
        entry_of: Job | None = None,
    ) -> bool:
        """A cacheable job completed with these images (`entry_of`'s: `Cache.settle`): its
        waiters complete with it, and the images are cached unless a preview. Whether
        they are kept."""
        job.completed_at = now
        keep = self._kept(job, metadata)
        settled = await self.cache.settle(
            job, urls, width, height, metadata, keep=keep, entry_of=entry_of
        )
        await self._announce(settled)
        return keep

    def _kept(self, job: Job, metadata: dict[str, Any]) -> bool:
        """Whether images made for `job` (their `metadata`) answer its later requests: not
        a preview, which the offline renderer standing in for another service (dev mode's
        last backend, not one its route names) drew."""
        return self.router.configured(job.provider, str(metadata.get("backend") or ""))

    async def _store_output(self, result: Result, output: Output, fmt: str) -> tuple[str, int, int]:
        async with self.storing:
            return await self._store_one(result, output, fmt)

    async def _store_one(self, result: Result, output: Output, fmt: str) -> tuple[str, int, int]:
        try:
            data = await result.provider.fetch(output)
        except ProviderError as exc:
            raise JobFailed(f"{result.backend}: {exc.message}", result.backend) from exc
        try:
            data, width, height = await asyncio.to_thread(normalize_image, data, fmt)
        except UnreadableImage as exc:
            raise JobFailed(
                f"{result.backend} returned an unreadable image", result.backend
            ) from exc
        attributes = {"gateway.format": fmt, "gateway.bytes": len(data)}
        with telemetry.span("storage.put", attributes=attributes):
            url = await self.artifacts.put(data, fmt)
        return url, width, height

    async def _discard(self, urls: list[str]) -> None:
        """Delete images no job will hand out; left to the retention sweep if the store
        fails now."""
        if not urls:
            return
        try:
            await self.artifacts.delete(urls)
        except StorageUnavailable as exc:
            log.warning("unused outputs left for the sweep", count=len(urls), error=str(exc))

    async def _end(
        self,
        job: Job,
        status: str,
        error: str | None = None,
        backend: str = metrics.NO_BACKEND,
        rejected: bool = False,
        only_from: str = "",
    ) -> bool:
        """End the job unfinished, refunded. `rejected`: the upstream refused its input.
        False when, with `only_from` (`JobStore.finish`), it had not that status: the
        job goes on, not this call's to end or to release."""
        ended = await self.store.finish(
            job,
            status,
            self.now_ms(),
            refund=True,
            error=error,
            rejected=rejected,
            only_from=only_from,
        )
        if ended:
            metrics.job_ended(job.provider, backend, status)
            log.info("job ended", status=status, backend=backend)
            if status == "failed":
                telemetry.failed("job failed")
        elif only_from:
            return False
        await self.events.publish_stored(keys.job(job.account, job.id))
        if job.cache_key:  # the identical requests waiting for it must not fail with it
            await self.cache.unlead(job)
            await self._announce(await self.cache.release(job, self.now_ms()))
        return True

    async def _announce(self, job_keys: list[str]) -> None:
        """Jobs the cache completed or promoted: wake the fetcher, tell their followers."""
        if job_keys:
            self.queue.notify()
            await self.events.publish_stored(*job_keys)


def _on_its_lines(job: Job) -> None:
    """The job's id, account, service and attempt on every line logged in this task (the
    job's own, and its router's and backends'), as docs/api.md#logs-and-traces lists."""
    telemetry.note(job_id=job.id, account=job.account)
    structlog.contextvars.bind_contextvars(service=job.provider, attempt=job.attempts)
