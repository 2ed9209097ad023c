"""Tokenising as the whole pipeline does it: prompts are rendered text whose chat template already
holds any special tokens, so no tokenizer call here adds its own."""
from __future__ import annotations

from typing import Any


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of `text`, without the special tokens (BOS) a tokenizer would add."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation_ids(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """Token ids that `continuation` adds after `context`, tokenised together (as lm-eval does)."""
    ctx = token_ids(tokenizer, context)
    full = token_ids(tokenizer, context + continuation)
    if full[: len(ctx)] != ctx:  # the join merged tokens: fall back to separate tokenisation
        return token_ids(tokenizer, continuation)
    return full[len(ctx) :]
