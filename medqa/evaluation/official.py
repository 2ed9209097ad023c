"""PubMedQA's own scoring of an official-format predictions file ({pmid: "yes" | "no" | "maybe"}) against
`test_ground_truth.json`, as the dataset's `evaluation.py` does it: accuracy and macro-F1 over the
ground truth's questions, each of which must have a prediction. The eval stages write
`data/predictions/<model>_official.json` in that format, for every test question.

    python -m medqa.evaluation.official data/predictions/finetuned_official.json data/raw/test_ground_truth.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

from medqa.data.sources import read_official_labels
from medqa.errors import PipelineError


def score_official(predictions: Path, ground_truth: Path) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn's, over the labels either side holds, as `evaluation.py`)
    of the predictions file on the ground truth's questions."""
    from sklearn.metrics import accuracy_score, f1_score

    truth, predicted = read_official_labels(ground_truth), read_official_labels(predictions)
    missing = sorted(set(truth) - set(predicted))
    if missing:
        raise PipelineError(f"{predictions} has no prediction for {len(missing)} of the {len(truth)} questions of "
                            f"{ground_truth} (e.g. {missing[0]}): was it written with eval.max_samples=null?")
    pmids = sorted(truth)
    y_true, y_pred = [truth[p] for p in pmids], [predicted[p] for p in pmids]
    return {"n_questions": len(pmids), "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro"))}


def main() -> None:
    parser = argparse.ArgumentParser(description="Score an official-format PubMedQA predictions file.")
    parser.add_argument("predictions", type=Path)
    parser.add_argument("ground_truth", type=Path)
    args = parser.parse_args()
    scores = score_official(args.predictions, args.ground_truth)
    print(f"{scores['n_questions']} questions: accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}")


if __name__ == "__main__":
    main()
