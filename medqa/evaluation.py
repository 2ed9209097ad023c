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
    """Choice-scored decisions on held-out examples: accuracy, macro-F1 and how often each decision
    was chosen (the finetune stage's validation check, cheap: one forward pass per question)."""
    from sklearn.metrics import f1_score

    prompts = [fit_prompt(ex, tokenizer, max_prompt_length) for ex in examples]
    chosen = score_decisions(model, tokenizer, prompts, answer_prefix, batch_size, desc="validation decisions")
    predicted = chosen.argmax(axis=1)
    truth = np.array([DECISIONS.index(ex["final_decision"]) for ex in examples])
    return {
        "accuracy": float(np.mean(predicted == truth)),
        "macro_f1": float(f1_score(truth, predicted, labels=[0, 1, 2], average="macro", zero_division=0)),
        "chosen": {d: int(np.sum(predicted == i)) for i, d in enumerate(DECISIONS)},
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
    hardware = resolve_hardware(params["model"]["quantization"], params["model"]["dtype"])
    tokenizer = load_tokenizer(base_dir, padding_side="left")
    model = load_model(base_dir, hardware, adapter_dir)
    log.info("%s: %d test questions on %s%s", label, len(examples), hardware.device,
             " (4-bit nf4 base)" if hardware.quantize_4bit else "")

    prompts = [fit_prompt(ex, tokenizer, ev["max_prompt_length"]) for ex in examples]
    generations, loglik, target_loglik, target_tokens = answer_and_score(
        model, tokenizer, examples, prompts, prefix, gen, ev["batch_size"], desc=f"{label}: generating and scoring"
    )
    probs = choice_probabilities(loglik)
    del model

    answers = [long_answer_part(g, prefix) for g in generations]
    references = [ex["long_answer"] for ex in examples]
    per_item = metrics.rouge_scores(answers, references)
    log.info("%s: BERTScore with %s", label, ev["bertscore_model"])
    per_item["bertscore_f1"] = metrics.bertscore_f1(
        answers, references, ev["bertscore_model"], ev["bertscore_num_layers"], ev["batch_size"]
    )
    rows = [
        {
            "pmid": ex["pmid"],
            "prompt_id": ex["prompt_id"],
            "question": ex["question"],
            "reference": ex["long_answer"],
            "reference_decision": ex["final_decision"],
            "generation": generation,
            "answer": answer,
            "decision_generated": parse_decision(generation, prefix),
            "decision_choice": DECISIONS[int(np.argmax(row_probs))],
            "choice_probs": {d: round(float(p), 6) for d, p in zip(DECISIONS, row_probs)},
            "answer_nll": -float(ll),
            "answer_tokens": n_tokens,
            **{k: round(float(v[i]), 6) for k, v in per_item.items()},
        }
        for i, (ex, generation, answer, row_probs, ll, n_tokens) in enumerate(
            zip(examples, generations, answers, probs, target_loglik, target_tokens)
        )
    ]
    result = metrics.summarize(metrics.table_from_rows(rows), ev["bootstrap"], ev["seed"])
    write_jsonl(predictions_path, rows)
    write_json(official_path, {r["pmid"]: r["decision_choice"] for r in rows})
    write_json(metrics_path, result)
    log.info(
        "%s: choice accuracy %.3f, parsed accuracy %.3f, ROUGE-L %.3f, BERTScore F1 %.3f, perplexity %.2f",
        label, result["decision"]["choice"]["accuracy"], result["decision"]["generated"]["accuracy"],
        result["text"]["rougeL"], result["text"]["bertscore_f1"], result["text"]["perplexity"],
    )
    return result
