"""fast3d.inference.common.default_device: the one default of every pipeline's device argument."""

from __future__ import annotations

import torch

from fast3d.inference.common import default_device


def test_default_device_is_cuda_when_there_is_one_else_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device() == torch.device(want)
    assert default_device(None) == default_device("") == torch.device(want)


def test_default_device_keeps_the_device_asked_for():
    assert default_device("cpu") == torch.device("cpu")
    assert default_device(torch.device("meta")) == torch.device("meta")
    assert default_device("cuda:1") == torch.device("cuda", 1)  # a name is parsed, not checked against the machine
