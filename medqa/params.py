"""params.yaml, the single place every knob of the pipeline lives: one typed, frozen section per
top-level key, built and validated once by `load_params`.

The sections are pydantic dataclasses: choices are `Literal`s, bounds are `Field`s, the rules across
keys are validators, and YAML's types are taken as written (strict: no 1 for true, no "2" for 2).
`validate` reports the first failure in one line: the key, the value, what is allowed (`SCHEMA`,
written from the field's type and bounds) and "did you mean" for a typo.
"""
from __future__ import annotations

import dataclasses
import difflib
import string
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic.fields import FieldInfo

from medqa.errors import PipelineError
from medqa.rubric import CRITERIA

Check = tuple[Callable[[Any], bool], str]  # (is the value allowed?, what is allowed)

# YAML's types as written; a key params.yaml does not know is an error, not ignored.
STRICT = ConfigDict(strict=True, extra="forbid")
section = pydantic_dataclass(frozen=True, config=STRICT)

# An int or a float as YAML wrote it: 32 stays 32 (not 32.0) in the records and fingerprints made of it.
Number = int | float
NON_BLANK = r"\S"  # a string with something in it


def _template_fields(template: str) -> str:
    """A prompt template whose fields are {user} and optionally {system}, braces well-formed: what
    `prompts.PromptFormat` fills in, checked before the format stage meets it."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:  # a lone { or }
        raise ValueError("unbalanced braces") from exc
    if "user" not in fields or not fields <= {"user", "system"}:
        raise ValueError(f"fields {sorted(fields)}")
    return template


def _distinct(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        raise ValueError("a criterion is repeated")
    return values


def _fold_ids(folds: tuple[int, ...]) -> tuple[int, ...]:
    if folds != tuple(range(len(folds))) or len(folds) == 1 or len(folds) > 10:
        raise ValueError("not the ids of 2 to 10 folds")
    return folds


Criterion = Literal[tuple(CRITERIA)]  # type: ignore[valid-type]

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@section
class DataParams:
    source: str = Field(pattern=NON_BLANK)
    test_ids: str | None = Field(pattern=NON_BLANK)


@section
class ModelParams:
    name: str = Field(pattern=NON_BLANK)
    quantization: Literal["auto", "4bit", "none"] = Field()
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field()


@section
class PromptParams:
    system: str = Field(pattern=NON_BLANK)
    template: Annotated[str, AfterValidator(_template_fields)] | None = Field(
        description="null or a string with {user} and optionally {system}, no other fields (a literal brace doubled)")
    answer_prefix: str = Field(pattern=NON_BLANK)
    decision_first: bool = Field()


@section
class SplitParams:
    strategy: Literal["official", "random"] = Field()
    test_size: Number = Field(gt=0, lt=1)
    val_size: Number = Field(gt=0, lt=1)
    seed: int = Field(ge=0)


@section
class LoraParams:
    r: int = Field(ge=1)
    alpha: Number = Field(gt=0)
    dropout: Number = Field(ge=0, lt=1)
    target_modules: tuple[str, ...] | None = Field(min_length=1, description="a list of module names or null")


@section
class TrainParams:
    seed: int = Field(ge=0)
    max_samples: int | None = Field(ge=1)
    max_val_samples: int | None = Field(ge=1)
    sampling: Literal["stratified", "balanced"] = Field()
    epochs: int = Field(ge=1)
    max_steps: Literal[-1] | Annotated[int, Field(ge=1)] = Field(description="-1 (use epochs) or an integer >= 1")
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    learning_rate: Number = Field(gt=0)
    weight_decay: Number = Field(ge=0)
    warmup_ratio: Number = Field(ge=0, lt=1)
    scheduler: Literal[SCHEDULERS] = Field()  # type: ignore[valid-type]
    optim: str = Field(pattern=NON_BLANK)
    max_length: int = Field(ge=32)
    decision_loss_weight: Number = Field(gt=0)
    decision_class_weights: Literal["none", "balanced"] = Field()
    decision_loss: Literal["vocabulary", "choices"] = Field()
    logging_steps: int = Field(ge=1)
    eval_steps: int = Field(ge=1)
    save_steps: int = Field(ge=1)
    early_stopping_patience: int = Field(ge=0)
    gradient_checkpointing: Literal["auto"] | bool = Field(description="auto, true or false")
    liger_kernel: bool = Field()
    num_processes: int = Field(ge=1)
    num_machines: int = Field(ge=1)
    distributed: Literal["ddp", "fsdp"] = Field()

    @model_validator(mode="after")
    def _rules_across_keys(self) -> TrainParams:
        if self.save_steps % self.eval_steps:
            raise ValueError(
                f"train.save_steps ({self.save_steps}) must be a multiple of train.eval_steps ({self.eval_steps}) "
                "so the best checkpoint by validation loss can be kept")
        if self.sampling == "balanced" and self.max_samples is None:
            raise ValueError(
                "train.sampling=balanced picks train.max_samples questions, which is null: set it (e.g. 200) or "
                "use train.sampling=stratified to train on all of them")
        return self

    def checkpoints_activations(self, hardware_cuda: bool) -> bool:
        """Whether activations are recomputed in the backward pass: `auto` on CUDA (where memory is
        what runs out), not on the CPU (where time is)."""
        return hardware_cuda if self.gradient_checkpointing == "auto" else bool(self.gradient_checkpointing)


@section
class CvParams:
    folds: Annotated[tuple[int, ...], AfterValidator(_fold_ids)] = Field(
        description="[] (off), or the fold ids 0, 1, ..., k-1 of 2 to 10 folds, e.g. [0, 1, 2, 3, 4]")
    seed: int = Field(ge=0)


@section
class GenerationParams:
    max_new_tokens: int = Field(ge=1)
    temperature: Number = Field(ge=0)
    top_p: Number = Field(gt=0, le=1)
    repetition_penalty: Number = Field(gt=0)
    seed: int = Field(ge=0)


@section
class EvalParams:
    max_samples: int | None = Field(ge=1)
    long_answer_samples: int | None = Field(ge=1)
    batch_size: int = Field(ge=1)
    max_prompt_length: int = Field(ge=32)
    bertscore_model: str = Field(pattern=NON_BLANK)
    bertscore_num_layers: int | None = Field(ge=1)
    bootstrap: int = Field(ge=0)
    seed: int = Field(ge=0)


@section
class JudgeParams:
    model: str = Field(pattern=NON_BLANK)
    max_samples: int | None = Field(ge=1)
    criteria: Annotated[tuple[Criterion, ...], AfterValidator(_distinct)] = Field(
        min_length=1, description="a list of distinct criteria from " + ", ".join(CRITERIA))
    max_context_tokens: int = Field(ge=16)
    seed: int = Field(ge=0)


@section
class ReportParams:
    n_examples: int = Field(ge=0)


@section
class ChatParams:
    history_turns: int = Field(ge=0)
    host: str = Field(pattern=NON_BLANK)
    port: int = Field(ge=1, le=65535, description="a port number 1..65535")
    batch_rows: int = Field(ge=2)
    batch_wait_s: Number = Field(ge=0)


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, one typed section per attribute."""

    data: DataParams
    model: ModelParams
    prompt: PromptParams
    split: SplitParams
    lora: LoraParams
    train: TrainParams
    cv: CvParams
    generation: GenerationParams
    eval: EvalParams
    judge: JudgeParams
    report: ReportParams
    chat: ChatParams


SECTIONS: dict[str, type] = typing.get_type_hints(Params)  # section name -> its dataclass


def _bounds(field: FieldInfo) -> str:
    """" > 0 and < 1": a number field's bounds as the messages give them."""
    ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    found = [f"{ops[name]} {getattr(m, name)}" for m in field.metadata for name in ops
             if getattr(m, name, None) is not None]
    return (" " + " and ".join(found)) if found else ""


def allowed(field: FieldInfo) -> str:
    """What a field allows, in words: its description where it has one, else from its type and bounds
    ("an integer >= 1 or null", "one of official, random")."""
    if field.description:
        return field.description
    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(field.annotation) if union else (field.annotation,)
    nullable = type(None) in kinds
    kinds = tuple(k for k in kinds if k is not type(None))
    if kinds == (int,):
        text = "an integer" + _bounds(field)
    elif kinds == (int, float):
        text = "a number" + _bounds(field)
    elif kinds == (bool,):
        text = "true or false"
    elif kinds == (str,):
        text = "a non-empty string"
    elif len(kinds) == 1 and typing.get_origin(kinds[0]) is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(kinds[0])))
    else:
        raise TypeError(f"no words for {field.annotation}: give the field a description")
    return text + (" or null" if nullable else "")


def _check(field: FieldInfo) -> Callable[[Any], bool]:
    adapter = TypeAdapter(Annotated[field.annotation, field], config=ConfigDict(strict=True))

    def ok(value: Any) -> bool:
        try:
            adapter.validate_python(_frozen(value))
        except ValidationError:
            return False
        return True

    return ok


# Every key as section.leaf, with its check and what it allows: from the sections' fields.
SCHEMA: dict[str, Check] = {
    f"{name}.{leaf}": (_check(field), allowed(field))
    for name, kind in SECTIONS.items() for leaf, field in kind.__pydantic_fields__.items()
}


def _flatten(params: dict, source: str) -> dict[str, Any]:
    """{"train": {"epochs": 1}} -> {"train.epochs": 1}: every key is section.leaf."""
    flat: dict[str, Any] = {}
    for name, values in params.items():
        if not isinstance(values, dict):
            raise PipelineError(f"{source}: {name} must be a section of keys, not {values!r}")
        flat.update({f"{name}.{key}": value for key, value in values.items()})
    return flat


def _one_line(error: dict, name: str, flat: dict[str, Any], source: str) -> str:
    """pydantic's first error for section `name` as the one line a stage stops with."""
    if not error["loc"]:  # a validator's rule across keys
        return f"{source}: {error['ctx']['error']}"
    key = f"{name}.{error['loc'][0]}"
    if key not in flat:
        return f"{source}: missing key {key} ({SCHEMA[key][1]})"
    return f"{source}: {key} is {flat[key]!r}; expected {SCHEMA[key][1]}"


def params_from_dict(params: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params tree (as params.yaml spells it) and build its typed sections; the first
    failure is one PipelineError naming the key, the value and what is allowed."""
    from medqa.modeling.profiles import get_profile, lora_targets

    flat = _flatten(params, source)
    for key in flat:
        if key not in SCHEMA:
            close = difflib.get_close_matches(key, SCHEMA, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PipelineError(f"{source}: unknown key {key}{hint}")
    sections = {}
    for name, kind in SECTIONS.items():
        try:
            sections[name] = kind(**{key: _frozen(value) for key, value in params.get(name, {}).items()})
        except ValidationError as exc:
            raise PipelineError(_one_line(exc.errors()[0], name, flat, source)) from None
    typed = Params(**sections)
    if typed.cv.folds and typed.train.max_val_samples is None:
        # A fold draws its validation questions from the other folds (`crossval.folds.fold_parts`): null
        # would take every one of them and leave it none to train on.
        raise PipelineError(f"{source}: cv.folds is set and train.max_val_samples is null, so each fold would take "
                            "all the other folds' questions for its validation loss and train on none: set "
                            "train.max_val_samples (e.g. 16, or 50 with profiles/gpu.args)")
    lora_targets(get_profile(typed.model.name), typed.lora.target_modules)
    get_profile(typed.judge.model)  # a known profile, a local model directory or a hub id
    return typed


def validate(params: dict[str, Any], source: str = "params.yaml") -> None:
    """Check a params tree; raise one PipelineError naming the key, the value and what is allowed."""
    params_from_dict(params, source)


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


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
