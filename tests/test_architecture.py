"""The package's import graph: no circles, no module importing the package root or a CLI module.

Every import counts, also those inside functions (a lazy import is still a dependency), and
importing ``seglib.a.b`` also runs ``seglib/a/__init__.py``, so it counts as importing ``seglib.a``
too (unless the importer sits in ``seglib.a`` itself). A CLI module is one with an
``if __name__ == "__main__":`` block.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "seglib"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that importing module ``name`` may run, directly."""
    is_package = path.name == "__init__.py"
    root = name.split(".")[0]
    found: set[str] = set()

    def add(target: str) -> None:
        if not (target == root or target.startswith(root + ".")):
            return
        while target not in modules:  # an attribute of a module, not a module
            target = target.rsplit(".", 1)[0]
        found.add(target)
        parent = target.rsplit(".", 1)[0] if "." in target else ""
        # The subpackages' __init__ run too; the root, and the packages this module sits in, run
        # before it does anyway.
        while parent and parent != root:
            if not name.startswith(parent + "."):
                found.add(parent)
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                add(full if full in modules else origin)
    found.discard(name)
    return found


def is_cli(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (``[a, b, ..., a]``) of ``graph``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def problems(package: Path) -> list[str]:
    modules = module_names(package)
    root = package.name
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    clis = {name for name, path in modules.items() if is_cli(path)}
    out = []
    if cycle := find_cycle(graph):
        out.append("import circle: " + " -> ".join(cycle))
    for name, targets in sorted(graph.items()):
        if name != root and root in targets:
            out.append(f"{name} imports the package root {root}")
        for cli in sorted(targets & clis):
            out.append(f"{name} imports the CLI module {cli}")
    return out


def test_the_package_has_no_import_circle_and_imports_no_root_or_cli_module():
    assert not problems(PACKAGE), "\n".join(problems(PACKAGE))


def test_the_checker_sees_circles_root_and_cli_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")  # lazy, still an edge
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    (pkg / "c.py").write_text("import pkg\nfrom . import cli\n")
    (pkg / "cli.py").write_text("if __name__ == '__main__':\n    pass\n")
    found = problems(pkg)
    assert any(line.startswith("import circle: ") and "pkg.a" in line and "pkg.sub.b" in line for line in found)
    assert "pkg.c imports the package root pkg" in found
    assert "pkg.c imports the CLI module pkg.cli" in found
    (pkg / "sub" / "b.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("from .sub.b import X\n")
    assert problems(pkg) == []


def package_map() -> dict[str, str]:
    """Module -> layer, from the table that opens docs/design.md."""
    layers, layer = {}, ""
    text = (ROOT / "docs" / "design.md").read_text()
    for line in text.split("## The package on one screen", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`seglib/"):
            continue
        layer = cells[0] or layer
        path = cells[1].strip("`")
        layers[".".join(Path(path).with_suffix("").parts).removesuffix(".__init__")] = layer
    return layers


def test_the_package_map_in_the_design_doc_lists_every_module_and_the_imports_keep_to_its_layers():
    modules = module_names(PACKAGE)
    layers = package_map()
    undocumented = sorted(set(modules) - set(layers) - {m for m in modules if modules[m].stat().st_size == 0})
    assert not undocumented, f"modules missing from the map in docs/design.md: {undocumented}"
    assert not set(layers) - set(modules), (
        f"the map names modules that do not exist: {sorted(set(layers) - set(modules))}"
    )
    order = list(dict.fromkeys(layers.values()))
    upward = []
    for name, path in modules.items():
        for target in imports_of(name, path, modules):
            if name in layers and target in layers and order.index(layers[target]) > order.index(layers[name]):
                upward.append(f"{name} ({layers[name]}) imports {target} ({layers[target]})")
    assert not upward, "imports against the layers of docs/design.md:\n" + "\n".join(sorted(upward))
