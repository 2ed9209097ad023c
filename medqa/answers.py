"""The answer protocol, in one place: the decisions, the answer the model learns, reading a decision
back out of a generation, the option tokens that choice scoring reads, and turning their
log-likelihoods into decisions (directly, after the model's own answer, or calibrated).

No model runs here (see `evaluation` and `generation`): this module is light enough for every stage.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

DECISIONS = ("yes", "no", "maybe")  # PubMedQA's final_decision labels, in option order
NO_DECISION = "none"  # a generated answer from which no decision could be parsed

# The decision protocols the eval stages score (see the report's note on each):
# choice: the options straight after the prompt and the answer prefix (the published zero-shot protocol);
# generated: the decision word found in the generated text;
# after_answer: the options after the prompt, the model's own long answer and the answer prefix;
# calibrated: choice, divided by the model's option probabilities for content-free prompts.
PROTOCOLS = ("choice", "generated", "after_answer", "calibrated")

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


def after_answer_at(generation: str, answer_prefix: str) -> str:
    """Where `after_answer_context` cut the generation: at "its answer prefix", or at "its end"."""
    return "its end" if _first_prefix(generation, answer_prefix) < 0 else "its answer prefix"


def after_answer_ids(tokenizer: Any, generation: str, answer_prefix: str) -> list[int]:
    """The tokens fed after the prompt before the options are read, for `after_answer` scoring."""
    return tokenizer(after_answer_context(generation, answer_prefix), add_special_tokens=False)["input_ids"]


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids that `continuation` adds after `context`, tokenised together (as lm-eval does)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(ctx)] != ctx:  # the join merged tokens: fall back to separate tokenisation
        return tokenizer(continuation, add_special_tokens=False)["input_ids"]
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
