"""User-facing errors and the wrapper that turns them into one clear line instead of a traceback."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


class PipelineError(Exception):
    """An error caused by the user's input or environment, with a message that says what to do."""


def debug_enabled() -> bool:
    """Tracebacks are shown only when DEBUG is set (any non-empty value but 0)."""
    return os.environ.get("DEBUG", "") not in ("", "0")


RESTORE_HINT = (
    "{stage}: failed; the outputs of its last successful run are in the DVC cache: "
    "`dvc checkout` brings them back (`dvc status` lists what is missing)"
)
PARAMS_HINT = "; `git checkout -- params.yaml` restores the committed params"
EXPERIMENT_ENV = "DVC_EXP_BASELINE_REV"  # set by DVC for the stages of `dvc exp run`


def _let_git_see_the_experiments_params() -> None:
    """Move params.yaml's mtime past the second DVC wrote it in. Under `dvc exp run -S`, DVC stashes and
    re-applies params.yaml within a second, and a value of the same width (its YAML writer keeps the
    comments' columns) leaves the file's size and whole-second mtime as git's index recorded them: git
    then takes the failed value for the committed one and `git checkout -- params.yaml` keeps it."""
    path = Path("params.yaml")
    if path.is_file():
        later = max(time.time(), path.stat().st_mtime + 1)
        os.utime(path, (later, later))


def _entry_point(func: F, after_failure: str | None) -> F:
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
            code = 1
        except KeyboardInterrupt:
            code = 130
        except Exception:
            traceback.print_exc()
            code = 1
        if after_failure:
            experiment = bool(os.environ.get(EXPERIMENT_ENV))
            if experiment:
                _let_git_see_the_experiments_params()
            hint = after_failure.format(stage=Path(sys.argv[0]).stem)
            print(hint + (PARAMS_HINT if experiment else ""), file=sys.stderr)
        sys.exit(code)

    return wrapper  # type: ignore[return-value]


def command_main(func: F) -> F:
    """Run a command's entry point: configure logging, print PipelineErrors as one line, exit non-zero."""
    return _entry_point(func, None)


def stage_main(func: F) -> F:
    """Run a DVC stage's entry point as `command_main` does; whatever stops it (a PipelineError, any
    other exception, Ctrl-C), its last line says how to get back the outputs DVC deleted before running it."""
    return _entry_point(func, RESTORE_HINT)


@contextlib.contextmanager
def explain_out_of_memory(what_to_lower: str) -> Iterator[None]:
    """Turn an out-of-memory error (CUDA or CPU) into a PipelineError that says which params to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            raise PipelineError(f"out of memory ({type(exc).__name__}): {what_to_lower}") from exc
        raise
