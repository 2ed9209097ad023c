"""The chat app under load: the wait per client, to the first token and to the end, with one client and
with several at once, through the app's own API (gradio_client), as users would meet it.

Starts `python -m medqa.chat.app` from `--app-root` (default: this checkout; another checkout measures
another version) on a free port with the pipeline's models, sends one untimed compare (the model's
first-call costs), then one client alone, then `--clients` at once, each a Compare of a test
question (`--same`: all the same one, else one each), greedy, `generation.max_new_tokens` tokens.

    python -m bench.chat_load [--clients 4] [--same] [--app-root DIR]

Needs `models/base`, `models/adapter` and `data/split/test.jsonl` (`dvc repro finetune`).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from medqa import paths
from medqa.io import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(app_root: Path, port: int) -> subprocess.Popen:
    """The app of the checkout at `app_root`, reading this checkout's models and test split."""
    env = dict(os.environ, PYTHONPATH=str(app_root), GRADIO_ANALYTICS_ENABLED="False")
    return subprocess.Popen(
        [sys.executable, "-m", "medqa.chat.app", "--params", str(app_root / "params.yaml"), "--port", str(port),
         "--base", str(ROOT / paths.BASE_MODEL), "--adapter", str(ROOT / paths.ADAPTER), "--test", str(ROOT / paths.TEST)],
        cwd=app_root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )


def wait_until_up(url: str, app: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.poll() is not None:
            raise SystemExit(f"the app exited with {app.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the app did not answer on {url} within {timeout} s")


def compare_at_once(url: str, questions: list[dict], max_new_tokens: int) -> list[dict[str, float]]:
    """One client per question, all sent at the same moment: each one's seconds to its first answer
    token (either pane) and to its end."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in questions]
    start = time.perf_counter()
    jobs = [client.submit(q["question"], q["context"], 0.0, 1.0, max_new_tokens, api_name="/on_compare")
            for client, q in zip(clients, questions)]
    waits: list[dict[str, float]] = [{} for _ in jobs]
    while not all("end_s" in w for w in waits):
        now = time.perf_counter() - start
        for job, wait in zip(jobs, waits):
            if "first_token_s" not in wait and any(out[0] or out[2] for out in job.outputs()):
                wait["first_token_s"] = now
            if "end_s" not in wait and job.done():
                job.result()  # raises what the app raised
                wait["end_s"] = now
                wait.setdefault("first_token_s", now)
        time.sleep(0.05)
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--same", action="store_true", help="every client asks the same question")
    parser.add_argument("--app-root", type=Path, default=ROOT)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: generation.max_new_tokens")
    args = parser.parse_args()
    from medqa.params import load_params

    max_new_tokens = args.max_new_tokens or load_params(ROOT / "params.yaml").generation.max_new_tokens
    test = read_jsonl(ROOT / paths.TEST)
    questions = [test[0]] * args.clients if args.same else test[: args.clients]
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    app = start_app(args.app_root.resolve(), port)
    try:
        wait_until_up(url, app)
        compare_at_once(url, [test[-1]], max_new_tokens)  # untimed: the content-free priors, first calls
        alone = compare_at_once(url, questions[:1], max_new_tokens)
        together = compare_at_once(url, questions, max_new_tokens)
    finally:
        app.terminate()
        app.wait(timeout=60)
    print(f"app: {args.app_root}; {args.clients} clients, {'one question' if args.same else 'a question each'}, "
          f"{max_new_tokens} new tokens, greedy")
    print("| client | first token (s) | end (s) |\n|---|---|---|")
    print(f"| alone | {alone[0]['first_token_s']:.1f} | {alone[0]['end_s']:.1f} |")
    for i, wait in enumerate(sorted(together, key=lambda w: w["end_s"]), 1):
        print(f"| {i} of {args.clients} at once | {wait['first_token_s']:.1f} | {wait['end_s']:.1f} |")
    print(json.dumps({"alone": alone, "together": together}))


if __name__ == "__main__":
    main()
