"""Cross-validation's model side: a fold's held-out questions scored by the adapter trained without them."""
from __future__ import annotations

from pathlib import Path

from medqa.decisions.answer_format import AnswerFormat
from medqa.params import EvalParams, ModelParams, PromptParams


def score_held_out(base_dir: Path, adapter_dir: Path, held_out: list[dict], *, model: ModelParams,
                   prompt: PromptParams, evaluation: EvalParams) -> list[dict]:
    """Each held-out question's option log-likelihoods after its prompt and the answer prefix, from the
    base model with the fold's adapter, computed as the eval stages compute the test decisions (the
    adapter merged, prompts cut to `eval.max_prompt_length`): one row per question."""
    from medqa.inference.decision_scorer import DecisionScorer
    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_for_inference

    loaded = load_for_inference(base_dir, resolve_hardware(model.quantization, model.dtype), adapter_dir, merge=True)
    scorer = DecisionScorer(loaded.model, loaded.tokenizer, AnswerFormat.of(prompt), evaluation.max_prompt_length,
                            evaluation.batch_size)
    loglik = scorer.after_examples(held_out, desc="held-out decisions")
    return [{"pmid": ex["pmid"], "final_decision": ex["final_decision"],
             "loglik": [round(float(v), 6) for v in row]} for ex, row in zip(held_out, loglik)]
