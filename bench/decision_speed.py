"""Decisions per second, and whether a faster way reads the same decisions: the eval stages' decision pass
(the options after each test prompt and the answer prefix, one prefill each, `DecisionScorer.after_prompts`)
timed side by side in one process, on the same questions, for the base model and base + adapter:

- fp32, batched by length (`eval.batch_size` prompts a forward pass): what the eval stages run;
- fp32, one prompt at a time (no padding);
- bf16 weights, batched (where the CPU has native bf16 or on CUDA), with the decisions' agreement with
  fp32 and the change of the choice protocol's accuracy and macro-F1 on these questions;
- for the adapter, also merged into the base weights (peft's `merge_and_unload`) against kept apart.

    python -m bench.decision_speed [--questions 500] [--batch-size 32] [--no-adapter]

Needs the pipeline's `models/base`, `data/split/test.jsonl` and, for the adapter rows, `models/adapter`.
Run it alone: the ratios are only meaningful when nothing else runs beside it.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medqa import paths
from medqa.decisions.answer_format import AnswerFormat
from medqa.decisions.answers import reference_codes
from medqa.evaluation.metrics import class_f1
from medqa.inference.decisions import DecisionScorer
from medqa.io import read_jsonl
from medqa.modeling.hardware import cpu_has_native_bf16, resolve_hardware
from medqa.modeling.loading import load_for_inference
from medqa.params import load_params
from medqa.prompting.prompts import fit_prompt


def _timed_scores(scorer: DecisionScorer, prompts: list[list[int]]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    scores = scorer.after_prompts(prompts, desc=None)
    return scores, time.perf_counter() - start


def _compare(label: str, truth: np.ndarray, reference: np.ndarray, other: np.ndarray) -> str:
    """How far `other`'s decisions are from `reference`'s (both log-likelihoods, (n, 3))."""
    a, b = reference.argmax(axis=1), other.argmax(axis=1)
    accuracy = [float(np.mean(x == truth)) for x in (a, b)]
    macro = [class_f1(truth, x, "macro") for x in (a, b)]
    return (f"{label}: decisions agree on {int(np.sum(a == b))}/{len(a)} ({np.mean(a == b):.1%}); accuracy "
            f"{accuracy[0]:.4f} -> {accuracy[1]:.4f} ({accuracy[1] - accuracy[0]:+.4f}), macro-F1 {macro[0]:.4f} -> "
            f"{macro[1]:.4f} ({macro[1] - macro[0]:+.4f}); largest log-likelihood difference "
            f"{np.abs(reference - other).max():.4f}")


def _model_rows(name: str, model: Any, tokenizer: Any, prompts: list[list[int]], truth: np.ndarray,
                answer_format: AnswerFormat, max_prompt_length: int, batch_size: int, bf16: bool) -> None:
    scorer = DecisionScorer(model, tokenizer, answer_format, max_prompt_length, batch_size)
    fp32, fp32_s = _timed_scores(scorer, prompts)
    n = len(prompts)
    print(f"{name}, fp32 batched ({batch_size}): {n / fp32_s:.2f} questions/s ({fp32_s:.1f} s)")
    alone, alone_s = _timed_scores(scorer.with_batch_size(1), prompts)
    print(f"{name}, fp32 one at a time: {n / alone_s:.2f} questions/s ({alone_s:.1f} s, {fp32_s / alone_s:.2f}x batched)")
    print("  " + _compare("one at a time vs batched", truth, fp32, alone))
    if bf16:
        half = copy.deepcopy(model).to(torch.bfloat16)
        scores, half_s = _timed_scores(DecisionScorer(half, tokenizer, answer_format, max_prompt_length, batch_size),
                                       prompts)
        print(f"{name}, bf16 batched: {n / half_s:.2f} questions/s ({half_s:.1f} s, {fp32_s / half_s:.2f}x fp32 batched)")
        print("  " + _compare("bf16 vs fp32", truth, fp32, scores))
        del half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument("--no-adapter", action="store_true", help="the base model only")
    args = parser.parse_args()
    params = load_params()
    batch_size = args.batch_size or params.eval.batch_size
    answer_format = AnswerFormat.of(params.prompt)
    hardware = resolve_hardware(params.model.quantization, "float32")
    bf16 = hardware.device == "cuda" or cpu_has_native_bf16()
    examples = read_jsonl(paths.TEST)[: args.questions]
    truth = reference_codes(examples)
    print(f"{len(examples)} test questions on {hardware.device}, torch threads {torch.get_num_threads()}, "
          f"native bf16: {bf16}")

    loaded = load_for_inference(paths.BASE_MODEL, hardware)
    tokenizer = loaded.tokenizer
    prompts = [fit_prompt(ex, tokenizer, params.eval.max_prompt_length) for ex in examples]
    print(f"prompt tokens: mean {np.mean([len(p) for p in prompts]):.0f}, max {max(len(p) for p in prompts)}")
    _model_rows("base", loaded.model, tokenizer, prompts, truth, answer_format, params.eval.max_prompt_length,
                batch_size, bf16)
    if args.no_adapter or not Path(paths.ADAPTER / "adapter_model.safetensors").exists():
        return
    del loaded
    tuned = load_for_inference(paths.BASE_MODEL, hardware, paths.ADAPTER).model
    _model_rows("base + adapter", tuned, tokenizer, prompts, truth, answer_format, params.eval.max_prompt_length,
                batch_size, bf16)
    apart, apart_s = _timed_scores(DecisionScorer(tuned, tokenizer, answer_format, params.eval.max_prompt_length,
                                                  batch_size), prompts)
    merged = tuned.merge_and_unload()
    together, merged_s = _timed_scores(DecisionScorer(merged, tokenizer, answer_format, params.eval.max_prompt_length,
                                                      batch_size), prompts)
    print(f"adapter merged: {len(prompts) / merged_s:.2f} questions/s ({merged_s:.1f} s, {apart_s / merged_s:.2f}x "
          "kept apart, fp32 batched)")
    print("  " + _compare("merged vs apart", truth, apart, together))


if __name__ == "__main__":
    main()
