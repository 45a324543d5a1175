"""The cooperative stop of expert-group runs and the group split (no process group needed for these)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from trainer_core.errors import ConfigError
from trainer_core.train.distributed import DistContext, expert_groups, peer_failure
from trainer_core.train.stop import ignore_stop_signals, stop_at_round_end


def test_first_signal_requests_a_stop_a_later_one_interrupts_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_at_round_end(repeat_after_s=0.2) as requested:
        assert not requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert requested()  # training goes on to the round's end
        os.kill(os.getpid(), signal.SIGINT)  # right after the first (Ctrl-C reaches workers twice): same request
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt, match="again"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_stop_file_requests_the_stop_without_a_signal(tmp_path):
    stop = tmp_path / "stop"
    with stop_at_round_end(stop) as requested:
        assert not requested()
        stop.touch()
        assert requested()


@pytest.mark.parametrize("world,stages", [(3, ["high", "low"]), (2, ["high"])])
def test_expert_groups_need_an_even_world_and_both_experts(world, stages):
    with pytest.raises(ConfigError, match=f"even number of GPUs, got {world} process"):
        expert_groups(DistContext(rank=0, world=world), stages)


def test_a_decided_process_ignores_further_stop_signals():
    # torchrun's closing SIGTERM or a second Ctrl-C during exit used to add a KeyboardInterrupt traceback
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        ignore_stop_signals()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # nothing raised: both were ignored
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])


def test_a_collective_broken_by_another_rank_is_told_from_this_rank_s_own_error():
    import torch.distributed as dist

    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:56715. This is "
                        "typically caused by a remote worker crashing.")
    assert peer_failure(gloo) and peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not peer_failure(OSError(5, "Input/output error")) and not peer_failure(RuntimeError("shape mismatch"))
