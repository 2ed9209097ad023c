"""A model's yes/no/maybe options scored under one prompt setting: what the eval stages, the finetune
stage's validation check and the chat app read the decision protocols from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from transformers import GenerationConfig

from medqa.decisions import answers
from medqa.inference.generation import ScoredAnswers, generate_and_score
from medqa.inference.scoring import score_choices
from medqa.prompting.prompts import fit_prompt
from medqa.tokens import token_ids


@dataclass(frozen=True)
class DecisionScorer:
    """The model and tokenizer, the answer prefix the options follow (prompt.answer_prefix), the prompt
    budget a question's context is cut to, and how many questions a forward pass takes."""

    model: Any
    tokenizer: Any
    answer_prefix: str
    max_prompt_length: int
    batch_size: int

    def with_batch_size(self, batch_size: int) -> DecisionScorer:
        return dataclasses.replace(self, batch_size=batch_size)

    def _options(self) -> list[list[int]]:
        return answers.decision_options(self.tokenizer, self.answer_prefix)

    def after_prompts(self, prompts: list[list[int]], desc: str | None = None) -> np.ndarray:
        """Log-likelihood of " yes", " no", " maybe" after each prompt (token ids) and the answer prefix,
        shape (n, 3)."""
        prefix_ids = token_ids(self.tokenizer, self.answer_prefix)
        return np.array(score_choices(self.model, [p + prefix_ids for p in prompts], self._options(),
                                      pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size, desc=desc))

    def after_answers(self, prompts: list[list[int]], generations: list[str], desc: str | None = None) -> np.ndarray:
        """Log-likelihood of the options after each prompt, its generated answer and the answer prefix
        (`answers.after_answer_context`), read from scratch, shape (n, 3). The eval stages get the same
        numbers from the generation's cache (`answer_and_score`); the chat app uses this."""
        return np.array(score_choices(
            self.model, [p + answers.after_answer_ids(self.tokenizer, g, self.answer_prefix)
                         for p, g in zip(prompts, generations)],
            self._options(), pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size, desc=desc,
        ))

    def after_examples(self, examples: list[dict], desc: str | None = "validation decisions") -> np.ndarray:
        """Each formatted example's option log-likelihoods after its prompt (cut to the budget) and the
        answer prefix, shape (n, 3) (one forward pass per question)."""
        return self.after_prompts([fit_prompt(ex, self.tokenizer, self.max_prompt_length) for ex in examples], desc)

    def choices(self, examples: list[dict]) -> np.ndarray:
        """Each example's choice-scored decision: option i is DECISIONS[i], coded i (`metrics.CODES`)."""
        return self.after_examples(examples).argmax(axis=1)

    def answer_and_score(
        self, prompts: list[list[int]], targets: list[list[int]], config: GenerationConfig, seed: int,
        desc: str | None, done: dict[int, dict] | None = None,
        on_batch: Callable[[dict[int, dict]], None] | None = None,
    ) -> ScoredAnswers:
        """The eval stages' pass over the test questions, one prefill per prompt: the generated answers,
        the option log-likelihoods after the answer prefix, those after the model's own answer and the
        prefix (`after_answer`), and the summed log-likelihood of each reference target (token ids).
        `done` and `on_batch`: resuming (`generate_and_score`)."""
        return generate_and_score(
            self.model, self.tokenizer, prompts, config, choice_prefix=token_ids(self.tokenizer, self.answer_prefix),
            options=self._options(), targets=targets, batch_size=self.batch_size, seed=seed,
            followup=lambda text: answers.after_answer_ids(self.tokenizer, text, self.answer_prefix), desc=desc,
            done=done, on_batch=on_batch,
        )
