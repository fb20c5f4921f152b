"""Device and precision choice: bfloat16 only where the asked-for CUDA device computes it natively."""

from __future__ import annotations

import pytest
import torch

from latentd.vae import devices
from latentd.vae.train import prepare


@pytest.fixture
def gpus(monkeypatch):
    """Two fake CUDA devices: cuda:0 a V100 (7.0, bf16 emulated), cuda:1 an A100 (8.0); cuda:0 current."""
    capabilities = {0: (7, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # counts emulation: never asked
    return capabilities


def test_bf16_is_chosen_per_device_by_its_compute_capability(gpus):
    assert not devices.native_bf16("cuda:0") and devices.native_bf16("cuda:1")
    assert not devices.native_bf16("cuda")  # the current device, cuda:0
    assert not devices.native_bf16("cpu")
    assert devices.resolve_placement("cuda:0").dtype == torch.float16
    assert devices.resolve_placement("cuda:1").dtype == torch.bfloat16
    assert devices.resolve_placement("cuda:0", "bfloat16").dtype == torch.bfloat16  # asked for: given
    gpus[0] = (9, 0)
    assert devices.resolve_placement("cuda").dtype == torch.bfloat16


def test_training_precision_follows_the_training_device(gpus):
    assert prepare._precision("auto", torch.device("cuda:1")) == "bf16"
    assert prepare._precision("auto", torch.device("cuda:0")) == "fp16"
    assert prepare._precision("fp16", torch.device("cuda:1")) == "fp16"
    assert prepare._precision("bf16", torch.device("cuda:0")) == "bf16"  # asked for: given, with a warning
    assert prepare._precision("bf16", torch.device("cpu")) == "no"
