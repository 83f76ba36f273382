"""Run a notebook in a terminal, showing each cell's code before its output.

``python -m poolmagic.demo examples/quickstart.ipynb`` is the README's demo:
the magics run for real, in an IPython shell, cell by cell, as a reader of the
notebook would run them. ``ipython NOTEBOOK.ipynb`` prints only the outputs.
It stops at the first cell that fails, unless the cell is tagged
``raises-exception`` (as nbclient does).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _prompt(n: int, source: str) -> str:
    lines = source.splitlines() or [""]
    head = f"In [{n}]: "
    pad = " " * (len(head) - 5) + "...: "
    return "\n".join([head + lines[0], *(pad + line for line in lines[1:])])


def run_notebook(path: str | Path, color: bool = True) -> int:
    """Run every code cell of the notebook at ``path``; 0, or 1 at the first unexpected error."""
    import nbformat
    from IPython.terminal.interactiveshell import TerminalInteractiveShell

    nb = nbformat.read(str(path), as_version=4)
    shell = TerminalInteractiveShell.instance(colors="Neutral" if color else "NoColor", history_length=0)
    bold, plain = ("\033[1m", "\033[0m") if color and sys.stdout.isatty() else ("", "")
    n = 0
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            text = cell.source.strip()
            if text:
                print("\n" + "\n".join(line if line.startswith("#") else ("# " + line).rstrip() for line in text.splitlines()))
            continue
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        n += 1
        print(f"\n{bold}{_prompt(n, cell.source)}{plain}", flush=True)
        result = shell.run_cell(cell.source, store_history=True)
        sys.stdout.flush()
        expected = "raises-exception" in cell.metadata.get("tags", [])
        if not result.success and not expected:
            print(f"\npoolmagic demo: cell {n} failed; stopping here.", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m poolmagic.demo", description=__doc__.splitlines()[0])
    ap.add_argument("notebook", nargs="?", default="examples/quickstart.ipynb",
                    help="the notebook to run (default: examples/quickstart.ipynb)")
    ap.add_argument("--no-color", action="store_true", help="plain text, no colours")
    args = ap.parse_args(argv)
    if not Path(args.notebook).is_file():
        ap.error(f"no notebook at {args.notebook!r} (run it from a clone of poolmagic, or name a notebook)")
    return run_notebook(args.notebook, color=not args.no_color)


if __name__ == "__main__":
    sys.exit(main())
