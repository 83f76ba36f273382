"""What poolmagic creates on this machine stays private, whatever the umask, and what another
user plants where it once was is never used (hostile review of docs/security.md).

Each test acts as the notebook's user in a fresh interpreter where the umask matters, and, where
the suite runs as root, as another user through a subprocess that ``os.setuid``s to ``nobody``.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest
from conftest import run_script

ROOT = os.geteuid() == 0
NOBODY = 65534


def modes(root) -> dict[str, str]:
    """Every entry under ``root`` (itself included): its mode, octal."""
    out = {str(root): f"{stat.S_IMODE(os.lstat(root).st_mode):04o}"}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            out[path] = f"{stat.S_IMODE(os.lstat(path).st_mode):04o}"
    return out


@pytest.mark.timeout(60)
def test_the_directories_made_for_the_key_are_private_under_umask_000(tmp_path):
    """A missing home (or XDG_CONFIG_HOME) is made with the key: under ``umask 000`` its
    directories came out 0777, where another user could plant ``.bashrc`` or a ``.pth`` file."""
    home = tmp_path / "home" / "me"
    out, err, code = run_script(f"""
        import os
        os.umask(0)
        os.environ.pop("XDG_CONFIG_HOME", None)
        os.environ["HOME"] = {str(home)!r}
        from poolmagic import userkey
        userkey.user_key()
        print(userkey.key_path())
    """)
    assert code == 0, err
    assert out.strip() == str(home / ".config" / "poolmagic" / "checkpoint.key")
    made = modes(tmp_path / "home")
    assert made == {
        str(tmp_path / "home"): "0700",
        str(home): "0700",
        str(home / ".config"): "0700",
        str(home / ".config" / "poolmagic"): "0700",
        str(home / ".config" / "poolmagic" / "checkpoint.key"): "0600",
    }


@pytest.mark.skipif(not ROOT, reason="needs root to act as the user nobody")
@pytest.mark.timeout(60)
def test_a_runtime_directory_removed_and_taken_by_another_user_is_not_used_again():
    """A cleaner of /tmp removes an idle kernel's empty runtime directory; ``nobody`` makes
    directories of the same names (seen in /tmp and /proc/net/unix), open to all. The next
    forkserver's socket and LocalCluster folder went into them: ``nobody`` could then swap
    the socket for one of their own and be sent what workers start with (dask's TLS key)."""
    out, err, code = run_script(f"""
        import json, os, shutil, stat
        from multiprocessing import forkserver, util
        from poolmagic.engine import processes, runtimedir

        runtimedir.adopt_for_multiprocessing()
        old, old_mp = runtimedir.runtime_dir(), util.get_temp_dir()
        shutil.rmtree(old)  # the cleaner
        pid = os.fork()
        if pid == 0:  # the other user takes the names
            try:
                os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
                for d in (old, old_mp):
                    os.mkdir(d); os.chmod(d, 0o777)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.stat(old_mp).st_uid == {NOBODY}

        processes.start_resource_tracker()  # what every forkserver start does first
        forkserver.ensure_running()
        socket = forkserver._forkserver._forkserver_address
        cluster = runtimedir.subdir("dask")
        def private(d):
            st = os.lstat(d)
            return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077
        private = [private(d) for d in (os.path.dirname(socket), cluster, runtimedir.runtime_dir())]
        processes.stop_helper_processes(tracker=True)
        print(json.dumps({{"old": old, "socket": socket, "cluster": cluster, "private": private}}))
    """)
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    old = got["old"]
    try:
        for what in ("socket", "cluster"):
            assert not got[what].startswith(old + os.sep), f"the {what} went into nobody's {old}: {got[what]}"
        assert got["private"] == [True, True, True]
        assert os.stat(old).st_uid == NOBODY  # nobody's directory is left alone at exit
    finally:
        shutil.rmtree(old, ignore_errors=True)


# Python 3.10.0-3.10.8 (CVE-2022-42919; fixed in 3.10.9 and 3.11.0) named the forkserver's
# socket in Linux's abstract namespace, which has no permissions. The stdlib's choice of those
# versions, for the test to run it on this Python: poolmagic's pool and forkserver are real.
OLD_STDLIB = """
import itertools, os
from multiprocessing import connection, util
_count, _original = itertools.count(), connection.arbitrary_address
def arbitrary_address(family):
    if family == "AF_UNIX" and util.abstract_sockets_supported:
        return f"\\0listener-{os.getpid()}-{next(_count)}"
    return _original(family)
connection.arbitrary_address = arbitrary_address
"""


@pytest.mark.skipif(not ROOT or sys.platform != "linux", reason="needs Linux, and root to act as nobody")
@pytest.mark.timeout(60)
def test_another_user_cannot_reach_the_forkserver_on_a_python_that_names_it_in_the_abstract_namespace(tmp_path):
    """On Python 3.10.0-3.10.8 the forkserver poolmagic starts by default listened on an
    abstract socket: ``nobody`` connected to it and had a pickle of their own unpickled by
    the server's child, as the notebook's user. Its socket must be the file in the private
    directory whatever the Python."""
    marker = tmp_path / "ran-as-the-notebook-user"
    out, err, code = run_script(OLD_STDLIB + f"""
import json, os, pickle, socket
from multiprocessing import forkserver, reduction
from poolmagic import Pool

class Plant:
    def __reduce__(self):
        return (open, ({str(marker)!r}, "w"))

pool = Pool(1)
assert pool.map(abs, [-1]) == [1]
address = forkserver._forkserver._forkserver_address
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the other user, with the address (/proc/net/unix lists it)
    try:
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        os.write(w, pickle.dumps(Plant()))
        a, b = os.pipe()
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(address)
                reduction.sendfds(s, [r, b, a, a])
            os.write(1, b"connected\\n")
        except OSError as exc:
            os.write(1, f"refused: {{exc}}\\n".encode())
    finally:
        os._exit(0)
os.close(r); os.close(w)
os.waitpid(pid, 0)
print(json.dumps({{"abstract": address.startswith("\\0")}}))
pool.shutdown()
""")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith("refused"), out
    assert json.loads(lines[-1]) == {"abstract": False}
    assert not marker.exists()
