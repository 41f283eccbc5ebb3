"""The scheduler core: which batch of which jobs' items runs on which replica, next.

Plain bookkeeping, no Ray, torch or gRPC (a unit test holds it to that), so every
rule here is tested on CPU with fake replicas. The engine feeds it jobs and
outcomes and carries its decisions out through the executor:

- **Priorities** are strict: a batch holds items of one priority level, the
  highest that has an item ready.
- **Fair share** within a level: owners get images in proportion to their
  weights (start-time fair queuing on a virtual clock per level and stage: the owner
  that has been served least, per unit of weight, goes next; an owner that
  becomes active starts at the level's clock, so idling earns no credit).
  An owner's jobs share its part the same way.
- **Cross-job batching**: the first item chosen fixes the batch key; the
  batch is filled with items of that key from every job of the level, in
  fair order.
- **Load and model aware**: a replica takes at most `capacity` batches in
  flight; a batch goes to a replica with room that already holds its model,
  else to the least loaded one, so models swap only when they must.
- **Retries**: an item that failed runs again after its delay, alone, so a
  poison item cannot spend its batch-mates' attempts.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class Item:
    """One unit of work of a job: an image to render, upscale or decode."""

    job: str
    spec: object
    model: str
    # Items with equal keys (and so equal models) may share a batch.
    key: Hashable
    # What the executor needs beside the spec (an input image, latents, chained settings).
    payload: object = None
    # Failed attempts so far: restored from the job store on resume.
    failures: int = 0
    # When the replica it needed was first found unavailable (no attempt is spent while it waits).
    waiting_since: float | None = None
    ready_at: float = 0.0
    # Items per batch of this item's key, where it is not its stage's (see Scheduler).
    shape: int | None = None


@dataclass(eq=False)
class Batch:
    stage: str
    replica: int
    model: str
    items: list[Item]
    # How many items the stage computes: the batch is padded up to it, so that an item's pixels
    # never depend on how many companions it has (see README, "Cross-job batching").
    shape: int


@dataclass(eq=False)
class _Replica:
    stage: str
    index: int
    capacity: int
    in_flight: int = 0
    # Models it holds, least recently used first, as the replica itself evicts them.
    models: OrderedDict = field(default_factory=OrderedDict)

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.capacity


class _Job:
    def __init__(self, job_id: str, owner: _Owner, priority: int, stage: str, items: Iterator[Item], order: int,
                 arrived: float):  # fmt: skip
        self.id, self.owner, self.priority, self.stage, self.order = job_id, owner, priority, stage, order
        self.arrived = arrived
        self._source = items
        self.dropped = False
        # The next fresh items, read ahead of the source only as far as a batch needs to look.
        self._ahead: deque[Item] = deque(itertools.islice(self._source, 1))
        # (ready_at, sequence, item): items to run again, soonest first.
        self._retries: list[tuple[float, int, Item]] = []
        self.in_flight = 0
        self.vtime = 0.0

    def peek(self, now: float) -> Item | None:
        if self._retries and self._retries[0][0] <= now:
            return self._retries[0][2]
        return self._ahead[0] if self._ahead else None

    def take(self, now: float) -> Item:
        if self._retries and self._retries[0][0] <= now:
            item = heapq.heappop(self._retries)[2]
        else:
            item = self._ahead.popleft()
            if not self._ahead:
                self._ahead.extend(itertools.islice(self._source, 1))
        self.in_flight += 1
        return item

    def run_length(self, now: float, key, limit: int) -> int:
        """How many of the items it would hand out next have `key`, counting up to `limit`."""
        item = self.peek(now)
        if item is None or item.key != key:
            return 0
        if self._retries and item is self._retries[0][2]:
            return 1  # a retry runs alone
        count = 0
        while count < limit:
            if count == len(self._ahead):
                following = next(self._source, None)
                if following is None:
                    break
                self._ahead.append(following)
            if self._ahead[count].key != key:
                break
            count += 1
        return count

    def push_retry(self, item: Item, sequence: int) -> None:
        heapq.heappush(self._retries, (item.ready_at, sequence, item))

    def drop_pending(self) -> None:
        self._source, self._ahead, self._retries, self.dropped = iter(()), deque(), [], True

    @property
    def has_pending(self) -> bool:
        return bool(self._ahead) or bool(self._retries)

    @property
    def next_retry_at(self) -> float | None:
        return self._retries[0][0] if self._retries else None


@dataclass(eq=False)
class _Owner:
    name: str
    weight: float
    vtime: float = 0.0
    jobs: list[_Job] = field(default_factory=list)


@dataclass(eq=False)
class _Level:
    # By (owner name, stage): each stage is its own resource, so images served on one stage earn no
    # place in another's queue.
    owners: dict[tuple[str, str], _Owner] = field(default_factory=dict)
    # The virtual time of the last image served at this level, per stage.
    clock: dict[str, float] = field(default_factory=dict)


class Scheduler:
    def __init__(self, shapes: dict[str, int], models_per_replica: int, batch_wait_s: float = 0.0):
        """`shapes`: items per batch of each stage (the denoiser's max batch; 1 where a stage takes one).
        `batch_wait_s`: how long a short batch of newly arrived items waits for companions."""
        self._shapes = shapes
        self._batch_wait_s = batch_wait_s
        # When a waiting short batch stops waiting.
        self._window_ends: float | None = None
        self._models_per_replica = models_per_replica
        # Models placed on a replica that did not hold them, by stage: each one a load.
        self._model_loads: dict[str, int] = {}
        self._replicas: dict[str, list[_Replica]] = {}
        self._levels: dict[int, _Level] = {}
        self._jobs: dict[str, _Job] = {}
        # OOM halves, run before anything else on their stage.
        self._pinned: dict[str, list[Batch]] = {}
        self._order = itertools.count()
        self._stopped = False
        # The `now` of the last schedule(): a retry ready by then that did not start waits for a slot
        # (a release, which schedules again), not for a timer.
        self._now = float("-inf")

    # -- the farm's shape -------------------------------------------------------------------------

    def add_replicas(self, stage: str, count: int, capacity: int) -> None:
        replicas = self._replicas.setdefault(stage, [])
        # Numbered from the count before: len() grows while extend() consumes a generator.
        first = len(replicas)
        replicas.extend(_Replica(stage, first + i, capacity) for i in range(count))

    def replica_count(self, stage: str) -> int:
        return len(self._replicas.get(stage, ()))

    def models(self, stage: str, replica: int) -> list[str]:
        """The models a replica holds as the core tracks them, least recently used first."""
        return list(self._replicas[stage][replica].models)

    def model_loads(self) -> dict[str, int]:
        """Models placed on a replica that did not hold them (as the core tracks them), by stage."""
        return dict(self._model_loads)

    def forget_models(self, stage: str, replica: int) -> None:
        """A replica restarted (or moved to another node): it holds no model any more."""
        self._replicas[stage][replica].models.clear()

    # -- jobs --------------------------------------------------------------------------------------

    def add_job(self, job_id: str, stage: str, items: Iterator[Item], now: float, *, priority: int = 0,
                owner: str | None = None, weight: float = 1.0) -> None:  # fmt: skip
        """Queues a job's items (a lazy iterator: a sweep is never materialised). Each job is its own
        owner, of weight 1, unless `owner` names one; an owner's weight is the one its latest job came with."""
        level = self._levels.setdefault(priority, _Level())
        name = owner if owner is not None else job_id
        account = level.owners.get((name, stage))
        if account is None:
            account = level.owners[(name, stage)] = _Owner(name, weight)
        account.weight = weight
        if not any(job.has_pending for job in account.jobs):
            # An owner that was idle joins at the level's clock: idling earns no credit.
            account.vtime = max(account.vtime, level.clock.get(stage, 0.0))
        job = _Job(job_id, account, priority, stage, items, next(self._order), now)
        job.vtime = min((other.vtime for other in account.jobs if other.has_pending), default=0.0)
        account.jobs.append(job)
        self._jobs[job_id] = job

    def drop(self, job_id: str) -> None:
        """Forgets a job's pending items (cancel, failure); items in flight finish."""
        if job := self._jobs.get(job_id):
            job.drop_pending()

    def remove(self, job_id: str) -> None:
        """Forgets a finished job entirely."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        job.owner.jobs.remove(job)
        level = self._levels[job.priority]
        if not job.owner.jobs:
            del level.owners[(job.owner.name, job.stage)]
            if not level.owners:
                del self._levels[job.priority]

    def idle(self, job_id: str) -> bool:
        """Whether the job has nothing pending and nothing in flight: it can end."""
        job = self._jobs[job_id]
        return not job.has_pending and job.in_flight == 0

    def stop(self) -> None:
        """Drain: nothing new starts; batches in flight finish."""
        self._stopped = True

    # -- decisions ---------------------------------------------------------------------------------

    def schedule(self, now: float) -> list[Batch]:
        """Every batch that should start now, each on a replica with room."""
        decisions = []
        self._window_ends = None
        self._now = now
        if self._stopped:
            return decisions
        for stage, replicas in self._replicas.items():
            while any(replica.has_room for replica in replicas):
                batch = self._next_batch(stage, now)
                if batch is None:
                    break
                decisions.append(batch)
        return decisions

    def _next_batch(self, stage: str, now: float) -> Batch | None:
        pinned = self._pinned.get(stage)
        if pinned:
            batch = pinned.pop(0)
            batch.replica = self._place(stage, batch.model).index
            self._replicas[stage][batch.replica].in_flight += 1
            return batch
        for priority in sorted(self._levels, reverse=True):
            level = self._levels[priority]
            first = self._fairest(level, stage, now, key=None)
            if first is None:
                continue
            head = first.peek(now)
            shape = self._shape(stage, head)
            if self._waits(level, stage, now, first, head, shape):
                return None
            items = self._fill(level, stage, now, head, shape)
            replica = self._place(stage, head.model)
            replica.in_flight += 1
            return Batch(stage, replica.index, head.model, items, shape)
        return None

    def _shape(self, stage: str, head: Item) -> int:
        return head.shape or self._shapes[stage]

    def _waits(self, level: _Level, stage: str, now: float, first: _Job, head: Item, shape: int) -> bool:
        """Whether a short batch of newly arrived items should wait a little for companions."""
        ends = first.arrived + self._batch_wait_s
        if shape == 1 or now >= ends or head.failures or head.waiting_since is not None:
            return False
        available = 0
        for owner in level.owners.values():
            for job in owner.jobs:
                if job.stage == stage:
                    available += job.run_length(now, head.key, shape - available)
                    if available >= shape:
                        return False
        self._window_ends = ends if self._window_ends is None else min(self._window_ends, ends)
        return True

    def _fairest(self, level: _Level, stage: str, now: float, key) -> _Job | None:
        """The ready job of `stage` whose owner, then whose own share, is served least; `key` restricts
        the choice to jobs whose next item has that key."""
        best, best_rank = None, None
        for owner in level.owners.values():
            for job in owner.jobs:
                if job.stage != stage:
                    continue
                item = job.peek(now)
                if item is None or (key is not None and item.key != key):
                    continue
                rank = (owner.vtime, job.vtime, job.order)
                if best_rank is None or rank < best_rank:
                    best, best_rank = job, rank
        return best

    def _fill(self, level: _Level, stage: str, now: float, head: Item, shape: int) -> list[Item]:
        items: list[Item] = []
        while len(items) < shape and (job := self._fairest(level, stage, now, head.key)) is not None:
            self._charge(level, job)
            items.append(job.take(now))
        return items

    @staticmethod
    def _charge(level: _Level, job: _Job) -> None:
        level.clock[job.stage] = max(level.clock.get(job.stage, 0.0), job.owner.vtime)
        job.owner.vtime += 1 / job.owner.weight
        job.vtime += 1

    def _place(self, stage: str, model: str) -> _Replica:
        """A replica with room, the cheapest by batches ahead of this one: one holding `model` costs its batches
        in flight; one holding no model yet, half a batch more (it loads once, and an idle replica should not
        wait while another queues); one holding only other models, a whole replica's capacity more (models
        swap only when no replica that holds the model, or none that is empty, has room)."""
        with_room = [replica for replica in self._replicas[stage] if replica.has_room]

        def cost(replica: _Replica) -> tuple[float, int]:
            if model in replica.models:
                extra = 0.0
            elif not replica.models:
                extra = 0.5
            else:
                extra = replica.capacity
            return replica.in_flight + extra, replica.index

        replica = min(with_room or self._replicas[stage], key=cost)
        self._note_model(replica, model)
        return replica

    def _note_model(self, replica: _Replica, model: str) -> None:
        if model not in replica.models:
            self._model_loads[replica.stage] = self._model_loads.get(replica.stage, 0) + 1
        replica.models[model] = None
        replica.models.move_to_end(model)
        while len(replica.models) > self._models_per_replica:
            replica.models.popitem(last=False)

    def pick(self, stage: str, model: str) -> int:
        """A replica for a follow-on call (a decode after a denoise): counted in flight until released."""
        replica = self._place(stage, model)
        replica.in_flight += 1
        return replica.index

    def release(self, stage: str, replica: int) -> None:
        """A replica's call ended: it has room again."""
        self._replicas[stage][replica].in_flight -= 1

    # -- outcomes ------------------------------------------------------------------------------------

    def finished(self, items: list[Item]) -> None:
        """Items whose results are recorded (or who are abandoned with their job)."""
        for item in items:
            if job := self._jobs.get(item.job):
                job.in_flight -= 1

    def retry(self, items: list[Item], ready_at: float) -> None:
        """Items to run again, no sooner than `ready_at`; each runs alone."""
        for item in items:
            job = self._jobs.get(item.job)
            if job is None:
                continue
            job.in_flight -= 1
            if job.dropped:
                continue
            # A key of its own: the item runs alone (padded to the same shape, so its pixels
            # do not change), and a poison item cannot spend its batch-mates' attempts.
            item.key = (item.key, "alone", next(self._order))
            item.ready_at = ready_at
            job.push_retry(item, next(self._order))

    def split(self, batch: Batch) -> None:
        """A batch that ran out of memory runs again as two halves, each at half the shape, first on its stage
        (a batch of one item: that item, at half the shape).

        Its items stay in flight; the engine releases the batch's replica as for any batch."""
        middle = (len(batch.items) + 1) // 2
        shape = (batch.shape + 1) // 2
        halves = [
            Batch(batch.stage, -1, batch.model, part, shape)
            for part in (batch.items[:middle], batch.items[middle:])
            if part
        ]
        self._pinned.setdefault(batch.stage, []).extend(halves)

    def next_wake_at(self) -> float | None:
        """When the soonest waiting retry becomes ready, or a waiting short batch stops waiting: call
        schedule() again then. Never a time the last schedule() already saw: what was ready then and did
        not start waits for a slot, and asking for a past time would wake the engine over and over."""
        times = [t for job in self._jobs.values() if (t := job.next_retry_at) is not None and t > self._now]
        if self._window_ends is not None:
            times.append(self._window_ends)
        return min(times, default=None)
