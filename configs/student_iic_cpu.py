"""Recipe student_iic_cpu: see seglib/recipes.py (what it is for, how long it takes)."""

from seglib.recipes import STUDENT_IIC_CPU as CONFIG  # noqa: F401
