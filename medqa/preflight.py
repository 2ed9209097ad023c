"""What check_params can check only against the data, the model or a library: the size caps fit their
splits, every example fits its token budget, and train.optim is an optimizer transformers knows. The
checks run the later stages' own functions (the format stage's prompt, the split stage's splits and
caps, the finetune stage's token budget, the eval stages' prompt cut) on the data source's records, so a
value that passes the params schema but not the data fails in check_params with the line the later stage
would print minutes later, prefixed with the key and value."""
from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from typing import Any

from medqa import paths
from medqa.data.sources import read_local_source
from medqa.data.splits import make_splits, validation_loss_examples
from medqa.errors import PipelineError
from medqa.modeling.loading import config_before_download, tokenizer_before_download
from medqa.modeling.profiles import context_window, get_profile
from medqa.params import Params
from medqa.prompting.prompts import fit_example, fit_prompt, format_record, prompt_format

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _for_key(key: str, value: Any) -> Iterator[None]:
    """A later stage's PipelineError, led by the param whose value made it."""
    try:
        yield
    except PipelineError as exc:
        raise PipelineError(f"{key} is {value!r}, which the data does not fit: {exc}") from None


def check_against_data_and_model(params: Params) -> None:
    """The size caps against the splits of a local data source, and (where the model's tokenizer can be
    read) every train and validation example within train.max_length and every evaluated prompt within
    eval.max_prompt_length. A hub data source is checked by the stages that download it."""
    source = read_local_source(params.data)
    if source is None:
        log.info("split sizes and token budgets not checked here: data.source %s is read by the download stage",
                 params.data.source)
        return
    records, labels = source
    tokenizer = tokenizer_before_download(get_profile(params.model.name), paths.BASE_MODEL)
    if tokenizer is not None:
        fmt = prompt_format(tokenizer, params.prompt, params.model.name)
        records = [format_record(r, fmt, params.prompt) for r in records]
    splits = make_splits(records, labels, params.split, params.train, params.eval)
    if tokenizer is not None:
        check_token_budgets(splits, tokenizer, params)


def check_token_budgets(splits: dict[str, list[dict]], tokenizer: Any, params: Params) -> None:
    """Every train example (and those the validation loss is taken on) within train.max_length, every
    test and validation prompt cut to eval.max_prompt_length: the finetune and eval stages' own cuts,
    run on the formatted `splits` (check_params for a local source; the split stage, on the downloaded
    data, for every source), each failure one line led by the key and its value."""
    train = params.train
    val_loss = validation_loss_examples(splits["val"], train, params.split.seed)
    with _for_key("train.max_length", train.max_length):
        for example in splits["train"] + val_loss:
            fit_example(example, tokenizer, train.max_length)
    with _for_key("eval.max_prompt_length", params.eval.max_prompt_length):
        for example in splits["test"] + splits["val"]:
            fit_prompt(example, tokenizer, params.eval.max_prompt_length)


def check_optimizer(optim: str) -> None:
    """train.optim is auto or an optimizer transformers' Trainer knows ("did you mean" for a typo). Not in
    SCHEMA: the list comes from transformers, seconds to import, so check_params checks it once (and only
    when it is set) rather than every stage's load_params."""
    if optim == "auto":
        return
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if optim not in known:
        close = difflib.get_close_matches(optim, known, n=1)
        raise PipelineError(f"train.optim is {optim!r}; expected auto or an optimizer of transformers' Trainer"
                            f"{' (did you mean ' + repr(close[0]) + '?)' if close else ''}: {', '.join(known)}")


def check_models_and_windows(params: Params) -> None:
    """model.name and judge.model are readable here (their configs, no weights: a mistyped hub id, or a
    model offline and not cached, fails now, not after fine-tuning), and every token budget fits its
    model's context window: a prompt and its generated answer (eval.max_prompt_length +
    generation.max_new_tokens) and a training example (train.max_length) the model's, the judge's
    abstract and both answers (judge.max_context_tokens + 2 x generation.max_new_tokens) the judge's."""
    downloaded = (paths.BASE_MODEL, paths.JUDGE_MODEL)
    configs = {"model.name": config_before_download(params.model.name, "model.name", downloaded)}
    configs["judge.model"] = (configs["model.name"] if params.judge.model == params.model.name
                              else config_before_download(params.judge.model, "judge.model", downloaded))
    new = params.generation.max_new_tokens
    budgets = [
        ("model.name", params.model.name, params.eval.max_prompt_length + new,
         f"eval.max_prompt_length ({params.eval.max_prompt_length}) + generation.max_new_tokens ({new})", ""),
        ("model.name", params.model.name, params.train.max_length, f"train.max_length ({params.train.max_length})", ""),
        ("judge.model", params.judge.model, params.judge.max_context_tokens + 2 * new,
         f"judge.max_context_tokens ({params.judge.max_context_tokens}) + 2 x generation.max_new_tokens ({new})",
         " (it reads the abstract and both answers at once)"),
    ]
    for key, name, tokens, what, why in budgets:
        window = context_window(configs[key])
        if window is not None and tokens > window:
            raise PipelineError(f"{what} is {tokens} tokens, more than the {window} positions {key} {name!r} can "
                                f"hold{why}: lower it")
