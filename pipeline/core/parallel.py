"""Ordered, bounded parallel maps: results in input order, never more than ``window`` waiting.

Threads suit image decoding next to an onnxruntime session: Pillow and onnxruntime release the
GIL while they decode, resize and run, and threads share the process's cached resize session
(no fork of a process that holds a session's thread pool)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                       window: int) -> Iterator[R]:
    """``fn(item)`` for each item, in order, in ``workers`` threads (in this one when
    ``workers`` <= 0), at most ``window`` results computed ahead of the consumer (memory does
    not grow with the number of items)."""
    if workers <= 0:
        yield from map(fn, items)
        return
    window = max(window, 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early does not wait for the rest
            for future in pending:
                future.cancel()
