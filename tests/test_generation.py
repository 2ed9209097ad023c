"""Batched generation and choice scoring against direct, unbatched computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medqa.inference.generation import generate, generate_and_score, generation_config
from medqa.inference.scoring import score_choices, score_choices_alone
from medqa.tokens import continuation_ids


def _direct_loglik(model, prompt: list[int], option: list[int]) -> float:
    ids = torch.tensor([prompt + option])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    return sum(logprobs[len(prompt) - 1 + k, tok].item() for k, tok in enumerate(option))


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["Is the sky blue?", "Does a short question work here as well, with more words?", "Yes or no:"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("words", [(" yes", " no", " maybe"), (" definitely yes", " no", " perhaps not")])
def test_choice_scores_match_direct_loglik(tokenizer, tiny_model, words):
    """Single-token options (read off the last logits) and multi-token ones (scored as continuations)."""
    prompts = _prompts(tokenizer)
    options = [continuation_ids(tokenizer, "answer is:", w) for w in words]
    assert all(len(o) == 1 for o in options) == (words[0] == " yes")
    scores = score_choices(tiny_model, prompts, options, pad_id=tokenizer.pad_token_id, batch_size=2)
    for prompt, row in zip(prompts, scores):
        expected = [_direct_loglik(tiny_model, prompt, o) for o in options]
        assert torch.allclose(torch.tensor(row), torch.tensor(expected), atol=1e-4)


@pytest.mark.parametrize("words", [(" yes", " no", " maybe"), (" definitely yes", " no", " perhaps not")])
def test_choices_read_one_prompt_at_a_time_equal_the_batched_ones_and_resume(tokenizer, tiny_model, words):
    """The eval stages' decision pass (each prompt alone, read from where it parts from the one before)
    scores what a padded batch scores; resumed, it reads only the prompts not done, and hands on each
    `batch_size` of them."""
    system = tokenizer("You answer medical questions from the context given.", add_special_tokens=False)["input_ids"]
    prompts = [system + p for p in _prompts(tokenizer)] + _prompts(tokenizer)[:1] + [system]
    options = [continuation_ids(tokenizer, "answer is:", w) for w in words]
    want = score_choices(tiny_model, prompts, options, pad_id=tokenizer.pad_token_id, batch_size=3, desc=None)
    batches = []
    got = score_choices_alone(tiny_model, prompts, options, desc=None, on_batch=batches.append, batch_size=2)
    assert np.allclose(got, want, atol=1e-4)
    assert [len(b) for b in batches] == [2, 2, 1] and {i for b in batches for i in b} == set(range(5))
    batches = []
    resumed = score_choices_alone(tiny_model, prompts, options, desc=None, on_batch=batches.append, batch_size=2,
                                  done={0: got[0], 3: got[3]})
    assert resumed == got or np.allclose(resumed, got, atol=1e-5)
    assert sorted(i for b in batches for i in b) == [1, 2, 4]


def test_batched_greedy_generation_equals_one_by_one(tokenizer, tiny_model):
    prompts = _prompts(tokenizer)
    greedy = generation_config(max_new_tokens=8)
    batched = generate(tiny_model, tokenizer, prompts, greedy, batch_size=3)
    single = [generate(tiny_model, tokenizer, [p], greedy, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) for t in batched) and any(batched)


def test_sampling_is_seeded(tokenizer, tiny_model):
    prompts = _prompts(tokenizer)
    sampled = generation_config(max_new_tokens=8, temperature=1.0, top_p=0.95)
    assert generate(tiny_model, tokenizer, prompts, sampled, batch_size=2, seed=1) == generate(
        tiny_model, tokenizer, prompts, sampled, batch_size=2, seed=1
    )


def _check_against_separate_passes(tokenizer, model, prompts, words, temperature, batch_size):
    prefix = tokenizer("The answer is:", add_special_tokens=False)["input_ids"]
    options = [continuation_ids(tokenizer, "The answer is:", w) for w in words]
    texts = ("It is blue. The answer is: yes.", "No.", "A longer reference answer with more tokens in it.", "Maybe")
    targets = [tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"] for i in range(len(prompts))]
    config = generation_config(max_new_tokens=8, temperature=temperature, top_p=0.95)
    sampling = dict(batch_size=batch_size, seed=3)
    def followup(text: str) -> list[int]:
        return tokenizer(f"{text} The answer is:", add_special_tokens=False)["input_ids"]

    scored = generate_and_score(
        model, tokenizer, prompts, config, choice_prefix=prefix, options=options, targets=targets, followup=followup,
        **sampling
    )
    assert scored.generations == generate(model, tokenizer, prompts, config, **sampling)
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        expected = [_direct_loglik(model, prompt + prefix, o) for o in options]
        assert torch.allclose(torch.tensor(scored.choices[i]), torch.tensor(expected), atol=1e-4)
        assert scored.target_loglik[i] == pytest.approx(_direct_loglik(model, prompt, target), abs=1e-3)
        # after_answer, read on the prompt's cached keys and values = the concatenated sequence from scratch
        after = [_direct_loglik(model, prompt + followup(scored.generations[i]), o) for o in options]
        assert torch.allclose(torch.tensor(scored.after_answer[i]), torch.tensor(after), atol=1e-4)
    assert all(n <= len(followup(text)) for n, text in zip(scored.after_answer_cached, scored.generations))
    return scored


@pytest.mark.parametrize("temperature, words", [
    (0.0, (" yes", " no", " maybe")), (1.0, (" yes", " no", " maybe")), (0.0, (" definitely yes", " no", " perhaps not")),
])
def test_one_prefill_gives_what_the_separate_passes_give(tokenizer, tiny_model, temperature, words):
    """generate_and_score prefills each prompt once and shares its KV cache between choice scoring, the
    reference answer's likelihood and batched generation (prompts of different lengths, stacked
    left-padded): the same answers as `generate`, the scores of direct computation."""
    assert all(len(o) == 1 for o in (continuation_ids(tokenizer, "The answer is:", w) for w in words)) == (
        words[0] == " yes")  # both scoring paths are covered
    scored = _check_against_separate_passes(tokenizer, tiny_model, _prompts(tokenizer), words, temperature, batch_size=2)
    if temperature == 0:  # greedy answers that re-tokenise alike: their tokens came out of the generation's cache
        assert sum(scored.after_answer_cached) > 0


@pytest.mark.parametrize("lengths", [(1, 1), (1, 5, 2)])
def test_one_token_prompts(tokenizer, tiny_model, lengths):
    """A one-token prompt has nothing to prefill: alone in its batch, or padded beside longer ones."""
    prompts = [list(range(100, 100 + n)) for n in lengths]
    _check_against_separate_passes(tokenizer, tiny_model, prompts, (" yes", " no", " maybe"), 0.0, batch_size=3)


def test_the_eval_stages_and_the_chat_app_read_after_answer_decisions_alike(tokenizer, tiny_model):
    """The eval stages' after_answer (from the generation's cache) equals the chat app's (from scratch)."""
    from medqa.decisions.answer_format import AnswerFormat
    from medqa.inference.decision_scorer import DecisionScorer

    prefix = "The answer to this question is:"
    prompts = _prompts(tokenizer)
    targets = [tokenizer(f"Because. {prefix} yes.", add_special_tokens=False)["input_ids"] for _ in prompts]
    scorer = DecisionScorer(tiny_model, tokenizer, AnswerFormat(prefix), max_prompt_length=512, batch_size=2)
    scored = scorer.answer_and_score(prompts, targets, generation_config(6), seed=0, desc=None)
    from_scratch = scorer.with_batch_size(3).after_answers(prompts, scored.generations)
    assert torch.allclose(torch.tensor(scored.after_answer, dtype=torch.float64), torch.from_numpy(from_scratch), atol=1e-4)
    # and a generation that already states the decision is scored where its own prefix stands
    stated = scorer.with_batch_size(1).after_answers(prompts[:1], [f"It is. {prefix} no. More."])
    cut = scorer.with_batch_size(1).after_answers(prompts[:1], ["It is."])
    assert torch.allclose(torch.from_numpy(stated), torch.from_numpy(cut))


def test_the_project_calls_no_deprecated_transformers_api(tokenizer, tiny_model, caplog):
    """transformers announces removals as FutureWarnings or through its logger; the eval stages' and
    the judge's calls (generation from a prefilled cache, cached scoring, shared-prefix scoring) and
    the chat app's peft-wrapped generation raise none of them."""
    import logging
    import warnings

    from peft import LoraConfig, get_peft_model

    from medqa.inference.scoring import SharedPrefixScorer

    prompts = _prompts(tokenizer)
    options = [continuation_ids(tokenizer, "answer is:", w) for w in (" yes", " no", " maybe")]
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("always")
        for model in (tiny_model, peft_model.eval()):
            generate_and_score(model, tokenizer, prompts, generation_config(max_new_tokens=4), choice_prefix=[],
                               options=options, targets=[[5, 6]] * len(prompts), batch_size=2,
                               followup=lambda text: [7, 8], desc=None)
            SharedPrefixScorer(model).option_logliks(prompts[1], options)
            generate(model, tokenizer, prompts[:1], generation_config(max_new_tokens=3), batch_size=1, desc=None)
    peft_model.unload()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "deprecated" in s.lower() or "will be removed" in s.lower()], said


def test_scoring_leaves_inference_mode_off_under_fsdp(tokenizer, tiny_model, monkeypatch):
    """Tensors made in inference mode break FSDP's unshard: under FSDP (the finetune stage's
    validation decisions) the scoring forward runs under no_grad instead."""
    modes: dict[str, list[tuple[bool, bool]]] = {}
    current: list[tuple[bool, bool]] = []
    hook = tiny_model.register_forward_pre_hook(
        lambda module, args: current.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    try:
        for fsdp in ("false", "true"):
            monkeypatch.setenv("ACCELERATE_USE_FSDP", fsdp)
            current.clear()
            score_choices(tiny_model, [[5, 6, 7]], [[8], [9]], pad_id=tokenizer.pad_token_id, batch_size=1)
            modes[fsdp] = list(current)
    finally:
        hook.remove()
    assert modes["false"] and set(modes["false"]) == {(True, False)}
    assert modes["true"] and set(modes["true"]) == {(False, False)}


def test_the_protocols_fit_what_they_declare_each_kind_of_prompt_read_once(tokenizer, tiny_model):
    """`DecisionScorer.fit`: the calibrated protocol's prior is its content-free prompts' mean probabilities,
    the offsets protocol's offsets are those `fit_offsets` finds on the validation questions' options; each
    kind of prompt is scored once; without validation questions the offsets cannot be fitted, said in one line."""
    from unittest import mock

    from medqa.decisions import protocols
    from medqa.decisions.answer_format import AnswerFormat
    from medqa.errors import PipelineError
    from medqa.inference.decision_scorer import DecisionScorer
    from medqa.params import PromptParams

    prompt = PromptParams("Answer.", None, "The answer is:", True)
    scorer = DecisionScorer(tiny_model, tokenizer, AnswerFormat.of(prompt), max_prompt_length=256, batch_size=2)
    val = [{"pmid": str(i), "prompt": f"Question {i}: is it so?", "context": "", "final_decision": d}
           for i, d in enumerate(["yes", "no", "maybe", "yes"])]
    with mock.patch.object(DecisionScorer, "after_prompts", autospec=True,
                           side_effect=DecisionScorer.after_prompts) as scored:
        fitted = scorer.fit(protocols.PROTOCOLS, prompt, "smollm2-135m-instruct", val)
    assert scored.call_count == 2  # the content-free prompts, then the validation questions
    assert set(fitted) == {p.name for p in protocols.PROTOCOLS if p.fit is not None} == {"calibrated", "offsets"}
    content_free = scorer.content_free(prompt, "smollm2-135m-instruct")
    assert fitted["calibrated"].prompts == len(protocols.CONTENT_FREE)
    assert np.allclose(fitted["calibrated"].values, protocols.content_free_prior(content_free))
    assert fitted["offsets"].prompts == len(val)
    assert np.array_equal(fitted["offsets"].values,
                          protocols.fit_offsets(scorer.after_examples(val, desc=None), np.array([0, 1, 2, 0])))
    with pytest.raises(PipelineError, match="no validation questions .* raise split.val_size"):
        scorer.fit(protocols.PROTOCOLS, prompt, "smollm2-135m-instruct", [])
