"""Model profiles, hardware choice, and the documented params profiles."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medqa.errors import PipelineError
from medqa.models import PROFILES, get_profile, lora_targets, resolve_hardware
from medqa.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_profiles_and_target_modules():
    assert get_profile("smollm2-135m-instruct").gguf is not None
    assert lora_targets(get_profile("distilgpt2"), None) == ["c_attn", "c_proj", "c_fc"]
    assert lora_targets(get_profile("mistral-7b-v0.1"), ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert get_profile("mistral-7b-v0.1").template.startswith("<s>[INST]")
    with pytest.raises(PipelineError, match="unknown model.name 'gpt-5'; known profiles: smollm2-135m-instruct"):
        get_profile("gpt-5")
    raw = get_profile("org/some-model")
    with pytest.raises(PipelineError, match="set lora.target_modules"):
        lora_targets(raw, None)
    assert lora_targets(raw, ["q_proj"]) == ["q_proj"]


def test_cpu_hardware_never_quantizes():
    import torch

    hw = resolve_hardware("auto", "auto")
    if not torch.cuda.is_available():
        assert (hw.device, hw.dtype, hw.quantize_4bit) == ("cpu", torch.float32, False)
    with pytest.raises(PipelineError, match="model.quantization is '8bit'"):
        resolve_hardware("8bit", "auto")


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.args")))
def test_params_profiles_set_existing_keys(profile):
    params = load_params(ROOT / "params.yaml")
    for line in (ROOT / "profiles" / profile).read_text().splitlines():
        flag, assignment = line.split(" ", 1)
        key, value = assignment.split("=", 1)
        assert flag == "-S"
        section, leaf = key.split(".")
        assert leaf in params[section], f"{profile}: {key} is not in params.yaml"
        if key == "model.name":
            assert yaml.safe_load(value) in PROFILES
