"""The test questions as an lm-evaluation-harness task: the prompts the eval stages score, each with
the answer prefix, and yes/no/maybe as the choices, so `lm_eval` reads the decision the way the
`choice` protocol does (the most likely option straight after the prefix)."""
from __future__ import annotations

import logging
from typing import Any

from medqa.decisions.answer_format import DECISIONS, AnswerFormat
from medqa.prompting.prompts import fit_prompt_text
from medqa.tokens import token_ids

log = logging.getLogger(__name__)


def harness_rows(examples: list[dict], tokenizer: Any, answer_format: AnswerFormat, max_prompt_length: int) -> list[dict]:
    """One row per test question: the prompt text the eval stages tokenise (the context cut to
    `max_prompt_length` tokens as they cut it) followed by the answer prefix, and the label's index in
    yes/no/maybe. lm-eval tokenises that text in one piece where the stages join the prompt's and the
    prefix's tokens; where a tokenizer joins them differently (SentencePiece at the seam), a warning
    says for how many questions."""
    prefix = answer_format.prefix_ids(tokenizer)
    rows, differ = [], 0
    for ex in examples:
        text = fit_prompt_text(ex, tokenizer, max_prompt_length)
        prompt = answer_format.with_prefix(text)
        differ += token_ids(tokenizer, prompt) != token_ids(tokenizer, text) + prefix
        rows.append({"pmid": ex["pmid"], "prompt": prompt, "label": DECISIONS.index(ex["final_decision"])})
    if differ:
        log.warning("%d of %d prompts tokenise differently in one piece than as prompt + answer prefix: lm-eval "
                    "reads them slightly differently from the eval stages", differ, len(rows))
    return rows
