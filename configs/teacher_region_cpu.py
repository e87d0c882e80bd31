"""Recipe teacher_region_cpu: see seglib/recipes.py (what it is for, how long it takes)."""

from seglib.recipes import TEACHER_REGION_CPU as CONFIG  # noqa: F401
