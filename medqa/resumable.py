"""What a resumable run is tied to, shared by the finetune stage's checkpoints and the eval and judge
stages' progress: the directory that outlives a machine (`MEDQA_CHECKPOINT_DIR`), the base model's
identity wherever it is mounted, and the fingerprint of the params, data and code a run depends on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medqa.io import read_json

SHARED_DIR_ENV = "MEDQA_CHECKPOINT_DIR"


def fingerprint(sections: dict[str, Any], files: list[Path]) -> str:
    """What a run depends on: the params sections that shape its outputs and the bytes of its data and
    code files."""
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


def base_identity(base_dir: Path) -> dict[str, Any]:
    """The base model as a fingerprint sees it: its source record, without where a local model
    directory lies (its record's content fingerprint stays), so another machine that mounts the
    same model elsewhere computes the same fingerprint."""
    source = read_json(base_dir / "source.json")
    if source.get("weights") == "dir":
        source = {k: v for k, v in source.items() if k not in ("path", "hub_id")}
    return source


