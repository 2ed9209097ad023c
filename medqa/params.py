"""Reading and validating params.yaml, the single place every knob of the pipeline lives."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import yaml

from medqa.errors import PipelineError
from medqa.rubric import CRITERIA

Check = tuple[Callable[[Any], bool], str]  # (is the value allowed?, what is allowed)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(low: int, nullable: bool = False) -> Check:
    return (lambda v: (nullable and v is None) or (_is_int(v) and v >= low),
            f"an integer >= {low}" + (" or null" if nullable else ""))


def number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Check:
    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = high is None or (v < high if high_open else v <= high)
        return above and below

    left = f"> {low}" if low_open else f">= {low}"
    right = "" if high is None else f" and {'<' if high_open else '<='} {high}"
    return ok, f"a number {left}{right}"


def text(nullable: bool = False) -> Check:
    return (lambda v: (nullable and v is None) or (isinstance(v, str) and v.strip() != ""),
            "a non-empty string" + (" or null" if nullable else ""))


def boolean() -> Check:
    return (lambda v: isinstance(v, bool)), "true or false"


def one_of(*options: str) -> Check:
    return (lambda v: v in options), "one of " + ", ".join(options)


def string_list(nullable: bool = True) -> Check:
    return (lambda v: (nullable and v is None) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)),
            "a list of module names" + (" or null" if nullable else ""))


SCHEMA: dict[str, Check] = {
    "data.source": text(),
    "data.test_ids": text(nullable=True),
    "model.name": text(),
    "model.quantization": one_of("auto", "4bit", "none"),
    "model.dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "prompt.system": text(),
    "prompt.template": text(nullable=True),
    "prompt.answer_prefix": text(),
    "prompt.decision_first": boolean(),
    "split.strategy": one_of("official", "random"),
    "split.test_size": number(0, 1, low_open=True, high_open=True),
    "split.val_size": number(0, 1, low_open=True, high_open=True),
    "split.seed": integer(0),
    "lora.r": integer(1),
    "lora.alpha": number(0, low_open=True),
    "lora.dropout": number(0, 1, high_open=True),
    "lora.target_modules": string_list(),
    "train.seed": integer(0),
    "train.max_samples": integer(1, nullable=True),
    "train.max_val_samples": integer(1, nullable=True),
    "train.epochs": integer(1),
    "train.max_steps": (lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (use epochs) or an integer >= 1"),
    "train.batch_size": integer(1),
    "train.grad_accum": integer(1),
    "train.learning_rate": number(0, low_open=True),
    "train.weight_decay": number(0),
    "train.warmup_ratio": number(0, 1, high_open=True),
    "train.scheduler": one_of("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                              "constant_with_warmup", "inverse_sqrt"),
    "train.optim": text(),
    "train.max_length": integer(32),
    "train.logging_steps": integer(1),
    "train.eval_steps": integer(1),
    "train.save_steps": integer(1),
    "train.early_stopping_patience": integer(0),
    "train.num_processes": integer(1),
    "train.distributed": one_of("ddp", "fsdp"),
    "generation.max_new_tokens": integer(1),
    "generation.temperature": number(0),
    "generation.top_p": number(0, 1, low_open=True),
    "generation.repetition_penalty": number(0, low_open=True),
    "generation.seed": integer(0),
    "eval.max_samples": integer(1, nullable=True),
    "eval.batch_size": integer(1),
    "eval.max_prompt_length": integer(32),
    "eval.bertscore_model": text(),
    "eval.bertscore_num_layers": integer(1, nullable=True),
    "eval.bootstrap": integer(0),
    "eval.seed": integer(0),
    "judge.model": text(),
    "judge.max_samples": integer(1, nullable=True),
    "judge.criteria": (lambda v: isinstance(v, list) and v and all(c in CRITERIA for c in v) and len(set(v)) == len(v),
                       "a list of distinct criteria from " + ", ".join(CRITERIA)),
    "judge.max_context_tokens": integer(16),
    "judge.seed": integer(0),
    "report.n_examples": integer(0),
    "chat.history_turns": integer(0),
    "chat.host": text(),
    "chat.port": (lambda v: _is_int(v) and 1 <= v <= 65535, "a port number 1..65535"),
}


def _flatten(params: dict, source: str) -> dict[str, Any]:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}: every key is section.leaf."""
    flat: dict[str, Any] = {}
    for section, values in params.items():
        if not isinstance(values, dict):
            raise PipelineError(f"{source}: {section} must be a section of keys, not {values!r}")
        flat.update({f"{section}.{key}": value for key, value in values.items()})
    return flat


def validate(params: dict[str, Any], source: str = "params.yaml") -> None:
    """Check every key against SCHEMA; raise one PipelineError naming the key, the value and what is allowed."""
    from medqa.models import get_profile, lora_targets

    flat = _flatten(params, source)
    for key in flat:
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PipelineError(f"{source}: unknown key {key}{hint}")
    for key, (ok, allowed) in SCHEMA.items():
        if key not in flat:
            raise PipelineError(f"{source}: missing key {key} ({allowed})")
        if not ok(flat[key]):
            raise PipelineError(f"{source}: {key} is {flat[key]!r}; expected {allowed}")
    if flat["train.save_steps"] % flat["train.eval_steps"]:
        raise PipelineError(
            f"{source}: train.save_steps ({flat['train.save_steps']}) must be a multiple of train.eval_steps "
            f"({flat['train.eval_steps']}) so the best checkpoint by validation loss can be kept"
        )
    lora_targets(get_profile(flat["model.name"]), flat["lora.target_modules"])
    get_profile(flat["judge.model"])  # a known profile, a local model directory or a hub id


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found: run the stages from the project root")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise PipelineError(f"{path} must be a mapping of sections (data, model, prompt, ...)")
    validate(params, str(path))
    return params
