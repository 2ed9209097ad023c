"""Scoring without generating: the log-likelihood of continuations and of a question's options after many
prompts in a batch (`score_choices`), or one prompt at a time, each read from where it parts from the one
before (`SharedPrefixScorer`: the judge's prompts, and the eval stages' decisions by `score_choices_alone`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from medqa.inference.core import (
    logprob_sum,
    model_device,
    option_logliks,
    padded_batches,
    shared_prefix_length,
    tail_logprobs,
    without_grad,
)


@without_grad
def continuation_logprobs(
    model: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    desc: str | None = None,
) -> list[float]:
    """Summed log-probability of each continuation's tokens after its context."""
    device = model_device(model)
    seqs = [list(c) + list(o) for c, o in zip(contexts, continuations)]
    sums: list[float] = [0.0] * len(seqs)
    for batch, ids, mask in padded_batches(seqs, batch_size, pad_id, device, desc):
        keep = max(len(continuations[i]) for i in batch) + 1
        logprobs = tail_logprobs(model, ids, mask, keep)
        for row, i in enumerate(batch):
            # Logits at position p predict token p + 1: the continuation is the last n tokens.
            n = len(continuations[i])
            sums[i] = logprob_sum(logprobs[row, keep - n - 1 : keep - 1], continuations[i])
    return sums


@without_grad
def score_choices(
    model: Any,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    desc: str | None = "scoring choices",
) -> list[list[float]]:
    """Log-likelihood of each option's tokens after each prompt.

    When every option is a single token (the usual case), one forward pass per question reads all
    options' log-probabilities off the logits at the last prompt position. Otherwise each
    (prompt, option) pair is scored as a continuation.
    """
    if not all(len(o) == 1 for o in options):
        flat = continuation_logprobs(
            model, [p for p in prompts for _ in options], [o for _ in prompts for o in options],
            pad_id=pad_id, batch_size=batch_size, desc=desc,
        )
        return [flat[i * len(options) : (i + 1) * len(options)] for i in range(len(prompts))]
    option_ids = torch.tensor([o[0] for o in options], device=model_device(model))
    scores: list[list[float]] = [[] for _ in prompts]
    for batch, ids, mask in padded_batches(prompts, batch_size, pad_id, model_device(model), desc):
        for i, row in zip(batch, tail_logprobs(model, ids, mask, 1)[:, -1, option_ids].tolist()):
            scores[i] = row
    return scores


class SharedPrefixScorer:
    """Option log-likelihoods after many prompts in a row, each prompt read only from where it parts
    from the one before: prompts that share a long prefix (a judge's question, context and reference
    answer, then one answer under several criteria) pay for it once.

    One KV cache holds the previous prompt; a new prompt crops it back to the tokens both share and
    extends it by the rest, whose last position gives the next-token distribution.
    """

    def __init__(self, model: Any):
        self.model = model
        self.cache = self._new_cache()
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds
        self.tokens_read = 0  # prompt tokens computed, against those asked about
        self.tokens_asked = 0

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forget(self) -> None:
        """Start the next prompt from an empty cache: what follows does not depend on what came before."""
        self._keep(0)

    def _keep(self, keep: int) -> None:
        """Crop the cache to its first `keep` tokens."""
        if keep == len(self.ids):
            return
        if keep:
            self.cache.crop(keep - len(self.ids))  # a negative count: tokens to drop from the end
        else:
            self.cache = self._new_cache()
        self.ids = self.ids[:keep]

    @without_grad
    def option_logliks(self, prompt: Sequence[int], options: Sequence[Sequence[int]]) -> list[float]:
        """The log-likelihood of each option's tokens after `prompt` (as `score_choices` gives it).

        Options that differ only in their last token (" 1".." 4" may be a space, then the digit)
        take one forward pass: the tokens they share are read with the prompt.
        """
        shared = _shared_options_start(options)
        ids = list(prompt) + shared
        self._keep(min(shared_prefix_length(self.ids, ids), len(prompt) - 1))  # read from the prompt's last token
        rest = ids[len(self.ids):]
        logits = self.model(input_ids=torch.tensor([rest], device=model_device(self.model)), cache=self.cache,
                            use_cache=True, logits_to_keep=len(shared) + 1).logits[0]
        self.ids = ids
        self.tokens_read += len(rest)
        self.tokens_asked += len(ids)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if all(len(o) == len(shared) + 1 for o in options):
            start = logprob_sum(logprobs[:-1], shared) if shared else 0.0
            return [start + logprobs[-1, o[-1]].item() for o in options]
        # Options of other lengths extend a cache that holds the prompt but its last token.
        self._keep(len(prompt) - 1)
        return option_logliks(self.model, self.cache, prompt, [], options)


def _shared_options_start(options: Sequence[Sequence[int]]) -> list[int]:
    """The leading tokens every option shares, leaving each at least its last token."""
    shortest = min(len(o) for o in options)
    shared = list(options[0][: shortest - 1])
    for option in options[1:]:
        shared = shared[: shared_prefix_length(shared, option)]
    return shared


@without_grad
def score_choices_alone(
    model: Any,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    *,
    desc: str | None = "scoring choices",
    done: dict[int, list[float]] | None = None,
    on_batch: Callable[[dict[int, list[float]]], None] | None = None,
    batch_size: int = 32,
) -> list[list[float]]:
    """`score_choices`, each prompt prefilled alone: no compute on padding, which on a CPU costs more than
    batching saves (docs/benchmarks.md), and in the order of their tokens, so that each prompt is read
    from where it parts from the one before (`SharedPrefixScorer`): a system prompt and template shared by
    every prompt are read once.

    Resuming: prompts in `done` (prompt index -> its scores) are taken from there, not read; `on_batch`
    receives the scores of each `batch_size` prompts computed.
    """
    from tqdm.auto import tqdm

    done = done or {}
    scores: list[list[float]] = [done.get(i, []) for i in range(len(prompts))]
    scorer = SharedPrefixScorer(model)
    finished: dict[int, list[float]] = {}
    for i in tqdm(sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: list(prompts[i])),
                  desc=desc, unit="q", disable=desc is None):
        scores[i] = finished[i] = scorer.option_logliks(prompts[i], options)
        if len(finished) == batch_size:
            if on_batch is not None:
                on_batch(finished)
            finished = {}
    if finished and on_batch is not None:
        on_batch(finished)
    return scores
