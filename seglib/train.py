"""``python -m seglib.train ...`` is ``python -m seglib.train_distill ...``: the trainer of every
stage, under its short name."""

import runpy

if __name__ == "__main__":
    runpy.run_module("seglib.train_distill", run_name="__main__", alter_sys=True)
