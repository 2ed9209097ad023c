"""The chat app: answer and history functions on a tiny model, and the real app in a headless browser."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from medqa.chat.app import chat_reply, compare_answers
from medqa.chat.assistant import Assistant, Row, recent_turns
from medqa.errors import PipelineError
from medqa.inference.generation import generate, generation_config
from medqa.io import write_jsonl
from medqa.modeling.hardware import resolve_hardware
from medqa.modeling.loading import load_model
from medqa.modeling.profiles import PROFILES
from medqa.params import PromptParams, load_params, params_from_dict
from medqa.prompting.prompts import PromptFormat, format_record, prompt_format
from tests.conftest import free_port, make_original, save_tiny_base

ROOT = Path(__file__).resolve().parents[1]
GREEDY = generation_config(max_new_tokens=12)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tokenizer) -> Path:
    """What the app reads: a base model dir (tiny random Llama), an adapter that changes it, the test split."""
    from peft import LoraConfig, get_peft_model

    work = tmp_path_factory.mktemp("chat")
    model = save_tiny_base(work / "base", tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           max_position_embeddings=1024)
    # init_lora_weights=False: random B matrices, so the adapter visibly changes the answers.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(work / "adapter")

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generation"]["max_new_tokens"] = 12
    params["eval"]["max_prompt_length"] = 200
    params["chat"]["history_turns"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    fmt = PromptFormat(tokenizer)
    records = [{"pmid": k, "question": v["QUESTION"], "contexts": v["CONTEXTS"], "long_answer": v["LONG_ANSWER"],
                "final_decision": v["final_decision"]} for k, v in make_original(3).items()]
    write_jsonl(work / "test.jsonl", [format_record(r, fmt, PromptParams(params["prompt"]["system"], None, "x", False)) for r in records])
    return work


@pytest.fixture(scope="module")
def assistant(project) -> Assistant:
    return Assistant.load(load_params(project / "params.yaml"), project / "base", project / "adapter")


def test_recent_turns_keeps_the_last_complete_exchanges():
    history = [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},  # Gradio's message parts
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "unanswered"},
    ]
    assert recent_turns(history, 2) == [("q2", "a2"), ("q3", "a3")]
    assert recent_turns(history, 10) == [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    assert recent_turns(history, 0) == []


def test_chat_prompt_sends_recent_history_and_drops_the_oldest_when_too_long(assistant, tokenizer):
    history = [{"role": r, "content": f"{r} turn {i}"} for i in range(4) for r in ("user", "assistant")]
    text = tokenizer.decode(assistant.chat_prompt(history, "next question"))
    assert "user turn 3" in text and "assistant turn 2" in text and "next question" in text
    assert "user turn 1" not in text  # history_turns = 2
    long_history = [{"role": r, "content": f"{r} {i} " + "word " * 60} for i in range(2) for r in ("user", "assistant")]
    ids = assistant.chat_prompt(long_history, "short")
    assert len(ids) <= assistant.max_prompt_length
    assert "short" in tokenizer.decode(ids) and "user 0" not in tokenizer.decode(ids)
    # Too long on its own: said in the user's terms, never cut silently (nor named by config keys).
    with pytest.raises(PipelineError, match=r"^message too long: about \d+ tokens, the limit is \d+$"):
        assistant.chat_prompt([], "word " * 400)


def test_a_question_too_long_is_said_in_the_users_terms(assistant):
    with pytest.raises(PipelineError, match=r"^question too long: about \d+ tokens, the limit is \d+$"):
        assistant.question_prompt("word " * 400, "a context that can be cut")
    assert len(assistant.question_prompt("Short?", "word " * 400)) <= assistant.max_prompt_length  # the context is cut


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_app_builds_the_prompt_the_format_stage_trained_on(assistant, tokenizer, profile):
    """For every profile (some carry their own template: Mistral base, distilgpt2), the app's question
    prompt is the format stage's prompt for the same record, token for token."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"] = profile
    params["eval"]["max_prompt_length"] = 1000
    app = Assistant(assistant.model, tokenizer, params_from_dict(params))
    record = {"pmid": "1", "question": "Does aspirin reduce fever?", "contexts": ["A trial of aspirin in adults."],
              "long_answer": "It did.", "final_decision": "yes"}
    fmt = prompt_format(tokenizer, params_from_dict(params).prompt, profile)
    trained = format_record(record, fmt, params_from_dict(params).prompt)["prompt"]
    assert app.question_prompt(record["question"], record["contexts"][0]) == tokenizer(
        trained, add_special_tokens=False)["input_ids"]
    if PROFILES[profile].template:
        assert trained.startswith(PROFILES[profile].template.split("{")[0])


def test_base_answers_come_from_the_same_weights_with_the_adapter_off(assistant, project):
    prompt = assistant.question_prompt("Does aspirin reduce fever?", "A trial of aspirin in adults.")
    tuned = assistant.decision_probabilities(prompt, adapter=True)
    base = assistant.decision_probabilities(prompt, adapter=False)
    assert set(base) == {"yes", "no", "maybe"} and sum(base.values()) == pytest.approx(1.0)
    assert max(abs(base[d] - tuned[d]) for d in base) > 1e-4  # the adapter is on for the fine-tuned side

    plain = load_model(project / "base", resolve_hardware("none", "float32"))  # a separate copy, no adapter
    expected = generate(plain, assistant.tokenizer, [prompt], GREEDY, batch_size=1, desc=None)[0]
    assert list(assistant.stream(prompt, GREEDY, adapter=False))[-1] == expected
    # One model in memory: the LoRA layers wrap the base layers rather than a second copy.
    assert sum(p.numel() for p in assistant.model.parameters()) < 1.1 * sum(p.numel() for p in plain.parameters())


def test_stream_grows_token_by_token_and_matches_batch_generation(assistant):
    prompt = assistant.question_prompt("Is smoking linked to lung cancer?")
    steps = list(assistant.stream(prompt, GREEDY, adapter=True))
    assert len(steps) > 2 and all(b.startswith(a.strip()) for a, b in zip(steps, steps[1:]))
    expected = generate(assistant.model, assistant.tokenizer, [prompt], GREEDY, batch_size=1, desc=None)[0]
    assert steps[-1] == expected and expected


def test_sampling_is_seeded(assistant):
    prompt = assistant.question_prompt("Is smoking linked to lung cancer?")
    hot = generation_config(max_new_tokens=12, temperature=1.5, top_p=0.95)
    first = list(assistant.stream(prompt, hot, adapter=True))[-1]
    assert list(assistant.stream(prompt, hot, adapter=True))[-1] == first


def test_a_reader_who_leaves_stops_only_their_rows(assistant):
    long = generation_config(max_new_tokens=400)
    prompt = assistant.question_prompt("Is smoking linked to lung cancer?")
    alone = list(assistant.stream(prompt, generation_config(max_new_tokens=400), adapter=True))[-1]
    leaving = assistant.answer([Row(tuple(assistant.question_prompt("Q?")), adapter=False)], long)
    staying = assistant.answer([Row(tuple(prompt), adapter=True)], long)
    next(leaving)
    leaving.close()
    assert list(staying)[-1].texts == [alone]  # the other reader's answer is whole
    assert assistant.batcher.batch_sizes[-1] == 2
    assert assistant.lock.acquire(timeout=30)  # the worker stopped early and let go
    assistant.lock.release()


def test_readers_who_ask_at_once_share_one_batch_and_get_the_answers_they_get_alone(assistant):
    asks = [(assistant.question_prompt(q), adapter) for q, adapter in
            [("Does aspirin reduce fever?", True), ("Is smoking linked to lung cancer?", False),
             ("Do statins lower cholesterol in adults over sixty?", True)]]
    alone = [list(assistant.stream(prompt, GREEDY, adapter))[-1] for prompt, adapter in asks]
    together: list = [None] * len(asks)
    start = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        start.wait()
        together[i] = list(assistant.stream(*asks[i][:1], GREEDY, asks[i][1]))[-1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert assistant.batcher.batch_sizes[-1] == 3  # one batch, the adapter on for two rows and off for one
    assert together == alone and len(set(alone)) == 3


def test_compare_fills_both_sides_and_chat_keeps_the_conversation(assistant):
    updates = list(compare_answers(assistant, "Does it work?", "", GREEDY))
    base, base_decision, tuned, tuned_decision = updates[-1]
    # Side by side, not one after the other: the fine-tuned pane starts while the base one still grows.
    assert assistant.batcher.batch_sizes[-1] == 2
    first_tuned = next(u for u in updates if u[2])
    assert first_tuned[0] != base and base.startswith(first_tuned[0])
    assert "(choice)" in updates[0][1] and "when the answer is complete" in updates[0][1]
    assert base and tuned and base != tuned
    assert "Decision after its answer: **" in base_decision and "(choice)" in tuned_decision
    # The pane's decision is the one read after the streamed answer, as the eval stages' after_answer reads it.
    prompt = assistant.question_prompt("Does it work?", "")
    after = assistant.decision_probabilities(prompt, adapter=True, answer=tuned)
    assert f"**{max(after, key=after.get)}** (" in tuned_decision
    *_, history = chat_reply(assistant, [], "Hello?", GREEDY)
    assert [m["role"] for m in history] == ["user", "assistant"] and history[1]["content"]
    *_, history = chat_reply(assistant, history, "And then?", GREEDY)
    assert [m["content"] for m in history][::2] == ["Hello?", "And then?"]
    with pytest.raises(PipelineError, match="type a question"):
        next(compare_answers(assistant, "  ", "", GREEDY))


def _run_app(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", "medqa.chat.app", "--params", str(project / "params.yaml"), "--base", str(project / "base"),
         "--test", str(project / "test.jsonl"), *args],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_the_app_is_local_only_by_default():
    from medqa.chat.app import parse_args

    assert yaml.safe_load((ROOT / "params.yaml").read_text())["chat"]["host"] == "127.0.0.1"
    args = parse_args([])
    assert args.host is None and not args.share  # so chat.host applies, and no public link


def test_the_app_refuses_to_start_without_an_adapter(project, tmp_path):
    proc = _run_app(project, "--adapter", str(tmp_path / "missing"))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "dvc pull finetune" in output and "Traceback" not in output


def test_an_answer_that_starts_with_its_decision_shows_one_reading_for_both():
    from medqa.chat.app import decision_markdown
    from medqa.decisions.answer_format import AnswerFormat

    answer_format = AnswerFormat("The answer is:")
    assert answer_format.reads_where_choice_reads("The answer is: yes. It works.")
    assert not answer_format.reads_where_choice_reads("It works. The answer is: yes.")
    readings = {"choice": ("yes", {"yes": 0.7, "no": 0.2, "maybe": 0.1}),
                "after_answer": ("yes", {"yes": 0.7, "no": 0.2, "maybe": 0.1}),
                "calibrated": ("no", {"yes": 0.3, "no": 0.6, "maybe": 0.1}), "generated": ("yes", None)}
    apart = decision_markdown(readings)
    assert "(choice): yes" in apart and apart.startswith("Decision after its answer: **yes**")
    merged = decision_markdown(readings, at_choice=True)
    assert "(choice)" not in merged and merged.startswith("Decision after its answer = choice")
    assert "(calibrated): no" in merged and "(parsed): yes" in merged


def test_an_app_others_can_reach_asks_for_a_password(tmp_path):
    from medqa.chat.access import credentials

    repo = tmp_path / "repo"
    repo.mkdir()
    assert credentials("127.0.0.1", False, {}, repo) is None
    for host, share in (("0.0.0.0", False), ("127.0.0.1", True), ("192.168.1.5", False)):
        with pytest.raises(PipelineError, match="MEDQA_CHAT_USER and MEDQA_CHAT_PASSWORD"):
            credentials(host, share, {}, repo)
    env = {"MEDQA_CHAT_USER": "ana", "MEDQA_CHAT_PASSWORD": "s3cret"}
    assert credentials("0.0.0.0", False, env, repo) == [("ana", "s3cret")]
    outside = tmp_path / "users.txt"
    outside.write_text("ana:s3cret\nbo:pass:with:colons\n")
    assert credentials("0.0.0.0", True, {"MEDQA_CHAT_AUTH_FILE": str(outside)}, repo) == [
        ("ana", "s3cret"), ("bo", "pass:with:colons")]
    inside = repo / "users.txt"
    inside.write_text("ana:s3cret\n")
    with pytest.raises(PipelineError, match="inside the repository"):
        credentials("0.0.0.0", False, {"MEDQA_CHAT_AUTH_FILE": str(inside)}, repo)
    outside.write_text("ana\n")
    with pytest.raises(PipelineError, match="user:password"):
        credentials("0.0.0.0", False, {"MEDQA_CHAT_AUTH_FILE": str(outside)}, repo)


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (a day's validity), and the key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_a_shared_app_refuses_to_start_without_credentials_or_https_and_serves_only_with_them(project, tmp_path):
    """Beyond loopback: no credentials, or credentials without a certificate, and the app refuses to start
    in one line; with both it serves HTTPS only (a client that trusts the certificate gets the page, plain
    HTTP gets nothing) and only to the right password; a client's repeated wrong logins are slowed."""
    import ssl

    from gradio_client import Client

    port = free_port()
    args = ("--adapter", str(project / "adapter"), "--host", "0.0.0.0", "--port", str(port))
    users = {"MEDQA_CHAT_USER": "ana", "MEDQA_CHAT_PASSWORD": "s3cret"}
    for env, says in ((None, "MEDQA_CHAT_PASSWORD"), (users, "--ssl-certfile and --ssl-keyfile")):
        refused = _run_app(project, *args, env=env)
        output, _ = refused.communicate(timeout=120)
        assert refused.returncode == 1 and says in output and "Traceback" not in output, output[-2000:]
    assert "plain HTTP" in output and "--insecure-http" in output

    cert, key = _self_signed_certificate(tmp_path)
    app = _run_app(project, *args, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), env=users)
    url = f"https://127.0.0.1:{port}/"
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        _wait_for(url, app, context=trusting)
        with pytest.raises(OSError):  # no plain HTTP on that port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        for wrong in (None, ("ana", "wrong")):
            # gradio_client raises a different error class for a missing and a wrong login.
            with pytest.raises(Exception):  # noqa: B017
                Client(url, auth=wrong, verbose=False, ssl_verify=False).predict("1001", api_name="/on_pick")
        picked = Client(url, auth=("ana", "s3cret"), verbose=False, ssl_verify=False).predict("1001", api_name="/on_pick")
        assert make_original(3)["1001"]["QUESTION"] in picked
        # Six wrong guesses at once (the right login above cleared the count): the first three are free, the
        # others are checked one at a time, each after its wait (1, 2, 4 s), as they would be one after another.
        answered = _logins_at_once(f"{url}login/", trusting, ("ana", "guess"), 6)
        assert sum(t < 1.0 for t in answered) == 3 and max(answered) >= 1 + 2 + 4, answered
    finally:
        app.terminate()
        output = app.communicate(timeout=30)[0]
    # the sixth failure in a row (from this address, for this user) makes the next attempt wait 8 s
    assert "failed login (address 127.0.0.1, user ana): 6/6 failures in a row; the next attempt waits 8 s" in output, \
        output[-3000:]


def _logins_at_once(url: str, context, auth: tuple[str, str], n: int) -> list[float]:
    """`n` POSTs of the login form sent at the same moment; the seconds until each was answered."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlencode

    data = urlencode({"username": auth[0], "password": auth[1]}).encode()
    start = time.monotonic()

    def post(_: int) -> float:
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60, context=context)
        except urllib.error.HTTPError:
            pass  # the refusal is the answer
        return time.monotonic() - start

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(post, range(n)))


def _login_attempt(throttle, client: str, password: str, user: str = "ana", path: str = "/login/"):
    """One POST of Gradio's login form through `throttle`, as a coroutine."""
    from urllib.parse import urlencode

    body = urlencode({"username": user, "password": password}).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": path, "client": (client, 5000)}
    return throttle(scope, receive, send)


async def _fake_login(scope, receive, send):
    """Gradio's answer: 400 for a wrong password (read from the form, as the throttle passed it on)."""
    from urllib.parse import parse_qs

    form = parse_qs((await receive())["body"].decode())
    await send({"type": "http.response.start", "status": 200 if form["password"] == ["right"] else 400})


def test_logins_slow_down_per_client_and_per_user_after_repeated_failures_and_a_success_clears_them(monkeypatch):
    """The throttle in front of Gradio's login: three free failures, then 1, 2, 4 ... s (up to a minute)
    before the next attempt from that address, or for that user name, is checked; another address
    guessing another user waits nothing; a success starts over."""
    import asyncio

    from medqa.chat.access import LoginThrottle

    waits: list[tuple[str, float]] = []
    client_now: list[str] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append((client_now[0], seconds))

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    throttle = LoginThrottle(_fake_login)

    def attempt(client: str, password: str, user: str = "ana", path: str = "/login/") -> None:
        client_now[:] = [client]
        asyncio.run(_login_attempt(throttle, client, password, user, path))

    for _ in range(7):
        attempt("10.0.0.9", "guess")
    assert [w for c, w in waits if c == "10.0.0.9"] == [1.0, 2.0, 4.0, 8.0]
    attempt("10.0.0.5", "guess", user="bob")
    attempt("10.0.0.5", "right", user="bob")
    assert not [w for c, w in waits if c == "10.0.0.5"]
    attempt("10.0.0.5", "guess")  # another address, but the user whose password was guessed 7 times
    assert waits[-1] == ("10.0.0.5", 16.0)
    attempt("10.0.0.9", "right")  # waits 32 s (8 failures for ana), then succeeds
    attempt("10.0.0.9", "guess")
    assert waits[-1] == ("10.0.0.9", 32.0) and throttle.delay("address 10.0.0.9", "user ana") == 0
    for _ in range(12):
        attempt("10.0.0.9", "guess")
    assert waits[-1][1] == LoginThrottle.MAX_DELAY_S
    waits.clear()
    attempt("10.0.0.9", "guess", path="/gradio_api/queue/join")  # not a login: never held
    assert not waits


def test_guesses_sent_at_once_are_checked_one_at_a_time_each_after_its_delay(monkeypatch):
    """Eight wrong logins from one client at the same moment: the three free ones are answered at once,
    each of the others only after the delay its predecessors' failures earned (0.05, 0.1 ... 0.8 s here),
    so eight parallel guesses cost what eight in a row cost."""
    import asyncio
    import time

    from medqa.chat.access import LoginThrottle

    monkeypatch.setattr(LoginThrottle, "FIRST_DELAY_S", 0.05)
    throttle = LoginThrottle(_fake_login)
    answered: list[float] = []

    async def guess(start: float) -> None:
        await _login_attempt(throttle, "10.0.0.9", "guess")
        answered.append(time.monotonic() - start)

    async def at_once() -> None:
        start = time.monotonic()
        await asyncio.gather(*(guess(start) for _ in range(8)))

    asyncio.run(at_once())
    assert sum(t < 0.05 for t in answered) == LoginThrottle.FREE_FAILURES
    assert max(answered) >= 0.05 * (1 + 2 + 4 + 8 + 16)
    assert throttle.failures == {"address 10.0.0.9": 8, "user ana": 8}


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 180, context=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2, context=context)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the app did not answer on {url} within {timeout} s")


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
def test_compare_in_a_real_browser(project, tmp_path):
    """Headless Chromium types a question, presses Compare and sees both answers fill in. Slow: the app
    starts in its own process (Gradio, torch, the model) and a browser drives it through the page."""
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import expect, sync_playwright

    test_question = make_original(3)["1001"]["QUESTION"]
    port = free_port()
    app = _run_app(project, "--adapter", str(project / "adapter"), "--port", str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for(url, app)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#notice")).to_contain_text("not medical advice", timeout=60_000)
            page.locator("#pmid input").click()  # a test question by pmid fills the form and shows its reference
            page.get_by_role("option", name="1001").click()
            expect(page.locator("#question textarea")).to_have_value(test_question, timeout=30_000)
            expect(page.locator("#reference")).to_contain_text("Reference decision", timeout=30_000)
            page.locator("#question textarea").fill("Does aspirin reduce fever in adults?")
            page.locator("#compare").click()
            for pane in ("#base-answer textarea", "#finetuned-answer textarea"):
                expect(page.locator(pane)).not_to_have_value("", timeout=120_000)
            # Rendered Markdown: the decision read after the complete answer, then the direct choice.
            expect(page.locator("#finetuned-decision")).to_contain_text(
                re.compile(r"Decision after its answer: (yes|no|maybe) \(.*\(choice\): (yes|no|maybe)"), timeout=60_000)
            page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
            base = page.locator("#base-answer textarea").input_value()
            tuned = page.locator("#finetuned-answer textarea").input_value()
            browser.close()
        assert base.strip() and tuned.strip()
        assert (tmp_path / "compare.png").stat().st_size > 0
    finally:
        app.terminate()
        app.wait(timeout=30)
