"""Checkpoints another user planted, edited or can reach are never loaded (issue 23), for real.

The attacker's side runs as another identity: where the suite runs as root, a
subprocess that ``os.setuid``s to ``nobody`` plants a checkpoint in a shared
directory; elsewhere a different ``XDG_CONFIG_HOME`` (another key) stands for
the other user. Each planted file would create a marker file if anything in it
were unpickled: the marker must never appear. The notebook side is a real map
(``Pool.run(checkpoint=...)``) and a real ``%%poolmap --checkpoint`` cell.
"""
from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import cloudpickle
import pytest
from conftest import run_script, shutdown_and_check
from IPython.core.error import UsageError

import poolmagic
from poolmagic import BadInputError, Pool, checkpointfile, userkey
from poolmagic.checkpointfile import CheckpointFileError

cloudpickle.register_pickle_by_value(sys.modules[__name__])

ROOT = os.geteuid() == 0
NOBODY = 65534


def log_call(x, path: str):
    with open(path, "a") as fh:
        fh.write(f"{x}\n")
    return x * x


def calls(path) -> list[int]:
    p = Path(path)
    return sorted(int(s) for s in p.read_text().split()) if p.exists() else []


@pytest.fixture(scope="module")
def pool():
    p = Pool(2).start()
    yield p
    shutdown_and_check(p)


@pytest.fixture
def own_key(tmp_path, monkeypatch):
    """A fresh key home for this test (this user's key for the test)."""
    home = tmp_path / "xdg-me"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


class Plant:
    """Unpickled, it creates the marker file: proof that a planted file's code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_body(marker: str) -> bytes:
    return pickle.dumps(([Plant(marker)] * 5, [], []))


def _run(pool, ck, calls_path, n=5):
    return pool.run(log_call, range(n), checkpoint=str(ck), chunksize=1, kwargs={"path": str(calls_path)})


# ---------------------------------------------------------------- the key


def test_the_key_is_made_private_on_first_use_and_cached(own_key):
    key = userkey.user_key()
    path = own_key / "poolmagic" / "checkpoint.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.key"], "a temporary file was left"
    path.write_bytes(b"x" * 32)  # cached for the process: the file is read once
    assert userkey.user_key() == key


@pytest.mark.timeout(60)
def test_processes_that_make_the_key_at_once_agree_on_one(own_key):
    gate = own_key.parent / "go"
    script = (f"import os, time\nfrom poolmagic import userkey\n"
              f"while not os.path.exists({str(gate)!r}): time.sleep(0.001)\n"
              f"print(userkey.user_key().hex())\n")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    gate.touch()
    keys = {p.communicate(timeout=50)[0].strip() for p in procs}
    assert len(keys) == 1 and keys == {(own_key / "poolmagic" / "checkpoint.key").read_bytes().hex()}


@pytest.mark.parametrize("damage", ["file-mode", "dir-mode", "symlink", "short", "foreign"])
def test_a_key_others_could_read_plant_or_change_is_refused(own_key, damage, tmp_path):
    if damage == "foreign" and not ROOT:
        pytest.skip("chown to another user needs root")
    folder = own_key / "poolmagic"
    folder.mkdir(parents=True, mode=0o700)
    path = folder / "checkpoint.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    if damage == "file-mode":
        path.chmod(0o640)
        want = f"chmod 600 {path}"
    elif damage == "dir-mode":
        folder.chmod(0o755)
        want = f"chmod 700 {folder}"
    elif damage == "symlink":
        real = tmp_path / "elsewhere.key"
        path.rename(real)
        path.symlink_to(real)
        want = "is a symbolic link"
    elif damage == "short":
        path.write_bytes(b"short")
        want = "is damaged"
    else:
        os.chown(path, NOBODY, NOBODY)
        want = "(uid 65534), not to you"
    with pytest.raises(userkey.KeyFileError) as info:
        userkey.user_key()
    assert want in str(info.value), str(info.value)
    ck = str(tmp_path / "ck")  # and a checkpoint cannot be written without a usable key
    with pytest.raises(CheckpointFileError) as info:
        checkpointfile.Writer(ck, 0)
    assert want in str(info.value)


# ---------------------------------------------------------------- paths


@pytest.mark.timeout(60)
def test_a_new_checkpoint_is_private(pool, own_key, tmp_path):
    ck = tmp_path / "ck.bin"
    _run(pool, ck, tmp_path / "calls")
    assert stat.S_IMODE(ck.stat().st_mode) == 0o600
    assert stat.S_IMODE((own_key / "poolmagic" / "checkpoint.key").stat().st_mode) == 0o600


def _make_path(kind: str, ck: Path, tmp_path: Path) -> str:
    """Make ``ck`` a path of the given unsafe kind; the words the refusal must contain."""
    real = tmp_path / "real.bin"
    if kind in ("symlink", "dangling-symlink"):
        if kind == "symlink":
            checkpointfile.Writer(str(real), 0).close()
        ck.symlink_to(real)
        return "symbolic link"
    if kind == "fifo":
        os.mkfifo(ck, 0o600)
        return "named pipe (FIFO), not a regular file"
    if kind == "directory":
        ck.mkdir()
        return "directory"
    checkpointfile.Writer(str(ck), 0).close()
    if kind == "group-writable":
        ck.chmod(0o664)
        return f"group or others can write it (mode 0664), so it may not hold what you wrote; fix it with: chmod go-w {ck}"
    if kind == "foreign":
        os.chown(ck, NOBODY, NOBODY)
        return "belongs to user 'nobody' (uid 65534), not to you"
    raise AssertionError(kind)


@pytest.mark.timeout(60)  # a FIFO blocked forever before
@pytest.mark.parametrize("kind", ["symlink", "dangling-symlink", "fifo", "directory", "group-writable", "foreign"])
def test_an_unsafe_checkpoint_path_is_refused_before_any_work(pool, own_key, tmp_path, kind):
    if kind == "foreign" and not ROOT:
        pytest.skip("chown to another user needs root")
    ck = tmp_path / "ck.bin"
    want = _make_path(kind, ck, tmp_path)
    with pytest.raises(BadInputError) as info:
        _run(pool, ck, tmp_path / "calls")
    assert want in str(info.value), str(info.value)
    assert calls(tmp_path / "calls") == [], "work started"


def test_a_character_device_is_refused_by_the_reader(own_key):
    with pytest.raises(CheckpointFileError, match="character device, not a regular file"):
        checkpointfile.read("/dev/null")
    with pytest.raises(CheckpointFileError, match="character device, not a regular file"):
        checkpointfile.Writer("/dev/null", 0)


# ---------------------------------------------------------------- planted and tampered files


def _plant_as_nobody(shared: Path, marker: str) -> tuple[Path, Path]:
    """As ``nobody`` (a subprocess that setuids): an unsigned old-format file and a file
    signed with nobody's own poolmagic key, both creating ``marker`` when unpickled."""
    code = textwrap.dedent(f"""
        import os, pickle, struct, zlib
        from poolmagic import checkpointfile
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        os.environ["XDG_CONFIG_HOME"] = {str(shared / "nobody-config")!r}

        class Plant:
            def __reduce__(self):
                return (open, ({marker!r}, "w"))

        env = pickle.dumps(Plant())
        payload = struct.pack("<I", len(env)) + env
        with open({str(shared / "old.ckpt")!r}, "wb") as fh:
            fh.write(b"poolmagic-ckpt1\\n" + struct.pack("<cQI", b"M", len(payload), zlib.crc32(payload)) + payload)
        w = checkpointfile.Writer({str(shared / "signed.ckpt")!r}, 0)
        w.chunk(range(0, 5), b"h", pickle.dumps(([Plant()] * 5, [], [])), [])
        w.close()
        print(os.getuid())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(NOBODY), out.stderr
    return shared / "old.ckpt", shared / "signed.ckpt"


def _plant_as_other_key(shared: Path, marker: str, monkeypatch) -> tuple[Path, Path]:
    """Not root: another user's key stands for another user (the files are ours, the key is not)."""
    from test_checkpointfile import _planted_v1

    old, signed = shared / "old.ckpt", shared / "signed.ckpt"
    _planted_v1(str(old), marker)
    w = checkpointfile.Writer(str(signed), 0, key=os.urandom(32))
    w.chunk(range(0, 5), b"h", evil_body(marker), [])
    w.close()
    return old, signed


@pytest.fixture
def planted(tmp_path, own_key, monkeypatch):
    shared = Path(tempfile.mkdtemp(prefix="poolmagic-shared-"))  # pytest's tmp is private to us
    shared.chmod(0o1777)  # like /tmp
    marker = str(tmp_path / "MARKER")
    try:
        if ROOT:
            files = _plant_as_nobody(shared, marker)
            assert all(f.stat().st_uid == NOBODY for f in files)
        else:
            files = _plant_as_other_key(shared, marker, monkeypatch)
        yield files, marker
    finally:
        shutil.rmtree(shared)


@pytest.mark.timeout(120)
def test_a_checkpoint_another_user_planted_is_never_loaded(pool, ip, planted, tmp_path, capsys):
    files, marker = planted
    calls_path = tmp_path / "calls"
    words = "belongs to user 'nobody'" if ROOT else "not written by you"
    for ck in files:
        with pytest.raises(BadInputError) as info:
            _run(pool, ck, calls_path)
        shown = str(info.value)
        assert ("unsigned checkpoint" in shown or words in shown) and "trust_checkpoint(" in shown, shown
        assert not os.path.exists(marker) and calls(calls_path) == []

        ip.user_ns.update(log_call=log_call, PLANTED_CALLS=str(calls_path))
        capsys.readouterr()
        result = ip.run_cell(f"%%poolmap --checkpoint {ck} range(5)\n"
                             "def planted_map(x):\n    return log_call(x, PLANTED_CALLS)\n")
        out = capsys.readouterr()
        assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
        assert "trust_checkpoint" in out.out + out.err
        assert not os.path.exists(marker) and calls(calls_path) == []

    if ROOT:  # copied into the notebook user's own file: the signature still refuses it
        for src in files:
            mine = tmp_path / f"copy-{src.name}"
            mine.write_bytes(src.read_bytes())
            mine.chmod(0o600)
            with pytest.raises(BadInputError, match="unsigned checkpoint|not written by you"):
                _run(pool, mine, calls_path)
        assert not os.path.exists(marker) and calls(calls_path) == []


def test_trust_refuses_an_old_file_whose_envelope_is_code(planted, tmp_path):
    (old, _), marker = planted
    with pytest.raises(CheckpointFileError, match="open, not plain data"):
        poolmagic.trust_checkpoint(old, dest=tmp_path / "mine.ckpt")
    assert not os.path.exists(marker) and not (tmp_path / "mine.ckpt").exists()


def padded(x, path):
    log_call(x, path)
    return x * x, "p" * 300  # a body long enough to hold a planted pickle of the same length


@pytest.mark.timeout(60)
def test_a_tampered_record_is_never_unpickled_and_its_items_rerun(pool, own_key, tmp_path):
    ck, calls_path, marker = tmp_path / "ck.bin", tmp_path / "calls", str(tmp_path / "MARKER")
    want = [(x * x, "p" * 300) for x in range(3)]
    run = lambda: pool.run(padded, range(3), checkpoint=str(ck), chunksize=1, kwargs={"path": str(calls_path)})
    assert run().results == want and calls(calls_path) == [0, 1, 2]
    bodies = {list(idx)[0]: bytes(body) for idx, _, body, _ in checkpointfile.read(str(ck)).chunks}

    data = bytearray(ck.read_bytes())
    at = data.index(bodies[1])
    data[at + len(bodies[1]) - 5] ^= 0x01  # one byte of item 1's payload changed, its HMAC kept
    ck.write_bytes(bytes(data))
    assert checkpointfile.read(str(ck)).damaged == 1
    ck_calls = tmp_path / "calls2"
    report = pool.run(padded, range(3), checkpoint=str(ck), chunksize=1, kwargs={"path": str(ck_calls)})
    assert report.results == want and calls(ck_calls) == [1], "exactly the tampered record's item re-ran"

    # item 0's body replaced by one of the same length that runs code when unpickled
    evil = pickle.dumps(([Plant(marker)], [], []))
    assert len(evil) < len(bodies[0])
    data = bytearray(ck.read_bytes())
    at = data.index(bodies[0])
    data[at : at + len(bodies[0])] = evil + b"\0" * (len(bodies[0]) - len(evil))
    ck.write_bytes(bytes(data))
    ck_calls = tmp_path / "calls3"
    report = pool.run(padded, range(3), checkpoint=str(ck), chunksize=1, kwargs={"path": str(ck_calls)})
    assert report.results == want and calls(ck_calls) == [0]
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- legitimate files travel


RESUME = """
import sys
from poolmagic import Pool

def sq(x):
    return x * x

with Pool(1) as p:
    r = p.run(sq, range(8), checkpoint=sys.argv[1] if len(sys.argv) > 1 else {ck!r})
print("RESUMED", r.resumed, r.results == [x * x for x in range(8)])
"""


@pytest.mark.timeout(180)
def test_a_checkpoint_resumes_in_a_new_process_and_on_another_machine_with_the_key(own_key, tmp_path, monkeypatch):
    ck = str(tmp_path / "travels.ckpt")
    script = RESUME.format(ck=ck)
    out, err, rc = run_script(script, timeout=60)
    assert rc == 0 and "RESUMED None True" in out, err
    out, err, rc = run_script(script, timeout=60)  # a new process (kernel) of the same user
    assert rc == 0 and "RESUMED (8, 0) True" in out, err

    machine2 = tmp_path / "machine2"  # the key file copied to another machine of this user
    (machine2 / "poolmagic").mkdir(parents=True, mode=0o700)
    key = own_key / "poolmagic" / "checkpoint.key"
    (machine2 / "poolmagic" / "checkpoint.key").write_bytes(key.read_bytes())
    (machine2 / "poolmagic" / "checkpoint.key").chmod(0o600)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(machine2))
    out, err, rc = run_script(script, timeout=60)
    assert rc == 0 and "RESUMED (8, 0) True" in out, err

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "machine3"))  # without the key: refused
    out, err, rc = run_script(script, timeout=60)
    assert rc != 0 and "not written by you" in err and "trust_checkpoint" in err, err


def test_trust_checkpoint_makes_a_file_of_another_key_loadable(own_key, tmp_path, monkeypatch):
    ck = str(tmp_path / "ck")
    w = checkpointfile.Writer(ck, 0, key=os.urandom(32))
    w.meta({"items": 2, "function": "f"})
    w.chunk(range(0, 2), b"h", pickle.dumps(([1, 2], [], [])), [])
    w.close()
    with pytest.raises(CheckpointFileError, match="not written by you"):
        checkpointfile.read(ck)
    assert poolmagic.trust_checkpoint(ck) == ck
    got = checkpointfile.read(ck)
    assert got.meta == {"items": 2, "function": "f"} and len(got.chunks) == 1
    idx, h, body, frames = got.chunks[0]
    assert (idx, h, pickle.loads(body, buffers=frames)[0]) == (range(0, 2), b"h", [1, 2])
    assert stat.S_IMODE(os.stat(ck).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".poolmagic-trust")] == []


def test_trust_checkpoint_converts_an_old_unsigned_file(own_key, tmp_path):
    import struct
    import zlib

    def rec(kind, envelope, blobs=()):
        payload = struct.pack("<I", len(envelope)) + envelope + b"".join(blobs)
        return struct.pack("<cQI", kind, len(payload), zlib.crc32(payload)) + payload

    body, frame = pickle.dumps(([b"x", "y"], [], [])), b"\x07" * 64
    ck = tmp_path / "old.ckpt"
    ck.write_bytes(b"poolmagic-ckpt1\n" + rec(b"M", pickle.dumps({"items": 4, "function": "k"}))
                   + rec(b"C", pickle.dumps((range(0, 2), b"h1", [len(body), len(frame)])), [body, frame])
                   + rec(b"C", pickle.dumps(([3, 2], b"h2", [len(body)])), [body]))
    ck.chmod(0o600)
    with pytest.raises(CheckpointFileError, match="unsigned checkpoint"):
        checkpointfile.read(str(ck))
    poolmagic.trust_checkpoint(ck)
    got = checkpointfile.read(str(ck))
    assert got.meta == {"items": 4, "function": "k"}
    assert [(i, h, bytes(b), [bytes(f) for f in fs]) for i, h, b, fs in got.chunks] == [
        (range(0, 2), b"h1", body, [frame]), ([3, 2], b"h2", body, [])]


def test_trusting_another_users_file_into_a_file_of_ones_own(planted, tmp_path):
    (_, signed), marker = planted
    mine = poolmagic.trust_checkpoint(signed, dest=tmp_path / "mine.ckpt")
    assert len(checkpointfile.read(mine).chunks) == 1  # deliberately trusted: now loadable
    assert os.stat(mine).st_uid == os.geteuid() and stat.S_IMODE(os.stat(mine).st_mode) == 0o600
    assert not os.path.exists(marker), "trusting a file unpickles nothing"


@pytest.mark.timeout(60)
def test_a_key_that_cannot_be_trusted_refuses_a_new_checkpoint_before_any_work(pool, own_key, tmp_path):
    folder = own_key / "poolmagic"
    folder.mkdir(parents=True, mode=0o700)
    (folder / "checkpoint.key").write_bytes(os.urandom(32))
    (folder / "checkpoint.key").chmod(0o644)
    with pytest.raises(BadInputError, match="chmod 600"):
        _run(pool, tmp_path / "new.ckpt", tmp_path / "calls")
    assert calls(tmp_path / "calls") == [] and not (tmp_path / "new.ckpt").exists()


def test_trust_checkpoint_waits_for_no_writer(own_key, tmp_path):
    ck = str(tmp_path / "busy.ckpt")
    holder = checkpointfile.Writer(ck, 0)
    try:
        with pytest.raises(CheckpointFileError, match="a map is writing it"):
            poolmagic.trust_checkpoint(ck)
    finally:
        holder.close()
    poolmagic.trust_checkpoint(ck)


def test_trusting_ones_own_file_drops_its_damaged_records_instead_of_signing_them(own_key, tmp_path):
    ck = str(tmp_path / "mine.ckpt")
    w = checkpointfile.Writer(ck, 0)
    w.meta({"items": 3})
    bodies = [pickle.dumps(([float(k)] * 50, [], [])) for k in range(3)]
    for k, body in enumerate(bodies):
        w.chunk([k], b"h", body, [])
    w.close()
    data = bytearray(Path(ck).read_bytes())
    at = data.index(bodies[1])
    data[at + 60] ^= 0x10  # a flipped bit inside a float of record 2: it would load as a wrong number
    Path(ck).write_bytes(bytes(data))
    assert checkpointfile.read(ck).damaged == 1
    poolmagic.trust_checkpoint(ck)
    got = checkpointfile.read(ck)
    assert got.damaged == 0 and [idx for idx, *_ in got.chunks] == [[0], [2]] and got.meta == {"items": 3}


@pytest.mark.parametrize("envelope", [
    b"\x80\x04X\x01\x00\x00\x00a(K\x01e.",  # APPENDS onto a str
    b"\x80\x04]X\x01\x00\x00\x00a(K\x01u.",  # SETITEMS onto a str
    b"\x80\x04h\x05.",  # a memo entry that was never made
])
def test_trust_refuses_an_old_file_whose_envelope_builds_nothing_plain(envelope, own_key, tmp_path):
    """Opcodes that only name plain data but cannot build it: refused as such, naming the
    record (they raised a bare AttributeError or KeyError out of trust_checkpoint)."""
    import struct
    import zlib

    payload = struct.pack("<I", len(envelope)) + envelope
    old = tmp_path / "old.ckpt"
    old.write_bytes(b"poolmagic-ckpt1\n" + struct.pack("<cQI", b"M", len(payload), zlib.crc32(payload)) + payload)
    with pytest.raises(CheckpointFileError, match="cannot trust it: record 1 .*do not build plain data"):
        poolmagic.trust_checkpoint(old, dest=tmp_path / "mine.ckpt")
    assert not (tmp_path / "mine.ckpt").exists()
