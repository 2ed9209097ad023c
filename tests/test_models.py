"""Model profiles, hardware choice, and the documented params profiles."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medqa.errors import PipelineError
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.profiles import PROFILES, get_profile, lora_targets
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


def test_what_the_hardware_lacks_is_said_in_one_line(monkeypatch, caplog):
    """bitsandbytes missing or too old, bf16 asked of a GPU without it: one-line errors (the stages print
    them as "error: ..."); 4-bit on an x86 CPU without AVX2: a one-line warning, and it still runs."""
    import importlib.metadata
    import platform

    import torch

    real_version = importlib.metadata.version

    def without_bitsandbytes(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    with monkeypatch.context() as patch:
        patch.setattr(importlib.metadata, "version", without_bitsandbytes)
        with pytest.raises(PipelineError, match=r"needs bitsandbytes for 4-bit, which is not installed") as missing:
            resolve_hardware("4bit", "auto")
        patch.setattr(importlib.metadata, "version", lambda name: "0.45.0" if name == "bitsandbytes" else real_version(name))
        with pytest.raises(PipelineError, match=r"bitsandbytes 0.45.0 is too old for 4-bit here \(needs >= ") as old:
            resolve_hardware("4bit", "auto")

    with monkeypatch.context() as patch:  # a GPU without bfloat16 (a T4, a V100)
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
        patch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
        with pytest.raises(PipelineError, match=r"model.dtype=bfloat16, but this GPU \(Tesla T4\) has no bfloat16") as bf16:
            resolve_hardware("none", "bfloat16")
        assert resolve_hardware("none", "auto").dtype == torch.float16  # auto picks what the GPU has
    for error in (missing, old, bf16):
        assert "\n" not in str(error.value)

    with monkeypatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
        patch.setattr(platform, "machine", lambda: "x86_64")
        with caplog.at_level("WARNING", logger="medqa.modeling.hardware"):
            assert resolve_hardware("4bit", "auto").quantize_4bit
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith("4-bit on a CPU without AVX2 (DEFAULT)") and "\n" not in warning


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.args")))
def test_params_profiles_set_existing_keys(profile):
    params = load_params(ROOT / "params.yaml")
    for line in (ROOT / "profiles" / profile).read_text().splitlines():
        flag, assignment = line.split(" ", 1)
        key, value = assignment.split("=", 1)
        assert flag == "-S"
        section, leaf = key.split(".")
        assert hasattr(getattr(params, section), leaf), f"{profile}: {key} is not in params.yaml"
        if key == "model.name":
            assert yaml.safe_load(value) in PROFILES


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_training_only_where_the_cpu_has_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    """`model.dtype: auto` on a CPU: bf16 autocast for training where the CPU multiplies bf16 natively
    (AVX512-BF16 or AMX), fp32 elsewhere; the weights and inference stay fp32 either way, and
    `float32` or 4-bit keep training fp32. Independent of the machine the tests run on."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    hardware = resolve_hardware("none", "auto")
    assert (hardware.dtype, hardware.autocast) == (torch.float32, torch.bfloat16 if expected else None)
    assert resolve_hardware("none", "float32").autocast is None
    assert resolve_hardware("4bit", "auto").autocast is None


def test_an_adapter_merged_for_evaluation_gives_the_model_it_was_kept_apart_from(tmp_path, tokenizer):
    """The eval stages fold the adapter into the base weights (no LoRA products on each forward pass):
    the same log-probabilities as base + adapter kept apart, within float rounding."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medqa.modeling.loading import load_for_inference
    from tests.conftest import save_tiny_base

    base = save_tiny_base(tmp_path / "base", tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          max_position_embeddings=256)
    # init_lora_weights=False: random B matrices, so the adapter changes the model.
    get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    hardware = resolve_hardware("none", "float32")
    apart = load_for_inference(tmp_path / "base", hardware, tmp_path / "adapter").model
    merged = load_for_inference(tmp_path / "base", hardware, tmp_path / "adapter", merge=True).model
    plain = load_for_inference(tmp_path / "base", hardware).model
    assert not any("lora" in name for name, _ in merged.named_modules())
    ids = torch.tensor([tokenizer("Is the sky blue? The direct answer is:", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = [m(input_ids=ids).logits.log_softmax(-1) for m in (apart, merged, plain)]
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[0], logits[2], atol=1e-2)  # the adapter does change the model
