"""``python -m seglib.train_distill ...`` is ``python -m seglib.train ...`` (the trainer of both
stages), kept so that the commands documented with this name keep working."""

import runpy

if __name__ == "__main__":
    runpy.run_module("seglib.train", run_name="__main__", alter_sys=True)
