"""The teacher training loop: determinism, resume, checkpoints, TensorBoard, non-finite guard."""

import time

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
        histories[accum] = train_loop(task, cfg, Samples(batch), config=cfg.to_dict(), device=torch.device("cpu"))
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


def _train_with_nan(tmp_path, bad, steps):
    from seglib.data.batches import SyntheticBatches
    from seglib.training.loop import train_loop
    from seglib.training.teacher import TeacherTask

    cfg = cfg_for(tmp_path, steps=steps)
    torch.manual_seed(0)
    task = TeacherTask(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    source = SyntheticBatches(size=32, batch_size=2)
    return train_loop(NaNOnce(task, bad), cfg, source, config=cfg.to_dict(), device=torch.device("cpu")), task, before


def test_non_finite_loss_never_reaches_the_weights(tmp_path, capsys):
    history, task, before = _train_with_nan(tmp_path, bad={0}, steps=1)
    assert history["train/skipped"] == [1.0]
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the bad step changed nothing
    assert "non-finite smoothness" in capsys.readouterr().err


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match="5 consecutive steps"):  # MAX_BAD_STEPS
        _train_with_nan(tmp_path, bad={0, 1, 2, 3, 4, 5}, steps=6)


def test_weight_average_is_the_ramped_exponential_average():
    from seglib.training.averaging import WeightAverage

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


# ------------------------------------------------------------- wall-time checkpoints


def test_time_triggered_checkpoints_bound_what_a_kill_loses(tmp_path, monkeypatch):
    """With step checkpoints far apart, a checkpoint is still written once `checkpoint_minutes`
    passed; the kill then loses only the steps since, the resumed run follows the uninterrupted
    trajectory, and the finished folder holds the step checkpoints only."""
    import seglib.training.state as state

    full = run(cfg_for(tmp_path / "full", steps=7, checkpoint_every=100, checkpoint_minutes=1.0))
    now = [0.0]
    monkeypatch.setattr(state, "_clock", lambda: now[0])

    def tick(step, record):  # 40 s of training per step; a kill right after step 6
        now[0] += 40.0
        if step == 6:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(part, steps=7, checkpoint_every=100, checkpoint_minutes=1.0), callbacks=[tick])
    # 60 s passed at steps 3 and 5 (clock 80 and 160); the checkpoint of step 3 was superseded.
    assert [s for s, _ in list_checkpoints(part)] == [5]
    resumed = run(cfg_for(part, steps=7, checkpoint_every=100, checkpoint_minutes=1.0), resume=True)
    assert resumed["loss/total"] == full["loss/total"]
    assert [s for s, _ in list_checkpoints(part)] == [7]  # the time-triggered one is gone


def test_no_time_triggered_checkpoint_when_off(tmp_path, monkeypatch):
    import seglib.training.state as state

    now = [0.0]
    monkeypatch.setattr(state, "_clock", lambda: now[0])
    run(
        cfg_for(tmp_path, steps=4, checkpoint_every=100, checkpoint_minutes=0.0, keep_checkpoints=0),
        callbacks=[lambda step, record: now.__setitem__(0, now[0] + 1e6)],
    )
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


# ---------------------------------------------------------- TensorBoard after resume


def _event_steps(logdir):
    """tag -> steps of every scalar and image event in every event file of ``logdir``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = {}
    for path in sorted(logdir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_tensorboard_after_a_resume_has_every_point_once(tmp_path, caplog, monkeypatch):
    """A run killed after step 5 resumes from its step-3 checkpoint: the event files hold each
    scalar once per step 1..6 and each image once per logged step, and TensorBoard reads them
    without purging anything ("out of order" warnings). The writer's thread is slowed down, as on
    a loaded machine: the killed run's last events must still be on disk when it has stopped."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write

    def slow_write(self, data):
        time.sleep(0.01)
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", slow_write)
    cfg = lambda: cfg_for(tmp_path, steps=6, checkpoint_every=3)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run(cfg(), callbacks=[_stop_after(5)])
    killed = _event_steps(tmp_path / "tb")
    assert killed["loss/total"] == [1, 2, 3, 4, 5]  # flushed at the checkpoint, and later at exit
    run(cfg(), resume=True)
    steps = _event_steps(tmp_path / "tb")
    for tag in ("loss/total", "loss/consistency", "train/lr"):
        assert steps[tag] == [1, 2, 3, 4, 5, 6], tag
    assert steps["input/rgb"] == [1, 3, 4, 6]  # first step, checkpoints, the resumed run's first step: once each
    with caplog.at_level("WARNING"):
        acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4, 5, 6]
    assert "out of order" not in caplog.text


def test_tensorboard_after_a_resume_without_checkpoint_starts_afresh(tmp_path):
    """Killed before its first checkpoint, a run resumed with --resume starts from step 0: the
    killed run's events go, or steps 1..3 would be drawn twice."""
    cfg = lambda: cfg_for(tmp_path, steps=5, checkpoint_every=100, checkpoint_minutes=0)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        run(cfg(), callbacks=[_stop_after(3)])
    assert not list_checkpoints(tmp_path)
    assert _event_steps(tmp_path / "tb")["loss/total"] == [1, 2, 3]
    run(cfg(), resume=True)
    steps = _event_steps(tmp_path / "tb")
    assert steps["loss/total"] == [1, 2, 3, 4, 5]
    assert steps["config/text_summary"] == [0]  # the config text once, from the run that finished


def test_trim_events_drops_late_events_and_a_truncated_record(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from seglib.training.logging import trim_events

    writer = SummaryWriter(str(tmp_path))
    for step in range(1, 9):
        writer.add_scalar("x", float(step), step)
    writer.close()
    (path,) = tmp_path.glob("*tfevents*")
    with open(path, "ab") as f:  # a writer killed in the middle of a record
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00\x01\x02")
    assert trim_events(tmp_path, 5) == 3
    assert _event_steps(tmp_path)["x"] == [1, 2, 3, 4, 5]
    size = path.stat().st_size
    assert trim_events(tmp_path, 5) == 0 and path.stat().st_size == size  # nothing left to do
    assert not list(tmp_path.glob(".trim-*"))


# --------------------------------------------------------------------- quality probe


def test_the_probe_logs_quality_without_changing_the_trajectory(tmp_path):
    off = run(cfg_for(tmp_path / "off", steps=5))
    overrides = tiny_overrides(tmp_path / "on", steps=5)
    overrides["probe"] = {"every": 2}
    on = run(Config.from_dict(overrides))
    assert on["loss/total"] == off["loss/total"]  # the probe draws no random numbers
    assert on["probe/step"] == [0, 2, 4, 5]  # before training, every 2 steps, after the last
    for key in ("probe/miou", "probe/view_agreement", "probe/utilization", "probe/speckle", "probe/seconds"):
        assert len(on[key]) == 4, key
    assert all(0.0 <= v <= 1.0 for v in on["probe/miou"] + on["probe/view_agreement"])
    assert len(set(on["probe/miou_rgb_kmeans"])) == 1  # computed once: a reference line
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "on" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("probe/miou")] == [0, 2, 4, 5]


def test_the_probe_scores_what_the_evaluation_scores(tmp_path):
    """On a folder with masks the probe's mIoU is the evaluation's Hungarian mIoU of the same
    model on the same (shrunk) images with the same ignored ids."""
    from seglib.evaluation.scores import evaluate_tiles
    from seglib.models import random_init_like
    from seglib.models.teacher import MonolithicSegmenter
    from seglib.paths import SAMPLE_IMAGES, SAMPLE_MASKS
    from seglib.training.probe import QualityProbe

    cfg = Config.from_dict(
        {
            "data": {
                "synthetic": False,
                "data_dir": str(SAMPLE_IMAGES),
                "mask_dir": str(SAMPLE_MASKS),
                "mask_ignore": [5, 255],
            },
        }
    )
    probe = QualityProbe.from_config(cfg, images=2, size=96)
    assert len(probe.images) == 2 and max(probe.images[0].shape[:2]) == 96
    model = random_init_like(MonolithicSegmenter(Config.from_dict(tiny_overrides(tmp_path)).model), seed=1)
    scores = probe(model)
    tiles = list(zip(probe.images, probe.masks, strict=True))
    expected = evaluate_tiles(model, tiles, k="present", ignore=(5, 255))
    assert scores["probe/miou"] == pytest.approx(expected["model"]["miou"])
    assert scores["probe/miou_rgb_kmeans"] == pytest.approx(expected["rgb_kmeans"]["miou"])
    assert not model.training


def test_mask_dir_is_checked_before_training(tmp_path, capsys):
    from seglib.config import ConfigError
    from seglib.paths import SAMPLE_IMAGES
    from seglib.train_distill import main

    cfg = Config.from_dict({"data": {"synthetic": False, "data_dir": str(SAMPLE_IMAGES), "mask_dir": "nope"}})
    with pytest.raises(ConfigError, match="data.mask_dir not found: nope"):
        cfg.check_paths()
    with pytest.raises(SystemExit) as exc:
        main(["--data-dir", str(SAMPLE_IMAGES), "--mask-dir", str(tmp_path / "masks"), "--steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "data.mask_dir not found" in err and str(tmp_path / "masks") in err
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.data.mask_dir = str(empty)
    cfg.probe.every = 1
    from seglib.training.probe import QualityProbe

    with pytest.raises(ConfigError, match="no image of .* has a mask"):
        QualityProbe.from_config(cfg)


# --------------------------------------------------------------------------- threads


def test_automatic_training_threads(monkeypatch):
    import seglib.device as device

    cpu = torch.device("cpu")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(device, "available_cores", lambda: 2)
    assert device.training_threads(0, cpu) == 1
    assert device.training_threads(3, cpu) == 3  # explicit wins
    monkeypatch.setattr(device, "available_cores", lambda: 16)
    assert device.training_threads(0, cpu) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device.training_threads(0, cpu) == 2  # four processes share the machine
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert device.training_threads(0, cpu) == torch.get_num_threads()  # the user's setting stands


def test_busy_machine_note(monkeypatch):
    import seglib.device as device

    monkeypatch.setattr(device, "available_cores", lambda: 2)
    monkeypatch.setattr(device.os, "getloadavg", lambda: (5.6, 5.0, 4.0))
    assert "--threads 1" in device.busy_note(2) and "load average 5.6 on 2 cores" in device.busy_note(2)
    assert device.busy_note(1) is None
    monkeypatch.setattr(device.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    assert device.busy_note(2) is None


def test_run_restores_the_thread_count(tmp_path):
    before = torch.get_num_threads()
    run(cfg_for(tmp_path, steps=1, threads=1))
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_the_demo_announces_the_threads_it_trains_and_evaluates_on(tmp_path, monkeypatch, capsys):
    """The demo's first line names the thread count training uses (the automatic choice run()
    reports: half the cores), the evaluation line the count it runs on."""
    import re

    import seglib.demo as demo
    import seglib.device as device
    import seglib.evaluation.scores as evaluation

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "available_cores", lambda: 2)
    full_size = evaluation.evaluate_synthetic
    monkeypatch.setattr(evaluation, "evaluate_synthetic", lambda model, **kw: full_size(model, **(kw | {"size": 64})))
    assert demo.main(["--steps", "1", "--eval-images", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    announced = re.search(r"on synthetic tiles \((\d+) CPU threads?\)", out)
    trained = re.search(r"training on (\d+) CPU thread\(s\)", out)
    evaluated = re.search(r"at K = classes present \((\d+) CPU threads?\)", out)
    assert announced and trained and evaluated, out
    assert announced[1] == trained[1] == "1" and evaluated[1] == str(torch.get_num_threads()), out


def test_weight_average_skips_with_the_step():
    """A skipped step (flag on the device) leaves the average and its count alone; a kept one
    equals the plain update."""
    from seglib.training.averaging import WeightAverage

    model = torch.nn.Linear(3, 2)
    a, b = WeightAverage(model, 0.9), WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = {k: v.clone() for k, v in a.state.items()}
    a.update(skip=torch.tensor(True))
    assert all(torch.equal(a.state[k], before[k]) for k in before) and int(a.updates) == 0
    a.update(skip=torch.tensor(False))
    b.update()
    assert all(torch.allclose(a.state[k], b.state[k]) for k in before) and a.state_dict()["updates"] == 1


def test_compile_falls_back_to_eager_with_a_reason(capsys):
    from seglib.device import _CompiledOrEager, maybe_compile

    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, "") is model
    with pytest.raises(ValueError, match="train.compile"):
        maybe_compile(model, "fastest")

    def broken(*args):
        raise RuntimeError("no C++ compiler found\nmore detail")

    wrapped = _CompiledOrEager(model, broken, "default")
    x = torch.randn(1, 2)
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    assert wrapped.failed == "RuntimeError: no C++ compiler found" and wrapped.weight is model.weight
    assert capsys.readouterr().err.count("running eager") == 1  # said once
