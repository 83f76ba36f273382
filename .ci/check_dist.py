"""Check what `python -m build` made: the wheel's metadata and files, the sdist's files.

    python .ci/check_dist.py DIST_DIR 3.10 3.11 3.12 3.13

The Python versions are the ones .ci/run tests: the wheel must claim exactly
those (its "Programming Language :: Python :: 3.X" classifiers), no more.
Prints what it checked; exits 1 naming every problem found.
"""
from __future__ import annotations

import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

SDIST_MUST_HAVE = [
    "LICENSE",
    "README.md",
    "pyproject.toml",
    "MANIFEST.in",
    "src/poolmagic/__init__.py",
    "src/poolmagic/py.typed",
    "tests/conftest.py",
    "tests/e2e/e2e_helpers.py",
    "tests/e2e/test_kernel.py",
    "tests/e2e/test_notebooks.py",
    "examples/quickstart.ipynb",
    "examples/errors.ipynb",
    "examples/tutorial.ipynb",
    "docs/design.md",
    "docs/python-versions.md",
    "benchmarks/bench.py",
]
CLASSIFIERS_MUST_HAVE = [
    "Framework :: IPython",
    "Framework :: Jupyter",
    "Operating System :: POSIX :: Linux",
    "Operating System :: MacOS",
]
URLS_MUST_HAVE = ["Homepage", "Documentation", "Issues"]


def main(dist: Path, pythons: list[str]) -> int:
    problems: list[str] = []
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist in {dist}, found {wheels + sdists}")
        return 1
    wheel, sdist = wheels[0], sdists[0]

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = HeaderParser().parsestr(zf.read(meta_name).decode())
    print(f"{wheel.name}: {len(names)} files")
    for must in ("poolmagic/py.typed", "poolmagic/engine/worker.py"):
        if must not in names:
            problems.append(f"wheel: no {must}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("wheel: no dist-info/licenses/LICENSE")
    if any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names):
        problems.append("wheel: carries tests/examples/benchmarks as top-level packages")

    def expect(field: str, value: str) -> None:
        got = meta.get(field)
        print(f"  {field}: {got}")
        if got != value:
            problems.append(f"METADATA {field}: {got!r}, expected {value!r}")

    expect("License-Expression", "BSD-3-Clause")
    expect("License-File", "LICENSE")
    expect("Description-Content-Type", "text/markdown")
    if meta.get("License"):
        problems.append("METADATA has a free-text License field besides License-Expression")
    classifiers = meta.get_all("Classifier") or []
    for c in classifiers:
        print(f"  Classifier: {c}")
    problems += [f"METADATA: no classifier {c!r}" for c in CLASSIFIERS_MUST_HAVE if c not in classifiers]
    if any(c.startswith("License ::") for c in classifiers):
        problems.append("METADATA: a License :: classifier beside the SPDX expression (PEP 639 forbids it)")
    claimed = sorted(c.rsplit(" :: ", 1)[1] for c in classifiers if c.startswith("Programming Language :: Python :: 3."))
    if claimed != sorted(pythons):
        problems.append(f"METADATA claims Python {claimed}, CI tests {sorted(pythons)}")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL") or [])
    for label, url in urls.items():
        print(f"  Project-URL: {label}, {url}")
    problems += [f"METADATA: no Project-URL {u!r}" for u in URLS_MUST_HAVE if u not in urls]
    if len(meta.get_payload() or "") < 1000:
        problems.append("METADATA: the long description (README.md) is missing")

    with tarfile.open(sdist) as tf:
        top = sdist.name[: -len(".tar.gz")]
        files = {m.name.removeprefix(top + "/") for m in tf.getmembers() if m.isfile()}
    print(f"{sdist.name}: {len(files)} files")
    problems += [f"sdist: no {f}" for f in SDIST_MUST_HAVE if f not in files]
    stray = sorted(f for f in files if "__pycache__" in f or f.endswith(".pyc") or "/.venv/" in f)
    if stray:
        problems.append(f"sdist: stray files {stray[:5]}")

    for p in problems:
        print(f"PROBLEM: {p}")
    print("dist check:", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
