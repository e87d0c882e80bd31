"""Notebook parameters that papermill passes: refuse names the notebook does not declare.

papermill injects every parameter it is given as a cell of assignments (its first line is the
comment ``# Parameters``) right after the cell tagged ``parameters``, and only *warns* about a
name the notebook does not declare: a misspelt ``stepz=10`` runs the notebook with its default
``steps`` and exits 0. Each notebook therefore calls ``check_parameters()`` in the cell after its
parameters cell. Executed in order, the kernel's input history then ends with the parameters
cell, the injected cell (when papermill injected one) and the checking cell itself;
``check_parameters`` compares the names and value types of the injected cell with the
parameters cell's and raises ``ParameterError`` (failing the papermill run) on a name that is
not declared or a value whose type differs from the default's. Without injection (Jupyter,
nbval, ``notebooks/refresh.py``) there is nothing to check.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Sequence
from typing import Any

__all__ = ["ParameterError", "INJECTED_MARKER", "declared_parameters", "parameter_problems", "check_parameters"]

INJECTED_MARKER = "# Parameters"  # papermill's first line of the injected cell
PAPERMILL_NAMES = ("PAPERMILL_INPUT_PATH", "PAPERMILL_OUTPUT_PATH")  # injected by --inject-paths


class ParameterError(ValueError):
    """A papermill parameter the notebook does not declare, or of another type than its default."""


def declared_parameters(source: str) -> dict[str, Any]:
    """Name -> default of a parameters cell made of ``name = <literal>`` lines (others ignored)."""
    out: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                out[node.targets[0].id] = None  # not a literal: any value is accepted
    return out


def _injected_names(source: str) -> list[str]:
    return [
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    ]


def parameter_problems(declared: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """One line per parameter in ``given`` that ``declared`` lacks (with the closest valid name)
    or whose value's type differs from the default's (an int is fine for a float)."""
    problems = []
    for name, value in given.items():
        if name in PAPERMILL_NAMES:
            continue
        if name not in declared:
            close = difflib.get_close_matches(name, list(declared), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(f"unknown parameter '{name}': {hint}valid parameters: {', '.join(declared)}")
            continue
        default = declared[name]
        if default is None or type(value) is type(default):
            continue
        if type(default) is float and type(value) is int:
            continue
        fix = " (pass text with papermill -r NAME VALUE)" if isinstance(default, str) else ""
        problems.append(
            f"parameter '{name}' is {type(value).__name__} {value!r}, but its default is "
            f"{type(default).__name__} {default!r}{fix}"
        )
    return problems


def check_parameters(history: Sequence[str] | None = None, namespace: dict[str, Any] | None = None) -> None:
    """Raise ``ParameterError`` when the cell papermill injected just before this one assigns a
    name the parameters cell before it does not declare, or a value of another type.

    ``history`` is the kernel's input history (``In``) ending with the calling cell, and
    ``namespace`` its globals; both default to the running IPython kernel's. Outside IPython,
    or when the previous cell is not papermill's, this does nothing.
    """
    if history is None or namespace is None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover - IPython comes with the notebooks extra
            return
        shell = get_ipython()
        if shell is None:
            return
        history = shell.user_ns.get("In", []) if history is None else history
        namespace = shell.user_ns if namespace is None else namespace
    if len(history) < 3 or not history[-2].lstrip().startswith(INJECTED_MARKER):
        return
    declared = declared_parameters(history[-3])
    given = {name: namespace.get(name) for name in _injected_names(history[-2])}
    if problems := parameter_problems(declared, given):
        raise ParameterError("; ".join(problems))
