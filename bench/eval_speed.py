"""Questions per second: the notebook way vs the eval stages' way, on the same model and questions.

Notebook way: one `generate` call per question, the decision parsed from the generated text.
Stage way: what the eval stages run: `answer_and_score`, which prefills each prompt once, alone,
shares its KV cache between choice scoring of the decision and the reference answer's likelihood
(for perplexity), then decodes `eval.batch_size` prompts together from their stacked caches. It does
more than the notebook way (two extra scores per question). Greedy generations must be identical.

    python -m bench.eval_speed [--questions 32] [--batch-size 8] [--max-new-tokens 96]

Needs the pipeline's `models/base` and `data/split/test.jsonl` (run `dvc repro split` first).
"""
from __future__ import annotations

import argparse
import time

import torch

from medqa import paths
from medqa.evaluation import answer_and_score
from medqa.generation import generate
from medqa.io import read_jsonl
from medqa.models import load_model, load_tokenizer, resolve_hardware
from medqa.params import load_params
from medqa.prompts import fit_prompt, parse_decision


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
    start = time.perf_counter()
    batched, _, _, _ = answer_and_score(model, tokenizer, examples, prompts, prefix, greedy, batch_size, desc="stage")
    stage_s = time.perf_counter() - start

    same = sum(a == b for a, b in zip(notebook, batched))
    n = len(prompts)
    print(f"notebook way: {n / notebook_s:.3f} questions/s ({notebook_s:.1f} s)")
    print(f"stage way:    {n / stage_s:.3f} questions/s ({stage_s:.1f} s, batch {batch_size}, with choice scoring "
          "and reference likelihood)")
    print(f"ratio:        {notebook_s / stage_s:.2f}x")
    print(f"identical greedy generations: {same}/{n}; parsed decisions found by the notebook way: "
          f"{sum(d != 'none' for d in notebook_decisions)}/{n}")
    assert same == n, "batched greedy generations differ from one-by-one generations"


if __name__ == "__main__":
    main()
