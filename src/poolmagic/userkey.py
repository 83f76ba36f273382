"""This user's secret key, which signs the checkpoint files poolmagic writes.

A 32-byte random secret in ``$XDG_CONFIG_HOME/poolmagic/checkpoint.key``
(else ``~/.config/poolmagic/checkpoint.key``), made on first use: the
directory ``0700`` (and the missing ones above it), the file ``0600``. Like OpenSSH with its keys, a key file
or directory that is a symbolic link, belongs to another user, or that group
or others can read or write is refused, with the command that fixes it.

Two processes making the key at once agree on one: each writes a complete key
to a private temporary name and hard-links it to the key's name, which fails
if the name exists; the loser reads the winner's key. A reader never sees a
half-written key.
"""
from __future__ import annotations

import hmac
import os
import secrets
import stat
import threading
from pathlib import Path

from .filesafety import unsafe

KEY_BYTES = 32
KEY_NAME = "checkpoint.key"
_CACHE: dict[str, bytes] = {}  # key file path -> key, for this process
_LOCK = threading.Lock()


class KeyFileError(Exception):
    """The key file or its directory cannot be trusted or made (the message says how to fix it)."""


def key_dir() -> Path:
    """``$XDG_CONFIG_HOME/poolmagic`` (when set to an absolute path), else ``~/.config/poolmagic``."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "poolmagic"


def key_path() -> Path:
    """Where this user's checkpoint key lives (it may not exist yet)."""
    return key_dir() / KEY_NAME


def user_key() -> bytes:
    """This user's checkpoint key: loaded (and checked) once per process, made on first use."""
    where = str(key_path())
    key = _CACHE.get(where)
    if key is None:
        with _LOCK:
            key = _CACHE.get(where)
            if key is None:
                key = _load_or_make(Path(where))
                _CACHE[where] = key
    return key


def _check(st: os.stat_result, path: Path, what: str, mode: str) -> None:
    """Refuse what another user could have planted, read or changed (as OpenSSH does)."""
    bad = unsafe(st, stat.S_ISDIR if what == "directory" else stat.S_ISREG, 0o077)
    if bad is None:
        return
    if bad.reason == "kind":
        raise KeyFileError(f"the poolmagic key {what} {path} is {bad.kind}; replace it by a real {what}")
    if bad.reason == "owner":
        raise KeyFileError(
            f"the poolmagic key {what} {path} belongs to {bad.owner}, not to you (uid {os.geteuid()}): "
            f"someone else may have made it; remove it and poolmagic makes a new one"
        )
    raise KeyFileError(
        f"the poolmagic key {what} {path} is accessible to group or others "
        f"(mode {bad.mode:04o}); fix it with: chmod {mode} {path}"
    )


def _make_parents(folder: Path) -> None:
    """Make the missing directories above ``folder``, each ``0700``.

    ``Path.mkdir(parents=True)`` makes all but the last with the umask's mode:
    under ``umask 000`` a missing home directory came out ``0777``, where
    another user could plant ``~/.bashrc`` or a ``.pth`` file.
    """
    missing = []
    for parent in folder.parents:
        if os.path.lexists(parent):
            break
        missing.append(parent)
    for parent in reversed(missing):
        try:
            os.mkdir(parent, 0o700)
        except FileExistsError:
            pass


def _load_or_make(path: Path) -> bytes:
    folder = path.parent
    _make_parents(folder)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    try:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(folder):
            _check(os.lstat(folder), folder, "directory", "700")
        raise KeyFileError(f"cannot open the poolmagic key directory {folder}: {exc.strerror}") from None
    try:
        _check(os.fstat(dfd), folder, "directory", "700")
        key = _read(dfd, path)
        if key is None:
            key = _make(dfd, path)
        return key
    finally:
        os.close(dfd)


def _read(dfd: int, path: Path) -> bytes | None:
    """The key in the file ``path`` (opened relative to its checked directory), None if absent."""
    try:
        fd = os.open(KEY_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        try:
            st = os.lstat(KEY_NAME, dir_fd=dfd)
        except OSError:
            st = None
        if st is not None:
            _check(st, path, "file", "600")
        raise KeyFileError(f"cannot open the poolmagic key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"the poolmagic key file {path} is not a regular file; remove it")
        _check(st, path, "file", "600")
        key = os.read(fd, KEY_BYTES + 1)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise KeyFileError(
            f"the poolmagic key file {path} holds {len(key)} bytes, not {KEY_BYTES}: it is damaged. Restore it "
            f"from a copy, or remove it (checkpoints signed with it will then be refused)"
        )
    return key


def _make(dfd: int, path: Path) -> bytes:
    """A new key, published under its name only once complete; the key that won if another
    process made one meanwhile."""
    key = secrets.token_bytes(KEY_BYTES)
    tmp = f".{KEY_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    try:
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, KEY_NAME, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            other = _read(dfd, path)
            if other is None:
                raise KeyFileError(f"the poolmagic key file {path} appeared and vanished; try again") from None
            return other
    finally:
        os.unlink(tmp, dir_fd=dfd)
    return key


def key_id(key: bytes) -> bytes:
    """8 bytes that tell keys apart without revealing them (written in each file's header)."""
    return hmac.new(key, b"poolmagic checkpoint key id", "sha256").digest()[:8]
