"""A cooperative stop for expert-group runs, where the two GPU groups must stop at the same step to leave one
consistent resumable state."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def stop_at_round_end() -> Iterator[Callable[[], bool]]:
    """While active, the first SIGINT or SIGTERM only requests a stop: the returned callable turns True, and the
    training loop finishes the round, writes the resumable state with all ranks and raises ``KeyboardInterrupt``.
    A second signal interrupts at once (without a new state). Outside the main thread signals cannot be caught;
    the callable then stays False."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def handler(signum: int, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt(f"stopped at once ({signal.Signals(signum).name} twice)")
        requested.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
