"""Training throughput and memory: the finetune stage's way against the reference notebooks' way.

Notebook way: random batches, each padded to `train.max_length`, logits and loss at every position
(the model's own loss). Stage way: `medqa.training.trainer.build_trainer` as the finetune stage runs it:
length-grouped, left-padded batches, logits only over the columns that predict answer tokens.

Both ways train on the same examples: a seeded sample of `steps x batch_size x grad_accum` train
questions, one pass over them (the notebook in random order, the stage length-grouped), so they read
the same tokens and only the way differs. Each way runs in a fresh process, which reports
its non-padding tokens/s, its achieved rate of the FLOPs the model needs, and its peak resident
set (ru_maxrss). The FLOPs the model needs, per sequence of length l with a answer tokens:

    4 * N_blocks * l                      forward 2N, backward 2N for activation gradients
                                          (frozen weights need no weight gradients)
  + 6 * n_layers * d_model * l^2 / 2      causal attention scores and mixing: forward 2x, backward 4x
  + 4 * vocab * d_model * a               the vocabulary projection at the answer tokens only
  + 6 * r * (d_in + d_out) * l per LoRA module   LoRA forward and both gradients

set against this machine's fp32 matmul rate (bf16's for the bf16 way), measured in the parent process.
On a CPU with native bf16 (AVX512-BF16 or AMX) a third way runs: the stage's way with the Trainer's
bf16 autocast over fp32 weights, as the finetune stage trains with `model.dtype: auto` there.

    python -m bench.train_speed [--steps 4] [--params-hardware] [--batch-size B --grad-accum A] [--liger] [--compile]

`--params-hardware` trains both ways on the hardware params.yaml asks for (`model.quantization`,
`model.dtype`: 4-bit nf4 with bf16 on CUDA under `auto`) instead of the CPU's fp32 / bf16-autocast
ways; `--batch-size`/`--grad-accum` override the train section's (e.g. a gpu profile's micro-batch),
`--liger` turns on `train.liger_kernel`. On CUDA the peak GPU memory of each way is reported.
`--compile` runs the stage's ways through the Trainer's `torch_compile` (the compile time counted).

Needs the pipeline's `models/base` and `data/split/train.jsonl` (`dvc repro split`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import subprocess
import sys
import tempfile
import time

import torch

from medqa import paths
from medqa.io import read_jsonl
from medqa.modeling.hardware import cpu_has_native_bf16, resolve_hardware
from medqa.modeling.loading import load_tokenizer
from medqa.params import load_params
from medqa.training.examples import tokenize_example
from medqa.training.recipe import setup_model, training_arguments
from medqa.training.trainer import build_trainer

WAYS = ("notebook", "stage", "stage-bf16")  # stage-bf16: the stage's way with bf16 autocast (native bf16 only)


def matmul_flops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of large square matmuls in `dtype` on this machine (best of three)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def needed_flops(model: torch.nn.Module, features: list[dict]) -> float:
    """The FLOPs a LoRA training step needs for these examples (formula in the module docstring)."""
    config = model.get_base_model().config
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and "lora_" not in n)
    lora = sum(6 * p.numel() for n, p in model.named_parameters() if "lora_" in n)  # r*(d_in+d_out) per module
    total = 0.0
    for f in features:
        length, answer = len(f["input_ids"]), sum(1 for x in f["labels"] if x != -100)
        total += 4 * blocks * length + 3 * layers * d * length**2 + 4 * vocab * d * answer + lora * length
    return total


def _train_params(args: argparse.Namespace):
    """params.yaml's train section with the command line's overrides."""
    tp = load_params().train
    overrides = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "liger_kernel": args.liger or None}
    return dataclasses.replace(tp, **{k: v for k, v in overrides.items() if v is not None})


def run_way(way: str, steps: int, args: argparse.Namespace) -> dict:
    """Train `steps` optimiser steps the given way; tokens/s, needed FLOP/s and peak RSS (and GPU memory)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    params = load_params()
    tp = _train_params(args)
    set_seed(tp.seed)
    if args.params_hardware:
        hardware = resolve_hardware(params.model.quantization, params.model.dtype)
    else:  # the CPU ways: the stage's hardware with bf16 autocast, or all fp32
        hardware = resolve_hardware("none", "auto" if way == "stage-bf16" else "float32")
    tokenizer = load_tokenizer(paths.BASE_MODEL)
    examples = read_jsonl(paths.TRAIN)
    n = steps * tp.batch_size * tp.grad_accum
    if n > len(examples):
        raise SystemExit(f"{steps} steps need {n} train questions; data/split/train.jsonl has {len(examples)}")
    sample = random.Random(tp.seed).sample(examples, n)  # the same questions for both ways
    dataset = Dataset.from_list([tokenize_example(ex, tokenizer, tp.max_length) for ex in sample])
    training = dataclasses.replace(
        training_arguments(tp, hardware, tempfile.mkdtemp(prefix="bench-train-"), evaluate_first=False),
        max_steps=steps, eval_strategy="no", save_strategy="no", load_best_model_at_end=False,
        logging_steps=steps, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if way.startswith("stage") else "random",
        torch_compile=args.compile and way.startswith("stage"),
    )
    model = setup_model(paths.BASE_MODEL, params.model, params.lora, hardware, training.activation_checkpointing)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if way.startswith("stage"):
        trainer = build_trainer(model, tokenizer, training, dataset, None)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="max_length", max_length=tp.max_length,
                                          label_pad_token_id=-100)
        trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator)
    seen: list[dict] = []
    collate = trainer.data_collator

    def counting(features):
        seen.extend(features)
        return collate(features)

    trainer.data_collator = counting
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    assert len(seen) == n, (len(seen), n)  # every sampled question once, nothing else
    used = seen
    return {
        "tokens_per_s": sum(len(f["input_ids"]) for f in used) / elapsed,
        "flops_per_s": needed_flops(model, used) / elapsed,
        "seconds_per_step": elapsed / steps,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--params-hardware", action="store_true",
                        help="params.yaml's model.quantization and model.dtype (4-bit + bf16 on CUDA)")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size")
    parser.add_argument("--grad-accum", type=int, help="override train.grad_accum")
    parser.add_argument("--liger", action="store_true", help="train.liger_kernel=true (CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the stage's ways (compile time counted)")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one way, in a child process
    args = parser.parse_args()
    if args.way:
        print(json.dumps(run_way(args.way, args.steps, args)))
        return
    tp = _train_params(args)
    bf16 = cpu_has_native_bf16() and not torch.cuda.is_available() and not args.params_hardware
    peak = matmul_flops()
    peak_bf16 = matmul_flops(dtype=torch.bfloat16) if bf16 else None
    print(f"max_length {tp.max_length}, batch {tp.batch_size} x {tp.grad_accum}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; fp32 matmul rate {peak / 1e9:.1f} GFLOP/s"
          + (f", bf16 {peak_bf16 / 1e9:.1f} GFLOP/s" if bf16 else "; no native bf16: the bf16 way is skipped"))
    results = {}
    for way in WAYS if bf16 else WAYS[:2]:
        # the same command line, for one way in a fresh process
        child = subprocess.run([sys.executable, "-m", "bench.train_speed", *sys.argv[1:], "--way", way],
                               capture_output=True, text=True, check=True)
        results[way] = json.loads(child.stdout.strip().splitlines()[-1])
    print("| way | tokens/s | needed GFLOP/s | share of its matmul rate | s/step | peak RSS GB | peak GPU GB |")
    print("|---|---|---|---|---|---|---|")
    for way, r in results.items():
        rate = peak_bf16 if way == "stage-bf16" else peak
        gpu = "-" if r["peak_gpu_gb"] is None else f"{r['peak_gpu_gb']:.2f}"
        print(f"| {way} | {r['tokens_per_s']:.1f} | {r['flops_per_s'] / 1e9:.1f} | {r['flops_per_s'] / rate:.1%} "
              f"| {r['seconds_per_step']:.1f} | {r['peak_rss_gb']:.2f} | {gpu} |")
    tokens = {way: r["tokens_per_s"] for way, r in results.items()}
    print(f"stage / notebook tokens/s: {tokens['stage'] / tokens['notebook']:.2f}x")
    if bf16:
        print(f"stage-bf16 / notebook: {tokens['stage-bf16'] / tokens['notebook']:.2f}x; "
              f"stage-bf16 / stage (fp32): {tokens['stage-bf16'] / tokens['stage']:.2f}x")


if __name__ == "__main__":
    main()
