"""``python -m seglib.train ...`` forwards every argument to ``python -m seglib.train_distill``
(the unified entry point), so the predecessor's documented commands keep working."""

from __future__ import annotations

import sys

from .train_distill import main

if __name__ == "__main__":
    sys.exit(main())
