"""Batched inference: left-padded greedy/sampled generation and log-likelihood scoring."""
from __future__ import annotations

import copy

from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
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
            ids, mask = _left_pad([seqs[i] for i in batch], pad_id, device)
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


def generation_options(
    model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
    repetition_penalty: float = 1.0,
) -> dict[str, Any]:
    """Keyword arguments for `model.generate`: greedy when temperature is 0, else sampling."""
    sample = temperature > 0
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sample,
        "repetition_penalty": repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": model.generation_config.eos_token_id or tokenizer.eos_token_id,
    }
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    else:  # silence warnings about sampling knobs that greedy decoding ignores
        options.update(temperature=None, top_p=None, top_k=None)
    return options


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    desc: str | None = "generating",
) -> list[str]:
    """Generate an answer for each tokenised prompt, in left-padded batches with the KV cache."""
    options = generation_options(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p, repetition_penalty=repetition_penalty)
    outputs: list[str] = [""] * len(prompts)
    for batch, ids, mask in _padded_batches(prompts, batch_size, tokenizer.pad_token_id, model_device(model), desc):
        torch.manual_seed(seed)  # per batch, so a sampled answer does not depend on earlier batches
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
        for i, row in zip(batch, out[:, ids.shape[1] :]):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return outputs


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids that `continuation` adds after `context`, tokenised together (as lm-eval does)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(ctx)] != ctx:  # the join merged tokens: fall back to separate tokenisation
        return tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return full[len(ctx) :]


@torch.inference_mode()
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


@torch.inference_mode()
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


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def _extension_logits(
    model: Any, cache: Any, last: torch.Tensor, mask: torch.Tensor, extensions: Sequence[Sequence[int]], pad_id: int,
    keep: int = 0,
) -> torch.Tensor:
    """Logits over each row's prompt extended by its `extensions` tokens (right-padded), reading the
    prompt from a copy of its KV cache, which holds all but the prompt's `last` token. Position j
    predicts extension token j; `keep` > 0 keeps only the last `keep` positions."""
    width = max(len(e) for e in extensions)
    ext = torch.full((len(extensions), 1 + width), pad_id, dtype=torch.long, device=last.device)
    ext_mask = torch.zeros_like(ext)
    ext[:, :1], ext_mask[:, :1] = last, 1
    for row, tokens in enumerate(extensions):
        ext[row, 1 : 1 + len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        ext_mask[row, 1 : 1 + len(tokens)] = 1  # right padding comes after every real token: it changes none
    full_mask = torch.cat([mask, ext_mask[:, 1:]], dim=1)
    return model(
        input_ids=ext, attention_mask=full_mask, position_ids=_position_ids(full_mask)[:, -ext.shape[1]:],
        past_key_values=copy.deepcopy(cache), use_cache=True, logits_to_keep=keep,
    ).logits


def _option_logprobs(
    model: Any, cache: Any, last: torch.Tensor, mask: torch.Tensor, prefix: Sequence[int],
    options: Sequence[Sequence[int]], pad_id: int,
) -> torch.Tensor:
    """Log-likelihood of each option after each row's prompt and `prefix`, shape (rows, options).

    Single-token options (the usual case) are read off one extension by the prefix; longer ones
    each extend the prompt by prefix + option and sum over the option's tokens.
    """
    rows = last.shape[0]
    if all(len(o) == 1 for o in options):
        # Every row's extension has the prefix's length: its last position predicts the option.
        logits = _extension_logits(model, cache, last, mask, [prefix] * rows, pad_id, keep=1)
        option_ids = torch.tensor([o[0] for o in options], device=logits.device)
        return torch.log_softmax(logits[:, -1].float(), dim=-1)[:, option_ids]
    columns = []
    for option in options:
        # The last len(option) + 1 positions: all but the final one predict the option's tokens.
        logits = _extension_logits(model, cache, last, mask, [list(prefix) + list(option)] * rows, pad_id,
                                   keep=len(option) + 1)
        logprobs = torch.log_softmax(logits[:, : len(option)].float(), dim=-1)
        columns.append(torch.tensor([_logprob_sum(logprobs[r], option) for r in range(rows)]))
    return torch.stack(columns, dim=1)


@torch.inference_mode()
def generate_and_score(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    choice_prefix: Sequence[int],
    options: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    desc: str | None = "generating",
) -> tuple[list[str], list[list[float]], list[float]]:
    """Per prompt: the generated answer, the log-likelihood of each option after `choice_prefix`, and
    the summed log-likelihood of its reference `target` — from one prefill of the prompt per batch.

    The prompt's KV cache (all tokens but the last) is computed once and shared: choice scoring and
    the target's likelihood extend copies of it by a few tokens, and generation continues from it.
    Gives the same generations as `generate` and the same scores as `score_choices` and
    `continuation_logprobs` (up to floating-point rounding), at about a third of the prompt compute.
    """
    from transformers import DynamicCache

    gen_options = generation_options(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_p=top_p, repetition_penalty=repetition_penalty)
    pad_id = tokenizer.pad_token_id
    generations: list[str] = [""] * len(prompts)
    choices: list[list[float]] = [[] for _ in prompts]
    target_loglik: list[float] = [0.0] * len(prompts)
    for batch, ids, mask in _padded_batches(prompts, batch_size, pad_id, model_device(model), desc):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=_position_ids(mask[:, :-1]),
              past_key_values=cache, use_cache=True, logits_to_keep=1)
        last = ids[:, -1:]
        option_lp = _option_logprobs(model, cache, last, mask, choice_prefix, options, pad_id)
        target_logits = _extension_logits(model, cache, last, mask, [targets[i] for i in batch], pad_id)
        for row, i in enumerate(batch):
            logprobs = torch.log_softmax(target_logits[row, : len(targets[i])].float(), dim=-1)
            target_loglik[i] = _logprob_sum(logprobs, targets[i])
            choices[i] = option_lp[row].tolist()
        del target_logits
        torch.manual_seed(seed)  # per batch, as in `generate`
        out = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **gen_options)
        for row, i in enumerate(batch):
            generations[i] = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True).strip()
    return generations, choices, target_loglik
