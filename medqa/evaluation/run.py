"""The evaluation both eval stages share: same questions, same protocol, base model or adapter."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medqa import paths
from medqa.decisions import answers
from medqa.evaluation import metrics
from medqa.evaluation.text_metrics import text_scores
from medqa.decisions.answer_format import AnswerFormat
from medqa.decisions.answers import Fitted
from medqa.errors import explain_out_of_memory
from medqa.inference.decisions import DecisionScorer
from medqa.inference.generation import ScoredAnswers, generation_config_from_params
from medqa.io import read_jsonl, write_json, write_jsonl
from medqa.modeling.loading import load_for_inference
from medqa.modeling.hardware import resolve_hardware
from medqa.params import EvalParams, GenerationParams, ModelParams, PromptParams
from medqa.prompting.prompts import fit_prompt
from medqa.tokens import token_ids

if TYPE_CHECKING:
    from medqa.evaluation.progress import Progress

log = logging.getLogger(__name__)


EVAL_SECTIONS = ("model", "prompt", "generation", "eval")  # the params sections that decide an eval stage's outputs


def validation_decisions(scorer: DecisionScorer, examples: list[dict], n_resamples: int = 1000,
                         seed: int = 0) -> dict[str, Any]:
    """Choice-scored decisions on held-out examples, summarised by `metrics.choice_summary` (the
    finetune stage's validation check)."""
    return metrics.choice_summary(answers.reference_codes(examples), scorer.choices(examples), n_resamples, seed)


def _text_scores(long_answers: list[str], references: list[str], evaluation: EvalParams,
                 label: str) -> dict[str, list[float]]:
    """Per question, every per-question text metric (`text_metrics.TEXT_METRICS`) of the generated long answer
    against the reference."""
    log.info("%s: text metrics (BERTScore with %s)", label, evaluation.bertscore_model)
    return text_scores(long_answers, references, evaluation)


def _decision_columns(scored: ScoredAnswers, answer_format: AnswerFormat, fitted: dict[str, Fitted]) -> list[dict]:
    """Per question, the decision of each protocol (`answers.PROTOCOLS`) and the probabilities behind
    it, and where the after-answer reading cut the generation."""
    evidence = answers.DecisionEvidence(scored.generations, np.array(scored.choices), np.array(scored.after_answer),
                                        answer_format, fitted)
    return [dict(columns, after_answer_at=answer_format.after_answer_at(generation))
            for columns, generation in zip(answers.read_decisions(evidence), scored.generations)]


def _prediction_row(ex: dict, generation: str, long_answer: str, decisions: dict, target_loglik: float,
                    target_tokens: int, scores: dict[str, float]) -> dict:
    """One line of the predictions file: the question, what the model said and how it scored."""
    return {
        "pmid": ex["pmid"],
        "prompt_id": ex["prompt_id"],
        "question": ex["question"],
        "reference": ex["long_answer"],
        "reference_decision": ex["final_decision"],
        "generation": generation,
        "answer": long_answer,
        **decisions,
        "answer_nll": -float(target_loglik),
        "answer_tokens": target_tokens,
        **{k: round(float(v), 6) for k, v in scores.items()},
    }


def _write_outputs(rows: list[dict], result: dict, files: EvalFiles) -> None:
    write_jsonl(files.predictions, rows)
    # The official format holds the published protocol's decisions.
    write_json(files.official, {r["pmid"]: r[f"decision_{answers.PRIMARY.name}"] for r in rows})
    write_json(files.metrics, result)


@dataclass(frozen=True)
class EvalFiles:
    """What an eval stage reads (the base model, the adapter or None, the test and validation splits)
    and the three outputs it writes."""

    base_dir: Path
    adapter_dir: Path | None
    test: Path
    val: Path
    predictions: Path
    official: Path
    metrics: Path

    @classmethod
    def of_stage(cls, label: str, adapter_dir: Path | None) -> EvalFiles:
        """The files of the eval stage `label` ("baseline" or "finetuned"), as `medqa.paths` places them."""
        outputs = paths.eval_outputs(label)
        return cls(paths.BASE_MODEL, adapter_dir, paths.TEST, paths.VAL, outputs["predictions_path"],
                   outputs["official_path"], outputs["metrics_path"])


@explain_out_of_memory("lower eval.batch_size or eval.max_prompt_length, or on CUDA keep model.quantization=auto")
def run_evaluation(model: ModelParams, prompt: PromptParams, generation: GenerationParams, evaluation: EvalParams,
                   files: EvalFiles, label: str, progress: Progress | None = None) -> dict:
    """Evaluate the base model (or base + adapter) on the test split and write all three outputs (what
    the protocols fit, on the content-free prompts and the validation split); with `progress`, the questions an
    interrupted run finished are taken from it, and each finished batch is kept there until the outputs
    are written."""
    answer_format = AnswerFormat.of(prompt)
    examples = read_jsonl(files.test)
    loaded = load_for_inference(files.base_dir, resolve_hardware(model.quantization, model.dtype), files.adapter_dir)
    tokenizer, hardware = loaded.tokenizer, loaded.hardware
    log.info("%s: %d test questions on %s, %s%s", label, len(examples), hardware.device,
             str(hardware.dtype).removeprefix("torch."), " (4-bit nf4 base)" if hardware.quantize_4bit else "")

    prompts = [fit_prompt(ex, tokenizer, evaluation.max_prompt_length) for ex in examples]
    targets = [token_ids(tokenizer, ex["target"]) for ex in examples]
    reused = progress.reused([ex["pmid"] for ex in examples], label) if progress else {}
    done = {i: reused[ex["pmid"]] for i, ex in enumerate(examples) if ex["pmid"] in reused}
    scorer = DecisionScorer(loaded.model, tokenizer, answer_format, evaluation.max_prompt_length, evaluation.batch_size)
    scored = scorer.answer_and_score(
        prompts, targets, generation_config_from_params(generation), generation.seed,
        desc=f"{label}: generating and scoring", done=done,
        on_batch=(lambda rows: progress.add({examples[i]["pmid"]: row for i, row in rows.items()})) if progress else None,
    )
    fitted = scorer.fit(answers.PROTOCOLS, prompt, model.name, read_jsonl(files.val))
    del loaded  # BERTScore loads its own model next

    long_answers = [answer_format.long_answer(g) for g in scored.generations]
    scores = _text_scores(long_answers, [ex["long_answer"] for ex in examples], evaluation, label)
    rows = [
        _prediction_row(ex, scored.generations[i], long_answers[i], decisions, scored.target_loglik[i],
                        len(targets[i]), {k: v[i] for k, v in scores.items()})
        for i, (ex, decisions) in enumerate(zip(examples, _decision_columns(scored, answer_format, fitted)))
    ]
    result = metrics.summarize(metrics.table_from_rows(rows), evaluation.bootstrap, evaluation.seed)
    for protocol in answers.PROTOCOLS:
        if protocol.name in fitted:
            result["decision"][protocol.name].update(protocol.fit.entry(fitted[protocol.name]))
    _write_outputs(rows, result, files)
    if progress:
        progress.finish()
    log.info(
        "%s: decision accuracy %s; ROUGE-L %.3f, token F1 %.3f, BERTScore F1 %.3f, perplexity %.2f", label,
        ", ".join(f"{p.label} {result['decision'][p.name]['accuracy']:.3f}" for p in answers.PROTOCOLS),
        result["text"]["rougeL"], result["text"]["token_f1"], result["text"]["bertscore_f1"],
        result["text"]["perplexity"],
    )
    return result
