"""Choosing images of a folder by name: ``data.include`` / ``data.exclude`` glob patterns.

Training on part of a folder (the four tiles of a leave-one-tile-out fold, say) needs no copy
of the images: ``include=("*t1*", "*t2*")`` keeps the files whose name or stem matches any of
the patterns, ``exclude`` then drops those matching any of its patterns. Patterns are shell
globs (``fnmatch``, case-sensitive). A pattern that matches no file of the folder is an error,
not a silent no-op: a typo would otherwise train on the wrong images.

The patterns' form (a list of non-empty file-name globs) is checked where a config is resolved
(``seglib.config.Config.validate``); here a pattern is only judged by what it matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

from ..io.images import ImageReadError

__all__ = ["matches", "select_images"]


def matches(path: str | Path, patterns: Sequence[str]) -> bool:
    """Whether the file name or its stem matches any of ``patterns``."""
    path = Path(path)
    return any(fnmatchcase(path.name, p) or fnmatchcase(path.stem, p) for p in patterns)


def select_images(
    files: Sequence[Path], *, include: Sequence[str] = (), exclude: Sequence[str] = (), folder: str | Path = ""
) -> list[Path]:
    """``files`` kept by ``include`` (all when empty) minus those matching ``exclude``, in order.

    Raises ``ImageReadError`` when a pattern matches none of ``files`` or nothing is left, and
    ``ValueError`` for a bare string, which would otherwise be read one character at a time."""
    where = f" in {folder}" if folder else ""
    for what, patterns in (("data.include", include), ("data.exclude", exclude)):
        if isinstance(patterns, str):
            raise ValueError(f"{what} takes a list of glob patterns, not the string {patterns!r}; pass [{patterns!r}]")
        for p in patterns:
            if not any(matches(f, [p]) for f in files):
                raise ImageReadError(
                    f"{what} pattern {p!r} matches no image{where} ({len(files)} files, e.g. "
                    f"{', '.join(f.name for f in files[:3])}); check the pattern"
                )
    kept = [f for f in files if (not include or matches(f, include)) and not matches(f, exclude)]
    if not kept:
        raise ImageReadError(
            f"data.include {list(include)} and data.exclude {list(exclude)} leave no image{where}; loosen the patterns"
        )
    return kept
