"""Each loss's defining property, and the exact warp between the two views."""

import math

import numpy as np
import pytest
import torch

from seglib.augment import ViewTransform, make_views, sample_transforms
from seglib.config import AugmentConfig, LossConfig
from seglib.losses.teacher import (
    TeacherLoss,
    consistency_loss,
    covariance_penalty,
    edge_aware_smoothness,
    entropy_terms,
    kl_divergence,
    symmetric_kl,
    symmetric_kl_map,
    variance_floor,
)


def rngs(n, seed=0):
    return [np.random.default_rng([seed, i]) for i in range(n)]


def pointwise_model(rgb):
    """An equivariant 'segmenter': per-pixel softmax of a fixed colour projection."""
    w = torch.tensor([[4.0, -2.0, 1.0], [-3.0, 5.0, 0.0], [0.0, -1.0, 6.0]])
    return torch.softmax(torch.einsum("kc,bchw->bkhw", w, rgb), 1)


def smooth_image(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_flips_and_rotations_round_trip_exactly():
    x = torch.rand(3, 2, 16, 16)
    cfg = AugmentConfig(scale_min=1.0)
    t = sample_transforms(rngs(3, 1), cfg)
    back, covered = t.to_source(t.to_view(x))
    assert covered.min() == 1
    assert torch.allclose(back, x, atol=1e-5)


def test_crop_round_trip_inside_the_covered_region():
    x = smooth_image(4, 32)
    t = sample_transforms(rngs(4, 2), AugmentConfig(scale_min=0.6))
    back, covered = t.to_source(t.to_view(x))
    assert 0.3 < covered.mean() < 1.0  # the crop covers part of the source
    inner = torch.nn.functional.avg_pool2d(covered, 5, 1, 2) > 0.999  # away from the crop border
    assert torch.allclose(back * inner, x * inner, atol=0.03)


def test_consistency_zero_for_equivariant_model_and_large_when_misaligned():
    x = smooth_image(4, 32, seed=3)
    cfg = AugmentConfig(scale_min=0.7, brightness=0, contrast=0, saturation=0, hue=0, noise=0)
    a, b, t = make_views(x, rngs(4, 4), cfg)
    pa, pb = pointwise_model(a), pointwise_model(b)
    aligned = consistency_loss(pa, pb, t)
    misaligned = consistency_loss(pa, pb, ViewTransform.identity(4))  # the predecessor's bug
    assert aligned < 0.01
    assert misaligned > 10 * aligned and misaligned > 0.05


def test_symmetric_kl_properties():
    p = torch.softmax(torch.randn(2, 4, 5, 5), 1)
    q = torch.softmax(torch.randn(2, 4, 5, 5), 1)
    assert symmetric_kl(p, p) == pytest.approx(0.0, abs=1e-6)
    assert symmetric_kl(p, q) == pytest.approx(float(symmetric_kl(q, p)), rel=1e-5)
    assert symmetric_kl(p, q) > 0


def test_entropy_terms():
    k = 4
    onehot = torch.nn.functional.one_hot(torch.arange(16).reshape(1, 4, 4) % k, k).permute(0, 3, 1, 2).float()
    pixel, marginal = entropy_terms(onehot)
    assert pixel == pytest.approx(0.0, abs=1e-4)  # sharp
    assert marginal == pytest.approx(0.0, abs=1e-5)  # all clusters used equally
    uniform = torch.full((1, k, 4, 4), 1 / k)
    pixel, marginal = entropy_terms(uniform)
    assert pixel == pytest.approx(1.0, abs=1e-5)
    collapsed = torch.zeros(1, k, 4, 4)
    collapsed[:, 0] = 1
    assert entropy_terms(collapsed)[1] == pytest.approx(1.0, abs=1e-4)
    # normalised by log K: the same shape scores the same at every K
    assert math.isclose(float(entropy_terms(torch.full((1, 9, 2, 2), 1 / 9))[0]), 1.0, rel_tol=1e-5)


def test_smoothness_zero_for_constant_and_cheaper_on_edges():
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[..., 8:] = 1.0  # vertical colour edge between columns 7 and 8
    const = torch.full((1, 2, 16, 16), 0.5)
    assert edge_aware_smoothness(const, rgb) == 0
    on_edge = torch.zeros(1, 2, 16, 16)
    on_edge[:, 0, :, :8] = 1
    on_edge[:, 1, :, 8:] = 1
    off_edge = torch.zeros(1, 2, 16, 16)
    off_edge[:, 0, :, :4] = 1
    off_edge[:, 1, :, 4:] = 1
    assert edge_aware_smoothness(on_edge, rgb) < 0.01 * edge_aware_smoothness(off_edge, rgb)


def test_variance_and_covariance_terms():
    spread = torch.randn(2, 8, 16, 16) * 2
    assert variance_floor(spread, 1.0) == 0
    collapsed = torch.ones(2, 8, 16, 16)
    assert variance_floor(collapsed, 1.0) == pytest.approx(1.0, abs=0.02)
    independent = torch.randn(4, 8, 32, 32)
    correlated = independent[:, :1].expand(-1, 8, -1, -1)
    assert covariance_penalty(correlated) > 10 * covariance_penalty(independent)


def test_teacher_loss_dict():
    from seglib import MonolithicSegmenter

    torch.manual_seed(0)
    m = MonolithicSegmenter()
    x = smooth_image(2, 32)
    a, b, t = make_views(x, rngs(2), AugmentConfig())
    views = torch.cat([a, b])
    out = m(views, 4, lane="learned", group=2)
    terms = TeacherLoss(LossConfig())(out, views, t, lane="learned")
    assert {"total", "consistency", "pixel_entropy", "marginal_entropy", "smoothness", "refine"} <= set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert m.refiner.out.weight.grad is not None


def test_symmetric_kl_is_the_average_of_the_two_kls_to_the_bit():
    """One symmetric KL for teacher and student: without a mask it is exactly the average of
    the two directed KLs (the student's recipes were trained on that rounding)."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 5, 8, 8, generator=g).softmax(1)
    q = torch.randn(2, 5, 8, 8, generator=g).softmax(1)
    assert torch.equal(symmetric_kl(p, q), 0.5 * (kl_divergence(p, q) + kl_divergence(q, p)))
    assert torch.allclose(symmetric_kl_map(p, q).mean(), symmetric_kl(p, q), atol=1e-6)
    full = torch.ones(2, 8, 8)
    assert torch.allclose(symmetric_kl(p, q, full), symmetric_kl(p, q), atol=1e-6)
