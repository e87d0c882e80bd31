"""Recipe teacher_dubai_ft_cpu: see seglib/recipes.py (what it is for, how long it takes)."""

from seglib.recipes import TEACHER_DUBAI_FT_CPU as CONFIG  # noqa: F401
