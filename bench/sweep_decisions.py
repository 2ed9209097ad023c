"""A recipe sweep's validation decisions with intervals, each adapter alone and each recipe pooled
over its seeds.

    python -m bench.sweep_decisions RECIPE=ADAPTER_DIR [RECIPE=ADAPTER_DIR ...] [--bootstrap 1000] [--seed 42]

Each adapter (the `models/adapter` of an experiment `dvc exp run finetune -n <name> ...`, taken out
of DVC's cache with `dvc get . models/adapter --rev <name> -o adapters/<name>`) scores the
validation split (`data/split/val.jsonl`) as the finetune stage does (choice protocol,
`evaluation.choice_decisions`). Adapters named by the same RECIPE are seeds of one
recipe: its pooled row is the mean over seeds, with a 95% interval that resamples questions (the
same resampled questions for every seed), so it shows what the questions, not only the seeds, allow.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from medqa import metrics, paths
from medqa.evaluation import choice_decisions
from medqa.io import read_jsonl
from medqa.models import load_for_inference, resolve_hardware
from medqa.params import load_params


def _row(name: str, summary: dict) -> str:
    gain = summary["over_majority"]
    chosen = " / ".join(str(summary["chosen"][d]) for d in metrics.DECISIONS)
    return (f"| {name} | {summary['accuracy']:.3f} [{summary['accuracy_ci_low']:.3f}, {summary['accuracy_ci_high']:.3f}] "
            f"| {summary['macro_f1']:.3f} [{summary['macro_f1_ci_low']:.3f}, {summary['macro_f1_ci_high']:.3f}] "
            f"| {gain['accuracy']:+.3f} [{gain['accuracy_ci_low']:+.3f}, {gain['accuracy_ci_high']:+.3f}] | {chosen} |")


def pooled(truth: np.ndarray, choices: list[np.ndarray], n_resamples: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Accuracy and macro-F1 averaged over seeds' choices on the same questions, with 95% intervals
    over questions."""
    out = {}
    for stat in ("accuracy", "macro_f1"):
        statistic = metrics.STATISTICS[f"decision.{metrics.PRIMARY.name}.{stat}"]
        mean = lambda i, f=statistic: float(np.mean([f({"truth": truth, metrics.PRIMARY.name: c}, i) for c in choices]))  # noqa: E731
        out[stat] = (mean(np.arange(len(truth))), *metrics.bootstrap_interval(mean, len(truth), n_resamples, seed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="+", metavar="RECIPE=ADAPTER_DIR")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    params = load_params()
    val = read_jsonl(paths.VAL)
    truth = np.array([metrics.CODES[ex["final_decision"]] for ex in val])
    hardware = resolve_hardware("none", "float32")  # the finetune stage scores its validation decisions in fp32
    by_recipe: dict[str, list[np.ndarray]] = defaultdict(list)
    print(f"{len(val)} validation questions; 95% bootstrap intervals over questions")
    print("| adapter | accuracy (choice) | macro-F1 | accuracy minus always the majority | chosen yes / no / maybe |")
    print("|---|---|---|---|---|")
    for spec in args.adapters:
        recipe, _, adapter = spec.partition("=")
        model = load_for_inference(paths.BASE_MODEL, hardware, adapter)
        choice = choice_decisions(model.model, model.tokenizer, val, params.prompt.answer_prefix,
                                  params.train.max_length, params.train.batch_size)
        by_recipe[recipe].append(choice)
        print(_row(f"{recipe} ({adapter})", metrics.choice_summary(truth, choice, args.bootstrap, args.seed)), flush=True)
    print("\n| recipe | seeds | mean accuracy (choice) | mean macro-F1 |")
    print("|---|---|---|---|")
    for recipe, choices in by_recipe.items():
        result = pooled(truth, choices, args.bootstrap, args.seed)
        cells = " | ".join(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for v, lo, hi in result.values())
        print(f"| {recipe} | {len(choices)} | {cells} |")


if __name__ == "__main__":
    main()
