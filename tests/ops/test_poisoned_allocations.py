"""The poison of tests/ops/conftest.py is on: an op output that a kernel leaves unwritten is NaN."""

import torch


def test_fresh_allocations_are_poisoned():
    assert torch.empty(5).isnan().all() and torch.empty(2, 3, dtype=torch.bfloat16).isnan().all()
    assert (torch.empty(4, dtype=torch.int32) == torch.iinfo(torch.int32).max).all()
    assert torch.zeros(3).new_empty(7).isnan().all()  # what the C++ bindings' torch::empty calls
