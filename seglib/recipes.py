"""Named training recipes: config overrides on top of the dataclass defaults.

The files in ``configs/`` are one-line wrappers around these, for ``--config configs/X.py``.
experiments/LOG.md has what each recipe gave, how long it took and why it is set as it is.
"""

from __future__ import annotations

__all__ = [
    "FAST_STUDENT",
    "TEACHER_SYNTHETIC_CPU",
    "TEACHER_DUBAI_CPU",
    "TEACHER_DUBAI_FT_CPU",
    "STUDENT_SYNTHETIC_CPU",
    "STUDENT_DUBAI_CPU",
    "STUDENT_CLUSTER_CPU",
    "STUDENT_IIC_CPU",
    "TEACHER_REGION_CPU",
]

_TRAIN = {"lr": 2e-3, "warmup": 50, "image_every": 100, "seed": 0}

# The teacher on procedural tiles: 800 steps of 4 crops of 128 px (longer was worse).
TEACHER_SYNTHETIC_CPU: dict = {
    "stage": "teacher",
    "data": {"synthetic": True, "size": 128, "batch_size": 4},
    "train": {**_TRAIN, "steps": 800, "checkpoint_every": 200},
}

# The same teacher on a folder of real tiles (no labels); pass --data-dir.
TEACHER_DUBAI_CPU: dict = {
    "stage": "teacher",
    "data": {"synthetic": False, "size": 128, "batch_size": 4},
    "train": {**_TRAIN, "steps": 2000, "checkpoint_every": 250},
}

# What the shipped students are: the `tiny` CNN with a space-to-depth stem, and at inference a
# cheaper head than the teacher's (docs/models.md): 4 radius-1 denoising passes 1, 2, 4, 1
# cells apart, 3 soft k-means iterations, the guided filter at the stride-4 grid.
FAST_STUDENT: dict = {
    "size": "tiny",
    "norm": "batch",
    "stem": "unshuffle",
    "head": {"denoise_iters": 4, "denoise_radius": 1, "denoise_dilations": (1, 2, 4), "iters": 3},
    "refine": {"smooth_iters": 0, "guide_scale": 4},
}

# The student distilled from a synthetic teacher (pass --teacher-checkpoint).
STUDENT_SYNTHETIC_CPU: dict = {
    "stage": "student",
    "data": {"synthetic": True, "size": 128, "batch_size": 4},
    "student": FAST_STUDENT,
    "train": {**_TRAIN, "steps": 1500, "checkpoint_every": 250},
}

# The bundled default student: distilled on real tiles shrunk by 2, run on images shrunk by 2,
# with 1 soft k-means iteration, a size prior of 3 and the weight average of the last steps
# (each measured on the development tiles: experiments/LOG.md, "Real imagery").
STUDENT_DUBAI_CPU: dict = {
    "stage": "student",
    "data": {"synthetic": False, "size": 128, "batch_size": 4, "downscale": 2},
    "student": {**FAST_STUDENT, "downsample": 2, "head": {**FAST_STUDENT["head"], "iters": 1, "size_prior": 3.0}},
    "train": {**_TRAIN, "steps": 1500, "checkpoint_every": 250, "weight_average_decay": 0.995},
}

# Research recipes of the leave-one-tile-out study (experiments/LOG.md, "Leave-one-tile-out"); none
# beat the bundled recipe under that protocol, they are kept so that the study can be reproduced.
#
# The synthetic teacher fine-tuned on real tiles shrunk by 2 (no labels): pass
# --set train.init_from=runs/teacher_synthetic_cpu/teacher.pt. Scored with the bundled student's
# head (half resolution, 1 k-means iteration, size prior 3). 3-8 minutes on 1 CPU thread of a
# loaded 2-core machine.
TEACHER_DUBAI_FT_CPU: dict = {
    "stage": "teacher",
    "data": {"synthetic": False, "size": 128, "batch_size": 4, "downscale": 2},
    "randomize": {"downsample": [1]},
    "train": {"steps": 200, "lr": 5e-4, "warmup": 20, "checkpoint_every": 200, "image_every": 200, "seed": 0},
}

# Stage "cluster": the bundled student's architecture and head trained from scratch on real tiles
# shrunk by 2 by dense swapped prediction (32 prototypes, Sinkhorn-balanced codes averaged over
# 5 x 5 cells; seglib.losses.cluster). 2-8 minutes on 1 CPU thread of a shared 2-core machine.
STUDENT_CLUSTER_CPU: dict = {
    "stage": "cluster",
    "data": {"synthetic": False, "size": 128, "batch_size": 4, "downscale": 2},
    "student": STUDENT_DUBAI_CPU["student"],
    "cluster": {"window": 2},
    "train": {**_TRAIN, "steps": 1000, "checkpoint_every": 250, "image_every": 250, "weight_average_decay": 0.995},
}

# IIC (Ji et al. 2019) on the same architecture, from scratch: the mutual information of the two
# views' assignments over displacements of up to 2 cells, a 6-cluster head and a 24-cluster
# over-clustering head, no swap (seglib.losses.cluster.mutual_information).
STUDENT_IIC_CPU: dict = {
    **STUDENT_CLUSTER_CPU,
    "cluster": {"swap": 0.0, "iic": 1.0, "iic_heads": (6, 24), "iic_window": 2},
}

# Procedural supervision: the synthetic teacher with a contrast of its learned features by the
# synthetic tiles' label maps (``loss.region``; no real label is read), twice the steps. About
# 13 minutes on 1 CPU thread of a shared 2-core machine.
TEACHER_REGION_CPU: dict = {
    **TEACHER_SYNTHETIC_CPU,
    "loss": {"region": 1.0, "region_temperature": 0.1},
    "train": {**TEACHER_SYNTHETIC_CPU["train"], "steps": 1600, "checkpoint_every": 400},
}
