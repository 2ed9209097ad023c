"""Decision rules compared out of fold, on a cross-validated run's saved scores (no model runs): the plain
choice, and offsets fitted for each objective (`OFFSET_OBJECTIVES`: accuracy, macro-F1), each estimated
with offsets fitted on the other folds only, then fitted on every out-of-fold score and read on the
fine-tuned model's test decisions.

Inputs: what `dvc exp run $(cat profiles/cpu-cv.args)` leaves (data/cv/, data/predictions/finetuned.jsonl).

    python -m research.cv_rules
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medqa import paths
from medqa.crossval.estimate import nested_offsets_decisions, scores_of_predictions
from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import OFFSET_OBJECTIVES, choice_probabilities, fit_offsets, reference_codes
from medqa.evaluation.metrics import class_f1, per_class_f1
from medqa.io import read_json, read_jsonl


def _row(name: str, truth: np.ndarray, chosen: np.ndarray) -> dict:
    f1, _ = per_class_f1(truth, chosen)
    return {"rule": name, "accuracy": float(np.mean(truth == chosen)), "macro_f1": class_f1(truth, chosen, "macro"),
            **{f"f1_{d}": float(v) for d, v in zip(DECISIONS, f1)},
            "answered": " · ".join(str(int(np.sum(chosen == i))) for i in range(len(DECISIONS))),
            "right": " · ".join(str(int(np.sum((chosen == i) & (truth == i)))) for i in range(len(DECISIONS)))}


def held_out_scores_path(cv_dir: Path, fold: int) -> Path:
    """Where a fold's held-out score rows are in a run's `data/cv` (`cv_dir`), as the cv_fold stage writes them."""
    return cv_dir / paths.cv_fold_dir(fold).name / "held_out_scores.jsonl"


def read_out_of_fold(cv_dir: Path) -> tuple[list[dict], dict[str, int]]:
    """A run's held-out score rows of every fold, sorted by PubMed id, and its fold of each question, from
    its `data/cv` (`cv_dir`, laid out as `paths` lays out the project's)."""
    folds = read_json(cv_dir / paths.CV_FOLDS.name)
    rows = [r for fold in sorted(set(folds.values())) for r in read_jsonl(held_out_scores_path(cv_dir, fold))]
    return sorted(rows, key=lambda r: r["pmid"]), folds


def one_against_rest_aucs(rows: list[dict]) -> dict[str, float]:
    """Per decision, the AUC of its out-of-fold probability for telling its questions from the rest:
    0.5 is no signal, which no rule on these scores can turn into right answers."""
    from sklearn.metrics import roc_auc_score

    probs, truth = choice_probabilities(np.array([r["loglik"] for r in rows])), reference_codes(rows)
    return {d: float(roc_auc_score(truth == i, probs[:, i])) for i, d in enumerate(DECISIONS)}


def compare_rules(rows: list[dict], folds: dict[str, int], test_rows: list[dict]) -> dict[str, list[dict]]:
    """Out of fold and on the test questions: the plain choice, and each objective's offsets."""
    loglik, truth = np.array([r["loglik"] for r in rows]), reference_codes(rows)
    fold_of = np.array([folds[r["pmid"]] for r in rows])
    test, test_truth = scores_of_predictions(test_rows)
    out = {"out_of_fold": [_row("choice", truth, loglik.argmax(axis=1))],
           "test": [_row("choice", test_truth, test.argmax(axis=1))]}
    for objective in OFFSET_OBJECTIVES:
        name = f"offsets for {objective}"
        out["out_of_fold"].append(_row(name, truth, nested_offsets_decisions(loglik, truth, fold_of, objective)))
        offsets = fit_offsets(loglik, truth, objective)
        out["test"].append(_row(f"{name} {np.round(offsets, 1).tolist()}", test_truth, (test + offsets).argmax(axis=1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="a project directory after a cv run")
    root = parser.parse_args().project
    rows, folds = read_out_of_fold(root / paths.CV_DIR)
    tables = compare_rules(rows, folds, read_jsonl(root / paths.eval_outputs("finetuned")["predictions_path"]))
    print("ranking AUC out of fold: " + ", ".join(f"{d} {v:.3f}" for d, v in one_against_rest_aucs(rows).items()))
    for where, table in tables.items():
        print(f"\n{where} ({len(rows) if where == 'out_of_fold' else 'test'} questions)")
        for row in table:
            print(f"  {row['rule']:<40} acc {row['accuracy']:.3f}  macro-F1 {row['macro_f1']:.3f}  "
                  f"F1 {row['f1_yes']:.2f} · {row['f1_no']:.2f} · {row['f1_maybe']:.2f}  answered {row['answered']}  "
                  f"right {row['right']}")


if __name__ == "__main__":
    main()
