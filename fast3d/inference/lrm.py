"""LRM inference and evaluation (``fast3d infer`` / ``fast3d eval`` on an "lrm" checkpoint): one
image in, a triplane out, exported as a coloured point cloud, a vertex-coloured mesh (marching
cubes on the density) and a turntable; and held-out-view PSNR / SSIM / LPIPS on a multi-view dataset.

The source camera. The LRM recipe trains with the data's true input cameras (fast3d's world:
objects in [-0.5, 0.5]^3, +Z up; VFusion3D's orbit: any azimuth, elevation in [0, 45] degrees,
distance 2.2, vertical field of view 49.1 degrees). An image without a camera is taken to be seen
from the canonical camera ``CANONICAL_CAMERA``: azimuth 0, elevation 20 degrees (inside that
range), distance 2.2, fov 49.1 degrees, looking at the origin, upright. ``camera`` (a dict, e.g.
read from ``--cameras FILE.json``) overrides any of those keys (``azimuth_deg``, ``elevation_deg``,
``distance``, ``fov_y_deg``), or gives the camera itself as LGM's cameras files do:
``{"viewmats": [1 x 4 x 4], "Ks": [1 x 3 x 3]}`` (OpenCV world-to-camera, intrinsics in pixels of
the image). The turntable circles the origin at the source camera's elevation, distance and field
of view, from azimuth 0.
"""

from __future__ import annotations

import math
import numbers
import os
import time

import torch
from torch import Tensor

from fast3d import cameras, checks
from fast3d.data.shards import background_color
from fast3d.inference.common import StageTimer, default_device, load_image, write_turntable
from fast3d.inference.mesh import DENSITY_THRESHOLD, MESH_GRID, extract_mesh
from fast3d.models.checkpoints import model_type, resolve_checkpoint
from fast3d.models.lrm import LRM

CANONICAL_CAMERA = {"azimuth_deg": 0.0, "elevation_deg": 20.0, "distance": cameras.DEFAULT_DISTANCE,
                    "fov_y_deg": cameras.DEFAULT_FOV_Y_DEG}
POINT_GRID = 128           # default extract_points grid: 128^3 density queries over the triplane box
TURNTABLE_CHUNK = 8        # views per render call


def load_model(model_dir: str, device: torch.device) -> tuple[LRM, str]:
    """The LRM of a model, checkpoint or run directory (EMA weights preferred), in eval mode."""
    path = resolve_checkpoint(model_dir)
    kind = model_type(path)
    if kind != "lrm":
        raise ValueError(f"checkpoint {model_dir!r} holds a {kind!r} model; LRM inference needs an 'lrm' checkpoint")
    return LRM.from_pretrained(path).to(device).eval(), path


def _posed_camera(camera: dict, size: int) -> tuple[Tensor, Tensor, dict]:
    """{"viewmats": [1 x 4 x 4], "Ks": [1 x 3 x 3]} (LGM's cameras file with one view) -> viewmat,
    K and the spherical description of the camera (for the turntable)."""
    if set(camera) != {"viewmats", "Ks"}:
        raise ValueError(f"camera: a posed camera has exactly the keys ['Ks', 'viewmats']; got {sorted(camera)}")
    try:
        viewmat, K = (torch.tensor(camera[k], dtype=torch.float32) for k in ("viewmats", "Ks"))
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"camera: viewmats and Ks must be numeric matrices ({e})") from None
    if viewmat.shape != (1, 4, 4) or K.shape != (1, 3, 3):
        raise ValueError(f"camera: viewmats must be [1, 4, 4] and Ks [1, 3, 3] (one image); got "
                         f"{list(viewmat.shape)} and {list(K.shape)}")
    if not (torch.isfinite(viewmat).all() and torch.isfinite(K).all()) or not K[0, 1, 1] > 0:
        raise ValueError("camera: viewmats and Ks must be finite, with a positive focal length")
    x, y, z = cameras.camera_centers(viewmat.double())[0].tolist()
    d = math.sqrt(x * x + y * y + z * z)
    cam = {"azimuth_deg": math.degrees(math.atan2(y, x)), "elevation_deg": math.degrees(math.asin(z / d)),
           "distance": d, "fov_y_deg": math.degrees(2 * math.atan(size / 2 / float(K[0, 1, 1])))}
    return viewmat, K, cam


def source_camera(camera: dict | None, size: int, default: dict | None = None,
                  ) -> tuple[Tensor, Tensor, dict]:  # -> [1, 4, 4], [1, 3, 3], camera
    """The input camera (module docstring) for a size x size image: viewmat, K in its pixels, and
    its azimuth, elevation, distance and field of view. Keys ``camera`` leaves out come from
    ``default`` (a model's ``LRMConfig.source_camera``: a converted model's original default),
    else from ``CANONICAL_CAMERA``."""
    if camera is not None and not isinstance(camera, dict):
        raise ValueError(f"camera must be a dict; got {type(camera).__name__}")
    if camera is not None and ("viewmats" in camera or "Ks" in camera):
        return _posed_camera(camera, size)
    cam = dict(CANONICAL_CAMERA if default is None else default)
    if camera is not None:
        unknown = sorted(set(camera) - set(CANONICAL_CAMERA))
        if unknown:
            raise ValueError(f"camera: unknown keys {unknown}; expected some of {sorted(CANONICAL_CAMERA)}, "
                             f"or viewmats and Ks")
        cam.update(camera)
    for k, v in cam.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"camera.{k} must be a finite number; got {v!r}")
    if not -90 < cam["elevation_deg"] < 90:
        raise ValueError(f"camera.elevation_deg must be in (-90, 90); got {cam['elevation_deg']}")
    if not cam["distance"] > 0:
        raise ValueError(f"camera.distance must be positive; got {cam['distance']}")
    if not 0 < cam["fov_y_deg"] < 180:
        raise ValueError(f"camera.fov_y_deg must be in (0, 180); got {cam['fov_y_deg']}")
    az, el = (torch.tensor([math.radians(cam[k])], dtype=torch.float64) for k in ("azimuth_deg", "elevation_deg"))
    viewmat, K = cameras.orbit_cameras(az, el, float(cam["distance"]), float(cam["fov_y_deg"]), size)
    return viewmat, K, {k: float(v) for k, v in cam.items()}


def timed_planes(model: LRM, image: Tensor,  # [1, 3, H, W]
                 viewmat: Tensor,             # [1, 4, 4]
                 K: Tensor,                   # [1, 3, 3]
                 timer: StageTimer) -> Tensor:  # -> [1, 3, C, h, w]
    """``model(image, viewmat, K)``, timed as "encode" (the DINOv2 encoder, between hooks on it) and
    "planes" (the rest: camera embedding, triplane transformer, upsampling).

    Args:
        model: the LRM, in eval mode.
        image, viewmat, K: one posed image on the model's device.
        timer: gets the two stages.

    Returns:
        The triplane.
    """
    marks = {}

    def mark(name):
        def hook(*_):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks[name] = time.perf_counter()
        return hook

    handles = [model.encoder.register_forward_pre_hook(mark("start")), model.encoder.register_forward_hook(mark("end"))]
    try:
        with timer("planes"):
            planes = model(image, viewmat, K)
    finally:
        for h in handles:
            h.remove()
    total = timer.stages.pop("planes")
    timer.stages["encode"] = (marks["end"] - marks["start"]) * 1e3
    timer.stages["planes"] = total - timer.stages["encode"]
    return planes


@torch.no_grad()
def render_turntable(model: LRM, planes: Tensor,  # [1, 3, C, h, w] one triplane, on the model's device
                     camera: dict, frames: int, resolution: int) -> Tensor:  # -> [frames, 3, res, res]
    """The turntable of a triplane on white: ``frames`` views around the origin at the source
    camera's elevation, distance and field of view (``camera``: :func:`source_camera`'s dict),
    ``TURNTABLE_CHUNK`` a render call; float32 in [0, 1]."""
    dev = planes.device
    tv, tK = cameras.turntable(frames, resolution, camera["elevation_deg"], camera["distance"], camera["fov_y_deg"])
    white = torch.ones(3, device=dev)
    out = [model.render(planes, tv[None, i:i + TURNTABLE_CHUNK].to(dev), tK[None, i:i + TURNTABLE_CHUNK].to(dev),
                        resolution, resolution, background=white)["images"][0]
           for i in range(0, frames, TURNTABLE_CHUNK)]
    return torch.cat(out).float()


@torch.no_grad()
def infer(model_dir: str, image_path: str, out_dir: str, camera: dict | None = None, device=None,
          turntable_frames: int = 36, resolution: int | None = None, point_grid: int = POINT_GRID,
          mesh_grid: int = MESH_GRID) -> dict:
    """One square image to ``out_dir/points.ply`` (the surface voxels of a point_grid^3 grid whose
    density is above the threshold, coloured), ``out_dir/mesh.ply`` (``extract_mesh`` on a
    mesh_grid^3 grid; mesh_grid 0: none) and ``out_dir/turntable.gif`` (``turntable_frames``
    views of ``resolution`` px, default the model's input size). Prints and returns the stage
    latencies (ms)."""
    from fast3d.io import save_mesh_ply, save_points_ply

    turntable_frames = checks.positive_int("turntable_frames", turntable_frames)
    resolution = checks.positive_int("resolution", resolution, optional=True)
    point_grid = checks.integer("point_grid", point_grid, 2)
    if isinstance(mesh_grid, bool) or not isinstance(mesh_grid, int) or mesh_grid < 0 or mesh_grid == 1:
        raise ValueError(f"mesh_grid must be 0 (no mesh) or an integer >= 2; got {mesh_grid!r}")
    dev = default_device(device)
    timer = StageTimer()
    with timer("load"):
        model, path = load_model(model_dir, dev)
        image = load_image(image_path)                                          # [3, H, W]
        if image.shape[1] != image.shape[2]:
            raise ValueError(f"image {image_path!r} is {image.shape[2]}x{image.shape[1]}; LRM takes a square image "
                             f"(crop or pad it around the object)")
        viewmat, K, cam = source_camera(camera, image.shape[-1], model.config.source_camera)
    planes = timed_planes(model, image[None].to(dev), viewmat.to(dev), K.to(dev), timer)
    os.makedirs(out_dir, exist_ok=True)
    ply = os.path.join(out_dir, "points.ply")
    with timer("export"):
        points, colors = model.extract_points(planes[0], point_grid, DENSITY_THRESHOLD)
        save_points_ply(ply, points, colors)
    mesh, vertices, faces = None, (), ()
    if mesh_grid:
        mesh = os.path.join(out_dir, "mesh.ply")
        with timer("mesh"):
            vertices, faces, vcolors = extract_mesh(model, planes[0], mesh_grid, DENSITY_THRESHOLD)
            save_mesh_ply(mesh, vertices, faces, vcolors)
    res = resolution or model.config.image_size
    with timer("turntable"):
        gif = write_turntable(render_turntable(model, planes, cam, turntable_frames, res),
                              os.path.join(out_dir, "turntable.gif"))
    note = "" if len(points) else f" (no voxel above density {DENSITY_THRESHOLD}: an untrained or failed model?)"
    lines = [f"wrote {ply} ({len(points)} points{note})"]
    if mesh is not None:
        lines.append(f"wrote {mesh} ({len(vertices)} vertices, {len(faces)} triangles)" if len(faces) else
                     f"wrote {mesh}: EMPTY mesh, the density never exceeds {DENSITY_THRESHOLD} on the "
                     f"{mesh_grid}^3 grid (an untrained or failed model?)")
    print(f"fast3d infer (LRM {path}, {dev}):\n{timer.report()}\n" + "\n".join(lines) + f"\nwrote {gif}")
    return {"points": ply, "num_points": len(points), "mesh": mesh, "num_vertices": len(vertices),
            "num_faces": len(faces), "turntable": gif, "camera": cam, "latency_ms": dict(timer.stages)}


@torch.no_grad()
def evaluate(model_dir: str, data_path: str, out_json: str, views: int = 4, resolution: int | None = None,
             lpips_backbone: str = "imagenet", device=None, max_samples: int | None = None,
             point_grid: int = 64, clip=()) -> dict:
    """Reconstruct each sample of ``data_path`` (fast3d shards or a GSO-style folder,
    ``fast3d.evaluation.sets``) from its first view (with its true camera) and score renders of
    its next ``views - 1`` views, at ``resolution`` px (default: the model's input size), over the
    sample's own background: PSNR, SSIM (and MS-SSIM at >= 176 px) and LPIPS (``lpips_random``
    with the random stand-in backbone) per sample and averaged; written to ``out_json`` (and its
    Markdown table). Where the sample has reference geometry (a shard's ``assets/<key>.ply``, a
    GSO object's mesh or points), also Chamfer distance / F-score between the surface points of
    the predicted density (``extract_points`` on a ``point_grid``^3 grid) and it (samples whose
    density has no surface get none). With ``clip`` (CLIP backbones: local directories or
    ``random-tiny``), VFusion3D's CLIP image similarity of the renders to the input view and CLIP
    text similarity to the sample's caption, per backbone. Rows are appended as they are
    computed; a rerun with the same model and settings resumes after the last one."""
    from fast3d.evaluation import image_metrics as im
    from fast3d.evaluation.clip_metrics import load_clip, render_scores
    from fast3d.evaluation.geometry_metrics import chamfer_fscore
    from fast3d.evaluation.report import Progress, SampleLog, fingerprint, write_report
    from fast3d.evaluation.sets import iter_samples

    views = checks.integer("views", views, 2, note="the input and at least one held-out view")
    max_samples = checks.positive_int("max_samples", max_samples, optional=True)
    dev = default_device(device)
    model, path = load_model(model_dir, dev)
    R = resolution or model.config.image_size
    R = checks.integer("resolution", R, 11, note="SSIM's window")
    lp = im.load_lpips(lpips_backbone, dev)
    lp_name, lp_net = im.lpips_metric(lpips_backbone)
    clips = [load_clip(c, dev) for c in clip]
    log = SampleLog(out_json, {"kind": "lrm", "model": os.path.abspath(path), "weights": fingerprint(path),
                               "data": os.path.abspath(data_path), "views": views, "resolution": R,
                               "lpips_backbone": lpips_backbone, "point_grid": point_grid, "clip": list(clip)})
    progress, skipped = Progress(max_samples, log.resumed), []
    for s in iter_samples(data_path, views, R, skipped):
        if max_samples is not None and len(log.rows) >= max_samples:
            break
        if s["source"] == "image2d" or log.done(s["key"]):  # image2d: one image tiled, no held-out view
            continue
        images, alphas = s["images"][None].to(dev), s["alphas"][None].to(dev)  # [1, V, 3, R, R], [1, V, 1, R, R]
        viewmats, Ks = s["viewmats"][None].to(dev), s["Ks"][None].to(dev)      # [1, V, 4, 4], [1, V, 3, 3]
        planes = model(images[:, 0], viewmats[:, 0], Ks[:, 0])
        out = model.render(planes, viewmats[:, 1:], Ks[:, 1:], R, R, background=background_color(images, alphas))
        pred, gt = out["images"][0].float().clamp(0, 1), images[0, 1:]
        row = {"key": s["key"], **im.view_scores(pred, gt, lp, lp_name)}
        row.update(render_scores(clips, pred, images[0, :1], s["caption"]))
        if point_grid and s["points"] is not None:
            points, _ = model.extract_points(planes[0].float(), resolution=point_grid)
            if len(points):
                row.update(chamfer_fscore(points.cpu(), s["points"]))
        log.add(row)
        progress.step(s["key"], row)
    rows = log.rows
    if not rows:
        raise ValueError(f"data_path {data_path!r} yielded no multi-view sample with {views} views"
                         + (f" ({len(skipped)} unreadable: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    report = write_report(out_json, rows, path, data_path, backbones=im.view_backbones(rows, lp_name, lp_net, R),
                          kind="lrm", input_view=0, held_out_views=list(range(1, views)), resolution=R,
                          lpips_backbone=lpips_backbone,
                          skipped=[{"key": k, "reason": why} for k, why in skipped])
    mean = report["mean"]
    print(f"fast3d eval (LRM {path}): {len(rows)} samples, " + ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    return report
