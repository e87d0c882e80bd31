"""Recipe teacher_synthetic_cpu: see seglib/recipes.py (what it is for, how long it takes)."""

from seglib.recipes import TEACHER_SYNTHETIC_CPU as CONFIG  # noqa: F401
