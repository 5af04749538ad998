"""Executes the tutorial notebooks with nbclient and saves them with their outputs.

    python notebooks/execute.py                     # the real run, in place (outputs to commit)
    python notebooks/execute.py --fast              # TFEMDE_FAST=1: a smoke run of a few minutes
    python notebooks/execute.py --fast --out /tmp/nb 02_export_and_serve.ipynb

Notebooks run in order (notebook 2 exports the run notebook 1 trains), each in a fresh kernel whose working
directory is `notebooks/`, or DIR with `--out DIR`: executed copies go there, with the run folders they write, and
the notebooks here are left as they are. Any cell error stops the run with a non-zero exit code, and a notebook
that failed is never written in place.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("01_train_with_fit.ipynb", "02_export_and_serve.ipynb", "03_your_own_data.ipynb")
# TensorFlow 2.21 prints a few C++ INFO lines on import whatever TF_CPP_MIN_LOG_LEVEL says; they go to the
# executing process's stderr instead of the notebooks (Python-level output is captured as usual).
KERNEL_ARGUMENTS = ["--IPKernelApp.capture_fd_output=False"]


def execute(path, out=None, cwd=None, fast: bool = False, timeout: int = 3600):
    """Execute one notebook in a fresh kernel and write it with its outputs.

    Args:
        path: the `.ipynb` to run.
        out: where to write the executed notebook; default `path` itself (in place).
        cwd: the kernel's working directory; default the folder of `out`.
        fast: set `TFEMDE_FAST=1` in the kernel's environment (a smoke run); otherwise it is removed.
        timeout: seconds allowed per cell.

    Returns:
        the executed `nbformat.NotebookNode`.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell failed. With `out` given the partly executed notebook is
            written there first (to look at); a failed notebook is never written in place.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = Path(path)
    out = Path(out) if out is not None else path
    cwd = Path(cwd) if cwd is not None else out.parent
    cwd.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(str(path), as_version=4)
    env = dict(os.environ)
    env.pop("TFEMDE_FAST", None)
    if fast:
        env["TFEMDE_FAST"] = "1"
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            coalesce_streams=True, extra_arguments=KERNEL_ARGUMENTS,
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=env, cwd=str(cwd))
    except CellExecutionError:
        if out.resolve() != path.resolve():
            nbformat.write(nb, str(out))
        raise
    nbformat.write(nb, str(out))
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS),
                        help="notebook file names in notebooks/ (default: all three, in order)")
    parser.add_argument("--fast", action="store_true", help="TFEMDE_FAST=1: shrink epochs and data")
    parser.add_argument("--out", help="write executed copies to this folder (also the kernels' working directory)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell (default 3600)")
    args = parser.parse_args(argv)
    from nbclient.exceptions import CellExecutionError

    for name in args.notebooks:
        path = HERE / Path(name).name
        if not path.is_file():
            parser.error(f"no notebook {path}")
        out = Path(args.out) / path.name if args.out else path
        started = time.time()
        print(f"executing {path.name} ({'fast' if args.fast else 'full'} run) -> {out}", flush=True)
        try:
            execute(path, out, fast=args.fast, timeout=args.timeout)
        except CellExecutionError as error:
            print(f"{path.name} failed after {time.time() - started:.0f} s:\n{error}", file=sys.stderr)
            return 1
        print(f"{path.name}: done in {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
