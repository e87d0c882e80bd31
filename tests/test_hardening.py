"""Bad checkpoints, bad configs and bad training folders get clear errors (docs/bad-inputs.md)."""

import numpy as np
import pytest
import torch
from conftest import save_teacher, tiny_overrides
from PIL import Image

from seglib.checkpoint import FORMAT, CheckpointError, load_checkpoint, model_checkpoint, save_atomic
from seglib.config import Config, ConfigError
from seglib.models import load_model
from seglib.models.teacher import MonolithicSegmenter


class _Evil:
    """Unpickling this would create a file: a stand-in for arbitrary code in a pickle."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_loading_never_executes_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "kind": "teacher", "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not loaded"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"this is not a checkpoint", "not a readable PyTorch checkpoint"),
        (b"", "not a readable PyTorch checkpoint"),
    ],
)
def test_file_that_is_not_a_checkpoint(tmp_path, content, match):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_plain_torch_file_is_not_a_seglib_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="not a seglib checkpoint"):
        load_model(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "teacher.pt"
    save_teacher(path, Config(), MonolithicSegmenter())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        MonolithicSegmenter.from_checkpoint(path)


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "student.pt"
    save_atomic(model_checkpoint("student", Config().to_dict(), {}), path)
    with pytest.raises(CheckpointError, match="'student' checkpoint, but a teacher or train-state"):
        MonolithicSegmenter.from_checkpoint(path)
    decoder = tmp_path / "decoder_training_only.pt"
    save_atomic(model_checkpoint("decoder", Config().to_dict(), {}), decoder)
    with pytest.raises(CheckpointError, match="expected a teacher, a student or a scene model"):
        load_model(decoder)


def test_checkpoint_of_another_size(tmp_path):
    """Weights that do not fit the config stored beside them."""
    small = Config.from_dict({"model": {"encoder": {"width": 16}}})
    path = tmp_path / "teacher.pt"
    weights = MonolithicSegmenter().state_dict()  # width 64
    save_atomic(model_checkpoint("teacher", small.to_dict(), weights), path)
    with pytest.raises(CheckpointError, match="do not fit"):
        MonolithicSegmenter.from_checkpoint(path)


def test_resume_with_another_model_size_is_refused(tmp_path):
    from seglib.training.run import run

    run(Config.from_dict(tiny_overrides(tmp_path, steps=2)))
    bigger = tiny_overrides(tmp_path, steps=4)
    bigger["model"]["encoder"]["width"] = 24
    with pytest.raises(ValueError, match="different model config"):
        run(Config.from_dict(bigger), resume=True)


def test_resume_from_a_folder_of_another_stage(tmp_path):
    from seglib.training.run import run

    run(Config.from_dict(tiny_overrides(tmp_path, steps=2)))
    student = tiny_overrides(tmp_path, steps=2)
    student["stage"] = "student"
    student["distill"] = {"teacher_checkpoint": str(tmp_path / "teacher.pt")}
    with pytest.raises(ValueError, match="not a student training checkpoint"):
        run(Config.from_dict(student), resume=True)


def test_mistyped_config_key_and_value():
    with pytest.raises(ConfigError, match="did you mean 'loss.smoothness'"):
        Config.from_dict({"loss": {"smoothnes": 1.0}})
    with pytest.raises(ConfigError, match="'data.batch_size' expects int"):
        Config.from_dict({"data": {"batch_size": 2.5}})


def test_cli_reports_config_errors_cleanly(tmp_path, capsys):
    from seglib.train_distill import main

    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(bad)])
    assert exc.value.code == 2
    assert "neither get_config() nor CONFIG" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--set", "train.stpes=3"])
    assert "did you mean 'train.steps'" in capsys.readouterr().err


def test_training_folder_policies(tmp_path, caplog):
    from seglib.data.tiles import FolderBatches
    from seglib.io.images import ImageReadError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="no images in"):
        FolderBatches(empty, size=32)
    folder = tmp_path / "tiles"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "good.png")
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(folder / "small.png")  # smaller than the crop
    good = (folder / "good.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    with caplog.at_level("WARNING"):
        source = FolderBatches(folder, size=32, batch_size=3)
    assert "cut.png" in caplog.text  # named and skipped
    assert sorted(source.names) == ["good", "small"]
    batch = source[0]
    assert batch["rgb"].shape == (3, 3, 32, 32)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "cut.png").write_bytes(good[:10])
    with pytest.raises(ImageReadError, match="no usable images"):
        FolderBatches(only_bad, size=32)


def test_training_folder_downscale_averages_blocks(tmp_path):
    """``data.downscale`` shrinks each tile by block means before cropping, so a model that
    runs with ``downsample = 2`` trains at the scale it will see."""
    from seglib.data.tiles import FolderBatches

    folder = tmp_path / "tiles"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (70, 66, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    source = FolderBatches(folder, size=16, batch_size=2, downscale=2)
    (img,) = source.images
    assert img.shape == (35, 33, 3)
    expected = rgb.reshape(35, 2, 33, 2, 3).mean((1, 3)).round().astype(np.uint8)
    np.testing.assert_array_equal(img, expected)
    assert source[0]["rgb"].shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="downscale"):
        FolderBatches(folder, size=16, downscale=0)


def test_nan_batch_from_data_is_caught_by_the_guard(tmp_path):
    """A NaN pixel reaching the model is reported by the input check, naming the fix."""
    model = MonolithicSegmenter()
    x = torch.rand(1, 3, 16, 16)
    x[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x, 3)


def test_our_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    """What seglib writes (a training state, teacher.pt, the bundled student) loads with
    weights_only=True and holds nothing but tensors and plain Python values."""
    from seglib.paths import BUNDLED_MODEL
    from seglib.training.run import run

    run(Config.from_dict(tiny_overrides(tmp_path, steps=1)))

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))

    for path in (tmp_path / "ckpt_00000001.pt", tmp_path / "teacher.pt", BUNDLED_MODEL):
        assert plain(torch.load(path, weights_only=True)), path
