"""The student CNN, its segmenter, the distillation and reconstruction losses, the stage."""

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from seglib.config import Config, DistillConfig, StudentConfig
from seglib.losses.distill import DistillLoss, EmaNormalizer, affinity_loss, aligned_assignments
from seglib.losses.recon import gaussian_blur, reconstruction_loss, reconstruction_target, sobel_magnitude
from seglib.models.student import STUDENTS, StudentBackbone, StudentModelConfig, StudentSegmenter, student_shape


def test_student_slices_and_strides():
    net = StudentBackbone()
    out = net(torch.rand(2, 3, 64, 96))
    assert list(out) == ["coarse", "mid", "fine"]
    assert out["coarse"].shape == (2, 32, 4, 6)
    assert out["mid"].shape == (2, 32, 8, 12)
    assert out["fine"].shape == (2, 32, 16, 24)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 3, 40, 48))


@pytest.mark.parametrize("size", [(64, 96), (32, 32), (112, 48)])
def test_unshuffle_stem_slices_and_strides(size):
    """The space-to-depth stem gives the same slice grid as the strided-conv stem."""
    h, w = size
    net = StudentBackbone(dims=(32, 24, 16), depths=(1, 1, 0), stem="unshuffle")
    out = net(torch.rand(2, 3, h, w))
    for name, stride in (("coarse", 16), ("mid", 8), ("fine", 4)):
        assert out[name].shape == (2, 32, h // stride, w // stride)
    assert isinstance(net.stem[0], torch.nn.PixelUnshuffle)
    with pytest.raises(ValueError, match="unknown student stem"):
        StudentBackbone(stem="patchify")


@pytest.mark.parametrize("norm", ["group", "batch", "instance", "none"])
def test_student_norms(norm):
    net = StudentBackbone(dims=(32, 24, 16), depths=(1, 1, 1), norm=norm)
    assert net(torch.rand(2, 3, 32, 32))["fine"].shape == (2, 32, 8, 8)


def test_fine_slice_sees_coarse_context():
    """Fusion: changing the image far away changes the fine embedding through the coarse path."""
    torch.manual_seed(0)
    net = StudentBackbone(dims=(32, 24, 16), depths=(2, 1, 1)).eval()
    x = torch.rand(1, 3, 64, 64)
    y = x.clone()
    y[..., 48:, 48:] = 0  # bottom-right corner only
    with torch.no_grad():
        a, b = net(x)["fine"], net(y)["fine"]
    assert not torch.allclose(a[..., 0, 0], b[..., 0, 0])  # top-left cell responds


def test_registry_and_overrides():
    assert set(STUDENTS) >= {"tiny", "small", "base"}
    assert student_shape(StudentConfig(size="small")) == (STUDENTS["small"]["dims"], STUDENTS["small"]["depths"])
    assert student_shape(StudentConfig(size="base", dims=(64, 32, 16)))[0] == (64, 32, 16)
    with pytest.raises(ValueError, match="unknown student size"):
        student_shape(StudentConfig(size="huge"))


def test_student_downsample_setting_is_its_own():
    """``student.downsample`` 2: the student reads the image at half resolution (embeddings at
    stride 8 of the input) whatever the teacher's setting, and still returns full-size probs."""
    from seglib.config import Config

    cfg = Config.from_dict({"student": {"size": "tiny", "stem": "unshuffle", "downsample": 2}})
    model = StudentSegmenter(StudentModelConfig.from_config(cfg)).eval()
    assert cfg.model.downsample == 1 and model.config.downsample == 2
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96), 3)
    assert out["embeddings"].shape[-2:] == (8, 12) and out["probs"].shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 3, 48, 48), 3)


@pytest.mark.parametrize("k", [2, 9, 16])
def test_student_segmenter_any_k(k):
    m = StudentSegmenter(StudentModelConfig(student=StudentConfig(size="small"))).eval()
    out = m(torch.rand(1, 3, 48, 64), k)
    assert out["probs"].shape == (1, k, 48, 64)
    assert torch.allclose(out["probs"].sum(1), torch.ones(1, 48, 64), atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 16"):
        m(torch.rand(1, 3, 40, 64), k)


def test_aligned_assignments_follow_the_teacher():
    """When the student embedding is the teacher's, the aligned clusters are the teacher's."""
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[..., 4:] = 1
    emb = torch.stack([labels.float(), 1 - labels.float()], 1)  # (1, 2, 8, 8) well separated
    teacher = torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()
    swapped = teacher.flip(1)  # the teacher calls the left part cluster 1
    p = aligned_assignments(emb, swapped, iters=2, temperature=0.1)
    assert torch.allclose(p, swapped, atol=1e-3)


def test_affinity_zero_for_identical_geometry():
    t = torch.randn(2, 8, 4, 4)
    idx = torch.arange(16).repeat(2, 1)
    assert affinity_loss(t * 3.0, t, idx) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert affinity_loss(torch.randn(2, 8, 4, 4), t, idx) > 0.05


def test_ema_normalizer():
    ema = EmaNormalizer(["a"], decay=0.5)
    ema.update({"a": torch.tensor(4.0)})
    assert ema["a"] == 4.0  # first value is taken as is
    ema.update({"a": torch.tensor(2.0)})
    assert ema["a"] == pytest.approx(3.0)


def test_merge_is_scale_neutral():
    """Scaling one slice's loss by 100 does not change the merged value once its EMA knows it."""
    loss = DistillLoss(DistillConfig(), slices=("coarse", "fine"), temperature=0.1, colour_weight=1.0)
    rng = np.random.default_rng(0)
    student = {"coarse": torch.randn(1, 8, 4, 4), "fine": torch.randn(1, 8, 16, 16)}
    t_feat = torch.randn(1, 8, 16, 16)
    t_probs = torch.softmax(torch.randn(1, 3, 16, 16), 1)
    rgb = torch.rand(1, 3, 64, 64)
    out, probs = loss(student, t_feat, t_probs, rgb, rng)
    assert {
        "coarse/feature",
        "fine/affinity",
        "fine/agreement",
        "fine/pseudo_label",
        "fine/tv",
        "consistency",
        "total",
    } <= set(out)
    assert probs["fine"].shape == (1, 3, 16, 16)
    # On the first step each slice is normalised by itself: the geometric mean is 1.
    assert out["slices"] == pytest.approx(1.0, rel=1e-4)


def test_reconstruction_loss_properties():
    x = torch.rand(2, 3, 64, 64)
    target = reconstruction_target(x, sigma=1.0)
    assert target.shape == (2, 3, 16, 16)
    assert reconstruction_loss(target, target) == 0
    flat = target.mean(dim=(2, 3), keepdim=True).expand_as(target)
    # The gradient term punishes a prediction that lost the edges.
    assert reconstruction_loss(flat, target, grad_weight=1.0) > reconstruction_loss(flat, target, grad_weight=0.0)
    assert sobel_magnitude(torch.ones(1, 3, 8, 8)).abs().max() == 0
    blurred = gaussian_blur(x, 1.0, 5)
    assert blurred.std() < x.std() and torch.allclose(blurred.mean(), x.mean(), atol=1e-2)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(x, 1.0, 4)


def _student_cfg(tmp_path, **extra):
    over = tiny_overrides(tmp_path, steps=3)
    over["stage"] = "student"
    over["data"]["size"] = 32
    over["student"] = {"size": "small", "dims": [32, 24, 16], "depths": [1, 1, 1]}
    over["distill"] = {"teacher_steps": 2}
    for key, value in extra.items():
        over.setdefault(key, {}).update(value)
    return Config.from_dict(over)


def test_student_stage_trains_teacher_first_and_writes_artifacts(tmp_path):
    from seglib.checkpoint import load_checkpoint
    from seglib.training.run import run

    history = run(_student_cfg(tmp_path))
    assert (tmp_path / "teacher" / "teacher.pt").is_file()
    student = load_checkpoint(tmp_path / "student.pt", kind="student")
    assert not any(k.startswith("decoder") for k in student["model"])  # no decoder shipped
    assert (tmp_path / "decoder_training_only.pt").is_file()
    for tag in ("loss/fine/feature", "loss/coarse/agreement", "loss/consistency", "loss/recon", "loss/total"):
        assert tag in history, tag
    model = StudentSegmenter.from_checkpoint(tmp_path / "student.pt")
    assert model(torch.rand(1, 3, 32, 32), 4)["probs"].shape == (1, 4, 32, 32)


def test_student_stage_resumes_same_trajectory(tmp_path):
    from seglib.training.run import run

    teacher_dir = tmp_path / "shared_teacher"
    run(_student_cfg(teacher_dir))  # trains a teacher into shared_teacher/teacher
    teacher = str(teacher_dir / "teacher" / "teacher.pt")
    full = run(_student_cfg(tmp_path / "full", distill={"teacher_checkpoint": teacher}))

    def stop(step, record):
        if step >= 2:
            raise KeyboardInterrupt

    part = _student_cfg(tmp_path / "part", distill={"teacher_checkpoint": teacher})
    part.train.checkpoint_every = 1
    with pytest.raises(KeyboardInterrupt):
        run(part, callbacks=[stop])
    resumed = run(part, resume=True)
    assert resumed["loss/total"] == full["loss/total"]


def test_disable_autoencoder_and_multires(tmp_path):
    from seglib.training.run import run

    cfg = _student_cfg(tmp_path, autoencoder={"enabled": False}, student={"multires": False})
    history = run(cfg)
    assert "loss/recon" not in history and "loss/coarse/feature" not in history
    assert not (tmp_path / "decoder_training_only.pt").exists()
