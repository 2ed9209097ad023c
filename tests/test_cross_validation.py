"""Cross-validation without a model: the folds, what each fold trains on and scores, the decision rule
fitted for macro-F1, its estimate fitted out of fold, and the report's section."""
from __future__ import annotations

import numpy as np
import pytest

from medqa.crossval import estimate
from medqa.crossval.folds import assign_folds, fold_parts
from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import OFFSET_OBJECTIVES, fit_offsets
from medqa.errors import PipelineError
from medqa.params import CvParams, EvalParams, params_from_dict
from tests.conftest import train_params


def _pool(n: int = 60) -> list[dict]:
    """n questions, 55% yes, 34% no, 11% maybe, as PubMedQA's non-test questions."""
    decisions = ["yes"] * round(0.55 * n) + ["no"] * round(0.34 * n)
    decisions += ["maybe"] * (n - len(decisions))
    return [{"pmid": str(1000 + i), "final_decision": d} for i, d in enumerate(decisions)]


def _evaluation() -> EvalParams:
    return EvalParams(max_samples=None, long_answer_samples=None, batch_size=4, max_prompt_length=512,
                      bertscore_model="m", bertscore_num_layers=None, bootstrap=50, seed=0)


def test_every_question_is_in_one_fold_stratified_and_seeded():
    pool = _pool()
    folds = assign_folds(pool, CvParams(folds=(0, 1, 2), seed=3))
    assert sorted(folds) == sorted(r["pmid"] for r in pool) and set(folds.values()) == {0, 1, 2}
    for fold in range(3):
        mine = [r["final_decision"] for r in pool if folds[r["pmid"]] == fold]
        assert len(mine) == 20 and mine.count("maybe") in (2, 3)  # each fold has its share of the rare decision
    assert assign_folds(list(reversed(pool)), CvParams(folds=(0, 1, 2), seed=3)) == folds  # order-free
    assert assign_folds(pool, CvParams(folds=(0, 1, 2), seed=4)) != folds
    with pytest.raises(PipelineError, match="fewer questions than that"):
        assign_folds(pool[:40], CvParams(folds=tuple(range(8)), seed=0))  # 40 has 6 "maybe"


def test_a_fold_trains_and_takes_its_validation_loss_on_other_folds_and_scores_its_own():
    pool = _pool()
    folds = assign_folds(pool, CvParams(folds=(0, 1, 2), seed=0))
    train = params_from_dict(train_params(max_samples=30, max_val_samples=4, sampling="balanced")).train
    parts = fold_parts(pool, folds, 1, train, seed=0)
    ids = {name: {r["pmid"] for r in rows} for name, rows in parts.items()}
    assert ids["held_out"] == {p for p, f in folds.items() if f == 1}
    assert len(ids["val"]) == 4 and len(ids["train"]) == 30
    assert not ids["train"] & ids["val"] and not (ids["train"] | ids["val"]) & ids["held_out"]
    # More than the other folds hold: all of them but the validation-loss questions.
    everything = params_from_dict(train_params(max_samples=100, max_val_samples=4, sampling="balanced")).train
    assert len(fold_parts(pool, folds, 1, everything, seed=0)["train"]) == 40 - 4


def test_macro_f1_per_row_is_sklearns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 40)
    predicted = rng.integers(0, 3, (5, 40))
    predicted[0] = 0  # a row that never gives two of the decisions
    expected = [f1_score(truth, row, labels=[0, 1, 2], average="macro", zero_division=0) for row in predicted]
    assert OFFSET_OBJECTIVES["macro_f1"](predicted, truth) == pytest.approx(expected)


def _leaning_scores(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihoods that lean away from "maybe" by 2 nats, with weaker evidence for it than for the others."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, size=n, p=[0.55, 0.34, 0.11])
    loglik = rng.normal(0, 1, (n, 3))
    loglik[np.arange(n), truth] += np.where(truth == 2, 0.5, 1.5)
    loglik[:, 2] -= 2.0
    return loglik, truth


def test_offsets_fitted_for_macro_f1_say_maybe_where_those_for_accuracy_do_not():
    loglik, truth = _leaning_scores()
    for_accuracy, for_macro_f1 = fit_offsets(loglik, truth), fit_offsets(loglik, truth, "macro_f1")
    said = {name: int(((loglik + offsets).argmax(axis=1) == 2).sum())
            for name, offsets in (("accuracy", for_accuracy), ("macro_f1", for_macro_f1))}
    assert said["macro_f1"] > said["accuracy"] and for_macro_f1[2] > for_accuracy[2]
    score = OFFSET_OBJECTIVES["macro_f1"]
    assert score((loglik + for_macro_f1).argmax(axis=1)[None], truth)[0] > \
        score((loglik + for_accuracy).argmax(axis=1)[None], truth)[0]


def test_the_rules_estimate_is_fitted_without_the_questions_it_scores(monkeypatch):
    loglik, truth = _leaning_scores(90)
    fold_of = np.arange(90) % 3
    seen = []

    def recording(scores, labels, objective="accuracy"):
        seen.append(len(scores))
        return np.array([0.0, 0.0, 1.0])

    monkeypatch.setattr(estimate, "fit_offsets", recording)
    chosen = estimate.nested_offsets_decisions(loglik, truth, fold_of)
    assert seen == [60, 60, 60]  # each fold's offsets from the other two folds' 60 questions
    assert (chosen == (loglik + [0.0, 0.0, 1.0]).argmax(axis=1)).all()


def test_the_summary_off_and_on_and_the_test_decisions_under_the_rule():
    assert estimate.cv_summary(CvParams(folds=(), seed=0), [], {}, [], _evaluation()) == {"folds": 0}
    loglik, truth = _leaning_scores(120)
    rows = [{"pmid": str(i), "final_decision": DECISIONS[t], "loglik": list(s)} for i, (s, t) in enumerate(zip(loglik, truth))]
    folds = {str(i): i % 3 for i in range(120)}
    probs = np.exp(loglik[:40]) / np.exp(loglik[:40]).sum(axis=1, keepdims=True)
    test_rows = [{"reference_decision": DECISIONS[t], "choice_probs": dict(zip(DECISIONS, p))}
                 for p, t in zip(probs, truth[:40])]
    summary = estimate.cv_summary(CvParams(folds=(0, 1, 2), seed=0), rows, folds, test_rows, _evaluation())
    assert summary["folds"] == 3 and summary["n_questions"] == 120 and summary["test"]["n_questions"] == 40
    assert summary["choice_with_rule"]["chosen"]["maybe"] > summary["choice"]["chosen"]["maybe"]
    assert summary["choice_with_rule"]["macro_f1"] > summary["choice"]["macro_f1"]
    offsets = summary["rule"]["offsets"]
    expected = (np.log(probs) + [offsets[d] for d in DECISIONS]).argmax(axis=1)
    assert summary["test"]["choice_with_rule"]["chosen"] == {d: int((expected == i).sum()) for i, d in enumerate(DECISIONS)}
    assert summary["test"]["choice"]["chosen"] == {d: int((probs.argmax(axis=1) == i).sum()) for i, d in enumerate(DECISIONS)}

    from medqa.report.render import cv_section

    assert cv_section({"folds": 0}) == ""
    section = cv_section(summary)
    assert "## Cross-validation: 3 folds over 120 non-test questions" in section
    assert f"maybe {offsets['maybe']:+.1f}" in section and section.count("\n| ") == 5  # header + 4 rows
