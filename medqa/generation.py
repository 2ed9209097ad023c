"""Batched inference: left-padded greedy/sampled generation and choice scoring by log-likelihood."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def _length_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    # Batching prompts of similar length wastes less compute on padding.
    return sorted(range(len(prompts)), key=lambda i: len(prompts[i]))


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
    desc: str = "generating",
) -> list[str]:
    """Generate an answer for each tokenised prompt, in left-padded batches with the KV cache."""
    device = next(model.parameters()).device
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
    outputs: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="q") as bar:
        for batch in _batches(_length_order(prompts), batch_size):
            torch.manual_seed(seed)  # per batch, so a sampled answer does not depend on earlier batches
            ids, mask = _left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, device)
            out = model.generate(input_ids=ids, attention_mask=mask, **options)
            for i, row in zip(batch, out[:, ids.shape[1] :]):
                outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            bar.update(len(batch))
    return outputs


def _last_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits at the last position; `logits_to_keep` spares computing the vocabulary projection elsewhere."""
    try:
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits[:, -1, :].float()


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids that `continuation` adds after `context`, tokenised together (as lm-eval does)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if full[: len(ctx)] != ctx:  # the join merged tokens: fall back to separate tokenisation
        return tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return full[len(ctx) :]


@torch.inference_mode()
def score_choices(
    model: Any,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    desc: str = "scoring choices",
) -> list[list[float]]:
    """Log-likelihood of each option's tokens after each prompt: one forward pass per question.

    When every option is a single token, its log-probability is read off the logits at the last
    prompt position. Otherwise each option is appended and scored in the same batch.
    """
    device = next(model.parameters()).device
    single = all(len(o) == 1 for o in options)
    scores: list[list[float]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, unit="q") as bar:
        for batch in _batches(_length_order(prompts), batch_size):
            if single:
                ids, mask = _left_pad([prompts[i] for i in batch], pad_id, device)
                logits = _last_logits(model, ids, mask)
                logprobs = torch.log_softmax(logits, dim=-1)
                option_ids = torch.tensor([o[0] for o in options], device=device)
                for i, row in zip(batch, logprobs[:, option_ids].tolist()):
                    scores[i] = row
            else:
                seqs = [list(prompts[i]) + list(o) for i in batch for o in options]
                ids, mask = _left_pad(seqs, pad_id, device)
                logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                width = ids.shape[1]
                for row, (i, o) in enumerate((i, o) for i in batch for o in options):
                    positions = torch.arange(width - len(o) - 1, width - 1, device=device)
                    targets = torch.tensor(o, device=device)
                    scores[i].append(logprobs[row, positions, targets].sum().item())
            bar.update(len(batch))
    return scores
