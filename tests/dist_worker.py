"""Entry point for the torchrun tests: the CLI's `train`, recording which ranks write checkpoints; with FAULT set,
one rank fails on purpose (FAULT=raise: an OSError, FAULT=nan_loss: a NaN loss, FAULT=exit: the process ends at
once, as if killed) at its FAULT_CALL-th backward
(1-based) on rank FAULT_RANK."""

import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trainer_core.train.loop as loop  # noqa: E402
import trainer_core.train.objective as objective  # noqa: E402
import trainer_core.train.placement as placement  # noqa: E402
from trainer_core.cli import main  # noqa: E402

_real_save = loop.save_checkpoint


def _recording_save(*args, **kwargs):
    record = Path(os.environ["WRITES_LOG"])
    with open(record, "a") as fh:
        fh.write(f"{os.environ.get('RANK', '0')}\n")
    return _real_save(*args, **kwargs)


_real_shard = placement.shard_frozen_weights


def _recording_shard(model, ctx, device):
    """Record how many elements of the frozen block weights this rank holds after sharding, and of how many."""
    _real_shard(model, ctx, device)
    frozen = [p for p in model.blocks.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() for p in frozen)
    with open(os.environ["WRITES_LOG"] + ".shards", "a") as fh:
        fh.write(f"{ctx.rank} {local} {sum(p.numel() for p in frozen)}\n")


_real_prepare = loop.prepare_expert


def _recording_prepare(name, *args, **kwargs):
    """Record which expert each rank prepares (and so holds)."""
    with open(os.environ["WRITES_LOG"] + ".experts", "a") as fh:
        fh.write(f"{os.environ.get('RANK', '0')} {name}\n")
    return _real_prepare(name, *args, **kwargs)


_real_dataset = loop.job_dataset


def _rank1_folder_dataset(cfg):
    """With RANK1_DATASET set, rank 1 finds other clips than rank 0 (a folder that changed between the scans)."""
    other = os.environ.get("RANK1_DATASET")
    if other and os.environ.get("RANK") == "1":
        cfg = cfg.model_copy(update={"datasets": [cfg.datasets[0].model_copy(update={"folder": other})]})
    return _real_dataset(cfg)


_real_backward = objective.Objective.backward
_calls = [0]


def _faulty_backward(self, model, micro):
    """The real backward, except on FAULT_RANK's FAULT_CALL-th call (see the module's docstring)."""
    _calls[0] += 1
    hit = os.environ.get("RANK") == os.environ.get("FAULT_RANK") and _calls[0] == int(os.environ["FAULT_CALL"])
    if hit and os.environ["FAULT"] == "raise":
        raise OSError(5, "Input/output error (injected)", "clip002.mp4")
    if hit and os.environ["FAULT"] == "exit":  # as if killed: no line, no state of its own
        os._exit(3)
    loss = _real_backward(self, model, micro)
    return math.nan if hit and os.environ["FAULT"] == "nan_loss" else loss


if os.environ.get("FAULT"):
    objective.Objective.backward = _faulty_backward
loop.job_dataset = _rank1_folder_dataset
loop.save_checkpoint = _recording_save
loop.prepare_expert = _recording_prepare
placement.shard_frozen_weights = _recording_shard
sys.exit(main(sys.argv[1:]))
