"""Wall-clock time of the slow phases (loading, caption encoding, quantization), logged so a user renting a GPU sees
where the time before the first step went."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def logged_seconds(log: logging.Logger, what: str) -> Iterator[None]:
    """Log ``"<what>: <seconds> s"`` at INFO when the block finishes (not when it raises)."""
    t0 = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - t0)
