"""The inference core every consumer shares: left-padded batches, log-probabilities at the last positions,
and option log-likelihoods read by extending a KV cache that holds a prompt (then cropped back), so the
eval stages' pass, the chat app's decoding and the judge's scorer read decisions the same way."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from medqa.modeling.hardware import fsdp_enabled


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


def padded_batches(
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


def tail_logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
    """Log-probabilities at the last `keep` positions; `logits_to_keep` spares the vocabulary
    projection everywhere else (no vocabulary-sized memory for long prompts)."""
    try:
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    except TypeError:  # models without logits_to_keep
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -keep:]
    return torch.log_softmax(logits.float(), dim=-1)


def logprob_sum(logprobs: torch.Tensor, tokens: Sequence[int]) -> float:
    """The sum of `logprobs[j, tokens[j]]`: the log-likelihood of `tokens` given per-position log-probs."""
    index = torch.tensor(list(tokens), device=logprobs.device)[:, None]
    return logprobs.gather(-1, index).sum().item()


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def extension_logprobs(model: Any, cache: Any, prompt: Sequence[int], tokens: Sequence[int], keep: int) -> torch.Tensor:
    """Log-probabilities at the last `keep` positions of the prompt's last token + `tokens`, read
    from `cache` (which holds the prompt but its last token); the cache is cropped back after."""
    ids = torch.tensor([list(prompt[-1:]) + list(tokens)], device=model_device(model))
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=keep).logits[0]
    cache.crop(len(prompt) - 1 - cache.get_seq_length())
    return torch.log_softmax(logits.float(), dim=-1)


def option_logliks(
    model: Any, cache: Any, prompt: Sequence[int], prefix: Sequence[int], options: Sequence[Sequence[int]]
) -> list[float]:
    """The log-likelihood of each option after the prompt (in `cache`) and `prefix`."""
    if all(len(o) == 1 for o in options):  # one extension by the prefix: its last position predicts them all
        last = extension_logprobs(model, cache, prompt, prefix, keep=1)[-1]
        return [last[o[0]].item() for o in options]
    # Otherwise the last len(option) + 1 positions: all but the final one predict the option's tokens.
    return [logprob_sum(extension_logprobs(model, cache, prompt, list(prefix) + list(o), keep=len(o) + 1)[: len(o)], o)
            for o in options]


def shared_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    shared = 0
    for a, b in zip(first, second):
        if a != b:
            break
        shared += 1
    return shared


