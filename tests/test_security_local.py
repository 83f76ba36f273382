"""What poolmagic creates on this machine stays private, whatever the umask, and what another
user plants where it once was is never used (hostile review of docs/security.md).

Each test acts as the notebook's user in a fresh interpreter where the umask matters, and, where
the suite runs as root, as another user through a subprocess that ``os.setuid``s to ``nobody``.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

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
