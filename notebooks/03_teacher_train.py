# %% [markdown]
# # 03 · Training the teacher on synthetic tiles
#
# **Question:** does the teacher learn features that segment better than clustering the pixels' colours? We train it
# on procedural aerial-like tiles (whose ground truth we know but never show it), watch the losses and the
# segmentations as training goes on, and score it on the seeded synthetic test set beside RGB k-means (the QGIS
# plugin's free mode) and beside the same network with untrained weights.
#
# The committed parameters are the CI scale (a narrow teacher, 64 px tiles, a few minutes on a laptop CPU at most);
# the real experiment is `params/03_teacher_train/full.yaml`:
#
# ```
# papermill notebooks/03_teacher_train.ipynb notebooks/_executed/03_teacher_train.ipynb \
#     -f params/03_teacher_train/full.yaml
# ```
#
# Checkpoints and TensorBoard events go to `runs/03_teacher_train/<run_name>/`; watch them live with
# `tensorboard --logdir runs` (or `make tensorboard`). Notebooks 04-06 start from this run's `teacher.pt`.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
from IPython import get_ipython

from seglib.config import Config
from seglib.data.synthetic import eval_set
from seglib.device import resolve_device, set_threads
from seglib.evaluation import evaluate_synthetic, summarize
from seglib.models import random_init_like
from seglib.models.teacher import MonolithicSegmenter
from seglib.raster import predict_labels
from seglib.runs import run_folder, snapshots, teacher_overrides
from seglib.training.run import run
from seglib.viz import label_image, match_labels, plot_losses, show_images

# %% tags=["parameters"]
run_name = "ci"  # runs/03_teacher_train/<run_name>/ holds the checkpoints, teacher.pt and the TensorBoard events
resume = False  # True: continue that run from its latest checkpoint; False: start it afresh (an old one is removed)
steps = 150  # optimizer steps
size = 64  # training tile side (multiple of 16)
batch_size = 4  # tiles per step (each gives two augmented views)
teacher_model = {"encoder": {"width": 32, "depth": 2}}  # overrides of Config().model; {}: the package's teacher
snapshot_every = 50  # steps between checkpoints: the snapshots of the segmentations over training
eval_images = 8  # synthetic test tiles
eval_size = 128  # their side
eval_seed = 123  # the test set's seed (disjoint from every training stream)
seed = 0  # run seed: data, augmentations, initial weights
device = "cpu"  # cpu | cuda | auto
threads = 1  # torch CPU threads (0: torch's default); 1 is the CI setting and keeps runs bit-reproducible
show_tensorboard = False  # True: open TensorBoard inside the notebook (needs a live Jupyter front end)

# %% [markdown]
# ## The configuration
#
# The run is the package's default recipe with this notebook's parameters on top (`seglib.runs.teacher_overrides`).
# Notebooks 04-06 read the parameters of a run of this notebook from `params/03_teacher_train/<run_name>.yaml`
# (`seglib.runs.teacher_recipe`) and train this very teacher themselves when the run is absent. The full config is
# stored in every checkpoint and in the TensorBoard run.

# %%
set_threads(threads)
run_dir = run_folder("03_teacher_train", run_name, resume=resume)
overrides = teacher_overrides(
    run_dir,
    teacher_model=teacher_model,
    size=size,
    batch_size=batch_size,
    steps=steps,
    seed=seed,
    device=device,
    threads=threads,
    snapshot_every=snapshot_every,
)
cfg = Config.from_dict(overrides)
print(f"run folder: {run_dir}")
print(f"model: {cfg.model}")
print(f"loss weights: {cfg.loss}")

# %% [markdown]
# TensorBoard shows the loss terms, the learning rate, throughput and the probability maps every `snapshot_every`
# steps. From a terminal: `tensorboard --logdir runs`. Inside the notebook, set `show_tensorboard = True`.

# %%
if show_tensorboard:
    get_ipython().run_line_magic("load_ext", "tensorboard")
    get_ipython().run_line_magic("tensorboard", f"--logdir {run_dir}")

# %% [markdown]
# ## Training
#
# `seglib.training.run.run` is the function the command line calls (`python -m seglib.train`); it returns the history,
# one value per step for every loss term.

# %%
history = run(cfg, resume=resume)

# %% [markdown]
# ## Evaluation beside the baselines
#
# Each test tile is segmented at K = the number of classes it holds; clusters are matched to classes one to one
# (Hungarian mIoU, the headline) and many to one. RGB k-means and the untrained network are scored on the same
# tiles in the same call. The snapshots saved during training are scored the same way.

# %%
run_device = resolve_device(device)
teacher = MonolithicSegmenter.from_checkpoint(run_dir / "teacher.pt").to(run_device)
untrained = random_init_like(teacher, seed=seed).to(run_device)
result = evaluate_synthetic(teacher, n=eval_images, size=eval_size, seed=eval_seed, random_init=untrained)
print(summarize(result))
snaps = [(step, model.to(run_device)) for step, model in snapshots(run_dir)]
over_training = [
    (step, evaluate_synthetic(model, n=eval_images, size=eval_size, seed=eval_seed)["model"]["miou"])
    for step, model in snaps
]

# %% [markdown]
# ## Summary (regression-checked)

# %%
# NBVAL_CHECK_OUTPUT
total = history["loss/total"]
print(f"steps: {history['step'][-1]}; loss/total {total[0]:.2f} at step 1 -> {np.mean(total[-10:]):.2f} (last 10)")
for method in ("model", "random_init", "rgb_kmeans"):
    print(f"{method:<12} mIoU {result[method]['miou']:.2f}   many-to-one {result[method]['m2o_miou']:.2f}")
print("mIoU over training:", {step: round(miou, 2) for step, miou in over_training})

# %% [markdown]
# ## Plots
#
# Loss terms (running mean over 10 steps) and the test mIoU of each snapshot against RGB k-means:

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
plot_losses(history, ax=axes[0])
axes[0].set_title("training losses")
axes[1].plot([s for s, _ in over_training], [m for _, m in over_training], "o-", label="teacher snapshot")
axes[1].axhline(result["rgb_kmeans"]["miou"], color="grey", ls=":", label="RGB k-means")
axes[1].set(xlabel="step", ylabel="Hungarian mIoU", title="test mIoU over training")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Segmentations over training on the first test tiles (clusters coloured by the class they overlap most):

# %%
rows, titles = [], []
for tile in eval_set(min(3, eval_images), eval_size, eval_seed):
    k = tile.n_classes
    maps = [label_image(match_labels(predict_labels(m, tile.rgb, k), tile.labels)) for _, m in snaps]
    rows.append([tile.rgb, label_image(tile.labels), *maps])
    titles.append(["tile", f"ground truth (K={k})", *[f"step {step}" for step, _ in snaps]])
show_images(rows, titles)
plt.show()

# %% [markdown]
# **Reading it.** Compare the model's row with `rgb_kmeans` (what the analyst gets for free) and `random_init` (the
# same network and head without training: what the architecture gives before learning). At the CI scale, a 150-step
# narrow teacher on 64 px tiles, the numbers are regression anchors, not claims, and the snapshot curve is noisy. The
# full recipe (`params/03_teacher_train/full.yaml`) trains the package's teacher on larger tiles for thousands of steps
# and evaluates at 512 px; notebook 06 asks whether label-free metrics would have picked the same snapshot.
