"""The evaluation both eval stages share: same questions, same protocol, base model or adapter."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medqa import paths
from medqa.data.splits import long_answer_sample
from medqa.decisions import protocols
from medqa.decisions.answer_format import AnswerFormat
from medqa.decisions.protocols import Fitted
from medqa.errors import explain_out_of_memory
from medqa.evaluation import metrics
from medqa.evaluation.text_metrics import TEXT_METRICS, TEXT_SCORES, text_scores
from medqa.inference.decision_scorer import DecisionScorer
from medqa.inference.generation import ScoredAnswers, generation_config_from_params
from medqa.io import read_jsonl, write_json, write_jsonl
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.loading import load_for_inference
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
    return metrics.choice_summary(protocols.reference_codes(examples), scorer.choices(examples), n_resamples, seed)


def _text_scores(long_answers: list[str], references: list[str], evaluation: EvalParams,
                 label: str) -> dict[str, list[float]]:
    """Per question, every per-question text metric (`text_metrics.TEXT_METRICS`) of the generated long answer
    against the reference."""
    log.info("%s: text metrics (BERTScore with %s)", label, evaluation.bertscore_model)
    return text_scores(long_answers, references, evaluation)


def _decision_columns(choices: np.ndarray, scored: ScoredAnswers, sample: list[int], answer_format: AnswerFormat,
                      fitted: dict[str, Fitted]) -> list[dict]:
    """Per test question, the decision of each protocol (`protocols.PROTOCOLS`) and the probabilities behind
    it: every question's for the protocols that read the options after the prompt (`choices`), and on
    the `sample` whose answers were generated (`scored`, in the sample's order), those that read the
    answer (None elsewhere)."""
    after_prompt = [p for p in protocols.PROTOCOLS if not p.needs_generation]
    after_answer = [p for p in protocols.PROTOCOLS if p.needs_generation]
    columns = protocols.read_decisions(protocols.DecisionEvidence(choices, answer_format, fitted=fitted), after_prompt)
    for row in columns:
        row.update({f"decision_{p.name}": None for p in after_answer})
    evidence = protocols.DecisionEvidence(choices[sample], answer_format, scored.generations,
                                        np.array(scored.after_answer).reshape(len(sample), -1), fitted)
    for i, read in zip(sample, protocols.read_decisions(evidence, after_answer)):
        columns[i].update(read)
    return columns


# What a prediction row holds of a generated answer: None where the question's answer was not generated.
ANSWER_FIELDS = ("generation", "answer", "after_answer_at", "answer_nll", "answer_tokens", *TEXT_SCORES)


def _answer_fields(generation: str, long_answer: str, answer_format: AnswerFormat, *, target_loglik: float,
                   target_tokens: int, scores: dict[str, float]) -> dict:
    """A generated answer's fields of its prediction row: the text, its long answer, where the
    after-answer reading cut it, the reference target's likelihood and the text scores."""
    return {
        "generation": generation,
        "answer": long_answer,
        "after_answer_at": answer_format.after_answer_at(generation),
        "answer_nll": -float(target_loglik),
        "answer_tokens": target_tokens,
        **{k: round(float(v), 6) for k, v in scores.items()},
    }


def _prediction_row(ex: dict, decisions: dict, answer: dict | None) -> dict:
    """One line of the predictions file: the question, how each protocol decided and, where its answer
    was generated, what the model said and how it scored."""
    return {
        "pmid": ex["pmid"],
        "prompt_id": ex["prompt_id"],
        "question": ex["question"],
        "reference": ex["long_answer"],
        "reference_decision": ex["final_decision"],
        **decisions,
        **(answer or dict.fromkeys(ANSWER_FIELDS)),
    }


def _accuracies(result: dict, needs_generation: bool) -> str:
    """"choice 0.552, calibrated 0.410, ...": the decision accuracy of each protocol that does (or does
    not) read the generated answer, for the log."""
    return ", ".join(f"{p.label} {result['decision'][p.name]['accuracy']:.3f}" for p in protocols.PROTOCOLS
                     if p.needs_generation == needs_generation)


def _write_outputs(rows: list[dict], result: dict, files: EvalFiles) -> None:
    write_jsonl(files.predictions, rows)
    # The official format holds the published protocol's decisions, for every test question.
    write_json(files.official, {r["pmid"]: r[f"decision_{protocols.PRIMARY.name}"] for r in rows})
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


def _resumed(progress: Progress | None, keys: list[str], what: str) -> dict[int, Any]:
    """The records an interrupted run kept of the questions `keys` (their pmids), by index in `keys`."""
    reused = progress.reused(keys, what) if progress else {}
    return {i: reused[key] for i, key in enumerate(keys) if key in reused}


def _keeper(progress: Progress | None, keys: list[str],
            record: Callable[[Any], Any] = lambda value: value) -> Callable[[dict[int, Any]], None] | None:
    """What keeps each finished batch (index in `keys` -> value) in `progress`, as `record(value)`."""
    if progress is None:
        return None
    return lambda batch: progress.add({keys[i]: record(value) for i, value in batch.items()})


def _score_after_prompts(scorer: DecisionScorer, prompts: list[list[int]], keys: list[str], label: str,
                         progress: Progress | None) -> np.ndarray:
    """The options' log-likelihoods after each prompt and the answer prefix (`DecisionScorer.after_prompts`:
    one prefill each), shape (n, 3); with `progress`, those an interrupted run finished are reused and each
    finished batch is kept (by `keys`, the questions' pmids)."""
    done = {i: record["choices"] for i, record in _resumed(progress, keys, f"{label} decisions").items()}
    return scorer.after_prompts(prompts, desc=f"{label}: decisions", done=done,
                                on_batch=_keeper(progress, keys, lambda choices: {"choices": choices}))


def _answer_and_score(scorer: DecisionScorer, prompts: list[list[int]], targets: list[list[int]], keys: list[str], *,
                      generation: GenerationParams, label: str, progress: Progress | None) -> ScoredAnswers:
    """The generated answers to `prompts` and everything read from their prefill and decoding
    (`DecisionScorer.answer_and_score`), resumable like `_score_after_prompts`."""
    return scorer.answer_and_score(prompts, targets, generation_config_from_params(generation), seed=generation.seed,
                                   desc=f"{label}: generating and scoring",
                                   done=_resumed(progress, keys, f"{label} answers"), on_batch=_keeper(progress, keys))


@explain_out_of_memory("lower eval.batch_size or eval.max_prompt_length, or on CUDA keep model.quantization=auto")
def run_evaluation(model: ModelParams, prompt: PromptParams, generation: GenerationParams, evaluation: EvalParams,
                   files: EvalFiles, *, label: str, progress: Progress | None = None) -> dict:
    """Evaluate the base model (or base + adapter) on the test split and write all three outputs: every
    test question's decisions, read after its prompt, and on the seeded sample of `eval.long_answer_samples`
    questions (`long_answer_sample`) the generated answers, the decisions read from them and their text
    metrics (what the protocols fit, on the content-free prompts and the validation split). With
    `progress`, the questions an interrupted run finished are taken from it, and each finished batch is
    kept there until the outputs are written."""
    answer_format = AnswerFormat.of(prompt)
    examples = read_jsonl(files.test)
    sample = long_answer_sample(examples, evaluation)
    rest = sorted(set(range(len(examples))) - set(sample))
    loaded = load_for_inference(files.base_dir, resolve_hardware(model.quantization, model.dtype), files.adapter_dir,
                                merge=True)
    tokenizer, hardware = loaded.tokenizer, loaded.hardware
    log.info("%s: decisions on %d test questions, long answers on %d of them, on %s, %s%s", label, len(examples),
             len(sample), hardware.device, str(hardware.dtype).removeprefix("torch."),
             " (4-bit nf4 base)" if hardware.quantize_4bit else "")

    prompts = [fit_prompt(ex, tokenizer, evaluation.max_prompt_length) for ex in examples]
    pmids = [ex["pmid"] for ex in examples]
    scorer = DecisionScorer(loaded.model, tokenizer, answer_format, evaluation.max_prompt_length, evaluation.batch_size)
    choices = np.zeros((len(examples), len(answer_format.options(tokenizer))))
    choices[rest] = _score_after_prompts(scorer, [prompts[i] for i in rest], [pmids[i] for i in rest], label, progress)
    targets = [token_ids(tokenizer, examples[i]["target"]) for i in sample]
    scored = _answer_and_score(scorer, [prompts[i] for i in sample], targets, [pmids[i] for i in sample],
                               generation=generation, label=label, progress=progress)
    choices[sample] = np.array(scored.choices).reshape(len(sample), -1)
    fitted = scorer.fit(protocols.PROTOCOLS, prompt, model.name, read_jsonl(files.val))
    del loaded, scorer  # BERTScore loads its own model next

    long_answers = [answer_format.long_answer(g) for g in scored.generations]
    scores = _text_scores(long_answers, [examples[i]["long_answer"] for i in sample], evaluation, label)
    generated = {i: _answer_fields(scored.generations[k], long_answers[k], answer_format,
                                   target_loglik=scored.target_loglik[k], target_tokens=len(targets[k]),
                                   scores={name: v[k] for name, v in scores.items()})
                 for k, i in enumerate(sample)}
    rows = [_prediction_row(ex, decisions, generated.get(i))
            for i, (ex, decisions) in enumerate(zip(examples, _decision_columns(choices, scored, sample,
                                                                                 answer_format, fitted)))]
    result = metrics.summarize(metrics.tables_from_rows(rows), evaluation.bootstrap, evaluation.seed)
    for protocol in protocols.PROTOCOLS:
        if protocol.name in fitted:
            result["decision"][protocol.name].update(protocol.fit.entry(fitted[protocol.name]))
    _write_outputs(rows, result, files)
    if progress:
        progress.finish()
    log.info("%s: decision accuracy on %d questions %s; on %d answers %s; %s", label, len(examples),
             _accuracies(result, needs_generation=False), len(sample), _accuracies(result, needs_generation=True),
             ", ".join(f"{m.label} {result['text'][m.name]:.3f}" for m in TEXT_METRICS))
    return result
