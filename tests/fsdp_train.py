"""LoRA training steps on the project's FSDP preparation, sharded by FSDP2 (`fully_shard`, what
configs/accelerate/fsdp.yaml runs) over gloo when started as several processes (torchrun), unsharded in
one: what tests/test_fsdp.py compares. accelerate's FSDP needs an accelerator, so the wrapping it would
do (its TRANSFORMER_BASED_WRAP policy) and the Trainer's step are done here by hand, with the stage's
own model preparation, batches, loss, activation checkpointing and adapter gathering.

    python -m torch.distributed.run --nproc-per-node 2 -m tests.fsdp_train WORKDIR OUT STEPS WEIGHTS
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from medqa.io import read_jsonl
from medqa.params import params_from_dict
from tests.conftest import train_params

PROCESSES, PER_PROCESS = 2, 2  # a step's batch: 2 processes × 2 questions, or one process 2 × 2 accumulated
FSDP_DECIDES = ("medqa.modeling.loading", "medqa.training.recipe")  # the modules whose `fsdp_enabled` shapes the preparation


def hardware_for(weights: str):
    """The Hardware that loads the base as `weights` says: "fp32", unquantised; "4bit-bf16", as on a
    GPU: nf4 in bf16 containers and bf16 embeddings, frozen, beside fp32 LoRA weights."""
    import torch

    from medqa.modeling.hardware import Hardware

    dtype = {"fp32": torch.float32, "4bit-bf16": torch.bfloat16}[weights]
    return Hardware("cpu", dtype, quantize_4bit=weights.startswith("4bit"))


def shard_by_decoder_layer(model) -> int:
    """FSDP2 units as accelerate's TRANSFORMER_BASED_WRAP makes them: each decoder layer (the model's
    `_no_split_modules`), then the root. Returns how many units hold sharded (DTensor) weights."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    layer_classes = set(model.get_base_model()._no_split_modules)
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)
    return sum(isinstance(m, FSDPModule) and any(isinstance(p, DTensor) for p in m.parameters())
               for m in model.modules())


def train(workdir: Path, out: Path, steps: int, weights: str) -> None:
    """`steps` AdamW steps of a fresh LoRA adapter on the base in `workdir`, prepared as the finetune
    stage prepares it under FSDP (the caller makes `fsdp_enabled` true). Each process takes its own
    PER_PROCESS questions of a step's batch; one process takes all of them, in micro-batches of
    PER_PROCESS with the gradients accumulated. Rank 0 (or the one process) writes the adapter to `out`."""
    import torch
    import torch.distributed as dist
    from transformers import set_seed

    from medqa.modeling.loading import load_tokenizer
    from medqa.training.examples import tokenize_example
    from medqa.training.launch import save_fsdp_adapter
    from medqa.training.recipe import setup_model, training_arguments
    from medqa.training.trainer import AnswerBatchCollator, answer_loss

    sharded = "WORLD_SIZE" in os.environ
    if sharded:
        dist.init_process_group("gloo")
        assert dist.get_world_size() == PROCESSES
    rank = dist.get_rank() if sharded else 0
    params = params_from_dict(train_params(gradient_checkpointing=True))
    hardware = hardware_for(weights)
    args = training_arguments(params.train, hardware, out / "checkpoints", evaluate_first=False)
    set_seed(0)  # the same fresh adapter in every process
    model = setup_model(workdir / "base", params.model, params.lora, hardware, args.activation_checkpointing)
    # What the Trainer does with the stage's arguments (reentrant under FSDP).
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=args.activation_checkpointing_kwargs)
    model.train()
    units = shard_by_decoder_layer(model) if sharded else 0

    tokenizer = load_tokenizer(workdir / "base")
    examples = [tokenize_example(ex, tokenizer, params.train.max_length) for ex in read_jsonl(workdir / "train.jsonl")]
    collate = AnswerBatchCollator(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    batch = PROCESSES * PER_PROCESS
    for step in range(steps):
        questions = examples[step * batch:(step + 1) * batch]
        mine = questions[rank * PER_PROCESS:(rank + 1) * PER_PROCESS] if sharded else questions
        micro_batches = [mine[i:i + PER_PROCESS] for i in range(0, len(mine), PER_PROCESS)]
        for micro in micro_batches:
            inputs = collate([dict(ex) for ex in micro])
            labels = inputs.pop("labels")
            # FSDP averages the processes' gradients; one process averages its micro-batches.
            (answer_loss(model(**inputs), labels) / len(micro_batches)).backward()
        optimizer.step()
        optimizer.zero_grad()

    if sharded:
        save_fsdp_adapter(model, out / "adapter", {"processes": PROCESSES, "fsdp_units": units}, "trained_on.json")
        dist.destroy_process_group()
    else:
        model.save_pretrained(out / "adapter")


if __name__ == "__main__":
    import importlib

    for name in FSDP_DECIDES:  # what ACCELERATE_USE_FSDP makes it under `accelerate launch`
        importlib.import_module(name).fsdp_enabled = lambda: True
    train(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
