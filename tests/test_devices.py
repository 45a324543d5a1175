"""Device names: a bare ``cuda`` and ``cuda:0`` are one card. The H200 run of benchmarks/e2e_fullscale.py found the
previews comparing ``cuda:0`` (the experts' parameters) with ``cuda`` (the resolved train.device), taking both
resident experts for visitors and moving them to the CPU after the first preview: the next step failed."""

from __future__ import annotations

import torch

from trainer_core.train.placement import resolve_device, same_device


def test_same_device_treats_a_bare_cuda_as_the_current_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert torch.device("cuda") != torch.device("cuda:0")  # why a plain comparison is wrong
    assert same_device(torch.device("cuda:0"), torch.device("cuda"))
    assert same_device("cuda", "cuda:0") and same_device("cpu", torch.device("cpu"))
    assert not same_device("cuda:1", "cuda")
    assert not same_device("cuda:0", "cuda:1") and not same_device("cpu", "cuda:0")


def test_resolved_cuda_devices_carry_their_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
