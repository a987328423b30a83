"""LGM inference and evaluation: posed images in, 3D Gaussians out (a 3DGS PLY and a turntable),
and held-out-view / geometry metrics on a multi-view dataset (``fast3d infer`` / ``fast3d eval``).

Without a cameras file the inputs are taken to be LGM's: 4 views at azimuths 0, 90, 180, 270
degrees, elevation 0, distance ``config.camera_distance``, vertical field of view
``config.fov_y_deg``. A cameras file is JSON: ``{"viewmats": [V x 4 x 4], "Ks": [V x 3 x 3]}``
(OpenCV world-to-camera, intrinsics in pixels of the given images), or with ``"c2w"`` (OpenGL /
Blender camera-to-world, ``"world_up": "y" | "z"``) instead of ``"viewmats"``.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import cameras as cams
from fast3d.inference.common import StageTimer, default_device, load_images, write_turntable
from fast3d.io.atomic import atomic_open
from fast3d.io.ply import ply_bytes, save_ply
from fast3d.models.lgm import LGM, apply_transform_to_gaussians, normalize_cameras
from fast3d.ops.rasterization.reference import SH_C0

# The turntable of a reconstruction (``fast3d infer``, ``fast3d generate``, ``fast3d serve``, the
# generate benchmark): this elevation, above LGM's input rig (elevation 0) so that the top shows,
# at the inputs' mean camera distance and the model's field of view; rendered this many frames a call.
TURNTABLE_ELEVATION_DEG = 20.0
TURNTABLE_CHUNK = 12
# The PLY's opacities are clamped into the open interval (the file stores their logit).
PLY_OPACITY_EPS = 1e-6


def reconstruct(model: LGM,
                images: Tensor,    # [B, V, 3, R, R] in [0, 1]
                viewmats: Tensor,  # [B, V, 4, 4] world-to-camera, OpenCV
                Ks: Tensor,        # [B, V, 3, 3] pixels of the R x R images
                ) -> tuple[dict, Tensor]:  # -> Gaussians in the normalised world, transform [B, 4, 4]
    """The model's Gaussians for posed images of any square size (resized to its input size).
    With LGM's own head (a converted release, whose network knows cameras at one distance only)
    the world is first scaled so that view 0 is ``config.camera_distance`` from the origin; the
    Gaussians and the transform come back in the input's units."""
    cfg = model.config
    dev = next(model.parameters()).device
    x, K = resize_inputs(images, Ks, cfg.input_size)
    vm, s = viewmats.float().clone(), None
    if cfg.head != "anchored":  # LGM's own network knows one camera distance: scale the world so view 0 is there
        s = cfg.camera_distance / cams.camera_centers(vm[:, 0]).norm(dim=-1)           # [B]
        vm[..., :3, 3] *= s[:, None, None]
    vm, T = normalize_cameras(vm, cfg.camera_distance)
    with torch.no_grad():
        g = {k: v.float() for k, v in model(x.to(dev), vm.to(dev), K.to(dev)).items()}
    if s is not None:           # the scale undone in the normalised frame: T stays rigid, in the input's units
        T[:, :3, 3] /= s[:, None]
        s = s.to(dev)[:, None, None]
        g = {**g, "means": g["means"] / s, "scales": g["scales"] / s}
    return g, T.to(dev)


def resize_inputs(images: Tensor,  # [B, V, 3, R, R] in [0, 1]
                  Ks: Tensor,      # [B, V, 3, 3] pixels of the R x R images
                  size: int) -> tuple[Tensor, Tensor]:  # -> [B, V, 3, size, size] float32, [B, V, 3, 3]
    """Images resized to the model's input size (bilinear, antialiased) and their intrinsics
    rescaled to match; unchanged (as float32) when already that size."""
    B, V, _, R, _ = images.shape
    x = images.float().flatten(0, 1)
    if R != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    K = Ks.float().clone()
    K[..., :2, :] *= size / R
    return x.unflatten(0, (B, V)), K


def default_input_cameras(cfg, resolution: int) -> tuple[Tensor, Tensor]:  # -> [V, 4, 4], [V, 3, 3]
    V = cfg.num_input_views
    az = torch.arange(V, dtype=torch.float64) * (2 * math.pi / V)
    eye = cams.spherical_to_position(az, torch.zeros_like(az), cfg.camera_distance)
    return cams.look_at(eye).float(), cams.intrinsics(cfg.fov_y_deg, resolution, resolution, V)


def read_cameras(path: str, n: int, resolution: int) -> tuple[Tensor, Tensor]:
    """A cameras JSON file (module docstring) for ``n`` images of ``resolution`` px."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--cameras {path!r} cannot be read as JSON ({e})") from None
    return parse_cameras(d, n, f"--cameras {path}")


def parse_cameras(d, n: int, where: str = "cameras") -> tuple[Tensor, Tensor]:  # -> [n, 4, 4], [n, 3, 3]
    """Cameras as decoded JSON (module docstring) for ``n`` images; errors start with ``where``."""
    if not isinstance(d, dict) or "Ks" not in d or ("viewmats" in d) == ("c2w" in d):
        raise ValueError(f"{where}: expected an object with 'Ks' and one of 'viewmats' or 'c2w'")
    try:
        Ks = torch.tensor(d["Ks"], dtype=torch.float32)
        if "viewmats" in d:
            vm = torch.tensor(d["viewmats"], dtype=torch.float32)
        else:
            vm = cams.viewmat_from_opengl_c2w(torch.tensor(d["c2w"], dtype=torch.float32), d.get("world_up", "z"))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{where}: not numeric matrices ({e})") from None
    if vm.shape != (n, 4, 4) or Ks.shape != (n, 3, 3):
        raise ValueError(f"{where} does not match the {n} images: expected viewmats/c2w [{n}, 4, 4] and "
                         f"Ks [{n}, 3, 3]; got {tuple(vm.shape)} and {tuple(Ks.shape)}")
    if not (torch.isfinite(vm).all() and torch.isfinite(Ks).all()):
        raise ValueError(f"{where} holds non-finite numbers")
    return vm, Ks


def _se3(xi: Tensor) -> Tensor:  # [V, 6] (axis-angle, translation) -> [V, 4, 4] rigid, differentiable
    w, t = xi[:, :3], xi[:, 3:]
    skew = torch.zeros(xi.shape[0], 3, 3, dtype=xi.dtype, device=xi.device)
    skew[:, 0, 1], skew[:, 0, 2], skew[:, 1, 2] = -w[:, 2], w[:, 1], -w[:, 0]
    skew = skew - skew.transpose(1, 2)
    T = torch.eye(4, dtype=xi.dtype, device=xi.device).repeat(xi.shape[0], 1, 1)
    T[:, :3, :3] = torch.linalg.matrix_exp(skew)
    T[:, :3, 3] = t
    return T


def refine_input_poses(gaussians: dict,   # one scene, world frame: means [1, N, 3], ...
                       images: Tensor,    # [V, 3, R, R] the input images, in [0, 1]
                       viewmats: Tensor,  # [V, 4, 4] their cameras
                       Ks: Tensor,        # [V, 3, 3]
                       lpips: torch.nn.Module, steps: int = 100, lr: float = 3e-3,
                       ) -> tuple[Tensor, Tensor, Tensor]:  # -> viewmats [V, 4, 4], LPIPS before [V], after [V]
    """MVBoost's input-view pose refinement: each input camera moves by the rigid motion that
    minimises LPIPS between the reconstruction's render and its image. The rasterizer has no
    camera gradients, so the motion ``M`` is applied to the Gaussians instead (rendering ``M G``
    from ``V`` equals rendering ``G`` from ``V M``); the refined camera is ``V M``."""
    V, _, R, _ = images.shape
    dev = gaussians["means"].device
    g = {k: v.detach().expand(V, *v.shape[1:]) for k, v in gaussians.items()}
    xi = torch.zeros(V, 6, device=dev, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([xi], lr=lr)
    target, vm, K = images.to(dev), viewmats[:, None].to(dev), Ks[:, None].to(dev)
    white = torch.ones(V, 1, 3, device=dev)

    def loss_of(xi_):
        moved = apply_transform_to_gaussians(g, _se3(xi_).float())
        rgb, _ = LGM.render(moved, vm, K, R, R, backgrounds=white)
        return lpips(rgb[:, 0], target)                                       # [V]

    with torch.no_grad():
        before = loss_of(xi)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(xi).sum().backward()
        opt.step()
    with torch.no_grad():
        after = loss_of(xi)
        keep = after < before  # a view whose loss did not improve keeps its camera
        T = _se3(xi.detach())
        T[~keep] = torch.eye(4, dtype=T.dtype, device=dev)
        refined = (viewmats.double().to(dev) @ T).float()
    return refined.cpu(), before.cpu(), torch.where(keep, after, before).cpu()


def sh_from_rgb(rgb: Tensor,  # [N, 3] colours in [0, 1]
                ) -> Tensor:  # -> [N, 1, 3] degree-0 SH coefficients
    """The degree-0 spherical-harmonics coefficient of each colour: the rasterizer's colour is
    ``SH0 * C0 + 0.5``, so ``SH0 = (rgb - 0.5) / C0``."""
    return ((rgb - 0.5) / SH_C0)[:, None, :]


def _one_scene(scene: dict) -> dict:
    """A scene's tensors without a batch dimension: means [N, 3] as given, or [1, N, 3] squeezed."""
    if scene["means"].dim() == 2:
        return scene
    if scene["means"].dim() != 3 or scene["means"].shape[0] != 1:
        raise ValueError(f"scene: expected one scene, means [N, 3] or [1, N, 3]; got {tuple(scene['means'].shape)}")
    return {k: v[0] for k, v in scene.items()}


def _ply_fields(scene: dict) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = _one_scene(scene)
    return (g["means"], g["quats"], g["scales"], g["opacities"].clamp(PLY_OPACITY_EPS, 1 - PLY_OPACITY_EPS),
            sh_from_rgb(g["colors"]))


def save_gaussians_ply(path: str, scene: dict) -> None:
    """One reconstruction as a 3DGS PLY (:func:`fast3d.io.ply.save_ply`, written atomically).

    Args:
        path: the file.
        scene: LGM's Gaussians of one scene: means [N, 3] (or [1, N, 3]), quats [N, 4], scales [N, 3],
            opacities [N], colors [N, 3] in [0, 1] (stored as degree-0 SH).
    """
    save_ply(path, *_ply_fields(scene))


def gaussians_ply_bytes(scene: dict) -> bytes:
    """The bytes :func:`save_gaussians_ply` writes for ``scene`` (an HTTP response body)."""
    return ply_bytes(*_ply_fields(scene))


def world_gaussians(model: LGM,
                    images: Tensor,    # [B, V, 3, R, R] in [0, 1]
                    viewmats: Tensor,  # [B, V, 4, 4] world-to-camera, OpenCV
                    Ks: Tensor,        # [B, V, 3, 3] pixels of the R x R images
                    ) -> dict:         # -> means [B, N, 3], quats, scales, opacities, colors
    """The model's Gaussians (:func:`reconstruct`) moved back into the input cameras' world.

    Args:
        model: the LGM, in eval mode.
        images, viewmats, Ks: the posed input views of B scenes.

    Returns:
        The Gaussians of each scene, on the model's device.
    """
    g, T = reconstruct(model, images, viewmats, Ks)
    return apply_transform_to_gaussians(g, torch.linalg.inv(T.double()).float())


def rig_distance(viewmats: Tensor,  # [..., V, 4, 4] world-to-camera
                 ) -> float:
    """The mean distance of the cameras from the world origin (in float64): the turntable's radius."""
    return float(cams.camera_centers(viewmats.double()).norm(dim=-1).mean())


def turntable_cameras(config, distance: float, frames: int, resolution: int) -> tuple[Tensor, Tensor]:
    """The turntable's cameras (``TURNTABLE_ELEVATION_DEG``, ``distance``, the model's field of view).

    Args:
        config: the LGM's config (its ``fov_y_deg``).
        distance: the orbit's radius (:func:`rig_distance` of the input cameras).
        frames: how many views around the object.
        resolution: their side in pixels.

    Returns:
        viewmats [frames, 4, 4] and Ks [frames, 3, 3] on the CPU.
    """
    return cams.turntable(frames, resolution, TURNTABLE_ELEVATION_DEG, distance, config.fov_y_deg)


def render_turntable(scene: dict,  # one scene in the input's world: means [1, N, 3], ...
                     config, distance: float, frames: int, resolution: int) -> Tensor:  # -> [frames, 3, res, res]
    """The turntable of one reconstruction (:func:`turntable_cameras`) on white, ``TURNTABLE_CHUNK``
    frames a rasterization call; float32 in [0, 1] on the scene's device."""
    dev = scene["means"].device
    tv, tK = turntable_cameras(config, distance, frames, resolution)
    out = []
    for i in range(0, frames, TURNTABLE_CHUNK):
        k = min(TURNTABLE_CHUNK, frames - i)
        rgb, _ = LGM.render(scene, tv[None, i:i + k].to(dev), tK[None, i:i + k].to(dev), resolution, resolution,
                            backgrounds=torch.ones(1, k, 3, device=dev))
        out.append(rgb[0].float())
    return torch.cat(out)


def save_refined_cameras(path: str, viewmats: Tensor,  # [V, 4, 4] the cameras the output was made from
                         Ks: Tensor,                   # [V, 3, 3]
                         report: dict, lpips_backbone: str) -> None:
    """``cameras_refined.json`` of a pose refinement: the cameras used, :func:`refine_and_reconstruct`'s
    report and the LPIPS network it used, written atomically."""
    with atomic_open(path) as f:
        json.dump({"viewmats": viewmats.tolist(), "Ks": Ks.tolist(), **report, "lpips_backbone": lpips_backbone},
                  f, indent=1)


def input_view_lpips(gaussians: dict,   # one scene, world frame: means [1, N, 3], ...
                     images: Tensor,    # [V, 3, R, R] the input images, in [0, 1]
                     viewmats: Tensor,  # [V, 4, 4] the cameras to render them from
                     Ks: Tensor,        # [V, 3, 3]
                     lpips: torch.nn.Module) -> Tensor:  # -> [V]
    """LPIPS between the Gaussians rendered at each input camera (white background, as the
    refinement renders) and that camera's input image."""
    V, _, R, _ = images.shape
    dev = gaussians["means"].device
    g = {k: v.detach().expand(V, *v.shape[1:]) for k, v in gaussians.items()}
    with torch.no_grad():
        rgb, _ = LGM.render(g, viewmats[:, None].to(dev), Ks[:, None].to(dev), R, R,
                            backgrounds=torch.ones(V, 1, 3, device=dev))
        return lpips(rgb[:, 0], images.to(dev)).cpu()


def refine_and_reconstruct(model: LGM,
                           imgs: Tensor,    # [V, 3, R, R] the input images, in [0, 1]
                           vm: Tensor,      # [V, 4, 4] their given cameras
                           Ks: Tensor,      # [V, 3, 3]
                           world: dict,     # the reconstruction from (imgs, vm): means [1, N, 3], ...
                           lpips: torch.nn.Module, steps: int) -> tuple[dict, Tensor, dict]:
    """MVBoost's input-view optimisation, carried to the output: the input cameras are refined
    against ``world`` (:func:`refine_input_poses`), then the reconstruction is redone from the
    refined cameras (the network conditions on the input cameras' Plücker rays). The redone one is
    kept unless its renders at the refined cameras are further from the input images (mean LPIPS
    over the views) than the first reconstruction's at the given cameras; then the first is kept
    with the given cameras.

    Returns:
        (gaussians, viewmats [V, 4, 4], report): the kept reconstruction and the cameras it was
        made from; the report holds ``kept`` ("refined" | "original"), ``refined_viewmats`` and
        ``lpips``: per view ``before`` (first reconstruction, given cameras), ``refined_cameras``
        (first reconstruction, refined cameras: what the refinement minimised), ``after`` (redone
        reconstruction, refined cameras), and the means ``mean_before`` / ``mean_after``.
    """
    refined, before, at_refined = refine_input_poses(world, imgs, vm, Ks, lpips, steps=steps)
    redone = world_gaussians(model, imgs[None], refined[None], Ks[None])
    after = input_view_lpips(redone, imgs, refined, Ks, lpips)
    kept = "refined" if after.mean() <= before.mean() else "original"
    report = {"kept": kept, "refined_viewmats": refined.tolist(),
              "lpips": {"before": before.tolist(), "refined_cameras": at_refined.tolist(), "after": after.tolist(),
                        "mean_before": float(before.mean()), "mean_after": float(after.mean())}}
    print(f"pose refinement ({steps} steps): mean LPIPS to the inputs {float(before.mean()):.4f} before, "
          f"{float(after.mean()):.4f} after re-reconstruction -> kept the {kept} reconstruction"
          + ("" if kept == "refined" else " (the redone one was worse)"))
    return (redone, refined, report) if kept == "refined" else (world, vm, report)


def infer(model_dir: str, image_paths: list[str], out_dir: str, cameras_json: str | None = None,
          device: str | None = None, turntable_frames: int = 36, resolution: int | None = None,
          refine_pose_steps: int = 0, lpips_backbone: str = "imagenet") -> dict:
    """Images to ``out_dir/gaussians.ply`` and ``out_dir/turntable.gif``; returns the paths and
    stage latencies (ms).

    ``refine_pose_steps > 0`` (MVBoost's input-view optimisation): the input cameras are refined
    against the first reconstruction (:func:`refine_input_poses`), and the reconstruction is then
    redone from the refined cameras, since the network conditions on the input cameras' Plücker
    rays. The output is the result whose renders at its own input cameras are closer to the
    input images (mean LPIPS over the views): the redone one unless it is worse than the first, in
    which case the first is kept with the given cameras. ``out_dir/cameras_refined.json`` holds
    the cameras the output was made from, the refined cameras, per-view LPIPS ``before`` (first
    reconstruction at the given cameras), ``refined_cameras`` (first reconstruction at the refined
    cameras, what the refinement minimised) and ``after`` (the redone reconstruction at the
    refined cameras), and ``kept``: ``"refined"`` or ``"original"``. The returned dict carries the
    same numbers; ``gaussians.ply`` and the turntable are written after this decision."""
    if isinstance(refine_pose_steps, bool) or not isinstance(refine_pose_steps, int) or refine_pose_steps < 0:
        raise ValueError(f"--refine-pose must be a number of steps >= 0; got {refine_pose_steps!r}")
    timer = StageTimer()
    dev = default_device(device)
    with timer("load model"):
        model = LGM.from_pretrained(model_dir).to(dev).eval()
    cfg = model.config
    if len(image_paths) != cfg.num_input_views:
        raise ValueError(f"--images: the model takes {cfg.num_input_views} views; got {len(image_paths)}")
    with timer("read inputs"):
        imgs = load_images(image_paths)                                     # [V, 3, R, R]
        if imgs.shape[-1] != imgs.shape[-2]:
            raise ValueError(f"--images must be square; got {imgs.shape[-1]}x{imgs.shape[-2]}")
        R = imgs.shape[-1]
        vm, Ks = read_cameras(cameras_json, len(image_paths), R) if cameras_json else default_input_cameras(cfg, R)
    with timer("model"):
        world = world_gaussians(model, imgs[None], vm[None], Ks[None])
    result = {}
    if refine_pose_steps > 0:
        from fast3d.evaluation.image_metrics import load_lpips

        with timer("refine poses"):
            world, vm, report = refine_and_reconstruct(model, imgs, vm, Ks, world, load_lpips(lpips_backbone, dev),
                                                       refine_pose_steps)
        os.makedirs(out_dir, exist_ok=True)
        cams_out = os.path.join(out_dir, "cameras_refined.json")
        save_refined_cameras(cams_out, vm, Ks, report, lpips_backbone)
        lp = report["lpips"]
        result.update(cameras_refined=cams_out, kept=report["kept"], lpips_before=lp["before"],
                      lpips_after=lp["after"], lpips_refined_cameras=lp["refined_cameras"])
    os.makedirs(out_dir, exist_ok=True)
    ply = os.path.join(out_dir, "gaussians.ply")
    with timer("write ply"):
        save_gaussians_ply(ply, world)
    res = resolution or cfg.render_size
    with timer("turntable"):
        frames = render_turntable(world, cfg, rig_distance(vm), turntable_frames, res)
        gif = write_turntable(frames, os.path.join(out_dir, "turntable.gif"))
    print(f"fast3d infer (LGM, {cfg.num_gaussians} Gaussians, {dev}):\n{timer.report()}\n"
          f"wrote {ply}\nwrote {gif}")
    return {"ply": ply, "turntable": gif, "latency_ms": dict(timer.stages), **result}


def evaluate(model_dir: str, data_path: str, out_json: str, input_views=(0, 4, 8, 12), views: int = 16,
             resolution: int | None = None, lpips_backbone: str = "imagenet", device: str | None = None,
             max_samples: int | None = None, clip=()) -> dict:
    """PSNR/SSIM/LPIPS (and MS-SSIM at >= 176 px) on the views that are not inputs, and
    Chamfer/F-score of the opacity-weighted Gaussian centres against the reference geometry, per
    sample and averaged; written to ``out_json`` (and its Markdown table). ``data_path``: fast3d
    shards (geometry: the asset's Gaussians, ``assets/<key>.ply``) or a GSO-style folder (geometry:
    its mesh or points; ``fast3d.evaluation.sets``). With ``clip`` (CLIP backbones: local
    directories or ``random-tiny``), VFusion3D's CLIP image similarity of the renders to the input
    views and CLIP text similarity to the sample's caption, per backbone. Rows are appended as
    they are computed; a rerun with the same model and settings resumes after the last one."""
    from fast3d.evaluation import image_metrics as im
    from fast3d.evaluation.clip_metrics import load_clip, render_scores
    from fast3d.evaluation.geometry_metrics import chamfer_fscore
    from fast3d.evaluation.report import Progress, SampleLog, fingerprint, write_report
    from fast3d.evaluation.sets import iter_samples

    dev = default_device(device)
    model = LGM.from_pretrained(model_dir).to(dev).eval()
    cfg = model.config
    if len(input_views) != cfg.num_input_views:
        raise ValueError(f"input_views must list {cfg.num_input_views} views; got {list(input_views)}")
    if views <= max(input_views) or views <= len(input_views):
        raise ValueError(f"views must hold the input views {list(input_views)} and a held-out view; got {views}")
    R = resolution or cfg.render_size
    lp = im.load_lpips(lpips_backbone, dev)
    held = [i for i in range(views) if i not in input_views]
    lp_name, lp_net = im.lpips_metric(lpips_backbone)  # a stand-in is not the metric
    clips = [load_clip(c, dev) for c in clip]
    log = SampleLog(out_json, {"kind": "lgm", "model": os.path.abspath(model_dir), "weights": fingerprint(model_dir),
                               "data": os.path.abspath(data_path), "input_views": list(input_views), "views": views,
                               "resolution": R, "lpips_backbone": lpips_backbone, "clip": list(clip)})
    progress, skipped = Progress(max_samples, log.resumed), []
    for s in iter_samples(data_path, views, R, skipped):
        if max_samples is not None and len(log.rows) >= max_samples:
            break
        if log.done(s["key"]):
            continue
        idx = list(input_views)
        world = world_gaussians(model, s["images"][idx][None], s["viewmats"][idx][None], s["Ks"][idx][None])
        with torch.no_grad():
            rgb, _ = LGM.render(world, s["viewmats"][held][None].to(dev), s["Ks"][held][None].to(dev), R, R,
                                backgrounds=torch.ones(1, len(held), 3, device=dev))
        gt = s["images"][held].to(dev)
        pred = rgb[0].clamp(0, 1)
        row = {"key": s["key"], **im.view_scores(pred, gt, lp, lp_name)}
        row.update(render_scores(clips, pred, s["images"][idx], s["caption"]))
        if s["points"] is not None:
            geo = chamfer_fscore(world["means"][0], s["points"], world["opacities"][0])
            if math.isfinite(geo["chamfer"]):  # inf: no Gaussian opaque enough to count
                row.update(geo)
        log.add(row)
        progress.step(s["key"], row)
    rows = log.rows
    if not rows:
        raise ValueError(f"--data {data_path!r} yielded no samples with {views} views"
                         + (f" ({len(skipped)} unreadable: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    return write_report(out_json, rows, model_dir, data_path, backbones=im.view_backbones(rows, lp_name, lp_net, R),
                        kind="lgm", held_out_views=held, resolution=R, lpips_backbone=lpips_backbone,
                        skipped=[{"key": k, "reason": why} for k, why in skipped])
