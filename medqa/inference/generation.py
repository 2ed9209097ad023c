"""Batched inference: left-padded greedy/sampled generation and log-likelihood scoring."""
from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from medqa.modeling.hardware import fsdp_enabled

if TYPE_CHECKING:
    from medqa.params import GenerationParams


def without_grad(fn: Callable) -> Callable:
    """Runs `fn` under torch.inference_mode, or under torch.no_grad where FSDP shards the model:
    tensors made in inference mode break FSDP's unshard of the parameters (the finetune stage
    scores the validation decisions with the FSDP-wrapped model)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad() if fsdp_enabled() else torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the left to one width (what decoder-only generation needs) and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _padded_batches(
    seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: Any, desc: str | None
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, ids, mask) of left-padded batches of similar length, with a progress bar in questions/s."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths waste less on padding
    with tqdm(total=len(seqs), desc=desc, unit="q", disable=desc is None) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = left_pad([seqs[i] for i in batch], pad_id, device)
            yield batch, ids, mask
            bar.update(len(batch))


def _tail_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Log-probabilities at the last `keep` positions; `logits_to_keep` spares the vocabulary
    projection everywhere else (no vocabulary-sized memory for long prompts)."""
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # models without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep:]
    return torch.log_softmax(logits.float(), dim=-1)


def _logprob_sum(logprobs: torch.Tensor, tokens: Sequence[int]) -> float:
    """The sum of `logprobs[j, tokens[j]]`: the log-likelihood of `tokens` given per-position log-probs."""
    index = torch.tensor(list(tokens), device=logprobs.device)[:, None]
    return logprobs.gather(-1, index).sum().item()


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


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
    model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, config: GenerationConfig, seed: int,
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
    for batch, ids, mask in _padded_batches(prompts, batch_size, tokenizer.pad_token_id, model_device(model), desc):
        for i, text in zip(batch, _generate_batch(model, tokenizer, ids, mask, config, seed)[0]):
            outputs[i] = text
    return outputs


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
    for batch, ids, mask in _padded_batches(seqs, batch_size, pad_id, device, desc):
        keep = max(len(continuations[i]) for i in batch) + 1
        logprobs = _tail_logprobs(model, ids, mask, keep)
        for row, i in enumerate(batch):
            # Logits at position p predict token p + 1: the continuation is the last n tokens.
            n = len(continuations[i])
            sums[i] = _logprob_sum(logprobs[row, keep - n - 1 : keep - 1], continuations[i])
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
    for batch, ids, mask in _padded_batches(prompts, batch_size, pad_id, model_device(model), desc):
        for i, row in zip(batch, _tail_logprobs(model, ids, mask, 1)[:, -1, option_ids].tolist()):
            scores[i] = row
    return scores


def _extension_logprobs(model: Any, cache: Any, prompt: Sequence[int], tokens: Sequence[int], keep: int) -> torch.Tensor:
    """Log-probabilities at the last `keep` positions of the prompt's last token + `tokens`, read
    from `cache` (which holds the prompt but its last token); the cache is cropped back after."""
    ids = torch.tensor([list(prompt[-1:]) + list(tokens)], device=model_device(model))
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=keep).logits[0]
    cache.crop(len(prompt) - 1 - cache.get_seq_length())
    return torch.log_softmax(logits.float(), dim=-1)


def _option_logliks(
    model: Any, cache: Any, prompt: Sequence[int], prefix: Sequence[int], options: Sequence[Sequence[int]]
) -> list[float]:
    """The log-likelihood of each option after the prompt (in `cache`) and `prefix`."""
    if all(len(o) == 1 for o in options):  # one extension by the prefix: its last position predicts them all
        last = _extension_logprobs(model, cache, prompt, prefix, keep=1)[-1]
        return [last[o[0]].item() for o in options]
    # Otherwise the last len(option) + 1 positions: all but the final one predict the option's tokens.
    return [_logprob_sum(_extension_logprobs(model, cache, prompt, list(prefix) + list(o), keep=len(o) + 1)[: len(o)], o)
            for o in options]


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
    choices = _option_logliks(model, cache, prompt, choice_prefix, options)
    target_loglik = _logprob_sum(_extension_logprobs(model, cache, prompt, target, keep=len(target) + 1)[: len(target)],
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


def _shared_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    shared = 0
    for a, b in zip(first, second):
        if a != b:
            break
        shared += 1
    return shared


def _after_answer_logliks(
    model: Any, batched: Any, row: int, width: int, prompt: Sequence[int], generated: Sequence[int],
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
    reused = _shared_prefix_length(generated, followup) if batched is not None else 0
    context = list(prompt) + list(followup[:reused])
    cache = _row_cache(model, batched, row, width - (len(prompt) - 1), width + reused)
    return _option_logliks(model, cache, context, followup[reused:], options), reused


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
    for batch, ids, mask in _padded_batches(prompts, batch_size, tokenizer.pad_token_id, model_device(model), desc):
        if all(i in done for i in batch):
            for i in batch:
                out.set_row(i, done[i])
            continue
        scored = score_and_decode_batch(model, tokenizer, [prompts[i] for i in batch], ids, mask, config,
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
    config: GenerationConfig,
    *,
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
    texts, new = _generate_batch(model, tokenizer, ids, mask, config, seed, cache, **generate_kwargs)
    for row, prompt in enumerate(prompts):
        out.generations[row] = texts[row]
        if followup is not None:
            with context(row):
                out.after_answer[row], out.after_answer_cached[row] = _after_answer_logliks(
                    model, cache, row, width, prompt, new[row].tolist(), followup(texts[row]), options)
    return out


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
        self._keep(min(_shared_prefix_length(self.ids, ids), len(prompt) - 1))  # read from the prompt's last token
        rest = ids[len(self.ids):]
        logits = self.model(input_ids=torch.tensor([rest], device=model_device(self.model)), cache=self.cache,
                            use_cache=True, logits_to_keep=len(shared) + 1).logits[0]
        self.ids = ids
        self.tokens_read += len(rest)
        self.tokens_asked += len(ids)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if all(len(o) == len(shared) + 1 for o in options):
            start = _logprob_sum(logprobs[:-1], shared) if shared else 0.0
            return [start + logprobs[-1, o[-1]].item() for o in options]
        # Options of other lengths extend a cache that holds the prompt but its last token.
        self._keep(len(prompt) - 1)
        return _option_logliks(self.model, self.cache, prompt, [], options)


def _shared_options_start(options: Sequence[Sequence[int]]) -> list[int]:
    """The leading tokens every option shares, leaving each at least its last token."""
    shortest = min(len(o) for o in options)
    shared = list(options[0][: shortest - 1])
    for option in options[1:]:
        shared = shared[: _shared_prefix_length(shared, option)]
    return shared
