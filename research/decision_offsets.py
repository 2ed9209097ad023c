"""Is there a per-question decision signal under a model's lean to one answer? Offsets added to the
options' log-likelihoods, fitted on some validation questions and scored on the others.

    python -m research.decision_offsets LOGLIK.npz [--folds 5] [--repeats 5] [--against RECIPE]

LOGLIK.npz is what `python -m research.sweep_decisions ... --save-loglik LOGLIK.npz` writes: each
adapter's log-likelihoods of " yes", " no", " maybe" on the validation questions, and their labels.
For each adapter: the choice protocol's accuracy and macro-F1 (the most likely option), how well its
options rank the questions (`yes_no_and_maybe_aucs`: yes against no, "maybe" against the rest), and the
accuracy and macro-F1 of the eval stages' `offsets` protocol with its offsets (`protocols.fit_offsets`)
fitted on k-1 folds and applied to the held-out fold: cross-validated, the offsets never see the
questions they are scored on; the figures average `--repeats` shuffles of the folds. `--against
RECIPE` pools each recipe's seeds (the adapters saved as RECIPE=...) and compares the recipes'
held-out decisions (the first shuffle) paired, as `research.sweep_decisions --against` compares plain
choices.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from medqa.decisions import protocols
from medqa.evaluation import metrics
from research.sweep_decisions import pooled, print_pooled


def _score(stat: str):
    """The eval stages' statistic of the choice protocol (`metrics.STATISTICS`) over all questions."""
    statistic = metrics.primary_statistic(stat)
    return lambda truth, predicted: statistic({"truth": truth, metrics.PRIMARY.name: predicted}, np.arange(len(truth)))


SCORES = {stat: _score(stat) for stat in ("accuracy", "macro_f1")}


def yes_no_and_maybe_aucs(loglik: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """How the options' log-likelihoods (shape (n, 3)) rank the questions, as two AUCs: log p(yes) -
    log p(no) on the questions labelled yes or no (no offset changes it), and the normalised
    log p(maybe) of the "maybe" questions against the others (near 0.5 or below: the model cannot
    pick them out, and offsets that make it say "maybe" mostly say it wrongly)."""
    from scipy.special import log_softmax
    from sklearn.metrics import roc_auc_score

    yes, no, maybe = (metrics.CODES[d] for d in ("yes", "no", "maybe"))
    both = np.isin(truth, [yes, no])
    yes_vs_no = roc_auc_score(truth[both] == yes, (loglik[:, yes] - loglik[:, no])[both])
    maybe_vs_rest = roc_auc_score(truth == maybe, log_softmax(loglik, axis=1)[:, maybe])
    return float(yes_vs_no), float(maybe_vs_rest)


def held_out_decisions(loglik: np.ndarray, truth: np.ndarray, folds: int, shuffle: int) -> np.ndarray:
    """Each question's decision with offsets fitted on the other stratified folds (one shuffle)."""
    from sklearn.model_selection import StratifiedKFold

    predicted = np.empty_like(truth)
    for fit, held_out in StratifiedKFold(folds, shuffle=True, random_state=shuffle).split(loglik, truth):
        predicted[held_out] = (loglik[held_out] + protocols.fit_offsets(loglik[fit], truth[fit])).argmax(axis=1)
    return predicted


def mean_scores(truth: np.ndarray, predictions: list[np.ndarray]) -> dict[str, float]:
    """Accuracy and macro-F1 of each set of decisions, averaged over the sets."""
    scores = [[score(truth, p) for score in SCORES.values()] for p in predictions]
    return dict(zip(SCORES, np.mean(scores, axis=0).tolist()))


def cross_validated(loglik: np.ndarray, truth: np.ndarray, folds: int, repeats: int) -> dict[str, float]:
    """Accuracy and macro-F1 of the held-out decisions, averaged over `repeats` shuffles of the folds."""
    return mean_scores(truth, [held_out_decisions(loglik, truth, folds, shuffle) for shuffle in range(repeats)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loglik", metavar="LOGLIK.npz")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--against", metavar="RECIPE",
                        help="also each recipe's pooled held-out decisions minus this one's, paired")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    saved = np.load(args.loglik)
    truth = saved["truth"]
    adapters = [name for name in saved.files if name != "truth"]
    if args.against and not any(name.partition("=")[0] == args.against for name in adapters):
        parser.error(f"--against {args.against}: no adapter of that recipe in {args.loglik}")
    labels = " / ".join(str(int(n)) for n in metrics.label_counts(truth))
    print(f"{len(truth)} validation questions (yes / no / maybe {labels}); offsets fitted for accuracy "
          f"on {args.folds - 1} of {args.folds} folds, {args.repeats} shuffles")
    print("| adapter | accuracy / macro-F1 (choice) | yes-vs-no AUC | maybe-vs-rest AUC "
          "| accuracy / macro-F1 with offsets (held out) |")
    print("|---|---|---|---|---|")
    by_recipe: dict[str, list[np.ndarray]] = defaultdict(list)
    for name in adapters:
        loglik = saved[name]
        chosen = loglik.argmax(axis=1)
        plain = [score(truth, chosen) for score in SCORES.values()]
        yes_vs_no, maybe_vs_rest = yes_no_and_maybe_aucs(loglik, truth)
        held_out = [held_out_decisions(loglik, truth, args.folds, shuffle) for shuffle in range(args.repeats)]
        tuned = mean_scores(truth, held_out)
        print(f"| {name} | {plain[0]:.3f} / {plain[1]:.3f} | {yes_vs_no:.3f} | {maybe_vs_rest:.3f} | "
              f"{tuned['accuracy']:.3f} / {tuned['macro_f1']:.3f} |", flush=True)
        by_recipe[name.partition("=")[0]].append(held_out[0])
    if args.against:
        base = by_recipe[args.against]
        rows = {r: (len(d), pooled(truth, d, args.bootstrap, seed=42)) for r, d in by_recipe.items()}
        print_pooled("recipe, held out", rows, protocol="choice + offsets")
        print_pooled(f"recipe minus {args.against} (paired)", {
            r: (len(d), pooled(truth, d, args.bootstrap, seed=42, against=base))
            for r, d in by_recipe.items() if r != args.against}, signed=True, protocol="choice + offsets")


if __name__ == "__main__":
    main()
