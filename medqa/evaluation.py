"""The evaluation both eval stages share: same questions, same protocol, base model or adapter."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from medqa import metrics
from medqa.data import DECISIONS
from medqa.errors import explain_out_of_memory
from medqa.generation import continuation_ids, generate_and_score, score_choices
from medqa.io import read_jsonl, write_json, write_jsonl
from medqa.models import load_model, load_tokenizer, resolve_hardware
from medqa.prompts import fit_prompt, long_answer_part, parse_decision

log = logging.getLogger(__name__)


def decision_options(tokenizer: Any, answer_prefix: str) -> list[list[int]]:
    """The tokens of " yes", " no", " maybe" in context after the answer prefix, as the target spells them."""
    return [continuation_ids(tokenizer, answer_prefix, f" {d}") for d in DECISIONS]


def score_decisions(
    model: Any, tokenizer: Any, prompts: list[list[int]], answer_prefix: str, batch_size: int, desc: str | None
) -> np.ndarray:
    """Log-likelihood of " yes", " no", " maybe" after each prompt and the answer prefix, shape (n, 3)."""
    prefix_ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    return np.array(score_choices(
        model, [p + prefix_ids for p in prompts], decision_options(tokenizer, answer_prefix),
        pad_id=tokenizer.pad_token_id, batch_size=batch_size, desc=desc,
    ))


def validation_decisions(
    model: Any, tokenizer: Any, examples: list[dict], answer_prefix: str, max_prompt_length: int, batch_size: int
) -> dict[str, Any]:
    """Choice-scored decisions on held-out examples: accuracy, macro-F1 (the eval stages' statistics)
    and how often each decision was chosen (the finetune stage's validation check: one forward pass
    per question)."""
    prompts = [fit_prompt(ex, tokenizer, max_prompt_length) for ex in examples]
    chosen = score_decisions(model, tokenizer, prompts, answer_prefix, batch_size, desc="validation decisions")
    table = {"truth": np.array([metrics.CODES[ex["final_decision"]] for ex in examples]),
             "choice": chosen.argmax(axis=1)}  # option i is DECISIONS[i], coded i
    every = np.arange(len(examples))
    return {
        "accuracy": metrics.STATISTICS["decision.choice.accuracy"](table, every),
        "macro_f1": metrics.STATISTICS["decision.choice.macro_f1"](table, every),
        "chosen": {d: int(np.sum(table["choice"] == metrics.CODES[d])) for d in DECISIONS},
    }


def choice_probabilities(loglik: np.ndarray) -> np.ndarray:
    """The options' log-likelihoods, shape (n, 3), normalised to probabilities over the three decisions."""
    probs = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def answer_and_score(
    model: Any, tokenizer: Any, examples: list[dict], prompts: list[list[int]], answer_prefix: str,
    generation: dict[str, Any], batch_size: int, desc: str | None,
) -> tuple[list[str], np.ndarray, list[float], list[int]]:
    """The eval stages' pass over the test questions, one prefill per prompt: the generated answers,
    the log-likelihoods of " yes", " no", " maybe" after the answer prefix (n, 3), and the summed
    log-likelihood and token count of each reference target."""
    targets = [tokenizer(ex["target"], add_special_tokens=False)["input_ids"] for ex in examples]
    generations, choice_loglik, target_loglik = generate_and_score(
        model, tokenizer, prompts, choice_prefix=tokenizer(answer_prefix, add_special_tokens=False)["input_ids"],
        options=decision_options(tokenizer, answer_prefix), targets=targets, batch_size=batch_size,
        max_new_tokens=generation["max_new_tokens"], temperature=generation["temperature"],
        top_p=generation["top_p"], repetition_penalty=generation["repetition_penalty"], seed=generation["seed"],
        desc=desc,
    )
    return generations, np.array(choice_loglik), target_loglik, [len(t) for t in targets]


def _setup_model(model_params: dict, base_dir: str | Path, adapter_dir: str | Path | None) -> tuple[Any, Any, Any]:
    """The model to evaluate (base, or base + adapter), its left-padding tokenizer and the hardware."""
    hardware = resolve_hardware(model_params["quantization"], model_params["dtype"])
    return load_model(base_dir, hardware, adapter_dir), load_tokenizer(base_dir, padding_side="left"), hardware


def _text_scores(answers: list[str], references: list[str], ev: dict, label: str) -> dict[str, list[float]]:
    """Per question: ROUGE-1/2/L and BERTScore F1 of the generated long answer against the reference."""
    scores = metrics.rouge_scores(answers, references)
    log.info("%s: BERTScore with %s", label, ev["bertscore_model"])
    scores["bertscore_f1"] = metrics.bertscore_f1(
        answers, references, ev["bertscore_model"], ev["bertscore_num_layers"], ev["batch_size"]
    )
    return scores


def _prediction_row(ex: dict, generation: str, answer: str, probs: np.ndarray, target_loglik: float,
                    target_tokens: int, scores: dict[str, float], answer_prefix: str) -> dict:
    """One line of the predictions file: the question, what the model said and how it scored."""
    return {
        "pmid": ex["pmid"],
        "prompt_id": ex["prompt_id"],
        "question": ex["question"],
        "reference": ex["long_answer"],
        "reference_decision": ex["final_decision"],
        "generation": generation,
        "answer": answer,
        "decision_generated": parse_decision(generation, answer_prefix),
        "decision_choice": DECISIONS[int(np.argmax(probs))],
        "choice_probs": {d: round(float(p), 6) for d, p in zip(DECISIONS, probs)},
        "answer_nll": -float(target_loglik),
        "answer_tokens": target_tokens,
        **{k: round(float(v), 6) for k, v in scores.items()},
    }


def _write_outputs(rows: list[dict], result: dict, predictions_path: str | Path, official_path: str | Path,
                   metrics_path: str | Path) -> None:
    write_jsonl(predictions_path, rows)
    write_json(official_path, {r["pmid"]: r["decision_choice"] for r in rows})  # the official format
    write_json(metrics_path, result)


@explain_out_of_memory("lower eval.batch_size or eval.max_prompt_length, or on CUDA keep model.quantization=auto")
def run_evaluation(
    params: dict[str, Any],
    base_dir: str | Path,
    test_path: str | Path,
    adapter_dir: str | Path | None,
    predictions_path: str | Path,
    official_path: str | Path,
    metrics_path: str | Path,
    label: str,
) -> dict:
    """Evaluate the base model (or base + adapter) on the test split and write all three outputs."""
    gen, ev, prefix = params["generation"], params["eval"], params["prompt"]["answer_prefix"]
    examples = read_jsonl(test_path)
    model, tokenizer, hardware = _setup_model(params["model"], base_dir, adapter_dir)
    log.info("%s: %d test questions on %s%s", label, len(examples), hardware.device,
             " (4-bit nf4 base)" if hardware.quantize_4bit else "")

    prompts = [fit_prompt(ex, tokenizer, ev["max_prompt_length"]) for ex in examples]
    generations, loglik, target_loglik, target_tokens = answer_and_score(
        model, tokenizer, examples, prompts, prefix, gen, ev["batch_size"], desc=f"{label}: generating and scoring"
    )
    del model  # BERTScore loads its own model next

    answers = [long_answer_part(g, prefix) for g in generations]
    scores = _text_scores(answers, [ex["long_answer"] for ex in examples], ev, label)
    rows = [
        _prediction_row(ex, generations[i], answers[i], probs, target_loglik[i], target_tokens[i],
                        {k: v[i] for k, v in scores.items()}, prefix)
        for i, (ex, probs) in enumerate(zip(examples, choice_probabilities(loglik)))
    ]
    result = metrics.summarize(metrics.table_from_rows(rows), ev["bootstrap"], ev["seed"])
    _write_outputs(rows, result, predictions_path, official_path, metrics_path)
    log.info(
        "%s: choice accuracy %.3f, parsed accuracy %.3f, ROUGE-L %.3f, BERTScore F1 %.3f, perplexity %.2f",
        label, result["decision"]["choice"]["accuracy"], result["decision"]["generated"]["accuracy"],
        result["text"]["rougeL"], result["text"]["bertscore_f1"], result["text"]["perplexity"],
    )
    return result
