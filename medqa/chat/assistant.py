"""Answering one question or one chat message with the base model and the fine-tuned one.

One model in memory: the base weights with the LoRA adapter attached; the base model's answers
come from the same weights with the adapter off. One worker thread runs the model (`medqa.chat.batcher`):
what several readers ask at about the same moment — both panes of a compare, other users' questions
— is decoded as one batch, the rows with the adapter and those without it together (peft's
`adapter_names`), each reader's rows streamed back token by token.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig

from medqa.chat.batcher import Batcher, Request
from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.decisions.protocols import PROTOCOLS, DecisionEvidence, Fitted
from medqa.errors import PipelineError
from medqa.inference.core import left_pad, model_device
from medqa.inference.decision_scorer import DecisionScorer
from medqa.inference.generation import end_token_ids, score_and_decode_batch
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.loading import load_for_inference
from medqa.params import Params
from medqa.prompting.prompts import fit_prompt, join_contexts, prompt_format, user_message
from medqa.tokens import token_ids

# The protocols the app reads: not those fitted on validation questions, which only the eval stages read.
CHAT_PROTOCOLS = tuple(p for p in PROTOCOLS if p.fit is None or p.fit.on != "validation")


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


@dataclass(frozen=True)
class Row:
    """One answer to generate: its prompt's token ids, whether the adapter is on, and whether the
    decision protocols read it (a compare pane) or not (a chat reply)."""

    prompt: tuple[int, ...]
    adapter: bool
    readings: bool = False


@dataclass
class Update:
    """A request's rows so far: each row's text; each row's decision readings (None where not
    asked for; before the answer, the protocols that need none; then every protocol); whether it is
    the last update."""

    texts: list[str]
    readings: list[dict[str, Decision] | None]
    done: bool = False


class Assistant:
    """The base model with its adapter, the prompt format of the pipeline, and the answer functions."""

    def __init__(self, model: Any, tokenizer: Any, params: Params):
        self.model = model
        self.tokenizer = tokenizer
        self.system = params.prompt.system
        self.answer_format = AnswerFormat.of(params.prompt)
        self.max_prompt_length = params.eval.max_prompt_length
        # One question at a time, as the eval stages score it (their prompt budget and answer format).
        self.scorer = DecisionScorer(model, tokenizer, self.answer_format, self.max_prompt_length, batch_size=1)
        self.history_turns = params.chat.history_turns
        self.seed = params.generation.seed  # each answer is seeded alike: sampled answers can be reproduced
        self.prompt, self.model_name = params.prompt, params.model.name
        self.format = prompt_format(tokenizer, params.prompt, params.model.name)
        self._fitted: dict[bool, dict[str, Fitted]] = {}  # what the protocols fit, with the adapter on and off
        self.lock = threading.Lock()  # the batcher's worker and direct `decisions` calls take turns
        self.batcher = Batcher(self._run_batch, params.chat.batch_rows, params.chat.batch_wait_s)

    @classmethod
    def load(cls, params: Params, base_dir: str | Path, adapter_dir: str | Path) -> Assistant:
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
        with nullcontext() if enabled else self.model.disable_adapter():
            yield

    def _fits(self, adapter: bool) -> dict[str, Fitted]:
        """What the protocols fit (the content-free prior), with the adapter on or off (computed once; call
        it outside `_adapter`: peft's disable_adapter does not nest)."""
        if adapter not in self._fitted:
            with self._adapter(adapter):
                self._fitted[adapter] = self.scorer.fit(CHAT_PROTOCOLS, self.prompt, self.model_name)
        return self._fitted[adapter]

    def _read(self, fitted: dict[str, Fitted], choice: np.ndarray, after: np.ndarray | None = None,
              answers: list[str] | None = None) -> list[dict[str, Decision]]:
        """Each question's reading by every decision protocol from its `choice` log-likelihoods, and,
        given the model's `answers` and the log-likelihoods `after` them, the protocols that need the
        answer too."""
        evidence = DecisionEvidence(choice, self.answer_format, answers, after, fitted)
        readings: list[dict[str, Decision]] = [{} for _ in choice]
        for protocol in CHAT_PROTOCOLS:
            if answers is not None or not protocol.needs_generation:
                decisions, probs = protocol.read(evidence, fitted.get(protocol.name))
                for i, reading in enumerate(readings):
                    reading[protocol.name] = (decisions[i],
                                              None if probs is None else dict(zip(DECISIONS, probs[i].tolist())))
        return readings

    def decisions(self, prompt: list[int], adapter: bool, answer: str | None = None) -> dict[str, Decision]:
        """Each decision protocol's reading of one question, as the eval stages read it: protocol name
        -> (decision, P(yes/no/maybe) or None). Without the model's `answer`, only the protocols that
        need no generation."""
        with self.lock, torch.inference_mode():
            fitted = self._fits(adapter)
            with self._adapter(adapter):
                choice = self.scorer.after_prompts([prompt])
                after = None if answer is None else self.scorer.after_answers([prompt], [answer])
            return self._read(fitted, choice, after, None if answer is None else [answer])[0]

    def decision_probabilities(self, prompt: list[int], adapter: bool, answer: str | None = None) -> dict[str, float]:
        """P(yes/no/maybe) straight after the prompt and the answer prefix (`choice`), or, given the
        model's `answer`, after it and the prefix (`after_answer`)."""
        return self.decisions(prompt, adapter, answer)["choice" if answer is None else "after_answer"][1]

    def answer(self, rows: list[Row], config: GenerationConfig) -> Iterator[Update]:
        """The answers to `rows`, growing token by token: decoded in one batch with whatever other
        readers ask at the same moment with the same settings. Closing the iterator stops its rows."""
        return self.batcher.submit(rows, config)

    def stream(self, prompt: list[int], config: GenerationConfig, adapter: bool) -> Iterator[str]:
        """One answer so far, growing token by token (`answer` for a single row)."""
        for update in self.answer([Row(tuple(prompt), adapter)], config):
            yield update.texts[0]

    def _run_batch(self, requests: list[Request[Row]]) -> None:
        """The batcher's worker, the eval stages' way (`score_and_decode_batch`): each row's prompt
        prefilled alone with its adapter setting, which gives its choice readings (sent before the
        answer streams); then one decode of all rows from their stacked caches, the adapter on for
        some rows and off for others, streamed to their readers; then the readings after each answer,
        read on top of the same cache."""
        from transformers import StoppingCriteriaList

        rows = [row for request in requests for row in request.rows]
        prompts = [list(row.prompt) for row in rows]
        batch = _BatchRows(self.tokenizer, requests, end_token_ids(self.model, self.tokenizer))
        with self.lock, torch.inference_mode():
            fits = {row.adapter: self._fits(row.adapter) for row in rows if row.readings}

            def readings(choices: list[list[float]], after: list[list[float]] | None = None,
                         answers: list[str] | None = None) -> None:
                batch.set_readings([
                    self._read(fits[row.adapter], np.array([choices[i]]),
                               None if after is None else np.array([after[i]]),
                               None if answers is None else [answers[i]])[0] if row.readings else None
                    for i, row in enumerate(rows)])

            def show_choices(choices: list[list[float]]) -> None:
                readings(choices)
                batch.send()

            ids, mask = left_pad(prompts, self.tokenizer.pad_token_id, model_device(self.model))
            scored = score_and_decode_batch(
                self.model, self.tokenizer, prompts, ids, mask, config=requests[0].settings,
                targets=[[] for _ in rows], seed=self.seed,  # per batch: an answer asked alone can be reproduced
                **self.scorer.reading(),  # the eval stages' way of reading the options
                row_context=lambda i: self._adapter(rows[i].adapter), on_choices=show_choices,
                streamer=batch, stopping_criteria=StoppingCriteriaList([batch.cancelled]),
                adapter_names=[self.model.active_adapter if row.adapter else BASE for row in rows])
            readings(scored.choices, scored.after_answer, batch.texts(done=True))
        batch.send(done=True)


BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch


class _BatchRows:
    """A batch's generated tokens, split by row and sent to each row's request as text after every
    decoding step (transformers' streamer protocol: `put` receives the prompt, then each step's
    tokens); also the stopping criterion that ends the rows of a request whose reader went away."""

    def __init__(self, tokenizer: Any, requests: list[Request[Row]], end_ids: set[int]):
        self.tokenizer, self.requests, self.end_ids = tokenizer, requests, end_ids
        self.owners = [request for request in requests for _ in request.rows]
        self.tokens: list[list[int]] = [[] for _ in self.owners]
        self.ended = [False] * len(self.owners)
        self.readings: list[dict[str, Decision] | None] = [None] * len(self.owners)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if not self.ended[i]:
                self.ended[i] = token in self.end_ids  # a finished row is padded from here on
                if not self.ended[i]:
                    self.tokens[i].append(token)
        self.send()

    def end(self) -> None:
        pass

    def cancelled(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([owner.cancelled.is_set() for owner in self.owners], dtype=torch.bool,
                            device=input_ids.device)

    def set_readings(self, readings: list[dict[str, Decision] | None]) -> None:
        self.readings = readings

    def texts(self, done: bool = False) -> list[str]:
        texts = [self.tokenizer.decode(tokens, skip_special_tokens=True) for tokens in self.tokens]
        return [text.strip() if done else text.lstrip() for text in texts]

    def send(self, done: bool = False) -> None:
        texts, start = self.texts(done), 0
        for request in self.requests:
            end = start + len(request.rows)
            request.send(Update(texts[start:end], self.readings[start:end], done))
            start = end
