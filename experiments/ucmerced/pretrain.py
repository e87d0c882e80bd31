"""Train ``SceneCNN`` on the scene classes of a scene folder (UC Merced), resumable.

    python experiments/ucmerced/pretrain.py --data ../shared/data/ucmerced_landuse \
        --out runs/ucm/scene_s0 --steps 4000 --seed 0 --threads 1

Fold ``--holdout`` (class-stratified, ``scenes.load_scenes``) is never read by training: the
representation probe scores on it. A checkpoint (model, optimiser, step, history) is written
every ``--checkpoint-every`` steps to ``OUT/last.pt``; rerunning the same command resumes from
it, and since each step's crops come from a generator seeded by (seed, step) a resumed run
draws the same batches. The finished weights go to ``OUT/model.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backbone import SceneCNN  # noqa: E402
from scenes import load_scenes, random_crops  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="share of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0, help="fold never trained on (-1: train on every fold)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--zoom", default="0.375,1.0", help="output px per source px, log-uniform range")
    p.add_argument("--jitter", type=float, default=0.2)
    p.add_argument("--widths", default="32,64,128,256")
    p.add_argument("--depths", default="1,2,2,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=500)
    return p


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def lr_at(step: int, args) -> float:
    warm = max(1, round(args.warmup * args.steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    t = (step - warm) / max(1, args.steps - warm)
    return args.lr * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def heldout_accuracy(model: SceneCNN, scenes, size: int = 128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(scenes), 64):
        batch = [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float()[None] / 255 for im in scenes.images[i : i + 64]]
        x = torch.cat([F.interpolate(b, size=(size, size), mode="bilinear", antialias=True) for b in batch])
        correct += int((model.classify(x).argmax(1).numpy() == scenes.labels[i : i + 64]).sum())
    model.train()
    return correct / len(scenes)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in vars(args).items() if k not in ("threads", "out", "data")}
    scenes = load_scenes(args.data)
    train = scenes.subset(scenes.folds != args.holdout)
    held = scenes.subset(scenes.folds == args.holdout) if args.holdout >= 0 else None
    torch.manual_seed(args.seed)
    model = SceneCNN(ints(args.widths), ints(args.depths), classes=len(scenes.classes))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    other = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": other, "weight_decay": 0.0}], lr=args.lr, weight_decay=args.weight_decay)
    step, history, spent = 0, [], 0.0
    last = out / "last.pt"
    if last.is_file():
        state = torch.load(last, weights_only=False)
        if state["args"] != record:
            raise SystemExit(f"{last} was written with other settings {state['args']}; use another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, history, spent = state["step"], state["history"], state["seconds"]
        print(f"resumed at step {step}", flush=True)
    zoom = tuple(float(v) for v in args.zoom.split(","))
    model.train()
    tic, losses = time.time(), []
    while step < args.steps:
        rng = np.random.default_rng([args.seed, step])
        idx = rng.choice(len(train), args.batch, replace=False)
        x, _ = random_crops([train.images[i] for i in idx], rng, size=args.size, zoom=zoom, jitter=args.jitter)
        y = torch.from_numpy(train.labels[idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = F.cross_entropy(model.classify(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            acc = heldout_accuracy(model, held) if held is not None else None
            history.append({"step": step, "loss": float(np.mean(losses[-args.eval_every :])), "heldout_acc": acc})
            print(json.dumps(history[-1]), flush=True)
        if step % args.checkpoint_every == 0 or step == args.steps:
            now = time.time()
            spent += now - tic
            tic = now
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history, "args": record, "seconds": spent}
            torch.save(state, out / "last.tmp")
            (out / "last.tmp").replace(last)
            print(f"step {step} loss {np.mean(losses[-args.checkpoint_every:]):.3f} {spent:.0f} s", flush=True)
    final = {"model": model.state_dict(), "args": record, "history": history, "seconds": spent, "classes": scenes.classes}
    torch.save(final, out / "model.tmp")
    (out / "model.tmp").replace(out / "model.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
