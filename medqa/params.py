"""params.yaml, the single place every knob of the pipeline lives: one typed, frozen object per
section, built and validated once by `load_params`.

Each field carries the check its value must pass; `validate` reports the first failure in one line
(the key, the value, what is allowed, and "did you mean" for a typo).
"""
from __future__ import annotations

import dataclasses
import difflib
import string
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def prompt_template() -> Check:
    """null, or a format string whose fields are {user} and optionally {system}, braces well-formed:
    what `prompts.PromptFormat` fills in, checked before the format stage meets it."""
    def ok(v: Any) -> bool:
        if v is None:
            return True
        if not isinstance(v, str):
            return False
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(v) if name is not None}
        except ValueError:  # a lone { or }
            return False
        return "user" in fields and fields <= {"user", "system"}

    return ok, "null or a string with {user} and optionally {system}, no other fields (a literal brace doubled)"


def string_list(nullable: bool = True) -> Check:
    return (lambda v: (nullable and v is None) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v)),
            "a list of module names" + (" or null" if nullable else ""))


def _key(check: Check) -> Any:
    """A params field: required (params.yaml spells out every key) and checked by `check`."""
    return dataclasses.field(metadata={"check": check})


@dataclass(frozen=True)
class DataParams:
    source: str = _key(text())
    test_ids: str | None = _key(text(nullable=True))


@dataclass(frozen=True)
class ModelParams:
    name: str = _key(text())
    quantization: str = _key(one_of("auto", "4bit", "none"))
    dtype: str = _key(one_of("auto", "float32", "bfloat16", "float16"))


@dataclass(frozen=True)
class PromptParams:
    system: str = _key(text())
    template: str | None = _key(prompt_template())
    answer_prefix: str = _key(text())
    decision_first: bool = _key(boolean())


@dataclass(frozen=True)
class SplitParams:
    strategy: str = _key(one_of("official", "random"))
    test_size: float = _key(number(0, 1, low_open=True, high_open=True))
    val_size: float = _key(number(0, 1, low_open=True, high_open=True))
    seed: int = _key(integer(0))


@dataclass(frozen=True)
class LoraParams:
    r: int = _key(integer(1))
    alpha: float = _key(number(0, low_open=True))
    dropout: float = _key(number(0, 1, high_open=True))
    target_modules: tuple[str, ...] | None = _key(string_list())


SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@dataclass(frozen=True)
class TrainParams:
    seed: int = _key(integer(0))
    max_samples: int | None = _key(integer(1, nullable=True))
    max_val_samples: int | None = _key(integer(1, nullable=True))
    sampling: str = _key(one_of("stratified", "balanced"))
    epochs: int = _key(integer(1))
    max_steps: int = _key((lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (use epochs) or an integer >= 1"))
    batch_size: int = _key(integer(1))
    grad_accum: int = _key(integer(1))
    learning_rate: float = _key(number(0, low_open=True))
    weight_decay: float = _key(number(0))
    warmup_ratio: float = _key(number(0, 1, high_open=True))
    scheduler: str = _key(one_of(*SCHEDULERS))
    optim: str = _key(text())
    max_length: int = _key(integer(32))
    decision_loss_weight: float = _key(number(0, low_open=True))
    decision_class_weights: str = _key(one_of("none", "balanced"))
    logging_steps: int = _key(integer(1))
    eval_steps: int = _key(integer(1))
    save_steps: int = _key(integer(1))
    early_stopping_patience: int = _key(integer(0))
    gradient_checkpointing: bool | str = _key((lambda v: v == "auto" or isinstance(v, bool), "auto, true or false"))
    liger_kernel: bool = _key(boolean())
    num_processes: int = _key(integer(1))
    num_machines: int = _key(integer(1))
    distributed: str = _key(one_of("ddp", "fsdp"))

    def checkpoints_activations(self, hardware_cuda: bool) -> bool:
        """Whether activations are recomputed in the backward pass: `auto` on CUDA (where memory is
        what runs out), not on the CPU (where time is)."""
        return hardware_cuda if self.gradient_checkpointing == "auto" else bool(self.gradient_checkpointing)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = _key(integer(1))
    temperature: float = _key(number(0))
    top_p: float = _key(number(0, 1, low_open=True))
    repetition_penalty: float = _key(number(0, low_open=True))
    seed: int = _key(integer(0))


@dataclass(frozen=True)
class EvalParams:
    max_samples: int | None = _key(integer(1, nullable=True))
    long_answer_samples: int | None = _key(integer(1, nullable=True))
    batch_size: int = _key(integer(1))
    max_prompt_length: int = _key(integer(32))
    bertscore_model: str = _key(text())
    bertscore_num_layers: int | None = _key(integer(1, nullable=True))
    bootstrap: int = _key(integer(0))
    seed: int = _key(integer(0))


@dataclass(frozen=True)
class JudgeParams:
    model: str = _key(text())
    max_samples: int | None = _key(integer(1, nullable=True))
    criteria: tuple[str, ...] = _key((
        lambda v: isinstance(v, list) and v and all(c in CRITERIA for c in v) and len(set(v)) == len(v),
        "a list of distinct criteria from " + ", ".join(CRITERIA)))
    max_context_tokens: int = _key(integer(16))
    seed: int = _key(integer(0))


@dataclass(frozen=True)
class ReportParams:
    n_examples: int = _key(integer(0))


@dataclass(frozen=True)
class ChatParams:
    history_turns: int = _key(integer(0))
    host: str = _key(text())
    port: int = _key((lambda v: _is_int(v) and 1 <= v <= 65535, "a port number 1..65535"))
    batch_rows: int = _key(integer(2))
    batch_wait_s: float = _key(number(0))


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, one typed section per attribute."""

    data: DataParams
    model: ModelParams
    prompt: PromptParams
    split: SplitParams
    lora: LoraParams
    train: TrainParams
    generation: GenerationParams
    eval: EvalParams
    judge: JudgeParams
    report: ReportParams
    chat: ChatParams


SECTIONS: dict[str, type] = typing.get_type_hints(Params)  # section name -> its dataclass

# Every key as section.leaf, with its check.
SCHEMA: dict[str, Check] = {
    f"{section}.{f.name}": f.metadata["check"] for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)
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
    from medqa.modeling.profiles import get_profile, lora_targets

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
    if flat["train.sampling"] == "balanced" and flat["train.max_samples"] is None:
        raise PipelineError(
            f"{source}: train.sampling=balanced picks train.max_samples questions, which is null: set it "
            "(e.g. 200) or use train.sampling=stratified to train on all of them"
        )
    lora_targets(get_profile(flat["model.name"]), flat["lora.target_modules"])
    get_profile(flat["judge.model"])  # a known profile, a local model directory or a hub id


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def params_from_dict(params: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params tree (as params.yaml spells it) and build its typed sections."""
    validate(params, source)
    return Params(**{
        section: kind(**{key: _frozen(value) for key, value in params[section].items()})
        for section, kind in SECTIONS.items()
    })


def as_dict(section: Any) -> dict[str, Any]:
    """A section as params.yaml spells it (lists, not tuples): for fingerprints and records."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(section).items()}


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load, validate and type params.yaml."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found: run the stages from the project root")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise PipelineError(f"{path} must be a mapping of sections (data, model, prompt, ...)")
    return params_from_dict(params, str(path))
