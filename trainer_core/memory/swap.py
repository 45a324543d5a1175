"""Placing the experts on the device: plain, offloaded, and low-VRAM swapping at the multi-stage switch.

:class:`ExpertMemory` is what the training loop talks to. With neither ``low_vram`` nor offloading it just moves each
expert to the device. Otherwise every expert becomes an :class:`~.offload.OffloadedExpert`; with ``low_vram`` only the
active expert's weights are on the device and :meth:`ExpertMemory.activate` swaps: it releases the old expert (free:
frozen weights need no copy back) and enqueues the new one's copies from pinned host memory on the side stream, in
forward order with one event per block, so the first forward pass after the switch starts as soon as the embeddings
and block 0 are in and the rest of the copy overlaps the computation. :meth:`ExpertMemory.prefetch` can start that
copy a step earlier, when both experts fit on the card at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import MemoryConfig
from .offload import OffloadedExpert
from .planner import Plan
from .residency import CopyEngine

log = logging.getLogger(__name__)


@dataclass
class SwitchRecord:
    """One expert switch: what was copied and how long it took.

    ``blocking_seconds`` is how long :meth:`ExpertMemory.activate` held the caller (enqueueing only, unless it was
    asked to wait). :meth:`copy_seconds` is the duration of the host-to-device copies themselves, measured on the
    copy stream with CUDA events (wall clock on the CPU); calling it waits for the copies to finish.
    """

    expert: str
    nbytes: int
    blocking_seconds: float
    _start: torch.cuda.Event | None = field(default=None, repr=False)
    _end: torch.cuda.Event | None = field(default=None, repr=False)
    _copy_seconds: float | None = field(default=None, repr=False)

    def copy_seconds(self) -> float:
        """Seconds the copies took (waits for them)."""
        if self._copy_seconds is None:
            self._end.synchronize()
            self._copy_seconds = self._start.elapsed_time(self._end) / 1000.0
        return self._copy_seconds

    def gib_per_second(self) -> float:
        """Copy throughput in GiB/s."""
        seconds = self.copy_seconds()
        return self.nbytes / 2**30 / seconds if seconds > 0 else float("inf")


class ExpertMemory:
    """Puts experts on ``device`` according to the memory settings and swaps them when training switches.

    ``offload_blocks`` is a resolved count (see :func:`~.planner.estimate_peak_vram` for ``auto``).
    """

    def __init__(self, device: torch.device | str, *, low_vram: bool, offload_blocks: int, prefetch: int = 1):
        self.device = torch.device(device)
        self.low_vram = low_vram
        self.offload_blocks = offload_blocks
        self.prefetch_blocks = prefetch
        self.managed = low_vram or offload_blocks > 0
        self.engine = CopyEngine(self.device) if self.managed else None
        self.experts: dict[str, OffloadedExpert | nn.Module] = {}
        self.active: str | None = None
        self.switches: list[SwitchRecord] = []
        self._pending: SwitchRecord | None = None  # a prefetch started before its switch

    @classmethod
    def for_plan(cls, cfg: MemoryConfig, plan: Plan, device: torch.device | str) -> "ExpertMemory":
        """The memory settings with the planner's offload count (``auto`` resolved)."""
        return cls(device, low_vram=cfg.low_vram, offload_blocks=plan.offload_blocks, prefetch=cfg.prefetch)

    def place(self, name: str, model: nn.Module) -> None:
        """Take charge of expert ``name`` (LoRA attached; on the CPU or already on the device; quantized or not).

        Replaces ``model.to(device)``. With ``low_vram`` only the first expert placed starts on the device (and
        active); later ones start in host memory.
        """
        if not self.managed:
            model.to(self.device)
            self.experts[name] = model
            return
        first = not self.experts
        self.experts[name] = OffloadedExpert(
            name,
            model,
            self.engine,
            offload_blocks=self.offload_blocks,
            prefetch=self.prefetch_blocks,
            on_inactive_forward=self._activate_on_use,
        )
        if first or not self.low_vram:
            self.experts[name].active = True
            self.experts[name].load_working_set()
            self.active = self.active or name

    def activate(self, name: str, *, wait: bool = False) -> SwitchRecord | None:
        """Make ``name`` the expert being trained. Returns a record when low VRAM had to copy weights in; the caller
        logs it (the training loop, with the copy time it learns after the step), so a switch is logged once.

        ``wait=True`` blocks until the copies are done (a switch without overlap, for measurements).
        """
        if name not in self.experts:
            raise KeyError(f"no expert named {name!r} was placed (have {sorted(self.experts)})")
        if name == self.active or not self.managed:
            self.active = name
            return None
        t0 = time.perf_counter()
        old = self.experts.get(self.active)
        new = self.experts[name]
        self.active = name
        if not self.low_vram:
            old.release_streamed()
            new.load_working_set()
            return None
        if old is not None:
            old.release_all()
            old.active = False
        record = self._pending if self._pending is not None and self._pending.expert == name else self._load(new)
        self._pending = None
        new.active = True
        if wait:
            record.copy_seconds()
        record.blocking_seconds = time.perf_counter() - t0
        self.switches.append(record)
        return record

    def offload(self, name: str) -> None:
        """Low VRAM: send expert ``name`` to host memory now, so that nothing of it stays on the GPU (e.g. while the
        next expert is quantized there). The next :meth:`activate`, or a forward pass, brings it back."""
        if not self.low_vram:
            raise ValueError("offload() needs low_vram: without it every expert stays on the device")
        expert = self.experts[name]
        expert.release_all()
        expert.active = False
        if self.active == name:
            self.active = None

    def prefetch(self, name: str) -> None:
        """Low VRAM: start copying expert ``name`` in now, while the active one keeps training; the next
        :meth:`activate` of ``name`` then finds it (partly) loaded. Needs memory for both experts at once."""
        if self.low_vram and name != self.active and self._pending is None:
            self._pending = self._load(self.experts[name])

    def close(self) -> None:
        """Make every expert an ordinary model again (hooks removed) and give the host copies' memory back (pinned
        memory to the OS: a ComfyUI server lives on after the run, and CUDA's host cache would keep it).

        Offloaded blocks come back to the device, into the room their activations left. With Low VRAM the device
        holds one expert (both float8 experts do not fit a 24 GB card), and each ends in host memory, where it waited
        while training: restored on the device alone, its pinned copy freed, then moved out before the next."""
        if self.managed:
            if self.low_vram:
                for expert in self.experts.values():
                    expert.release_all()
            for expert in self.experts.values():
                expert.close()
                self.engine.release_host()
                if self.low_vram:
                    expert.model.to("cpu")
        self.experts.clear()
        self.active = None

    def model(self, name: str) -> nn.Module:
        """The expert's module (what the loop calls)."""
        expert = self.experts[name]
        return expert.model if isinstance(expert, OffloadedExpert) else expert

    def _load(self, expert: OffloadedExpert) -> SwitchRecord:
        stream = self.engine.stream
        if stream is None:
            t0 = time.perf_counter()
            nbytes = expert.load_working_set()
            return SwitchRecord(expert.name, nbytes, 0.0, _copy_seconds=time.perf_counter() - t0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.wait_stream(self.engine.compute_stream())  # so the timing starts at the first copy
        start.record(stream)
        nbytes = expert.load_working_set()
        end.record(stream)
        return SwitchRecord(expert.name, nbytes, 0.0, _start=start, _end=end)

    def _activate_on_use(self, expert: OffloadedExpert) -> None:
        # A forward pass of an inactive expert (e.g. the sampler going from the high- to the low-noise expert): no
        # caller sees this switch's record, so it is logged here.
        record = self.activate(expert.name)
        if record is not None:
            log.info("switched to the %s-noise expert: %.2f GiB copied in", expert.name, record.nbytes / 2**30)
