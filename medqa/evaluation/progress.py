"""Finished work of a long stage kept as it completes, so a stage that was killed (a spot instance
taken away, Ctrl-C) goes on from where it stopped instead of from its first question.

The progress lives in scratch space (`data/progress/<stage>/`), not in a DVC output: DVC deletes a
stage's outputs before running it, and never caches this. With `MEDQA_CHECKPOINT_DIR` set (storage
that outlives the machine, where the finetune stage keeps its checkpoints too) it lives there, under
`progress/<stage>/`: a spot machine's replacement goes on from what the old one finished. One file
per fingerprint of everything that decides the results (the params the stage reads, its inputs'
bytes, the models as `checkpoints.base_identity` sees them, its code): any change starts afresh, and
a finished stage deletes its file.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medqa.code_deps import stage_code
from medqa.params import Params, as_dict
from medqa.paths import PROGRESS
from medqa.resumable import SHARED_DIR_ENV, base_identity, fingerprint

log = logging.getLogger(__name__)


class Progress:
    """The finished units (by key: a question's pmid) of one run of a stage, appended a batch at a
    time and flushed to disk, so a kill loses at most the batch in flight."""

    def __init__(self, folder: Path, key: str, shared: bool = False):
        folder.mkdir(parents=True, exist_ok=True)
        # An earlier run with other params, inputs or code; in shared storage, maybe another clone's
        # or experiment's, which is left alone.
        for other in [] if shared else folder.glob("*.jsonl"):
            if other.stem != key:
                other.unlink()
        self.path = folder / f"{key}.jsonl"
        self.done: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        """Read the batches written to the end; a batch cut short by the kill is dropped from the file."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                batch = json.loads(line) if line.endswith("\n") else None
            except ValueError:
                batch = None
            if not isinstance(batch, dict):
                break
            self.done.update(batch)
            kept.append(line)
        self.path.write_text("".join(kept))

    def reused(self, keys: Sequence[str], what: str) -> dict[str, Any]:
        """The finished records among `keys`, logged ("<what>: n of m questions reused ...")."""
        found = {key: self.done[key] for key in keys if key in self.done}
        if found:
            log.info("%s: %d of %d questions reused from the interrupted run in %s", what, len(found), len(keys),
                     self.path)
        return found

    def add(self, finished: dict[str, Any]) -> None:
        """Keep a finished batch: one line, on disk before the next batch starts."""
        with self.path.open("a") as f:
            f.write(json.dumps(finished) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.update(finished)

    def finish(self) -> None:
        """The stage wrote its outputs: nothing left to resume."""
        self.path.unlink(missing_ok=True)


def stage_progress(stage: str, params: Params, sections: Sequence[str], inputs: Sequence[Path],
                   models: Sequence[Path]) -> Progress:
    """The progress of `stage` (e.g. "baseline_eval") for the params `sections` it reads, the files and
    folders it reads (`inputs`) and the model directories it loads (`models`, each by its source
    record: a local model by its content, wherever it lies), tied to the stage's code (its script and
    the modules it reaches, as DVC's deps list them). Under `MEDQA_CHECKPOINT_DIR` when that is set."""
    values = {name: as_dict(getattr(params, name)) for name in sections}
    values["models"] = [base_identity(model) for model in models]
    # A folder counts by its files; a missing input is left to the stage to name.
    files = [f for path in inputs for f in (sorted(path.rglob("*")) if path.is_dir() else [path]) if f.is_file()]
    key = fingerprint(values, [*files, *stage_code(f"stages/{stage}.py")])[:16]
    shared = os.environ.get(SHARED_DIR_ENV)
    root = Path(shared).expanduser() / "progress" if shared else PROGRESS
    return Progress(root / stage, key, shared=bool(shared))
