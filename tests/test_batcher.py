"""The chat app's scheduler: who shares a batch, and what a reader sees when the work fails."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from medqa.chat.batcher import Batcher, Request
from medqa.errors import PipelineError


@dataclass
class Done:
    rows: list
    done: bool = True


def echo_batcher(max_rows: int = 4, wait_s: float = 0.3, fail_on: str | None = None,
                 seen: list | None = None) -> Batcher:
    def run(requests: list[Request]) -> None:
        if seen is not None:
            seen.append({r.settings for r in requests})
        if any(fail_on in r.rows for r in requests):
            raise RuntimeError("the model broke")
        for request in requests:
            request.send(Done(list(request.rows)))

    return Batcher(run, max_rows=max_rows, wait_s=wait_s)


def ask_at_once(batcher: Batcher, asks: list[tuple[list, object]]) -> list:
    """Every ask submitted from its own thread at the same moment; each one's last update."""
    results: list = [None] * len(asks)
    start = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        start.wait()
        results[i] = list(batcher.submit(*asks[i]))[-1]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_readers_who_ask_at_once_share_a_batch_and_each_gets_their_own_rows():
    batcher = echo_batcher()
    results = ask_at_once(batcher, [(["a"], "greedy"), (["b", "c"], "greedy")])
    assert [r.rows for r in results] == [["a"], ["b", "c"]]
    assert batcher.batch_sizes == [3]


def test_a_batch_holds_only_equal_settings_and_at_most_max_rows():
    seen: list = []
    batcher = echo_batcher(max_rows=3, seen=seen)
    results = ask_at_once(batcher, [(["a"], "greedy"), (["b"], "sampled"), (["c", "d"], "greedy"), (["e"], "greedy")])
    assert [r.rows for r in results] == [["a"], ["b"], ["c", "d"], ["e"]]
    # The sampled ask alone; the four greedy rows in two batches, however they arrived.
    assert all(len(settings) == 1 for settings in seen) and len(seen) == 3
    assert max(batcher.batch_sizes) <= 3 and sum(batcher.batch_sizes) == 5
    with pytest.raises(PipelineError, match="do not fit"):
        batcher.submit(["a", "b", "c", "d"], "greedy")


def test_a_failed_batch_reaches_its_readers_and_the_worker_goes_on():
    batcher = echo_batcher(wait_s=0.0, fail_on="boom")
    with pytest.raises(PipelineError, match="generation failed: the model broke"):
        list(batcher.submit(["boom"], "greedy"))
    assert list(batcher.submit(["fine"], "greedy"))[-1].rows == ["fine"]
