"""Training throughput: the finetune stage's batching against padding every batch to max_length.

Stage way: length-grouped batches padded to their longest example (DataCollatorForSeq2Seq).
Reference-notebook way: random batches, every one padded to `train.max_length`.
Both count only non-padding tokens. The achieved FLOP rate is set against this machine's fp32
matmul rate measured in the same process.

    python -m bench.train_speed [--steps 6]

Needs the pipeline's `models/base` and `data/split/train.jsonl` (run `dvc repro split` first).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from medqa import paths
from medqa.io import read_jsonl
from medqa.models import get_profile, load_model, load_tokenizer, lora_targets, resolve_hardware
from medqa.params import load_params
from medqa.training import tokenize_example


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP/s of large square matmuls on this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def run(params: dict, items: list[dict], padded: bool, steps: int) -> tuple[float, float]:
    """(non-padding tokens/s, achieved FLOP/s) over `steps` optimiser steps."""
    tp = params["train"]
    tokenizer = load_tokenizer(paths.BASE_MODEL)
    model = load_model(paths.BASE_MODEL, resolve_hardware("none", "float32"))
    lp = params["lora"]
    model = get_peft_model(model, LoraConfig(
        r=lp["r"], lora_alpha=lp["alpha"], lora_dropout=lp["dropout"], task_type="CAUSAL_LM",
        target_modules=lora_targets(get_profile(params["model"]["name"]), lp["target_modules"]),
    ))
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    collator = DataCollatorForSeq2Seq(
        tokenizer, padding="max_length" if padded else True, max_length=tp["max_length"], label_pad_token_id=-100
    )
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-train-"), max_steps=steps, per_device_train_batch_size=tp["batch_size"],
        gradient_accumulation_steps=tp["grad_accum"], learning_rate=tp["learning_rate"], report_to="none",
        save_strategy="no", use_cpu=not torch.cuda.is_available(), seed=tp["seed"], logging_steps=steps,
        train_sampling_strategy="random" if padded else "group_by_length", disable_tqdm=True,
    )
    from datasets import Dataset

    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(items), data_collator=collator)
    seen = []
    original = collator.__call__

    def counting(features):
        seen.append(sum(len(f["input_ids"]) for f in features))
        return original(features)

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    tokens = sum(seen[: steps * tp["grad_accum"]])
    # forward 2N per token, backward ~2N for activation gradients (LoRA weights' own are negligible)
    return tokens / elapsed, 4 * n_params * tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    params = load_params()
    tokenizer = load_tokenizer(paths.BASE_MODEL)
    items = [tokenize_example(ex, tokenizer, params["train"]["max_length"]) for ex in read_jsonl(paths.TRAIN)]
    peak = matmul_flops()
    print(f"{len(items)} train examples, max_length {params['train']['max_length']}, "
          f"batch {params['train']['batch_size']} x {params['train']['grad_accum']}, {args.steps} steps")
    print(f"fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    padded = run(params, items, padded=True, steps=args.steps)
    stage = run(params, items, padded=False, steps=args.steps)
    for name, (tok_s, flops) in (("padded to max_length", padded), ("stage batching", stage)):
        print(f"{name:22s} {tok_s:8.1f} tokens/s  {flops / 1e9:6.1f} GFLOP/s  ({flops / peak:.1%} of matmul rate)")
    print(f"ratio: {stage[0] / padded[0]:.2f}x")


if __name__ == "__main__":
    main()
