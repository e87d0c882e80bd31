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

from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS

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


def test_notebook_03_declares_the_teacher_recipe_of_seglib_recipes():
    """The recipe's defaults live in ``seglib.recipes.NOTEBOOK_TEACHER``; notebook 03's parameters
    cell (what papermill reads) says the same, name for name."""
    from seglib.recipes import NOTEBOOK_TEACHER

    defaults = notebook_parameters(NOTEBOOKS / "03_teacher_train.ipynb")
    differ = {k: (v, defaults.get(k, "missing")) for k, v in NOTEBOOK_TEACHER.items() if defaults.get(k) != v}
    assert not differ, f"seglib.recipes.NOTEBOOK_TEACHER vs notebook 03's parameters cell: {differ}"


@pytest.mark.parametrize("params_file", [None, "full.yaml", "own.yaml"])
def test_notebooks_04_to_06_train_the_teacher_of_notebook_03(params_file, tmp_path):
    """When 03's run is absent, 04-06 train a teacher themselves from 03's parameters for that run
    (``seglib.recipes.teacher_recipe`` reads params/03_teacher_train/<run>.yaml): exactly 03's teacher,
    so their regression numbers do not depend on the order of runs. They do not re-declare 03's
    recipe parameters, and run on the same device and thread count (threads change the rounding)."""
    from seglib.recipes import teacher_overrides, teacher_recipe

    teacher = effective("03_teacher_train", params_file)
    recipe_names = {"teacher_model", "teacher_steps", "snapshot_every", "size", "batch_size", "seed"}
    for stem in ("04_distill", "05_autoencoder", "06_eval"):
        if params_file and not (PARAMS / stem / params_file).is_file():
            continue  # 06 has no own.yaml: it evaluates synthetic tiles and the shipped samples
        params = effective(stem, params_file)
        assert not recipe_names & set(params), f"{stem} re-declares 03's parameters {recipe_names & set(params)}"
        same = {
            k: (params[k], teacher[t])
            for k, t in [("teacher_run", "run_name"), ("device", "device"), ("threads", "threads")]
        }
        assert all(a == b for a, b in same.values()), f"{stem} ({params_file or 'defaults'}) vs 03: {same}"
    names = ("teacher_model", "size", "batch_size", "steps", "seed", "device", "threads", "snapshot_every")
    names += ("data_dir", "mask_dir", "ignore")
    if teacher["data_dir"] == "path/to/your/tiles":  # own.yaml's placeholder: 04 and 05 pass their data_dir
        with pytest.raises(FileNotFoundError, match="data_dir not found: path/to/your/tiles"):
            teacher_recipe(teacher["run_name"], tmp_path)
        teacher["data_dir"] = str(SAMPLE_IMAGES)
        recipe = teacher_recipe(teacher["run_name"], tmp_path, data_dir=str(SAMPLE_IMAGES))
        assert recipe["data"]["synthetic"] is False and recipe["data"]["data_dir"] == str(SAMPLE_IMAGES)
    else:
        recipe = teacher_recipe(teacher["run_name"], tmp_path)
    assert recipe == teacher_overrides(tmp_path, **{k: teacher[k] for k in names})


def test_a_data_dir_given_to_04_or_05_replaces_the_recipes_data(tmp_path):
    """04 and 05 train 03's teacher on their own data_dir (and distil on it) when given one; an
    empty value keeps 03's, a missing folder fails naming the parameter."""
    from seglib.recipes import teacher_recipe

    assert teacher_recipe("ci", tmp_path)["data"]["synthetic"] is True
    recipe = teacher_recipe("ci", tmp_path, data_dir=str(SAMPLE_IMAGES), mask_dir=str(SAMPLE_MASKS), ignore=[5])
    assert recipe["data"] | {"synthetic": False} == recipe["data"]
    assert (recipe["data"]["data_dir"], recipe["data"]["mask_dir"]) == (str(SAMPLE_IMAGES), str(SAMPLE_MASKS))
    assert recipe["data"]["mask_ignore"] == [5] and recipe["train"] == teacher_recipe("ci", tmp_path)["train"]
    assert teacher_recipe("ci", tmp_path, data_dir="") == teacher_recipe("ci", tmp_path)
    with pytest.raises(FileNotFoundError, match="data_dir not found: nowhere"):
        teacher_recipe("ci", tmp_path, data_dir="nowhere")
    with pytest.raises(TypeError, match="not parameters of notebook 03"):
        teacher_recipe("ci", tmp_path, stepz=3)


def test_every_notebook_checks_its_parameters_right_after_declaring_them():
    """papermill injects its cell right after the parameters cell; the next committed cell must
    be the check, so that the kernel's history holds parameters, injected, check in a row."""
    for stem in STEMS:
        cells = nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4).cells
        index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
        after = cells[index + 1]
        assert after.cell_type == "code" and after.source.splitlines()[0].startswith("check_parameters()"), (
            f"{stem}: the cell after the parameters cell must call check_parameters()"
        )


def _history(parameters_cell: str, injected: str | None) -> list[str]:
    """The kernel's input history when the checking cell runs (``In[0]`` is empty)."""
    return ["", "import x", parameters_cell, *([injected] if injected is not None else []), "check_parameters()"]


def test_check_parameters_refuses_unknown_names_and_wrong_types():
    from seglib.parameters import ParameterError, check_parameters

    declared = 'steps = 150  # optimizer steps\nlr = 0.1\nrun_name = "ci"\nmodel = {}\n'
    check_parameters(_history(declared, None), {})  # no injected cell: Jupyter, nbval, refresh.py
    check_parameters(_history(declared, "# Parameters\nsteps = 10\nlr = 1\n"), {"steps": 10, "lr": 1})
    injected = "# Parameters\nstepz = 10\n"
    with pytest.raises(ParameterError, match="unknown parameter 'stepz': did you mean 'steps'"):
        check_parameters(_history(declared, injected), {"stepz": 10})
    with pytest.raises(ParameterError, match="valid parameters: steps, lr, run_name, model"):
        check_parameters(_history(declared, "# Parameters\nzzz = 1\n"), {"zzz": 1})
    with pytest.raises(ParameterError, match="'steps' is str '10', but its default is int 150"):
        check_parameters(_history(declared, '# Parameters\nsteps = "10"\n'), {"steps": "10"})
    with pytest.raises(ParameterError, match="'run_name' is int 7.*papermill -r NAME VALUE"):
        check_parameters(_history(declared, "# Parameters\nrun_name = 7\n"), {"run_name": 7})
    paths = '# Parameters\nPAPERMILL_INPUT_PATH = "a.ipynb"\nsteps = 3\n'  # papermill --inject-paths
    check_parameters(_history(declared, paths), {"PAPERMILL_INPUT_PATH": "a.ipynb", "steps": 3})


@pytest.mark.slow
def test_papermill_fails_on_an_unknown_notebook_parameter(tmp_path):
    """papermill itself only warns and exits 0; the notebook's check fails the run (exit 1),
    naming the parameter, before anything trains."""
    _refresh_module().check_kernel()
    out = tmp_path / "out.ipynb"
    cmd = [str(Path(sys.executable).parent / "papermill"), str(NOTEBOOKS / "03_teacher_train.ipynb"), str(out)]
    cmd += ["-p", "stepz", "10", "-p", "run_name", "unknown_parameter_test", "--cwd", str(NOTEBOOKS), "-k", "python3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stderr[-2000:]
    assert "unknown parameter 'stepz': did you mean 'steps'?" in result.stderr + result.stdout
    assert not (ROOT / "runs" / "03_teacher_train" / "unknown_parameter_test").exists()  # stopped before training


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


# Notebooks 03-05 on a folder of real tiles: the three samples shipped with the package (with
# masks for 03 and 04, without for 05: label-free proxies), at a few steps. 04 and 05 take 03's
# "ci" teacher (its run, or trained first on the folder when the run is absent).
OWN_DATA = {
    "03_teacher_train": {
        "steps": 8,
        "snapshot_every": 4,
        "size": 64,
        "mask_dir": str(SAMPLE_MASKS),
        "ignore": [5, 255],
    },
    "04_distill": {"steps": 4, "mask_dir": str(SAMPLE_MASKS), "ignore": [5, 255], "bench_repeats": 1},
    "05_autoencoder": {"steps": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("stem", list(OWN_DATA))
def test_notebook_trains_and_evaluates_on_a_folder(stem, tmp_path):
    import shutil

    import papermill

    from seglib.checkpoint import load_checkpoint

    _refresh_module().check_kernel()
    run_name = "own_data_test"
    params = {"run_name": run_name, "data_dir": str(SAMPLE_IMAGES), "eval_size": 96, "eval_images": 3, **OWN_DATA[stem]}
    out = tmp_path / f"{stem}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{stem}.ipynb"),
        str(out),
        parameters=params,
        kernel_name="python3",
        cwd=str(NOTEBOOKS),
        progress_bar=False,
        execution_timeout=300,
    )
    cell = next(c for c in nbformat.read(out, as_version=4).cells if "# NBVAL_CHECK_OUTPUT" in c.source)
    text = "".join(o.get("text", "") for o in cell.outputs)
    assert ("mIoU" in text) == ("mask_dir" in params) and ("view agreement" in text) != ("mask_dir" in params), text
    run_dir = ROOT / "runs" / stem / run_name
    trained = next(run_dir.rglob("student.pt" if stem != "03_teacher_train" else "teacher.pt"))
    config = load_checkpoint(trained)["config"]
    assert config["data"]["synthetic"] is False and Path(config["data"]["data_dir"]) == SAMPLE_IMAGES
    shutil.rmtree(run_dir)


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
    """A guard on what is stored: no long floats (unstable digits), no run paths, and no property
    that was stored failing."""
    refresh = _refresh_module()
    for stem in STEMS:
        for cell in nbformat.read(NOTEBOOKS / f"{stem}.ipynb", as_version=4).cells:
            if not refresh.is_regression_cell(cell):
                continue
            text = json.dumps([o.get("text", o.get("data", {}).get("text/plain", "")) for o in cell.outputs])
            assert not re.search(r"\d+\.\d{5,}", text), f"{stem}: a regression output has more than 4 decimals"
            assert "/runs/" not in text, f"{stem}: a regression output prints a path"
            assert "False" not in text, f"{stem}: a stored regression output holds a failed check"


def _sanitized(text: str) -> str:
    """``text`` as nbval compares it: every [section] regex of sanitize.cfg replaced."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(SANITIZE)
    for section in parser.sections():
        text = re.sub(parser[section]["regex"], parser[section]["replace"], text)
    return text


def test_checked_properties_compare_their_verdict_not_the_measured_value():
    """A checked property prints "...: True (measured +0.231)"; nbval compares the verdict only."""
    line = "teacher beats rgb_kmeans by >= 0.15 mIoU: {} (measured {})\n"
    assert _sanitized(line.format(True, "+0.231")) == _sanitized(line.format(True, "+0.198"))
    assert _sanitized(line.format(True, "+0.231")) != _sanitized(line.format(False, "+0.120"))
    assert _sanitized("random_init  mIoU 0.62") != _sanitized("random_init  mIoU 0.61")  # plain numbers still count
