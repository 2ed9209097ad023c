"""Questions per second: the notebook way vs the eval stages' way, on the same model and questions.

Notebook way: one `generate` call per question, the decision parsed from the generated text.
Stage way: what the eval stages run: `answer_and_score`, which prefills each prompt once, alone,
shares its KV cache between choice scoring of the decision and the reference answer's likelihood
(for perplexity), then decodes `eval.batch_size` prompts together from their stacked caches. It does
more than the notebook way (three extra scores per question: the direct choice, the reference's
likelihood, and the choice after the generated answer). On a CPU the notebook way runs in float32
(the weights as they load) and the stage way in `model.dtype` (float32 under `auto`, as the eval
stages run; `--dtype bfloat16` for bf16 weights). Greedy generations must be identical when both
are float32; otherwise their agreement is reported.
The added cost of the after_answer and calibrated decision protocols is measured against the
stage way without them, on the same questions (alternated, `--repeats` times each, the fastest counts).

With `--compile`, the stage way runs twice more with the decoding step compiled (transformers
compiles the forward of a static-cache `generate` with `torch.compile`; it does so by itself on CUDA,
here on the CPU too): the first run counts the compile time, the second does not.

    python -m bench.eval_speed [--questions 32] [--batch-size 8] [--max-new-tokens 96] [--repeats 2] [--compile]

Needs the pipeline's `models/base` and `data/split/test.jsonl` (run `dvc repro split` first).
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch

from medqa import paths
from medqa.decisions.answer_format import AnswerFormat
from medqa.inference.decision_scorer import DecisionScorer
from medqa.inference.generation import ScoredAnswers, generate, generate_and_score, generation_config
from medqa.io import read_jsonl
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.loading import load_for_inference
from medqa.params import load_params
from medqa.prompting.prompts import fit_prompt
from medqa.tokens import token_ids

T = TypeVar("T")


def _timed(run: Callable[[], T]) -> tuple[T, float]:
    """What `run` returns, and the seconds it took."""
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def _compiled_stage_way(scorer: DecisionScorer, prompts, targets, greedy, eager_generations, eager_s) -> None:
    """The stage way with the decode step compiled, twice: compile time counted, then not."""
    import copy

    from transformers import CompileConfig

    config = copy.deepcopy(greedy)
    config.compile_config = CompileConfig(mode="default")  # ("reduce-overhead" is CUDA graphs)
    config.compile_config._compile_all_devices = True  # transformers' switch for compiling off CUDA

    def run() -> ScoredAnswers:
        return scorer.answer_and_score(prompts, targets, config, seed=0, desc="compiled")

    n = len(prompts)
    first, first_s = _timed(run)
    second_s = _timed(run)[1]
    same = sum(a == b for a, b in zip(first.generations, eager_generations))
    print(f"compiled stage way: first run {n / first_s:.3f} questions/s ({first_s:.1f} s, compile included, "
          f"{eager_s / first_s:.2f}x the eager stage way), second {n / second_s:.3f} questions/s ({second_s:.1f} s, "
          f"{eager_s / second_s:.2f}x); generations identical to the eager ones: {same}/{n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: generation.max_new_tokens")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the stage way, with and without after_answer")
    parser.add_argument("--dtype", default=None, help="the stage way's model.dtype (default: params.yaml's)")
    parser.add_argument("--compile", action="store_true", help="also the stage way with torch.compile'd decoding")
    args = parser.parse_args()
    params = load_params()
    batch_size = args.batch_size or params.eval.batch_size
    max_new = args.max_new_tokens or params.generation.max_new_tokens
    answer_format = AnswerFormat.of(params.prompt)

    hardware = resolve_hardware(params.model.quantization, args.dtype or params.model.dtype)
    loaded = load_for_inference(paths.BASE_MODEL, hardware)
    model, tokenizer = loaded.model, loaded.tokenizer
    # The notebooks load the weights as they come on a CPU, fp32 (on CUDA, in the stage's dtype).
    notebook_hardware = replace(hardware, dtype=torch.float32) if hardware.device == "cpu" else hardware
    notebook_model = model if notebook_hardware == hardware else load_for_inference(
        paths.BASE_MODEL, notebook_hardware).model
    examples = read_jsonl(paths.TEST)[: args.questions]
    prompts = [fit_prompt(ex, tokenizer, params.eval.max_prompt_length) for ex in examples]
    print(f"{len(prompts)} questions, {max_new} new tokens on {hardware.device}: the stage way in {hardware.dtype}, "
          f"the notebook way in {notebook_hardware.dtype}; torch threads {torch.get_num_threads()}")

    greedy = generation_config(max_new)
    notebook, notebook_s = _timed(lambda: [
        generate(notebook_model, tokenizer, [p], greedy, batch_size=1, desc="notebook")[0] for p in prompts])
    notebook_decisions = [answer_format.parse(g) for g in notebook]

    targets = [token_ids(tokenizer, ex["target"]) for ex in examples]
    scorer = DecisionScorer(model, tokenizer, answer_format, params.eval.max_prompt_length, batch_size)

    def with_protocols() -> ScoredAnswers:
        return scorer.answer_and_score(prompts, targets, greedy, seed=0, desc="stage")

    def without_protocols() -> ScoredAnswers:
        return generate_and_score(
            model, tokenizer, prompts, greedy, choice_prefix=answer_format.prefix_ids(tokenizer),
            options=answer_format.options(tokenizer), targets=targets, batch_size=batch_size,
            desc="stage without after_answer",
        )

    # The stage way with and without after_answer scoring, alternated; the fastest of each counts
    # (run-to-run noise on a busy machine is larger than the difference measured).
    runs, without_runs = [], []
    for _ in range(args.repeats):
        scored, seconds = _timed(with_protocols)
        runs.append(seconds)
        without_runs.append(_timed(without_protocols)[1])
    stage_s, without_s = min(runs), min(without_runs)
    prior_s = _timed(lambda: scorer.content_free(params.prompt, params.model.name))[1]
    batched = scored.generations
    followup_tokens = sum(len(answer_format.after_answer_ids(tokenizer, g)) for g in batched)

    same = sum(a == b for a, b in zip(notebook, batched))
    n = len(prompts)
    print(f"notebook way: {n / notebook_s:.3f} questions/s ({notebook_s:.1f} s)")
    # One run each way for the ratio (the notebook way is run once: it is the slow one).
    print(f"stage way:    {n / runs[0]:.3f} questions/s ({runs[0]:.1f} s, batch {batch_size}, with choice scoring, "
          "reference likelihood and after_answer scoring)")
    print(f"ratio:        {notebook_s / runs[0]:.2f}x")
    added = stage_s - without_s + prior_s
    print(f"after_answer + calibration: {stage_s - without_s:+.1f} s + {prior_s:.1f} s = {100 * added / without_s:+.1f}% "
          f"of the stage way without them ({without_s:.1f} s; fastest of {args.repeats} alternated runs each: "
          f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in zip(runs, without_runs))} s with/without)")
    print(f"after_answer tokens read from the generation's cache: {sum(scored.after_answer_cached)} of {followup_tokens}")
    print(f"identical greedy generations: {same}/{n}; parsed decisions found by the notebook way: "
          f"{sum(d != 'none' for d in notebook_decisions)}/{n}")
    if args.compile:
        _compiled_stage_way(scorer, prompts, targets, greedy, batched, runs[0])
    # In fp32 the two ways must agree; in bf16 rounding differs with the batch shape, so it is reported.
    if hardware.dtype == notebook_hardware.dtype == torch.float32:
        assert same == n, "batched greedy generations differ from one-by-one generations"


if __name__ == "__main__":
    main()
