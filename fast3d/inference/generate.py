"""``fast3d generate``: one image or one prompt in, 3D out, by chaining a multi-view model and a
reconstructor, as MVBoost (Era3D, then LGM), LGM (ImageDream / MVDream, then LGM) and Bootstrap3D
(a multi-view DiT's 2x2 grid, then a reconstructor) do.

Stages of one item (each timed; the latencies are printed and written to ``report.json``):

1. ``preprocess`` (images): the image decoded (:func:`fast3d.io.images.read_image`: its limits,
   every mode converted), its object cut out, centred and scaled as the multi-view model was
   trained (:mod:`fast3d.inference.preprocess`);
2. ``multiview``: the views. An image goes to an image-conditioned multi-view diffusion model
   (``model_type`` ``mvdiff``: :func:`fast3d.inference.mvdiff.sample_views`, its rig's views and
   cameras); a prompt to the multi-view DiT of ``fast3d train ttr`` (``mvdit``), whose 2x2 grid's
   views are taken at :data:`TTR_RIG`'s cameras;
3. ``reconstruct``: an LGM (the views with their cameras -> Gaussians, moved back to the views'
   world) or an LRM (one view with its camera -> a triplane);
4. ``export``: ``gaussians.ply`` (LGM; the 3DGS layout) or ``points.ply`` + ``mesh.ply`` (LRM);
5. ``turntable``: ``turntable.gif`` around the object;
6. ``write``: ``views/view<i>.png``, ``cameras.json`` (``viewmats``, ``Ks``, ``width``, ``height``
   of every view, and which views the reconstructor took) and, last, ``report.json``.

The rig check. A reconstructor is trained on one input rig: an LGM on
``inference.lgm.default_input_cameras`` (its ``num_input_views`` cameras), an LRM on one camera
(``inference.lrm.source_camera``'s). The views handed to it (all of the multi-view model's, or the
``views`` subset) must be as many and, compared as the LGM sees them (each rig moved rigidly so its
first camera is at the same place, :func:`fast3d.models.lgm.normalize_cameras`), at the same
relative poses and with the same field of view, within :data:`RIG_TOLERANCE`; otherwise a
ValueError names both models and their cameras.

Outputs. An item is written into a hidden temporary directory beside its final one and renamed to
it when complete, so a failure or a kill leaves nothing partial under its name; ``report.json``
inside marks it finished. Batch mode (a folder or several images, or a prompts file) writes each
item to ``OUT/<name>/`` and skips items already finished, so a rerun after a kill resumes.
Seeded: the same inputs, models and seed give the same files (``report.json`` aside, which holds
latencies).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fast3d import cameras as cams
from fast3d import checks
from fast3d.inference.common import StageTimer, default_device, save_image, write_turntable
from fast3d.io.atomic import atomic_open
from fast3d.models.checkpoints import model_type, resolve_checkpoint

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
REPORT = "report.json"

# The rig check's tolerances: the largest rotation between corresponding cameras, the largest
# distance between their centres (a fraction of the reconstructor's camera distance) and the largest
# difference of focal length and principal point (a fraction of the image side). Rigs of the same
# design differ only by rounding (1e-6); a different rig differs by degrees and percents.
RIG_TOLERANCE = dict(rotation_deg=0.5, position=0.01, intrinsics=0.01)

# The cameras of the multi-view DiT's 2x2 grid (row-major: views 0 and 1 on top). Its feature cache
# puts in the grid the views nearest to azimuths 0, 90, 180, 270 degrees from the sample's first
# view (fast3d.training.feature_cache.GRID_AZIMUTHS, the default of a ttr run's data.grid_azimuths),
# at the data's elevation: MVDream's rig (README's `--rig mvdream` draws it per object in [0, 30]
# degrees), so a sampled grid has no one elevation; generate takes elevation 0, LGM's input rig
# (LGM's own text-to-3D runs MVDream there), at the distance and field of view the data is rendered with.
TTR_RIG = dict(azimuths_deg=(0.0, 90.0, 180.0, 270.0), elevation_deg=0.0, distance=cams.DEFAULT_DISTANCE,
               fov_y_deg=cams.DEFAULT_FOV_Y_DEG)
TTR_RIG_NAME = "mvdream4"

_DEFAULTS = {"mvdiff": dict(steps=30, guidance=3.0, scheduler="ddim"),
             "mvdit": dict(steps=20, guidance=4.5, scheduler="dpm")}


# --- the models --------------------------------------------------------------------------------------


@dataclass
class MultiView:
    """A loaded multi-view model: ``kind`` "mvdiff" (image in) or "mvdit" (prompt in)."""
    kind: str
    path: str
    rig: str
    num_views: int
    resolution: int
    model: object
    extra: dict = field(default_factory=dict)

    def cameras(self) -> tuple[Tensor, Tensor]:  # -> viewmats [V, 4, 4], Ks [V, 3, 3] (pixels of resolution)
        if self.kind == "mvdiff":
            vm, K = self.model.rig_cameras(self.resolution)
            return vm.float().cpu(), K.float().cpu()
        az = torch.deg2rad(torch.tensor(TTR_RIG["azimuths_deg"], dtype=torch.float64))
        el = torch.full_like(az, math.radians(TTR_RIG["elevation_deg"]))
        return cams.orbit_cameras(az, el, TTR_RIG["distance"], TTR_RIG["fov_y_deg"], self.resolution)


@dataclass
class Reconstructor:
    """A loaded reconstructor: ``kind`` "lgm" or "lrm"."""
    kind: str
    path: str
    model: torch.nn.Module

    @property
    def num_inputs(self) -> int:
        return self.model.config.num_input_views if self.kind == "lgm" else 1

    def input_cameras(self, resolution: int) -> tuple[Tensor, Tensor]:  # -> [V, 4, 4], [V, 3, 3]
        """The cameras it was trained to take (module docstring), in pixels of ``resolution``."""
        if self.kind == "lgm":
            from fast3d.inference.lgm import default_input_cameras

            return default_input_cameras(self.model.config, resolution)
        from fast3d.inference.lrm import source_camera

        vm, K, _ = source_camera(None, resolution)
        return vm, K


def load_multiview(model_dir: str, input_kind: str, device=None) -> MultiView:
    """The multi-view model of ``--mv-model`` for an ``input_kind`` ("image" or "prompt") input.

    Args:
        model_dir: a model, checkpoint or training run directory.
        input_kind: "image" needs an ``mvdiff`` model, "prompt" an ``mvdit`` (TTR) one.
        device: where it runs.

    Returns:
        The loaded :class:`MultiView`.
    """
    checks.one_of("input_kind", input_kind, ("image", "prompt"))
    path = resolve_checkpoint(model_dir, what="--mv-model")
    kind = model_type(path)
    want = "mvdiff" if input_kind == "image" else "mvdit"
    if kind != want:
        what = ("an image-conditioned multi-view diffusion model ('mvdiff', fast3d train mvdiff)" if want == "mvdiff"
                else "the multi-view DiT of fast3d train ttr ('mvdit')")
        raise ValueError(f"--mv-model {model_dir!r} holds a {kind!r} model; --{input_kind} needs {what}")
    dev = default_device(device)
    if kind == "mvdiff":
        from fast3d.inference.mvdiff import load_mvdiff

        model = load_mvdiff(path, device=dev)
        return MultiView("mvdiff", path, model.config.rig, model.num_views, model.config.resolution, model)
    from fast3d.inference.ttr import load_pipeline

    pipe, cfg = load_pipeline(path, dev)
    return MultiView("mvdit", path, TTR_RIG_NAME, 4, cfg.view_size, pipe, extra={"config": cfg})


def load_reconstructor(model_dir: str, device=None, what: str = "--recon") -> Reconstructor:
    """The LGM or LRM of a model, checkpoint or training run directory (EMA weights preferred), in
    eval mode: ``fast3d generate --recon``'s, ``fast3d datagen boost``'s and ``fast3d serve``'s.

    Args:
        model_dir: the directory.
        device: where it runs (:func:`~fast3d.inference.common.default_device`).
        what: the argument's name in errors.

    Returns:
        The loaded :class:`Reconstructor`.
    """
    path = resolve_checkpoint(model_dir, what=what)
    kind = model_type(path)
    if kind not in ("lgm", "lrm"):
        raise ValueError(f"{what} {model_dir!r} holds a {kind!r} model; expected a reconstructor: an 'lgm' "
                         f"(fast3d train lgm) or an 'lrm' (fast3d train lrm)")
    dev = default_device(device)
    if kind == "lgm":
        from fast3d.models.lgm import LGM

        model = LGM.from_pretrained(path)
    else:
        from fast3d.models.lrm import LRM

        model = LRM.from_pretrained(path)
    return Reconstructor(kind, path, model.to(dev).eval())


# --- the rig check -----------------------------------------------------------------------------------


def describe_cameras(viewmats: Tensor,  # [V, 4, 4]
                     Ks: Tensor,        # [V, 3, 3]
                     resolution: int) -> str:
    """'V views: azimuth/elevation (deg) 0/0, 90/0, ...; distance 2.2; fov 49.1 deg' of a rig."""
    c = cams.camera_centers(viewmats.double())                                  # [V, 3]
    d = c.norm(dim=-1)
    az = torch.rad2deg(torch.atan2(c[:, 1], c[:, 0])) % 360
    el = torch.rad2deg(torch.asin((c[:, 2] / d).clamp(-1, 1)))
    fov = torch.rad2deg(2 * torch.atan(resolution / 2 / Ks[:, 1, 1].double()))
    angles = ", ".join(f"{round(a) % 360}/{round(e)}" for a, e in zip(az.tolist(), el.tolist()))
    return (f"{len(viewmats)} view{'s' if len(viewmats) != 1 else ''} at azimuth/elevation (deg) {angles}; "
            f"distance {float(d.mean()):.3g}; fov {float(fov.mean()):.3g} deg")


def rig_mismatch(viewmats: Tensor,      # [V, 4, 4] the views' cameras
                 Ks: Tensor,            # [V, 3, 3] pixels of `resolution`
                 ref_viewmats: Tensor,  # [W, 4, 4] the reconstructor's input rig
                 ref_Ks: Tensor,        # [W, 3, 3] pixels of `resolution`
                 resolution: int) -> str | None:
    """Why the cameras are not the reconstructor's input rig (module docstring), or None when they are."""
    from fast3d.models.lgm import normalize_cameras

    if len(viewmats) != len(ref_viewmats):
        return f"{len(viewmats)} views for {len(ref_viewmats)} inputs"
    d = float(cams.camera_centers(ref_viewmats[:1].double()).norm())
    a, _ = normalize_cameras(viewmats[None].double(), d)
    b, _ = normalize_cameras(ref_viewmats[None].double(), d)
    a, b = a[0], b[0]
    rel = a[:, :3, :3] @ b[:, :3, :3].transpose(-1, -2)
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    rot = torch.rad2deg(torch.acos(cos))                                          # [V]
    pos = (cams.camera_centers(a) - cams.camera_centers(b)).norm(dim=-1) / d      # [V]
    kin = ((Ks.double() - ref_Ks.double()).abs()[:, :2].amax(dim=(-1, -2))) / resolution  # [V]
    tol = RIG_TOLERANCE
    for v in range(len(viewmats)):
        if rot[v] > tol["rotation_deg"] or pos[v] > tol["position"]:
            return (f"view {v} of the selection is {float(rot[v]):.3g} deg and {float(pos[v]) * 100:.3g}% of the "
                    f"camera distance away from input {v} of the reconstructor (relative to the first view)")
        if kin[v] > tol["intrinsics"]:
            fov = [math.degrees(2 * math.atan(resolution / 2 / float(k[v, 1, 1]))) for k in (Ks, ref_Ks)]
            return (f"view {v} of the selection has other intrinsics than input {v} of the reconstructor (field of "
                    f"view {fov[0]:.3g} vs {fov[1]:.3g} deg)")
    return None


def parse_views(views, num_views: int) -> list[int] | None:
    """``--views`` ("0,2,3,4" or a list of ints) as distinct indices into ``num_views`` views; None stays None."""
    if views is None:
        return None
    if isinstance(views, str):
        try:
            views = [int(t) for t in views.split(",")]
        except ValueError:
            raise ValueError(f"--views must be comma-separated view indices like 0,2,3,4; got {views!r}") from None
    if not isinstance(views, (list, tuple)) or not views or any(isinstance(v, bool) or not isinstance(v, int)
                                                                 for v in views):
        raise ValueError(f"--views must be a non-empty list of view indices; got {views!r}")
    bad = [v for v in views if not 0 <= v < num_views]
    if bad or len(set(views)) != len(views):
        raise ValueError(f"--views must be distinct indices in [0, {num_views}) (the multi-view model has "
                         f"{num_views} views); got {list(views)}")
    return list(views)


def check_rig(mv: MultiView, recon: Reconstructor, views: list[int] | None) -> list[int]:
    """The views the reconstructor takes: ``views`` or all of them, checked against its input rig
    (module docstring). Raises a ValueError naming both models when they do not match."""
    vm, K = mv.cameras()
    idx = list(range(mv.num_views)) if views is None else views
    ref_vm, ref_K = recon.input_cameras(mv.resolution)
    why = rig_mismatch(vm[idx], K[idx], ref_vm, ref_K, mv.resolution)
    if why is None:
        return idx
    R = mv.resolution
    sel = "" if views is None else f" (--views {','.join(map(str, views))})"
    hint = (f"pass --views with {recon.num_inputs} of the {mv.num_views} views whose cameras match"
            if views is None else "choose --views whose cameras match")
    raise ValueError(f"--recon {recon.path!r} ({recon.kind.upper()}: {describe_cameras(ref_vm, ref_K, R)}) does not "
                     f"take the views of --mv-model {mv.path!r} ({mv.kind} rig {mv.rig!r}{sel}: "
                     f"{describe_cameras(vm[idx], K[idx], R)}): {why}; {hint}")


# --- one item ----------------------------------------------------------------------------------------


@dataclass
class Settings:
    """The sampling settings of a run (the path's defaults where None)."""
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    seed: int = 0
    views: list[int] | None = None
    keep_background: bool = False
    turntable_frames: int = 36
    turntable_resolution: int | None = None
    point_grid: int = 128
    mesh_grid: int = 128
    refine_pose: int = 0               # LGM: MVBoost's input-view optimisation steps (inference.lgm.refine_and_reconstruct)
    lpips_backbone: str = "imagenet"   # its LPIPS network

    def resolved(self, kind: str) -> dict:
        d = _DEFAULTS[kind]
        steps = checks.positive_int("--steps", self.steps if self.steps is not None else d["steps"])
        guidance = checks.real("--guidance", self.guidance if self.guidance is not None else d["guidance"], 0)
        if kind == "mvdit" and self.scheduler not in (None, d["scheduler"]):
            raise ValueError(f"--scheduler {self.scheduler!r}: the prompt path's multi-view DiT samples with "
                             f"{d['scheduler']!r} (PixArt-alpha's DPM-Solver++); --scheduler applies to --image")
        return dict(steps=steps, guidance=guidance, scheduler=self.scheduler or d["scheduler"],
                    seed=checks.integer("--seed", self.seed, 0))


def object_fraction(mv: MultiView) -> float:
    """The side of the image a unit-size object at the origin spans in view 0 (the input's own view):
    focal length / distance / image side. The training assets are normalised to longest side 1."""
    vm, K = mv.cameras()
    d = float(cams.camera_centers(vm[:1].double()).norm())
    return min(1.0, float(K[0, 1, 1]) / d / mv.resolution)


def image_views(mv: MultiView, rgba: Tensor,  # [4, H, W] straight alpha in [0, 1] (io.images.read_image)
                s: dict, keep_background: bool = False, segmenter=None, timer: StageTimer | None = None,
                name: str = "--image") -> dict:
    """The image path's preprocessing and multi-view stage on a decoded image (``fast3d serve``'s
    generate model calls it on a request's image).

    Args:
        mv: an ``mvdiff`` :class:`MultiView`.
        rgba: the decoded image.
        s: the resolved sampling settings (:meth:`Settings.resolved`: steps, guidance, scheduler, seed).
        keep_background, segmenter: as :func:`fast3d.inference.preprocess.preprocess` takes them.
        timer: times the ``preprocess`` and ``multiview`` stages (None: a fresh one).
        name: what the caller calls the image, in errors.

    Returns:
        ``{"images": [V, 3, R, R], "input": [3, R, R], "mask": how}`` on the CPU.
    """
    from fast3d.inference.mvdiff import sample_views
    from fast3d.inference.preprocess import preprocess

    timer = timer or StageTimer()
    with timer("preprocess"):
        image, mask = preprocess(rgba, mv.resolution, object_fraction(mv), mv.model.config.background,
                                 segmenter=segmenter, keep_background=keep_background, name=name)
    with timer("multiview"):
        r = sample_views(mv.model, image, steps=s["steps"], guidance_scale=s["guidance"],
                         scheduler=s["scheduler"], seed=s["seed"])
    return {"images": r["images"].float().clamp(0, 1).cpu(), "input": image, "mask": mask}


def _views(mv: MultiView, item: dict, s: dict, settings: Settings, segmenter, timer: StageTimer) -> dict:
    """The multi-view stage (and the image's preprocessing): views [V, 3, R, R] and, for an image, the
    model input [3, R, R] and where its mask came from."""
    out = {}
    if mv.kind == "mvdiff":
        from fast3d.io.images import read_image

        with timer("preprocess"):
            rgba = read_image(item["image"], name="--image")
        return image_views(mv, rgba, s, settings.keep_background, segmenter, timer, f"--image {item['image']!r}")
    from fast3d.inference.ttr import sample_grid
    from fast3d.models.mvdit import split_grid

    with timer("multiview"):
        grid = sample_grid(mv.model, mv.extra["config"], item["prompt"], s["steps"], s["guidance"], s["seed"])
        out["images"] = split_grid(grid[None])[0].float().clamp(0, 1).cpu()     # [4, 3, R, R]
    return out


def _reconstruct(recon: Reconstructor, images: Tensor,  # [V, 3, R, R]
                 viewmats: Tensor,                      # [V, 4, 4]
                 Ks: Tensor,                            # [V, 3, 3]
                 out_dir: str, settings: Settings, timer: StageTimer) -> dict:
    """Reconstruction, export and turntable of one item into ``out_dir``; returns what was written."""
    dev = next(recon.model.parameters()).device
    R = images.shape[-1]
    if checks.integer("--refine-pose", settings.refine_pose, 0) and recon.kind != "lgm":
        raise ValueError(f"--refine-pose refines an LGM's input cameras; --recon is an {recon.kind!r}")
    if recon.kind == "lgm":
        from fast3d.inference import lgm

        cfg = recon.model.config
        with timer("reconstruct"):
            world = lgm.world_gaussians(recon.model, images[None], viewmats[None], Ks[None])
        refined = {}
        if settings.refine_pose:
            from fast3d.evaluation.image_metrics import load_lpips

            with timer("refine poses"):
                world, viewmats, report = lgm.refine_and_reconstruct(
                    recon.model, images, viewmats, Ks, world, load_lpips(settings.lpips_backbone, dev),
                    settings.refine_pose)
            lgm.save_refined_cameras(os.path.join(out_dir, "cameras_refined.json"), viewmats, Ks, report,
                                     settings.lpips_backbone)
            refined = {"cameras_refined": "cameras_refined.json", "kept": report["kept"],
                       "lpips_before": report["lpips"]["before"], "lpips_after": report["lpips"]["after"]}
        with timer("export"):
            lgm.save_gaussians_ply(os.path.join(out_dir, "gaussians.ply"), world)
        res = settings.turntable_resolution or cfg.render_size
        with timer("turntable"):
            frames = lgm.render_turntable(world, cfg, lgm.rig_distance(viewmats), settings.turntable_frames, res)
            write_turntable(frames, os.path.join(out_dir, "turntable.gif"))
        return {"gaussians": "gaussians.ply", "num_gaussians": int(world["means"].shape[1]),
                "turntable": "turntable.gif", **refined}
    from fast3d.inference.lrm import render_turntable, source_camera, timed_planes
    from fast3d.inference.mesh import DENSITY_THRESHOLD, extract_mesh
    from fast3d.io import save_mesh_ply, save_points_ply

    model = recon.model
    vm, K, cam = source_camera({"viewmats": viewmats.tolist(), "Ks": Ks.tolist()}, R)
    with torch.no_grad():
        planes = timed_planes(model, images.to(dev), vm.to(dev), K.to(dev), timer)
        timer.stages["reconstruct"] = timer.stages.pop("encode") + timer.stages.pop("planes")
        with timer("export"):
            points, colors = model.extract_points(planes[0], settings.point_grid, DENSITY_THRESHOLD)
            save_points_ply(os.path.join(out_dir, "points.ply"), points, colors)
            files = {"points": "points.ply", "num_points": len(points)}
            if settings.mesh_grid:
                vertices, faces, vcolors = extract_mesh(model, planes[0], settings.mesh_grid, DENSITY_THRESHOLD)
                save_mesh_ply(os.path.join(out_dir, "mesh.ply"), vertices, faces, vcolors)
                files.update(mesh="mesh.ply", num_vertices=len(vertices), num_faces=len(faces))
        res = settings.turntable_resolution or model.config.image_size
        with timer("turntable"):
            write_turntable(render_turntable(model, planes, cam, settings.turntable_frames, res),
                            os.path.join(out_dir, "turntable.gif"))
    return {**files, "turntable": "turntable.gif"}


def generate_item(mv: MultiView, recon: Reconstructor, item: dict, out_dir: str, settings: Settings,
                  segmenter=None, load_ms: dict | None = None) -> dict:
    """One item (``{"name", "image"}`` or ``{"name", "prompt"}``) into ``out_dir``, which appears
    complete or not at all (module docstring). Returns its report (also ``out_dir/report.json``)."""
    s = settings.resolved(mv.kind)
    idx = check_rig(mv, recon, settings.views)
    vm, K = mv.cameras()
    timer = StageTimer()
    with _staging(out_dir) as tmp:
        v = _views(mv, item, s, settings, segmenter, timer)
        images = v["images"]
        if images.shape != (mv.num_views, 3, mv.resolution, mv.resolution):
            raise ValueError(f"--mv-model {mv.path!r} returned views {tuple(images.shape)}; expected "
                             f"[{mv.num_views}, 3, {mv.resolution}, {mv.resolution}]")
        files = _reconstruct(recon, images[idx], vm[idx], K[idx], tmp, settings, timer)
        with timer("write"):
            os.makedirs(os.path.join(tmp, "views"))
            for i, img in enumerate(images):
                save_image(img, os.path.join(tmp, "views", f"view{i}.png"))
            if "input" in v:
                save_image(v["input"], os.path.join(tmp, "input.png"))
            with atomic_open(os.path.join(tmp, "cameras.json")) as f:
                json.dump({"rig": mv.rig, "width": mv.resolution, "height": mv.resolution,
                           "viewmats": vm.tolist(), "Ks": K.tolist(), "recon_views": idx}, f, indent=1)
        report = {"input": {k: item[k] for k in ("image", "prompt") if k in item}, "seed": s["seed"],
                  "steps": s["steps"], "guidance": s["guidance"], "scheduler": s["scheduler"],
                  "models": {"mv": {"dir": mv.path, "type": mv.kind, "rig": mv.rig, "views": mv.num_views},
                             "recon": {"dir": recon.path, "type": recon.kind, "views": idx}},
                  "device": str(next(recon.model.parameters()).device),
                  "outputs": {**files, "views": [f"views/view{i}.png" for i in range(len(images))],
                              "cameras": "cameras.json"},
                  "latency_ms": dict(timer.stages), "total_ms": sum(timer.stages.values())}
        if "mask" in v:
            report["input"]["mask"] = v["mask"]
        if load_ms:
            report["load_ms"] = load_ms
        with atomic_open(os.path.join(tmp, REPORT)) as f:
            json.dump(report, f, indent=1)
    return report


class _staging:
    """A hidden temporary directory beside ``final`` that replaces it on a clean exit and is
    deleted on an exception (an existing ``final`` is kept until the new one is complete); what a
    killed run left there for the same ``final`` is deleted first."""

    def __init__(self, final: str):
        final = os.path.abspath(final)
        self.final = final
        self.tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp{os.getpid()}")

    def __enter__(self) -> str:
        parent, base = os.path.split(self.final)
        if os.path.isdir(parent):  # what a killed run left of this item: .<name>.tmp<pid>[.old]
            for n in os.listdir(parent):
                if re.fullmatch(rf"\.{re.escape(base)}\.tmp\d+(\.old)?", n):
                    shutil.rmtree(os.path.join(parent, n), ignore_errors=True)
        os.makedirs(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if os.path.exists(self.final):
            old = f"{self.tmp}.old"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return False


# --- inputs and the run ------------------------------------------------------------------------------


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-")
    return s or "prompt"


def collect_items(images: list[str] | None = None, prompt: str | None = None,
                  prompts_file: str | None = None) -> tuple[list[dict], bool]:
    """The items of a run and whether it is a batch (module docstring): ``images`` (files, or one
    folder of images), one ``prompt``, or a ``prompts_file`` (one prompt a line; blank lines and
    lines starting with ``#`` skipped). Exactly one of the three."""
    given = [n for n, v in (("--image", images), ("--prompt", prompt), ("--prompts", prompts_file)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --image, --prompt, --prompts; got {given or 'none'}")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"--prompt must be non-empty text; got {prompt!r}")
        return [{"name": _slug(prompt), "prompt": prompt.strip()}], False
    if prompts_file is not None:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts {prompts_file!r} cannot be read as text ({e})") from None
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not prompts:
            raise ValueError(f"--prompts {prompts_file!r} holds no prompt (one a line)")
        return [{"name": f"{i:04d}-{_slug(p)}", "prompt": p} for i, p in enumerate(prompts)], True
    if len(images) == 1 and os.path.isdir(images[0]):
        folder = images[0]
        files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                       if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
        if not files:
            raise ValueError(f"--image {folder!r}: a folder with no image ({', '.join(IMAGE_EXTENSIONS)})")
        batch = True
    else:
        files, batch = list(images), len(images) > 1
    for p in files:
        if not os.path.isfile(p):
            raise ValueError(f"--image {p!r} is not a file")
    names = [os.path.splitext(os.path.basename(p))[0] for p in files]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--image: several images are named {dup} (outputs go to OUT/<name>/): rename them")
    return [{"name": n, "image": p} for n, p in zip(names, files)], batch


def run(mv_model: str, recon_model: str, out: str, images: list[str] | None = None, prompt: str | None = None,
        prompts_file: str | None = None, settings: Settings | None = None, device=None,
        remove_background: str | None = None, log=print) -> dict:
    """``fast3d generate`` (module docstring).

    Args:
        mv_model: ``--mv-model``: an ``mvdiff`` directory for images, an ``mvdit`` (TTR) one for prompts.
        recon_model: ``--recon``: an ``lgm`` or ``lrm`` directory.
        out: the item's directory, or in batch mode the folder of ``OUT/<name>/``.
        images, prompt, prompts_file: the inputs (:func:`collect_items`).
        settings: the sampling and output settings.
        device: where the models run (default: CUDA when there is one).
        remove_background: a background-removal model directory (:class:`~.preprocess.Segmenter`).
        log: where progress lines go.

    Returns:
        ``{"done": [names], "skipped": [names], "failed": {name: error}, "reports": {name: report}}``.
    """
    settings = settings or Settings()
    items, batch = collect_items(images, prompt, prompts_file)
    if remove_background is not None and settings.keep_background:
        raise ValueError("--remove-background and --keep-background exclude each other")
    if remove_background is not None and images is None:
        raise ValueError("--remove-background applies to --image inputs")
    checks.positive_int("--frames", settings.turntable_frames)
    checks.positive_int("--resolution", settings.turntable_resolution, optional=True)
    checks.integer("--point-grid", settings.point_grid, 2)
    if isinstance(settings.mesh_grid, bool) or not isinstance(settings.mesh_grid, int) or settings.mesh_grid < 0 \
            or settings.mesh_grid == 1:
        raise ValueError(f"--mesh-grid must be 0 (no mesh) or an integer >= 2; got {settings.mesh_grid!r}")
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a directory path; got {out!r}")
    if not batch and os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, REPORT)):
        raise ValueError(f"--out {out!r} exists and is not a finished generate output (no {REPORT}): "
                         f"refusing to replace it")
    if batch and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} exists and is not a directory")
    dev = default_device(device)
    t0 = time.perf_counter()
    mv = load_multiview(mv_model, "image" if images is not None else "prompt", dev)
    t1 = time.perf_counter()
    recon = load_reconstructor(recon_model, dev)
    t2 = time.perf_counter()
    settings.views = parse_views(settings.views, mv.num_views)
    settings.resolved(mv.kind)
    check_rig(mv, recon, settings.views)  # before any item: a mismatch is the run's error, not each item's
    segmenter = None
    if remove_background is not None:
        from fast3d.inference.preprocess import Segmenter

        segmenter = Segmenter(remove_background, dev)
    load_ms = {"mv": (t1 - t0) * 1e3, "recon": (t2 - t1) * 1e3}
    log(f"fast3d generate: {mv.kind} {mv.rig!r} ({mv.num_views} views, {mv.resolution} px) -> {recon.kind.upper()}, "
        f"{dev}; models loaded in {(t2 - t0):.1f} s")
    result = {"done": [], "skipped": [], "failed": {}, "reports": {}}
    if batch:
        os.makedirs(out, exist_ok=True)
    for n, item in enumerate(items, 1):
        target = os.path.join(out, item["name"]) if batch else out
        tag = f"[{n}/{len(items)}] {item['name']}" if batch else item["name"]
        if batch and os.path.isfile(os.path.join(target, REPORT)):
            result["skipped"].append(item["name"])
            log(f"{tag}: finished before, skipped")
            continue
        try:
            report = generate_item(mv, recon, item, target, settings, segmenter, load_ms)
        except ValueError as e:
            if not batch:
                raise
            result["failed"][item["name"]] = str(e)
            log(f"{tag}: FAILED: {e}")
            continue
        result["done"].append(item["name"])
        result["reports"][item["name"]] = report
        stages = "  ".join(f"{k} {v:.0f} ms" for k, v in report["latency_ms"].items())
        log(f"{tag}: {stages}  (total {report['total_ms']:.0f} ms) -> {target}")
    if batch:
        log(f"fast3d generate: {len(result['done'])} done, {len(result['skipped'])} skipped (finished before), "
            f"{len(result['failed'])} failed")
    return result

