"""Resumable checkpoints of the finetune stage: which run they belong to, and which one to resume.

Checkpoints live in one folder per fingerprint of the run (params, data, base model, code) under
models/checkpoints/ — scratch space, not a DVC output: DVC neither deletes it before a run nor
caches it, so an interrupted run can go on where it stopped — or under `MEDQA_CHECKPOINT_DIR`, storage
that outlives the machine (a mounted bucket, a shared filesystem): a run on a new machine resumes
from what the old one wrote there."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from medqa.code_deps import stage_code
from medqa.resumable import SHARED_DIR_ENV, base_identity, fingerprint

log = logging.getLogger(__name__)

FINETUNE_STAGE = "stages/finetune.py"


def training_code() -> list[Path]:
    """The code a checkpoint is resumed with: the finetune stage's script and the modules it reaches,
    the files whose change makes DVC re-run it (editing the chat app keeps the checkpoints)."""
    return stage_code(FINETUNE_STAGE)


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that was written to the end.

    The Trainer writes trainer_state.json last, so a checkpoint whose state file is missing, cut
    short, or names another step was interrupted and is never loaded.
    """
    found = []
    for folder in checkpoints.glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit():
            found.append((int(step), folder))
    for step, folder in sorted(found, reverse=True):
        try:
            if json.loads((folder / "trainer_state.json").read_text()).get("global_step") == step:
                return folder
        except (OSError, ValueError):
            log.warning("ignoring the incomplete checkpoint %s", folder)
    return None


def claim_checkpoints(sections: dict[str, Any], base_dir: Path, train_path: Path, val_path: Path,
                      checkpoints: Path) -> tuple[Path, Path | None]:
    """This run's checkpoint folder and the checkpoint to resume from, if any.

    The folder is named by the run's fingerprint (params, data, base model and code) under
    `MEDQA_CHECKPOINT_DIR` if set, else under `checkpoints`; a run with the same fingerprint resumes
    from its last complete checkpoint, a changed one starts in a folder of its own (DVC re-runs the
    stage when any of those changed, and resuming would finish the old run instead). Under
    `checkpoints`, this clone's scratch, other runs' folders are deleted; under the shared directory
    nothing of another run is ever touched (other experiments, other clones keep theirs).
    Idempotent, so every process of a multi-GPU run, started after the launcher called it, gets the
    same answer.
    """
    key = fingerprint({**sections, "base": base_identity(base_dir)}, [train_path, val_path, *training_code()])[:16]
    shared = os.environ.get(SHARED_DIR_ENV)
    root = Path(shared).expanduser() if shared else checkpoints
    if not shared and checkpoints.exists():
        for stale in checkpoints.iterdir():
            if stale.is_dir() and stale.name != key:
                shutil.rmtree(stale)
            elif stale.is_file():  # the record of the layout before per-run folders
                stale.unlink()
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder, last_complete_checkpoint(folder)
