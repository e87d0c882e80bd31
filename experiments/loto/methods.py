"""The research methods of the leave-one-tile-out study (LOG.md, "Leave-one-tile-out"),
registered into the protocol when this module is imported:

    python -m experiments.loto --data ../shared/data/dubai_aerial_dev --methods rgb_kmeans,student_dubai_prior0
    python -m seglib.loto --plugin experiments.loto.methods --list      # the same, through the plugin flag

None of them beat the shipped recipe (``student_dubai``) under the protocol; they are kept so the
study can be reproduced. ``seglib.evaluation.loto.methods`` documents the fields of a ``Method``.
"""

from __future__ import annotations

import copy

import experiments.stages  # noqa: F401  (the research stages and recipes these methods train)
from seglib import recipes
from seglib.evaluation.loto import Method, register

__all__ = ["REAL_HEAD"]

# The bundled student's head at inference (half resolution, 1 k-means iteration, size prior 3),
# for teachers scored the way the bundled student is.
REAL_HEAD = recipes.BUNDLED_HEAD
register(
    Method(
        "teacher_synthetic_real_head",
        eval_of="teacher_synthetic",
        per_fold=False,
        infer=REAL_HEAD,
        about="the synthetic teacher scored with the bundled student's head (half resolution, 1 iteration, prior 3)",
    )
)
register(
    Method(
        "teacher_random_real_head",
        kind="random",
        random_of="teacher_synthetic",
        infer=REAL_HEAD,
        about="the teacher at random weights, the same head",
    )
)
register(
    Method(
        "teacher_dubai_ft",
        recipe="teacher_dubai_ft_cpu",
        init_from="teacher_synthetic",
        infer=REAL_HEAD,
        about="a real-imagery teacher: the synthetic teacher fine-tuned 200 steps on the fold's tiles, same head",
    )
)
register(
    Method(
        "student_cluster",
        recipe="student_cluster_cpu",
        about="the bundled architecture and head trained from scratch on the fold's tiles by dense swapped prediction",
    )
)
register(
    Method(
        "student_iic",
        recipe="student_iic_cpu",
        about="the bundled architecture and head trained from scratch on the fold's tiles by IIC's mutual information",
    )
)
register(
    Method(
        "student_dubai_iic",
        recipe="student_dubai_iic_cpu",
        init_from="student_dubai",
        about="the bundled recipe's fold model fine-tuned 300 steps on the fold's tiles by IIC's mutual information",
    )
)
register(
    Method(
        "teacher_region",
        recipe="teacher_region_cpu",
        per_fold=False,
        about="a teacher trained once on synthetic tiles with a contrast by their label maps (no real label)",
    )
)
register(
    Method(
        "teacher_region_real_head",
        eval_of="teacher_region",
        per_fold=False,
        infer=REAL_HEAD,
        about="that teacher scored with the bundled student's head",
    )
)
# The teachers' learned features alone: the student's head without its colour channels.
for _base in ("teacher_synthetic", "teacher_region"):
    register(
        Method(
            f"{_base}_features",
            eval_of=_base,
            per_fold=False,
            infer=REAL_HEAD,
            attrs={"colour_weight": 0.0},
            about=f"{_base}'s learned features alone (no colour channels), the student's head",
        )
    )
register(
    Method(
        "teacher_random_features",
        kind="random",
        random_of="teacher_synthetic",
        infer=REAL_HEAD,
        attrs={"colour_weight": 0.0},
        about="the teacher at random weights, its features alone, the same head",
    )
)
register(
    Method(
        "student_dubai_region",
        recipe="student_dubai_cpu",
        teacher="teacher_region",
        about="the bundled recipe distilled from teacher_region instead of the synthetic teacher",
    )
)
for _steps in (10, 30):
    register(
        Method(
            f"student_dubai_adapt{_steps}",
            eval_of="student_dubai",
            adapt={"steps": _steps},
            about=f"the bundled recipe adapted {_steps} steps to each image first (seglib.inference.adapt)",
        )
    )
for _name, _infer in {"iters3": {"iters": 3}, "prior0": {"size_prior": 0.0}, "prior5": {"size_prior": 5.0}}.items():
    register(
        Method(
            f"student_dubai_{_name}",
            eval_of="student_dubai",
            infer=_infer,
            about=f"the bundled recipe's weights with another head setting ({_infer}), for the nested choice",
        )
    )

# The compute curve of the bundled recipe: 1/16 and 1/4 of its 1500 steps (warmup and checkpoints
# scaled alike), so that 1x : 4x : 16x = 94 : 375 : 1500 steps and 16x is student_dubai itself;
# a second seed is the variant @x1s1 (student_dubai@x1s1: 1500 steps, seed 1).
for _name, _steps in {"student_dubai_16th": 94, "student_dubai_4th": 375}.items():
    _over = recipes.STUDENT_DUBAI_CPU | {"train": dict(recipes.STUDENT_DUBAI_CPU["train"])}
    _over["train"].update(steps=_steps, warmup=max(1, round(50 * _steps / 1500)), checkpoint_every=_steps)
    register(
        Method(
            _name,
            recipe=copy.deepcopy(_over),
            teacher="teacher_synthetic",
            about=f"the bundled recipe at {_steps} of its 1500 steps (compute curve)",
        )
    )
