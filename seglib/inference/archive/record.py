"""What an archive run leaves beside its outputs: the resume manifest and the run summary.

**Manifest** (``<output>/.seglib-manifest.jsonl``): one JSON line per finished input, appended
(and flushed to disk) as soon as its outputs are complete, holding the input, a key and the size
of every output file. The key is a SHA-256 of the input's identity (resolved path, size,
modification time), the model's fingerprint, the legend's and the settings that shape the
outputs. A rerun skips an input whose key is in the manifest and whose outputs are all there
with those sizes, and redoes every other one: a run killed at any point loses only the inputs in
flight (their temporary files never had a final name). A half-written last line (the kill came
mid-write) is ignored.

**Summary** (``--summary``, default ``<output>/seglib-run.json``): every input with its status
(``done``, ``skipped``: complete from an earlier run, or ``failed``), outputs, K, seconds and
one-line error; the counts; the legend; the mosaic; the dashboard address. Written atomically
at the end of the run (and when it is interrupted).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ...io.outputs import write_text

__all__ = ["MANIFEST", "Manifest", "output_key", "write_summary"]

MANIFEST = ".seglib-manifest.jsonl"


def output_key(identity: list, fingerprint: str, legend: str | None, settings_key: str) -> str:
    """The manifest key of one input's outputs (see the module docstring)."""
    text = json.dumps([identity, fingerprint, legend, settings_key])
    return hashlib.sha256(text.encode()).hexdigest()


class Manifest:
    """The manifest of an output folder: ``done(key)`` for a complete earlier result, ``add``
    to record one."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / MANIFEST
        self.entries: dict[str, dict[str, int]] = {}  # key -> {output file: size}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["outputs"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill

    def done(self, key: str) -> bool:
        """True when ``key`` was recorded and each of its outputs is there with its recorded size."""
        outputs = self.entries.get(key)
        if not outputs:
            return False
        for name, size in outputs.items():
            try:
                if os.stat(name).st_size != size:
                    return False
            except OSError:
                return False
        return True

    def add(self, key: str, input_path: str, outputs: list[str]) -> None:
        sizes = {str(p): os.stat(p).st_size for p in outputs}
        self.entries[key] = sizes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "input": input_path, "outputs": sizes}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_summary(path: Path, summary: dict) -> Path:
    """Write the run summary as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(summary, indent=1, default=str) + "\n")
