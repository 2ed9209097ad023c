"""Batched generation: greedy or sampled decoding of left-padded prompts, and the eval stages' and the chat
app's pass that generates the answers and scores the decision options and the reference from the same
KV cache."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig

from medqa.inference.core import (
    extension_logprobs,
    logprob_sum,
    model_device,
    option_logliks,
    padded_batches,
    shared_prefix_length,
    without_grad,
)

if TYPE_CHECKING:
    from medqa.params import GenerationParams


def generation_config(
    max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, repetition_penalty: float = 1.0
) -> GenerationConfig:
    """The generation settings: greedy when temperature is 0, else sampling with `temperature` and `top_p`."""
    if temperature > 0:
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty)
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=repetition_penalty)


def generation_config_from_params(generation: GenerationParams) -> GenerationConfig:
    """params.yaml's `generation` section as a GenerationConfig (its `seed` is passed on its own)."""
    return generation_config(generation.max_new_tokens, generation.temperature, generation.top_p,
                             generation.repetition_penalty)


def _end_token(model: Any, tokenizer: Any) -> int | list[int]:
    return model.generation_config.eos_token_id or tokenizer.eos_token_id


def end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a generated answer (the model's end tokens, else the tokenizer's)."""
    end = _end_token(model, tokenizer)
    return set(end) if isinstance(end, (list, tuple)) else {end}


def model_generate(model: Any, tokenizer: Any, config: GenerationConfig, **inputs: Any) -> torch.Tensor:
    """`model.generate` with `config`, its pad and end tokens filled in from the model and tokenizer."""
    config = copy.deepcopy(config)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = _end_token(model, tokenizer)
    return model.generate(**inputs, generation_config=config)


def _generate_batch(
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig, *, seed: int,
    cache: Any = None, **generate_kwargs: Any,
) -> tuple[list[str], torch.Tensor]:
    """The decoded new text of each row of a left-padded batch, continuing from `cache` if given,
    and the new tokens (rows that stopped early are padded)."""
    torch.manual_seed(seed)  # per batch, so a sampled answer does not depend on earlier batches
    new = model_generate(model, tokenizer, config, input_ids=ids, attention_mask=mask, cache=cache, **generate_kwargs)
    new = new[:, ids.shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new], new


@without_grad
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    batch_size: int,
    seed: int = 0,
    desc: str | None = "generating",
) -> list[str]:
    """Generate an answer for each tokenised prompt, in left-padded batches with the KV cache."""
    outputs: list[str] = [""] * len(prompts)
    for batch, ids, mask in padded_batches(prompts, batch_size, tokenizer.pad_token_id, model_device(model), desc):
        for i, text in zip(batch, _generate_batch(model, tokenizer, ids, mask, config, seed=seed)[0]):
            outputs[i] = text
    return outputs


def _prefill_and_score(
    model: Any, prompt: Sequence[int], choice_prefix: Sequence[int], options: Sequence[Sequence[int]],
    target: Sequence[int],
) -> tuple[Any, list[float], float]:
    """One prompt, alone (no padding to compute): its KV cache of all tokens but the last, the
    log-likelihood of each option after the prompt and `choice_prefix`, and that of its `target`.

    Each score extends the cache by the prompt's last token and a few more, then crops it back, so
    the prompt is read once.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if len(prompt) > 1:
        model(input_ids=torch.tensor([list(prompt[:-1])], device=model_device(model)), cache=cache,
              use_cache=True, logits_to_keep=1)
    choices = option_logliks(model, cache, prompt, choice_prefix, options)
    target_loglik = logprob_sum(extension_logprobs(model, cache, prompt, target, keep=len(target) + 1)[: len(target)],
                                 target) if target else 0.0
    return cache, choices, target_loglik


def _row_cache(model: Any, batched: Any, row: int, start: int, end: int) -> Any:
    """Cache slots `start:end` of row `row` of a batch's static cache, as a cache of its own."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if batched is None or end <= start:  # nothing cached (a one-token prompt)
        return cache
    for index, layer in enumerate(batched.layers):
        cache.update(layer.keys[row : row + 1, :, start:end], layer.values[row : row + 1, :, start:end], index)
    return cache


def _after_answer_logliks(
    model: Any, batched: Any, row: int, width: int, *, prompt: Sequence[int], generated: Sequence[int],
    followup: Sequence[int], options: Sequence[Sequence[int]],
) -> tuple[list[float], int]:
    """Each option's log-likelihood after the prompt and `followup`, for row `row` of a decoded batch.

    The batch's static cache holds the prompt but its last token in the `width` slots before `width`
    (left-padded), then, from `width` on, what decoding fed: the prompt's last token and the generated
    tokens. Where `followup` starts with the model's own tokens, their keys and values are read from
    there; only the rest of it (the answer prefix, and any text whose tokens differ) is computed.
    Returns the log-likelihoods and how many followup tokens came from the cache.
    """
    # Decoding wrote every generated token but the last into the cache: the followup's leading tokens
    # that equal the generated ones are there.
    reused = shared_prefix_length(generated, followup) if batched is not None else 0
    context = list(prompt) + list(followup[:reused])
    cache = _row_cache(model, batched, row, width - (len(prompt) - 1), width + reused)
    return option_logliks(model, cache, context, followup[reused:], options), reused


def _batch_cache(model: Any, caches: Sequence[Any], width: int, max_new_tokens: int) -> Any:
    """The prompts' caches left-padded to `width` tokens, stacked in one StaticCache with room for
    `max_new_tokens` more. A static cache is written in place at each decoding step, where a dynamic
    one would concatenate every layer's keys and values anew."""
    from transformers import StaticCache

    def stacked(states: list[torch.Tensor]) -> torch.Tensor:
        # (1, heads, length, head_dim) each; zeros on the left, masked out by the attention mask
        return torch.cat([torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0)) for t in states])

    batched = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    for index in range(len(caches[0].layers)):
        layers = [cache.layers[index] for cache in caches]
        batched.update(stacked([layer.keys for layer in layers]), stacked([layer.values for layer in layers]), index)
    return batched


@dataclass
class ScoredAnswers:
    """What `generate_and_score` returns, per prompt."""

    generations: list[str]
    choices: list[list[float]]  # each option's log-likelihood after the prompt and the choice prefix
    target_loglik: list[float]  # the summed log-likelihood of the reference target
    after_answer: list[list[float]]  # each option's log-likelihood after the prompt + followup(generation)
    after_answer_cached: list[int]  # how many followup tokens were read from the generation's cache

    def row(self, i: int) -> dict[str, Any]:
        """Prompt i's results, as one JSON-ready record (what a stage's progress keeps)."""
        return {field.name: getattr(self, field.name)[i] for field in dataclasses.fields(self)}

    def set_row(self, i: int, row: dict[str, Any]) -> None:
        for name, value in row.items():
            getattr(self, name)[i] = value


@without_grad
def generate_and_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    choice_prefix: Sequence[int],
    options: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int,
    seed: int = 0,
    followup: Callable[[str], Sequence[int]] | None = None,
    desc: str | None = "generating",
    done: dict[int, dict[str, Any]] | None = None,
    on_batch: Callable[[dict[int, dict[str, Any]]], None] | None = None,
) -> ScoredAnswers:
    """Per prompt: the generated answer, the log-likelihood of each option after `choice_prefix`, the
    summed log-likelihood of its reference `target` — reading each prompt once — and, with
    `followup`, each option's log-likelihood after the prompt and `followup(generated text)`.

    Each prompt is prefilled alone (no compute spent on padding); choice scoring and the target's
    likelihood extend its KV cache by a few tokens and crop it back. Then `batch_size` prompts'
    caches are stacked, left-padded, into one static cache and decoded together, where batching
    pays off. The followup is read on top of that static cache: the prompt's keys and values, and
    those of the generated tokens the followup starts with, so neither the prompt nor the model's own
    answer is read again (only the answer prefix is). Gives the same generations as
    `generate` and the same scores as `score_choices` and `continuation_logprobs` (up to rounding).

    Resuming: a batch whose prompts are all in `done` (prompt index -> `ScoredAnswers.row`) is
    taken from there, not computed; `on_batch` receives each computed batch's rows. The batches are
    the same in every run (by prompt length, then index) and each is seeded alone, so a resumed pass
    gives what an uninterrupted one gives.
    """
    out = ScoredAnswers([""] * len(prompts), [[] for _ in prompts], [0.0] * len(prompts), [[] for _ in prompts],
                        [0] * len(prompts))
    done = done or {}
    for batch, ids, mask in padded_batches(prompts, batch_size, tokenizer.pad_token_id, model_device(model), desc):
        if all(i in done for i in batch):
            for i in batch:
                out.set_row(i, done[i])
            continue
        scored = score_and_decode_batch(model, tokenizer, [prompts[i] for i in batch], ids, mask, config=config,
                                        choice_prefix=choice_prefix, options=options,
                                        targets=[targets[i] for i in batch], seed=seed, followup=followup)
        for row, i in enumerate(batch):
            out.set_row(i, scored.row(row))
        if on_batch is not None:
            on_batch({i: out.row(i) for i in batch})
    return out


@without_grad
def score_and_decode_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: GenerationConfig,
    choice_prefix: Sequence[int],
    options: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    seed: int = 0,
    followup: Callable[[str], Sequence[int]] | None = None,
    row_context: Callable[[int], Any] | None = None,
    on_choices: Callable[[list[list[float]]], None] | None = None,
    **generate_kwargs: Any,
) -> ScoredAnswers:
    """`generate_and_score` for one batch (`ids`, `mask`: the prompts left-padded, in this order).
    `row_context(row)`: a context manager each row's own forward passes (prefill, followup) run in —
    the chat app's adapter on or off; `on_choices` hears the choice log-likelihoods before decoding
    starts; `generate_kwargs` go to `generate` (a streamer, stopping criteria, peft's `adapter_names`)."""
    from contextlib import nullcontext

    context = row_context or (lambda row: nullcontext())
    out = ScoredAnswers([""] * len(prompts), [[] for _ in prompts], [0.0] * len(prompts), [[] for _ in prompts],
                        [0] * len(prompts))
    caches = []
    for row, prompt in enumerate(prompts):
        with context(row):
            cache, out.choices[row], out.target_loglik[row] = _prefill_and_score(model, prompt, choice_prefix, options,
                                                                                 targets[row])
        caches.append(cache)
    if on_choices is not None:
        on_choices(out.choices)
    width = ids.shape[1] - 1
    cache = _batch_cache(model, caches, width, config.max_new_tokens) if width else None
    del caches
    texts, new = _generate_batch(model, tokenizer, ids, mask, config, seed=seed, cache=cache, **generate_kwargs)
    for row, prompt in enumerate(prompts):
        out.generations[row] = texts[row]
        if followup is not None:
            with context(row):
                out.after_answer[row], out.after_answer_cached[row] = _after_answer_logliks(
                    model, cache, row, width, prompt=prompt, generated=new[row].tolist(), followup=followup(texts[row]),
                    options=options)
    return out


