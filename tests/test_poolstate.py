"""PoolState (poolstate.py) alone, with stand-in maps: no pool, no worker process."""
from __future__ import annotations

import gc
import threading

import pytest

from poolmagic.engine.core.events import MapFinished
from poolmagic.errors import BadInputError
from poolmagic.mpcompat import CLOSE, RUN, PoolNotRunningError
from poolmagic.poolstate import PoolState


class StandInMap:
    """What PoolState uses of a Job: its observers, ``finished`` and ``stop``."""

    def __init__(self) -> None:
        self.observers: list = []
        self.finished = threading.Event()
        self.stopped = False

    def stop(self, error: BaseException | None = None) -> None:
        self.stopped = error or True

    def end(self) -> None:
        for observe in self.observers:
            observe(MapFinished("done", None))
        self.finished.set()


class Report:
    """Something a weak reference can point at, as a RunReport."""


def test_close_refuses_work_and_join_needs_it():
    life = PoolState()
    life.check_running()
    with pytest.raises(ValueError, match="still running"):
        life.wait_maps(0)
    life.close()
    assert life.state == CLOSE
    with pytest.raises(PoolNotRunningError, match="closed") as e:
        life.check_running()
    assert isinstance(e.value, ValueError)  # what multiprocessing raises


def test_the_shared_pool_cannot_be_closed():
    life = PoolState()
    life.make_shared()
    with pytest.raises(BadInputError, match="shutdown_pool"):
        life.close()
    assert life.state == RUN


def test_a_map_counts_as_running_until_its_end_and_can_be_stopped():
    life = PoolState()
    first, second = StandInMap(), StandInMap()
    life.started(first)
    life.started(second)
    assert set(life.running()) == {first, second}
    first.end()
    assert life.running() == [second]
    life.stop_maps()
    assert second.stopped and not first.stopped
    life.close()
    second.end()
    life.wait_maps(None)  # returns: nothing runs


def test_close_stops_the_workers_once_no_map_runs():
    """A closed pool kept its worker processes (even dropped) until the kernel exited, where
    multiprocessing's leave once a closed pool's work is done: ``idle`` runs then."""
    life, stops = PoolState(), []
    life.close(idle=lambda: stops.append(threading.current_thread()))
    assert stops == [threading.current_thread()]  # nothing ran: at once

    life, stops = PoolState(), []
    first, second = StandInMap(), StandInMap()
    life.started(first)
    life.started(second)
    life.close(idle=lambda: stops.append(threading.current_thread()))
    first.end()
    assert not stops
    second.end()  # on the backend's thread, which the stop must not run on (it joins it)
    life.wait_maps(10)  # join: returns once the workers were stopped
    assert len(stops) == 1 and stops[0] is not threading.current_thread()


def test_wait_maps_gives_up_at_its_timeout():
    life = PoolState()
    life.started(StandInMap())
    life.close()
    life.wait_maps(0.01)  # the map never ends: join(timeout) returns anyway


def test_an_own_pool_keeps_its_last_map_only_while_the_caller_does():
    life = PoolState()
    report = Report()
    life.remember(0, report)
    assert life.last(0) is report
    del report
    gc.collect()
    assert life.last(0) is None


def test_the_shared_pool_keeps_its_last_map():
    life = PoolState()
    report, job = Report(), Report()
    life.remember(0, report)
    life.remember(1, job)
    life.make_shared()  # set_pool: the references held so far become strong
    del report, job
    gc.collect()
    assert isinstance(life.last(0), Report) and isinstance(life.last(1), Report)
    later = Report()
    life.remember(0, later)
    del later
    gc.collect()
    assert isinstance(life.last(0), Report)
