"""Prompt building: the one place that turns a PubMedQA record into a prompt and a target."""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from medqa.decisions.answer_format import AnswerFormat
from medqa.errors import PipelineError
from medqa.modeling.profiles import get_profile
from medqa.tokens import token_ids

if TYPE_CHECKING:
    from medqa.params import PromptParams


def user_message(question: str, contexts: list[str]) -> str:
    """The user turn, as in the reference notebook: the question, then all passages joined by spaces."""
    return f"Question: {question}\nContext: {join_contexts(contexts)}"


def join_contexts(contexts: list[str]) -> str:
    return " ".join(c.strip() for c in contexts if c and c.strip())


def prompt_id(prompt: str) -> str:
    """A short stable id of a rendered prompt, so a saved answer can be tied to its exact prompt."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


class PromptFormat:
    """Renders (system, user) into the model's prompt text and knows the end-of-turn marker.

    With `template` (a string with `{system}` and `{user}`) it is used as is and the turn ends with
    the tokenizer's EOS token; without one, the tokenizer's own chat template is used.
    """

    def __init__(self, tokenizer: Any, template: str | None = None):
        self.tokenizer = tokenizer
        self.template = template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise PipelineError(
                "the tokenizer has no chat template: set prompt.template (e.g. "
                "'<s>[INST] {system}\\n\\n{user} [/INST] ') for this base model"
            )
        if template is not None and ("{user}" not in template):
            raise PipelineError("prompt.template must contain {user} (and may contain {system})")
        self.end_of_turn = self._end_of_turn()

    def _chat(self, system: str, user: str, answer: str | None = None) -> str:
        messages = [{"role": "user", "content": user}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return self._render(system, messages)

    def _render(self, system: str, messages: list[dict[str, str]]) -> str:
        """The chat template over a system turn and `messages`, open for the assistant's reply
        unless the last message is the assistant's."""
        open_turn = messages[-1]["role"] != "assistant"
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, *messages], tokenize=False, add_generation_prompt=open_turn
            )
        except Exception:
            # Some templates (e.g. Mistral's, Gemma's) reject a system turn: fold it into the first user turn.
            merged = [{"role": "user", "content": f"{system}\n\n{messages[0]['content']}"}, *messages[1:]]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=open_turn)

    def _end_of_turn(self) -> str:
        eos = self.tokenizer.eos_token or ""
        if self.template is not None:
            return eos
        marker = "\x00ANSWER\x00"
        prompt = self._chat("s", "u")
        full = self._chat("s", "u", marker)
        if full.startswith(prompt) and marker in full:
            tail = full[full.index(marker) + len(marker):].rstrip()
            return tail or eos
        return eos

    def prompt(self, system: str, user: str) -> str:
        """The text up to where the model's answer starts."""
        if self.template is not None:
            return self.template.format(system=system, user=user)
        return self._chat(system, user)

    def conversation(self, system: str, turns: list[tuple[str, str]], user: str) -> str:
        """The prompt for `user`'s message after earlier (user, assistant) turns.

        With a chat template the turns are real chat turns; a plain string template has no turns,
        so the earlier exchanges are quoted in the user message instead.
        """
        if self.template is not None:
            if turns:
                quoted = "\n".join(f"User: {u}\nAssistant: {a}" for u, a in turns)
                user = f"Earlier in this conversation:\n{quoted}\n\n{user}"
            return self.prompt(system, user)
        messages = [
            {"role": role, "content": text} for u, a in turns for role, text in (("user", u), ("assistant", a))
        ]
        return self._render(system, [*messages, {"role": "user", "content": user}])


def prompt_format(tokenizer: Any, prompt: PromptParams, model_name: str) -> PromptFormat:
    """The one way a model's prompt format is chosen, for the format stage and the chat app alike:
    `prompt.template` if set, else the model profile's template (base models whose tokenizer has no
    chat template), else the tokenizer's chat template."""
    return PromptFormat(tokenizer, prompt.template or get_profile(model_name).template)


def format_record(record: dict, fmt: PromptFormat, prompt_params: PromptParams) -> dict:
    """A formatted example: the record's ids and references plus the rendered prompt (the system prompt
    of `prompt_params`) and target (in its answer format)."""
    context = join_contexts(record["contexts"])
    prompt = fmt.prompt(prompt_params.system, user_message(record["question"], record["contexts"]))
    return {
        "pmid": record["pmid"],
        "prompt_id": prompt_id(prompt),
        "question": record["question"],
        "context": context,
        "long_answer": record["long_answer"],
        "final_decision": record["final_decision"],
        "prompt": prompt,
        "target": AnswerFormat.of(prompt_params).target(record["long_answer"], record["final_decision"])
        + fmt.end_of_turn,
    }


def content_free_prompts(fmt: PromptFormat, system: str, fillers: tuple[str, ...]) -> list[str]:
    """The prompt with each filler as both the question and the context: what a model answers with
    no content to go on (for contextual calibration)."""
    return [fmt.prompt(system, user_message(filler, [filler])) for filler in fillers]


def fit_prompt(example: dict, tokenizer: Any, budget: int) -> list[int]:
    """Token ids of the example's prompt, with its context cut (never the question) to fit `budget`
    (eval.max_prompt_length)."""
    return _fitted(example, tokenizer, budget)[1]


def fit_example(example: dict, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the example's prompt and target within `max_length` (train.max_length) together:
    the context is cut, never the target."""
    target = token_ids(tokenizer, example["target"])
    if len(target) >= max_length:
        raise PipelineError(
            f"pmid {example['pmid']}: the answer alone is {len(target)} tokens; raise train.max_length above it"
        )
    return _fitted(example, tokenizer, max_length - len(target), "train.max_length")[1], target


def fit_prompt_text(example: dict, tokenizer: Any, budget: int) -> str:
    """The example's prompt text, with its context cut (never the question) so that it tokenises
    to at most `budget` tokens: the text whose tokens `fit_prompt` returns."""
    return _fitted(example, tokenizer, budget)[0]


def _fitted(example: dict, tokenizer: Any, budget: int, budget_key: str = "eval.max_prompt_length"
            ) -> tuple[str, list[int]]:
    """The prompt text cut to fit `budget` tokens (the one `budget_key` sets), and its token ids."""
    ids = token_ids(tokenizer, example["prompt"])
    excess = len(ids) - budget
    if excess <= 0:
        return example["prompt"], ids
    context_ids = token_ids(tokenizer, example["context"])
    keep = len(context_ids) - excess
    while True:
        if keep <= 0 or example["context"] not in example["prompt"]:
            raise PipelineError(
                f"pmid {example['pmid']}: the prompt needs {len(ids)} tokens but only {budget} fit even with "
                f"its context cut: raise {budget_key}"
            )
        short = tokenizer.decode(context_ids[:keep], skip_special_tokens=True)
        text = example["prompt"].replace(example["context"], short, 1)
        cut = token_ids(tokenizer, text)
        if len(cut) <= budget:
            return text, cut
        # Re-tokenising at the cut can merge or split a token or two: cut a little more.
        keep -= len(cut) - budget


def cut_to_tokens(text: str, tokenizer: Any, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (" ..." marks a cut)."""
    ids = token_ids(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).rstrip() + " ..."
