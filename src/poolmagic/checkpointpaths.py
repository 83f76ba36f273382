"""Opening a checkpoint path safely: what another user could have planted is refused.

Paths are opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat``
before a byte is read: a symbolic link, anything but a regular file (a FIFO
would block forever), a file of another user, or one group or others can
write is refused. New files are created ``0600`` with ``O_EXCL``.
"""
from __future__ import annotations

import errno
import os
import stat

from .checkpointformat import CheckpointFileError
from .filesafety import unsafe


def check_stat(st: os.stat_result) -> None:
    """Refuse what another user could have planted or could change: anything but a regular
    file of this user that group and others cannot write."""
    bad = unsafe(st, stat.S_ISREG, 0o022)
    if bad is None:
        return
    if bad.reason == "kind":
        if bad.kind == "a symbolic link":
            raise CheckpointFileError("it is a symbolic link: give the path of the file itself "
                                      "(a link in a shared directory could point anywhere)")
        raise CheckpointFileError(f"it is {bad.kind}, not a regular file")
    if bad.reason == "owner":
        raise CheckpointFileError(
            f"it belongs to {bad.owner}, not to you: a checkpoint holds pickled results, and "
            f"loading one another user wrote would run their code. If you trust it, make a copy of "
            f"your own, signed with your key: poolmagic.trust_checkpoint(PATH, dest='mine.ckpt')"
        )
    raise CheckpointFileError(
        f"group or others can write it (mode {bad.mode:04o}), so it may not hold "
        f"what you wrote; fix it with: chmod go-w PATH"
    )


def open_checked(path: str, flags: int, *, create: bool = False) -> int:
    """A descriptor on ``path``, checked with ``fstat`` (``check_stat``) before anything is read.

    ``create``: make it (``0600``, ``O_EXCL``); FileExistsError if something is there.
    """
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if create:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    try:  # refuse a device or FIFO without opening it (opening one can have effects)
        check_stat(os.lstat(path))
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            check_stat(os.lstat(path))
        raise CheckpointFileError(exc.strerror or str(exc)) from None
    try:
        check_stat(os.fstat(fd))  # the file opened: no race between the lstat and the open
    except BaseException:
        os.close(fd)
        raise
    return fd

