"""Reading params.yaml, the single place every knob of the pipeline lives."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medqa.errors import PipelineError

SECTIONS = ("data", "model", "prompt", "split", "lora", "train", "generation", "eval", "report")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load params.yaml and check that every section is present."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found: run the stages from the project root")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from exc
    missing = [s for s in SECTIONS if not isinstance(params.get(s), dict)]
    if missing:
        raise PipelineError(f"{path} lacks the section(s) {', '.join(missing)}")
    return params
