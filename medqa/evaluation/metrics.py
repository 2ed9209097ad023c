"""Metrics over a per-question table: decisions (yes/no/maybe) and the registered text metrics.

Every metric is a function of the per-question table and a set of question indices, so the same
definition gives the point estimate, its bootstrap interval, and the paired bootstrap interval of a
difference between two models on the same questions."""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from medqa.decisions.answer_format import DECISIONS, NO_DECISION
from medqa.decisions.protocols import PRIMARY, PROTOCOL_NAMES, PROTOCOLS, Protocol, protocol
from medqa.evaluation.text_metrics import TEXT_METRICS, TEXT_SCORES, Statistic, Table, bleu_sentence_stats, mean_of

log = logging.getLogger(__name__)


CODES = {label: i for i, label in enumerate(list(DECISIONS) + [NO_DECISION])}
LABEL_IDS = list(range(len(DECISIONS)))

# The two sets of test questions a metric is taken over: every test question (the decisions read after
# the prompt), and the seeded sample whose long answers were generated (the text metrics and the
# protocols that read the generated answer), `eval.long_answer_samples` of them.
QUESTIONS, ANSWERS = "questions", "answers"
Tables = dict[str, Table]  # QUESTIONS and ANSWERS -> the per-question table of those questions


def answered(rows: Sequence[dict]) -> list[dict]:
    """The prediction rows with a generated long answer (the eval stages' seeded sample)."""
    return [r for r in rows if r.get("answer") is not None]


def decision_table(rows: Sequence[dict], protocols: Sequence[str] = PROTOCOL_NAMES) -> Table:
    """The reference decisions (`truth`) and each of `protocols`' decisions of prediction rows, as
    CODES (an answer without a decision: its own code)."""
    return {
        "truth": np.array([CODES[r["reference_decision"]] for r in rows]),
        **{protocol: np.array([CODES.get(r[f"decision_{protocol}"], CODES[NO_DECISION]) for r in rows])
           for protocol in protocols},
    }


def tables_from_rows(rows: Sequence[dict]) -> Tables:
    """The per-question tables of prediction rows (as written to data/predictions/*.jsonl): every
    question's decisions read after the prompt (QUESTIONS), and on the questions with a generated
    answer, every protocol's decisions and the text scores (ANSWERS)."""
    sample = answered(rows)
    answers = [r["answer"] for r in sample]
    references = [r["reference"] for r in sample]
    return {
        QUESTIONS: decision_table(rows, [p.name for p in PROTOCOLS if not p.needs_generation]),
        ANSWERS: {
            **decision_table(sample),
            **{k: np.array([r[k] for r in sample], dtype=float) for k in TEXT_SCORES},
            "nll": np.array([r["answer_nll"] for r in sample], dtype=float),
            "n_tokens": np.array([r["answer_tokens"] for r in sample], dtype=float),
            "bleu": bleu_sentence_stats(answers, references),
        },
    }


def decision_key(protocol: str, *leaf: str) -> str:
    """A protocol's entry in the metrics tree, dotted as `dvc metrics diff` shows it:
    decision.<protocol>[.<leaf>...] ("decision.choice.accuracy"; protocol "majority": the majority class).
    The one place a metric's key is spelled; `text_key` is the other half."""
    return ".".join(("decision", protocol, *leaf))


def text_key(metric: str) -> str:
    """A text metric's entry in the metrics tree: text.<name> ("text.rougeL")."""
    return f"text.{metric}"


def is_decision_key(key: str) -> bool:
    return key.startswith("decision.")


def key_protocol(key: str) -> str:
    """The protocol (or "majority") a `decision_key` names."""
    return key.split(".")[1]


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


STATISTICS: dict[str, Statistic] = {
    **{decision_key(col, "accuracy"): _accuracy(col) for col in PROTOCOL_NAMES},
    **{decision_key(col, f"{avg}_f1"): _f1(col, avg) for col in PROTOCOL_NAMES for avg in ("macro", "weighted")},
    **{text_key(m.name): m.statistic or mean_of(m.name) for m in TEXT_METRICS},
}


def protocol_population(protocol: Protocol) -> str:
    """The questions a protocol's decisions are read on: all (QUESTIONS), or only those with a generated
    answer (ANSWERS) where it reads the answer."""
    return ANSWERS if protocol.needs_generation else QUESTIONS


# Each statistic's set of questions: the text metrics' and the answer-reading protocols' are the sample's.
POPULATION: dict[str, str] = {
    name: protocol_population(protocol(key_protocol(name))) if is_decision_key(name) else ANSWERS
    for name in STATISTICS
}


def primary_statistic(stat: str) -> Statistic:
    """The primary (choice) protocol's `stat` (accuracy, macro_f1, weighted_f1) over a table."""
    return STATISTICS[decision_key(PRIMARY.name, stat)]


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


def summarize(tables: Tables, n_resamples: int, seed: int) -> dict:
    """All metrics with `_ci_low`/`_ci_high` siblings, nested as decision.<protocol>.* and text.*, each
    over its `POPULATION`'s table; how many questions each set holds (`n_questions`, `n_answers`, and
    per protocol)."""
    out: dict = {"n_questions": len(tables[QUESTIONS]["truth"]), "n_answers": len(tables[ANSWERS]["truth"])}
    for name, statistic in STATISTICS.items():
        table = tables[POPULATION[name]]
        n = len(table["truth"])
        low, high = bootstrap_interval(lambda i, f=statistic, t=table: f(t, i), n, n_resamples, seed)
        _set(out, name, statistic(table, np.arange(n)))
        _set(out, f"{name}_ci_low", low)
        _set(out, f"{name}_ci_high", high)
    for p in PROTOCOLS:
        table = tables[protocol_population(p)]
        out["decision"][p.name].update(n_questions=len(table["truth"]), **_decision_details(table, p.name))
        if p.over_majority:
            out["decision"][p.name]["over_majority"] = gain_over_majority(table, n_resamples, seed, p.name)
    out["decision"].update(trivial_baselines(tables[QUESTIONS]["truth"]))
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
        statistic = STATISTICS[decision_key(protocol, stat)]
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


def paired_differences(base: Tables, tuned: Tables, n_resamples: int,
                       seed: int) -> dict[str, tuple[float, float, float]]:
    """For each metric: fine-tuned minus baseline on the same questions, with its paired 95% interval."""
    for population in (QUESTIONS, ANSWERS):
        if not np.array_equal(base[population]["truth"], tuned[population]["truth"]):
            raise ValueError("paired differences need both models evaluated on the same questions")
    out = {}
    for name, statistic in STATISTICS.items():
        b, t = base[POPULATION[name]], tuned[POPULATION[name]]
        diff = lambda i, f=statistic, b=b, t=t: f(t, i) - f(b, i)  # noqa: E731
        n = len(b["truth"])
        out[name] = (diff(np.arange(n)), *bootstrap_interval(diff, n, n_resamples, seed))
    return out
