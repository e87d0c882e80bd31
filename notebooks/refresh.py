"""Keep the committed notebooks in their committed form: code and prose, plus the outputs of the
regression cells (``# NBVAL_CHECK_OUTPUT``), which nbval compares on every CI run.

    python notebooks/refresh.py                    # re-execute every notebook with its committed
                                                   # defaults, keep only the regression outputs
    python notebooks/refresh.py 03_teacher_train   # one notebook (a stem or a path)
    python notebooks/refresh.py --strip FILE ...   # strip only (the pre-commit hook); exit 1 if changed
    python notebooks/refresh.py --check            # exit 1 if a notebook is not stripped, or its .py
                                                   # twin is out of step with it

``make notebooks-refresh`` runs the first form. Run it before committing whenever a notebook or
the package's defaults changed: the stored numbers must be what the committed notebook prints.
Stripping keeps, for each regression cell, its text outputs (stdout/stderr streams and text/plain
results) and an execution count of 1 (nbval only compares cells marked as run), and drops
everything else: figures, widget state, other execution counts, per-cell and execution metadata.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
CHECK_MARKER = "# NBVAL_CHECK_OUTPUT"
KEEP_NOTEBOOK_METADATA = ("kernelspec", "jupytext")


def notebook_paths() -> list[Path]:
    """The numbered notebooks, ``notebooks/0N_*.ipynb``, in order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def is_regression_cell(cell) -> bool:
    return cell.cell_type == "code" and any(line.strip() == CHECK_MARKER for line in cell.source.splitlines())


def _text_outputs(outputs: list) -> list:
    """Stream outputs (consecutive chunks of one stream merged) and the text/plain part of
    results; nothing else."""
    kept: list = []
    for out in outputs:
        if out.output_type == "stream":
            if kept and kept[-1].output_type == "stream" and kept[-1].name == out.name:
                kept[-1].text += out.text
            else:
                kept.append(nbformat.v4.new_output("stream", name=out.name, text=out.text))
        elif out.output_type in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
            if out.output_type == "execute_result":
                kept.append(nbformat.v4.new_output("execute_result", data={"text/plain": out.data["text/plain"]}))
            else:
                kept.append(nbformat.v4.new_output("display_data", data={"text/plain": out.data["text/plain"]}))
        elif out.output_type == "error":
            kept.append(out)  # a failing regression cell must stay visible
    return kept


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of ``nb`` as it is committed."""
    nb = copy.deepcopy(nb)
    nb.metadata = nbformat.NotebookNode({k: v for k, v in nb.metadata.items() if k in KEEP_NOTEBOOK_METADATA})
    for cell in nb.cells:
        tags = cell.metadata.get("tags")
        cell.metadata = nbformat.NotebookNode({"tags": tags} if tags else {})
        if cell.cell_type == "code":
            keep = is_regression_cell(cell)
            cell.outputs = _text_outputs(cell.outputs) if keep else []
            # nbval refuses stored outputs of a cell that was never run (execution_count None); a
            # fixed count marks the regression cells as run without churning between refreshes.
            cell.execution_count = 1 if keep else None
            for out in cell.outputs:
                if out.output_type == "execute_result":
                    out.execution_count = 1
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 1200) -> nbformat.NotebookNode:
    """Run ``nb`` with its own defaults (no parameters injected) in the ``python3`` kernel."""
    from nbclient import NotebookClient

    check_kernel()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    return nb


def check_kernel(name: str = "python3") -> None:
    """The ``python3`` kernel papermill and this script use must be this environment's Python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = f"register it with `{sys.executable} -m ipykernel install --sys-prefix --name {name}` (make install does)"
    try:
        argv = KernelSpecManager().get_kernel_spec(name).argv
    except NoSuchKernel:
        raise RuntimeError(f"no Jupyter kernel named {name!r}; {fix}") from None
    # jupyter_client launches a kernel whose argv[0] is plain "python" with sys.executable.
    launcher = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if argv[0] not in launcher and Path(argv[0]).resolve() != Path(sys.executable).resolve():
        raise RuntimeError(f"the {name!r} kernel runs {argv[0]}, not this environment's {sys.executable}; {fix}")


def twin_problems(path: Path) -> list[str]:
    """Differences between a notebook and its percent-format twin (``0N_name.py``), cell by cell."""
    import jupytext

    twin = path.with_suffix(".py")
    if not twin.is_file():
        return [f"{path.name}: no text twin {twin.name} (jupytext --sync {path.name})"]
    nb, text = nbformat.read(path, as_version=4), jupytext.read(twin)

    def cells(book):
        return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in book.cells]

    a, b = cells(nb), cells(text)
    if a == b:
        return []
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return [f"{path.name}: cell {i} differs from {twin.name}; run `jupytext --sync notebooks/{path.name}`"]
    return [f"{path.name}: {len(a)} cells, {twin.name} has {len(b)}; run `jupytext --sync notebooks/{path.name}`"]


def strip_problems(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    if strip(nb) != nb:
        return [f"{path.name}: holds outputs or metadata beyond the regression cells' text; run notebooks/refresh.py"]
    return []


def _resolve(names: list[str]) -> list[Path]:
    if not names:
        return notebook_paths()
    out = []
    for name in names:
        path = Path(name)
        if not path.suffix:
            path = NOTEBOOKS / f"{name}.ipynb"
        if not path.is_file():
            raise SystemExit(f"no notebook {name}")
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", help="stems or paths (default: every notebooks/0N_*.ipynb)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--strip", action="store_true", help="strip only, no execution (exit 1 when a file changed)")
    mode.add_argument("--check", action="store_true", help="report notebooks not stripped or out of step with twins")
    args = p.parse_args(argv)
    paths = _resolve(args.notebooks)

    if args.check:
        problems = [msg for path in paths for msg in strip_problems(path) + twin_problems(path)]
        print("\n".join(problems) or f"{len(paths)} notebook(s) clean and in step with their twins")
        return 1 if problems else 0

    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if not args.strip:
            tic = time.perf_counter()
            print(f"executing {path.name} ...", flush=True)
            execute(nb)
            print(f"  {time.perf_counter() - tic:.0f} s", flush=True)
        new = strip(nb)
        if new != nbformat.read(path, as_version=4):
            nbformat.write(new, path)
            changed.append(path.name)
    print(f"updated: {', '.join(changed)}" if changed else "nothing changed")
    return 1 if args.strip and changed else 0


if __name__ == "__main__":
    sys.exit(main())
