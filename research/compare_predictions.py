"""Two runs' predictions on the same questions, compared metric by metric: B minus A with its paired
95% bootstrap interval for every metric of the report, and how often their decisions agree.

    python -m research.compare_predictions A.jsonl B.jsonl [--bootstrap 1000] [--seed 42]

For example the fine-tuned predictions of a float32 run (A) and a bf16 run (B) of the same recipe
(`data/predictions/finetuned.jsonl` of each experiment): an interval that contains 0 is a
difference these questions cannot see.
"""
from __future__ import annotations

import argparse

from medqa.decisions.protocols import PROTOCOLS
from medqa.evaluation.metrics import paired_differences, tables_from_rows
from medqa.io import read_jsonl
from medqa.report.render import reported_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="predictions file A (data/predictions/<model>.jsonl)")
    parser.add_argument("b", help="predictions file B, on the same questions")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    a, b = read_jsonl(args.a), read_jsonl(args.b)
    if [r["pmid"] for r in a] != [r["pmid"] for r in b]:
        raise SystemExit("the two files do not hold the same questions in the same order")
    differences = paired_differences(tables_from_rows(a), tables_from_rows(b), args.bootstrap, args.seed)
    print(f"{len(a)} questions; B - A with the paired 95% interval")
    print("| metric | B - A | interval | contains 0 |")
    print("|---|---|---|---|")
    for label, path in reported_rows():
        if path in differences:
            value, low, high = differences[path]
            print(f"| {label} | {value:+.4f} | [{low:+.4f}, {high:+.4f}] | {'yes' if low <= 0 <= high else 'NO'} |")
    for protocol in PROTOCOLS:
        key = f"decision_{protocol.name}"
        same = sum(x[key] == y[key] for x, y in zip(a, b))
        print(f"same decision ({protocol.label}): {same}/{len(a)} ({same / len(a):.1%})")
    same_text = sum(x["generation"] == y["generation"] for x, y in zip(a, b))
    print(f"identical generations: {same_text}/{len(a)}")


if __name__ == "__main__":
    main()
