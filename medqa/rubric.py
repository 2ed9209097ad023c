"""The judge's rubric, in one place: the criteria and their 1-4 scales, and the wording of the two
requests (rate one answer on one criterion; pick the better of two answers). Plain text only, so the
params check can list the criteria without loading any model code."""
from __future__ import annotations

from dataclasses import dataclass

RATINGS = (1, 2, 3, 4)
OUTCOMES = ("win", "tie", "loss")  # of the fine-tuned model against the base model, head to head

# criterion -> (the question the judge answers, what ratings 1..4 mean)
CRITERIA: dict[str, tuple[str, tuple[str, str, str, str]]] = {
    "helpfulness": (
        "How helpful is the answer to the person who asked the question?",
        ("terrible: no help at all, or off the subject", "mostly not helpful", "mostly helpful",
         "excellent: relevant, direct and detailed"),
    ),
    "relevance": (
        "Does the answer address this question and this study, without digressing?",
        ("irrelevant", "mostly off the point", "mostly on the point", "entirely on the point"),
    ),
    "completeness": (
        "Does the answer give the study's conclusion and the findings that support it?",
        ("nothing of substance", "misses most of what matters", "covers most of what matters",
         "complete: the conclusion and the evidence for it"),
    ),
    "correctness": (
        "Does the answer agree with the reference answer and its yes/no/maybe decision?",
        ("contradicts the reference, or gives the wrong decision", "mostly wrong", "mostly right, minor errors",
         "fully consistent with the reference, with the right decision"),
    ),
}

SYSTEM = (
    "You are an expert in medicine and clinical research who grades answers to questions about research "
    "abstracts. Be strict and impartial: judge what an answer says, not its length or its style."
)
RATING_LEAD = "Rating:"
COMPARISON_LEAD = "Better answer:"


@dataclass(frozen=True)
class Case:
    """What the judge is shown about a question, besides the answers."""

    pmid: str
    question: str
    context: str
    reference: str
    decision: str


def _case_text(case: Case) -> str:
    return (f"Question: {case.question}\nContext: {case.context}\n"
            f"Reference answer (decision: {case.decision}): {case.reference}\n\n")


def rating_request(case: Case, answer: str, criterion: str) -> str:
    """The user message asking for `answer`'s rating on `criterion`. The case comes first and the
    criterion last, so every request about one question (and one answer) shares a prefix."""
    ask, scale = CRITERIA[criterion]
    levels = "\n".join(f"{r}: {text}" for r, text in zip(RATINGS, scale))
    return (f"{_case_text(case)}Answer to grade:\n{answer.strip() or '(empty answer)'}\n\n"
            f"Criterion: {criterion}. {ask} Rate the answer from 1 to 4:\n{levels}\nReply with the rating only.")


def comparison_request(case: Case, first: str, second: str) -> str:
    """The user message asking which of two answers (shown as A, then B) is better."""
    return (f"{_case_text(case)}Answer A:\n{first.strip() or '(empty answer)'}\n\n"
            f"Answer B:\n{second.strip() or '(empty answer)'}\n\n"
            "Which answer is better: more correct (agreeing with the reference and its decision), relevant, "
            "complete and helpful? Reply with A or B only.")
