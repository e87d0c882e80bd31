"""Research training stages, plugins of ``seglib.training.stages``: importing this package
registers them and their recipes.

* ``cluster`` (``cluster.py``): dataset-level clustering on real imagery, swapped prediction
  and IIC;
* ``teacher_research`` (``teacher_research.py``): the teacher with a contrast by the synthetic
  label maps, or started from a trained teacher;
* the recipes of the leave-one-tile-out study that use them (``recipes.py``).

Train with ``python -m experiments.stages.train`` (the trainer's command with these registered),
e.g. ``python -m experiments.stages.train --config student_cluster_cpu --data-dir DIR``.
"""

from . import cluster, recipes, teacher_research  # noqa: F401  (registration)
