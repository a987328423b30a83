"""Test configuration shared by the whole suite.

* Triton kernels run on the CPU under TRITON_INTERPRET=1 where there is no GPU; it must be set
  before triton (or fast3d) is imported, hence here.
* `gpu` tests are skipped, with the reason, where torch sees no CUDA device.
* `seed` gives each test a fresh seed (or FAST3D_TEST_SEED to replay one) and prints it, so a
  failure names the seed that reproduces it.
"""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed(request):
    s = int(os.environ.get("FAST3D_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"\n[{request.node.nodeid}] seed={s} (replay with FAST3D_TEST_SEED={s})")
    request.node.user_properties.append(("seed", s))
    return s


@pytest.fixture
def gen(seed):
    """A CPU torch.Generator seeded with the test's printed seed."""
    return torch.Generator().manual_seed(seed)


def pytest_runtest_makereport(item, call):
    # Put the seed in the failure report itself, not only in captured stdout.
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                item.add_report_section("call", "seed", f"seed={value} (replay with FAST3D_TEST_SEED={value})")
