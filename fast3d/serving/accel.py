"""The speed switches of a served model (``fast3d serve --dtype bf16 --compile --cuda-graphs``),
installed on a pipeline's model by :func:`install` before its warm-up, so the warm-up compiles and
captures what the requests will run.

* ``dtype="bf16"``: the network runs under ``torch.autocast(bfloat16)``: the LGM's U-Net (its
  Pluecker rays, pixel anchors and Gaussian head stay float32: anchors rounded to bf16 would
  move every Gaussian by up to 2^-9 of its distance from the centre), the LRM's whole forward
  (encoder, transformer, upsampler). The weights stay float32 and the network's outputs come back
  as float32; camera normalisation, the LRM's point export and every rendering stay float32. On
  the CPU too (oneDNN's bf16 kernels).
* ``compile=True``: ``torch.compile`` (inductor, default mode) of the model's forward; the
  warm-up compiles it for every batch size the server forms.
* ``cuda_graphs=True`` (CUDA and the LGM only): the forward of each batch size is captured in a
  ``torch.cuda.CUDAGraph`` at warm-up and each batch replays it (its inputs copied into the
  captured ones: no per-kernel launch cost from the host). The turntable's rasterization passes
  the rasterizer's ``capacity=`` (:func:`fast3d.rasterization`), which sizes its binning buffers
  up front instead of reading the intersection count back to the host, so it is captured too
  (one graph per number of turntables); a render whose intersections overflow the capacity is
  detected after the replay and redone eagerly (counted in ``overflows``). Refused on the CPU
  (nothing to capture) and for the LRM (its point export has data-dependent shapes).

Each switch changes the numbers only as its precision does: a request's output is still the same
alone or in a batch (bitwise on the CPU, padded batches), within one setting.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Intersections allotted per Gaussian and image when the turntable render is captured: the
# binning buffers hold B x F x N x this many (Gaussian, 16x16 tile) pairs. A Gaussian of a
# reconstructed object covers a few tiles at the turntable's resolution; 16 leaves headroom, and
# an overflow is caught after the replay (the render is then redone without a capacity).
TILES_PER_GAUSSIAN = 16
WARMUP_RUNS = 3  # eager runs on a side stream before a capture (lazy initialisation, autotuning)


def check(dtype: str, compile: bool, cuda_graphs: bool, device: torch.device, kind: str) -> None:
    """ValueError naming the flag when a switch cannot apply to a ``kind`` model on ``device``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}; got {dtype!r}")
    for name, value in (("--compile", compile), ("--cuda-graphs", cuda_graphs)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device: a CUDA graph replays GPU kernels captured once, and "
                         f"this replica's model runs on {device.type} (serve on a GPU, or without --cuda-graphs)")
    if cuda_graphs and kind != "lgm":
        raise ValueError(f"--cuda-graphs applies to an LGM reconstructor (its forward and its rasterizer's capacity "
                         f"mode); the {kind} model's point export has data-dependent shapes, which a graph cannot hold")


def install(pipe, dtype: str = "fp32", compile: bool = False, cuda_graphs: bool = False) -> None:
    """Put the switches on ``pipe``'s model (its ``forward``) and, with ``cuda_graphs``, its
    turntable rasterization; ``pipe.accel`` records them (``/readyz`` shows it).

    Args:
        pipe: an LGM or LRM pipeline (:mod:`fast3d.serving.pipelines`), before its warm-up.
        dtype: ``fp32`` or ``bf16`` (autocast of the network: the LGM's U-Net, the LRM's forward).
        compile: ``torch.compile`` the forward.
        cuda_graphs: capture the forward and the turntable render per batch size (CUDA, LGM).
    """
    check(dtype, compile, cuda_graphs, pipe.device, pipe.kind)
    model = pipe.model
    if dtype != "fp32":
        net = model.unet if pipe.kind == "lgm" else model
        # autocast's weight-cast cache must be off while a graph is captured (its casts would be
        # captured once and the cache's tensors freed under the graph)
        net.forward = _autocast(net.forward, pipe.device.type, DTYPES[dtype], cache=not cuda_graphs)
    fn = model.forward
    if compile:
        fn = torch.compile(fn)
    if cuda_graphs:
        fn = _cloned(Graphs(fn, "the lgm forward"))
        pipe.rasterize = GraphedRender()
    if compile or cuda_graphs:
        model.forward = fn   # an instance attribute: nn.Module.__call__ runs it in place of LGM/LRM.forward
    pipe.accel = {"dtype": dtype, "compile": compile, "cuda_graphs": cuda_graphs}


def _float(out):
    if isinstance(out, Tensor):
        return out.float()
    if isinstance(out, dict):
        return {k: _float(v) for k, v in out.items()}
    return out


def _autocast(fn, device_type: str, dtype: torch.dtype, cache: bool):
    @functools.wraps(fn)
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype, cache_enabled=cache):
            out = fn(*args, **kwargs)
        return _float(out)
    return forward


def _cloned(fn):
    """``fn``'s outputs copied out of the graph's memory (the next replay overwrites them)."""
    @functools.wraps(fn)
    def forward(*args):
        out = fn(*args)
        return {k: v.clone() for k, v in out.items()} if isinstance(out, dict) else tuple(v.clone() for v in out)
    return forward


class Graphs:
    """``fn`` (tensors in, tensors out, no host synchronisation) captured in one CUDA graph per
    input shape, on first use (the pipeline's warm-up forms every batch size), then replayed:
    the inputs are copied into the captured ones and the captured outputs are returned (valid
    until the next call). The graphs share one memory pool: they never run at once."""

    def __init__(self, fn, what: str):
        self.fn, self.what = fn, what
        self.graphs: dict = {}
        self.pool = None

    def __call__(self, *args: Tensor):
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        static, graph, out = self.graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out

    def _capture(self, args):
        static = [a.clone() for a in args]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.fn(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(*static)
        except RuntimeError as e:  # a host synchronisation or an allocation the capture cannot hold
            shapes = ", ".join(str(list(a.shape)) for a in args)
            raise RuntimeError(f"--cuda-graphs: {self.what} of inputs {shapes} could not be captured in a CUDA "
                               f"graph ({e}); serve without --cuda-graphs") from e
        return static, graph, out


def raster(means: Tensor,        # [B, N, 3]
           quats: Tensor,        # [B, N, 4]
           scales: Tensor,       # [B, N, 3]
           opacities: Tensor,    # [B, N]
           colors: Tensor,       # [B, N, 3]
           viewmats: Tensor,     # [B, F, 4, 4]
           Ks: Tensor,           # [B, F, 3, 3]
           backgrounds: Tensor,  # [B, F, 3]
           width: int, height: int, capacity: int,
           ) -> tuple[Tensor, Tensor, Tensor]:  # -> images [B, F, 3, H, W], alphas [B, F, 1, H, W], overflow []
    """``LGM.render`` with the rasterizer's ``capacity``: no host synchronisation on CUDA (the
    function a graph captures: the cuda backend, named, so no dispatch runs under capture);
    ``overflow`` says whether the intersections exceeded it."""
    from fast3d.ops.rasterization import rasterization

    images, alphas, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height,
                                         backgrounds=backgrounds, capacity=capacity,
                                         backend="cuda" if means.is_cuda else "auto")
    return images.permute(0, 1, 4, 2, 3), alphas.permute(0, 1, 4, 2, 3), meta["overflow"]


class GraphedRender:
    """``LGM.render`` (same arguments and results) through :func:`raster` captured per shape
    (number of scenes, frames, Gaussians, size); an overflowing capacity is re-rendered eagerly."""

    def __init__(self):
        self.graphs: dict = {}
        self.overflows = 0

    def __call__(self, gaussians: dict,         # means [B, N, 3], quats, scales, opacities, colors
                 viewmats: Tensor,              # [B, F, 4, 4]
                 Ks: Tensor,                    # [B, F, 3, 3]
                 width: int, height: int,
                 backgrounds: Tensor | None = None,  # [B, F, 3]
                 ) -> tuple[Tensor, Tensor]:    # -> images [B, F, 3, H, W], alphas [B, F, 1, H, W]
        from fast3d.models.lgm import LGM
        from fast3d.models.lgm.model import GAUSSIAN_KEYS

        if backgrounds is None:
            return LGM.render(gaussians, viewmats, Ks, width, height)
        args = [gaussians[k].float().contiguous() for k in GAUSSIAN_KEYS]
        args += [viewmats.float().contiguous(), Ks.float().contiguous(), backgrounds.float().contiguous()]
        key = (width, height)
        if key not in self.graphs:
            self.graphs[key] = Graphs(functools.partial(_raster_at, width=width, height=height,
                                                        tiles=TILES_PER_GAUSSIAN), "the turntable rasterization")
        images, alphas, overflow = self.graphs[key](*args)
        if bool(overflow):  # a host read after the replay, not in the graph
            self.overflows += 1
            return LGM.render(gaussians, viewmats, Ks, width, height, backgrounds=backgrounds)
        return images.clone(), alphas.clone()


def _raster_at(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width: int, height: int,
               tiles: int):
    """:func:`raster` with ``tiles`` intersections per Gaussian and image as its capacity."""
    from fast3d.ops.rasterization.api import MAX_CAPACITY

    B, N = means.shape[:2]
    capacity = min(B * viewmats.shape[1] * N * tiles, MAX_CAPACITY)
    return raster(means, quats, scales, opacities, colors, viewmats, Ks, backgrounds, width, height, capacity)
