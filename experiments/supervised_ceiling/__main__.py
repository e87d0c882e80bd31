"""``python -m experiments.supervised_ceiling``: see ``ceiling``."""

import sys

from .ceiling import main

sys.exit(main())
