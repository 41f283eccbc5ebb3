"""The scheduler core, driven as the engine drives it, with fake replicas and a fake clock (no Ray).

`Farm` plays the engine: it calls schedule(now), keeps the batches in flight on fake replicas
(each with its own least-recently-used model cache, as a real replica evicts), completes them
with release() + finished(), and advances the clock. Every dispatch is checked against the
invariants users rely on (a valid replica, never over capacity, one key and one priority level
per batch, the stage's shape), whatever the test is about.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import pytest

from renderfarm.cluster.scheduler import Batch, Item, Scheduler

D = "denoiser"
U = "upscaler"


def items(job: str, count: int, *, model: str = "m", key=None, start: int = 0):
    """A job's lazy items: specs are plain ints."""
    return (Item(job, spec=i, model=model, key=key if key is not None else model) for i in range(start, start + count))


class Farm:
    def __init__(self, shapes=None, replicas=None, *, models_per_replica=2, batch_wait_s=0.0):
        self.shapes = shapes or {D: 4}
        self.sched = Scheduler(self.shapes, models_per_replica, batch_wait_s)
        self.models_per_replica = models_per_replica
        self.now = 0.0
        self.capacity: dict[str, list[int]] = {}
        for stage, (count, capacity) in (replicas or {D: (1, 1)}).items():
            self.add_replicas(stage, count, capacity)
        # (stage, index) -> the batches running there, oldest first.
        self.running: dict[tuple[str, int], list[Batch]] = {}
        # (stage, index) -> the models the fake replica holds, least recently used first.
        self.held: dict[tuple[str, int], OrderedDict] = {}
        self.loads = Counter()
        self.dispatched: list[Batch] = []
        self.priority: dict[str, int] = {}
        self.owner: dict[str, str] = {}

    def add_replicas(self, stage, count, capacity):
        self.sched.add_replicas(stage, count, capacity)
        self.capacity.setdefault(stage, []).extend([capacity] * count)

    def add(self, job, count=None, *, source=None, stage=D, priority=0, owner=None, weight=1.0, **kw):
        self.priority[job] = priority
        self.owner[job] = owner if owner is not None else job
        source = source if source is not None else items(job, count, **kw)
        self.sched.add_job(job, stage, source, self.now, priority=priority, owner=owner, weight=weight)

    # -- the engine's half -------------------------------------------------------------------------

    def schedule(self) -> list[Batch]:
        batches = self.sched.schedule(self.now)
        for batch in batches:
            self._check(batch)
            self.running.setdefault((batch.stage, batch.replica), []).append(batch)
            self.dispatched.append(batch)
        return batches

    def _check(self, batch: Batch) -> None:
        assert 0 <= batch.replica < len(self.capacity[batch.stage]), f"no replica {batch.replica}"
        running = self.running.get((batch.stage, batch.replica), [])
        assert len(running) < self.capacity[batch.stage][batch.replica], "a replica over its capacity"
        assert batch.items, "an empty batch"
        assert batch.shape == self.shapes[batch.stage] or batch.shape < self.shapes[batch.stage]  # halves
        assert len(batch.items) <= batch.shape
        assert len({item.key for item in batch.items}) == 1, "a batch mixes keys"
        assert {item.model for item in batch.items} == {batch.model}
        assert len({self.priority[item.job] for item in batch.items}) == 1, "a batch mixes priority levels"
        # The fake replica loads the model unless it holds it, evicting its least recently used.
        held = self.held.setdefault((batch.stage, batch.replica), OrderedDict())
        if batch.model not in held:
            self.loads[(batch.stage, batch.replica)] += 1
        held[batch.model] = None
        held.move_to_end(batch.model)
        while len(held) > self.models_per_replica:
            held.popitem(last=False)

    def complete(self, batch: Batch) -> None:
        self.running[(batch.stage, batch.replica)].remove(batch)
        self.sched.release(batch.stage, batch.replica)
        self.sched.finished(batch.items)

    def fail(self, batch: Batch, ready_at: float) -> None:
        self.running[(batch.stage, batch.replica)].remove(batch)
        self.sched.release(batch.stage, batch.replica)
        for item in batch.items:
            item.failures += 1
        self.sched.retry(batch.items, ready_at)

    def in_flight(self) -> list[Batch]:
        return [batch for batches in self.running.values() for batch in batches]

    def complete_all(self) -> None:
        for batch in self.in_flight():
            self.complete(batch)

    def complete_oldest(self) -> None:
        oldest = min(self.in_flight(), key=self.dispatched.index)
        self.complete(oldest)

    def step(self, dt=1.0) -> list[Batch]:
        """One turn of the loop: the oldest batch in flight ends, the clock moves, schedule again."""
        if self.in_flight():
            self.complete_oldest()
        self.now += dt
        return self.schedule()

    def run_until(self, images: int, stage=D) -> list[Batch]:
        """Steps until at least `images` images of `stage` were dispatched; returns the batches up to there."""
        start = len(self.dispatched)
        self.schedule()
        while sum(len(b.items) for b in self.dispatched[start:] if b.stage == stage) < images:
            before = len(self.dispatched)
            self.step()
            assert len(self.dispatched) > before or self.in_flight(), "the farm stalled"
        batches, total = [], 0
        for batch in self.dispatched[start:]:
            if batch.stage != stage:
                continue
            if total >= images:
                break
            batches.append(batch)
            total += len(batch.items)
        return batches


def count(batches, by) -> Counter:
    return Counter(by(item) for batch in batches for item in batch.items)


def core_models(farm: Farm, stage: str, index: int) -> list[str]:
    """The models the core believes a replica holds, least recently used first."""
    return farm.sched.models(stage, index)


# -- 1. priorities ---------------------------------------------------------------------------------


def test_a_higher_level_gets_every_slot_before_the_lower_level_continues():
    farm = Farm({D: 4}, {D: (2, 1)})
    farm.add("low", 100, model="m", key="k")
    assert len(farm.schedule()) == 2
    farm.add("high", 20, priority=1, model="m", key="k")  # the same key: still never batched together
    after = len(farm.dispatched)
    while count(farm.dispatched[after:], lambda i: i.job)["high"] < 20:
        farm.step()
    jobs = count(farm.dispatched[after:], lambda i: i.job)
    assert jobs == {"high": 20}, "a level-0 item was dispatched while the level-1 job had items ready"
    # Then level 0 goes on, to its end.
    while farm.schedule() or farm.in_flight():
        farm.complete_oldest()
    assert count(farm.dispatched, lambda i: i.job)["low"] == 100


def test_priority_levels_are_strict_across_many_levels():
    farm = Farm({D: 4}, {D: (1, 1)})
    for level in (0, 2, 1):
        farm.add(f"p{level}", 8, priority=level, key="k")
    batches = farm.run_until(24)
    levels = [farm.priority[b.items[0].job] for b in batches]
    assert levels == sorted(levels, reverse=True)


# -- 2. fair share ---------------------------------------------------------------------------------


@pytest.mark.parametrize("same_key", [True, False], ids=["one-key", "two-keys"])
def test_two_owners_of_equal_weight_share_images_evenly(same_key):
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("a-job", 10**6, owner="alice", model="m", key="k" if same_key else "ka")
    farm.add("b-job", 10**6, owner="bob", model="m", key="k" if same_key else "kb")
    per_owner = count(farm.run_until(1000), lambda i: farm.owner[i.job])
    assert abs(per_owner["alice"] - per_owner["bob"]) <= 0.1 * max(per_owner.values()), per_owner


def test_owners_weighted_two_to_one_get_two_to_one():
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("a-job", 10**6, owner="alice", weight=2.0, key="ka")
    farm.add("b-job", 10**6, owner="bob", weight=1.0, key="kb")
    per_owner = count(farm.run_until(1200), lambda i: farm.owner[i.job])
    assert per_owner["alice"] / per_owner["bob"] == pytest.approx(2.0, rel=0.1), per_owner


def test_an_owners_two_jobs_share_that_owners_part():
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("x1", 10**6, owner="x", key="k1")
    farm.add("x2", 10**6, owner="x", key="k2")
    farm.add("y1", 10**6, owner="y", key="k3")
    per_job = count(farm.run_until(1200), lambda i: i.job)
    assert per_job["y1"] == pytest.approx(600, rel=0.1), per_job
    assert per_job["x1"] + per_job["x2"] == pytest.approx(600, rel=0.1), per_job
    assert per_job["x1"] == pytest.approx(per_job["x2"], rel=0.1), per_job


def test_each_job_is_its_own_owner_by_default():
    farm = Farm({D: 4}, {D: (2, 2)})
    for name in ("j1", "j2", "j3"):
        farm.add(name, 10**6, key=name)
    per_job = count(farm.run_until(1200), lambda i: i.job)
    for name in ("j1", "j2", "j3"):
        assert per_job[name] == pytest.approx(400, rel=0.1), per_job


def test_an_owner_that_idled_earns_no_credit():
    farm = Farm({D: 4}, {D: (1, 1)})
    farm.add("big", 10**6, owner="a", key="k")
    farm.run_until(400)
    farm.add("late", 10**6, owner="b", key="k")
    start = len(farm.dispatched)
    farm.run_until(400)
    per_owner = count(farm.dispatched[start:], lambda i: farm.owner[i.job])
    # Not 400 images of "b" first to make up for the time before it came.
    assert per_owner["b"] == pytest.approx(per_owner["a"], rel=0.1), per_owner


# -- 3. a small job behind a huge one --------------------------------------------------------------


@pytest.mark.parametrize("same_key", [True, False], ids=["same-key", "other-key"])
def test_a_small_job_starts_with_the_next_batch(same_key):
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("huge", 10**6, key="k")
    farm.run_until(2000)
    farm.add("small", 3, key="k" if same_key else "other")
    batches = []
    while not batches:
        batches = farm.step()
    assert count(batches[:1], lambda i: i.job)["small"] == 3  # the first batch dispatched after it came


def test_a_small_job_on_a_quiet_stage_is_not_held_back_by_a_busy_stage():
    """Fair share at a level is per stage: images served on one stage earn no place in another's queue."""
    farm = Farm({D: 4, U: 1}, {D: (1, 1), U: (1, 1)})
    farm.add("sweep", 10**6, stage=D, key="k")
    farm.add("upscale-1", 10**6, stage=U, model="up", key="up")
    for _ in range(300):  # 4 denoised images a turn, 1 upscaled
        for batch in farm.in_flight():
            farm.complete(batch)
        farm.now += 1
        farm.schedule()
    farm.add("upscale-2", 1, stage=U, model="up", key="up")
    farm.complete_all()
    farm.now += 1
    upscales = [b for b in farm.schedule() if b.stage == U]
    assert [item.job for b in upscales for item in b.items] == ["upscale-2"]


# -- 4. cross-job batches --------------------------------------------------------------------------


def test_sixteen_one_image_jobs_go_out_in_one_batch():
    farm = Farm({D: 16}, {D: (1, 1)})
    for n in range(16):
        farm.add(f"job-{n}", 1, key="k")
    batches = farm.schedule()
    assert len(batches) == 1
    assert len(batches[0].items) == 16
    assert {item.job for item in batches[0].items} == {f"job-{n}" for n in range(16)}
    assert batches[0].shape == 16


def test_items_with_different_keys_never_share_a_batch_and_the_shape_is_fixed():
    rng = random.Random(7)
    farm = Farm({D: 16}, {D: (2, 2)})
    for n in range(40):
        key = rng.choice(["k1", "k2", "k3"])
        farm.add(f"job-{n}", rng.randint(1, 30), model=f"model-{key}", key=key)
    while farm.schedule() or farm.in_flight():
        farm.complete_oldest()
        farm.now += 1
    assert all(len({item.key for item in b.items}) == 1 for b in farm.dispatched)  # checked per dispatch too
    assert all(b.shape == 16 for b in farm.dispatched)
    assert any(len(b.items) < 16 for b in farm.dispatched), "the test wants short batches"
    # Every item went out once.
    seen = [(item.job, item.spec) for b in farm.dispatched for item in b.items]
    assert len(seen) == len(set(seen))
    assert all(farm.sched.idle(f"job-{n}") for n in range(40))


def test_one_key_across_jobs_fills_batches():
    farm = Farm({D: 8}, {D: (1, 1)})
    for n in range(5):
        farm.add(f"job-{n}", 3, key="k")  # 15 items: a batch of 8, then 7
    batches = farm.schedule()
    farm.complete_all()
    batches += farm.schedule()
    assert [len(b.items) for b in batches] == [8, 7]


# -- 5. the batch window ---------------------------------------------------------------------------


def test_a_lone_new_item_waits_for_the_window():
    farm = Farm({D: 16}, {D: (1, 1)}, batch_wait_s=0.05)
    farm.now = 10.0
    farm.add("lone", 1, key="k")
    assert farm.schedule() == []
    ends = farm.sched.next_wake_at()
    assert ends == pytest.approx(10.05)
    farm.now = 10.04
    assert farm.schedule() == []
    assert farm.sched.next_wake_at() == pytest.approx(10.05)
    farm.now = ends
    batches = farm.schedule()
    assert [len(b.items) for b in batches] == [1]
    assert farm.sched.next_wake_at() is None


def test_an_item_arriving_within_the_window_joins_the_batch():
    farm = Farm({D: 16}, {D: (1, 1)}, batch_wait_s=0.05)
    farm.add("first", 1, key="k")
    farm.now = 0.03
    farm.add("second", 1, key="k")
    assert farm.schedule() == []
    farm.now = 0.06
    batches = farm.schedule()
    assert len(batches) == 1 and {item.job for item in batches[0].items} == {"first", "second"}


def test_a_full_batch_goes_at_once():
    farm = Farm({D: 16}, {D: (1, 1)}, batch_wait_s=0.05)
    for n in range(16):
        farm.add(f"job-{n}", 1, key="k")
    assert [len(b.items) for b in farm.schedule()] == [16]


def test_without_a_window_a_lone_item_goes_at_once():
    farm = Farm({D: 16}, {D: (1, 1)}, batch_wait_s=0.0)
    farm.add("lone", 1, key="k")
    assert [len(b.items) for b in farm.schedule()] == [1]


# -- 6. model affinity -----------------------------------------------------------------------------


def test_batches_go_where_their_model_is():
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("a", 10**6, model="A")
    farm.add("b", 10**6, model="B")
    for _ in range(50):
        farm.schedule()
        farm.complete_all()
        farm.now += 1
    replica_of = {}
    for batch in farm.dispatched:
        replica_of.setdefault(batch.model, batch.replica)
        assert batch.replica == replica_of[batch.model], f"model {batch.model} moved"
    assert replica_of["A"] != replica_of["B"]
    assert sum(farm.loads.values()) == 2


def test_the_cores_model_view_matches_the_replicas_lru():
    rng = random.Random(3)
    farm = Farm({D: 2}, {D: (2, 2)}, models_per_replica=2)
    models = ["A", "B", "C", "D"]
    for n in range(30):
        model = rng.choice(models)
        farm.add(f"job-{n}", rng.randint(1, 6), model=model)
    while farm.schedule() or farm.in_flight():
        for index in range(2):
            assert core_models(farm, D, index) == list(farm.held.get((D, index), {}))
            assert len(core_models(farm, D, index)) <= 2
        # What the metrics report as model loads is what the replicas loaded.
        assert farm.sched.model_loads().get(D, 0) == sum(farm.loads.values())
        # Complete batches in a random order.
        farm.complete(rng.choice(farm.in_flight()))
        farm.now += 1


@pytest.mark.parametrize("restarted", [False, True])
def test_forget_models_makes_a_replica_load_again(restarted):
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("a1", 4, model="A")
    [first] = farm.schedule()
    farm.add("b1", 4, model="B")
    [other] = farm.schedule()
    assert (first.replica, other.replica) == (0, 1)  # the idle empty replica takes B rather than queue it
    if restarted:
        farm.sched.forget_models(D, 0)
        farm.held[(D, 0)].clear()
        assert core_models(farm, D, 0) == []
    farm.add("a2", 4, model="A")
    [second] = farm.schedule()
    # Replica 0 has room and holds A (or, restarted, nothing); replica 1 holds B: no swap either way.
    assert second.replica == 0
    assert sum(farm.loads.values()) == (3 if restarted else 2)


# -- 7. load-aware ---------------------------------------------------------------------------------


def test_replicas_never_exceed_capacity_and_every_index_is_real():
    rng = random.Random(11)
    farm = Farm({D: 4, U: 1}, {D: (3, 2), U: (2, 1)})
    farm.add_replicas(D, 2, 1)  # a second pool joins: indices go on from 3
    assert farm.sched.replica_count(D) == 5
    for n in range(20):
        farm.add(f"d-{n}", rng.randint(1, 40), model=rng.choice("ABC"), priority=rng.randint(0, 1))
        farm.add(f"u-{n}", rng.randint(1, 5), stage=U, model="up")
    while farm.schedule() or farm.in_flight():  # capacity and indices are checked on each dispatch
        farm.complete(rng.choice(farm.in_flight()))
        farm.now += 1
    assert {b.replica for b in farm.dispatched if b.stage == D} == set(range(5))
    assert {b.replica for b in farm.dispatched if b.stage == U} == {0, 1}


def test_a_free_replica_is_chosen_over_a_busy_one():
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.sched.pick(D, "X")  # replica 0 is busy with a follow-on call
    farm.add("c", 4, model="C")
    [batch] = farm.schedule()
    assert batch.replica == 1


def test_with_the_model_everywhere_the_least_loaded_replica_gets_the_batch():
    farm = Farm({D: 4}, {D: (3, 2)})
    farm.add("a", 10**6, model="A")
    farm.schedule()  # fills every slot: every replica holds A
    farm.complete_all()
    assert all(core_models(farm, D, index) == ["A"] for index in range(3))
    farm.sched.pick(D, "A")  # replica 0 busy
    farm.now += 1
    first, second = farm.schedule()[:2]
    assert {first.replica, second.replica} == {1, 2}, "a batch queued on the busy replica while others idled"


def test_pick_holds_a_slot_until_released():
    farm = Farm({D: 4}, {D: (1, 1)})
    farm.add("a", 8)
    index = farm.sched.pick(D, "m")
    assert farm.schedule() == []
    farm.sched.release(D, index)
    assert len(farm.schedule()) == 1


# -- 8. no starvation within a level ---------------------------------------------------------------


@pytest.mark.parametrize("same_key", [True, False], ids=["one-key", "own-keys"])
def test_every_job_at_a_level_is_served_soon(same_key):
    jobs = 25
    farm = Farm({D: 4}, {D: (1, 1)})
    for n in range(jobs):
        farm.add(f"job-{n}", 1000, key="k" if same_key else f"k{n}")
    bound = -(-jobs // 4) if same_key else jobs
    batches = farm.run_until(bound * 4)[:bound]
    assert {item.job for b in batches for item in b.items} == {f"job-{n}" for n in range(jobs)}


def test_jobs_added_over_time_are_all_served():
    rng = random.Random(5)
    farm = Farm({D: 4}, {D: (2, 2)})
    added = {}
    for turn in range(400):
        if turn % 10 == 0:
            name = f"job-{turn}"
            farm.add(name, 10**6, key=rng.choice(["k1", "k2", f"own-{turn}"]))
            added[name] = len(farm.dispatched)
        farm.step()
    for _ in range(200):
        farm.step()
    active = len(added)
    for name, since in added.items():
        later = farm.dispatched[since : since + 2 * active + 4]
        assert any(item.job == name for b in later for item in b.items), f"{name} starved"


# -- 9. cancel -------------------------------------------------------------------------------------


def test_drop_forgets_pending_items_and_in_flight_ones_finish():
    farm = Farm({D: 4}, {D: (2, 1)})
    farm.add("victim", 100, key="k")
    farm.add("other", 100, key="k2")
    farm.schedule()
    running = [b for b in farm.in_flight() if b.items[0].job == "victim"]
    assert running
    farm.sched.drop("victim")
    assert not farm.sched.idle("victim")
    farm.complete_all()
    assert farm.sched.idle("victim")
    before = count(farm.dispatched, lambda i: i.job)["victim"]
    while farm.schedule() or farm.in_flight():
        farm.complete_all()
        farm.now += 1
    jobs = count(farm.dispatched, lambda i: i.job)
    assert jobs["victim"] == before < 100
    assert jobs["other"] == 100
    farm.sched.remove("victim")
    with pytest.raises(KeyError):
        farm.sched.idle("victim")  # forgotten entirely


def test_idle_turns_true_only_when_the_last_in_flight_item_finishes():
    farm = Farm({D: 4}, {D: (2, 1)})
    farm.add("job", 8)
    first, second = farm.schedule()
    assert not farm.sched.idle("job")
    farm.complete(first)
    assert not farm.sched.idle("job")
    farm.complete(second)
    assert farm.sched.idle("job")


# -- 10. drain -------------------------------------------------------------------------------------


def test_after_stop_nothing_starts_but_in_flight_finishes():
    farm = Farm({D: 4}, {D: (2, 2)})
    farm.add("job", 16)
    assert len(farm.schedule()) == 4
    farm.add("other", 100)
    farm.sched.stop()
    farm.complete(farm.in_flight()[0])
    farm.now += 1
    assert farm.schedule() == []
    farm.complete_all()  # the rest in flight still finish
    farm.add("new", 4)
    assert farm.schedule() == []
    assert farm.sched.idle("job")  # its 16 items all went out before the stop and finished
    assert not farm.sched.idle("other")


# -- 11. retries -----------------------------------------------------------------------------------


def test_a_retried_item_runs_alone_no_earlier_than_ready_at():
    farm = Farm({D: 4}, {D: (1, 4)})
    farm.add("job", 8, key="k")
    first, second = farm.schedule()
    farm.fail(first, ready_at=5.0)
    farm.complete(second)
    assert farm.sched.next_wake_at() == 5.0
    assert not farm.sched.idle("job")
    farm.now = 4.9
    assert farm.schedule() == []
    farm.now = 5.0
    batches = farm.schedule()
    assert [len(b.items) for b in batches] == [1, 1, 1, 1]
    assert all(b.shape == 4 for b in batches)  # padded: the same pixels as in a full batch
    assert sorted(b.items[0].spec for b in batches) == sorted(item.spec for item in first.items)
    farm.complete_all()
    assert farm.sched.idle("job")


def test_a_retry_runs_alone_even_beside_fresh_items_of_its_key():
    farm = Farm({D: 4}, {D: (1, 1)})
    farm.add("job", 100, key="k")
    [batch] = farm.schedule()
    farm.fail(batch, ready_at=1.0)
    farm.add("other", 100, key="k")
    farm.now = 1.0
    for _ in range(40):
        farm.schedule()
        farm.complete_all()
        farm.now += 1
    retried = {id(item) for item in batch.items}
    for b in farm.dispatched[1:]:
        if any(id(item) in retried for item in b.items):
            assert len(b.items) == 1
    assert sum(1 for b in farm.dispatched[1:] for item in b.items if id(item) in retried) == 4


def test_a_dropped_jobs_retries_are_discarded():
    farm = Farm({D: 4}, {D: (1, 2)})
    farm.add("job", 8)
    first, second = farm.schedule()
    farm.fail(first, ready_at=2.0)  # queued, then the job is cancelled
    farm.sched.drop("job")
    farm.fail(second, ready_at=2.0)  # failed after the cancel
    assert farm.sched.next_wake_at() is None
    farm.now = 3.0
    assert farm.schedule() == []
    assert farm.sched.idle("job")


def test_next_wake_at_is_the_soonest_retry():
    farm = Farm({D: 1}, {D: (1, 3)})
    farm.add("a", 1)
    farm.add("b", 1)
    farm.add("c", 1)
    batches = {b.items[0].job: b for b in farm.schedule()}
    farm.fail(batches["a"], ready_at=7.0)
    farm.fail(batches["b"], ready_at=3.0)
    farm.fail(batches["c"], ready_at=5.0)
    assert farm.sched.next_wake_at() == 3.0
    farm.now = 3.0
    assert [b.items[0].job for b in farm.schedule()] == ["b"]
    assert farm.sched.next_wake_at() == 5.0


def test_a_ready_retry_waiting_for_a_slot_does_not_ask_to_be_woken_now():
    """The engine arms a timer at next_wake_at(); a time already past fires at once, and again, a busy loop
    for as long as no slot frees. A freed slot pumps the engine anyway."""
    farm = Farm({D: 4}, {D: (1, 2)})
    farm.add("job", 4, key="k")
    [batch] = farm.schedule()
    farm.fail(batch, ready_at=5.0)
    farm.add("big", 10**6, key="k2", priority=1)
    farm.now = 1.0
    assert len(farm.schedule()) == 2  # the replica is full
    farm.now = 6.0
    assert farm.schedule() == []
    wake = farm.sched.next_wake_at()
    assert wake is None or wake > farm.now, f"asked to be woken at {wake}, at {farm.now}, with nothing to start"
    farm.sched.drop("big")  # the higher level is cancelled; its batches end and free the slots
    farm.complete_all()
    assert [[item.job for item in b.items] for b in farm.schedule()] == [["job"], ["job"]]


def test_a_ready_retry_behind_a_waiting_window_wakes_at_the_windows_end():
    farm = Farm({D: 4}, {D: (1, 2)}, batch_wait_s=0.5)
    farm.add("job", 4, key="k")
    [batch] = farm.schedule()  # a full batch: no wait
    farm.fail(batch, ready_at=5.0)
    farm.now = 5.9
    farm.add("urgent", 1, key="k2", priority=1)  # a lone new item at a higher level: it waits
    assert farm.schedule() == []
    assert farm.sched.next_wake_at() == pytest.approx(6.4)
    farm.now = 6.4
    assert [b.items[0].job for b in farm.schedule()] == ["urgent", "job"]


# -- 12. split -------------------------------------------------------------------------------------


def test_an_oom_batch_comes_back_as_two_halves_first_on_its_stage():
    farm = Farm({D: 8}, {D: (1, 1)})
    farm.add("job", 8, key="k")
    [batch] = farm.schedule()
    farm.add("urgent", 100, key="k", priority=5)
    # The engine: split, then release the replica; the items stay in flight.
    farm.running[(D, 0)].remove(batch)
    farm.sched.split(batch)
    farm.sched.release(D, 0)
    assert not farm.sched.idle("job")
    [half1] = farm.schedule()
    farm.complete(half1)
    [half2] = farm.schedule()
    assert half1.shape == half2.shape == 4
    assert half1.items == batch.items[:4] and half2.items == batch.items[4:]
    assert farm.sched.idle("job") is False
    farm.complete(half2)
    assert farm.sched.idle("job")
    [after] = farm.schedule()
    assert after.items[0].job == "urgent"


def test_an_odd_batch_splits_into_unequal_halves():
    farm = Farm({D: 4}, {D: (1, 2)})
    farm.add("job", 3)
    [batch] = farm.schedule()
    farm.running[(D, 0)].remove(batch)
    farm.sched.split(batch)
    farm.sched.release(D, 0)
    halves = farm.schedule()
    assert [len(h.items) for h in halves] == [2, 1]
    assert all(h.shape == 2 for h in halves)


def test_a_lone_item_out_of_memory_comes_back_alone_at_half_the_shape():
    farm = Farm({D: 8}, {D: (1, 1)})
    farm.add("job", 1)
    [batch] = farm.schedule()
    assert batch.shape == 8
    farm.running[(D, 0)].remove(batch)
    farm.sched.split(batch)
    farm.sched.release(D, 0)
    [half] = farm.schedule()
    assert half.items == batch.items and half.shape == 4


# -- 13. laziness ------------------------------------------------------------------------------------


def counting_source(job: str, total: int, *, key="k"):
    consumed = [0]

    def make(n):
        consumed[0] += 1
        return Item(job, spec=n, model="m", key=key)

    return map(make, itertools.islice(itertools.count(), total)), consumed


@pytest.mark.parametrize("batch_wait_s", [0.0, 0.05])
def test_a_billion_item_job_is_read_only_a_batch_ahead(batch_wait_s):
    shape = 16
    farm = Farm({D: shape}, {D: (2, 2)}, batch_wait_s=batch_wait_s)
    source, consumed = counting_source("huge", 10**9)
    farm.add("huge", source=source)
    assert consumed[0] <= shape + 1
    others = []
    for n in range(5):
        src, c = counting_source(f"small-{n}", 10**9, key=f"k{n}")
        farm.add(f"small-{n}", source=src)
        others.append(c)
    for _ in range(50):
        farm.step(dt=0.01)
        dispatched = count(farm.dispatched, lambda i: i.job)
        assert consumed[0] <= dispatched["huge"] + shape + 1
        for n, c in enumerate(others):
            assert c[0] <= dispatched[f"small-{n}"] + shape + 1
    assert count(farm.dispatched, lambda i: i.job)["huge"] > 0


# -- 14. purity ------------------------------------------------------------------------------------

HEAVY = ("ray", "torch", "grpc")


def _imports_in_a_fresh_interpreter(code: str) -> list[str]:
    probe = code + f"\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_scheduler_module_imports_no_ray_torch_or_grpc():
    path = Path(__file__).resolve().parents[2] / "cluster" / "scheduler.py"
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('scheduler_alone', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "import sys; sys.modules['scheduler_alone'] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.Scheduler({'d': 1}, 1)\n"
    )
    assert _imports_in_a_fresh_interpreter(code) == []


def test_importing_renderfarm_cluster_scheduler_pulls_no_ray_or_torch():
    # `renderfarm` itself is the thin SDK and imports grpc (renderfarm/__init__ -> client); the scheduler
    # adds neither ray nor torch to that.
    found = _imports_in_a_fresh_interpreter("import renderfarm.cluster.scheduler")
    assert "ray" not in found and "torch" not in found, found


def test_an_items_own_shape_sets_its_batches_shape_and_keeps_keys_apart():
    farm = Farm({D: 8}, {D: (1, 4)})
    large = (Item("large", spec=n, model="m", key="1024px", shape=2) for n in range(5))
    farm.add("large", source=large)
    farm.add("small", 3, key="64px")
    batches = farm.schedule()
    assert [(b.shape, len(b.items), {i.key for i in b.items}) for b in batches] == [
        (2, 2, {"1024px"}), (8, 3, {"64px"}), (2, 2, {"1024px"}), (2, 1, {"1024px"}),
    ]  # fmt: skip
