"""Write docs/settings.md, the list of every setting, from the dataclasses of ``seglib.config``.

    python docs/settings.py           # rewrite docs/settings.md
    python docs/settings.py --check   # exit 1 if docs/settings.md is not what the code says

Each setting's line is its key, its default and the comment on its line in ``seglib/config.py``;
a setting without a comment is an error. ``tests/test_config.py`` runs the check.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
import tokenize
from pathlib import Path

from seglib.config import Config

OUT = Path(__file__).resolve().parent / "settings.md"

HEADER = """# Settings

Every setting of `seglib.config.Config`, generated from the dataclasses by `python docs/settings.py`
(`tests/test_config.py` fails when this page and the code disagree). Set them with
`--set key=value`, `--config` (a recipe of `seglib/recipes.py` by name, or a Python file returning
a dict of overrides), or `Config.from_dict(...)` in Python; the precedence and the checks are in
the README ("Training"). Every checkpoint and TensorBoard run stores the full config. A plugin
stage's own settings go in `stage_options` (checked by that stage, `seglib.training.stages`).
"""


def comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line (or on the line that closes it) in the class body."""
    source = inspect.getsource(cls)
    out: dict[str, str] = {}
    pending: str | None = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and pending is None and tok.string != "def":
            pending = tok.string  # a field line starts at the class body's indentation
        elif tok.type == tokenize.COMMENT and pending is not None:
            out[pending] = tok.string.lstrip("# ").strip()
        elif tok.type == tokenize.NEWLINE:
            pending = None
    return out


def _value(value: object) -> str:
    return json.dumps(value) if not isinstance(value, str) else f'"{value}"'


def sections(obj: object, prefix: str = "") -> list[tuple[str, type, list[tuple[str, str, str]]]]:
    """(section key, dataclass, [(key, default, meaning)]) for ``obj`` and its nested dataclasses."""
    rows, nested = [], []
    notes = comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            nested += sections(value, f"{prefix}{f.name}.")
            continue
        if f.name not in notes:
            raise SystemExit(f"seglib/config.py: {type(obj).__name__}.{f.name} has no comment to document it")
        rows.append((f"{prefix}{f.name}", _value(_plain(value)), notes[f.name]))
    return [(prefix.rstrip("."), type(obj), rows), *nested]


def _plain(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def render() -> str:
    parts = [HEADER]
    for key, cls, rows in sections(Config()):
        if not rows:
            continue
        title = f"`{key}`" if key else "top level"
        parts.append(f"\n## {title} ({cls.__name__})\n")
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            parts.append(inspect.cleandoc(cls.__doc__) + "\n")
        parts.append("| key | default | meaning |\n|---|---|---|")
        parts += [f"| `{k}` | `{d}` | {m.replace('|', '/')} |" for k, d, m in rows]
    total = sum(len(rows) for _, _, rows in sections(Config()))
    parts.append(f"\n{total} settings.\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/settings.md is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date; run `python docs/settings.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
