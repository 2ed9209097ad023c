"""A model's yes/no/maybe options scored under one prompt setting: what the eval stages, the finetune
stage's validation check and the chat app read the decision protocols from, and what those protocols
fit once per model (`DecisionScorer.fit`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers import GenerationConfig

from medqa.decisions import protocols
from medqa.decisions.answer_format import AnswerFormat
from medqa.errors import PipelineError
from medqa.inference.generation import ScoredAnswers, generate_and_score
from medqa.inference.scoring import score_choices, score_choices_alone
from medqa.prompting.prompts import content_free_prompts, fit_prompt, prompt_format
from medqa.tokens import token_ids

if TYPE_CHECKING:
    from medqa.params import PromptParams


@dataclass(frozen=True)
class DecisionScorer:
    """The model and tokenizer, the answer format whose prefix the options follow, the prompt budget a
    question's context is cut to, and how many questions a forward pass takes."""

    model: Any
    tokenizer: Any
    answer_format: AnswerFormat
    max_prompt_length: int
    batch_size: int

    def with_batch_size(self, batch_size: int) -> DecisionScorer:
        return dataclasses.replace(self, batch_size=batch_size)

    def _options(self) -> list[list[int]]:
        return self.answer_format.options(self.tokenizer)

    def reading(self) -> dict[str, Any]:
        """How the generation pass (`generation.score_and_decode_batch`, `generate_and_score`) reads the
        options: after the prompt and the answer prefix (`choice_prefix`), and after the model's own
        answer (`followup`)."""
        return {"choice_prefix": self.answer_format.prefix_ids(self.tokenizer), "options": self._options(),
                "followup": lambda text: self.answer_format.after_answer_ids(self.tokenizer, text)}

    def after_prompts(self, prompts: list[list[int]], desc: str | None = None, done: dict[int, list[float]] | None = None,
                      on_batch: Callable[[dict[int, list[float]]], None] | None = None) -> np.ndarray:
        """Log-likelihood of " yes", " no", " maybe" after each prompt (token ids) and the answer prefix,
        shape (n, 3): each prompt prefilled alone, as the generation pass prefills them, the prefix it
        shares with the one before read once (`score_choices_alone`). `done` and `on_batch` (every
        `batch_size` prompts): resuming."""
        prefix_ids = self.answer_format.prefix_ids(self.tokenizer)
        options = self._options()
        return np.array(score_choices_alone(self.model, [p + prefix_ids for p in prompts], options, desc=desc,
                                            done=done, on_batch=on_batch, batch_size=self.batch_size)).reshape(
            len(prompts), len(options))  # (0, 3) for no prompts

    def after_answers(self, prompts: list[list[int]], generations: list[str], desc: str | None = None) -> np.ndarray:
        """Log-likelihood of the options after each prompt, its generated answer and the answer prefix
        (`AnswerFormat.after_answer_context`), read from scratch, shape (n, 3). The eval stages get the same
        numbers from the generation's cache (`answer_and_score`); the chat app uses this."""
        return np.array(score_choices(
            self.model, [p + self.answer_format.after_answer_ids(self.tokenizer, g)
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
        self, prompts: list[list[int]], targets: list[list[int]], config: GenerationConfig, *, seed: int,
        desc: str | None, done: dict[int, dict] | None = None,
        on_batch: Callable[[dict[int, dict]], None] | None = None,
    ) -> ScoredAnswers:
        """The eval stages' pass over the test questions, one prefill per prompt: the generated answers,
        the option log-likelihoods after the answer prefix, those after the model's own answer and the
        prefix (`after_answer`), and the summed log-likelihood of each reference target (token ids).
        `done` and `on_batch`: resuming (`generate_and_score`)."""
        return generate_and_score(
            self.model, self.tokenizer, prompts, config, targets=targets, batch_size=self.batch_size, seed=seed,
            desc=desc, done=done, on_batch=on_batch, **self.reading(),
        )

    def content_free(self, prompt: PromptParams, model_name: str) -> np.ndarray:
        """The options' log-likelihoods after the prompt with each content-free filler
        (`protocols.CONTENT_FREE`) as both the question and the context, shape (k, 3), in one batch."""
        fmt = prompt_format(self.tokenizer, prompt, model_name)
        ids = [token_ids(self.tokenizer, p) for p in content_free_prompts(fmt, prompt.system, protocols.CONTENT_FREE)]
        return self.with_batch_size(len(ids)).after_prompts(ids)

    def fit(self, candidates: Sequence[protocols.Protocol], prompt: PromptParams, model_name: str,
            validation: list[dict] | None = None) -> dict[str, protocols.Fitted]:
        """What each of the `candidates` protocols that fits anything (`protocols.Fit`) fits for this model: on the
        content-free prompts, or on the `validation` examples (formatted, with their decisions), each
        read once whatever number of protocols fits on it. Protocol name -> `protocols.Fitted`."""
        scored: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        fitted = {}
        for protocol in (p for p in candidates if p.fit is not None):
            if protocol.fit.on not in scored:
                if protocol.fit.on == "content_free":
                    scored["content_free"] = self.content_free(prompt, model_name), None
                elif not validation:
                    raise PipelineError(f"no validation questions to fit the {protocol.label} protocol's "
                                        f"{protocol.fit.label.lower()} on: raise split.val_size")
                else:
                    scored["validation"] = self.after_examples(validation), protocols.reference_codes(validation)
            loglik, truth = scored[protocol.fit.on]
            fitted[protocol.name] = protocols.Fitted(protocol.fit.fit(loglik, truth), len(loglik))
        return fitted
