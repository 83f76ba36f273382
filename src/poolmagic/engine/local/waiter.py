"""Waiting on many worker pipes and process sentinels at once, for the local backend's supervisor.

One epoll set kept across waits (POSIX), updated as workers come and go,
with a wake-up pipe any thread can write to; elsewhere the stdlib's wait.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import selectors
import threading
from multiprocessing import connection
from typing import Any, Hashable


class Waiter:
    """Waits on worker pipes, process sentinels and a wake-up pipe, all at once.

    ``multiprocessing.connection.wait`` builds a new selector on every call
    (~20 µs with two workers, more with many) and ``Connection.poll`` does the
    same; the supervisor waits several times per map. On POSIX one epoll set is
    kept instead and updated as workers come and go (~1 µs per wait); elsewhere
    the stdlib's wait is used.
    """

    WAKE = object()

    def __init__(self) -> None:
        self._lock = threading.Lock()  # wake() against close(): never write to a reused fd
        self._closed = False
        self._data: dict[Hashable, Any] = {}  # registered object -> what wait() returns for it
        self._fds: dict[Hashable, int] = {}
        if os.name == "posix":
            self._sel: selectors.BaseSelector | None = selectors.DefaultSelector()
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
            self._sel.register(self._wake_r, selectors.EVENT_READ, self.WAKE)
        else:
            self._sel = None
            self._wake_r, self._wake_w = mp.Pipe(duplex=False)
            self._data[self._wake_r] = self.WAKE

    def add(self, obj: Any, data: Any) -> None:
        """Watch ``obj`` (a Connection or a sentinel fd); ``wait`` returns ``data`` for it."""
        if self._sel is not None:
            fd = obj if isinstance(obj, int) else obj.fileno()
            self._sel.register(fd, selectors.EVENT_READ, data)
            self._fds[obj] = fd
        self._data[obj] = data

    def remove(self, obj: Any) -> None:
        """Stop watching ``obj``; call it before ``obj`` is closed."""
        self._data.pop(obj, None)
        fd = self._fds.pop(obj, None)
        if fd is not None and self._sel is not None:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    def wait(self, timeout: float | None) -> list[Any]:
        """The data of every ready object; a wake-up is drained and not returned."""
        if self._sel is not None:
            ready = [key.data for key, _ in self._sel.select(timeout)]
        else:
            ready = [self._data[o] for o in connection.wait(list(self._data), timeout)]
        if self.WAKE in ready:
            ready.remove(self.WAKE)
            self._drain_wake()
        return ready

    def _drain_wake(self) -> None:
        if self._sel is None:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
            return
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def wake(self) -> None:
        """Make the current or next ``wait`` return (any thread)."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._sel is None:
                    self._wake_w.send_bytes(b"!")
                else:
                    os.write(self._wake_w, b"!")
            except (BlockingIOError, OSError):  # full: a wake-up is already pending
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._sel is not None:
                self._sel.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
            else:
                self._wake_r.close()
                self._wake_w.close()
