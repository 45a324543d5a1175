"""Data-parallel training on torch.distributed (launched with ``torchrun``); a no-op in a single process.

Every rank walks the same global batches and takes its slice of each (``ids[rank::world]``), with the noise and
noise levels drawn for the whole global batch and sliced the same way, so N ranks compute exactly the samples one
process would. Each rank scales its loss by its share of the global batch and the LoRA gradients are summed with one
coalesced ``all_reduce`` before the optimizer step: the result is the single-process gradient of the same global batch.

Why not ``DistributedDataParallel``: the two experts take turns (one optimizer, one model per stage), a bucket's last
batch can leave a rank with no sample, and the LoRA gradients are tiny next to the frozen 14B forward/backward, so
overlapping their reduction with the backward saves nothing measurable while DDP would demand every rank run a forward.

With ``distributed.expert_groups`` (two experts, an even number of ranks) the first half of the ranks holds and trains
the high-noise expert, the second half the low-noise one (:func:`expert_groups`): each group is data-parallel on its
own, both train at once, and the only traffic between the groups is one small exchange per round of steps (losses,
learning rates, a stop request) and the checkpoints' gather.

With ``distributed.shard_experts`` the frozen expert weights are sharded with FSDP2 (:func:`shard_frozen_weights`);
the LoRA weights are left out of the sharding (``ignored_params``), so everything above still holds for them. The
sharded forward and backward are collectives, so a rank without a sample then computes a stand-in sample of the
global batch with weight 0 instead of sitting the micro-batch out.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, TrainerError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the process group of this context's collectives (None: all ranks)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, renders previews and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's slice of a global batch."""
        return list(items[self.rank :: self.world])

    def share(self, n_local: int, n_global: int) -> float:
        """Weight of this rank's mean loss in the global-batch mean."""
        return n_local / n_global

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks in one coalesced call (missing gradients count as zero)."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
            offset += n

    def sum(self, value: float) -> float:
        """Sum a Python number over ranks."""
        return self.sums([value])[0]

    def sums(self, values: Sequence[float]) -> list[float]:
        """Sum each of several Python numbers over ranks, in one collective."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
        if not self.active:
            return [obj]
        box: list[Any] = [None] * self.world
        dist.all_gather_object(box, obj, group=self.group)
        return box

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class ExpertGroups:
    """This rank's place when each expert has its own half of the GPUs."""

    expert: str  # the expert this rank holds and trains
    data: DistContext  # this rank within its group: its slice of the global batches, the gradient sum
    rank: int  # global rank
    half: int  # ranks per group; global rank ``half`` leads the second group
    host_group: Any  # a gloo group of all ranks: checkpoints travel in host memory, not through GPU buffers

    def trains(self, expert: str) -> bool:
        """Whether this rank's group trains ``expert``."""
        return expert == self.expert

    def collect_on_main(self, obj: Any) -> list[Any] | None:
        """The two group leaders' ``obj`` (picklable, CPU tensors) on global rank 0, first group first; ``None``
        elsewhere. Only the leaders take part: the other ranks pass nothing and go on."""
        if self.rank == 0:
            received: list[Any] = [None]
            dist.recv_object_list(received, src=self.half, group=self.host_group)
            return [obj, received[0]]
        if self.rank == self.half:
            dist.send_object_list([obj], dst=0, group=self.host_group)
        return None


def check_expert_groups(ctx: DistContext, stages: Sequence[str]) -> None:
    """Refuse expert groups that cannot be formed: run before the run folder is claimed, so a refusal leaves none."""
    if len(stages) != 2 or ctx.world % 2:
        raise ConfigError(
            f"distributed.expert_groups needs both experts and an even number of GPUs, got {ctx.world} process(es) "
            f"for {list(stages)} - launch an even number of processes (torchrun --nproc_per_node) or set "
            "distributed.expert_groups: false"
        )


def expert_groups(ctx: DistContext, stages: Sequence[str]) -> ExpertGroups:
    """Split the ranks in two process groups: ``[0, N/2)`` trains ``stages[0]``, ``[N/2, N)`` ``stages[1]``."""
    check_expert_groups(ctx, stages)
    half = ctx.world // 2
    # every rank creates every group, in the same order
    groups = [dist.new_group(list(range(half))), dist.new_group(list(range(half, ctx.world)))]
    host_group = dist.new_group(backend="gloo")
    g = ctx.rank // half
    data = DistContext(rank=ctx.rank - g * half, world=half, local_rank=ctx.local_rank, group=groups[g])
    return ExpertGroups(expert=stages[g], data=data, rank=ctx.rank, half=half, host_group=host_group)


@functools.cache
def _mesh(device_type: str, world: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def shard_frozen_weights(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> None:
    """FSDP2-shard ``model``'s frozen weights over all ranks: each transformer block is one unit (gathered for its
    forward and again for its backward), the rest of the model another. Trainable (LoRA) parameters are ignored by
    FSDP and stay whole on every rank. The shards move to ``device``; call before building the optimizer."""
    from torch.distributed.fsdp import fully_shard

    # The model's output is a view (unpatchify); the trainer never modifies it in place, which is what FSDP warns of.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = _mesh(device.type, ctx.world)
    trainable = {p for p in model.parameters() if p.requires_grad}
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)


def init_distributed(device_setting: str) -> DistContext:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_setting != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _store().set(_PID_KEY.format(rank), str(os.getpid()))  # for :func:`speaks_for_the_run`
    return DistContext(rank=rank, world=world, local_rank=local_rank)


# --- when a rank fails -----------------------------------------------------------------------------------------------
# Each rank prints its own output, so a failure must be told apart: one rank's own error (it speaks), an error every
# rank hit alike (rank 0 speaks for all), or a collective broken by another rank's exit (rank 0 names that rank and
# what is kept). The ranks tell each other through the launcher's key-value store, which outlives any worker.

#: Seconds a non-zero rank waits for rank 0's error before deciding that its own is its alone (only ranks that failed
#: wait; the ones that fail alike record their error within moments of each other).
ALIKE_WAIT_S = 10.0
_ERROR_KEY = "wan22/error/{}"
_PID_KEY = "wan22/pid/{}"


class PeerStopped(TrainerError):
    """A collective failed because another process of the run stopped (crashed, killed, or its own error)."""


class RanksRefused(TrainerError):
    """The start-up checks refused the job on one or more ranks; rank 0's line speaks for every rank."""


def on_every_rank(ctx: DistContext, checks: Callable[[], T]) -> T:
    """Run ``checks`` (no collective inside) on every rank, then agree on the outcome: when any rank raised a
    trainer error, every rank raises :class:`RanksRefused` holding each distinct error once (with the ranks that hit
    it, unless all did). Deterministic, unlike waiting for each other's errors: ranks that fail alike print one line."""
    if not ctx.active:
        return checks()
    result, error = None, None
    try:
        result = checks()
    except TrainerError as exc:
        error = str(exc)
    errors = ctx.all_gather_object(error)
    ranks_of: dict[str, list[int]] = {}
    for rank, message in enumerate(errors):
        if message is not None:
            ranks_of.setdefault(message, []).append(rank)
    if not ranks_of:
        return result
    if len(ranks_of) == 1 and len(next(iter(ranks_of.values()))) == ctx.world:
        raise RanksRefused(next(iter(ranks_of)))
    raise RanksRefused("; ".join(f"rank {', '.join(map(str, r))}: {m}" for m, r in ranks_of.items()))


#: Fragments of the errors gloo raises when the other end of a collective is gone (NCCL's are ``DistError``).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away, not this rank's own error."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_GONE)


def _store() -> Any:
    """The process group's key-value store (torchrun's agent holds it: it outlives any worker)."""
    return dist.distributed_c10d._get_default_store()


def record_failure(message: str) -> None:
    """Leave this rank's error where the other ranks look (no-op outside a process group, or when the store is
    already gone: the message is only a courtesy to the others)."""
    if dist.is_initialized():
        # the launcher may be tearing down the store; this rank prints its own line all the same
        with contextlib.suppress(Exception):
            _store().set(_ERROR_KEY.format(dist.get_rank()), message)


def failed_ranks() -> list[int]:
    """The ranks that recorded an error of their own (:func:`record_failure`), without waiting."""
    if not dist.is_initialized():
        return []
    try:
        store = _store()
        return [r for r in range(dist.get_world_size()) if store.check([_ERROR_KEY.format(r)])]
    except Exception:  # noqa: BLE001 - no store left to ask: the rank is not known
        return []


def failed_like_rank0(wait_s: float = ALIKE_WAIT_S) -> bool:
    """On a non-zero rank that recorded its error: whether rank 0 recorded the same one (then rank 0's line speaks
    for this rank). Waits up to ``wait_s`` for rank 0's; ``False`` when none came or the store is gone."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        return False
    try:
        store, own = _store(), _ERROR_KEY.format(dist.get_rank())
        if not store.check([own]):
            return False
        store.wait([_ERROR_KEY.format(0)], timedelta(seconds=wait_s))
        return store.get(_ERROR_KEY.format(0)) == store.get(own)
    except Exception:  # noqa: BLE001 - a timeout, or the store is gone: this rank's error is its own
        return False


def _running(pid: int) -> bool:
    """Whether process ``pid`` (of this host) still runs: a killed worker stays a zombie until torchrun reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return not os.path.isdir("/proc")  # no /proc to ask (not Linux): assume it runs, so rank 0 alone speaks


def speaks_for_the_run() -> bool:
    """Whether this rank says what a run stopped by another rank's exit kept: rank 0, or the lowest rank still
    running when the ranks below it have ended (killed: they cannot speak). On several hosts, rank 0 only."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return rank == 0
    try:
        store = _store()
        return not any(_running(int(store.get(_PID_KEY.format(r)))) for r in range(rank))
    except Exception:  # noqa: BLE001 - no store left to ask: leave it to rank 0
        return False
