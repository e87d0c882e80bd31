"""TensorBoard logging for training runs (rank 0 only; a disabled logger does nothing).

Scalars use one ``add_scalar`` per tag: ``loss/total``, ``loss/<term>``, ``train/lr``,
``train/img_per_s``, ... Images: ``input/rgb`` (the first view), ``probs/soft`` (probability
maps as float images, each pixel the probability-weighted mix of the cluster colours, no
argmax), ``probs/cluster<k>`` (single clusters' probability maps for the first image) and
``labels/argmax`` (argmax labels in colour). The full config is stored as text (``config``).

``trim_events`` cuts a run's event files back to a step before a resumed run appends to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..viz import colourize, soft_colour

__all__ = ["RunLogger", "trim_events"]


class RunLogger:
    """Arguments:
    logdir: folder of the event files.
    config: the full config dict, stored with the run.
    enabled: False on ranks other than 0.
    """

    def __init__(
        self,
        logdir: str | Path,
        *,
        config: dict[str, Any],
        enabled: bool = True,
    ):
        self.writer = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(self.logdir))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def images(
        self,
        step: int,
        rgb: torch.Tensor,
        probs: torch.Tensor,
        max_images: int = 4,
        prefix: str = "",
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """rgb (B, 3, H, W) in [0, 1] and probs (B, K, h, w), upsampled to (H, W) if smaller;
        ``extra`` maps a tag prefix to more probability maps (e.g. the teacher's next to the
        student's)."""
        if self.writer is None:
            return
        rgb = rgb[:max_images].detach().float().cpu().clamp(0, 1)

        def full_size(maps: torch.Tensor) -> torch.Tensor:
            maps = maps[:max_images].detach().float().cpu()
            if maps.shape[-2:] != rgb.shape[-2:]:
                maps = F.interpolate(maps, size=rgb.shape[-2:], mode="nearest")
            return maps

        probs = full_size(probs)
        self.writer.add_images(f"{prefix}input/rgb", rgb, step)
        self.writer.add_images(f"{prefix}probs/soft", soft_colour(probs), step)
        for k in range(min(probs.shape[1], 4)):
            self.writer.add_image(f"{prefix}probs/cluster{k}", probs[0, k : k + 1], step)
        labels = np.stack([colourize(p.argmax(0)) for p in probs])  # (B, H, W, 3)
        self.writer.add_images(f"{prefix}labels/argmax", labels, step, dataformats="NHWC")
        for tag, maps in (extra or {}).items():
            maps = full_size(maps)
            self.writer.add_images(f"{tag}_soft", soft_colour(maps), step)
            argmax = np.stack([colourize(p.argmax(0)) for p in maps])
            self.writer.add_images(f"{tag}_argmax", argmax, step, dataformats="NHWC")

    def flush(self) -> None:
        """Write the pending events to disk (before a checkpoint: a resume then finds them all)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def trim_events(logdir: str | Path, step: int | None) -> int:
    """Drop the events after ``step`` from every event file in ``logdir`` (a resumed run
    continues from its checkpoint at ``step``; what the killed run logged after it would be drawn
    twice, and TensorBoard warns about steps out of order). ``step=None`` removes every event
    file (a run that left no checkpoint starts again from step 0). Each file is rewritten to a
    temporary name and renamed over the original, so a kill leaves the old file or the new one.
    A truncated last record (a killed writer) is dropped. Returns the number of events removed."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    logdir = Path(logdir)
    if not logdir.is_dir():
        return 0
    for stale in logdir.glob(".trim-*"):  # a rewrite a kill interrupted
        stale.unlink(missing_ok=True)
    removed = 0
    for path in sorted(logdir.glob("*tfevents*")):
        records = list(RawEventFileLoader(str(path)).Load())
        if step is None:
            removed += len(records)
            path.unlink()
            continue
        kept = [r for r in records if Event.FromString(r).step <= step]
        # The loader skips a truncated record at the end; rewriting also removes it.
        if len(kept) == len(records) and path.stat().st_size == _record_bytes(records):
            continue
        removed += len(records) - len(kept)
        tmp = path.with_name(f".trim-{path.name.replace('tfevents', 'events')}")  # not read as an event file
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return removed


def _record_bytes(records: list[bytes]) -> int:
    """Bytes of these records in TFRecord framing (length 8 + CRC 4 + data + CRC 4)."""
    return sum(16 + len(r) for r in records)
