"""Prompt rendering with the model's chat template or a string template, and context fitting."""
from __future__ import annotations

import pytest

from medqa.decisions.answer_format import AnswerFormat
from medqa.errors import PipelineError
from medqa.params import PromptParams
from medqa.prompting.prompts import PromptFormat, fit_prompt, format_record, prompt_id
from medqa.training.examples import tokenize_example

RECORD = {
    "pmid": "42",
    "question": "Does aspirin prevent headaches?",
    "contexts": ["Aspirin was given to 100 adults.", "Headaches fell by half."],
    "long_answer": "Aspirin halved headache frequency.",
    "final_decision": "yes",
}
PREFIX = "The direct answer to your question is:"
ANSWER = AnswerFormat(PREFIX)


def test_chat_template_prompt_and_target(tokenizer):
    fmt = PromptFormat(tokenizer)
    ex = format_record(RECORD, fmt, PromptParams("Be careful.", None, PREFIX, False))
    assert ex["prompt"] == (
        "<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\nQuestion: Does aspirin prevent headaches?\n"
        "Context: Aspirin was given to 100 adults. Headaches fell by half.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ex["target"] == "Aspirin halved headache frequency. The direct answer to your question is: yes.<|im_end|>"
    assert ex["prompt_id"] == prompt_id(ex["prompt"]) and len(ex["prompt_id"]) == 12


def test_string_template_for_base_models_ends_with_eos(tokenizer):
    fmt = PromptFormat(tokenizer, "<s>[INST] {system}\n\n{user} [/INST] ")
    ex = format_record(RECORD, fmt, PromptParams("Be careful.", None, PREFIX, False))
    assert ex["prompt"].startswith("<s>[INST] Be careful.\n\nQuestion: Does aspirin")
    assert ex["prompt"].endswith(" [/INST] ")
    assert ex["target"].endswith(f"yes.{tokenizer.eos_token}")
    with pytest.raises(PipelineError, match="must contain {user}"):
        PromptFormat(tokenizer, "[INST] {system} [/INST]")


def test_answer_only_loss_mask_decodes_to_the_target(tokenizer):
    ex = format_record(RECORD, PromptFormat(tokenizer), PromptParams("Be careful.", None, PREFIX, False))
    item = tokenize_example(ex, tokenizer, max_length=512)
    answer = [t for t, label in zip(item["input_ids"], item["labels"]) if label != -100]
    assert tokenizer.decode(answer) == ex["target"]
    assert item["labels"][: item["labels"].index(answer[0])] == [-100] * item["labels"].index(answer[0])
    assert len(item["input_ids"]) == len(item["attention_mask"]) == len(item["labels"])


def test_truncation_cuts_the_context_and_keeps_question_and_target(tokenizer):
    long = dict(RECORD, contexts=["Aspirin trial details. " * 200])
    ex = format_record(long, PromptFormat(tokenizer), PromptParams("Be careful.", None, PREFIX, False))
    item = tokenize_example(ex, tokenizer, max_length=160)
    assert len(item["input_ids"]) <= 160
    text = tokenizer.decode(item["input_ids"])
    assert "Question: Does aspirin prevent headaches?" in text
    assert text.endswith(ex["target"]) and text.count("Aspirin trial details.") < 200
    assert "<|im_start|>assistant\n" in text
    assert len(fit_prompt(ex, tokenizer, 100)) <= 100


def test_prompt_that_cannot_fit_is_a_clear_error(tokenizer):
    ex = format_record(RECORD, PromptFormat(tokenizer), PromptParams("Be careful. " * 100, None, PREFIX, False))
    with pytest.raises(PipelineError, match="pmid 42: the prompt needs"):
        fit_prompt(ex, tokenizer, 50)


def test_decision_first_target_and_the_long_answer_either_way(tokenizer):
    ex = format_record(RECORD, PromptFormat(tokenizer), PromptParams("Be careful.", None, PREFIX, True))
    assert ex["target"] == "The direct answer to your question is: yes. Aspirin halved headache frequency.<|im_end|>"
    for generation in ("The direct answer to your question is: yes. Aspirin halved it.",
                       "Aspirin halved it. The direct answer to your question is: Yes.",
                       "Aspirin halved it. The direct answer to your question is:"):
        assert ANSWER.long_answer(generation) == "Aspirin halved it."
        assert ANSWER.parse(generation) in ("yes", "none")
    assert ANSWER.long_answer("The direct answer to your question is: no.") == ""
    assert ANSWER.parse("The direct answer to your question is: no. It did not help.") == "no"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Long answer. The direct answer to your question is: Maybe.", "maybe"),
        ("No doubt it helps. The direct answer to your question is: yes.", "yes"),
        ("The direct answer to your question is: A. no", "no"),
        ("Yes, it does.", "yes"),
        ("The study is inconclusive.", "none"),
        ("", "none"),
        ("Nobody knows; the answer is no", "no"),
    ],
)
def test_parse_decision(text, expected):
    assert ANSWER.parse(text) == expected


def test_after_answer_text_is_the_answer_up_to_its_first_prefix():
    cases = {  # generation -> (the text the options follow, where it was cut)
        "Aspirin halved it. The direct answer to your question is: yes. More.":
            ("Aspirin halved it. The direct answer to your question is:", "its answer prefix"),
        "THE DIRECT ANSWER TO YOUR QUESTION IS: no.": ("The direct answer to your question is:", "its answer prefix"),
        "Aspirin halved it.": ("Aspirin halved it. The direct answer to your question is:", "its end"),
    }
    for generation, (context, at) in cases.items():
        assert (ANSWER.after_answer_context(generation), ANSWER.after_answer_at(generation)) == (context, at)
