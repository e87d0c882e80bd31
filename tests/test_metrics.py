"""Metrics on hand-computed cases."""

import numpy as np
import pytest

from seglib.evaluation.metrics import (
    aggregate,
    confusion,
    hungarian_scores,
    many_to_one_scores,
    proxy_scores,
    segmentation_scores,
)


def test_permuted_labels_score_perfectly():
    gt = np.array([[0, 0, 1, 1], [2, 2, 1, 1]])
    pred = np.array([[5, 5, 3, 3], [0, 0, 3, 3]])  # same partition, other ids
    s = segmentation_scores(pred, gt)
    assert s["miou"] == pytest.approx(1.0)
    assert s["pixel_acc"] == pytest.approx(1.0)
    assert s["n_classes"] == 3


def test_hand_computed_hungarian():
    # gt: 6 pixels of class 0, 2 of class 1. pred: one cluster covering everything.
    gt = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    pred = np.zeros(8, dtype=int)
    s = segmentation_scores(pred, gt)
    # cluster 0 matches class 0: IoU 6/8; class 1 is unmatched and scores 0.
    assert s["miou"] == pytest.approx((6 / 8 + 0) / 2)
    assert s["pixel_acc"] == pytest.approx(6 / 8)


def test_unmatched_cluster_pixels_count_as_errors():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 2, 1, 1, 1, 1])  # cluster 2 has no class left to match
    s = segmentation_scores(pred, gt)
    assert s["pixel_acc"] == pytest.approx(7 / 8)
    assert s["miou"] == pytest.approx((3 / 4 + 1.0) / 2)


def test_hungarian_is_one_to_one_and_maximises_iou():
    # Cluster 0 overlaps class 0 best and class 1 second; cluster 1 only overlaps class 1 a bit.
    matrix = np.array([[8, 4], [0, 2]])
    s = hungarian_scores(matrix)
    iou00 = 8 / (12 + 8 - 8)
    iou11 = 2 / (2 + 6 - 2)
    assert s["miou"] == pytest.approx((iou00 + iou11) / 2)


def test_many_to_one_merges_clusters():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # over-segmented 2x
    s = segmentation_scores(pred, gt)
    assert s["m2o_miou"] == pytest.approx(1.0)
    assert s["miou"] == pytest.approx(0.5)  # one-to-one only gets half of each class


def test_ignore_labels_are_dropped():
    gt = np.array([0, 0, 255, 255, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1])
    s = segmentation_scores(pred, gt, ignore=[255])
    assert s["miou"] == pytest.approx(1.0)
    matrix, classes = confusion(pred, gt, ignore=[255])
    assert list(classes) == [0, 1] and matrix.sum() == 4


def test_many_to_one_scores_direct():
    matrix = np.array([[3, 1], [0, 4]])
    s = many_to_one_scores(matrix)
    assert s["pixel_acc"] == pytest.approx(7 / 8)


def test_proxies():
    labels = np.zeros((8, 8), dtype=int)
    labels[:, 4:] = 1
    p = proxy_scores(labels, 2, labels_other_view=labels)
    assert p["utilization"] == pytest.approx(1.0)
    assert p["speckle"] == 0.0
    assert p["boundary_density"] == pytest.approx(8 / (2 * 8 * 7))
    assert p["view_agreement"] == pytest.approx(1.0)
    noisy = np.random.default_rng(0).integers(0, 2, (8, 8))
    assert proxy_scores(noisy, 2)["speckle"] > 0.1
    assert proxy_scores(np.zeros((4, 4), dtype=int), 4)["utilization"] == 0.0


def test_aggregate_means():
    out = aggregate([{"miou": 0.5}, {"miou": 1.0}])
    assert out["miou"] == pytest.approx(0.75) and out["n_images"] == 2


def test_boundary_f1():
    from seglib.evaluation.metrics import boundary_f1

    gt = np.zeros((20, 20), dtype=int)
    gt[:, 10:] = 1
    assert boundary_f1(gt.copy(), gt) == pytest.approx(1.0)
    shifted = np.zeros_like(gt)
    shifted[:, 11:] = 1  # one pixel off: within the 2 px tolerance
    assert boundary_f1(shifted, gt) == pytest.approx(1.0)
    far = np.zeros_like(gt)
    far[:, 16:] = 1
    assert boundary_f1(far, gt) == 0.0
    noisy = np.random.default_rng(0).integers(0, 2, gt.shape)
    assert 0 < boundary_f1(noisy, gt) < 0.5  # many spurious boundaries: low precision
    assert boundary_f1(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
