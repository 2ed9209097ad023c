"""The eval stages' decision pass (the options after each test prompt and the answer prefix,
`DecisionScorer.after_prompts`): how fast, side by side in one process on the same questions, and whether
bf16 would read the same decisions.

Speed, on the first `--questions` test questions, for the base model:
- fp32, each prompt alone in token order, the prefix shared with the one before read once: what the
  eval stages run;
- fp32 in padded batches of `--batch-size` prompts of similar length (`score_choices`): what they ran before;
- bf16 weights, each prompt alone (where the CPU has native bf16, or on CUDA).

Agreement, on every test question, for the base model and the fine-tuned one (the adapter merged, as
the eval stages load it): bf16's decisions against the fp32 decisions of the pipeline's own predictions
(`data/predictions/<label>.jsonl`, `decision_choice`), and the change of the choice protocol's accuracy
and macro-F1. The eval stages would prefill in bf16 only if they agreed on at least 99% of the questions
for each model and moved accuracy and macro-F1 by at most 0.005 (docs/benchmarks.md).

    python -m bench.decision_speed [--questions 64] [--batch-size 32]

Needs a finished pipeline run (`models/base`, `models/adapter`, `data/split/test.jsonl`, the predictions).
Run it alone: the ratios only mean something when nothing else runs beside it.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from medqa import paths
from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.decisions.protocols import reference_codes
from medqa.evaluation.metrics import class_f1
from medqa.inference.decision_scorer import DecisionScorer
from medqa.inference.scoring import score_choices
from medqa.io import read_jsonl
from medqa.modeling.hardware import cpu_has_native_bf16, resolve_hardware
from medqa.modeling.loading import load_for_inference
from medqa.params import load_params
from medqa.prompting.prompts import fit_prompt


def _timed(run: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def _speed(scorer: DecisionScorer, prompts: list[list[int]], batch_size: int, bf16: bool) -> None:
    n = len(prompts)
    scorer.after_prompts(prompts[:2])  # warm-up
    alone, alone_s = _timed(lambda: scorer.after_prompts(prompts))
    print(f"fp32, each prompt alone (the stages' way): {n / alone_s:.2f} questions/s ({alone_s:.1f} s)")
    prefix = scorer.answer_format.prefix_ids(scorer.tokenizer)
    batched, batched_s = _timed(lambda: np.array(score_choices(
        scorer.model, [p + prefix for p in prompts], scorer.answer_format.options(scorer.tokenizer),
        pad_id=scorer.tokenizer.pad_token_id, batch_size=batch_size, desc=None)))
    print(f"fp32, padded batches of {batch_size}: {n / batched_s:.2f} questions/s ({batched_s:.1f} s); alone is "
          f"{batched_s / alone_s:.2f}x; largest log-likelihood difference {np.abs(alone - batched).max():.1e}")
    if bf16:
        half = DecisionScorer(scorer.model.to(torch.bfloat16), scorer.tokenizer, scorer.answer_format,
                              scorer.max_prompt_length, scorer.batch_size)
        half.after_prompts(prompts[:2])
        _, half_s = _timed(lambda: half.after_prompts(prompts))
        print(f"bf16, each prompt alone: {n / half_s:.2f} questions/s ({half_s:.1f} s, {alone_s / half_s:.2f}x fp32)")
        scorer.model.to(torch.float32)


def _agreement(label: str, model: Any, tokenizer: Any, answer_format: AnswerFormat, examples: list[dict],
               max_prompt_length: int) -> None:
    """bf16 decisions on every test question against the pipeline's fp32 ones."""
    rows = {r["pmid"]: r for r in read_jsonl(paths.eval_outputs(label)["predictions_path"])}
    fp32 = np.array([DECISIONS.index(rows[ex["pmid"]]["decision_choice"]) for ex in examples])
    scorer = DecisionScorer(model.to(torch.bfloat16), tokenizer, answer_format, max_prompt_length, 32)
    prompts = [fit_prompt(ex, tokenizer, max_prompt_length) for ex in examples]
    half = scorer.after_prompts(prompts, desc=f"{label} in bf16").argmax(axis=1)
    truth = reference_codes(examples)
    accuracy = [float(np.mean(d == truth)) for d in (fp32, half)]
    macro = [class_f1(truth, d, "macro") for d in (fp32, half)]
    print(f"{label}: bf16 and fp32 decisions agree on {int(np.sum(fp32 == half))}/{len(fp32)} "
          f"({np.mean(fp32 == half):.1%}); accuracy {accuracy[0]:.4f} -> {accuracy[1]:.4f} "
          f"({accuracy[1] - accuracy[0]:+.4f}), macro-F1 {macro[0]:.4f} -> {macro[1]:.4f} ({macro[1] - macro[0]:+.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=64, help="questions the speeds are measured on")
    parser.add_argument("--batch-size", type=int, default=32, help="the padded batches' size")
    args = parser.parse_args()
    params = load_params()
    answer_format = AnswerFormat.of(params.prompt)
    hardware = resolve_hardware(params.model.quantization, "float32")
    bf16 = hardware.device == "cuda" or cpu_has_native_bf16()
    examples = read_jsonl(paths.TEST)
    loaded = load_for_inference(paths.BASE_MODEL, hardware)
    tokenizer = loaded.tokenizer
    prompts = [fit_prompt(ex, tokenizer, params.eval.max_prompt_length) for ex in examples[: args.questions]]
    print(f"{hardware.device}, torch threads {torch.get_num_threads()}, native bf16: {bf16}; speed on {len(prompts)} "
          f"test questions (prompt tokens: mean {np.mean([len(p) for p in prompts]):.0f})")
    _speed(DecisionScorer(loaded.model, tokenizer, answer_format, params.eval.max_prompt_length, 32), prompts,
           args.batch_size, bf16)
    if not bf16:
        return
    _agreement("baseline", loaded.model, tokenizer, answer_format, examples, params.eval.max_prompt_length)
    del loaded
    tuned = load_for_inference(paths.BASE_MODEL, hardware, paths.ADAPTER, merge=True).model
    _agreement("finetuned", tuned, tokenizer, answer_format, examples, params.eval.max_prompt_length)


if __name__ == "__main__":
    main()
