"""``python -m experiments.stages.train ...``: ``python -m seglib.train_distill ...`` with the
research stages and recipes of ``experiments.stages`` registered."""

import sys

import experiments.stages  # noqa: F401  (registers the stages and recipes)
from seglib.train_distill import main

if __name__ == "__main__":
    sys.exit(main())
