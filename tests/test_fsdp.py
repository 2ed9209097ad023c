"""The FSDP path on the CPU: the model prepared as the finetune stage prepares it under
train.distributed=fsdp trains every LoRA weight (4-bit, reentrant activation checkpointing), and two
processes sharding it with FSDP2 over gloo train the adapter one process trains."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medqa.io import read_jsonl
from medqa.params import params_from_dict
from tests.conftest import free_port, train_params

ROOT = Path(__file__).resolve().parents[1]


def _as_under_fsdp(monkeypatch) -> None:
    """`fsdp_enabled()` true, as ACCELERATE_USE_FSDP makes it in a process `accelerate launch` starts
    with the FSDP config (which cannot start here: accelerate's FSDP needs an accelerator)."""
    import importlib

    from tests.fsdp_train import FSDP_DECIDES

    for name in FSDP_DECIDES:
        monkeypatch.setattr(importlib.import_module(name), "fsdp_enabled", lambda: True)


def _lora_gradients(workdir: Path, out: Path, monkeypatch) -> list[dict[str, float]]:
    """Two Trainer steps of the model as `train_adapter` builds it under FSDP (nf4 weights stored in bf16,
    as on a GPU; no k-bit preparation; reentrant checkpointing): each LoRA weight's gradient norm, per
    step, read after the backward and before the optimiser step. (accelerate's FSDP wrapping needs an
    accelerator: the Trainer runs unwrapped here, as one process; test_two_processes_... shards.)"""
    from transformers import TrainerCallback

    from medqa.modeling.loading import load_tokenizer
    from medqa.training.examples import tokenized_dataset
    from medqa.training.recipe import setup_model, training_arguments
    from medqa.training.trainer import build_trainer
    from tests.fsdp_train import hardware_for

    _as_under_fsdp(monkeypatch)
    # (gradient_checkpointing: what `auto` is on CUDA.)
    params = params_from_dict(train_params(max_steps=2, eval_steps=2, save_steps=2, warmup_ratio=0.0,
                                           gradient_checkpointing=True))
    hardware = hardware_for("4bit-bf16")
    args = training_arguments(params.train, hardware, out, evaluate_first=False)
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs == {"use_reentrant": True}
    model = setup_model(workdir / "base", params.model, params.lora, hardware, args.activation_checkpointing)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    # Not upcast by a k-bit preparation: the frozen weights keep the one dtype FSDP shards.
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {hardware.dtype}

    norms: list[dict[str, float]] = []

    class RecordGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            norms.append({n: (p.grad.norm().item() if p.grad is not None else 0.0)
                          for n, p in model.named_parameters() if "lora_" in n})

    tokenizer = load_tokenizer(workdir / "base")
    train_ds = tokenized_dataset(read_jsonl(workdir / "train.jsonl")[:4], tokenizer, params.train.max_length)
    trainer = build_trainer(model, tokenizer, args, train_ds, train_ds, callbacks=[RecordGradients()])
    trainer.train()
    return norms


def test_under_fsdp_settings_every_lora_weight_in_every_layer_gets_a_gradient(workdir, tmp_path, monkeypatch):
    """Under FSDP the stage skips peft's k-bit preparation (it would upcast the frozen weights, and FSDP
    shards one dtype) and checkpoints reentrantly, where a checkpointed layer's LoRA weights get a gradient
    only if its inputs require one: the input-grads hook on the embeddings (transformers adds it when the
    Trainer switches checkpointing on; `setup_model` adds it too, so no default of a library decides)."""
    first, second = _lora_gradients(workdir, tmp_path, monkeypatch)
    assert len(first) == 2 * 7 * 4  # lora_A and lora_B of the 7 projections in each of the 4 layers
    # lora_B starts at zero, so lora_A's first gradient is zero by design; both move from the second step.
    assert all(v > 0 for n, v in first.items() if "lora_B" in n), first
    assert all(v > 0 for v in second.values()), second


def test_without_the_input_grads_hook_lora_would_not_train(workdir, tmp_path, monkeypatch):
    """What the test above guards: the same preparation with the hook made a no-op leaves every LoRA
    weight (all inside checkpointed layers) out of the graph, and the first backward finds nothing to
    differentiate."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", lambda self: None)
    with pytest.raises(RuntimeError, match="does not require grad"):
        _lora_gradients(workdir, tmp_path, monkeypatch)


@pytest.mark.parametrize("weights", ["4bit-bf16", "fp32"])
def test_two_processes_sharded_by_fsdp2_train_the_adapter_one_process_trains(workdir, tmp_path, monkeypatch, weights):
    """Two processes over gloo, the model prepared as under FSDP, each decoder layer and the root sharded
    with `fully_shard`, two questions each a step, the adapter gathered by `launch.save_fsdp_adapter`:
    the adapter one process trains with the same questions accumulated, within float32 rounding.
    4bit-bf16: the weights as on a GPU, nf4 in bf16 containers and bf16 embeddings, frozen, beside fp32
    LoRA weights; fp32: a model without quantisation."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.fsdp_train import train

    steps = 3
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "tests.fsdp_train", str(workdir), str(tmp_path / "two"), str(steps), weights],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _as_under_fsdp(monkeypatch)
    train(workdir, tmp_path / "one", steps, weights)

    one, two = (load_file(tmp_path / run / "adapter/adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys() and len(one) == 2 * 7 * 4  # A and B of 7 projections in 4 layers
    for name, weight in one.items():
        assert torch.allclose(weight, two[name], rtol=1e-4, atol=1e-6), (name, (weight - two[name]).abs().max().item())
    assert all(w.abs().max() > 0 for name, w in one.items() if "lora_B" in name)  # trained: lora_B starts at zero
    # sharded: 4 decoder layers and the root
    assert json.loads((tmp_path / "two/adapter/trained_on.json").read_text()) == {"processes": 2, "fsdp_units": 5}
