"""The models a server serves, as batch pipelines: per-request preparation (checks, resizing,
cameras), one forward and one rasterization per batch, and per-request encoding (PLY / .splat).

A pipeline's output for a request is the same, bit for bit on the CPU, whether the request ran
alone or in a batch (tests/serving/test_pipelines.py checks it): inputs are resized and their
cameras built per request, every batched op is per-sample, and with ``fixed_batch`` (the default
on the CPU) every batch is padded to ``max_batch`` by repeating its first request, so every
request runs in the same shapes wherever it sits in the batch. The padding is needed: the CPU
kernels are not batch-size invariant (oneDNN picks another 1x1-convolution algorithm for the
LGM's 16 images of a 4-request batch than for 4 images on one thread; the LRM's matrix products
take a matrix-vector path at one row), though they are invariant to a sample's position in a batch
of fixed size. On a GPU batches run at their own size (``fixed_batch=False``) by default.

Adding a model is one subclass of :class:`Pipeline` registered in ``PIPELINES`` under its
checkpoint's model type. :class:`GeneratePipeline` (``fast3d generate``'s image path: one image ->
multi-view diffusion -> LGM or LRM) wraps a reconstructor's pipeline: its per-request
:meth:`~GeneratePipeline.prepare` preprocesses the image and samples the views (the request's
seed, steps and guidance), and the views and their cameras go to the reconstructor's batched
forward.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fast3d import cameras as cams
from fast3d.serving import accel

FORMATS = ("ply", "splat")


class RequestError(ValueError):
    """A client's mistake: an HTTP status, the request field at fault and what is wrong."""

    def __init__(self, field: str, message: str, status: int = 400, kind: str = "invalid"):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.kind = field, message, status, kind

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message, "kind": self.kind}}


@dataclass
class Prepared:
    """One checked request, ready to batch: the model inputs (one sample each) and what the
    turntable needs."""
    inputs: dict[str, Tensor]
    turntable: bool
    extra: dict = field(default_factory=dict)


@dataclass
class Result:
    """One request's reconstruction, and the batch it ran in."""
    scene: dict[str, Tensor]
    turntable: Tensor | None      # [F, 3, H, W] in [0, 1], or None
    batch_size: int
    latency_ms: dict[str, float]  # the batch's stages, shared by its requests


def _timed(stages: dict, name: str, t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    stages[name] = (t - t0) * 1e3
    return t


class Pipeline(ABC):
    """A served model. Subclasses set ``kind`` and ``num_images`` and implement :meth:`prepare`,
    :meth:`forward`, :meth:`render` and :meth:`encode`. ``fixed_batch``: pad every batch to
    ``max_batch`` (the module docstring; default: on the CPU)."""

    kind = ""
    num_images = 1
    takes_rgba = False       # prepare gets the decoded RGBA images (True) or them composited over white
    params: dict = {}        # request parameters it takes: name -> (type, lo, hi), both ends closed
    path = ""                # the model's directory (load_pipeline sets it)
    accel = {"dtype": "fp32", "compile": False, "cuda_graphs": False}  # fast3d.serving.accel.install's switches

    def __init__(self, model, max_batch: int, turntable_frames: int, fixed_batch: bool | None = None):
        self.model, self.max_batch, self.turntable_frames = model, max_batch, turntable_frames
        self.device = next(model.parameters()).device
        self.fixed_batch = self.device.type == "cpu" if fixed_batch is None else fixed_batch

    @property
    def output_kind(self) -> str:
        """The model whose files it writes ("lgm" or "lrm")."""
        return self.kind

    def describe(self) -> dict:
        return {"model": self.kind, "images": self.num_images, "max_batch": self.max_batch,
                "fixed_batch": self.fixed_batch, "turntable_frames": self.turntable_frames,
                "device": str(self.device), **self.accel}

    def _check_images(self, images: list[Tensor]) -> int:  # images: V x [3, H, W] -> the side R
        if len(images) != self.num_images:
            raise RequestError("images", f"the {self.kind} model takes {self.num_images} image(s); got {len(images)}")
        for i, im in enumerate(images):
            if im.shape[1] != im.shape[2]:
                raise RequestError(f"images[{i}]", f"must be square; got {im.shape[2]}x{im.shape[1]}")
            if im.shape != images[0].shape:
                raise RequestError(f"images[{i}]", f"is {im.shape[2]}x{im.shape[1]}; images[0] is "
                                                   f"{images[0].shape[2]}x{images[0].shape[1]} (all must match)")
        return images[0].shape[-1]

    def check_params(self, params: dict | None) -> dict:
        """A request's parameters (``seed``, ``steps``, ... as decoded JSON or multipart text),
        checked against :attr:`params` (RequestError naming the field) and converted."""
        out = {}
        for name, value in (params or {}).items():
            if name not in self.params:
                raise RequestError(name, f"the {self.kind} model takes no {name}"
                                         + (f"; it takes {sorted(self.params)}" if self.params else ""))
            typ, lo, hi = self.params[name]
            if isinstance(value, str):
                try:
                    value = typ(value.strip())
                except ValueError:
                    raise RequestError(name, f"must be {'an integer' if typ is int else 'a number'}; "
                                             f"got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (typ is int and value != int(value)) \
                    or value != value:
                raise RequestError(name, f"must be {'an integer' if typ is int else 'a number'}; got {value!r}")
            if not lo <= value <= hi:
                raise RequestError(name, f"must be in [{lo}, {hi}]; got {value!r}")
            out[name] = typ(value)
        return out

    @abstractmethod
    def prepare(self, images: list[Tensor], cameras, turntable: bool, params: dict | None = None) -> Prepared:
        """Check one request (RequestError naming the field) and build its model inputs."""

    @abstractmethod
    def forward(self, inputs: dict[str, Tensor], n: int) -> list[dict[str, Tensor]]:
        """The batched inputs (each [B, ...]) -> the scenes of the first ``n`` (the rest is padding)."""

    @abstractmethod
    def render(self, scenes: list[dict], extras: list[dict]) -> Tensor:  # -> [B', F, 3, H, W]
        """The turntables of some scenes, in one rasterization call."""

    @abstractmethod
    def encode(self, scene: dict, fmt: str) -> bytes:
        """One scene as a file: ``ply`` (as ``fast3d infer`` writes it) or ``splat``."""

    def run(self, batch: list[Prepared]) -> list[Result]:
        """One forward over the batch and one rasterization of the turntables asked for."""
        if not batch:
            return []
        stages: dict[str, float] = {}
        n = len(batch)
        rows = list(batch)
        if self.fixed_batch and n < self.max_batch:
            rows += [batch[0]] * (self.max_batch - n)
        t = time.perf_counter()
        inputs = {k: torch.cat([p.inputs[k] for p in rows]).to(self.device) for k in batch[0].inputs}
        with torch.no_grad():
            scenes = self.forward(inputs, n)
            t = _timed(stages, "model", t)
            want = [i for i, p in enumerate(batch) if p.turntable]
            frames = {}
            if want:
                rendered = self.render([scenes[i] for i in want], [batch[i].extra for i in want])
                frames = dict(zip(want, rendered.cpu()))
                _timed(stages, "render", t)
        return [Result({k: v.cpu() for k, v in s.items()}, frames.get(i), n, stages) for i, s in enumerate(scenes)]


class LGMPipeline(Pipeline):
    """LGM: 4 posed views (the model's canonical input rig when no cameras are given) -> 3D
    Gaussians in the input cameras' world, as :func:`fast3d.inference.lgm.infer` writes them."""

    kind = "lgm"
    rasterize = None  # LGM.render's stand-in (accel.GraphedRender with --cuda-graphs), or None: LGM.render

    def __init__(self, model, max_batch: int, turntable_frames: int, fixed_batch: bool | None = None):
        super().__init__(model, max_batch, turntable_frames, fixed_batch)
        self.num_images = model.config.num_input_views

    def prepare(self, images, cameras, turntable, params=None):
        from fast3d.inference.lgm import default_input_cameras, parse_cameras, resize_inputs, rig_distance

        self.check_params(params)
        R = self._check_images(images)
        if cameras is None:
            vm, Ks = default_input_cameras(self.model.config, R)
        else:
            try:
                vm, Ks = parse_cameras(cameras, self.num_images, "cameras")
            except ValueError as e:
                raise RequestError("cameras", str(e)) from None
        x, K = resize_inputs(torch.stack(images)[None], Ks[None], self.model.config.input_size)
        return Prepared({"images": x, "viewmats": vm[None], "Ks": K}, turntable, {"distance": rig_distance(vm)})

    def forward(self, inputs, n):
        from fast3d.inference.lgm import world_gaussians

        world = world_gaussians(self.model, inputs["images"], inputs["viewmats"], inputs["Ks"])
        return [{k: v[i] for k, v in world.items()} for i in range(n)]

    def render(self, scenes, extras):
        from fast3d.inference.lgm import turntable_cameras
        from fast3d.models.lgm import LGM

        cfg, F, res = self.model.config, self.turntable_frames, self.model.config.render_size
        tv, tK = zip(*(turntable_cameras(cfg, e["distance"], F, res) for e in extras))
        g = {k: torch.stack([s[k] for s in scenes]) for k in scenes[0]}
        rgb, _ = (self.rasterize or LGM.render)(g, torch.stack(tv).to(self.device), torch.stack(tK).to(self.device),
                                                res, res, backgrounds=torch.ones(len(scenes), F, 3, device=self.device))
        return rgb

    def encode(self, scene, fmt):
        from fast3d.inference.lgm import gaussians_ply_bytes
        from fast3d.io.splat import splat_bytes

        if fmt == "ply":
            return gaussians_ply_bytes(scene)
        return splat_bytes(scene["means"], scene["quats"], scene["scales"], scene["opacities"], scene["colors"])


class LRMPipeline(Pipeline):
    """LRM: one image (seen from the model's default source camera, else the canonical one, unless
    ``cameras`` says otherwise; see :func:`fast3d.inference.lrm.source_camera`) -> a triplane,
    exported as the coloured surface point cloud ``fast3d infer`` writes (``ply``), or those
    points as isotropic Gaussians of half a grid cell, opaque (``splat``)."""

    kind = "lrm"
    point_grid = 64   # the export's density grid (128 in ``fast3d infer``; 64 keeps a CPU request under a second)


    def describe(self):
        return {**super().describe(), "point_grid": self.point_grid}

    def prepare(self, images, cameras, turntable, params=None):
        from fast3d.inference.lgm import resize_inputs
        from fast3d.inference.lrm import source_camera

        self.check_params(params)
        R = self._check_images(images)
        try:
            vm, K, cam = source_camera(cameras, R, self.model.config.source_camera)
        except ValueError as e:
            raise RequestError("cameras", str(e)) from None
        s = self.model.config.image_size
        x, K = resize_inputs(images[0][None, None], K[None], s)
        return Prepared({"image": x[:, 0], "viewmat": vm, "K": K[:, 0]}, turntable, {"camera": cam})

    def forward(self, inputs, n):
        from fast3d.inference.mesh import DENSITY_THRESHOLD

        planes = self.model(inputs["image"], inputs["viewmat"], inputs["K"])      # [B, 3, C, h, w]
        out = []
        for p in planes[:n]:
            points, colors = self.model.extract_points(p, self.point_grid, DENSITY_THRESHOLD)
            out.append({"planes": p, "points": points, "colors": colors})
        return out

    def render(self, scenes, extras):
        F, res = self.turntable_frames, self.model.config.image_size
        tv, tK = zip(*(cams.turntable(F, res, e["camera"]["elevation_deg"], e["camera"]["distance"],
                                      e["camera"]["fov_y_deg"]) for e in extras))
        planes = torch.stack([s["planes"] for s in scenes])
        return self.model.render(planes, torch.stack(tv).to(self.device), torch.stack(tK).to(self.device), res, res,
                                 background=torch.ones(3, device=self.device))["images"].float()

    def encode(self, scene, fmt):
        from fast3d.io.ply import points_ply_bytes
        from fast3d.io.splat import splat_bytes

        points, colors = scene["points"], scene["colors"]
        if fmt == "ply":
            return points_ply_bytes(points, colors)
        N = points.shape[0]
        half_cell = self.model.config.bound / self.point_grid
        quats = torch.zeros(N, 4)
        quats[:, 0] = 1
        return splat_bytes(points, quats, torch.full((N, 3), half_cell), torch.ones(N), colors)


class GeneratePipeline(Pipeline):
    """``fast3d generate``'s image path: one image (RGBA: its alpha cuts the object out, as
    ``fast3d generate --image`` reads it) -> the multi-view diffusion model's views, sampled per
    request in :meth:`prepare` (:func:`fast3d.inference.generate.image_views`) with the request's
    ``seed``, ``steps`` and ``guidance`` -> the reconstructor's batched forward on the views it
    takes (the rig check of :func:`fast3d.inference.generate.check_rig`, at load). A request's file
    is the one ``fast3d generate`` writes (``gaussians.ply`` / ``points.ply``) for the same seed;
    bitwise on the CPU where the reconstructor runs at generate's batch shape (``max_batch`` 1; a
    padded batch differs in the last bits, see the module docstring)."""

    kind = "generate"
    num_images = 1
    takes_rgba = True
    # Server bounds of a request's sampling: a seed of 31 bits, at most 200 sampler steps (the
    # request's cost is linear in them), guidance in [0, 30] (1: none; image models use 2-5).
    params = {"seed": (int, 0, 2**31 - 1), "steps": (int, 1, 200), "guidance": (float, 0.0, 30.0)}

    def __init__(self, mv, recon: Pipeline, views: list[int] | None = None):
        from fast3d.inference.generate import Reconstructor, check_rig

        if mv.kind != "mvdiff":
            raise ValueError(f"mv_model {mv.path!r} is a {mv.kind!r} model; the server's generate model takes an "
                             f"image, so it needs an image-conditioned multi-view diffusion model ('mvdiff')")
        super().__init__(recon.model, recon.max_batch, recon.turntable_frames, recon.fixed_batch)
        self.mv, self.recon = mv, recon
        self.views = check_rig(mv, Reconstructor(recon.kind, recon.path, recon.model), views)
        self.viewmats, self.Ks = mv.cameras()                                   # [V, 4, 4], [V, 3, 3]

    @property
    def output_kind(self) -> str:
        return self.recon.kind

    def describe(self) -> dict:
        return {**self.recon.describe(), "model": self.kind, "images": 1, "reconstructor": self.recon.kind,
                "multiview": {"rig": self.mv.rig, "views": self.mv.num_views, "resolution": self.mv.resolution,
                              "recon_views": self.views}}

    def prepare(self, images, cameras, turntable, params=None):
        from fast3d.inference.generate import Settings, image_views

        p = self.check_params(params)
        if cameras is not None:
            raise RequestError("cameras", "the generate model takes no cameras (the views are its rig's)")
        if len(images) != 1:
            raise RequestError("images", f"the generate model takes 1 image; got {len(images)}")
        s = Settings(steps=p.get("steps"), guidance=p.get("guidance"), seed=p.get("seed", 0)).resolved("mvdiff")
        try:
            v = image_views(self.mv, images[0], s, name="images[0]")
        except ValueError as e:
            raise RequestError("images[0]", str(e).removeprefix("images[0]").lstrip(" :")) from None
        idx = self.views
        cams_json = {"viewmats": self.viewmats[idx].tolist(), "Ks": self.Ks[idx].tolist()}
        prepared = self.recon.prepare(list(v["images"][idx]), cams_json, turntable)
        prepared.extra["sampling"] = s
        return prepared

    def forward(self, inputs, n):
        return self.recon.forward(inputs, n)

    def render(self, scenes, extras):
        return self.recon.render(scenes, extras)

    def encode(self, scene, fmt):
        return self.recon.encode(scene, fmt)


PIPELINES = {"lgm": LGMPipeline, "lrm": LRMPipeline}


def load_pipeline(checkpoint: str, max_batch: int = 8, turntable_frames: int = 12, device: str | None = None,
                  fixed_batch: bool | None = None, warmup: bool = True, mv_model: str | None = None,
                  views: list[int] | None = None, dtype: str = "fp32", compile: bool = False,
                  cuda_graphs: bool = False) -> Pipeline:
    """The pipeline of a model, checkpoint or training run directory, its model on ``device``
    (default: CUDA when there is one), warmed up by one batch of ``max_batch`` requests when
    ``warmup`` (so the first client does not pay for lazy initialisation). With ``mv_model`` the
    :class:`GeneratePipeline` of that multi-view diffusion model and the reconstructor ``checkpoint``.

    Args:
        checkpoint: a directory ``fast3d infer --checkpoint`` accepts.
        max_batch: the largest batch the server forms (and the fixed batch of ``fixed_batch`` models).
        turntable_frames: frames of the turntable a request may ask for.
        device: ``cuda`` | ``cpu`` | None.
        fixed_batch: pad batches to ``max_batch`` (None: on the CPU only).
        warmup: run one full batch (with turntables) before returning.
        mv_model: an ``mvdiff`` model, checkpoint or training run directory (``fast3d generate --mv-model``).
        views: with ``mv_model``, the views the reconstructor takes (``fast3d generate --views``; None: all).
        dtype, compile, cuda_graphs: the reconstructor's speed switches (:mod:`fast3d.serving.accel`);
            with ``compile`` or ``cuda_graphs`` and variable batches, the warm-up runs every batch size.
    """
    from fast3d import checks
    from fast3d.inference.common import default_device
    from fast3d.inference.generate import load_reconstructor

    max_batch = checks.positive_int("max_batch", max_batch)
    turntable_frames = checks.positive_int("turntable_frames", turntable_frames)
    dev = default_device(device)
    recon = load_reconstructor(checkpoint, dev, what="checkpoint")
    kind, model = recon.kind, recon.model
    pipe = PIPELINES[kind](model, max_batch, turntable_frames, fixed_batch)
    pipe.path = recon.path
    accel.install(pipe, dtype, compile, cuda_graphs)
    # compiled code and graphs are made per batch shape: warm every shape a batch can take
    sizes = range(1, max_batch + 1) if (compile or cuda_graphs) and not pipe.fixed_batch else [max_batch]
    gen = torch.Generator().manual_seed(0)
    if mv_model is not None:
        from fast3d.inference.generate import load_multiview, parse_views

        mv = load_multiview(mv_model, "image", dev)
        pipe = GeneratePipeline(mv, pipe, parse_views(views, mv.num_views))
        if warmup:  # one sampler step: the request's steps only repeat the denoiser
            rgba = torch.rand(4, mv.resolution, mv.resolution, generator=gen)
            req = pipe.prepare([rgba], None, True, {"steps": 1})
            for n in sizes:
                pipe.run([req] * n)
    elif warmup:
        size = model.config.input_size if kind == "lgm" else model.config.image_size
        req = pipe.prepare([torch.rand(3, size, size, generator=gen) for _ in range(pipe.num_images)], None, True)
        for n in sizes:
            pipe.run([req] * n)
    return pipe
