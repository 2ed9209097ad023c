"""Cross-validation's decision rule, fitted on the folds' out-of-fold scores of every non-test question
(offsets that maximise macro-F1, so that a rare decision counts as much as a common one), with its
out-of-fold estimate and the test decisions under it. No model runs here (the scores: `scoring`)."""
from __future__ import annotations

import logging

import numpy as np

from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import fit_offsets, reference_codes, rounded_by_decision
from medqa.evaluation.metrics import choice_summary, per_class_f1
from medqa.params import CvParams, EvalParams

log = logging.getLogger(__name__)

OBJECTIVE = "macro_f1"  # what the out-of-fold offsets maximise


def _decisions_summary(truth: np.ndarray, chosen: np.ndarray, evaluation: EvalParams) -> dict:
    """`choice_summary` (accuracy and macro-F1 with 95% intervals, the gain over the majority class,
    how often each decision was given) and each decision's F1."""
    f1, _ = per_class_f1(truth, chosen)
    return {**choice_summary(truth, chosen, evaluation.bootstrap, evaluation.seed),
            **{f"f1_{d}": round(float(v), 6) for d, v in zip(DECISIONS, f1)}}


def nested_offsets_decisions(loglik: np.ndarray, truth: np.ndarray, fold_of: np.ndarray,
                             objective: str = OBJECTIVE) -> np.ndarray:
    """Each question's decision under offsets fitted (for `objective`) on the other folds' questions
    only: the rule's estimate out of fold, never scored on a question it was fitted on."""
    chosen = np.zeros(len(truth), dtype=int)
    for fold in np.unique(fold_of):
        mine = fold_of == fold
        offsets = fit_offsets(loglik[~mine], truth[~mine], objective)
        chosen[mine] = (loglik[mine] + offsets).argmax(axis=1)
    return chosen


def out_of_fold(rows: list[dict], folds: dict[str, int], evaluation: EvalParams) -> dict:
    """The out-of-fold estimate over every non-test question (`rows`: the folds' held-out scores): the
    plain choice (the most likely option) and the choice under the rule (offsets fitted for macro-F1
    on the other folds, `nested_offsets_decisions`); and the rule fitted on all of them, which the test
    decisions take."""
    loglik = np.array([r["loglik"] for r in rows])
    truth = reference_codes(rows)
    fold_of = np.array([folds[r["pmid"]] for r in rows])
    offsets = fit_offsets(loglik, truth, OBJECTIVE)
    return {
        "n_questions": len(rows),
        "folds": int(len(np.unique(fold_of))),
        "choice": _decisions_summary(truth, loglik.argmax(axis=1), evaluation),
        "choice_with_rule": _decisions_summary(truth, nested_offsets_decisions(loglik, truth, fold_of), evaluation),
        "rule": {"objective": OBJECTIVE, "offsets": rounded_by_decision(offsets)},
    }


def scores_of_predictions(test_rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The options' log-probabilities of each prediction row (from its stored `choice_probs`, so a
    rule reads the test decisions without the model), and the reference decisions as option indices."""
    log_probs = np.log(np.array([[max(r["choice_probs"][d], 1e-12) for d in DECISIONS] for r in test_rows]))
    return log_probs, reference_codes([{"final_decision": r["reference_decision"]} for r in test_rows])


def rule_on_test_decisions(test_rows: list[dict], offsets: dict[str, float], evaluation: EvalParams) -> dict:
    """The fine-tuned model's test decisions (its prediction rows' choice probabilities) as they are and
    under the out-of-fold rule's offsets: both summarised on every test question."""
    log_probs, truth = scores_of_predictions(test_rows)
    shift = np.array([offsets[d] for d in DECISIONS])
    return {
        "n_questions": len(test_rows),
        "choice": _decisions_summary(truth, log_probs.argmax(axis=1), evaluation),
        "choice_with_rule": _decisions_summary(truth, (log_probs + shift).argmax(axis=1), evaluation),
    }


def cv_summary(cv: CvParams, rows: list[dict], folds: dict[str, int], test_rows: list[dict],
               evaluation: EvalParams) -> dict:
    """metrics/cv.json: {"folds": 0} with cross-validation off; else the out-of-fold estimate and the
    fine-tuned model's test decisions under the rule fitted out of fold."""
    if not cv.folds:
        return {"folds": 0}
    estimate = out_of_fold(rows, folds, evaluation)
    test = rule_on_test_decisions(test_rows, estimate["rule"]["offsets"], evaluation)
    log.info("out of fold (%d questions): choice accuracy %.3f macro-F1 %.3f; with the rule %.3f / %.3f; test with "
             "the rule %.3f / %.3f", estimate["n_questions"], estimate["choice"]["accuracy"],
             estimate["choice"]["macro_f1"], estimate["choice_with_rule"]["accuracy"],
             estimate["choice_with_rule"]["macro_f1"], test["choice_with_rule"]["accuracy"],
             test["choice_with_rule"]["macro_f1"])
    return {**estimate, "test": test}
