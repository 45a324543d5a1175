"""Frozen tensors whose device memory can be dropped and restored from a host copy.

This is the one mechanism under both low-VRAM expert swapping and block offloading. A :class:`TensorGroup` keeps
its tensors' identities *and* their storage objects for good; only the storages' size changes: ``release`` resizes
them to 0 bytes (the memory goes back to PyTorch's allocator), ``load`` resizes them back and copies the bytes in
from the host copy. So every reference to the weights - module attributes, bitsandbytes quant states, views that
autograd saved for backward, autograd contexts that keep the layer (``trainer_core.quant``'s frozen matmul) - sees
them again as soon as they are loaded, and nothing keeps device memory while they are released. Frozen weights never
change, so the host copy is taken once and releasing costs no copy back.

On CUDA the copies run on a side stream (:class:`CopyEngine`) from page-locked host memory and a group records an
event; the compute stream waits for that event just before the group is used, so copies overlap computation. On
the CPU (tests) the same code copies synchronously between two CPU buffers.
"""

from __future__ import annotations

from enum import Enum
from typing import Iterable, Iterator

import torch
from torch import nn

#: Pinned host memory is handed out in chunks of this size (a power of two, see :class:`HostArena`).
HOST_CHUNK_BYTES = 1 << 30
_HOST_ALIGN = 4096


class HostArena:
    """Host memory for weight copies; page-locked when the weights go to a CUDA device.

    CUDA's caching host allocator rounds every pinned request up to a power of two (a 141 MB weight would take
    256 MB), so copies are packed into shared chunks of :data:`HOST_CHUNK_BYTES`; only larger tensors get their own
    buffer. Without pinning (CPU device) each copy is a plain CPU tensor.
    """

    def __init__(self, pin: bool, chunk_bytes: int = HOST_CHUNK_BYTES):
        self.pin = pin
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self.allocated_bytes = 0

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        """A host uint8 tensor holding a copy of the 1-D uint8 tensor ``src`` (any device)."""
        n = src.numel()
        if not self.pin:
            self.allocated_bytes += n
            return src.to("cpu", copy=True)
        if n > self.chunk_bytes:
            dst = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            self.allocated_bytes += n
        else:
            start = -(-self._used // _HOST_ALIGN) * _HOST_ALIGN
            if self._chunk is None or start + n > self.chunk_bytes:
                self._chunk = torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True)
                self.allocated_bytes += self.chunk_bytes
                start = 0
            dst = self._chunk[start : start + n]
            self._used = start + n
        dst.copy_(src)
        return dst

    def release(self) -> None:
        """Let go of the chunk being filled; once the groups have let go of their copies (:meth:`TensorGroup.restore`)
        no host memory of this arena is referenced."""
        self._chunk, self._used = None, 0


def empty_pinned_cache() -> None:
    """Return the page-locked host memory PyTorch caches after its tensors are freed to the OS.

    CUDA's caching host allocator keeps every freed pinned block for reuse until asked. A process that outlives its
    training run (a ComfyUI server) would otherwise keep the whole host copy of a Low VRAM run's experts resident for
    good, beside the experts it keeps in ordinary memory (12.8 GiB more after workflow 1 under a 22 GiB cap)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    accelerator = getattr(torch, "accelerator", None)
    empty = getattr(accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class CopyEngine:
    """Host-to-device copies for one device: a side CUDA stream, or synchronous copies on the CPU."""

    def __init__(self, device: torch.device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # storages report cuda:N; compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.arena = HostArena(pin=self.device.type == "cuda")

    def compute_stream(self) -> torch.cuda.Stream:
        """The stream the model computes on (the current stream of the device)."""
        return torch.cuda.current_stream(self.device)

    def release_host(self) -> None:
        """Give the host memory of restored groups' copies back: the arena lets go of its last chunk (a later copy
        starts a new one) and, on CUDA, pinned memory no tensor uses any more goes back to the OS instead of
        PyTorch's host cache."""
        self.arena.release()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy from a freed host block may still be in flight
            empty_pinned_cache()


class GroupState(Enum):
    """Where a group's bytes are."""

    RELEASED = "released"  # storages hold 0 bytes
    LOADING = "loading"  # copies enqueued on the copy stream, not yet waited for
    RESIDENT = "resident"


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    """All bytes of ``storage`` as a 1-D uint8 tensor (sharing it)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _quant_state_tensors(state: object) -> Iterator[torch.Tensor]:
    """The per-layer tensors of a bitsandbytes ``QuantState`` (nested states included).

    Codebooks (``code``) are skipped: bitsandbytes shares one dynamic-map tensor between all layers (a global
    cache), and they are a few hundred bytes.
    """
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor) and name != "code":
            yield value
        elif type(value) is type(state):
            yield from _quant_state_tensors(value)


def frozen_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Every frozen tensor the given modules own directly (not their children): parameters that do not require
    grad, buffers, and bitsandbytes quant-state tensors (``weight.quant_state``). Trainable parameters (LoRA) are
    left out: they must stay where the optimizer updates them."""
    found: dict[int, torch.Tensor] = {}
    for module in modules:
        tensors: list[torch.Tensor] = [p for p in module.parameters(recurse=False) if not p.requires_grad]
        tensors += list(module.buffers(recurse=False))
        owners = [module, *tensors]  # bitsandbytes keeps the state on the weight and on the Linear4bit module
        states = {id(s): s for s in (getattr(o, "quant_state", None) for o in owners) if s is not None}
        for state in states.values():
            tensors += list(_quant_state_tensors(state))
        for t in tensors:
            if t.numel():
                found.setdefault(id(t), t)
    return list(found.values())


class TensorGroup:
    """Frozen tensors that are loaded to and released from the device together (one block, or an expert's rest).

    Construction takes the host copy, puts the tensors on ``engine.device`` (rebinding those that live elsewhere to
    a new device storage) and leaves the group released, holding no device memory.
    """

    def __init__(self, name: str, tensors: list[torch.Tensor], engine: CopyEngine):
        self.name = name
        self.engine = engine
        self.state = GroupState.RELEASED
        self.misses = 0  # loads that the computation had to wait for from scratch (nothing prefetched)
        self._ready: torch.cuda.Event | None = None
        by_storage: dict[int, list[torch.Tensor]] = {}
        for t in tensors:
            by_storage.setdefault(_storage_key(t), []).append(t)
        self._storages: list[torch.UntypedStorage] = []
        self._hosts: list[torch.Tensor] = []
        with torch.no_grad():
            for users in by_storage.values():
                storage = users[0].untyped_storage()
                self._hosts.append(engine.arena.copy(_byte_view(storage)))
                if storage.device != engine.device or not storage.resizable():
                    storage = self._rebind(users, storage.nbytes())
                storage.resize_(0)
                self._storages.append(storage)
        self.nbytes = sum(h.numel() for h in self._hosts)

    def _rebind(self, users: list[torch.Tensor], nbytes: int) -> torch.UntypedStorage:
        """Point every tensor of ``users`` (views of one storage) at a new device storage of ``nbytes`` bytes."""
        storage = torch.UntypedStorage(nbytes, device=self.engine.device)
        for t in users:
            view = torch.empty(0, dtype=t.dtype, device=self.engine.device)
            t.data = view.set_(storage, t.storage_offset(), t.size(), t.stride())
        return storage

    def load(self) -> None:
        """Start bringing the bytes in (asynchronously on CUDA); no-op unless released."""
        if self.state is not GroupState.RELEASED:
            return
        for storage, host in zip(self._storages, self._hosts):
            storage.resize_(host.numel())  # allocated on the compute stream, in its order
        stream = self.engine.stream
        if stream is None:
            for storage, host in zip(self._storages, self._hosts):
                _byte_view(storage).copy_(host)
            self.state = GroupState.RESIDENT
            return
        # The new memory may have been freed by compute work that is still queued: copy only after it.
        stream.wait_stream(self.engine.compute_stream())
        with torch.cuda.stream(stream):
            for storage, host in zip(self._storages, self._hosts):
                _byte_view(storage).copy_(host, non_blocking=True)
            self._ready = stream.record_event()
        self.state = GroupState.LOADING

    def wait(self) -> None:
        """Make the computation wait until the bytes are in (loading them now if nobody prefetched them)."""
        if self.state is GroupState.RELEASED:
            self.misses += 1
            self.load()
        if self.state is GroupState.LOADING:
            self.engine.compute_stream().wait_event(self._ready)
            self._ready = None
            self.state = GroupState.RESIDENT

    def release(self) -> None:
        """Give the device memory back. Work already queued on the compute stream keeps its data (stream order)."""
        if self.state is GroupState.RELEASED:
            return
        if self.state is GroupState.LOADING:
            # Freed memory is reused in compute-stream order; the copy into it must be ordered before that reuse.
            self.engine.compute_stream().wait_event(self._ready)
            self._ready = None
        for storage in self._storages:
            storage.resize_(0)
        self.state = GroupState.RELEASED

    def restore(self) -> None:
        """Load and hand the tensors back as ordinary device tensors: the group lets go of their storages and of
        the host copy (used when detaching; the group is empty afterwards)."""
        self.load()
        self.wait()
        self._storages, self._hosts, self.nbytes = [], [], 0


def build_groups(members: dict[str, list[nn.Module]], engine: CopyEngine) -> dict[str, TensorGroup]:
    """One :class:`TensorGroup` per entry of ``members`` (name -> the modules whose own tensors it holds).

    A storage used by modules of two groups (a tied weight) belongs to neither: it stays where it is, resident.
    """
    tensors = {name: frozen_tensors(mods) for name, mods in members.items()}
    owners: dict[int, set[str]] = {}
    for name, ts in tensors.items():
        for t in ts:
            owners.setdefault(_storage_key(t), set()).add(name)
    return {
        name: TensorGroup(name, [t for t in ts if len(owners[_storage_key(t)]) == 1], engine)
        for name, ts in tensors.items()
    }
