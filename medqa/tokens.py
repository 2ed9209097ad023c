"""Tokenising as the whole pipeline does it: prompts are rendered text whose chat template already
holds any special tokens, so no tokenizer call here adds its own."""
from __future__ import annotations

from typing import Any


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids of `text`, without the special tokens (BOS) a tokenizer would add."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
