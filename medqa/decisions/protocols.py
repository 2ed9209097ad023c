"""The decision protocols: turning the options' log-likelihoods into decisions (directly, after the
model's own answer, calibrated, or with offsets fitted on validation questions, or parsed from the
generation), what each fits once per model, and their registry (`PROTOCOLS`) that the eval stages,
metrics, report and chat app loop over. How the answer states its decision: `answer_format`.

No model runs here (see `medqa.inference`): this module is light enough for every stage.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from medqa.decisions.answer_format import DECISIONS, AnswerFormat

# Content-free stand-ins for the question and the context (Zhao et al., 2021, "Calibrate Before Use").
CONTENT_FREE = ("N/A", "", "[MASK]")


def choice_probabilities(loglik: np.ndarray) -> np.ndarray:
    """The options' log-likelihoods, shape (n, 3), normalised to probabilities over the three decisions."""
    loglik = np.asarray(loglik, dtype=float)
    probs = np.exp(loglik - loglik.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def content_free_prior(loglik: np.ndarray) -> np.ndarray:
    """The model's option probabilities with no content to go on: the mean over the content-free
    prompts' normalised probabilities (log-likelihoods of shape (k, 3)), shape (3,)."""
    return choice_probabilities(loglik).mean(axis=0)


def calibrate(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Contextual calibration: each question's option probabilities divided by the prior, renormalised
    (the diagonal W = diag(prior)^-1, b = 0 of Zhao et al., 2021)."""
    scaled = np.asarray(probs, dtype=float) / np.asarray(prior, dtype=float)
    return scaled / scaled.sum(axis=-1, keepdims=True)


# The offsets `fit_offsets` tries for "no" and for "maybe" ("yes" stays 0), in log-likelihood units.
NO_OFFSETS = np.linspace(-4.0, 4.0, 81)
MAYBE_OFFSETS = np.linspace(-4.0, 4.0, 21)


def _accuracy_per_row(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return (predicted == truth).mean(axis=1)


def _macro_f1_per_row(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Macro-F1 over the decisions of each row of `predicted` (option indices, shape (g, n)) against
    `truth` (shape (n,)), as sklearn's `f1_score(average="macro", zero_division=0)` over the three
    labels (tests/test_metrics.py checks)."""
    scores = []
    for option in range(len(DECISIONS)):
        hits = ((predicted == option) & (truth == option)).sum(axis=1)
        denominator = (predicted == option).sum(axis=1) + (truth == option).sum()
        scores.append(np.divide(2.0 * hits, denominator, out=np.zeros(len(predicted)), where=denominator > 0))
    return np.mean(scores, axis=0)


# What `fit_offsets` can maximise.
OFFSET_OBJECTIVES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "accuracy": _accuracy_per_row, "macro_f1": _macro_f1_per_row}


def fit_offsets(loglik: np.ndarray, truth: np.ndarray, objective: str = "accuracy") -> np.ndarray:
    """Offsets added to the options' log-likelihoods (shape (n, 3)) before the argmax, "yes" fixed at
    0, that make the most of these questions' decisions right (`truth`: option indices) by `objective`
    (accuracy, or macro-F1, which counts a rare decision as much as a common one): the grid point with
    the best score, the one nearest to no offsets where several tie. Fitted on held-out questions, they
    undo a model's lean to one answer and keep its ranking of questions."""
    grid = np.array([[0.0, no, maybe] for no in NO_OFFSETS for maybe in MAYBE_OFFSETS])
    predicted = (np.asarray(loglik)[None] + grid[:, None, :]).argmax(axis=2)
    score = OFFSET_OBJECTIVES[objective](predicted, np.asarray(truth))
    best = np.flatnonzero(score == score.max())
    return grid[best[np.argmin(np.linalg.norm(grid[best], axis=1))]]


def rounded_by_decision(values: np.ndarray) -> dict[str, float]:
    """One value per option (a question's probabilities, a model's offsets) by decision, rounded as the
    prediction rows and metrics store them."""
    return {d: round(float(v), 6) for d, v in zip(DECISIONS, values)}


def reference_codes(examples: Sequence[dict]) -> np.ndarray:
    """Each example's reference decision as an option index (DECISIONS[i] is i): the truth
    `fit_offsets` and the validation summaries take."""
    return np.array([DECISIONS.index(ex["final_decision"]) for ex in examples])


@dataclass(frozen=True)
class Fitted:
    """What a protocol fitted for one model (`Fit`): its values and how many prompts they were fitted on."""

    values: np.ndarray
    prompts: int


@dataclass(frozen=True, kw_only=True)
class Fit:
    """What a protocol fits once per model before it reads the test questions, on the options'
    log-likelihoods after other prompts: the content-free prompts (`on="content_free"`, CONTENT_FREE
    as question and context) or the validation questions (`on="validation"`, with their decisions as
    option indices); and how the metrics (`entry`) and the report (`text`, from those entries) give it."""

    on: Literal["content_free", "validation"]
    fit: Callable[[np.ndarray, np.ndarray | None], np.ndarray]  # (log-likelihoods (k, 3), truth) -> values
    label: str  # how the report names it
    entry: Callable[[Fitted], dict[str, Any]]  # what the protocol's metrics section holds of it
    text: Callable[[dict[str, Any]], str]  # the report's line, from the protocol's metrics section


def _prior_entry(fitted: Fitted) -> dict[str, Any]:
    return {"content_free_prior": rounded_by_decision(fitted.values)}


def _prior_text(section: dict[str, Any]) -> str:
    prior = section.get("content_free_prior", {})
    return " · ".join(f"{d} {prior[d]:.2f}" for d in DECISIONS if d in prior) or "n/a"


def _offsets_entry(fitted: Fitted) -> dict[str, Any]:
    return {"fitted": rounded_by_decision(fitted.values), "validation_questions": fitted.prompts}


def _offsets_text(section: dict[str, Any]) -> str:
    """"yes +0.0 · no +1.3 · maybe -0.4 (150 validation questions)", or "n/a" where none were fitted."""
    if "fitted" not in section:
        return "n/a"
    fitted = " · ".join(f"{d} {section['fitted'][d]:+.1f}" for d in DECISIONS)
    return f"{fitted} ({section['validation_questions']} validation questions)"


@dataclass(frozen=True)
class DecisionEvidence:
    """What the decision protocols read, per question: the options' log-likelihoods straight after the
    prompt and the answer prefix (shape (n, 3)), and where answers were generated, the answers and the
    options' log-likelihoods after them (None for questions read after the prompt only, which only
    the protocols that do not need a generation read); the answer format the generations are parsed
    with; and per model, what the protocols fitted (protocol name -> `Fitted`)."""

    choice: np.ndarray
    answer_format: AnswerFormat
    generations: Sequence[str] | None = None
    after_answer: np.ndarray | None = None
    fitted: Mapping[str, Fitted] = field(default_factory=dict)


Reading = tuple[list[str], np.ndarray | None]  # per question, a decision and the probabilities behind it


def _argmax_decisions(probs: np.ndarray) -> Reading:
    return [DECISIONS[int(i)] for i in np.argmax(probs, axis=1)], probs


def _read_choice(e: DecisionEvidence, fitted: None) -> Reading:
    return _argmax_decisions(choice_probabilities(e.choice))


def _read_after_answer(e: DecisionEvidence, fitted: None) -> Reading:
    return _argmax_decisions(choice_probabilities(e.after_answer))


def _read_calibrated(e: DecisionEvidence, prior: Fitted) -> Reading:
    return _argmax_decisions(calibrate(choice_probabilities(e.choice), prior.values))


def _read_offsets(e: DecisionEvidence, offsets: Fitted) -> Reading:
    return _argmax_decisions(choice_probabilities(np.asarray(e.choice) + offsets.values))


def _read_generated(e: DecisionEvidence, fitted: None) -> Reading:
    return [e.answer_format.parse(g) for g in e.generations], None


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """A way of reading a model's yes/no/maybe decision. Its `name` keys the prediction rows
    (`decision_<name>`, `<name>_probs`) and the metrics (`decision.<name>.*`)."""

    name: str
    label: str  # how the report and the chat app call it
    needs_generation: bool  # read from the generated answer (or after it), not from the prompt alone
    scored: str  # how its options are scored, for the report's note
    read: Callable[[DecisionEvidence, Any], Reading]  # (evidence, what it fitted or None) -> its reading
    reported: tuple[str, ...] = ("accuracy", "macro_f1")  # its statistics in the report's table
    fit: Fit | None = None  # what it fits once per model, if anything
    over_majority: bool = False  # its gain over the majority class, paired, in the metrics and the report


# The decision protocols, in the order the report shows them. The first is the published zero-shot
# protocol: the official-format predictions file holds its decisions. A new protocol is one entry
# and its reader.
PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(name="choice", label="choice", needs_generation=False,
             scored="the most likely of yes/no/maybe straight after the prompt and the answer prefix (the "
                    "published zero-shot protocol; the official-format predictions file holds these)",
             read=_read_choice, reported=("accuracy", "macro_f1", "weighted_f1"), over_majority=True),
    Protocol(name="after_answer", label="after answer", needs_generation=True,
             scored="the same options after the model's own generated answer and the prefix (the order the "
                    "fine-tuning target teaches)",
             read=_read_after_answer),
    Protocol(name="calibrated", label="calibrated", needs_generation=False,
             scored="choice, with each option's probability divided by the model's own probability for it on "
                    "content-free prompts (its content-free prior, given next)",
             read=_read_calibrated,
             fit=Fit(on="content_free", fit=lambda loglik, truth: content_free_prior(loglik),
                     label="Content-free prior", entry=_prior_entry, text=_prior_text)),
    Protocol(name="offsets", label="choice + offsets", needs_generation=False,
             scored="choice, with offsets added to the options' log-likelihoods that give the model's best "
                    "accuracy on the validation questions, fitted for each model (given next): undoes a lean "
                    "to one answer",
             read=_read_offsets, over_majority=True,
             fit=Fit(on="validation", fit=fit_offsets, label="Offsets", entry=_offsets_entry, text=_offsets_text)),
    Protocol(name="generated", label="parsed", needs_generation=True,
             scored="the decision word found in the generated text (none found counts as wrong)",
             read=_read_generated, reported=("accuracy", "macro_f1", "weighted_f1", "none_rate")),
)
PRIMARY = PROTOCOLS[0]
PROTOCOL_NAMES = tuple(p.name for p in PROTOCOLS)


def protocol(name: str) -> Protocol:
    """The registered decision protocol called `name`."""
    return PROTOCOLS[PROTOCOL_NAMES.index(name)]


def read_decisions(evidence: DecisionEvidence, protocols: Sequence[Protocol] = PROTOCOLS) -> list[dict[str, Any]]:
    """Per question, each protocol's decision (`decision_<name>`) and, where it has them, the
    probabilities behind it (`<name>_probs`, rounded): the prediction rows' decision columns."""
    columns: list[dict[str, Any]] = [{} for _ in evidence.choice]
    for protocol in protocols:
        if protocol.needs_generation and evidence.generations is None:
            raise ValueError(f"protocol {protocol.name!r} reads the generated answers, and there are none")
        if protocol.fit is not None and protocol.name not in evidence.fitted:
            raise ValueError(f"protocol {protocol.name!r} needs its {protocol.fit.label.lower()} fitted "
                             f"on the {protocol.fit.on.replace('_', '-')} prompts")
        decisions, probs = protocol.read(evidence, evidence.fitted.get(protocol.name))
        for i, row in enumerate(columns):
            row[f"decision_{protocol.name}"] = decisions[i]
            if probs is not None:
                row[f"{protocol.name}_probs"] = rounded_by_decision(probs[i])
    return columns
