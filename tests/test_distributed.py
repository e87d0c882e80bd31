"""Scale-out and crash safety with real processes: torchrun DDP on CPU (gloo) matches one
process at the same global batch; a SIGKILLed run resumes onto the same trajectory."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seglib.checkpoint import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.slow

TINY = {
    "model": {"encoder": {"width": 16, "depth": 1, "embed_dim": 8}},
    "data": {"size": 32},
    "train": {"warmup": 1, "threads": 1},
}


def _config_file(tmp_path: Path, **extra) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for key, value in extra.items():
        cfg.setdefault(key, {}).update(value)
    path = tmp_path / "tiny.py"
    path.write_text(f"def get_config():\n    return {cfg!r}\n")
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train(args, cwd, timeout=600, nproc=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + ["-m", "seglib.train_distill", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_ddp_two_processes_match_one_process(tmp_path):
    cfg = _config_file(tmp_path)
    common = ["--synthetic", "--steps", "3", "--amp", "0", "--seed", "3", "--config", str(cfg)]
    _train([*common, "--set", "data.batch_size=4", "--checkpoint_dir", str(tmp_path / "one")], tmp_path)
    proc = _train([*common, "--set", "data.batch_size=2", "--checkpoint_dir", str(tmp_path / "ddp")], tmp_path, nproc=2)
    # Only rank 0 prints the config line and writes files.
    assert proc.stdout.count('{"config"') == 1
    one = load_checkpoint(tmp_path / "one" / "teacher.pt")["model"]
    ddp = load_checkpoint(tmp_path / "ddp" / "teacher.pt")["model"]
    assert one.keys() == ddp.keys()
    init = _initial_weights(seed=3)
    moved = max(float((one[k] - init[k]).abs().max()) for k in one)
    for key in one:
        assert torch.allclose(one[key], ddp[key], atol=1e-4, rtol=1e-3), key
    assert moved > 1e-3  # the weights did change, so the comparison means something
    h_one = load_checkpoint(tmp_path / "one" / "ckpt_00000003.pt")["history"]["loss/total"]
    h_ddp = load_checkpoint(tmp_path / "ddp" / "ckpt_00000003.pt")["history"]["loss/total"]
    # rank 0 logs its own half-batch losses under DDP; they are close to, not equal to, the global ones
    assert len(h_one) == len(h_ddp) == 3


def _initial_weights(seed):
    """The weights a run starts from (same seed, same config), to check that training moved them."""
    from seglib.config import Config
    from seglib.models.teacher import MonolithicSegmenter

    torch.manual_seed(seed)
    return MonolithicSegmenter(Config.from_dict(TINY).model).state_dict()


def test_torchrun_acceptance_command(tmp_path):
    """The documented command, at the default config, on this CPU machine."""
    _train(
        [
            "--synthetic",
            "--steps",
            "4",
            "--amp",
            "0",
            "--seed",
            "3",
            "--checkpoint_dir",
            str(tmp_path / "ck"),
            "--threads",
            "1",
        ],
        tmp_path,
        nproc=2,
    )
    assert (tmp_path / "ck" / "teacher.pt").is_file()
    assert [s for s, _ in list_checkpoints(tmp_path / "ck")] == [4]


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg = _config_file(tmp_path, train={"checkpoint_every": 1, "keep_checkpoints": 2})
    args = ["--synthetic", "--steps", "40", "--amp", "0", "--seed", "5", "--config", str(cfg)]
    _train([*args, "--checkpoint_dir", str(tmp_path / "clean")], tmp_path)
    clean = load_checkpoint(tmp_path / "clean" / "ckpt_00000040.pt")["history"]["loss/total"]

    killed_dir = tmp_path / "killed"
    rng = random.Random(os.getpid())
    target = rng.randint(3, 15)  # kill once this step's checkpoint exists, a moment later
    cmd = [sys.executable, "-m", "seglib.train_distill", *args, "--checkpoint_dir", str(killed_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def latest() -> int:
        found = list_checkpoints(killed_dir)
        return found[-1][0] if found else 0

    while time.time() < deadline and latest() < target and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.03))  # a random moment, maybe mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    survived = list_checkpoints(killed_dir)
    assert survived and survived[-1][0] < 40  # killed before the end

    _train([*args, "--checkpoint_dir", str(killed_dir), "--resume"], tmp_path)
    resumed = load_checkpoint(killed_dir / "ckpt_00000040.pt")["history"]["loss/total"]
    assert resumed == clean  # step for step, bit for bit on CPU
    assert len(list_checkpoints(killed_dir)) == 2  # older ones pruned
    assert not list(killed_dir.glob("*.tmp"))
    # TensorBoard: every step's point once, over both processes' event files.
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = [
        event.step
        for path in sorted((killed_dir / "tb").glob("*tfevents*"))
        for event in EventFileLoader(str(path)).Load()
        if any(value.tag == "loss/total" for value in event.summary.value)
    ]
    assert sorted(steps) == list(range(1, 41))
