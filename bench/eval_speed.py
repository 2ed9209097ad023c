"""Questions per second: the notebook way vs the eval stages' way, on the same model and questions.

Notebook way: one `generate` call per question, the decision parsed from the generated text.
Stage way: what the eval stages run: `answer_and_score`, which prefills each prompt once, alone,
shares its KV cache between choice scoring of the decision and the reference answer's likelihood
(for perplexity), then decodes `eval.batch_size` prompts together from their stacked caches. It does
more than the notebook way (three extra scores per question: the direct choice, the reference's
likelihood, and the choice after the generated answer). Greedy generations must be identical.
The added cost of the after_answer and calibrated decision protocols is measured against the
stage way without them, on the same questions.

    python -m bench.eval_speed [--questions 32] [--batch-size 8] [--max-new-tokens 96]

Needs the pipeline's `models/base` and `data/split/test.jsonl` (run `dvc repro split` first).
"""
from __future__ import annotations

import argparse
import time

import torch

from medqa import paths
from medqa.answers import decision_options, parse_decision
from medqa.evaluation import answer_and_score, content_free_prior
from medqa.generation import generate, generate_and_score
from medqa.io import read_jsonl
from medqa.models import load_model, load_tokenizer, resolve_hardware
from medqa.params import load_params
from medqa.prompts import fit_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: generation.max_new_tokens")
    parser.add_argument("--dtype", default=None, help="default: model.dtype (float32 on the CPU)")
    args = parser.parse_args()
    params = load_params()
    batch_size = args.batch_size or params["eval"]["batch_size"]
    max_new = args.max_new_tokens or params["generation"]["max_new_tokens"]
    prefix = params["prompt"]["answer_prefix"]

    tokenizer = load_tokenizer(paths.BASE_MODEL, padding_side="left")
    hardware = resolve_hardware(params["model"]["quantization"], args.dtype or params["model"]["dtype"])
    model = load_model(paths.BASE_MODEL, hardware)
    examples = read_jsonl(paths.TEST)[: args.questions]
    prompts = [fit_prompt(ex, tokenizer, params["eval"]["max_prompt_length"]) for ex in examples]
    print(f"{len(prompts)} questions, {max_new} new tokens, {hardware.dtype} on {hardware.device}, "
          f"torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    notebook = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=max_new, desc="notebook")[0]
                for p in prompts]
    notebook_decisions = [parse_decision(g, prefix) for g in notebook]
    notebook_s = time.perf_counter() - start

    greedy = {"max_new_tokens": max_new, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}
    targets = [tokenizer(ex["target"], add_special_tokens=False)["input_ids"] for ex in examples]
    start = time.perf_counter()
    batched = answer_and_score(model, tokenizer, prompts, targets, prefix, greedy, batch_size, desc="stage").generations
    stage_s = time.perf_counter() - start

    # The same pass without after_answer scoring, and the calibration prior on its own.
    start = time.perf_counter()
    generate_and_score(
        model, tokenizer, prompts, choice_prefix=tokenizer(prefix, add_special_tokens=False)["input_ids"],
        options=decision_options(tokenizer, prefix), targets=targets, batch_size=batch_size, desc="stage without after_answer", **greedy,
    )
    without_s = time.perf_counter() - start
    start = time.perf_counter()
    content_free_prior(model, tokenizer, params["prompt"], params["model"]["name"])
    prior_s = time.perf_counter() - start

    same = sum(a == b for a, b in zip(notebook, batched))
    n = len(prompts)
    print(f"notebook way: {n / notebook_s:.3f} questions/s ({notebook_s:.1f} s)")
    print(f"stage way:    {n / stage_s:.3f} questions/s ({stage_s:.1f} s, batch {batch_size}, with choice scoring, "
          "reference likelihood and after_answer scoring)")
    print(f"ratio:        {notebook_s / stage_s:.2f}x")
    added = stage_s - without_s + prior_s
    print(f"after_answer + calibration: {stage_s - without_s:+.1f} s + {prior_s:.1f} s = {100 * added / without_s:+.1f}% "
          f"of the stage way without them ({without_s:.1f} s)")
    print(f"identical greedy generations: {same}/{n}; parsed decisions found by the notebook way: "
          f"{sum(d != 'none' for d in notebook_decisions)}/{n}")
    assert same == n, "batched greedy generations differ from one-by-one generations"


if __name__ == "__main__":
    main()
