"""An LLM judge: rates both models' answers per criterion, and compares them head to head in both orders.

Pointwise, the score of an answer on a criterion is the judge's expected rating: its probabilities
for the rating tokens "1".."4" at the rating position, renormalised, times their values (as G-Eval
reads its judge). Head to head, every pair is judged twice, each answer shown first once; a pair
on which the two orders disagree is a tie, so the judge's position bias cancels instead of picking
winners (and its consistency is reported).

The rubric (criteria, scale, the requests' wording) is in `rubric`; params.yaml's `judge` section
picks the judge model, the criteria and how many questions are judged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from medqa.decisions import protocols
from medqa.params import EvalParams, JudgeParams, ModelParams
from medqa.rubric import (
    COMPARISON_LEAD,
    OUTCOMES,
    RATING_LEAD,
    RATINGS,
    SYSTEM,
    Case,
    comparison_request,
    rating_request,
)
from medqa.tokens import continuation_ids, token_ids

if TYPE_CHECKING:
    from medqa.evaluation.progress import Progress

log = logging.getLogger(__name__)

MODELS = ("baseline", "finetuned")  # the order of the answers in every row


def _renormalised(logliks: Sequence[float]) -> np.ndarray:
    """One request's option log-likelihoods as probabilities over just those options."""
    return protocols.choice_probabilities(np.asarray(logliks, dtype=float)[None, :])[0]


def expected_rating(logliks: Sequence[float]) -> tuple[float, np.ndarray]:
    """The probability-weighted rating from the rating tokens' log-likelihoods (for 1..4): the
    options' probabilities renormalised, and the sum of rating times probability."""
    probs = _renormalised(logliks)
    return float(probs @ np.array(RATINGS, dtype=float)), probs


def prefer_first(logliks: Sequence[float]) -> float:
    """The probability that the first answer (A) is better, from the log-likelihoods of " A" and " B"."""
    return float(_renormalised(logliks)[0])


class Judge(Protocol):
    """What the judging needs of a judge: option log-likelihoods for its two kinds of request."""

    def rate(self, case: Case, answer: str, criterion: str) -> list[float]:
        """The log-likelihoods of the ratings 1..4 for `answer` on `criterion`."""

    def compare(self, case: Case, first: str, second: str) -> list[float]:
        """The log-likelihoods of "A" (the first answer is better) and "B"."""


class ModelJudge:
    """A causal LM as the judge: each request is rendered with its own prompt format, and the options
    are read off its next-token distribution after the lead ("Rating:", "Better answer:"). Requests
    about one question share their prefix, so the question, context and reference are read once."""

    def __init__(self, model: Any, tokenizer: Any, fmt: Any):
        from medqa.inference.scoring import SharedPrefixScorer

        self.tokenizer, self.fmt = tokenizer, fmt
        self.scorer = SharedPrefixScorer(model)
        self.pmid: str | None = None  # the question whose requests the scorer's cache holds
        self.rating_options = [continuation_ids(tokenizer, RATING_LEAD, f" {r}") for r in RATINGS]
        self.comparison_options = [continuation_ids(tokenizer, COMPARISON_LEAD, f" {c}") for c in "AB"]

    def _logliks(self, case: Case, user: str, lead: str, options: list[list[int]]) -> list[float]:
        if case.pmid != self.pmid:
            # Each question from an empty cache: its numbers do not depend on the question judged
            # before it, so a resumed stage gives an uninterrupted one's (only the instructions,
            # a few hundred tokens, are read again per question).
            self.scorer.forget()
            self.pmid = case.pmid
        ids = token_ids(self.tokenizer, self.fmt.prompt(SYSTEM, user) + lead)
        return self.scorer.option_logliks(ids, options)

    def rate(self, case: Case, answer: str, criterion: str) -> list[float]:
        return self._logliks(case, rating_request(case, answer, criterion), RATING_LEAD, self.rating_options)

    def compare(self, case: Case, first: str, second: str) -> list[float]:
        return self._logliks(case, comparison_request(case, first, second), COMPARISON_LEAD, self.comparison_options)


def head_to_head(p_base_first: float, p_finetuned_first: float) -> tuple[str, bool]:
    """The fine-tuned model's outcome from the two orders' probabilities that the first-shown answer
    is better, and whether the two orders agree. An order with no preference (exactly 0.5), or
    orders that pick different answers, make a tie."""
    def preferred(p_first: float, first: str, second: str) -> str | None:
        return first if p_first > 0.5 else second if p_first < 0.5 else None

    one = preferred(p_base_first, "baseline", "finetuned")
    two = preferred(p_finetuned_first, "finetuned", "baseline")
    consistent = one is not None and one == two
    if not consistent:
        return "tie", False
    return ("win" if one == "finetuned" else "loss"), True


def judge_question(judge: Judge, case: Case, answers_by_model: dict[str, str], criteria: Sequence[str]) -> dict:
    """One question's row: both answers rated on every criterion, and the pair judged in both orders."""
    row: dict[str, Any] = {"pmid": case.pmid, "question": case.question, "answers": dict(answers_by_model),
                           "ratings": {}}
    for model in MODELS:  # one answer's criteria in a row: they share the longest prefix
        row["ratings"][model] = {}
        for criterion in criteria:
            logliks = judge.rate(case, answers_by_model[model], criterion)
            score, probs = expected_rating(logliks)
            row["ratings"][model][criterion] = {
                "score": round(score, 6),
                "probs": {str(r): round(float(p), 6) for r, p in zip(RATINGS, probs)},
                # How much of the judge's next-token probability went to the rating tokens at all.
                "mass": float(f"{np.exp(logliks).sum():.6g}"),
            }
    base, tuned = answers_by_model["baseline"], answers_by_model["finetuned"]
    p_base_first = prefer_first(judge.compare(case, base, tuned))
    p_tuned_first = prefer_first(judge.compare(case, tuned, base))
    outcome, consistent = head_to_head(p_base_first, p_tuned_first)
    row["head_to_head"] = {
        "baseline_first": {"p_first": round(p_base_first, 6)},
        "finetuned_first": {"p_first": round(p_tuned_first, 6)},
        "outcome": outcome,
        "consistent": consistent,
    }
    return row


def judge_all(
    judge: Judge, cases: Sequence[Case], base_answers: Sequence[str], tuned_answers: Sequence[str],
    criteria: Sequence[str], *, desc: str | None = "judging", done: dict[str, dict] | None = None,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Every question's row (`judge_question`), with a progress bar. Resuming: a question whose
    pmid is in `done` takes its row from there; `on_row` receives each row judged."""
    from tqdm.auto import tqdm

    done = done or {}
    rows = []
    for case, b, t in tqdm(list(zip(cases, base_answers, tuned_answers)), desc=desc, unit="q", disable=desc is None):
        if case.pmid in done:
            rows.append(done[case.pmid])
            continue
        rows.append(judge_question(judge, case, {"baseline": b, "finetuned": t}, criteria))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def judge_subset(n: int, max_samples: int | None, seed: int) -> list[int]:
    """The indices of the questions judged: all of them, or `max_samples` drawn with `seed`, in order."""
    if max_samples is None or max_samples >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=max_samples, replace=False).tolist())


def summarize_judgements(rows: Sequence[dict], criteria: Sequence[str], n_resamples: int, seed: int) -> dict:
    """Mean rating per criterion per model and the paired change, the win/tie/loss rates and the
    position consistency, each with a 95% bootstrap interval over questions."""
    from medqa.evaluation.metrics import bootstrap_interval

    n = len(rows)

    def estimate(values: np.ndarray) -> dict[str, float]:
        low, high = bootstrap_interval(lambda i: float(np.mean(values[i])), n, n_resamples, seed)
        return {"mean": float(np.mean(values)), "ci_low": low, "ci_high": high}

    pointwise = {}
    for criterion in criteria:
        scores = {m: np.array([r["ratings"][m][criterion]["score"] for r in rows]) for m in MODELS}
        pointwise[criterion] = {**{m: estimate(scores[m]) for m in MODELS},
                                "change": estimate(scores["finetuned"] - scores["baseline"])}
    pairs = [r["head_to_head"] for r in rows]
    outcomes = np.array([p["outcome"] for p in pairs])
    # How often the judge picked the answer shown first, over both orders: 0.5 is no position bias.
    first = np.array([(p[order]["p_first"] > 0.5) for p in pairs for order in ("baseline_first", "finetuned_first")])
    return {
        "n_questions": n,
        "criteria": pointwise,
        "rating_mass": {m: float(np.mean([r["ratings"][m][c]["mass"] for r in rows for c in criteria]))
                        for m in MODELS},
        "head_to_head": {
            **{o: estimate((outcomes == o).astype(float)) for o in OUTCOMES},
            "position_consistency": estimate(np.array([p["consistent"] for p in pairs], dtype=float)),
            "first_shown_picked": float(np.mean(first)) if len(first) else 0.0,
        },
    }


def judge_model_dir(judge_name: str, model_name: str, base_dir: Path, scratch_dir: Path) -> Path:
    """Where the judge model is: the pipeline's base model when it is the same model, else
    `scratch_dir`, prepared once per judge (an embedded GGUF converted, a hub model's revision pinned,
    a local directory referenced) and reused while `judge.model` stays the same."""
    from medqa.io import read_json, write_json
    from medqa.modeling.loading import prepare_base_model
    from medqa.modeling.profiles import get_profile

    if judge_name == model_name:
        return base_dir
    marker = scratch_dir / "judge.json"
    if not (marker.exists() and read_json(marker).get("name") == judge_name):
        source = prepare_base_model(get_profile(judge_name), scratch_dir)
        log.info("judge model %s (%s) -> %s", source["hub_id"], source["weights"], scratch_dir)
        write_json(marker, {"name": judge_name})
    return scratch_dir


def _setup_judge(judge_name: str, model: ModelParams, judge_dir: Path) -> tuple[ModelJudge, int]:
    """The judge model (loaded as the pipeline loads models: 4-bit on CUDA), in its own prompt format,
    and its number of parameters."""
    from medqa.modeling.hardware import resolve_hardware
    from medqa.modeling.loading import load_for_inference
    from medqa.modeling.profiles import get_profile
    from medqa.prompting.prompts import PromptFormat

    # Unpadded prompts, one at a time: the padding side is the tokenizer's default.
    loaded = load_for_inference(judge_dir, resolve_hardware(model.quantization, model.dtype), padding_side="right")
    fmt = PromptFormat(loaded.tokenizer, get_profile(judge_name).template)
    return ModelJudge(loaded.model, loaded.tokenizer, fmt), int(loaded.model.num_parameters())


def _cases(rows: Sequence[dict], examples: dict[str, dict], tokenizer: Any, max_context_tokens: int) -> list[Case]:
    """What the judge sees of each question: its test example's context, cut to fit, and the reference."""
    from medqa.prompting.prompts import cut_to_tokens

    return [Case(r["pmid"], r["question"], cut_to_tokens(examples[r["pmid"]]["context"], tokenizer, max_context_tokens),
                 r["reference"], r["reference_decision"]) for r in rows]


def run_judge(
    judge_params: JudgeParams, model: ModelParams, evaluation: EvalParams, *, base_rows: list[dict],
    tuned_rows: list[dict], examples: list[dict], judge_dir: Path, progress: Progress | None = None,
) -> tuple[list[dict], dict]:
    """Judge both models' answers on a seeded subset of the test questions whose answers the eval stages
    generated: the per-question rows
    and the metrics (`summarize_judgements`, bootstrapped as `evaluation` says, with the judge's name and
    size). With `progress`, the
    questions an interrupted run judged are taken from it and each judged one is kept there (the
    stage clears it once its outputs are written)."""
    from medqa.evaluation.metrics import answered

    base_rows, tuned_rows = answered(base_rows), answered(tuned_rows)  # the eval stages' sample of long answers
    if [r["pmid"] for r in base_rows] != [r["pmid"] for r in tuned_rows]:
        raise ValueError("the judge needs both models' answers to the same test questions, in the same order")
    chosen = judge_subset(len(base_rows), judge_params.max_samples, judge_params.seed)
    judge, n_params = _setup_judge(judge_params.model, model, judge_dir)
    log.info("judge %s (%.0fM parameters): %d of %d test questions, criteria %s", judge_params.model,
             n_params / 1e6, len(chosen), len(base_rows), ", ".join(judge_params.criteria))
    cases = _cases([base_rows[i] for i in chosen], {ex["pmid"]: ex for ex in examples}, judge.tokenizer,
                   judge_params.max_context_tokens)
    criteria = list(judge_params.criteria)
    done = progress.reused([c.pmid for c in cases], "judge") if progress else {}
    rows = judge_all(judge, cases, [base_rows[i]["generation"] for i in chosen],
                     [tuned_rows[i]["generation"] for i in chosen], criteria, done=done,
                     on_row=(lambda row: progress.add({row["pmid"]: row})) if progress else None)
    log.info("judge: read %d of %d prompt tokens (the rest shared with the request before)",
             judge.scorer.tokens_read, judge.scorer.tokens_asked)
    result = summarize_judgements(rows, criteria, evaluation.bootstrap, evaluation.seed)
    result.update({"judge": judge_params.model, "judge_params": n_params,
                   "n_test_questions": len(base_rows)})
    return rows, result
