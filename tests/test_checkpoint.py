"""The checkpoint format: tensors only, RNG states restorable whatever device the weights go to."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoseg.checkpoint import CheckpointError, TrainState, load_checkpoint, restore_rng, save_checkpoint


def test_rng_state_restores_when_the_weights_are_mapped_to_another_device(tmp_path):
    """On a GPU the weights load onto the GPU but torch.set_rng_state wants a CPU byte tensor; the meta
    device stands in for the GPU."""
    net = nn.Conv3d(1, 2, 3)
    torch.manual_seed(5)
    torch.rand(3)
    save_checkpoint(tmp_path / "c.pt", net, None, None, TrainState(stage=1, step=7))
    expected = torch.rand(4)
    torch.manual_seed(99)
    payload = load_checkpoint(tmp_path / "c.pt", torch.device("meta"))
    assert all(t.device.type == "meta" for t in payload["network"].values())
    assert payload["torch_rng"].device.type == "cpu" and payload["torch_rng"].dtype == torch.uint8
    restore_rng(payload)
    assert torch.equal(torch.rand(4), expected)
    assert (payload["state"].stage, payload["state"].step) == (1, 7)
    assert payload["cuda_rng"] == []  # CUDA never started in this process


def test_optimizer_state_stays_on_the_cpu_and_loads_into_an_optimizer(tmp_path):
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", net, opt, None, TrainState())
    payload = load_checkpoint(tmp_path / "c.pt")
    fresh = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(payload["optimizer"])
    buf = fresh.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(buf, opt.state_dict()["state"][0]["momentum_buffer"])


def test_a_checkpoint_of_an_older_autoseg_without_cuda_rng_loads(tmp_path):
    net = nn.Linear(2, 2)
    torch.save({"network": net.state_dict(), "optimizer": {}, "grad_scaler": {}, "state": {"stage": 0, "step": 3},
                "torch_rng": torch.get_rng_state()}, tmp_path / "old.pt")
    payload = load_checkpoint(tmp_path / "old.pt")
    assert payload["cuda_rng"] == [] and payload["state"].step == 3
    restore_rng(payload)


def test_a_missing_checkpoint_is_named_as_missing_not_as_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint_final\.pt: no such file$"):
        load_checkpoint(tmp_path / "checkpoint_final.pt")
