"""``python -m experiments.loto``: ``python -m seglib.loto`` with the study's research methods
registered (``experiments/loto/methods.py``); every flag is the protocol command's."""

import sys

from seglib.loto import main

from . import methods  # noqa: F401  (registers the research methods)

sys.exit(main())
