"""A cooperative stop for expert-group runs, where the two GPU groups must stop at the same step to leave one
consistent resumable state."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def stop_at_round_end(stop_file: Path | None = None, repeat_after_s: float = 2.0) -> Iterator[Callable[[], bool]]:
    """While active, the first SIGINT or SIGTERM only requests a stop: the returned callable turns True, and the
    training loop finishes the round, writes the resumable state with all ranks and raises ``KeyboardInterrupt``.
    A signal more than ``repeat_after_s`` after the first interrupts at once (without a new state); earlier ones are
    the same request (a terminal's Ctrl-C reaches the workers directly and again through torchrun). Outside the main
    thread signals cannot be caught. ``stop_file`` appearing requests the stop too: no signal, so no launcher's
    kill timeout (torchrun before 2.12 kills its workers 30 s after forwarding a SIGTERM) cuts the round short."""
    requested = threading.Event()
    first = [0.0]

    def stop_requested() -> bool:
        return requested.is_set() or (stop_file is not None and stop_file.exists())

    if threading.current_thread() is not threading.main_thread():
        yield stop_requested
        return

    def handler(signum: int, frame) -> None:
        now = time.monotonic()
        if not requested.is_set():
            first[0] = now
            requested.set()
        elif now - first[0] > repeat_after_s:
            raise KeyboardInterrupt(f"stopped at once ({signal.Signals(signum).name} again)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop_requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_held(redeliver: bool) -> Iterator[list[int]]:
    """While active (a checkpoint being written), SIGINT and SIGTERM are held instead of cutting the write short:
    an interrupted save would leave the previous state as the newest, losing every step since. On exit the handlers
    return and, with ``redeliver``, a held signal is raised again, so it stops the run as it would have; without (the
    save on the way out of an already interrupted run) it is dropped. Yields the list of held signal numbers. Outside
    the main thread signals cannot be caught, and nothing changes."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if held and redeliver:
            signal.raise_signal(held[0])


def ignore_stop_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing: for a process whose outcome is decided and that only has to print
    its line and exit. Under torchrun, a worker that failed (or whose peer did) gets torchrun's closing SIGTERM, and a
    second Ctrl-C can arrive during interpreter exit; raised there, either would replace the one line with a
    ``KeyboardInterrupt`` traceback. torchrun still ends a worker that hangs with SIGKILL. Main thread only."""
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
