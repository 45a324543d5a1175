"""Where the work of a run happens: one interface for a single process, data parallel, sharded weights and expert
groups. The training loop asks a :class:`Placement` which experts this rank holds, which optimizer steps it trains,
which slice of each global batch it computes, how a round's results are exchanged and how a checkpoint is
collected, and never branches on the mode itself.

* :class:`Placement`: every rank holds every trained expert and trains every step on its slice of each global batch
  (``ids[rank::world]``); one process is the case of a world of one, where every exchange is the value itself.
* :class:`ShardedPlacement`: the same, with the frozen expert weights FSDP2-sharded over all ranks; the sharded
  forward and backward are collectives, so a rank without a sample computes a stand-in with weight 0.
* :class:`GroupPlacement`: each expert on its own half of the ranks, data-parallel within the half; a round runs
  one step per expert at once, and the groups exchange only the round's losses, learning rates and stop request.

See :mod:`trainer_core.train.distributed` for why the gradient sum is one coalesced ``all_reduce`` and not DDP.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..config import JobConfig
from ..data import BatchRef
from ..errors import ConfigError
from ..schedule import active_expert, round_steps
from .distributed import DistContext, ExpertGroups, expert_groups, shard_frozen_weights
from .stop import stop_at_round_end

log = logging.getLogger(__name__)

S = TypeVar("S")


@dataclass(frozen=True)
class RankBatch(BatchRef):
    """One global batch as this rank computes it: ``sample_ids`` are the samples it loads (maybe none), ``rows``
    its rows of the noise and noise levels drawn for the whole batch of ``global_size`` samples, and ``share`` the
    weight of its mean loss in the global-batch mean. It travels through the data stream with the batch."""

    global_size: int = 0
    rows: tuple[int, ...] = ()
    share: float = 0.0


def resolve_device(setting: str) -> torch.device:
    """'auto' -> the current CUDA device if present, else CPU; otherwise the named device. A CUDA device always
    carries its index (``cuda:0``, never bare ``cuda``), so it compares equal to the device of the tensors on it."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {setting!r} but no CUDA GPU is visible - use 'auto' or 'cpu'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether ``a`` and ``b`` are one device; a CUDA device without an index means the current one (torch.device
    ``cuda`` != ``cuda:0`` although a tensor moved to the first lands on the second)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    index = [d.index if d.index is not None else torch.cuda.current_device() for d in (a, b)]
    return index[0] == index[1]


class Placement:
    """Single process or data parallel: every rank holds every trained expert and trains every step on its slice of
    each global batch; the LoRA gradients are summed over ranks before each optimizer step."""

    #: Whether every rank must run every backward, also of a non-finite loss (sharded weights are gathered there).
    collective_backward = False
    #: Whether the frozen weights are split over the ranks (the memory planner and the compile choice ask).
    sharded = False

    def __init__(self, cfg: JobConfig, ctx: DistContext, data: DistContext | None = None) -> None:
        self.ctx = ctx  # all ranks: rank 0 writes files, renders previews and shows progress
        self.data = data if data is not None else ctx  # the ranks that split each global batch between them
        self.stages = list(cfg.multistage.stages)
        self._every, self._steps = cfg.multistage.switch_every, cfg.train.steps
        device = resolve_device(cfg.train.device)
        self.device = torch.device("cuda", ctx.local_rank) if ctx.active and device.type == "cuda" else device

    def experts(self) -> list[str]:
        """The experts this rank holds and trains."""
        return list(self.stages)

    def round(self, step: int) -> list[int]:
        """The optimizer steps of the round that starts at 0-based ``step`` (run together, exchanged once)."""
        return round_steps(step, self._steps, self.stages, self._every, grouped=False)

    def trains(self, step: int) -> bool:
        """Whether this rank computes optimizer step ``step``."""
        return True

    def shard_fn(self) -> Callable[[torch.nn.Module], None] | None:
        """What to do with an expert's frozen weights before they move to the device (nothing: kept whole)."""
        return None

    def slice(self, ref: BatchRef, trains: bool) -> RankBatch:
        """This rank's part of global batch ``ref`` (nothing to load for a step it does not train)."""
        n = len(ref.sample_ids)
        ids = self.data.shard(ref.sample_ids) if trains else []
        rows = self.data.shard(range(n))
        return RankBatch(ref.epoch, ref.position, tuple(ids), n, tuple(rows), len(rows) / n if n else 0.0)

    def loss_sum(self, value: float) -> float:
        """A micro-batch's loss summed over the ranks that split it (each sends its share-weighted part)."""
        return self.data.sum(value)

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the ranks that split each batch."""
        self.data.all_reduce_grads(params)

    def exchange(
        self, trained: list[bool], losses: list[float], lrs: list[float], stop: bool
    ) -> tuple[list[float], list[float], bool]:
        """Every rank's view of a round: each step's loss and learning rate, and whether any rank asked to stop.
        Here every rank ran every step, so its own figures are everyone's."""
        return losses, lrs, stop

    def stop_requests(self, stop_file: Path | None) -> AbstractContextManager[Callable[[], bool]]:
        """A context giving a ``() -> bool`` that turns True when the run should stop at the end of a round (never
        here: a stop interrupts at once and the interrupted step is discarded)."""
        return nullcontext(lambda: False)

    def collect(self, snapshot: Callable[[str, bool], S]) -> dict[str, S] | None:
        """Every expert's ``snapshot(name, to_cpu)`` on the rank that writes checkpoints (rank 0), ``None`` on the
        others."""
        return {n: snapshot(n, False) for n in self.experts()} if self.ctx.is_main else None

    def saves_when_interrupted(self, step: int) -> bool:
        """Whether an interrupted run may write the state of its last completed step ``step`` on its way out."""
        return True


class ShardedPlacement(Placement):
    """Data parallel with the frozen expert weights FSDP2-sharded over all ranks (the LoRA weights stay whole)."""

    collective_backward = True
    sharded = True

    def shard_fn(self) -> Callable[[torch.nn.Module], None]:
        return lambda model: shard_frozen_weights(model, self.ctx, self.device)

    def slice(self, ref: BatchRef, trains: bool) -> RankBatch:
        """As data parallel, but a rank left without a sample (a bucket's short last batch) computes a stand-in
        sample of the global batch with weight 0: every rank must take part in the sharded forward and backward."""
        batch = super().slice(ref, trains)
        if batch.sample_ids:
            return batch
        n = len(ref.sample_ids)
        return RankBatch(ref.epoch, ref.position, (ref.sample_ids[self.ctx.rank % n],), n, (self.data.rank % n,), 0.0)


class GroupPlacement(Placement):
    """Expert groups: the first half of the ranks holds and trains ``stages[0]``, the second half ``stages[1]``,
    each half data-parallel on its own; a round runs one step per expert, both groups at once."""

    def __init__(self, cfg: JobConfig, ctx: DistContext) -> None:
        groups = expert_groups(ctx, cfg.multistage.stages)
        super().__init__(cfg, ctx, data=groups.data)
        self.groups: ExpertGroups = groups

    def experts(self) -> list[str]:
        return [self.groups.expert]

    def round(self, step: int) -> list[int]:
        return round_steps(step, self._steps, self.stages, self._every, grouped=True)

    def trains(self, step: int) -> bool:
        return self.groups.trains(active_expert(step, self.stages, self._every))

    def exchange(
        self, trained: list[bool], losses: list[float], lrs: list[float], stop: bool
    ) -> tuple[list[float], list[float], bool]:
        """One small collective over all ranks: each group's leader contributes the figures of the step its group
        ran (zeros elsewhere), and any rank's stop request counts."""
        lead = self.data.is_main
        values = [v if lead and t else 0.0 for t, v in zip(trained * 2, losses + lrs)]
        summed = self.ctx.sums([*values, float(stop)])
        n = len(losses)
        return summed[:n], summed[n : 2 * n], summed[-1] > 0

    def stop_requests(self, stop_file: Path | None) -> AbstractContextManager[Callable[[], bool]]:
        """Signals and ``stop_file`` only request a stop: both groups must stop after the same round to leave one
        consistent state."""
        return stop_at_round_end(stop_file)

    def collect(self, snapshot: Callable[[str, bool], S]) -> dict[str, S] | None:
        """Each group leader snapshots its expert in host memory; the second leader sends its own to rank 0."""
        mine = snapshot(self.groups.expert, True) if self.data.is_main else None
        collected = self.groups.collect_on_main(mine)
        return dict(zip(self.stages, collected)) if collected is not None else None

    def saves_when_interrupted(self, step: int) -> bool:
        """Never: the groups save only together, at a round's end; a rank that fails alone cannot gather the other
        group's expert."""
        if self.ctx.is_main:
            log.warning("expert groups: no state written for step %d; resume from the last saved one", step)
        return False


def make_placement(cfg: JobConfig, ctx: DistContext) -> Placement:
    """The placement ``cfg.distributed`` asks for; one process is always the plain :class:`Placement`."""
    if ctx.active and cfg.distributed.expert_groups:
        return GroupPlacement(cfg, ctx)
    if ctx.active and cfg.distributed.shard_experts:
        return ShardedPlacement(cfg, ctx)
    return Placement(cfg, ctx)
