"""``fast3d datagen boost``: MVBoost's pseudo ground truth from single images.

For each input image (MVBoost, ``../shared/seeds/mvboost-summary.txt``):

1. the image is preprocessed as ``fast3d generate`` does (:func:`fast3d.inference.preprocess.preprocess`
   at the multi-view model's framing, :func:`fast3d.inference.generate.object_fraction`);
2. the multi-view diffusion model makes its rig's V views (sharp, not quite consistent);
3. the LGM reconstructs them (the views its input rig takes, checked by
   :func:`fast3d.inference.generate.check_rig` before any item) into Gaussians (consistent, soft);
4. the Gaussians are rendered at all V rig cameras on the model's background;
5. each render is refined by the diffusion model with SDEdit: noised to ``strength`` and denoised
   conditioned on the input image as in generation (:func:`fast3d.inference.mvdiff.sample_views`
   with ``init_views``);
6. the refined views, the rig's cameras, the renders' alpha, the preprocessed input image
   (``<key>.input.png``, a member the shard reader ignores) and the caption (a ``<stem>.txt``
   beside the image, where there is one) go into shards of source ``boost``.

Item i (the i-th image of the sorted input list) is a function of (seed, i): its two sampler seeds
come from a generator seeded with ``seed * 1_000_003 + i``. Items are grouped into shards of
``samples_per_shard`` consecutive items; readers (local workers x RANK/WORLD_SIZE ranks) take
shards j = reader, reader + readers, ... as :mod:`fast3d.datagen.procedural` does. A finished
item is kept in ``partial/<key>.tar`` (its shard members, written atomically) until its shard is written, so a kill
loses at most the item in flight; a finished shard is skipped on a rerun. Images that cannot be
read as images are skipped, counted and named (as ``fast3d generate``'s batch mode does).

``preview/<key>.png`` for the first ``preview`` items: four rows of V tiles: the input, the
diffusion views, the LGM renders and the refined views.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from fast3d import cameras as cams
from fast3d import checks
from fast3d.data.shards import MultiViewSample, ShardWriter, claim_output, encode_sample, png_bytes
from fast3d.io.atomic import atomic_path

PREFIX = "boost"
SOURCE = "boost"
PARTIAL = "partial"
PREVIEW = "preview"


@dataclass(frozen=True)
class BoostConfig:
    """The settings that change the samples (and how the work is grouped)."""
    strength: float = 0.95               # SDEdit noise strength of the refinement, in (0, 1]
    seed: int = 0
    steps: int = 30                      # sampler steps (the refinement runs int(steps * strength))
    guidance: float = 3.0                # classifier-free guidance weight
    scheduler: str = "ddim"
    views: tuple[int, ...] | None = None  # the multi-view model's views the LGM takes (None: all)
    samples_per_shard: int = 16
    preview: int = 4                     # items with a preview PNG (the first ones)

    def validate(self) -> None:
        """ValueError naming the argument for a setting out of range."""
        checks.real("--strength", self.strength, 0, 1, lo_open=True)
        checks.nonneg_int("--seed", self.seed)
        checks.positive_int("--steps", self.steps)
        checks.real("--guidance", self.guidance, 0)
        checks.one_of("--scheduler", self.scheduler, ("ddim", "euler", "dpm"))
        checks.positive_int("--samples-per-shard", self.samples_per_shard)
        checks.nonneg_int("--preview", self.preview)
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"--strength x --steps must reach one sampler step; got --strength {self.strength}, "
                             f"--steps {self.steps}")


def collect_images(images: list[str] | str) -> list[str]:
    """The input images: a folder of images, image files, or one ``.txt`` / ``.lst`` file listing
    image paths (one a line, relative to the list's folder; blank and ``#`` lines skipped).

    Returns:
        Absolute paths, sorted (a folder) or in the list's order.
    """
    from fast3d.inference.generate import collect_items

    if isinstance(images, str):
        images = [images]
    if not isinstance(images, (list, tuple)) or not images or not all(isinstance(p, str) for p in images):
        raise ValueError(f"--images must be a folder, image files or a list file; got {images!r}")
    if len(images) == 1 and images[0].lower().endswith((".txt", ".lst")) and os.path.isfile(images[0]):
        try:
            with open(images[0], encoding="utf-8") as f:
                lines = [ln.strip() for ln in f.read().splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--images {images[0]!r} cannot be read as a text list of paths ({e})") from None
        base = os.path.dirname(os.path.abspath(images[0]))
        images = [os.path.join(base, ln) for ln in lines if ln and not ln.startswith("#")]
        if not images:
            raise ValueError(f"--images {images!r}: the list holds no path")
    try:
        items, _ = collect_items(images=list(images))
    except ValueError as e:
        raise ValueError(str(e).replace("--image ", "--images ", 1)) from None
    return [os.path.abspath(it["image"]) for it in items]


def item_seeds(cfg: BoostConfig, index: int) -> tuple[int, int]:
    """The sampler seeds of item ``index``: (multi-view sampling, refinement)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    a, b = torch.randint(0, 2**62, (2,), generator=g).tolist()
    return int(a), int(b)


def _key(i: int) -> str:
    return f"boost{i:08d}"


def _caption(path: str) -> str:
    """The text of ``<stem>.txt`` beside the image, or "" where there is none."""
    side = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(side):
        return ""
    try:
        with open(side, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _elevation(viewmats: Tensor) -> float | None:  # [V, 4, 4]
    """The rig's elevation in radians when all its views share one, else None."""
    c = cams.camera_centers(viewmats.double())                               # [V, 3]
    el = torch.asin((c[:, 2] / c.norm(dim=-1)).clamp(-1, 1))                  # [V]
    return float(el[0]) if bool(((el - el[0]).abs() < 1e-6).all()) else None


class Pipeline:
    """The loaded models of a run and one item's stages (module docstring)."""

    def __init__(self, mv_model: str, recon_model: str, cfg: BoostConfig, device=None):
        from fast3d.inference.generate import check_rig, load_multiview, load_reconstructor, parse_views

        cfg.validate()
        self.cfg = cfg
        self.mv = load_multiview(mv_model, "image", device)
        self.recon = load_reconstructor(recon_model, device)
        if self.recon.kind != "lgm":
            raise ValueError(f"--recon {recon_model!r} holds an {self.recon.kind!r} model; datagen boost renders "
                             f"Gaussians: it needs an 'lgm' (fast3d train lgm)")
        views = parse_views(None if cfg.views is None else list(cfg.views), self.mv.num_views)
        self.idx = check_rig(self.mv, self.recon, views)
        self.viewmats, self.Ks = self.mv.cameras()                          # [V, 4, 4], [V, 3, 3]

    def item(self, path: str, index: int) -> dict:
        """One image -> {"input" [3, R, R], "views", "renders", "refined" [V, 3, R, R],
        "alphas" [V, 1, R, R]}, all on the CPU in [0, 1]. ValueError for an image that is not one."""
        from fast3d.inference.generate import object_fraction
        from fast3d.inference.lgm import world_gaussians
        from fast3d.inference.mvdiff import sample_views
        from fast3d.inference.preprocess import preprocess
        from fast3d.io.images import read_image
        from fast3d.models.lgm import LGM

        mv, cfg, R = self.mv, self.cfg, self.mv.resolution
        bg_level = float(mv.model.config.background)
        rgba = read_image(path, name="--images")
        image, _ = preprocess(rgba, R, object_fraction(mv), bg_level, name=f"--images {path!r}")
        s_views, s_refine = item_seeds(cfg, index)
        kw = dict(steps=cfg.steps, guidance_scale=cfg.guidance, scheduler=cfg.scheduler)
        views = sample_views(mv.model, image, seed=s_views, **kw)["images"].float().clamp(0, 1)
        dev = next(self.recon.model.parameters()).device
        idx = self.idx
        world = world_gaussians(self.recon.model, views[idx][None], self.viewmats[idx][None], self.Ks[idx][None])
        V = len(self.viewmats)
        with torch.no_grad():
            renders, alphas = LGM.render(world, self.viewmats[None].to(dev), self.Ks[None].to(dev), R, R,
                                         backgrounds=torch.full((1, V, 3), bg_level, device=dev))
        renders = renders[0].float().clamp(0, 1).cpu()                          # [V, 3, R, R]
        alphas = alphas[0].float().clamp(0, 1).cpu()                            # [V, 1, R, R]
        refined = sample_views(mv.model, image, seed=s_refine, init_views=renders, strength=cfg.strength,
                               **kw)["images"].float().clamp(0, 1)
        return {"input": image.float().clamp(0, 1).cpu(), "views": views, "renders": renders, "refined": refined,
                "alphas": alphas}

    def sample(self, path: str, index: int, stages: dict) -> dict[str, bytes]:
        """The shard members of item ``index`` (``stages`` from :meth:`item`)."""
        s = MultiViewSample(key=_key(index), images=stages["refined"], alphas=stages["alphas"],
                            viewmats=self.viewmats.float(), Ks=self.Ks.float(), caption=_caption(path),
                            source=SOURCE, quality=1.0, elevation=_elevation(self.viewmats))
        members = encode_sample(s)
        members["input.png"] = png_bytes(stages["input"])
        return members


def preview_image(stages: dict) -> Tensor:  # -> [3, 4 R, V R]
    """Four rows of V tiles: the input (then background), the diffusion views, the LGM renders, the
    refined views."""
    views = stages["views"]                                                    # [V, 3, R, R]
    V, _, R, _ = views.shape
    first = torch.ones_like(views)
    first[0] = stages["input"]
    rows = [first, views, stages["renders"], stages["refined"]]
    return torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)


def _manifest(cfg: BoostConfig, images: list[str], mv_path: str, recon_path: str) -> dict:
    c = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items() if k != "preview"}
    return {"kind": "boost", "config": c, "images": images, "mv_model": os.path.abspath(mv_path),
            "recon": os.path.abspath(recon_path)}


def prepare_output(out: str, cfg: BoostConfig, images: list[str], mv_model: str, recon_model: str) -> None:
    """Create ``out`` for this run, or check that it holds this same dataset."""
    cfg.validate()
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a directory path; got {out!r}")
    claim_output(out, _manifest(cfg, images, mv_model, recon_model), PREFIX, also_ours=(PARTIAL, PREVIEW))
    os.makedirs(os.path.join(out, PARTIAL), exist_ok=True)


def generate(out: str, images: list[str], mv_model: str, recon_model: str, cfg: BoostConfig, reader: int = 0,
             readers: int = 1, progress: bool = True, device=None, log=None) -> dict:
    """Write this reader's missing shards (module docstring).

    Args:
        out: the dataset directory.
        images: the input images (:func:`collect_images`).
        mv_model: ``--mv-model``: an ``mvdiff`` model, checkpoint or run directory.
        recon_model: ``--recon``: an ``lgm`` one, whose input rig takes the multi-view model's views.
        cfg: the settings.
        reader, readers: this reader and how many there are (shards j = reader + k readers).
        progress: show a progress bar on stderr.
        device: where the models run (default: CUDA when there is one).
        log: where the lines about skipped images go (default: stderr; stdout stays the CLI's summary).

    Returns:
        {"shards_written", "shards_skipped", "samples", "resumed_items", "bad_images": {path: error},
        "seconds"}.
    """
    prepare_output(out, cfg, images, mv_model, recon_model)
    log = log or _stderr
    per = cfg.samples_per_shard
    num_shards = -(-len(images) // per)
    mine = list(range(reader, num_shards, readers))
    done = {j for j in mine if os.path.exists(os.path.join(out, f"{PREFIX}-{j:06d}.tar"))}
    for j in mine:  # temporary files of a killed run
        for tmp in glob.glob(os.path.join(out, f".{PREFIX}-{j:06d}.tar.tmp*")):
            os.unlink(tmp)
    todo = [j for j in mine if j not in done]
    t0 = time.perf_counter()
    result = {"shards_written": 0, "shards_skipped": len(done), "samples": 0, "resumed_items": 0,
              "bad_images": {}}
    if not todo:
        return {**result, "seconds": time.perf_counter() - t0}
    pipe = Pipeline(mv_model, recon_model, cfg, device)
    n_items = sum(min(per, len(images) - j * per) for j in todo)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_items, unit="image", desc=f"boost[{reader}/{readers}]", position=reader, file=sys.stderr,
                   dynamic_ncols=True)
    try:
        for j in todo:
            members = []
            for i in range(j * per, min((j + 1) * per, len(images))):
                part = os.path.join(out, PARTIAL, f"{_key(i)}.tar")
                for tmp in glob.glob(os.path.join(out, PARTIAL, f".{_key(i)}.tar.tmp*")):
                    os.unlink(tmp)
                if os.path.exists(part):
                    m = _read_members(part)
                    result["resumed_items"] += 1
                else:
                    m = _make_item(pipe, out, images[i], i, cfg, result, log)
                    _write_members(part, m)
                if m:  # {} marks an image that is not one
                    members.append((_key(i), m))
                if bar is not None:
                    bar.update(1)
            with ShardWriter(out, prefix=PREFIX, samples_per_shard=max(1, len(members)), start_index=j) as w:
                for key, m in members:
                    w.write(m, key=key)
            if not members:  # a shard of only bad images: an empty tar marks it finished
                _empty_shard(out, j)
            for i in range(j * per, min((j + 1) * per, len(images))):
                os.unlink(os.path.join(out, PARTIAL, f"{_key(i)}.tar"))
            result["shards_written"] += 1
            result["samples"] += len(members)
    finally:
        if bar is not None:
            bar.close()
    return {**result, "seconds": time.perf_counter() - t0}


def _write_members(path: str, members: dict[str, bytes]) -> None:
    """One finished item's shard members (suffix -> bytes; none for a bad image) as a tar, atomically."""
    import io
    import tarfile

    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as t:
        for suffix, data in members.items():
            info = tarfile.TarInfo(suffix)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            t.addfile(info, io.BytesIO(data))


def _read_members(path: str) -> dict[str, bytes]:
    """What :func:`_write_members` wrote (a file of this run's own, written atomically)."""
    import tarfile

    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _empty_shard(out: str, j: int) -> None:
    import tarfile

    with atomic_path(os.path.join(out, f"{PREFIX}-{j:06d}.tar")) as tmp, tarfile.open(tmp, "w"):
        pass


def _make_item(pipe: Pipeline, out: str, path: str, i: int, cfg: BoostConfig, result: dict, log) -> dict:
    """Item i's shard members; {} (and the image counted in ``result``) when it is not an image."""
    from PIL import Image

    from fast3d.io.images import to_uint8

    try:
        stages = pipe.item(path, i)
    except ValueError as e:
        if not str(e).startswith(f"--images {path!r}"):
            raise
        result["bad_images"][path] = str(e)
        log(f"datagen boost: skipping {path}: {e}")
        return {}
    if i < cfg.preview:
        os.makedirs(os.path.join(out, PREVIEW), exist_ok=True)
        dest = os.path.join(out, PREVIEW, f"{_key(i)}.png")
        with atomic_path(dest) as tmp:
            Image.fromarray(to_uint8(preview_image(stages))).save(tmp, format="PNG")
    return pipe.sample(path, i, stages)


def _job(out, images, mv_model, recon_model, cfg, device, worker: int, reader: int, readers: int) -> dict:
    return generate(out, images, mv_model, recon_model, cfg, reader, readers, device=device)


def run(images: list[str] | str, mv_model: str, recon_model: str, out: str, cfg: BoostConfig, workers: int = 1,
        device=None) -> list[dict]:
    """``fast3d datagen boost``: :func:`generate` in ``workers`` local processes (each on its share of
    the CPU threads), readers counted over RANK / WORLD_SIZE too. One result dict per worker."""
    from fast3d.datagen.procedural import run_workers

    checks.positive_int("--workers", workers)
    cfg.validate()
    paths = collect_images(images)
    prepare_output(out, cfg, paths, mv_model, recon_model)
    if workers > 1:  # the rig check before any worker starts: the run's ValueError, not each worker's
        Pipeline(mv_model, recon_model, cfg, "cpu")
    return run_workers(functools.partial(_job, out, paths, mv_model, recon_model, cfg, device), workers)
