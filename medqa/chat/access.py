"""Who may use the chat app beyond loopback, and how: passwords from the environment (never params or
the command line), HTTPS (or plain HTTP only when asked for by name), and repeated failed logins slowed."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from medqa.errors import PipelineError

log = logging.getLogger(__name__)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
USER_ENV, PASSWORD_ENV, AUTH_FILE_ENV = "MEDQA_CHAT_USER", "MEDQA_CHAT_PASSWORD", "MEDQA_CHAT_AUTH_FILE"


def credentials(host: str, share: bool, environ: dict[str, str], repo: Path) -> list[tuple[str, str]] | None:
    """Who may use the app: None (anyone who can reach it) on a loopback address without a share
    link; otherwise the (username, password) pairs from the environment — `MEDQA_CHAT_USER` and
    `MEDQA_CHAT_PASSWORD`, or `MEDQA_CHAT_AUTH_FILE`, a file of `user:password` lines outside the
    repository — never from params or the command line, which shell history keeps."""
    if host in LOOPBACK and not share:
        return None
    exposed = f"--host {host}" if host not in LOOPBACK else "--share (a public link)"
    if environ.get(AUTH_FILE_ENV):
        path = Path(environ[AUTH_FILE_ENV]).expanduser().resolve()
        if path.is_relative_to(repo.resolve()):
            raise PipelineError(f"{AUTH_FILE_ENV}={path} is inside the repository, where git or DVC could share it: "
                                "keep the credentials file elsewhere")
        if not path.is_file():
            raise PipelineError(f"{AUTH_FILE_ENV}={path}: no such file")
        pairs = [tuple(line.strip().split(":", 1)) for line in path.read_text().splitlines() if line.strip()]
        if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise PipelineError(f"{path}: every line must be user:password (a non-empty user and password)")
        return [(user, password) for user, password in pairs]
    if environ.get(USER_ENV) and environ.get(PASSWORD_ENV):
        return [(environ[USER_ENV], environ[PASSWORD_ENV])]
    raise PipelineError(
        f"with {exposed} anyone who can reach the app could use it: set {USER_ENV} and {PASSWORD_ENV} in the "
        f"environment, or {AUTH_FILE_ENV} to a file of user:password lines outside the repository"
    )


def check_transport(host: str, certfile: str | None, keyfile: str | None, insecure_http: bool) -> None:
    """Beyond loopback, passwords and answers cross the network: HTTPS (a certificate and its key), or
    plain HTTP only when asked for by name. A --share link is Gradio's own HTTPS tunnel."""
    if bool(certfile) != bool(keyfile):
        raise PipelineError("--ssl-certfile and --ssl-keyfile go together: the certificate and its private key")
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and not Path(path).expanduser().is_file():
            raise PipelineError(f"{option} {path}: no such file")
    if host not in LOOPBACK and not certfile and not insecure_http:
        raise PipelineError(
            f"with --host {host} the passwords and answers would cross the network as plain HTTP, readable by "
            "anyone on the way: give --ssl-certfile and --ssl-keyfile (a certificate for that address and its "
            "key; docs/chat.md), or --insecure-http on a network you trust"
        )


class LoginThrottle:
    """ASGI middleware in front of Gradio's login. Failed logins are counted per client address and per
    user name tried; once either count passes FREE_FAILURES in a row, the next attempt waits before it
    is checked, FIRST_DELAY_S and twice as long after each further failure, up to MAX_DELAY_S (the
    longer of the two waits); a successful login clears both counts. The attempts of one address, and
    those for one user name, are checked one at a time, each after the outcome of the one before is
    counted: N guesses sent at once wait N delays, not one. A wait is that request's own (an asyncio
    sleep): other clients and the app's other requests go on meanwhile."""

    FREE_FAILURES, FIRST_DELAY_S, MAX_DELAY_S = 3, 1.0, 60.0

    def __init__(self, app: Any):
        self.app = app
        self.failures: dict[str, int] = {}
        self.locks: dict[str, asyncio.Lock] = {}

    def delay(self, *keys: str) -> float:
        """Seconds the next login attempt counted under `keys` ("address 10.0.0.9", "user ana") waits."""
        extra = max(self.failures.get(key, 0) for key in keys) - self.FREE_FAILURES
        return 0.0 if extra < 0 else min(self.FIRST_DELAY_S * 2 ** extra, self.MAX_DELAY_S)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].rstrip("/").endswith("/login"):
            return await self.app(scope, receive, send)
        body, replay = await _read_body(receive)
        keys = [f"address {(scope.get('client') or ('unknown',))[0]}", f"user {_form_field(body, 'username')}"]
        async with contextlib.AsyncExitStack() as held:
            for key in sorted(keys):  # one order for every request: two requests never hold each other's lock
                await held.enter_async_context(self.locks.setdefault(key, asyncio.Lock()))
            wait = self.delay(*keys)
            if wait:
                await asyncio.sleep(wait)

            async def note_then_send(message: dict) -> None:
                # Counted and logged before the response leaves: a client that saw its refusal can rely on
                # the count (and the log line) being there already.
                if message["type"] == "http.response.start":
                    self.note(keys, message["status"])
                await send(message)

            await self.app(scope, replay, note_then_send)

    def note(self, keys: list[str], status: int) -> None:
        """Count a login's outcome under each of its keys: success clears them, a 4xx adds one."""
        if status == 200:
            for key in keys:
                self.failures.pop(key, None)
        elif 400 <= status < 500:
            for key in keys:
                self.failures[key] = self.failures.get(key, 0) + 1
            log.warning("failed login (%s): %s failures in a row; the next attempt waits %.0f s", ", ".join(keys),
                        "/".join(str(self.failures[key]) for key in keys), self.delay(*keys))


async def _read_body(receive: Any) -> tuple[bytes, Any]:
    """The request's whole body, and a `receive` that hands it to the app as if it were read for the
    first time."""
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then what the server says next (a disconnect)

    return body, replay


def _form_field(body: bytes, name: str) -> str:
    """A field of a url-encoded form ("" where it is not one)."""
    from urllib.parse import parse_qs

    values = parse_qs(body.decode("utf-8", "replace")).get(name)
    return values[0] if values else ""
