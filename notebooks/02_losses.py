# %% [markdown]
# # 02 · The teacher's losses, pixel by pixel
#
# **Question:** where on an image does each training term of the teacher come from? `tests/test_losses.py` checks
# that every term takes its known value on constructed cases (zero for aligned views, one for uniform
# probabilities, ...). This notebook shows what a test cannot: each term as a map over a real aerial tile and a
# synthetic one, for the teacher at its first training step (untrained weights), and the per-channel statistics the
# feature terms act on.
#
# The two views are made as in training (`seglib.augment.make_views`): view A is the tile with photometric jitter,
# view B a flipped, turned and cropped copy with its own jitter. The model clusters both with shared prototypes
# (`group=2`), so cluster k means the same thing in both views, and `TeacherLoss` scores the pair.

# %%
# %matplotlib inline
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from seglib.augment import make_views
from seglib.config import Config
from seglib.data.batches import sample_rngs
from seglib.data.synthetic import make_tile
from seglib.device import set_threads
from seglib.io.images import list_images, read_image
from seglib.losses.teacher import VARIANCE_FLOOR, TeacherLoss, entropy_map, smoothness_maps, symmetric_kl_map
from seglib.models.teacher import MonolithicSegmenter
from seglib.parameters import check_parameters
from seglib.paths import SAMPLE_IMAGES
from seglib.viz import label_image, show_images

# %% tags=["parameters"]
size = 128  # side of the two tiles (multiple of 16): a synthetic tile and the top-left crop of a real one
k = 6  # clusters
real_tile = 0  # which of the three sample tiles shipped in seglib/assets/dubai is cropped
seed = 0  # the teacher's initial weights and the random draws of the views
threads = 1  # torch CPU threads (0: torch's default)

# %%
check_parameters()  # papermill only warns about a parameter this notebook does not declare: fail the run instead

# %% [markdown]
# ## The teacher at step 1, on two tiles
#
# The package's teacher (`Config().model`) with the initial weights a run of seed `seed` starts from, and the loss
# weights of `Config().loss`. Everything below is computed without gradient: the values are those of a training step,
# rounded slightly differently (`seglib.kernels.numerics.inference_numerics`).

# %%
set_threads(threads)
cfg = Config()
torch.manual_seed(seed)
model = MonolithicSegmenter(cfg.model)
loss = TeacherLoss(cfg.loss)
real, _ = read_image(list_images(SAMPLE_IMAGES)[real_tile])
tiles = {
    "synthetic": make_tile(size, seed=seed).rgb,
    "real": real[:size, :size].astype(np.float32) / 255,
}

scores, maps, features = {}, {}, {}
for name, rgb in tiles.items():
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]  # (1, 3, S, S)
    view_a, view_b, transform = make_views(x, sample_rngs(seed, [0], purpose=7), cfg.augment)
    views = torch.cat([view_a, view_b])  # (2, 3, S, S)
    with torch.no_grad():
        out = model(views, k, group=2, full_resolution=False)
        terms = loss(out, views, transform, lane="fast")
    scores[name] = {term: float(value) for term, value in terms.items()}
    pa, pb = out["probs_coarse"].chunk(2)  # (1, K, S/4, S/4) each
    a_in_b = transform.to_view(pa)  # view A's probabilities in view B's frame
    small_b = F.adaptive_avg_pool2d(view_b, pb.shape[-2:])
    vertical, horizontal = smoothness_maps(pb, small_b)
    fa, fb = out["features"].chunk(2)
    maps[name] = {
        "view A": view_a[0].permute(1, 2, 0).numpy(),
        "view B": view_b[0].permute(1, 2, 0).numpy(),
        "B's clusters": label_image(pb[0].argmax(0).numpy()),
        "A's clusters, warped": label_image(a_in_b[0].argmax(0).numpy()),
        "consistency": symmetric_kl_map(a_in_b, pb)[0].numpy(),
        "pixel entropy": (entropy_map(pb)[0] / math.log(k)).numpy(),
        "smoothness": (F.pad(vertical, (0, 0, 0, 1)) + F.pad(horizontal, (0, 1)))[0].numpy(),
        "invariance": (transform.to_view(fa) - fb).square().mean(1)[0].numpy(),
    }
    features[name] = out["features"].transpose(0, 1).flatten(1)  # (F, positions of both views)

# %% [markdown]
# ## Summary (regression-checked)
#
# Each term of `TeacherLoss` (unweighted) and the weighted total, per tile.

# %%
# NBVAL_CHECK_OUTPUT
names = list(scores["synthetic"])
print(f"{'term':<18}" + "".join(f"{name:>11}" for name in tiles))
for term in names:
    print(f"{term:<18}" + "".join(f"{scores[name][term]:>11.3f}" for name in tiles))

# %% [markdown]
# ## The terms as maps
#
# Per tile: the two views; the clusters of view B and those of view A warped into B's frame (what the consistency
# term compares); then, at stride 4, the symmetric KL between the two (**consistency**), the entropy of each
# position's cluster probabilities over log K (**pixel entropy**, 1: undecided), the change of the probabilities to
# the next position, damped across colour edges (**smoothness**), and the squared difference of the raw features of
# corresponding positions (**invariance**). Bright is expensive.

# %%
for name in tiles:
    show_images([list(maps[name].values())], list(maps[name]), size=2.1, suptitle=name)
    plt.show()

# %% [markdown]
# ## What the feature terms see
#
# The variance term is a hinge on each learned channel's standard deviation over all positions of the batch (here
# the two views of one tile), below `VARIANCE_FLOOR`; the covariance term sums the squared off-diagonal
# covariances: together they push every channel's spread up to the floor and keep the channels from carrying the
# same signal.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
for name, z in features.items():
    axes[0].bar(np.arange(len(z)) + (0.4 if name == "real" else 0), z.std(1).numpy(), width=0.4, label=name)
axes[0].axhline(VARIANCE_FLOOR, color="grey", ls=":", label="variance floor")
axes[0].set(xlabel="learned channel", ylabel="std over positions", title="variance term")
axes[0].legend(fontsize=7)
for ax, (name, z) in zip(axes[1:], features.items(), strict=True):
    corr = torch.corrcoef(z).numpy()
    ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_title(f"channel correlations, {name}")
fig.tight_layout()
plt.show()

# %% [markdown]
# **Reading it.** At step 1 the two views hardly share clusters: they differ in brightness and hue (the photometric
# jitter), and the untrained clustering splits them by it, so the consistency term is large nearly everywhere; it is
# the term training has to bring down first. Pixel entropy is high where two clusters compete over a whole region and
# along boundaries; smoothness is small except at isolated switches inside textured regions; the invariance map is
# brightest on texture (the striped field and the trees of the synthetic tile, the fine grain of the real one). Every
# learned channel starts with a spread below the floor, so the variance term acts on all of them. Notebook 03 trains
# the teacher on these terms.
