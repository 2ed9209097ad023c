"""How an answer states its decision, in one place: the decisions, and `AnswerFormat`, which writes the
decision sentence into the answer the model learns and reads it back out of a generation, and gives
the tokens choice scoring reads its options after. Light: no model runs here."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medqa.tokens import continuation_ids, token_ids

if TYPE_CHECKING:
    from medqa.params import PromptParams

DECISIONS = ("yes", "no", "maybe")  # PubMedQA's final_decision labels, in option order
NO_DECISION = "none"  # a generated answer from which no decision could be parsed

_ALTERNATIVES = "|".join(map(re.escape, DECISIONS))  # the decision words, as a regex alternation
_WORD = re.compile(rf"\b({_ALTERNATIVES})\b", re.IGNORECASE)


@dataclass(frozen=True)
class AnswerFormat:
    """How an answer states its decision: the sentence "<prefix> <decision>." (prompt.answer_prefix),
    before the long answer or after it (prompt.decision_first). Whatever writes that sentence (the
    targets the model learns) or reads it back (a generation's decision and long answer, the tokens
    choice scoring reads its options after) goes through this object."""

    prefix: str
    decision_first: bool = False

    @classmethod
    def of(cls, prompt: PromptParams) -> AnswerFormat:
        """The answer format params.yaml's prompt section sets."""
        return cls(prompt.answer_prefix, prompt.decision_first)

    def sentence(self, decision: str) -> str:
        """The fixed sentence that states the decision: "<prefix> <decision>."."""
        return f"{self.prefix} {decision}."

    def target(self, long_answer: str, decision: str) -> str:
        """The answer the model learns: the long answer and the decision sentence, in either order.

        Decision last is the reference runs' order; decision first puts the decision where choice
        scoring reads it (right after the prompt and the answer prefix), so it is trained there.
        """
        parts = [long_answer.strip(), self.sentence(decision)]
        return " ".join(reversed(parts) if self.decision_first else parts)

    def decision_span(self, target: str, decision: str) -> tuple[int, int]:
        """Where the decision word stands in a target (`target`): its character span, in the
        decision sentence wherever that sentence is."""
        sentence = self.sentence(decision)
        at = target.rfind(sentence)
        if at < 0:
            raise ValueError(f"the target does not state its decision as {sentence!r} (prompt.answer_prefix)")
        start = at + len(self.prefix) + 1
        return start, start + len(decision)

    def parse(self, text: str) -> str:
        """The decision stated in a generated answer: the first yes/no/maybe word after the last answer
        prefix if present, else the first in the text; "none" when there is none (scored as wrong)."""
        lowered = text.lower()
        start = lowered.rfind(self.prefix.lower())
        found = _WORD.search(lowered, start + len(self.prefix)) if start >= 0 else None
        found = found or _WORD.search(lowered)
        return found.group(1) if found else NO_DECISION

    def long_answer(self, generation: str) -> str:
        """The generated text without its decision sentence(s), wherever they stand: what is compared
        with the reference long answer. May be empty (an answer that is only the decision)."""
        # the answer prefix and the decision word and full stop after it, when they are there
        sentence = re.compile(re.escape(self.prefix) + rf"(?:\s*(?:{_ALTERNATIVES})\b\.?)?", re.IGNORECASE)
        return " ".join(sentence.sub(" ", generation).split())

    def _first_prefix(self, generation: str) -> int:
        """Where the generation's first answer prefix starts (any case), -1 where it has none."""
        return generation.lower().find(self.prefix.lower())

    def after_answer_context(self, generation: str) -> str:
        """The text between the prompt and the options for `after_answer` scoring: the generation up to
        its first answer prefix (the model's own answer, in the order the target teaches) and the prefix.
        Where the generation has no prefix, all of it; where it starts with one, the prefix alone."""
        start = self._first_prefix(generation)
        answer = (generation if start < 0 else generation[:start]).strip()
        return f"{answer} {self.prefix}" if answer else self.prefix

    def reads_where_choice_reads(self, generation: str) -> bool:
        """Whether `after_answer` reads its options where `choice` does (straight after the prompt and the
        prefix): a generation that starts with its answer prefix."""
        return self.after_answer_context(generation) == self.prefix

    def after_answer_at(self, generation: str) -> str:
        """Where `after_answer_context` cut the generation: at "its answer prefix", or at "its end"."""
        return "its end" if self._first_prefix(generation) < 0 else "its answer prefix"

    def after_answer_ids(self, tokenizer: Any, generation: str) -> list[int]:
        """The tokens fed after the prompt before the options are read, for `after_answer` scoring."""
        return token_ids(tokenizer, self.after_answer_context(generation))

    def with_prefix(self, prompt: str) -> str:
        """A prompt's text followed by the answer prefix: where choice scoring reads the options."""
        return prompt + self.prefix

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """The answer prefix's tokens, as choice scoring appends them to a tokenised prompt."""
        return token_ids(tokenizer, self.prefix)

    def options(self, tokenizer: Any) -> list[list[int]]:
        """The tokens of " yes", " no", " maybe" in context after the answer prefix, as the target spells them."""
        return [continuation_ids(tokenizer, self.prefix, f" {d}") for d in DECISIONS]
