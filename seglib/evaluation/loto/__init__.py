"""Leave-one-tile-out evaluation: train on the images of all tiles but one, score the held-out
tile, for every tile; baselines and random-weight twins in the same run (``python -m seglib.loto``)."""

from .folds import TILE_PATTERN, group_by_tile, nested_choice, paired_difference, summarize, tile_of
from .methods import (
    DEFAULT_METHODS,
    METHODS,
    FoldContext,
    LotoError,
    Method,
    fold_model,
    get_method,
    load_plugin,
    register,
)
from .protocol import format_table, loto_result, run_protocol

__all__ = [
    "TILE_PATTERN",
    "tile_of",
    "group_by_tile",
    "summarize",
    "nested_choice",
    "paired_difference",
    "Method",
    "METHODS",
    "DEFAULT_METHODS",
    "FoldContext",
    "LotoError",
    "fold_model",
    "get_method",
    "register",
    "load_plugin",
    "run_protocol",
    "format_table",
    "loto_result",
]
