"""User-facing errors and the wrapper that turns them into one clear line instead of a traceback."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


def debug_enabled() -> bool:
    """Tracebacks are shown only when DEBUG is set (any non-empty value but 0)."""
    return os.environ.get("DEBUG", "") not in ("", "0")


def stage_main(func: F) -> F:
    """Run a stage entry point: configure logging, print PipelineErrors as one line, exit non-zero."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(
            level=logging.DEBUG if debug_enabled() else logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
        try:
            return func(*args, **kwargs)
        except PipelineError as exc:
            if debug_enabled():
                raise
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def explain_out_of_memory(what_to_lower: str) -> Iterator[None]:
    """Turn an out-of-memory error (CUDA or CPU) into a PipelineError that says which params to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            raise PipelineError(f"out of memory ({type(exc).__name__}): {what_to_lower}") from exc
        raise
