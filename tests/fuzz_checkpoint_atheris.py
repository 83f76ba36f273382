"""Coverage-guided fuzzing of the checkpoint reader with atheris (optional; not collected by pytest).

    python tests/fuzz_checkpoint_atheris.py WORKDIR -max_total_time=120

Every input is read as the records of a file whose header is valid and signed
with this run's key; the corpus starts from a real file's records. The reader
may only raise CheckpointFileError, and no record it returns may plant the
marker when unpickled (only records signed with the key are returned).
"""
import os
import pickle
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from poolmagic import checkpointfile

WORK = sys.argv[1]
os.environ["XDG_CONFIG_HOME"] = os.path.join(WORK, "xdg")
MARKER = os.path.join(WORK, "MARKER")


class Plant:
    def __reduce__(self):
        return (open, (MARKER, "w"))


def _seed() -> bytes:
    path = os.path.join(WORK, "seed.ckpt")
    if os.path.exists(path):
        os.unlink(path)
    w = checkpointfile.Writer(path, 0)
    w.meta({"items": 9, "function": "f"})
    for k in range(4):
        w.chunk(range(k, k + 1), b"h%d" % k, pickle.dumps(([k], [], [])), [b"x" * k])
    w.close()
    other = os.path.join(WORK, "other.ckpt")  # records of another file id, planting the marker
    if os.path.exists(other):
        os.unlink(other)
    w = checkpointfile.Writer(other, 0)
    w.chunk([7], b"h", pickle.dumps(([Plant()], [], [])), [])
    w.close()
    return open(path, "rb").read(), open(other, "rb").read()


SEED, OTHER = _seed()
HEADER = SEED[: checkpointfile.HEADER_SIZE]
os.makedirs(os.path.join(WORK, "corpus"), exist_ok=True)
with open(os.path.join(WORK, "corpus", "seed"), "wb") as fh:
    fh.write(SEED[checkpointfile.HEADER_SIZE :] + OTHER[checkpointfile.HEADER_SIZE :])
TARGET = os.path.join(WORK, "target.ckpt")


def one_input(data: bytes) -> None:
    with open(TARGET, "wb") as fh:
        fh.write(HEADER + data)
    try:
        got = checkpointfile.read(TARGET)
    except checkpointfile.CheckpointFileError:
        return
    for _, _, body, frames in got.chunks:
        try:
            pickle.loads(body, buffers=frames)
        except Exception:
            pass
    assert not os.path.exists(MARKER), "an unsigned record was unpickled"


if __name__ == "__main__":
    atheris.Setup([sys.argv[0], os.path.join(WORK, "corpus"), *sys.argv[2:]], one_input)
    atheris.Fuzz()
