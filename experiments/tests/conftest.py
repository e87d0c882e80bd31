"""The fixtures of tests/conftest.py (threads, one_thread, a tiny teacher checkpoint...) for the
experiments' tests too; its helpers (tiny_config, tiny_overrides) are importable as
``seglib_tests_conftest``."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "seglib_tests_conftest", Path(__file__).resolve().parents[2] / "tests" / "conftest.py"
)
_shared = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _shared
_spec.loader.exec_module(_shared)  # also: 2 torch threads, the Agg backend, as in tests/

one_thread = _shared.one_thread
tiny_teacher_model = _shared.tiny_teacher_model
tiny_teacher_checkpoint = _shared.tiny_teacher_checkpoint
