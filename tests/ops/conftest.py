"""Op tests run with every fresh allocation poisoned (docs/design.md#tests-and-tolerances: "outputs
poisoned with NaN before the call so unwritten elements fail"). The ops allocate their outputs
themselves (torch::empty in the bindings, torch.empty before a Triton launch), so the poison goes
into the allocator:
`fill_uninitialized_memory` makes torch.empty return NaN (floats) or the largest value (integers)
while deterministic algorithms are on. `warn_only` keeps ops that have no deterministic variant
running (with a warning), so the tests still see the kernels they test. One side effect: torch
ops that have a deterministic variant (index_add_ and scatter on CUDA, say) use it here, in the
reference twins too; fast3d's own kernels have no such switch."""

import pytest
import torch


@pytest.fixture(autouse=True)
def poisoned_allocations():
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])

