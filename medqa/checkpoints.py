"""Resumable checkpoints of the finetune stage: which run they belong to, and which one to resume.

models/checkpoints/ is scratch space, not a DVC output: DVC neither deletes it before a run nor
caches it, so an interrupted run can go on where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from medqa.imports import stage_code
from medqa.io import read_json, write_json

log = logging.getLogger(__name__)

FINGERPRINT = "fingerprint.json"
FINETUNE_STAGE = "stages/finetune.py"


def fingerprint(sections: dict[str, Any], files: list[Path]) -> str:
    """What a checkpoint was trained from: the params that shape training and the bytes of the data
    and code files."""
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


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
                      checkpoints: Path) -> Path | None:
    """Make `checkpoints` this run's and return the checkpoint to resume from, if any.

    With the same fingerprint (params, data and code) as the run that wrote them, the checkpoints
    are kept and the last complete one is returned. Otherwise they are deleted and None is
    returned: DVC re-runs the stage when any of those changed, and resuming would then finish the
    old run instead of training anew. Idempotent, so every process of a multi-GPU run, started after
    the launcher called it, gets the same answer without deleting anything.
    """
    current = fingerprint(sections, [train_path, val_path, base_dir / "source.json", *training_code()])
    marker = checkpoints / FINGERPRINT
    if marker.exists() and read_json(marker).get("fingerprint") == current:
        return last_complete_checkpoint(checkpoints)
    if checkpoints.exists():
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True)
    write_json(marker, {"fingerprint": current})
    return None
