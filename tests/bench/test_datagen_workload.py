"""The datagen bench workload: forward-only rows, render and render+encode side by side."""

import torch

from fast3d.bench.workloads import datagen as datagen_bench
from fast3d.bench.workloads import specs


def test_datagen_runs_forward_only_and_encodes(gen):
    spec = specs()["datagen"]
    assert spec.passes == ("forward",)
    w = spec.workload("orbit16-256")
    assert w.params["views"] == 16 and w.params["resolution"] == 256
    x = datagen_bench.make_inputs(w.quick, torch.device("cpu"), gen)
    rgb, alpha = datagen_bench.run("cpu", x)
    V, R = w.quick["views"], w.quick["resolution"]
    assert rgb.shape == (w.quick["objects"], V, R, R, 3) and alpha.shape == (w.quick["objects"], V, R, R, 1)
    assert alpha.max() > 0.1, "the objects should be in view"
    nbytes, flops = datagen_bench.model(w.params, "forward")
    assert nbytes > 0 and flops == 0
