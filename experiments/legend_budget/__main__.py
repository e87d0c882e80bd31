"""``python -m experiments.legend_budget``: see ``study``."""

import sys

from .study import main

sys.exit(main())
