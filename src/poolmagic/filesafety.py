"""Whether a file or directory poolmagic is about to trust could be another user's doing.

One test for the checkpoint files, the key store and the runtime directory:
the right kind (a symbolic link is never followed), owned by this user, and
not open to group or others in the ways that matter for it. Each caller
phrases the refusal with its own advice (as OpenSSH does for key files).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Callable

_KINDS = [(stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")]


@dataclass(frozen=True)
class Unsafe:
    """Why a path is not to be trusted: ``reason`` is "kind", "owner" or "mode"."""

    reason: str
    kind: str  # "a symbolic link", "a directory", ...
    owner: str  # "user 'nobody' (uid 65534)"
    mode: int


def kind_of(st: os.stat_result) -> str:
    for test, name in _KINDS:
        if test(st.st_mode):
            return name
    return "not a regular file"


def user_name(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def unsafe(st: os.stat_result, is_kind: Callable[[int], bool], forbidden_mode: int) -> Unsafe | None:
    """None when ``st`` (from lstat/fstat) is of the kind ``is_kind`` accepts, this user's,
    and has none of ``forbidden_mode``'s bits (0o022: others may not write; 0o077: nor read)."""
    mode = stat.S_IMODE(st.st_mode)
    if not is_kind(st.st_mode):
        reason = "kind"
    elif st.st_uid != os.geteuid():
        reason = "owner"
    elif st.st_mode & forbidden_mode:
        reason = "mode"
    else:
        return None
    return Unsafe(reason, kind_of(st), user_name(st.st_uid), mode)
