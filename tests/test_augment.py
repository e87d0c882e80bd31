"""Batched augmentation: the per-sample properties the training loop relies on (DDP slicing,
resume), the colour jitter and the distribution of flips and turns."""

import math

import torch

from seglib.augment import _rotate_hue, colour_jitter, make_views_batched, transforms_from_uniforms
from seglib.config import AugmentConfig
from seglib.data.batches import step_generator


def test_batched_views_slice_like_one_process_and_repeat():
    """Each rank draws the global batch's numbers from the same generator and keeps its rows:
    two ranks of 2 produce exactly the views of one process at 4; the same key repeats."""
    cfg = AugmentConfig()
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    views, transform = make_views_batched(x, cfg, step_generator(3, 7, 5))
    for rank in (0, 1):
        rows = slice(2 * rank, 2 * rank + 2)
        part, part_t = make_views_batched(x[rows], cfg, step_generator(3, 7, 5), rows=rows, total=4)
        assert torch.equal(part[:2], views[:4][rows]) and torch.equal(part[2:], views[4:][rows])
        assert torch.equal(part_t.theta, transform.theta[rows])
    again, _ = make_views_batched(x, cfg, step_generator(3, 7, 5))
    other, _ = make_views_batched(x, cfg, step_generator(3, 7, 6))
    assert torch.equal(again, views) and not torch.equal(other, views)
    assert views.min() >= 0 and views.max() <= 1


def test_colour_jitter_is_the_per_image_jitter():
    """One 3x3 matrix and offset per image: the same result as brightness, contrast,
    saturation, hue rotation and noise applied one after the other, image by image."""
    cfg = AugmentConfig()
    torch.manual_seed(1)
    x, u, noise = torch.rand(3, 3, 16, 16), torch.rand(3, 4), torch.randn(3, 3, 16, 16)
    expected = []
    for img, uu, nn in zip(x, u, noise, strict=True):
        j = (2 * uu - 1).tolist()
        img = img + cfg.brightness * j[0]
        mean = img.mean()
        img = (img - mean) * (1 + cfg.contrast * j[1]) + mean
        grey = img.mean(0, keepdim=True)
        img = grey + (img - grey) * (1 + cfg.saturation * j[2])
        img = _rotate_hue(img, 2 * math.pi * cfg.hue * j[3]) + cfg.noise * nn
        expected.append(img.clamp(0, 1))
    assert torch.allclose(colour_jitter(x, u, cfg, noise), torch.stack(expected), atol=1e-5)


def test_transforms_from_uniforms_cover_the_eight_flips_and_turns_evenly():
    u = torch.rand(8000, 4, generator=torch.Generator().manual_seed(0))
    theta = transforms_from_uniforms(u, AugmentConfig(scale_min=0.7)).theta  # (N, 2, 3)
    scale = theta[:, :, :2].abs().amax((1, 2))  # a signed permutation times the crop scale
    assert scale.min() >= 0.7 - 1e-6 and scale.max() <= 1
    assert (theta[:, :, 2].abs() <= (1 - scale)[:, None] + 1e-6).all()  # the crop stays inside
    kinds, counts = torch.unique(torch.sign(theta[:, :, :2]).reshape(-1, 4), dim=0, return_counts=True)
    assert len(kinds) == 8 and counts.min() > 800  # 1000 expected each
    assert (
        torch.unique(
            torch.sign(transforms_from_uniforms(u, AugmentConfig(flip=False)).theta[:, :, :2]).reshape(-1, 4), dim=0
        ).shape[0]
        == 4
    )
