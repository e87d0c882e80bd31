"""The teacher training loop: determinism, resume, checkpoints, TensorBoard, non-finite guard."""

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from seglib.checkpoint import list_checkpoints, load_checkpoint
from seglib.config import Config
from seglib.training.loop import NonFiniteLossError
from seglib.training.run import run


def cfg_for(tmp_path, **train):
    return Config.from_dict(tiny_overrides(tmp_path, **train))


def test_same_seed_same_losses(tmp_path):
    h1 = run(cfg_for(tmp_path / "a", steps=3))
    h2 = run(cfg_for(tmp_path / "b", steps=3))
    assert h1["loss/total"] == h2["loss/total"]
    h3 = run(cfg_for(tmp_path / "c", steps=3, seed=1))
    assert h3["loss/total"] != h1["loss/total"]


def test_resume_continues_the_same_trajectory(tmp_path):
    full = run(cfg_for(tmp_path / "full", steps=6, checkpoint_every=3))
    # An interrupted run: stops after step 3 (its checkpoint), then resumes to 6.
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(part, steps=6, checkpoint_every=3), callbacks=[_stop_after(4)])
    assert [s for s, _ in list_checkpoints(part)] == [3]  # step 4 was lost with the process
    resumed = run(cfg_for(part, steps=6, checkpoint_every=3), resume=True)
    assert resumed["step"] == full["step"]
    assert resumed["loss/total"] == full["loss/total"]  # bit-identical on CPU
    state = load_checkpoint(list_checkpoints(part)[-1][1])
    assert state["step"] == 6 and state["config"]["train"]["steps"] == 6


def _stop_after(n):
    def cb(step, record):
        if step >= n:
            raise KeyboardInterrupt

    return cb


def test_checkpoints_are_complete_rotated_and_safe(tmp_path):
    run(cfg_for(tmp_path, steps=6, checkpoint_every=1, keep_checkpoints=2))
    steps = [s for s, _ in list_checkpoints(tmp_path)]
    assert steps == [5, 6]
    assert not list(tmp_path.glob("*.tmp"))
    state = load_checkpoint(tmp_path / "ckpt_00000006.pt")
    assert {"model", "optimizer", "scheduler", "rng", "config", "step", "history"} <= set(state)
    assert state["config"]["model"]["encoder"]["width"] == 16
    teacher = load_checkpoint(tmp_path / "teacher.pt", kind="teacher")
    assert set(teacher) == {"format", "kind", "config", "model"}


def test_tensorboard_has_scalar_and_image_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(cfg_for(tmp_path, steps=2))
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "loss/total",
        "loss/consistency",
        "loss/pixel_entropy",
        "loss/marginal_entropy",
        "loss/smoothness",
        "train/lr",
        "train/img_per_s",
    ):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2]
    images = set(acc.Tags()["images"])
    assert {"input/rgb", "probs/soft", "probs/cluster0", "labels/argmax"} <= images
    assert "config" in "".join(acc.Tags()["tensors"])


class MeanSquareTask:
    """A loss that is a mean over samples (of a linear map), so that N micro-batches of B
    samples and one batch of N * B samples ask for the same gradient."""

    kind = "toy"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3, 2)

    def step(self, model, batch, index):
        from seglib.training.loop import StepOutput

        loss = model(batch["x"]).square().mean()
        return StepOutput(terms={"total": loss}, n_images=len(batch["x"]))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def export(self, directory):
        pass


class Samples(torch.utils.data.Dataset):
    """Micro-batch i holds samples i*B .. (i+1)*B - 1 of one fixed random stream."""

    def __init__(self, batch_size):
        self.batch_size, self.data = batch_size, torch.randn(64, 3, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.data) // self.batch_size

    def __getitem__(self, i):
        return {"x": self.data[i * self.batch_size : (i + 1) * self.batch_size]}


@pytest.mark.parametrize("micro_batches", [2, 4])
def test_grad_accum_of_n_micro_batches_matches_one_batch_n_times_larger(tmp_path, micro_batches):
    from seglib.training.loop import train_loop

    weights, histories = {}, {}
    for accum, batch in [(micro_batches, 2), (1, 2 * micro_batches)]:
        cfg = cfg_for(tmp_path / f"{accum}x{batch}", steps=3, grad_accum=accum, warmup=1)
        task = MeanSquareTask()
        histories[accum] = train_loop(task, cfg, Samples(batch), device=torch.device("cpu"))
        weights[accum] = task.model.state_dict()
    for key in ("loss/total", "train/grad_norm"):  # the same loss and gradient (Adam alone would hide a scale)
        assert len(histories[1][key]) == 3
        np.testing.assert_allclose(histories[micro_batches][key], histories[1][key], rtol=1e-5)
    for key, value in weights[micro_batches].items():
        torch.testing.assert_close(value, weights[1][key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(weights[1]["weight"], MeanSquareTask().model.weight)  # the steps did move them


class NaNOnce:
    """Wraps a task so that chosen steps produce a NaN loss."""

    def __init__(self, task, bad_indices):
        self.task, self.bad = task, set(bad_indices)
        self.kind, self.model = task.kind, task.model

    def step(self, model, batch, index):
        out = self.task.step(model, batch, index)
        if index in self.bad:
            out.terms["smoothness"] = out.terms["smoothness"] * float("nan")
            out.terms["total"] = out.terms["total"] + out.terms["smoothness"]
        return out

    def __getattr__(self, name):
        return getattr(self.task, name)


def _train_with_nan(tmp_path, bad, steps, max_bad=5):
    from seglib.data.batches import SyntheticBatches
    from seglib.training.loop import train_loop
    from seglib.training.teacher import TeacherTask

    cfg = cfg_for(tmp_path, steps=steps, max_bad_steps=max_bad)
    torch.manual_seed(0)
    task = TeacherTask(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    source = SyntheticBatches(size=32, batch_size=2)
    return train_loop(NaNOnce(task, bad), cfg, source, device=torch.device("cpu")), task, before


def test_non_finite_loss_never_reaches_the_weights(tmp_path, capsys):
    history, task, before = _train_with_nan(tmp_path, bad={0}, steps=1)
    assert history["train/skipped"] == [1.0]
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the bad step changed nothing
    assert "non-finite smoothness" in capsys.readouterr().err


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        _train_with_nan(tmp_path, bad={0, 1, 2, 3}, steps=4, max_bad=3)


def test_weight_average_is_the_ramped_exponential_average():
    from seglib.training.loop import WeightAverage

    model = torch.nn.BatchNorm1d(3)
    ema = WeightAverage(model, decay=0.9)
    expected = model.weight.detach().clone()
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.weight.fill_(value)
            model.num_batches_tracked += 1
        ema.update()
        decay = min(0.9, (1 + ema.updates) / (10 + ema.updates))
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(ema.state["weight"], expected)
    assert int(ema.state["num_batches_tracked"]) == 3  # integer buffers are copied


def test_exported_model_is_the_average_and_survives_resume(tmp_path):
    full = tmp_path / "full"
    run(cfg_for(full, steps=6, checkpoint_every=3, weight_average_decay=0.8))
    last = load_checkpoint(full / "ckpt_00000006.pt")
    exported = load_checkpoint(full / "teacher.pt", kind="teacher")["model"]
    for key, value in exported.items():
        assert torch.equal(value, last["ema"]["state"][key]), key
    assert any(not torch.equal(exported[k], last["model"][k]) for k in exported)  # not the raw weights
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(part, steps=6, checkpoint_every=3, weight_average_decay=0.8), callbacks=[_stop_after(4)])
    run(cfg_for(part, steps=6, checkpoint_every=3, weight_average_decay=0.8), resume=True)
    resumed = load_checkpoint(part / "teacher.pt", kind="teacher")["model"]
    for key, value in exported.items():
        assert torch.equal(value, resumed[key]), key
