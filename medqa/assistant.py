"""Answering one question or one chat message with the base model and the fine-tuned one.

One model in memory: the base weights with the LoRA adapter attached; the base model's answers
come from the same weights with the adapter disabled (peft's `disable_adapter`). A lock keeps
two requests from toggling the adapter under each other.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers import GenerationConfig

from medqa.answers import DECISIONS, PROTOCOLS, DecisionEvidence
from medqa.errors import PipelineError
from medqa.evaluation import content_free_prior, score_after_answers, score_decisions
from medqa.generation import model_device, model_generate
from medqa.models import load_for_inference, resolve_hardware
from medqa.params import Params
from medqa.prompts import fit_prompt, join_contexts, prompt_format, user_message
from medqa.tokens import token_ids


Decision = tuple[str, "dict[str, float] | None"]  # a protocol's decision and the probabilities behind it


def message_text(content: Any) -> str:
    """The text of a chat message's content: a string, or Gradio's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def recent_turns(history: list[dict[str, Any]], n: int) -> list[tuple[str, str]]:
    """The last `n` complete (user, assistant) exchanges of a role/content message list."""
    turns: list[tuple[str, str]] = []
    pending: str | None = None
    for message in history:
        role, text = message.get("role"), message_text(message.get("content"))
        if role == "user":
            pending = text
        elif role == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
    return turns[-n:] if n > 0 else []


class _Stop:
    """A stopping criterion that ends generation when the reader goes away (page closed, new request)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Assistant:
    """The base model with its adapter, the prompt format of the pipeline, and the answer functions."""

    def __init__(self, model: Any, tokenizer: Any, params: Params):
        self.model = model
        self.tokenizer = tokenizer
        self.system = params.prompt.system
        self.answer_prefix = params.prompt.answer_prefix
        self.max_prompt_length = params.eval.max_prompt_length
        self.history_turns = params.chat.history_turns
        self.seed = params.generation.seed  # each answer is seeded alike: sampled answers can be reproduced
        self.prompt, self.model_name = params.prompt, params.model.name
        self.format = prompt_format(tokenizer, params.prompt, params.model.name)
        self._priors: dict[bool, np.ndarray] = {}  # the content-free prior, with the adapter on and off
        # The last prompt's direct-choice log-likelihoods, with the adapter on and off: a compare reads
        # them before the answer streams and again after it, for the same prompt.
        self._last_choice: dict[bool, tuple[tuple[int, ...], np.ndarray]] = {}
        self.lock = threading.Lock()

    @classmethod
    def load(cls, params: Params, base_dir: str | Path, adapter_dir: str | Path) -> "Assistant":
        """Load the base model once and attach the adapter; clear errors when either is missing."""
        loaded = load_for_inference(base_dir, resolve_hardware(params.model.quantization, params.model.dtype),
                                    adapter_dir)
        return cls(loaded.model, loaded.tokenizer, params)

    def question_prompt(self, question: str, context: str = "") -> list[int]:
        """Token ids of a PubMedQA-style prompt (the pipeline's format), the context cut to fit."""
        if not question.strip():
            raise PipelineError("type a question first")
        context = join_contexts([context])
        example = {
            "pmid": "question", "context": context,
            "prompt": self.format.prompt(self.system, user_message(question.strip(), [context])),
        }
        try:
            return fit_prompt(example, self.tokenizer, self.max_prompt_length)
        except PipelineError:  # the question alone does not fit (a long context is cut, never this)
            around = len(token_ids(self.tokenizer, self.format.prompt(self.system, user_message("", [""]))))
            raise PipelineError(f"question too long: about {len(token_ids(self.tokenizer, question))} tokens, "
                                f"the limit is {self.max_prompt_length - around}") from None

    def chat_prompt(self, history: list[dict[str, Any]], message: str) -> list[int]:
        """Token ids of a chat prompt: the last `chat.history_turns` exchanges, then `message`."""
        if not message.strip():
            raise PipelineError("type a message first")
        turns = recent_turns(history, self.history_turns)
        while True:
            ids = token_ids(self.tokenizer, self.format.conversation(self.system, turns, message.strip()))
            if len(ids) <= self.max_prompt_length:
                return ids
            if not turns:  # the message alone: said, not cut (a cut would lose the system prompt or the question)
                around = len(ids) - len(token_ids(self.tokenizer, message.strip()))
                raise PipelineError(f"message too long: about {len(ids) - around} tokens, "
                                    f"the limit is {self.max_prompt_length - around}")
            turns = turns[1:]  # too long: forget the oldest exchange first

    @contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        with self.lock, (nullcontext() if enabled else self.model.disable_adapter()):
            yield

    def decisions(self, prompt: list[int], adapter: bool, answer: str | None = None) -> dict[str, Decision]:
        """Each decision protocol's reading of one question, as the eval stages read it: protocol name
        -> (decision, P(yes/no/maybe) or None). Without the model's `answer`, only the protocols that
        need no generation."""
        with self._adapter(adapter):
            last = self._last_choice.get(adapter)
            if last is None or last[0] != tuple(prompt):
                last = (tuple(prompt), score_decisions(self.model, self.tokenizer, [prompt], self.answer_prefix, 1,
                                                       desc=None))
                self._last_choice[adapter] = last
            choice = last[1]
            after = (np.full_like(choice, np.nan) if answer is None else
                     score_after_answers(self.model, self.tokenizer, [prompt], [answer], self.answer_prefix, 1))
            if adapter not in self._priors:
                self._priors[adapter] = content_free_prior(self.model, self.tokenizer, self.prompt, self.model_name)
        evidence = DecisionEvidence([answer or ""], choice, after, self._priors[adapter], self.answer_prefix)
        readings = {}
        for protocol in PROTOCOLS:
            if answer is not None or not protocol.needs_generation:
                decisions, probs = protocol.read(evidence)
                readings[protocol.name] = (decisions[0], None if probs is None else dict(zip(DECISIONS, probs[0].tolist())))
        return readings

    def decision_probabilities(self, prompt: list[int], adapter: bool, answer: str | None = None) -> dict[str, float]:
        """P(yes/no/maybe) straight after the prompt and the answer prefix (`choice`), or, given the
        model's `answer`, after it and the prefix (`after_answer`)."""
        return self.decisions(prompt, adapter, answer)["choice" if answer is None else "after_answer"][1]

    def stream(self, prompt: list[int], config: GenerationConfig, adapter: bool) -> Iterator[str]:
        """The answer so far, growing token by token while the model generates in a worker thread."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop, failure = _Stop(), []
        ids = torch.tensor([prompt], device=model_device(self.model))

        def work() -> None:
            try:
                with self._adapter(adapter), torch.inference_mode():
                    torch.manual_seed(self.seed)
                    model_generate(self.model, self.tokenizer, config, input_ids=ids, attention_mask=torch.ones_like(ids),
                                   streamer=streamer, stopping_criteria=StoppingCriteriaList([stop]))
            except BaseException as exc:  # surfaced to the reader below, not lost in the thread
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text.lstrip()
        finally:
            stop.event.set()  # the reader stopped early: let the worker finish and free the lock
        worker.join()
        if failure:
            raise PipelineError(f"generation failed: {failure[0]}") from failure[0]
        yield text.strip()
