"""The notebooks (notebooks/0N_*.ipynb) and their parameter files (params/0N_*/{ci,full}.yaml).

* every params file names only parameters of its notebook, with values of the parameter's type
  (papermill itself only warns about unknown names), and ci.yaml is the committed defaults;
* the parameter cell is one cell of plain literals;
* notebooks 04-06 train, when notebook 03's run is absent, exactly 03's teacher (same recipe);
* the committed notebooks hold only the regression cells' text outputs and match their .py twins;
* every notebook executes with papermill and its ci.yaml (executed copies: notebooks/_executed/);
* the nbval regression check is live: a changed stored number fails it.

nbval itself runs over notebooks/ in the same pytest session (pyproject: testpaths and addopts).
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PARAMS = ROOT / "params"
EXECUTED = NOTEBOOKS / "_executed"
SANITIZE = NOTEBOOKS / "sanitize.cfg"
STEMS = [p.stem for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))]
LIVENESS_NOTEBOOK = "02_losses"  # the cheapest to execute


def _refresh_module():
    spec = importlib.util.spec_from_file_location("notebooks_refresh", NOTEBOOKS / "refresh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook_parameters(path: Path) -> dict[str, object]:
    """Name -> default of the notebook's cell tagged ``parameters`` (exactly one such cell,
    holding only ``name = <plain literal>`` lines)."""
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged 'parameters', expected exactly 1"
    params = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), (
            f"{path.name}: the parameters cell may only hold `name = literal` lines, got: {ast.unparse(node)}"
        )
        try:
            params[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(f"{path.name}: parameter {node.targets[0].id} is not a plain literal: {ast.unparse(node)}")
    return params


def params_file_problems(path: Path, parameters: dict[str, object]) -> list[str]:
    """Problems of one params YAML against a notebook's parameters: unknown names (with the valid
    ones listed) and values whose type differs from the default's (an int is fine for a float)."""
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        return [f"{name}: expected a mapping of parameter names to values"]
    problems = []
    for key, value in values.items():
        if key not in parameters:
            problems.append(
                f"{name}: '{key}' is not a parameter of notebooks/{path.parent.name}.ipynb; "
                f"valid names: {', '.join(parameters)}"
            )
            continue
        default = parameters[key]
        ok = type(value) is type(default) or (type(default) is float and type(value) is int)
        if not ok:
            problems.append(
                f"{name}: '{key}' is {type(value).__name__} {value!r}, "
                f"the notebook's default is {type(default).__name__} {default!r}"
            )
    return problems


def effective(stem: str, params_file: str | None) -> dict[str, object]:
    params = notebook_parameters(NOTEBOOKS / f"{stem}.ipynb")
    if params_file:
        params.update(yaml.safe_load((PARAMS / stem / params_file).read_text()) or {})
    return params


# ------------------------------------------------------------------------ parameters


def test_every_notebook_has_ci_and_full_params_and_nothing_else():
    assert STEMS == [
        "01_head_sanity",
        "02_losses",
        "03_teacher_train",
        "04_distill",
        "05_autoencoder",
        "06_eval",
    ]
    for stem in STEMS:
        assert (PARAMS / stem / "ci.yaml").is_file(), f"params/{stem}/ci.yaml is missing"
        assert (PARAMS / stem / "full.yaml").is_file(), f"params/{stem}/full.yaml is missing"
    orphans = sorted(p.name for p in PARAMS.iterdir() if p.is_dir() and p.name not in STEMS)
    assert not orphans, f"params folders without a notebook: {orphans}"


def test_params_files_name_only_parameters_of_their_notebook():
    problems = []
    for path in sorted(PARAMS.glob("*/*.yaml")):
        problems += params_file_problems(path, notebook_parameters(NOTEBOOKS / f"{path.parent.name}.ipynb"))
    assert not problems, "\n".join(problems)


def test_a_misspelled_key_is_reported_with_the_valid_names(tmp_path):
    parameters = notebook_parameters(NOTEBOOKS / "03_teacher_train.ipynb")
    bad = tmp_path / "03_teacher_train" / "ci.yaml"
    bad.parent.mkdir()
    bad.write_text("stepz: 10\nsize: '64'\nlr: 1\n")
    problems = params_file_problems(bad, parameters)
    assert len(problems) == 3, problems
    assert "'stepz' is not a parameter of notebooks/03_teacher_train.ipynb" in problems[0]
    assert "valid names: run_name, resume, steps," in problems[0]
    assert "'size' is str '64', the notebook's default is int 64" in problems[1]
    assert "'lr' is not a parameter" in problems[2]


def test_ci_params_are_the_committed_defaults():
    for stem in STEMS:
        defaults = notebook_parameters(NOTEBOOKS / f"{stem}.ipynb")
        ci = yaml.safe_load((PARAMS / stem / "ci.yaml").read_text())
        differ = {k: (v, defaults.get(k)) for k, v in ci.items() if defaults.get(k) != v}
        assert not differ, f"params/{stem}/ci.yaml differs from the notebook's defaults (ci, default): {differ}"


@pytest.mark.parametrize("params_file", [None, "full.yaml"])
def test_notebooks_04_to_06_train_the_teacher_of_notebook_03(params_file, tmp_path):
    """When 03's run is absent, 04-06 train a teacher themselves from 03's parameters for that run
    (``seglib.runs.teacher_recipe`` reads params/03_teacher_train/<run>.yaml): exactly 03's teacher,
    so their regression numbers do not depend on the order of runs. They do not re-declare 03's
    recipe parameters, and run on the same device and thread count (threads change the rounding)."""
    from seglib.runs import teacher_overrides, teacher_recipe

    teacher = effective("03_teacher_train", params_file)
    recipe_names = {"teacher_model", "teacher_steps", "snapshot_every", "size", "batch_size", "seed"}
    for stem in ("04_distill", "05_autoencoder", "06_eval"):
        params = effective(stem, params_file)
        assert not recipe_names & set(params), f"{stem} re-declares 03's parameters {recipe_names & set(params)}"
        same = {
            k: (params[k], teacher[t])
            for k, t in [("teacher_run", "run_name"), ("device", "device"), ("threads", "threads")]
        }
        assert all(a == b for a, b in same.values()), f"{stem} ({params_file or 'defaults'}) vs 03: {same}"
    names = ("teacher_model", "size", "batch_size", "steps", "seed", "device", "threads", "snapshot_every")
    assert teacher_recipe(teacher["run_name"], tmp_path) == teacher_overrides(
        tmp_path, **{k: teacher[k] for k in names}
    )


# ------------------------------------------------------------------ committed form


def test_committed_notebooks_are_stripped_and_in_step_with_their_twins():
    refresh = _refresh_module()
    problems = []
    for stem in STEMS:
        path = NOTEBOOKS / f"{stem}.ipynb"
        problems += refresh.strip_problems(path) + refresh.twin_problems(path)
        regression = [c for c in nbformat.read(path, as_version=4).cells if refresh.is_regression_cell(c)]
        if len(regression) != 1 or not regression[0].outputs:
            problems.append(f"{stem}: expected one regression cell with stored outputs (run notebooks/refresh.py)")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------- execution


@pytest.mark.slow
@pytest.mark.parametrize("stem", STEMS)
def test_notebook_executes_with_ci_params(stem):
    import papermill

    _refresh_module().check_kernel()
    EXECUTED.mkdir(exist_ok=True)
    parameters = yaml.safe_load((PARAMS / stem / "ci.yaml").read_text())
    tic = time.perf_counter()
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{stem}.ipynb"),
        str(EXECUTED / f"{stem}.ipynb"),
        parameters=parameters,
        kernel_name="python3",
        cwd=str(NOTEBOOKS),
        progress_bar=False,
        execution_timeout=300,  # a CI-scale cell takes seconds; fail fast if one stalls
    )
    print(f"{stem}: {time.perf_counter() - tic:.0f} s")


def _nbval(notebook: Path, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "pytest.ini").write_text("[pytest]\n")  # keep the repository's addopts and testpaths out
    cmd = [sys.executable, "-m", "pytest", "-c", str(cwd / "pytest.ini"), "-p", "no:cacheprovider", "-q"]
    cmd += ["--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE), str(notebook)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_nbval_fails_when_a_stored_number_changes(tmp_path):
    """The regression check is live: the committed notebook passes nbval, the same notebook
    with one digit of its stored regression output changed fails it."""
    nb = nbformat.read(NOTEBOOKS / f"{LIVENESS_NOTEBOOK}.ipynb", as_version=4)
    good = tmp_path / f"{LIVENESS_NOTEBOOK}.ipynb"
    nbformat.write(nb, good)
    result = _nbval(good, tmp_path)
    assert result.returncode == 0, f"the committed notebook fails nbval:\n{result.stdout[-3000:]}"

    bad_nb = copy.deepcopy(nb)
    cell = next(c for c in bad_nb.cells if c.cell_type == "code" and "# NBVAL_CHECK_OUTPUT" in c.source)
    stream = next(o for o in cell.outputs if o.output_type == "stream")
    number = re.search(r"\d+\.\d+", stream.text)
    changed = number.group()[:-1] + str((int(number.group()[-1]) + 1) % 10)
    stream.text = stream.text[: number.start()] + changed + stream.text[number.end() :]
    bad = tmp_path / f"{LIVENESS_NOTEBOOK}_changed.ipynb"
    nbformat.write(bad_nb, bad)
    result = _nbval(bad, tmp_path)
    assert result.returncode == 1, f"nbval did not notice {number.group()} -> {changed}:\n{result.stdout[-3000:]}"
    assert changed in result.stdout, result.stdout[-3000:]


def test_the_regression_cells_print_only_short_rounded_numbers():
    """A guard on what is stored: no long floats (unstable digits) and no run paths."""
    refresh = _refresh_module()
    for stem in STEMS:
        for cell in nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4).cells:
            if not refresh.is_regression_cell(cell):
                continue
            text = json.dumps([o.get("text", o.get("data", {}).get("text/plain", "")) for o in cell.outputs])
            assert not re.search(r"\d+\.\d{5,}", text), f"{stem}: a regression output has more than 4 decimals"
            assert "/runs/" not in text, f"{stem}: a regression output prints a path"
