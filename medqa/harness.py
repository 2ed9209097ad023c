"""The test questions as an lm-evaluation-harness task: the prompts the eval stages score, each with
the answer prefix, and yes/no/maybe as the choices, so `lm_eval` reads the decision the way the
`choice` protocol does (the most likely option straight after the prefix)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medqa.answers import DECISIONS
from medqa.errors import PipelineError
from medqa.prompts import fit_prompt
from medqa.tokens import token_ids

TASK = "pubmedqa_medqa"  # the task's name in lm_eval_tasks/pubmedqa_medqa.yaml
TASK_DIR = Path("lm_eval_tasks")  # what `lm_eval --include_path` takes


def harness_rows(examples: list[dict], tokenizer: Any, answer_prefix: str, max_prompt_length: int) -> list[dict]:
    """One row per test question: the prompt text as the eval stages feed it (the context cut to
    `max_prompt_length` tokens as they cut it) followed by the answer prefix, and the label's index
    in yes/no/maybe. Raises when the text would not tokenise back to the tokens the stages score."""
    prefix = token_ids(tokenizer, answer_prefix)
    rows = []
    for ex in examples:
        ids = fit_prompt(ex, tokenizer, max_prompt_length)
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) + answer_prefix
        if token_ids(tokenizer, text) != ids + prefix:
            raise PipelineError(
                f"pmid {ex['pmid']}: the prompt's text does not tokenise back to the tokens the eval stages "
                "score, so lm-eval would read another prompt"
            )
        rows.append({"pmid": ex["pmid"], "prompt": text, "label": DECISIONS.index(ex["final_decision"])})
    return rows
