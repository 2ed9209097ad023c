"""Recipe levers compared out of fold (no model runs): for each cross-validated run's saved scores, the plain
choice and the macro-F1 rule fitted on the other folds, how well each decision's probability ranks its
questions (AUC), and the paired difference from the first run on the same questions. Several runs joined
by commas are their ensemble: each question's option probabilities averaged over the runs.

Inputs: the `data/cv` directory of each run (`folds.json` and `fold-<id>/held_out_scores.jsonl`), e.g.
after `dvc exp run -S 'cv.folds=[0,1,2]' -S train.decision_loss=choices cv_fold@0 cv_fold@1 cv_fold@2`,
copied aside per lever. Every run must have put the same questions in the same folds (`cv.seed`).

    python -m research.cv_levers default=runs/default/cv choices=runs/choices/cv both=runs/default/cv,runs/s7/cv
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from medqa.crossval.estimate import nested_offsets_decisions
from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import choice_probabilities, reference_codes
from medqa.evaluation.metrics import per_class_f1
from research.cv_rules import one_against_rest_aucs, read_out_of_fold
from research.sweep_decisions import pooled


def ensemble(runs: list[tuple[list[dict], dict[str, int]]]) -> tuple[list[dict], dict[str, int]]:
    """Runs on the same questions and folds as one: each question's option probabilities averaged over
    them (as log-probabilities, what the rows hold)."""
    (first, folds), *rest = runs
    if any(f != folds or [r["pmid"] for r in rows] != [r["pmid"] for r in first] for rows, f in rest):
        raise SystemExit("an ensemble's runs must have the same questions in the same folds")
    probs = np.mean([choice_probabilities(np.array([r["loglik"] for r in rows])) for rows, _ in runs], axis=0)
    return [dict(r, loglik=np.log(p).tolist()) for r, p in zip(first, probs)], folds


def lever_row(name: str, rows: list[dict], folds: dict[str, int], reference: list[dict] | None,
              n_resamples: int, seed: int) -> str:
    """One run's out-of-fold row as Markdown; its choice's paired difference from `reference`'s."""
    loglik, truth = np.array([r["loglik"] for r in rows]), reference_codes(rows)
    choice = loglik.argmax(axis=1)
    rule = nested_offsets_decisions(loglik, truth, np.array([folds[r["pmid"]] for r in rows]))
    summary = pooled(truth, [choice], n_resamples, seed)
    cells = [f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in summary.values()]
    f1, _ = per_class_f1(truth, choice)
    aucs = one_against_rest_aucs(rows)
    rule_f1, _ = per_class_f1(truth, rule)
    difference = ""
    if reference is not None:
        base = np.array([r["loglik"] for r in reference]).argmax(axis=1)
        paired = pooled(truth, [choice], n_resamples, seed, against=[base])
        difference = " / ".join(f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for v, lo, hi in paired.values())
    return " | ".join([
        f"| {name}", *cells, " · ".join(f"{v:.2f}" for v in f1),
        " · ".join(str(int(np.sum(choice == i))) for i in range(len(DECISIONS))),
        " · ".join(f"{aucs[d]:.3f}" for d in DECISIONS),
        f"{np.mean(rule == truth):.3f} / {np.mean(rule_f1):.3f} (maybe F1 {rule_f1[2]:.2f})",
        difference or "—"]) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=DIR[,DIR...], DIR a run's data/cv (several: their ensemble); the first is the reference")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    runs = {name: ensemble([read_out_of_fold(Path(d)) for d in dirs.split(",")])
            for name, dirs in (spec.split("=", 1) for spec in args.runs)}
    (_, (reference, ref_folds)), *_ = runs.items()
    for name, (rows, folds) in runs.items():
        if folds != ref_folds or [r["pmid"] for r in rows] != [r["pmid"] for r in reference]:
            raise SystemExit(f"{name}: not the reference's questions and folds (cv.seed and the split must match)")
    print(f"| out of fold, {len(reference)} questions | accuracy (choice) | macro-F1 (choice) | F1 yes · no · maybe | "
          "answered yes · no · maybe | ranking AUC yes · no · maybe | the macro-F1 rule: accuracy / macro-F1 | "
          "choice minus the first run: accuracy / macro-F1 |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (name, (rows, folds)) in enumerate(runs.items()):
        print(lever_row(name, rows, folds, reference if i else None, args.bootstrap, args.seed))


if __name__ == "__main__":
    main()
