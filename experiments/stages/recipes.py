"""The research recipes of the leave-one-tile-out study, registered into ``seglib.recipes`` (so
``--config NAME`` finds them once the plugins are imported). None beat the bundled recipe under
the protocol; the lab log has what each gave."""

from __future__ import annotations

from seglib.recipes import STUDENT_DUBAI_CPU, TEACHER_SYNTHETIC_CPU, register_recipe

_TRAIN = {"lr": 2e-3, "warmup": 50, "seed": 0}

# The synthetic teacher fine-tuned on real tiles shrunk by 2 (no labels): add
# --set stage_options.init_from=runs/teacher_synthetic_cpu/teacher.pt. Scored with the bundled
# student's head. 3-8 minutes on 1 CPU thread of a loaded 2-core machine.
TEACHER_DUBAI_FT_CPU = register_recipe(
    "teacher_dubai_ft_cpu",
    {
        "stage": "teacher_research",
        "data": {"synthetic": False, "size": 128, "batch_size": 4, "downscale": 2},
        "stage_options": {"downsamples": [1]},
        "train": {"steps": 200, "lr": 5e-4, "warmup": 20, "checkpoint_every": 200, "seed": 0},
    },
)

# Stage "cluster": the bundled student's architecture and head trained from scratch on real tiles
# shrunk by 2 by dense swapped prediction (32 prototypes, Sinkhorn-balanced codes averaged over
# 5 x 5 cells). 2-8 minutes on 1 CPU thread of a shared 2-core machine.
STUDENT_CLUSTER_CPU = register_recipe(
    "student_cluster_cpu",
    {
        "stage": "cluster",
        "data": {"synthetic": False, "size": 128, "batch_size": 4, "downscale": 2},
        "student": STUDENT_DUBAI_CPU["student"],
        "stage_options": {"window": 2},
        "train": {**_TRAIN, "steps": 1000, "checkpoint_every": 250, "weight_average_decay": 0.995},
    },
)

# IIC (Ji et al. 2019) on the same architecture, from scratch: the mutual information of the two
# views' assignments over displacements of up to 2 cells, a 6-cluster head and a 24-cluster
# over-clustering head, no swap.
STUDENT_IIC_CPU = register_recipe(
    "student_iic_cpu",
    {**STUDENT_CLUSTER_CPU, "stage_options": {"swap": 0.0, "iic": 1.0, "iic_heads": (6, 24), "iic_window": 2}},
)

# The bundled recipe's model, then IIC on the same tiles at a quarter of the learning rate (add
# stage_options.init_from: the bundled recipe's student.pt of the fold).
STUDENT_DUBAI_IIC_CPU = register_recipe(
    "student_dubai_iic_cpu",
    {
        **STUDENT_IIC_CPU,
        "train": {**STUDENT_IIC_CPU["train"], "steps": 300, "lr": 5e-4, "warmup": 20, "checkpoint_every": 300},
    },
)

# Procedural supervision: the synthetic teacher with a contrast of its learned features by the
# synthetic tiles' label maps (no real label is read), twice the steps. About 13 minutes on 1 CPU
# thread of a shared 2-core machine.
TEACHER_REGION_CPU = register_recipe(
    "teacher_region_cpu",
    {
        **TEACHER_SYNTHETIC_CPU,
        "stage": "teacher_research",
        "stage_options": {"region": 1.0, "region_temperature": 0.1},
        "train": {**TEACHER_SYNTHETIC_CPU["train"], "steps": 1600, "checkpoint_every": 400},
    },
)
