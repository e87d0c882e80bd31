"""``python -m seglib.loto``: see ``seglib.loto.protocol``."""

import sys

from .protocol import main

sys.exit(main())
