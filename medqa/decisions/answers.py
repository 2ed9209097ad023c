"""The answer protocol, in one place: the decisions, the answer the model learns, reading a decision
back out of a generation, the option tokens that choice scoring reads, and turning their
log-likelihoods into decisions (directly, after the model's own answer, calibrated, or with offsets
fitted on validation questions), and the
registry of those decision protocols (`PROTOCOLS`) that the eval stages, metrics, report and chat app
loop over.

No model runs here (see `evaluation` and `generation`): this module is light enough for every stage.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from medqa.tokens import token_ids

DECISIONS = ("yes", "no", "maybe")  # PubMedQA's final_decision labels, in option order
NO_DECISION = "none"  # a generated answer from which no decision could be parsed

# Content-free stand-ins for the question and the context (Zhao et al., 2021, "Calibrate Before Use").
CONTENT_FREE = ("N/A", "", "[MASK]")


def decision_sentence(decision: str, answer_prefix: str) -> str:
    """The fixed sentence that states the decision: "<prefix> <decision>."."""
    return f"{answer_prefix} {decision}."


def target_text(long_answer: str, decision: str, answer_prefix: str, decision_first: bool = False) -> str:
    """The answer the model learns: the long answer and the decision sentence, in either order.

    Decision last is the reference runs' order; decision first puts the decision where choice
    scoring reads it (right after the prompt and the answer prefix), so it is trained there.
    """
    parts = [long_answer.strip(), decision_sentence(decision, answer_prefix)]
    return " ".join(reversed(parts) if decision_first else parts)


def decision_span(target: str, decision: str, answer_prefix: str) -> tuple[int, int]:
    """Where the decision word stands in a target (`target_text`): its character span, in the
    decision sentence wherever that sentence is."""
    sentence = decision_sentence(decision, answer_prefix)
    at = target.rfind(sentence)
    if at < 0:
        raise ValueError(f"the target does not state its decision as {sentence!r}")
    start = at + len(answer_prefix) + 1
    return start, start + len(decision)


_ALTERNATIVES = "|".join(map(re.escape, DECISIONS))  # the decision words, as a regex alternation


def _sentence_pattern(answer_prefix: str) -> re.Pattern:
    """The answer prefix and the decision word and full stop after it, when they are there."""
    return re.compile(re.escape(answer_prefix) + rf"(?:\s*(?:{_ALTERNATIVES})\b\.?)?", re.IGNORECASE)


_WORD = re.compile(rf"\b({_ALTERNATIVES})\b", re.IGNORECASE)


def parse_decision(text: str, answer_prefix: str) -> str:
    """The decision stated in a generated answer: the first yes/no/maybe word after the last answer
    prefix if present, else the first in the text; "none" when there is none (scored as wrong)."""
    lowered = text.lower()
    start = lowered.rfind(answer_prefix.lower())
    found = _WORD.search(lowered, start + len(answer_prefix)) if start >= 0 else None
    found = found or _WORD.search(lowered)
    return found.group(1) if found else NO_DECISION


def long_answer_part(generation: str, answer_prefix: str) -> str:
    """The generated text without its decision sentence(s), wherever they stand: what is compared
    with the reference long answer. May be empty (an answer that is only the decision)."""
    return " ".join(_sentence_pattern(answer_prefix).sub(" ", generation).split())


def _first_prefix(generation: str, answer_prefix: str) -> int:
    """Where the generation's first answer prefix starts (any case), -1 where it has none."""
    return generation.lower().find(answer_prefix.lower())


def after_answer_context(generation: str, answer_prefix: str) -> str:
    """The text between the prompt and the options for `after_answer` scoring: the generation up to
    its first answer prefix (the model's own answer, in the order the target teaches) and the prefix.
    Where the generation has no prefix, all of it; where it starts with one, the prefix alone."""
    start = _first_prefix(generation, answer_prefix)
    answer = (generation if start < 0 else generation[:start]).strip()
    return f"{answer} {answer_prefix}" if answer else answer_prefix


def read_where_choice_reads(generation: str, answer_prefix: str) -> bool:
    """Whether `after_answer` reads its options where `choice` does (straight after the prompt and the
    prefix): a generation that starts with its answer prefix."""
    return after_answer_context(generation, answer_prefix) == answer_prefix


def after_answer_at(generation: str, answer_prefix: str) -> str:
    """Where `after_answer_context` cut the generation: at "its answer prefix", or at "its end"."""
    return "its end" if _first_prefix(generation, answer_prefix) < 0 else "its answer prefix"


def after_answer_ids(tokenizer: Any, generation: str, answer_prefix: str) -> list[int]:
    """The tokens fed after the prompt before the options are read, for `after_answer` scoring."""
    return token_ids(tokenizer, after_answer_context(generation, answer_prefix))


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids that `continuation` adds after `context`, tokenised together (as lm-eval does)."""
    ctx = token_ids(tokenizer, context)
    full = token_ids(tokenizer, context + continuation)
    if full[: len(ctx)] != ctx:  # the join merged tokens: fall back to separate tokenisation
        return token_ids(tokenizer, continuation)
    return full[len(ctx) :]


def decision_options(tokenizer: Any, answer_prefix: str) -> list[list[int]]:
    """The tokens of " yes", " no", " maybe" in context after the answer prefix, as the target spells them."""
    return [continuation_ids(tokenizer, answer_prefix, f" {d}") for d in DECISIONS]


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


def fit_offsets(loglik: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Offsets added to the options' log-likelihoods (shape (n, 3)) before the argmax, "yes" fixed at
    0, that make the most of these questions' decisions right (`truth`: option indices): the grid
    point with the best accuracy, the one nearest to no offsets where several tie. Fitted on
    validation questions, they undo a model's lean to one answer and keep its ranking of questions."""
    grid = np.array([[0.0, no, maybe] for no in NO_OFFSETS for maybe in MAYBE_OFFSETS])
    accuracy = ((np.asarray(loglik)[None] + grid[:, None, :]).argmax(axis=2) == np.asarray(truth)).mean(axis=1)
    best = np.flatnonzero(accuracy == accuracy.max())
    return grid[best[np.argmin(np.linalg.norm(grid[best], axis=1))]]


def rounded_probabilities(probs: np.ndarray) -> dict[str, float]:
    """One question's option probabilities by decision, rounded as the prediction rows store them."""
    return {d: round(float(p), 6) for d, p in zip(DECISIONS, probs)}


@dataclass(frozen=True)
class DecisionEvidence:
    """What the decision protocols read, per question: the generated answers, the options'
    log-likelihoods straight after the prompt and the answer prefix, and after the model's own answer
    (shape (n, 3) each); and per model, its content-free prior (shape (3,)) and the offsets fitted on
    validation questions (`fit_offsets`, shape (3,); None where none were fitted)."""

    generations: Sequence[str]
    choice: np.ndarray
    after_answer: np.ndarray
    prior: np.ndarray
    answer_prefix: str
    offsets: np.ndarray | None = None


Reading = tuple[list[str], np.ndarray | None]  # per question, a decision and the probabilities behind it


def _argmax_decisions(probs: np.ndarray) -> Reading:
    return [DECISIONS[int(i)] for i in np.argmax(probs, axis=1)], probs


def _read_choice(e: DecisionEvidence) -> Reading:
    return _argmax_decisions(choice_probabilities(e.choice))


def _read_after_answer(e: DecisionEvidence) -> Reading:
    return _argmax_decisions(choice_probabilities(e.after_answer))


def _read_calibrated(e: DecisionEvidence) -> Reading:
    return _argmax_decisions(calibrate(choice_probabilities(e.choice), e.prior))


def _read_offsets(e: DecisionEvidence) -> Reading:
    return _argmax_decisions(choice_probabilities(np.asarray(e.choice) + e.offsets))


def _read_generated(e: DecisionEvidence) -> Reading:
    return [parse_decision(g, e.answer_prefix) for g in e.generations], None


@dataclass(frozen=True)
class Protocol:
    """A way of reading a model's yes/no/maybe decision. Its `name` keys the prediction rows
    (`decision_<name>`, `<name>_probs`) and the metrics (`decision.<name>.*`)."""

    name: str
    label: str  # how the report and the chat app call it
    needs_generation: bool  # read from the generated answer (or after it), not from the prompt alone
    scored: str  # how its options are scored, for the report's note
    read: Callable[[DecisionEvidence], Reading]
    reported: tuple[str, ...] = ("accuracy", "macro_f1")  # its statistics in the report's table
    needs_offsets: bool = False  # reads the offsets fitted on validation questions (`DecisionEvidence.offsets`)
    over_majority: bool = False  # its gain over the majority class, paired, in the metrics and the report


# The decision protocols, in the order the report shows them. The first is the published zero-shot
# protocol: the official-format predictions file holds its decisions. A new protocol is one entry
# and its reader.
PROTOCOLS: tuple[Protocol, ...] = (
    Protocol("choice", "choice", False,
             "the most likely of yes/no/maybe straight after the prompt and the answer prefix (the published "
             "zero-shot protocol; the official-format predictions file holds these)",
             _read_choice, reported=("accuracy", "macro_f1", "weighted_f1"), over_majority=True),
    Protocol("after_answer", "after answer", True,
             "the same options after the model's own generated answer and the prefix (the order the "
             "fine-tuning target teaches)", _read_after_answer),
    Protocol("calibrated", "calibrated", False,
             "choice, with each option's probability divided by the model's own probability for it on "
             "content-free prompts (its content-free prior, given next)", _read_calibrated),
    Protocol("offsets", "choice + offsets", False,
             "choice, with offsets added to the options' log-likelihoods that give the model's best accuracy "
             "on the validation questions, fitted for each model (given next): undoes a lean to one answer",
             _read_offsets, needs_offsets=True, over_majority=True),
    Protocol("generated", "parsed", True,
             "the decision word found in the generated text (none found counts as wrong)",
             _read_generated, reported=("accuracy", "macro_f1", "weighted_f1", "none_rate")),
)
PRIMARY = PROTOCOLS[0]
PROTOCOL_NAMES = tuple(p.name for p in PROTOCOLS)


def read_decisions(evidence: DecisionEvidence, protocols: Sequence[Protocol] = PROTOCOLS) -> list[dict[str, Any]]:
    """Per question, each protocol's decision (`decision_<name>`) and, where it has them, the
    probabilities behind it (`<name>_probs`, rounded): the prediction rows' decision columns."""
    columns: list[dict[str, Any]] = [{} for _ in evidence.generations]
    for protocol in protocols:
        if protocol.needs_offsets and evidence.offsets is None:
            raise ValueError(f"protocol {protocol.name!r} needs offsets fitted on validation questions")
        decisions, probs = protocol.read(evidence)
        for i, row in enumerate(columns):
            row[f"decision_{protocol.name}"] = decisions[i]
            if probs is not None:
                row[f"{protocol.name}_probs"] = rounded_probabilities(probs[i])
    return columns
