"""Is there a per-question decision signal under a model's lean to one answer? Offsets added to the
options' log-likelihoods, fitted on some validation questions and scored on the others.

    python -m bench.decision_offsets LOGLIK.npz [--folds 5] [--repeats 5]

LOGLIK.npz is what `python -m bench.sweep_decisions ... --save-loglik LOGLIK.npz` writes: each
adapter's log-likelihoods of " yes", " no", " maybe" on the validation questions, and their labels.
For each adapter: the choice protocol's accuracy and macro-F1 (the most likely option), the AUC of
log p(yes) - log p(no) on the questions labelled yes or no, and the accuracy and macro-F1 of the
eval stages' `offsets` protocol with its offsets (`answers.fit_offsets`) fitted on k-1 folds and
applied to the held-out fold: cross-validated, the offsets never see the questions they are scored
on; the figures average `--repeats` shuffles of the folds.
"""
from __future__ import annotations

import argparse

import numpy as np

from medqa import answers, metrics


def _score(stat: str):
    """The eval stages' statistic of the choice protocol (`metrics.STATISTICS`) over all questions."""
    statistic = metrics.primary_statistic(stat)
    return lambda truth, predicted: statistic({"truth": truth, metrics.PRIMARY.name: predicted}, np.arange(len(truth)))


SCORES = {stat: _score(stat) for stat in ("accuracy", "macro_f1")}


def cross_validated(loglik: np.ndarray, truth: np.ndarray, folds: int, repeats: int) -> dict[str, float]:
    """Accuracy and macro-F1 of the decisions with offsets fitted on the other folds, averaged over
    `repeats` shuffles of stratified folds."""
    from sklearn.model_selection import StratifiedKFold

    scores = []
    for repeat in range(repeats):
        predicted = np.empty_like(truth)
        for fit, held_out in StratifiedKFold(folds, shuffle=True, random_state=repeat).split(loglik, truth):
            predicted[held_out] = (loglik[held_out] + answers.fit_offsets(loglik[fit], truth[fit])).argmax(axis=1)
        scores.append([score(truth, predicted) for score in SCORES.values()])
    return dict(zip(SCORES, np.mean(scores, axis=0).tolist()))


def main() -> None:
    from sklearn.metrics import roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loglik", metavar="LOGLIK.npz")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    saved = np.load(args.loglik)
    truth = saved["truth"]
    yes, no = metrics.CODES["yes"], metrics.CODES["no"]
    labels = " / ".join(str(int(np.sum(truth == metrics.CODES[d]))) for d in metrics.DECISIONS)
    print(f"{len(truth)} validation questions (yes / no / maybe {labels}); offsets fitted for accuracy "
          f"on {args.folds - 1} of {args.folds} folds, {args.repeats} shuffles")
    print("| adapter | accuracy / macro-F1 (choice) | yes-vs-no AUC | accuracy / macro-F1 with offsets (held out) |")
    print("|---|---|---|---|")
    for name in saved.files:
        if name == "truth":
            continue
        loglik = saved[name]
        chosen = loglik.argmax(axis=1)
        plain = [score(truth, chosen) for score in SCORES.values()]
        both = np.isin(truth, [yes, no])
        auc = roc_auc_score(truth[both] == yes, (loglik[:, yes] - loglik[:, no])[both])
        tuned = cross_validated(loglik, truth, args.folds, args.repeats)
        print(f"| {name} | {plain[0]:.3f} / {plain[1]:.3f} | {auc:.3f} | "
              f"{tuned['accuracy']:.3f} / {tuned['macro_f1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
