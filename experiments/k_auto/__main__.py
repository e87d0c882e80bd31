"""``python -m experiments.k_auto``: see ``study``."""

import sys

from .study import main

sys.exit(main())
