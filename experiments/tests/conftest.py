import os

import torch

# CPU-only and small, like tests/: two threads match the CI machine and keep runs repeatable.
torch.set_num_threads(2)
os.environ.setdefault("MPLBACKEND", "Agg")
