"""Atomic artifact writes: a crash or interrupt never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``final`` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(final: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``final``."""
    with atomic_path(final) as tmp:
        writer(tmp)
    return Path(final)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], final: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (tensors are made contiguous and moved to CPU)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(final, lambda p: save_file(cpu, str(p), metadata=metadata))
