"""Several runs' predictions on the same questions (seeds of one recipe) pooled: per decision
protocol, the mean accuracy and macro-F1 over the runs, and the mean's gain over always answering
the questions' most frequent decision, each with a 95% interval that resamples questions.

    python -m research.pool_predictions RUN.jsonl RUN.jsonl [...] [--protocols choice offsets]
                                     [--rules CV.json CV.json ...] [--bootstrap 1000] [--seed 42]

Each RUN.jsonl is an experiment's `data/predictions/finetuned.jsonl` (`dvc get . data/predictions/
finetuned.jsonl --rev <name> -o <name>.jsonl`), e.g. `profiles/cpu-full.args` at three
`train.seed`s: what the recipe scores, not what one seed's luck does. With `--rules`, each run's
`metrics/cv.json` (a cross-validated run, `profiles/cpu-cv.args`), in the runs' order: the choice
under the decision rule that run fitted out of fold is pooled too ("choice + rule").
"""
from __future__ import annotations

import argparse

import numpy as np

from medqa.crossval.estimate import scores_of_predictions
from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import PROTOCOL_NAMES
from medqa.evaluation.metrics import decision_table, majority_decisions
from medqa.io import read_json, read_jsonl
from research.sweep_decisions import pooled, print_pooled

RULE = "choice + rule"  # the plain choice under a run's out-of-fold decision rule


def with_rule(run: list[dict], cv: dict) -> np.ndarray:
    """A run's test decisions (option indices) under the offsets its cross-validation fitted out of fold."""
    log_probs, _ = scores_of_predictions(run)
    return (log_probs + np.array([cv["rule"]["offsets"][d] for d in DECISIONS])).argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN.jsonl")
    parser.add_argument("--protocols", nargs="+", default=["choice", "offsets"], choices=PROTOCOL_NAMES)
    parser.add_argument("--rules", nargs="+", default=[], metavar="CV.json", help="each run's metrics/cv.json")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    runs = [read_jsonl(path) for path in args.runs]
    if any([r["pmid"] for r in run] != [r["pmid"] for r in runs[0]] for run in runs):
        raise SystemExit("the runs do not hold the same questions in the same order")
    if args.rules and len(args.rules) != len(runs):
        raise SystemExit(f"--rules takes one metrics/cv.json per run: {len(args.rules)} for {len(runs)} runs")
    tables = [decision_table(run) for run in runs]
    for table, run, cv in zip(tables, runs, args.rules):
        table[RULE] = with_rule(run, read_json(cv))
    truth = tables[0]["truth"]
    majority = majority_decisions(truth)
    for protocol in [*args.protocols, *([RULE] if args.rules else [])]:
        choices = [table[protocol] for table in tables]
        print_pooled(f"{len(truth)} questions", {
            "mean over the runs": (len(runs), pooled(truth, choices, args.bootstrap, args.seed))}, protocol=protocol)
        print_pooled(f"{len(truth)} questions", {
            "minus the majority class (paired)": (
                len(runs), pooled(truth, choices, args.bootstrap, args.seed, against=[majority]))},
            signed=True, protocol=protocol)


if __name__ == "__main__":
    main()
