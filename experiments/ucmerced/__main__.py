"""``python -m experiments.ucmerced``: ``python -m seglib.loto`` with the UC Merced methods
registered (``experiments/ucmerced/methods.py``); every flag is the protocol command's."""

import sys

from seglib.loto import main

from . import methods  # noqa: F401  (registers the UC Merced methods)

sys.exit(main())
