"""Where each stage reads and writes (the same paths dvc.yaml declares)."""
from pathlib import Path

PARAMS_CHECKED = Path("data/params.checked")  # written by check_params, read by no code
RAW_DATA = Path("data/raw/pubmedqa.jsonl")
TEST_LABELS = Path("data/raw/test_ground_truth.json")
BASE_MODEL = Path("models/base")
FORMATTED = Path("data/formatted/examples.jsonl")
SPLIT_DIR = Path("data/split")
TRAIN, VAL, TEST = SPLIT_DIR / "train.jsonl", SPLIT_DIR / "val.jsonl", SPLIT_DIR / "test.jsonl"
SPLIT_METRICS = Path("metrics/split.json")
ADAPTER = Path("models/adapter")
CHECKPOINTS = Path("models/checkpoints")
TRAIN_METRICS = Path("metrics/train.json")
LIVE_DIR = Path("dvclive")  # DVCLive logs of the finetune stage: loss and learning-rate curves
PREDICTIONS_DIR = Path("data/predictions")
CV_DIR = Path("data/cv")  # cross-validation: the fold of each non-test question, then each fold's outputs
CV_FOLDS = CV_DIR / "folds.json"
CV_METRICS = Path("metrics/cv.json")  # the out-of-fold estimate and the test decisions under its rule


def cv_fold_dir(fold: int) -> Path:
    """A fold's outputs: its train/val/held-out questions, its training metrics and the held-out scores."""
    return CV_DIR / f"fold-{fold}"


def cv_fold_models(fold: int) -> Path:
    """A fold's adapter and its resumable checkpoints (scratch, as models/checkpoints is)."""
    return Path(f"models/cv/fold-{fold}")
PROGRESS = Path("data/progress")  # scratch: the finished questions of an interrupted eval or judge stage


def eval_outputs(label: str) -> dict[str, Path]:
    """The three outputs of an eval stage ("baseline" or "finetuned")."""
    return {
        "predictions_path": PREDICTIONS_DIR / f"{label}.jsonl",
        "official_path": PREDICTIONS_DIR / f"{label}_official.json",
        "metrics_path": Path(f"metrics/{label}.json"),
    }


JUDGE_PREDICTIONS = PREDICTIONS_DIR / "judge.jsonl"
JUDGE_METRICS = Path("metrics/judge.json")
JUDGE_MODEL = Path("models/judge")  # scratch: a judge model other than the base model, prepared once

REPORT = Path("reports/report.md")
LOSS_PNG = Path("reports/loss.png")
JUDGE_PNG = Path("reports/judge.png")
DECISIONS_PNG = Path("reports/decisions.png")


def decisions_csv(label: str) -> Path:
    """A model's reference and chosen decision per test question, for DVC's confusion plot."""
    return Path(f"reports/decisions_{label}.csv")

MERGED = Path("models/merged")  # `python -m medqa.release.export`'s default outputs (not stages': no DVC outputs)
GGUF = Path("models/gguf")
RELEASE = Path("models/release")  # the adapter with its model card: what is shared (artifact, hub, export)
HARNESS_TEST = Path("data/lm_eval/pubmedqa_test.jsonl")  # the test questions as the lm-eval task reads them
