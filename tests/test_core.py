"""engine/core alone: the failure policy, the turn of maps and output order, with a fake transport.

No process and no backend: a fake transport holds chunks as a worker would,
and the test plays what its workers do (die, answer, fail to decode), so the
policy every backend applies is checked once, by itself.
"""
from __future__ import annotations

import itertools
import types

from poolmagic.engine.core.failures import FailurePolicy
from poolmagic.engine.core.inflight import Chunk
from poolmagic.engine.core.items import ItemSource
from poolmagic.engine.core.job import Job
from poolmagic.engine.core.output import OutputOrder
from poolmagic.engine.core.schedule import WINDOW, RoundRobin, chunk_size, timed
from poolmagic.engine.core.transport import CAPABILITIES, Transport
from poolmagic.engine.mapoptions import MapOptions
from poolmagic.errors import ItemPicklingError, WorkerCrashedError
from poolmagic.report import RunReport
from poolmagic.sentinel import NOT_DONE


def make_job(items=range(6), **options) -> Job:
    return Job(types.SimpleNamespace(key="k"), ItemSource(items), RunReport(), MapOptions(**options), None, abs)


class FakeTransport:
    """Workers 0..n-1 that hold chunks and do nothing with them until the test says."""

    lacks = frozenset()

    def __init__(self, n: int = 2):
        self.held: dict[int, list[Chunk]] = {w: [] for w in range(n)}
        self.stopped: list[int] = []
        self.seq = itertools.count()

    def start_workers(self) -> None:
        pass

    def stop_workers(self) -> None:
        self.held = {w: [] for w in self.held}

    def capacity(self) -> list[int]:
        return sorted((w for w, cs in self.held.items() if len(cs) < WINDOW), key=lambda w: len(self.held[w]))

    def send(self, worker: int, chunk: Chunk) -> bool:
        self.held[worker].append(chunk)
        return True

    def events(self, timeout):
        return []

    def stop_worker(self, worker: int) -> None:
        self.stopped.append(worker)
        self.held[worker] = []

    def status(self) -> str:
        return f"{len(self.held)} fake workers"

    def schedule(self, jobs: list[Job], turns: RoundRobin, size: int = 2) -> None:
        """What a manager does each turn: fill every window, maps taking turns."""
        for w in self.capacity():
            while len(self.held[w]) < WINDOW:
                job = turns.pick(jobs, w)
                got = job and job.next_items(size)
                if not got:
                    break
                self.send(w, Chunk(next(self.seq), job, *got))


def abandoner(t: FakeTransport):
    def abandon(job: Job) -> None:
        for w, cs in t.held.items():
            if cs and cs[0].job is job:
                t.stop_worker(w)
                for c in cs[1:]:
                    FailurePolicy.give_back(c)
            else:
                for c in cs:
                    c.cancelled = c.cancelled or c.job is job
    return abandon


def test_the_fake_is_a_transport():
    assert isinstance(FakeTransport(), Transport)
    assert set(CAPABILITIES) >= {"kill-on-timeout", "memory-limit"}


def test_a_crash_isolates_a_chunk_of_several_and_fails_only_the_culprit():
    t, job = FakeTransport(1), make_job(range(4))
    policy = FailurePolicy(abandoner(t))
    t.schedule([job], RoundRobin())
    head, behind = t.held[0]
    t.held[0] = []
    policy.give_back(behind)
    policy.worker_lost(head, WorkerCrashedError, "worker 0 died", lambda: WorkerCrashedError("x", head.indices, -9))
    assert job.active and not job.report.errors, "several items: run again one by one, none blamed yet"
    assert [job.next_items(1) for _ in range(2)] == [(0, range(0, 1)), (1, range(1, 2))]
    assert job.next_items(2) == (2, range(2, 4)), "the chunk given back comes next, whole"


def test_a_lost_single_item_fails_and_the_ended_map_is_abandoned():
    t, job = FakeTransport(2), make_job(range(2), chunksize=1)
    policy = FailurePolicy(abandoner(t))
    t.schedule([job], RoundRobin(), size=1)
    lost = t.held[0].pop(0)
    policy.worker_lost(lost, WorkerCrashedError, "died", lambda: WorkerCrashedError("died", lost.indices, -9))
    assert not job.active and isinstance(job.report.errors[0], WorkerCrashedError)
    assert t.stopped == [0], "the worker now running its other item was stopped"


def test_a_chunk_that_does_not_decode_is_split_then_its_item_fails():
    job = make_job(range(3), keep_going=True)
    policy = FailurePolicy(lambda j: None, the_worker="the fake worker")
    start, items = job.next_items(3)
    policy.chunk_failed(Chunk(0, job, start, items), "decode", ValueError("bad"))
    for _ in range(3):
        s, one = job.next_items(1)
        if s == 1:
            policy.chunk_failed(Chunk(1, job, s, one), "decode", ValueError("bad"))
        else:
            job.chunk_done(types.SimpleNamespace(start=s, count=1, t0=0.0, t1=0.0, nbytes=0, status="done"),
                           [s], [], [], one)
    err = job.report.errors[1]
    assert isinstance(err, ItemPicklingError) and "in the fake worker" in str(err)
    assert job.report.results[0] == 0 and job.report.results[2] == 2 and job.report.results[1] is NOT_DONE


def test_a_function_that_does_not_load_fails_the_map_with_a_note():
    abandoned = []
    job = make_job()
    policy = FailurePolicy(abandoned.append, a_worker="a fake worker")
    start, items = job.next_items(2)
    exc = ImportError("no module")
    policy.chunk_failed(Chunk(0, job, start, items), "load", exc)
    assert job.error is exc and abandoned == [job]
    assert "could not be loaded in a fake worker" in "".join(getattr(exc, "__notes__", []))


def test_cancel_runs_on_the_backends_thread_or_here():
    abandoned, queued = [], []
    job = make_job()
    FailurePolicy(abandoned.append).cancel(lambda cmd: queued.append(cmd) or True, job, None, wait=0)
    assert job.active and queued, "handed to the backend's thread, not run here"
    queued[0]()
    assert job.report.status == "cancelled" and abandoned == [job]
    job2 = make_job()
    FailurePolicy(abandoned.append).cancel(lambda cmd: False, job2, RuntimeError("stream"), wait=0)
    assert job2.report.status == "failed" and abandoned[-1] is job2, "no thread: run here"


def test_maps_take_turns_and_a_map_limited_to_w_workers_gets_only_the_first_w():
    a, b = make_job(range(100)), make_job(range(100), workers=1)
    turns = RoundRobin()
    assert [turns.pick([a, b], 0) for _ in range(4)] == [a, b, a, b]
    assert [turns.pick([a, b], 1) for _ in range(3)] == [a, a, a], "b runs on worker 0 only"


def test_chunk_sizes_and_timing():
    assert chunk_size(None, 100, 2) == 1, "a probe first"
    assert chunk_size(0.001, 10_000, 2) == 25, "~25 ms of work"
    assert chunk_size(0.001, 4, 2) == 2, "smaller towards the end: never under 2 ms of work"
    job = make_job()
    assert timed(job), "unknown items are timed"
    job.busy, job.timed_items = 1e-7, 100
    assert not timed(job)


def test_output_waits_for_every_earlier_item():
    out = OutputOrder()
    out.add(2, "stdout", "c")
    out.add(0, "stdout", "a")
    out.done(2, 1)
    assert not out.ready() and out.pending()
    out.done_except(0, 2, {1})
    assert [o[3] for o in out.take()] == ["a"], "item 1 is queued again: item 2's output waits"
    out.done(1, 1)
    assert [o[3] for o in out.take()] == ["c"]


def test_a_backend_joins_by_registering(monkeypatch):
    import pytest

    from poolmagic.engine import backends
    from poolmagic.engine.base import Backend
    from poolmagic.errors import BadInputError

    class Fake(Backend):
        size = 1
        start = submit = cancel = resize = shutdown = lambda self, *a, **k: None  # noqa: E731
        worker_pids = lambda self: []  # noqa: E731

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register("fake", lambda size, **options: Fake())
    made = backends.make_backend("fake", 2)
    assert isinstance(made, Fake) and made.name == "fake" and not made.closed
    assert made.status_detail() is None and made.limits_memory
    backends.register("needy", lambda size, **options: Fake(), needs="no_such_module_here", extra="needy")
    with pytest.raises(BadInputError, match=r'needs no_such_module_here.*pip install "poolmagic\[needy\]"'):
        backends.make_backend("needy", 2)
    with pytest.raises(BadInputError, match="the backends are: local, dask, fake, needy"):
        backends.make_backend("nope", 2)
