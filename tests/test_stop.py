"""The cooperative stop of expert-group runs and the group split (no process group needed for these)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from trainer_core.errors import ConfigError
from trainer_core.train.distributed import DistContext, expert_groups
from trainer_core.train.stop import stop_at_round_end


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
