"""Paths resolved from the package, never from the caller's working directory.

``SAMPLES`` holds three real aerial tiles with masks (shipped inside the package, see its
README). ``BUNDLED_MODEL`` is the default student shipped in ``seglib/weights/``;
``bundled_model_path()`` returns it or says what to do when it is missing. ``REPO_ROOT`` is the
source checkout when seglib is installed in editable mode (the way this repository is used);
``runs_dir()`` is where notebooks and demos write their runs.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "PACKAGE_DIR",
    "REPO_ROOT",
    "SAMPLES",
    "SAMPLE_IMAGES",
    "SAMPLE_MASKS",
    "BUNDLED_MODEL",
    "BundledModelMissing",
    "bundled_model_path",
    "runs_dir",
]

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
SAMPLES = PACKAGE_DIR / "assets" / "dubai"
SAMPLE_IMAGES = SAMPLES / "images"
SAMPLE_MASKS = SAMPLES / "masks"
BUNDLED_MODEL = PACKAGE_DIR / "weights" / "default_student.pt"


class BundledModelMissing(FileNotFoundError):
    """The package was installed without its default model weights."""


def bundled_model_path() -> Path:
    """``BUNDLED_MODEL``; ``BundledModelMissing`` (a ``FileNotFoundError``) when it is absent."""
    if not BUNDLED_MODEL.is_file():
        raise BundledModelMissing(
            f"the bundled default model is missing ({BUNDLED_MODEL}); pass a checkpoint instead: "
            "seglib.load_model('teacher.pt') in Python, --checkpoint PATH on the command line"
        )
    return BUNDLED_MODEL


def runs_dir(*parts: str) -> Path:
    """``<repo>/runs/<parts...>`` (created), e.g. ``runs_dir("03_teacher_train", "ci")``."""
    path = REPO_ROOT.joinpath("runs", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
