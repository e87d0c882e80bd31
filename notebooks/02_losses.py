# %% [markdown]
# # 02 · The losses on cases whose value is known
#
# **Question:** does each training loss measure what its docstring says? Every term below is evaluated on inputs
# constructed so that its value is known in advance: aligned against misaligned views, sharp against uniform
# probabilities, smooth changes against changes that cross an image edge, collapsed against spread features, a
# perfect against an offset reconstruction. A loss that is not zero exactly when it should be, or that does not
# grow in the right direction, would train the model towards the wrong thing.

# %%
# %matplotlib inline
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from seglib.augment import ViewTransform, sample_transforms
from seglib.config import Config
from seglib.device import set_threads
from seglib.losses.recon import gaussian_blur, reconstruction_loss
from seglib.losses.teacher import (
    consistency_loss,
    covariance_penalty,
    edge_aware_smoothness,
    entropy_terms,
    invariance_loss,
    variance_floor,
)
from seglib.viz import show_images, soft_colour

# %% tags=["parameters"]
size = 32  # side of the constructed maps and images (pixels)
k = 4  # clusters in the constructed probability maps
channels = 8  # feature channels of the constructed embeddings
max_shift = 8  # largest misalignment (pixels) of the consistency curve
seed = 0  # torch and numpy seed of the random maps and view transforms
threads = 1  # torch CPU threads (0: torch's default)

# %% [markdown]
# The loss settings (edge sigma, variance floor) are the package defaults, `Config().loss`; every case records its
# measured value next to the value it must have.

# %%
set_threads(threads)
torch.manual_seed(seed)
loss_cfg = Config().loss
cases = []  # (loss, case, measured, expected)


def record(loss: str, case: str, measured: torch.Tensor | float, expected: float) -> None:
    cases.append((loss, case, float(measured), expected))


# Smooth random cluster maps: softmax of blurred noise, so neighbouring pixels mostly agree.
logits = F.avg_pool2d(torch.randn(2, k, size, size), 5, 1, 2) * 20  # (B, K, H, W)
probs = logits.softmax(1)

# %% [markdown]
# ## Consistency: aligned against misaligned views
#
# View B is the tile under a random geometric transform G (flip, rotation by 90 degrees, crop). The consistency loss
# warps view A's probabilities by the *same* G and compares them with view B's by symmetric KL. If B's probabilities
# are exactly A's warped ones (a perfectly equivariant model), the loss is 0; shifting B's map by a few pixels, or
# using an unrelated map, makes it grow.

# %%
rngs = [np.random.default_rng([seed, i]) for i in range(len(probs))]
transform = sample_transforms(rngs, Config().augment)
probs_b = transform.to_view(probs)  # what an equivariant model would output on view B
record("consistency", "view B = G(view A)", consistency_loss(probs, probs_b, transform), 0.0)
by_shift = [float(consistency_loss(probs, probs_b.roll(s, dims=-1), transform)) for s in range(max_shift + 1)]
unrelated = consistency_loss(probs, probs_b.flip(0), transform)  # the other image's map
print(f"shifted by 1 px: {by_shift[1]:.4f}, by {max_shift} px: {by_shift[-1]:.4f}, unrelated map: {unrelated:.4f}")
cases.append(("consistency", f"shift {max_shift} px > shift 1 px > 0", float(by_shift[-1] > by_shift[1] > 0), 1.0))

# %% [markdown]
# ## Entropy terms: sharp against uniform probabilities
#
# The pixel term is the mean per-pixel entropy over log K: 0 for one-hot maps, 1 for uniform ones. The marginal term
# is one minus the entropy of the average cluster sizes over log K: 0 when all K clusters are used equally, 1 when
# everything falls into one cluster (the collapse it exists to prevent).

# %%
stripes = (torch.arange(size) * k // size).expand(size, size)  # K vertical stripes of equal width
one_hot = F.one_hot(stripes, k).permute(2, 0, 1)[None].float()  # (1, K, H, W), balanced when K divides size
uniform = torch.full_like(one_hot, 1 / k)
collapsed = F.one_hot(torch.zeros_like(stripes), k).permute(2, 0, 1)[None].float()
for name, p, pixel_expected, marginal_expected in [
    ("one-hot, balanced", one_hot, 0.0, 0.0),
    ("uniform", uniform, 1.0, 0.0),
    ("one-hot, one cluster", collapsed, 0.0, 1.0),
]:
    pixel, marginal = entropy_terms(p)
    record("pixel entropy", name, pixel, pixel_expected)
    record("marginal entropy", name, marginal, marginal_expected)
sharpness = [0.1, 0.3, 1, 3, 10, 30, 100]
by_sharpness = [float(entropy_terms((logits * b / 20).softmax(1))[0]) for b in sharpness]

# %% [markdown]
# ## Edge-aware smoothness: smooth against edge-crossing changes
#
# The term is the total variation of the probabilities, weighted by exp(-|dI|_1 / sigma) where the image changes.
# Take a two-colour image (left and right halves differ by `c` in each channel) and a map that switches from one
# cluster to another along a vertical line. Only the horizontal neighbour pairs across the line differ, each by 1 (half
# the L1 distance of two one-hot vectors), and there are H of them among H(W-1) pairs, so the loss is
# 0.5 * w / (W - 1) with w = exp(-3c / sigma) on the edge and w = 1 anywhere else. A switch that sits on a strong
# edge costs nothing; the same switch in a flat area costs the full amount; a constant map costs 0.


# %%
def two_colour_image(contrast: float) -> torch.Tensor:
    img = torch.full((1, 3, size, size), 0.4)
    img[..., size // 2 :] += contrast
    return img


def switch_at(column: int) -> torch.Tensor:
    labels = (torch.arange(size) >= column).long().expand(size, size)
    return F.one_hot(labels, k).permute(2, 0, 1)[None].float()


sigma = loss_cfg.edge_sigma
full_cost = 0.5 / (size - 1)
edge = two_colour_image(0.3)
record("smoothness", "switch on a strong edge", edge_aware_smoothness(switch_at(size // 2), edge, sigma), 0.0)
record("smoothness", "switch in a flat area", edge_aware_smoothness(switch_at(size // 4), edge, sigma), full_cost)
record("smoothness", "constant map", edge_aware_smoothness(uniform, edge, sigma), 0.0)
contrasts = np.linspace(0, 0.1, 11)
by_contrast = [float(edge_aware_smoothness(switch_at(size // 2), two_colour_image(c), sigma)) for c in contrasts]
expected_by_contrast = [full_cost * math.exp(-3 * c / sigma) for c in contrasts]
record(
    "smoothness",
    "max |measured - formula| over contrast",
    max(abs(a - b) for a, b in zip(by_contrast, expected_by_contrast, strict=True)),
    0.0,
)

# %% [markdown]
# ## Feature terms: collapsed against spread embeddings
#
# * `variance_floor` is a hinge on each channel's standard deviation (over all positions of the batch): features that
#   collapsed to one vector pay `floor - 0.01` (the 0.01 is the square root of the 1e-4 that keeps the gradient
#   finite), features spread wider than the floor pay 0.
# * `covariance_penalty` sums the squared off-diagonal covariances over the channels: 0 in expectation for
#   independent channels (a little sampling noise), D - 1 when all D unit-variance channels carry the same signal.
# * `invariance_loss` compares view B's features with A's warped by G: 0 when they correspond, 2 (twice the variance)
#   for independent unit-variance features (with G the identity: a crop would interpolate, and so smooth, A's
#   features).

# %%
floor = loss_cfg.variance_floor
collapsed_features = torch.ones(2, channels, size, size)
spread_features = 2 * floor * torch.randn(2, channels, size, size)
record("variance floor", "collapsed features", variance_floor(collapsed_features, floor), floor - 0.01)
record("variance floor", "std twice the floor", variance_floor(spread_features, floor), 0.0)
independent = torch.randn(4, channels, size, size)
signal = torch.randn(4, 1, size, size)
identical = ((signal - signal.mean()) / signal.std()).expand(-1, channels, -1, -1)  # exactly unit variance
record("covariance", "independent channels", covariance_penalty(independent), 0.0)
record("covariance", "identical channels", covariance_penalty(identical), channels - 1)
features_a = torch.randn(2, channels, size, size)
identity = ViewTransform.identity(len(features_a))
record("invariance", "B = G(A)", invariance_loss(features_a, transform.to_view(features_a), transform), 0.0)
features_b = torch.randn_like(features_a)
record("invariance", "independent features, G = identity", invariance_loss(features_a, features_b, identity), 2.0)

# %% [markdown]
# ## Reconstruction (the student's autoencoder loss)
#
# L1 on the values plus `grad_weight` times L1 on Sobel gradient magnitudes. A perfect prediction costs 0; a prediction
# offset by 0.1 everywhere costs exactly 0.1 (a constant offset has the same gradients); a blurred prediction keeps the
# mean colour but loses edges, which only the gradient term sees.

# %%
grad_weight = Config().autoencoder.grad_weight
target = two_colour_image(0.3)
record("reconstruction", "perfect", reconstruction_loss(target, target, grad_weight), 0.0)
record("reconstruction", "offset by 0.1", reconstruction_loss(target + 0.1, target, grad_weight), 0.1)
blurred = gaussian_blur(target, 2.0, 9)
with_gradient_term = reconstruction_loss(blurred, target, grad_weight)
record("reconstruction", "blurred: gradient term > 0", with_gradient_term > reconstruction_loss(blurred, target, 0), 1)

# %% [markdown]
# ## Summary (regression-checked)
#
# Every constructed case, its measured value and the value it must have. `ok` allows a small tolerance only for the
# two cases that involve sampling noise (independent random channels or features).

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'loss':<17}{'case':<44}{'measured':>9}{'expected':>9}  ok")
for loss, case, measured, expected in cases:
    ok = abs(measured - expected) < (0.1 if "independent" in case else 1e-3)
    print(f"{loss:<17}{case:<44}{round(measured, 4) + 0.0:>9.4f}{expected:>9.4f}  {ok}")  # + 0.0: no "-0.0000"

# %% [markdown]
# ## Plots

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
axes[0].plot(range(max_shift + 1), by_shift, "o-")
axes[0].axhline(float(unrelated), color="grey", ls=":", label="unrelated map")
axes[0].set(xlabel="misalignment of view B (px)", ylabel="symmetric KL", title="consistency")
axes[0].legend()
axes[1].semilogx(sharpness, by_sharpness, "o-")
axes[1].set(xlabel="sharpness (logit scale)", ylabel="pixel entropy / log K", title="entropy", ylim=(-0.05, 1.05))
axes[2].plot(contrasts, by_contrast, "o", label="measured")
axes[2].plot(contrasts, expected_by_contrast, "-", label="0.5 exp(-3c/sigma) / (W-1)")
axes[2].set(xlabel="edge contrast c per channel", ylabel="smoothness", title="switch on an edge")
axes[2].legend()
fig.tight_layout()
plt.show()

# %%
show_images(
    [
        [soft_colour(probs)[0].permute(1, 2, 0).numpy(), soft_colour(probs_b)[0].permute(1, 2, 0).numpy()],
        [edge[0].permute(1, 2, 0).numpy(), soft_colour(switch_at(size // 2))[0].permute(1, 2, 0).numpy()],
        [edge[0].permute(1, 2, 0).numpy(), soft_colour(switch_at(size // 4))[0].permute(1, 2, 0).numpy()],
    ],
    [
        ["view A probabilities", "view B = G(view A)"],
        ["image", "switch on the edge: cost 0"],
        ["image", "switch in a flat area: full cost"],
    ],
)
plt.show()

# %% [markdown]
# **Reading it.** Each term is zero exactly in the case it rewards and takes the predicted value in the case it
# penalises; the consistency loss grows with misalignment, the entropy falls with sharpness, and the smoothness
# follows exp(-3c/sigma) as the edge gets stronger. The full teacher objective (`TeacherLoss`) is the weighted sum of
# these terms with the weights of `Config().loss`; notebook 03 trains with it.
