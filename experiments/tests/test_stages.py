"""The research stages (experiments/stages): the cluster stage's balanced codes, swapped
prediction and IIC, a cluster run that exports a model, init_from, and the teacher's
label-map contrast (procedural supervision)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from seglib_tests_conftest import tiny_config, tiny_overrides

from experiments.stages.cluster_losses import (
    assignment_stats,
    balanced_codes,
    mutual_information,
    sinkhorn,
    swapped_prediction,
)
from experiments.stages.teacher_research import region_contrast
from seglib.augment import ViewTransform, sample_transforms
from seglib.config import AugmentConfig, Config
from seglib.training.run import run


def test_sinkhorn_codes_are_distributions_with_balanced_columns():
    torch.manual_seed(0)
    logits = torch.randn(600, 6) * 3
    logits[:, 0] += 5  # every position prefers prototype 0
    q = sinkhorn(logits, eps=0.5, iters=50)
    assert torch.allclose(q.sum(1), torch.ones(600), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((6,), 100.0), rtol=0.02)  # N / C each, despite the skew
    assert q.argmax(1).bincount(minlength=6).min() > 0  # every prototype wins somewhere


def test_swapped_prediction_rewards_consistent_confident_views_and_punishes_collapse():
    torch.manual_seed(0)
    b, c, h, w = 2, 4, 8, 8
    # A piecewise-constant "segmentation" with four balanced regions, as confident logits.
    regions = torch.zeros(b, h, w, dtype=torch.long)
    regions[:, :4, 4:], regions[:, 4:, :4], regions[:, 4:, 4:] = 1, 2, 3
    logits_a = 10 * torch.nn.functional.one_hot(regions, c).permute(0, 3, 1, 2).float()
    flip = ViewTransform(torch.tensor([[[-1.0, 0, 0], [0, 1, 0]]]).repeat(b, 1, 1))
    consistent = swapped_prediction(logits_a, logits_a.flip(-1), flip, eps=0.05, iters=3)
    wrong = swapped_prediction(logits_a, logits_a, flip, eps=0.05, iters=3)  # B not flipped: misaligned
    collapsed = swapped_prediction(torch.zeros_like(logits_a), torch.zeros_like(logits_a), flip)
    assert consistent < 0.05
    assert wrong > consistent + 1.0
    assert collapsed == pytest.approx(math.log(c), rel=1e-4)  # uniform predictions: log C
    stats = assignment_stats(logits_a)
    assert stats["prototypes_used"] == 4 and stats["usage_entropy"] == pytest.approx(1.0, abs=1e-3)


def test_mutual_information_is_log_c_for_balanced_consistent_views_and_zero_for_collapse():
    b, c, h, w = 2, 4, 8, 8
    regions = torch.zeros(b, h, w, dtype=torch.long)
    regions[:, :4, 4:], regions[:, 4:, :4], regions[:, 4:, 4:] = 1, 2, 3
    logits_a = 30 * torch.nn.functional.one_hot(regions, c).permute(0, 3, 1, 2).float()
    flip = ViewTransform(torch.tensor([[[-1.0, 0, 0], [0, 1, 0]]]).repeat(b, 1, 1))
    consistent = mutual_information(logits_a, logits_a.flip(-1), flip)  # B is A flipped, as the transform says
    assert float(consistent) == pytest.approx(-math.log(c), abs=1e-3)
    # B shifted by 2 cells before the flip: half of each region meets another one. (B merely
    # not flipped would be a permutation of the regions, which the information ignores.)
    misaligned = mutual_information(logits_a, logits_a.roll(2, -1).flip(-1), flip)
    assert float(misaligned) > float(consistent) + 0.5
    # One cluster everywhere, or uniform probabilities: no information, whatever the window.
    one = torch.zeros_like(logits_a)
    one[:, 0] = 30
    for collapsed in (one, torch.zeros_like(logits_a)):
        assert abs(float(mutual_information(collapsed, collapsed.flip(-1), flip, window=2))) < 1e-4
    # The window pairs neighbours: it costs information at region borders only, less on larger regions.
    large = logits_a.repeat_interleave(4, -1).repeat_interleave(4, -2)  # 16 x 16 cell regions
    small_cost = float(mutual_information(logits_a, logits_a.flip(-1), flip, window=1)) - float(consistent)
    large_cost = float(mutual_information(large, large.flip(-1), flip, window=1)) - float(consistent)
    assert 0 < large_cost < small_cost / 2


def test_mutual_information_matches_the_joint_written_out_and_sends_gradient_to_both_views():
    torch.manual_seed(0)
    la = torch.randn(2, 3, 6, 6, requires_grad=True)
    lb = torch.randn(2, 3, 6, 6, requires_grad=True)
    identity = ViewTransform(torch.tensor([[[1.0, 0, 0], [0, 1, 0]]]).repeat(2, 1, 1))
    loss = mutual_information(la, lb, identity, window=1)
    pa, pb = la.detach().softmax(1), lb.detach().softmax(1)
    joint = torch.zeros(3, 3)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):  # positions of A at p + d paired with B at p, inside the map
            for y in range(6):
                for x in range(6):
                    if 0 <= y + dy < 6 and 0 <= x + dx < 6:
                        joint += torch.einsum("bi,bj->ij", pa[:, :, y + dy, x + dx], pb[:, :, y, x])
    joint = 0.5 * (joint + joint.t())
    joint /= joint.sum()
    expected = -(joint * (joint.log() - joint.sum(1, keepdim=True).log() - joint.sum(0, keepdim=True).log())).sum()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-5)
    loss.backward()
    assert la.grad.abs().sum() > 0 and lb.grad.abs().sum() > 0


def test_colour_statistics_are_window_means_and_spreads():
    from experiments.stages.cluster_losses import colour_statistics

    rgb = torch.zeros(1, 3, 16, 16)
    rgb[..., :, 8:] = 1.0  # left half black, right half white
    stats = colour_statistics(rgb, (4, 4), (1,))  # (1, 6, 4, 4): mean - 0.5, std
    assert stats.shape == (1, 6, 4, 4)
    assert torch.allclose(stats[0, :3, :, 0], torch.full((3, 4), -0.5))  # far left: black, no spread
    assert torch.allclose(stats[0, 3:, :, 0], torch.zeros(3, 4))
    assert torch.allclose(stats[0, :3, :, 1], torch.full((3, 4), 1 / 3 - 0.5))  # one white cell of three
    assert float(stats[0, 3, 0, 1]) == pytest.approx((2 / 9) ** 0.5, abs=1e-5)


def test_swapped_prediction_sends_gradient_to_both_views():
    torch.manual_seed(0)
    la = torch.randn(2, 5, 8, 8, requires_grad=True)
    lb = torch.randn(2, 5, 8, 8, requires_grad=True)
    transforms = sample_transforms([np.random.default_rng(i) for i in range(2)], AugmentConfig())
    swapped_prediction(la, lb, transforms, window=1).backward()
    assert la.grad.abs().sum() > 0 and lb.grad.abs().sum() > 0
    q = balanced_codes(la.detach(), eps=0.05, iters=3, window=1)
    assert torch.allclose(q.sum(1), torch.ones(2, 8, 8), atol=1e-5)


@pytest.mark.parametrize(
    "arch,colourize,iic", [("student", 0.0, 0.0), ("teacher", 0.0, 0.0), ("student", 1.0, 0.0), ("student", 0.0, 1.0)]
)
def test_cluster_stage_trains_on_a_folder_and_exports_a_loadable_model(tmp_path, one_thread, arch, colourize, iic):
    from seglib.models import load_model

    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"a{i}.png")
    cfg = Config.from_dict(
        {
            "stage": "cluster",
            "model": {"encoder": {"width": 16, "depth": 1, "embed_dim": 8}},
            "student": {"size": "tiny", "norm": "batch", "stem": "unshuffle"},
            "stage_options": {"arch": arch, "prototypes": 6, "window": 1, "colourize": colourize, "iic": iic},
            "data": {"synthetic": False, "data_dir": str(folder), "size": 32, "batch_size": 2},
            "train": {"steps": 3, "warmup": 1, "checkpoint_dir": str(tmp_path / "run"), "checkpoint_every": 2},
        }
    )
    history = run(cfg)
    assert len(history["loss/swap"]) == 3 and all(math.isfinite(v) for v in history["loss/swap"])
    if colourize:
        assert all(math.isfinite(v) and v > 0 for v in history["loss/colourize"])
    if iic:  # minus a mutual information: between -(log 6 + log 24) and 0 for the two default heads
        assert all(-math.log(6 * 24) - 1e-4 <= v <= 1e-4 for v in history["loss/iic"])
    assert 1 <= history["diag/prototypes_used"][-1] <= 6
    model = load_model(tmp_path / "run" / f"{arch}.pt")
    labels = model(torch.rand(1, 3, 64, 64), 3)["probs"].argmax(1)
    assert labels.shape == (1, 64, 64) and int(labels.max()) < 3
    saved = torch.load(tmp_path / "run" / "cluster_prototypes.pt", weights_only=True)["model"]
    assert saved["prototypes"].shape == (6, 8)
    assert [saved[k].shape for k in sorted(saved) if k.startswith("iic")] == ([(6, 8), (24, 8)] if iic else [])


def test_init_from_starts_a_teacher_or_cluster_run_from_saved_weights(tmp_path, tiny_teacher_checkpoint):
    from experiments.stages.cluster import ClusterOptions, ClusterTask
    from experiments.stages.teacher_research import TeacherResearchOptions, TeacherResearchTask
    from seglib.models import load_model
    from seglib.training.teacher import TeacherTask

    saved = load_model(tiny_teacher_checkpoint).state_dict()
    cfg = tiny_config()
    path = str(tiny_teacher_checkpoint)
    cfg.train.seed = 5  # other random weights than the saved ones
    torch.manual_seed(5)
    assert not all(
        torch.equal(v, saved[k]) for k, v in TeacherTask(cfg, torch.device("cpu")).model.state_dict().items()
    )
    options = TeacherResearchOptions(init_from=str(tiny_teacher_checkpoint))
    teacher = TeacherResearchTask(cfg, torch.device("cpu"), options)
    assert all(torch.equal(v, saved[k]) for k, v in teacher.model.state_dict().items())
    cluster = ClusterTask(
        cfg, torch.device("cpu"), ClusterOptions(arch="teacher", init_from=str(tiny_teacher_checkpoint))
    )
    assert all(torch.equal(v, saved[k]) for k, v in cluster.model.segmenter.state_dict().items())
    with pytest.raises(ValueError, match="holds a MonolithicSegmenter"):
        ClusterTask(cfg, torch.device("cpu"), ClusterOptions(arch="student", init_from=path))


def test_the_stages_check_their_options(tmp_path):
    """stage_options is checked against the stage's own settings, before anything trains: a typo
    names the setting, a core stage takes none, an unknown stage names the registered ones."""
    from seglib.config import ConfigError
    from seglib.training.run import run

    def config(**settings) -> Config:  # one step into tmp_path, should a check be missed
        return Config.from_dict({**settings, "train": {"steps": 1, "checkpoint_dir": str(tmp_path)}})

    with pytest.raises(ConfigError, match="stage_options.windw.*did you mean 'stage_options.window'"):
        run(config(stage="cluster", stage_options={"windw": 2}))
    with pytest.raises(ConfigError, match="swap, colourize or iic"):
        run(config(stage="cluster", stage_options={"swap": 0.0}))
    with pytest.raises(ConfigError, match="stage teacher has no settings of its own"):
        run(config(stage_options={"window": 2}))
    with pytest.raises(ConfigError, match="unknown stage 'clustr'.*cluster"):
        run(config(stage="clustr"))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- procedural supervision


def test_region_contrast_floor_separation_and_images_kept_apart():
    """At its floor (mean log of each anchor's positives) when classes sit far apart, higher
    when they mix; a class id is read within its own image only."""
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[:, :, 8:] = 1  # two halves per image, 8 positions of each class on a 4 x 4 grid
    apart = torch.zeros(2, 2, 4, 4)
    apart[:, 0, :, :2] = 5.0
    apart[:, 1, :, 2:] = 5.0
    floor = math.log(7)  # 7 other positions of the own class, every one at distance 0
    assert float(region_contrast(apart, labels, 0.2)) == pytest.approx(floor, abs=1e-4)
    mixed = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    assert float(region_contrast(mixed, labels, 0.2)) > floor + 1.0
    # Image 1 swaps which appearance its class 0 has: separation within each image still counts.
    swapped = apart.clone()
    swapped[1] = apart[1].flip(-1)
    assert float(region_contrast(swapped, labels, 0.2)) == pytest.approx(floor, abs=1e-4)
    # Gradients pull a mixed embedding toward the floor.
    x = mixed.clone().requires_grad_(True)
    region_contrast(x, labels, 0.2).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_region_loss_needs_synthetic_tiles(tmp_path):
    from seglib.config import ConfigError
    from seglib.training.run import run

    cfg = Config.from_dict(
        {
            "stage": "teacher_research",
            "stage_options": {"region": 1.0},
            "data": {"synthetic": False, "data_dir": str(tmp_path)},
            "train": {"steps": 1, "checkpoint_dir": str(tmp_path / "runs")},
        }
    )
    with pytest.raises(ConfigError, match="stage_options.region"):
        run(cfg)  # raised as the task is built, before anything trains
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_region_contrast_is_zero_without_positives():
    """Every position its own class: no anchor has a positive, the term is 0 (and differentiable)."""
    labels = torch.arange(16).reshape(1, 4, 4)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = region_contrast(x, labels, 0.1)
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_region_term_trains_on_the_synthetic_label_maps(tmp_path):
    """The region option adds the label-map contrast to the teacher's total: logged and finite,
    and at the first step (same weights, same batch) the total is the plain run's plus the term."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = tiny_overrides(tmp_path / "region", steps=2)
    history = run(Config.from_dict({**over, "stage": "teacher_research", "stage_options": {"region": 1.0}}))
    acc = EventAccumulator(str(tmp_path / "region" / "tb"))
    acc.Reload()
    values = [e.value for e in acc.Scalars("loss/region")]
    assert len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values)
    plain = run(Config.from_dict(tiny_overrides(tmp_path / "plain", steps=2)))
    assert "loss/region" not in plain
    assert history["loss/total"][0] == pytest.approx(plain["loss/total"][0] + history["loss/region"][0], rel=1e-5)
