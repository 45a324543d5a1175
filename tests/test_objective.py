"""The objective's tensor functions against float64 references, and the placements' batch slicing, driven directly
(no model, no training run)."""

from __future__ import annotations

import pytest
import torch

from trainer_core.config import job_from_dict
from trainer_core.data import BatchRef
from trainer_core.train.distributed import DistContext
from trainer_core.train.objective import LossInputs, normal_loss, with_prior
from trainer_core.train.placement import Placement, ShardedPlacement
from tests.tiny_job import tiny_job


def _pred_target(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pred = torch.randn(3, 4, 2, 5, generator=gen, requires_grad=True)
    target = torch.randn(3, 4, 2, 5, generator=gen)
    weights = torch.rand(3, generator=gen) + 0.5
    return pred, target, weights


def _reference(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE, weighted mean over the batch, in float64."""
    err = (pred.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return (err * weights.double()).sum() / weights.numel()


def test_normal_loss_is_the_weighted_flow_matching_mse():
    pred, target, weights = _pred_target()
    loss, logged = normal_loss(pred, target, weights, None)
    torch.testing.assert_close(loss.double(), _reference(pred, target, weights), rtol=1e-6, atol=0)
    assert not logged.requires_grad and torch.equal(logged, loss.detach())


def test_guided_normal_loss_scales_the_loss_by_s_squared_and_the_gradient_by_s_and_logs_the_plain_loss():
    pred, target, weights = _pred_target(1)
    scale = 2.5
    loss, logged = normal_loss(pred, target, weights, scale)
    (grad,) = torch.autograd.grad(loss, pred)
    plain = pred.detach().double().requires_grad_(True)
    reference = _reference(plain, target, weights)
    (grad_ref,) = torch.autograd.grad(reference, plain)
    torch.testing.assert_close(loss.double(), scale**2 * reference.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), scale * grad_ref, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(logged.double(), reference.detach(), rtol=1e-6, atol=0)


def test_with_prior_replaces_only_the_regularization_rows():
    _, target, _ = _pred_target(2)
    prior = torch.randn(1, 4, 2, 5, dtype=torch.float64)
    out = with_prior(target, prior, [1])
    assert torch.equal(out[[0, 2]], target[[0, 2]]) and torch.equal(out[1], prior[0].float())
    assert out.dtype == target.dtype and not torch.equal(out, target)  # a copy: the target itself is unchanged


def test_loss_inputs_refuse_rows_outside_the_batch_and_missing_preservation_prompts():
    x = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="fall outside the batch of 2"):
        LossInputs(x, x, torch.zeros(2), x, prior_rows=[2])
    with pytest.raises(ValueError, match="rows for 2 preserved samples"):
        LossInputs(x, x, torch.zeros(2), x, preserve=[0, 1], text_preservation=torch.zeros(1, 1))


def _cfg(tmp_path):
    return job_from_dict(tiny_job(tmp_path / "out", tmp_path / "clips", 2, name="p", seed=0, switch_every=1,
                                  saving={}))


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_data_parallel_ranks_split_each_batch_once_with_shares_summing_to_one(tmp_path, n):
    world = 3
    ref = BatchRef(0, 4, tuple(range(10, 10 + n)))
    slices = [Placement(_cfg(tmp_path), DistContext(rank=r, world=world)).slice(ref, True) for r in range(world)]
    assert sorted(i for s in slices for i in s.sample_ids) == list(ref.sample_ids)
    assert sorted(r for s in slices for r in s.rows) == list(range(n))
    for s in slices:  # row k of the global draws belongs to sample k of the batch
        assert [ref.sample_ids[r] for r in s.rows] == list(s.sample_ids)
        assert (s.epoch, s.position, s.global_size) == (0, 4, n)
    assert sum(s.share for s in slices) == pytest.approx(1.0)
    # a step this rank does not train loads nothing
    assert Placement(_cfg(tmp_path), DistContext()).slice(ref, False).sample_ids == ()


def test_sharded_ranks_without_a_sample_compute_a_weightless_stand_in(tmp_path):
    world, ref = 3, BatchRef(1, 0, (7,))
    slices = [ShardedPlacement(_cfg(tmp_path), DistContext(rank=r, world=world)).slice(ref, True) for r in range(world)]
    assert slices[0].sample_ids == (7,) and slices[0].share == 1.0
    for s in slices[1:]:
        assert s.sample_ids == (7,) and s.rows == (0,) and s.share == 0.0


def test_one_process_exchanges_nothing_and_collects_every_expert(tmp_path):
    placement = Placement(_cfg(tmp_path), DistContext())
    assert placement.exchange([True], [0.5], [1e-3], False) == ([0.5], [1e-3], False)
    assert placement.collect(lambda name, to_cpu: (name, to_cpu)) == {"high": ("high", False), "low": ("low", False)}
    assert placement.round(0) == [0] and placement.trains(0) and placement.saves_when_interrupted(3)
    with placement.stop_requests(None) as stop_requested:
        assert stop_requested() is False
