"""The browser app: the base and the fine-tuned model side by side, and a chat with the fine-tuned one.

    python -m medqa.chat.app [--host 127.0.0.1] [--port 7860] [--share]      (or: make chat)
    python -m medqa.chat.app --host 0.0.0.0 --ssl-certfile cert.pem --ssl-keyfile key.pem

Loads the base model named in params.yaml (models/base) and the adapter in models/adapter (from
`dvc repro` or `dvc pull finetune`) once, and serves a Gradio app on 127.0.0.1 by default; on any
other address, or with a share link, only to the users whose passwords the environment gives, and
beyond loopback over HTTPS only (unless told `--insecure-http`), with repeated failed logins slowed.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medqa import paths
from medqa.chat.access import LoginThrottle, check_transport, credentials
from medqa.chat.assistant import Assistant, Decision, Row
from medqa.decisions.answer_format import DECISIONS
from medqa.decisions.protocols import PRIMARY, PROTOCOLS
from medqa.errors import PipelineError, command_main
from medqa.inference.generation import generation_config
from medqa.io import read_jsonl
from medqa.params import GenerationParams, load_params

if TYPE_CHECKING:
    from transformers import GenerationConfig

log = logging.getLogger(__name__)

NOTICE = (
    "**Research tool, not medical advice.** These models were fine-tuned on a small set of "
    "PubMedQA abstracts; their answers can be wrong or invented. Do not use them to make decisions about anyone's health."
)


def load_test_questions(path: str | Path) -> dict[str, dict]:
    """The test split's formatted examples by pmid ({} when the split stage has not run)."""
    return {ex["pmid"]: ex for ex in read_jsonl(path)} if Path(path).exists() else {}


def _probabilities(probs: dict[str, float]) -> str:
    return " · ".join(f"{d} {probs[d]:.2f}" for d in DECISIONS)


PANE_PROTOCOL = "after_answer"  # the pane's decision: read after the streamed answer, in the order the target teaches


def decision_markdown(readings: dict[str, Decision], at_choice: bool = False) -> str:
    """The pane's decision (`PANE_PROTOCOL`, read after the model's streamed answer) in bold, with every
    other protocol's reading beside it (`Assistant.decisions`); while the answer is still streaming,
    the protocols that need no answer. `at_choice`: the answer starts with its decision sentence, so
    the pane's reading is the choice reading, shown once."""
    def reading(name: str, bold: bool = False) -> str:
        decision, probs = readings[name]
        decision = f"**{decision}**" if bold else decision
        return decision if probs is None else f"{decision} ({_probabilities(probs)})"

    pane = reading(PANE_PROTOCOL, bold=True) if PANE_PROTOCOL in readings else "*(when the answer is complete)*"
    merged = at_choice and PANE_PROTOCOL in readings
    others = [f"({p.label}): {reading(p.name)}" for p in PROTOCOLS
              if p.name in readings and p.name != PANE_PROTOCOL and not (merged and p is PRIMARY)]
    label = f"Decision after its answer = {PRIMARY.label} (the answer starts with it)" if merged else "Decision after its answer"
    return " · ".join([f"{label}: {pane}", *others])


def reference_markdown(example: dict | None) -> str:
    if not example:
        return ""
    return (f"**Reference decision:** {example['final_decision']}\n\n"
            f"**Reference answer:** {example['long_answer']}")


def compare_answers(
    assistant: Assistant, question: str, context: str, config: GenerationConfig
) -> Iterator[tuple[str, str, str, str]]:
    """(base answer, base decision, fine-tuned answer, fine-tuned decision), updated as tokens stream
    in: both panes are rows of one batch, so they grow side by side."""
    prompt = tuple(assistant.question_prompt(question, context))
    rows = [Row(prompt, adapter=False, readings=True), Row(prompt, adapter=True, readings=True)]
    for update in assistant.answer(rows, config):
        base, tuned = update.texts
        base_decision, tuned_decision = (
            "" if readings is None else
            decision_markdown(readings, update.done and assistant.answer_format.reads_where_choice_reads(text))
            for text, readings in zip(update.texts, update.readings))
        yield base, base_decision, tuned, tuned_decision


def chat_reply(
    assistant: Assistant, history: list[dict[str, Any]], message: str, config: GenerationConfig
) -> Iterator[list[dict[str, Any]]]:
    """The conversation with `message` and the fine-tuned model's reply, growing as it streams."""
    prompt = assistant.chat_prompt(history, message)
    history = [*history, {"role": "user", "content": message.strip()}]
    for reply in assistant.stream(prompt, config, adapter=True):
        yield [*history, {"role": "assistant", "content": reply}]


def build_app(assistant: Assistant, defaults: GenerationParams, test_questions: dict[str, dict]) -> Any:
    """The Gradio Blocks app: a notice, generation controls (`defaults`: params.yaml's generation
    section), a Compare tab and a Chat tab."""
    import gradio as gr

    def settings(temperature: float, top_p: float, max_new_tokens: float) -> GenerationConfig:
        return generation_config(int(max_new_tokens), float(temperature), float(top_p), defaults.repetition_penalty)

    def on_compare(question, context, temperature, top_p, max_new_tokens):
        try:
            yield from compare_answers(assistant, question, context, settings(temperature, top_p, max_new_tokens))
        except PipelineError as exc:
            raise gr.Error(str(exc)) from exc

    def on_chat(history, message, temperature, top_p, max_new_tokens):
        try:
            for turn in chat_reply(assistant, history or [], message, settings(temperature, top_p, max_new_tokens)):
                yield turn, ""
        except PipelineError as exc:
            raise gr.Error(str(exc)) from exc

    def on_pick(pmid):
        example = test_questions.get(pmid)
        if not example:
            return gr.update(), gr.update(), ""
        return example["question"], example["context"], reference_markdown(example)

    with gr.Blocks(title="PubMedQA: base vs fine-tuned") as app:
        gr.Markdown("## PubMedQA: base vs fine-tuned")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Accordion("Generation settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
                max_new_tokens = gr.Slider(1, max(1024, defaults.max_new_tokens), value=defaults.max_new_tokens,
                                           step=1, label="Max new tokens")
        controls = [temperature, top_p, max_new_tokens]
        with gr.Tab("Compare"):
            pmid = gr.Dropdown(
                choices=[(f"{k}: {v['question'][:90]}", k) for k, v in test_questions.items()],
                label="A PubMedQA test question (optional)", value=None, filterable=True,
                visible=bool(test_questions), elem_id="pmid",
            )
            question = gr.Textbox(label="Question", lines=2, elem_id="question")
            context = gr.Textbox(label="Context passage (optional)", lines=4, elem_id="context")
            reference = gr.Markdown(elem_id="reference")
            ask = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Row():
                with gr.Column():
                    base_answer = gr.Textbox(label="Base model", lines=8, interactive=False, elem_id="base-answer")
                    base_decision = gr.Markdown(elem_id="base-decision")
                with gr.Column():
                    tuned_answer = gr.Textbox(label="Fine-tuned model", lines=8, interactive=False,
                                              elem_id="finetuned-answer")
                    tuned_decision = gr.Markdown(elem_id="finetuned-decision")
            pmid.change(on_pick, [pmid], [question, context, reference])
            # A question typed over a picked one is no longer that pmid's: its reference goes.
            question.input(lambda: (None, ""), None, [pmid, reference])
            outputs = [base_answer, base_decision, tuned_answer, tuned_decision]
            ask.click(on_compare, [question, context, *controls], outputs)
            question.submit(on_compare, [question, context, *controls], outputs)
        with gr.Tab("Chat"):
            gr.Markdown(f"A conversation with the fine-tuned model; it sees the last "
                        f"{assistant.history_turns} exchanges (`chat.history_turns`).")
            chatbot = gr.Chatbot(label="Fine-tuned model", elem_id="chatbot")
            message = gr.Textbox(label="Message", lines=2, elem_id="message")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="send")
                clear = gr.Button("Clear", elem_id="clear")
            send.click(on_chat, [chatbot, message, *controls], [chatbot, message])
            message.submit(on_chat, [chatbot, message, *controls], [chatbot, message])
            clear.click(lambda: ([], ""), None, [chatbot, message])
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medqa.chat.app", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="address to bind (default: chat.host in params.yaml, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: chat.port in params.yaml)")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    parser.add_argument("--ssl-certfile", help="HTTPS: the server's certificate (PEM), needed beyond loopback")
    parser.add_argument("--ssl-keyfile", help="HTTPS: the certificate's private key (PEM)")
    parser.add_argument("--insecure-http", action="store_true",
                        help="plain HTTP beyond loopback (passwords and answers unencrypted: a trusted network only)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base", default=str(paths.BASE_MODEL), help="base model directory (download stage)")
    parser.add_argument("--adapter", default=str(paths.ADAPTER), help="LoRA adapter directory (finetune stage)")
    parser.add_argument("--test", default=str(paths.TEST), help="test split for the question picker")
    return parser.parse_args(argv)


@command_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_params(args.params)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports about a medical tool
    if importlib.util.find_spec("gradio") is None:
        raise PipelineError("gradio is not installed: `make setup` installs requirements.txt")
    host, port = args.host or params.chat.host, args.port or params.chat.port
    # Checked before the model loads: a refused start takes a second, not a minute.
    auth = credentials(host, args.share, dict(os.environ), Path(args.params).resolve().parent)
    check_transport(host, args.ssl_certfile, args.ssl_keyfile, args.insecure_http)
    log.info("loading %s with the adapter in %s", args.base, args.adapter)
    assistant = Assistant.load(params, args.base, args.adapter)
    app = build_app(assistant, params.generation, load_test_questions(args.test))
    if auth:
        log.info("serving on %s:%d to %d user(s) with a password", host, port, len(auth))
    from starlette.middleware import Middleware

    # As many handlers at once as a batch has rows: the batcher, not Gradio's queue, decides who waits.
    app.queue(default_concurrency_limit=params.chat.batch_rows).launch(
        server_name=host, server_port=port, share=args.share, ssr_mode=False, auth=auth,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        # (ssl_verify: Gradio checks its own URL once started; a self-signed certificate must not stop it.)
        ssl_verify=False, app_kwargs={"middleware": [Middleware(LoginThrottle)]},
    )


if __name__ == "__main__":
    main()
