"""Atomic artifact writes: a crash or interrupt never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import ConfigError, TrainerError

#: Suffix of the hidden temporary files :func:`atomic_path` writes (``.<final name>.<random>.tmp``); a run removes
#: those a killed process left in its own folder.
TMP_SUFFIX = ".tmp"
#: The temporary file safetensors writes through before it renames onto the path it was given (Rust's ``tempfile``
#: default name, ``.tmp`` + 6 random characters): a process killed mid-save leaves it behind too.
_SAFETENSORS_TMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of an unfinished atomic write (ours or safetensors')."""
    return (name.startswith(".") and name.endswith(TMP_SUFFIX)) or bool(_SAFETENSORS_TMP.match(name))


class ArtifactWriteError(TrainerError):
    """An artifact could not be written (disk full, read-only folder, ...); files written before are intact."""


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination folder; rename it onto ``final`` only on success.

    The file is created with mode 0666 minus the process umask (0644 under umask 022), like any file a program
    opens: ``mkstemp``'s 0600 would hide LoRAs in ``models/loras`` from other users and containers.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = final.parent / f".{final.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = tmp_path.stat().st_mode & 0o777  # 0666 minus the umask, as the OS applied it
    try:
        yield tmp_path
        os.chmod(tmp_path, mode)  # writers that replace the file (safetensors does) leave their own 0600
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


#: What to do about a full disk while a run writes into its output folder.
FULL_DISK_RUN = "free space (or point save.output_dir at another disk) and resume"


def atomic_write(final: str | os.PathLike, writer: Callable[[Path], None], full_disk: str = FULL_DISK_RUN) -> Path:
    """Run ``writer(tmp_path)`` and atomically move the result to ``final``.

    A failure of the file system (disk full, read-only, permissions) raises :class:`ArtifactWriteError` naming the
    file; ``final`` is then untouched. ``full_disk`` says what to do when the disk is full.
    """
    try:
        with atomic_path(final) as tmp:
            writer(tmp)
    except OSError as exc:
        raise ArtifactWriteError(f"could not write {final}: {_os_reason(exc, full_disk)}") from None
    except SafetensorError as exc:  # safetensors reports its own I/O errors as text ("... (os error 28)")
        reason = _os_reason(OSError(errno.ENOSPC if "os error 28" in str(exc) else None, str(exc)), full_disk)
        raise ArtifactWriteError(f"could not write {final}: {reason}") from None
    return Path(final)


def _os_reason(exc: OSError, full_disk: str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"the disk is full - {full_disk}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{exc.strerror} - make the folder writable or choose another one"
    return exc.strerror or str(exc)


def check_writable(folder: str | os.PathLike, setting: str, create: bool = True) -> None:
    """Create ``folder`` if needed and write (then remove) a probe file in it, so that a folder the run cannot
    write is refused before any model loads; ``setting`` names where the folder came from. ``create=False`` (a dry
    run) creates nothing: the probe goes into the nearest folder that exists, in which the run would create it."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():  # mkdir would only say "File exists"
        raise ConfigError(f"{setting}: cannot write to {folder}: {existing} is a file, not a folder - choose a "
                          "folder")
    target = folder if create else existing
    probe = target / f".write_probe.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot write to {folder} ({exc.strerror or exc}) - choose a writable "
                          "folder") from None


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], final: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (tensors are made contiguous and moved to CPU)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(final, lambda p: save_file(cpu, str(p), metadata=metadata))
