"""A recipe sweep's validation decisions with intervals, each adapter alone and each recipe pooled
over its seeds.

    python -m research.sweep_decisions RECIPE=ADAPTER_DIR [RECIPE=ADAPTER_DIR ...] [--against RECIPE]
                                    [--save-loglik FILE.npz] [--bootstrap 1000] [--seed 42]

Each adapter (the `models/adapter` of an experiment `dvc exp run finetune -n <name> ...`, taken out
of DVC's cache with `dvc get . models/adapter --rev <name> -o adapters/<name>`) scores the
validation split (`data/split/val.jsonl`) as the finetune stage does (choice protocol,
`DecisionScorer.choices`; `--save-loglik` keeps the options' log-likelihoods). Adapters named
by the same RECIPE are seeds of one recipe: its pooled row is the mean over seeds, with a 95%
interval that resamples questions (the same resampled questions for every seed), so it shows what
the questions, not only the seeds, allow; `base=` (no adapter) scores the base model.
`--against RECIPE` adds each other recipe's pooled means minus that one's, with paired intervals
(both recipes scored on the same resampled questions): whether one recipe beats another beyond
the questions' noise, which two intervals side by side cannot say.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from medqa import paths
from medqa.decisions import protocols
from medqa.decisions.answer_format import AnswerFormat
from medqa.evaluation import metrics
from medqa.inference.decision_scorer import DecisionScorer
from medqa.io import read_jsonl
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.loading import load_for_inference
from medqa.params import load_params


def _row(name: str, summary: dict) -> str:
    gain = summary["over_majority"]
    chosen = " / ".join(str(summary["chosen"][d]) for d in metrics.DECISIONS)
    return (f"| {name} | {summary['accuracy']:.3f} [{summary['accuracy_ci_low']:.3f}, {summary['accuracy_ci_high']:.3f}] "
            f"| {summary['macro_f1']:.3f} [{summary['macro_f1_ci_low']:.3f}, {summary['macro_f1_ci_high']:.3f}] "
            f"| {gain['accuracy']:+.3f} [{gain['accuracy_ci_low']:+.3f}, {gain['accuracy_ci_high']:+.3f}] | {chosen} |")


def _seed_mean(truth: np.ndarray, choices: list[np.ndarray], stat: str) -> Callable[[np.ndarray], float]:
    """A statistic of the choice protocol averaged over seeds' choices, on the questions indexed."""
    statistic = metrics.primary_statistic(stat)
    return lambda i: float(np.mean([statistic({"truth": truth, metrics.PRIMARY.name: c}, i) for c in choices]))


def _difference(mean: Callable[[np.ndarray], float], baseline: Callable[[np.ndarray], float]
                ) -> Callable[[np.ndarray], float]:
    return lambda i: mean(i) - baseline(i)


def pooled(truth: np.ndarray, choices: list[np.ndarray], n_resamples: int, seed: int,
           against: list[np.ndarray] | None = None) -> dict[str, tuple[float, float, float]]:
    """Accuracy and macro-F1 averaged over seeds' choices on the same questions, with 95% intervals
    over questions; with `against` (another recipe's seeds), the difference of the two means, paired:
    each resample draws the same questions for both recipes."""
    out = {}
    for stat in ("accuracy", "macro_f1"):
        mean = _seed_mean(truth, choices, stat)
        if against is not None:
            mean = _difference(mean, _seed_mean(truth, against, stat))
        out[stat] = (mean(np.arange(len(truth))), *metrics.bootstrap_interval(mean, len(truth), n_resamples, seed))
    return out


def print_pooled(title: str, rows: dict[str, tuple[int, dict]], signed: bool = False, protocol: str = "choice") -> None:
    """`pooled`'s results, one recipe a row, as a Markdown table."""
    sign = "+" if signed else ""
    print(f"\n| {title} | seeds | mean accuracy ({protocol}) | mean macro-F1 |")
    print("|---|---|---|---|")
    for recipe, (seeds, result) in rows.items():
        cells = " | ".join(f"{v:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]" for v, lo, hi in result.values())
        print(f"| {recipe} | {seeds} | {cells} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", metavar="RECIPE=ADAPTER_DIR")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--against", metavar="RECIPE", help="also each recipe's pooled means minus this one's, paired")
    parser.add_argument("--save-loglik", metavar="FILE.npz",
                        help="save each adapter's log-likelihoods of the three options (n x 3) and the labels")
    args = parser.parse_args()
    if args.against and not any(spec.partition("=")[0] == args.against for spec in args.adapters):
        parser.error(f"--against {args.against}: no adapter of that recipe given")
    params = load_params()
    val = read_jsonl(paths.VAL)
    truth = protocols.reference_codes(val)
    hardware = resolve_hardware("none", "float32")  # the finetune stage scores its validation decisions in fp32
    by_recipe: dict[str, list[np.ndarray]] = defaultdict(list)
    loglik: dict[str, np.ndarray] = {}
    print(f"{len(val)} validation questions; 95% bootstrap intervals over questions")
    print("| adapter | accuracy (choice) | macro-F1 | accuracy minus always the majority | chosen yes / no / maybe |")
    print("|---|---|---|---|---|")
    for spec in args.adapters:
        recipe, _, adapter = spec.partition("=")
        model = load_for_inference(paths.BASE_MODEL, hardware, adapter or None)  # RECIPE= alone: the base model
        scorer = DecisionScorer(model.model, model.tokenizer, AnswerFormat.of(params.prompt), params.train.max_length,
                                params.train.batch_size)
        loglik[spec] = scorer.after_examples(val)
        choice = loglik[spec].argmax(axis=1)  # as DecisionScorer.choices reads them
        by_recipe[recipe].append(choice)
        print(_row(f"{recipe} ({adapter})", metrics.choice_summary(truth, choice, args.bootstrap, args.seed)), flush=True)
    if args.save_loglik:
        np.savez(args.save_loglik, truth=truth, **loglik)
    print_pooled("recipe", {r: (len(c), pooled(truth, c, args.bootstrap, args.seed)) for r, c in by_recipe.items()})
    if args.against:
        base = by_recipe[args.against]
        print_pooled(f"recipe minus {args.against} (paired)", {
            r: (len(c), pooled(truth, c, args.bootstrap, args.seed, against=base))
            for r, c in by_recipe.items() if r != args.against}, signed=True)


if __name__ == "__main__":
    main()
