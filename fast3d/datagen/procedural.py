"""`fast3d datagen procedural`: procedural assets rendered from a camera rig into multi-view shards.

Object i of a dataset is a pure function of (seed, i): its asset, its cameras and so its images do
not depend on how the work is split. Objects are grouped into shards of `samples_per_shard`
consecutive objects; shard j is the unit of work and of resumption:

* readers (local worker processes x distributed ranks from RANK/WORLD_SIZE) take shards
  j = reader, reader + readers, ...;
* a shard appears only once complete (ShardWriter: temporary file, then rename), so a rerun after
  a kill skips the shards that exist, removes the killed run's temporary files, and writes exactly
  the missing ones: no sample is lost or written twice;
* rendering runs in the main thread (batched: many objects and views per rasterization call) while
  a writer thread encodes PNGs and writes tar files, so the renderer does not wait on zlib.

`dataset.json` records the generating configuration; a rerun with another configuration in the
same directory is refused rather than mixing two datasets.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

import torch

from fast3d import cameras
from fast3d.data.shards import MultiViewSample, ShardWriter, claim_output
from fast3d.datagen import assets
from fast3d.inference.common import default_device

PREFIX = "procedural"
FIXED_VIEWS = {"zero123pp": 6, "mvdream": 4}


@dataclass(frozen=True)
class ProceduralConfig:
    num_objects: int = 64
    views: int = 16
    rig: str = "orbit16"              # orbit16 | zero123pp | mvdream | random
    resolution: int = 256
    seed: int = 0
    gaussians_per_object: int = 20_000
    samples_per_shard: int = 16
    batch_size: int = 4               # objects per rasterization call
    background: str = "white"         # white | random
    save_ply: bool = True             # also write <out>/assets/<key>.ply (3DGS layout)

    def validate(self) -> None:
        for name in ("num_objects", "views", "resolution", "gaussians_per_object", "samples_per_shard",
                     "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if self.rig not in cameras.RIGS:
            raise ValueError(f"rig must be one of {', '.join(cameras.RIGS)}; got {self.rig!r}")
        if self.rig in FIXED_VIEWS and self.views != FIXED_VIEWS[self.rig]:
            raise ValueError(f"rig {self.rig!r} has {FIXED_VIEWS[self.rig]} views; got views={self.views}")
        if self.background not in ("white", "random"):
            raise ValueError(f"background must be 'white' or 'random'; got {self.background!r}")
        if self.gaussians_per_object < 16:
            raise ValueError(f"gaussians_per_object must be >= 16; got {self.gaussians_per_object}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_objects // self.samples_per_shard)


def object_generator(cfg: ProceduralConfig, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)


def make_rig(cfg: ProceduralConfig, gen: torch.Generator) -> cameras.Rig:
    if cfg.rig == "orbit16":
        return cameras.orbit16(gen, resolution=cfg.resolution, n_views=cfg.views)
    if cfg.rig == "random":
        return cameras.random_sphere(gen, cfg.views, resolution=cfg.resolution)
    if cfg.rig == "mvdream":
        # MVDream trains on elevations in [0, 30] degrees and a random azimuth offset.
        el, az = float(torch.rand((), generator=gen)) * 30, float(torch.rand((), generator=gen)) * 360
        return cameras.mvdream(resolution=cfg.resolution, elevation_deg=el, azimuth_offset_deg=az)
    return cameras.zero123pp(resolution=cfg.resolution)


def prepare_output(out: str, cfg: ProceduralConfig) -> None:
    """Create `out` for this configuration, or check that it holds this same dataset."""
    cfg.validate()
    # Everything that changes the samples; batch_size only changes how they are computed.
    mine = {"kind": "procedural", "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}}
    claim_output(out, mine, PREFIX, also_ours=("assets",))


def _render(cfg: ProceduralConfig, objs: list, device: torch.device) -> tuple:
    """objs: [(asset, rig, background [3])] -> images [B, V, 3, R, R], alphas [B, V, 1, R, R], in one
    batched rasterization call."""
    import fast3d

    st = lambda xs: torch.stack(xs).to(device)  # noqa: E731
    a = [o[0] for o in objs]
    V = cfg.views
    bg = st([o[2] for o in objs])[:, None].expand(len(objs), V, 3)  # one background colour per object
    with torch.no_grad():
        rgb, alpha, _ = fast3d.rasterization(
            st([x.means for x in a]), st([x.quats for x in a]), st([x.scales for x in a]),
            st([x.opacities for x in a]), st([x.sh for x in a]), st([o[1].viewmats for o in objs]),
            st([o[1].Ks for o in objs]), cfg.resolution, cfg.resolution, sh_degree=0, backgrounds=bg)
    return rgb.permute(0, 1, 4, 2, 3).clamp(0, 1).cpu(), alpha.permute(0, 1, 4, 2, 3).clamp(0, 1).cpu()


def _writer_loop(out: str, jobs: queue.Queue, errors: list) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        shard, samples = job
        try:
            with ShardWriter(out, prefix=PREFIX, samples_per_shard=len(samples), start_index=shard) as w:
                for s in samples:
                    w.write(s)
        except BaseException as e:  # reported by the render loop, which stops
            errors.append(e)
            return


def _key(i: int) -> str:
    """The sample key (and asset file name) of object i."""
    return f"obj{i:08d}"


def generate(out: str, cfg: ProceduralConfig, reader: int = 0, readers: int = 1, progress: bool = True,
             device: torch.device | None = None) -> dict:
    """Write this reader's missing shards. Returns counts: shards written / skipped, samples."""
    from fast3d.io import save_ply

    prepare_output(out, cfg)
    device = default_device(device)
    mine = list(range(reader, cfg.num_shards, readers))
    done = {j for j in mine if os.path.exists(os.path.join(out, f"{PREFIX}-{j:06d}.tar"))}
    for j in mine:  # temporary files of a killed run: its shards and its assets' PLYs
        stale = glob.glob(os.path.join(out, f".{PREFIX}-{j:06d}.tar.tmp*"))
        for i in range(j * cfg.samples_per_shard, min((j + 1) * cfg.samples_per_shard, cfg.num_objects)):
            stale += glob.glob(os.path.join(out, "assets", f".{_key(i)}.ply.tmp*"))
        for tmp in stale:
            os.unlink(tmp)
    todo = [j for j in mine if j not in done]
    n_samples = sum(min(cfg.samples_per_shard, cfg.num_objects - j * cfg.samples_per_shard) for j in todo)
    if cfg.save_ply:
        os.makedirs(os.path.join(out, "assets"), exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_samples, unit="sample", desc=f"procedural[{reader}/{readers}]", position=reader,
                   file=sys.stderr, dynamic_ncols=True)
    jobs: queue.Queue = queue.Queue(maxsize=2)
    errors: list = []
    writer = threading.Thread(target=_writer_loop, args=(out, jobs, errors), daemon=True)
    writer.start()
    t0, render_s = time.perf_counter(), 0.0
    try:
        for j in todo:
            first = j * cfg.samples_per_shard
            indices = list(range(first, min(first + cfg.samples_per_shard, cfg.num_objects)))
            samples = []
            for b in range(0, len(indices), cfg.batch_size):
                batch = indices[b:b + cfg.batch_size]
                objs = []
                for i in batch:
                    g = object_generator(cfg, i)
                    asset, rig = assets.make_asset(g, cfg.gaussians_per_object), make_rig(cfg, g)
                    bg = torch.ones(3) if cfg.background == "white" else torch.rand(3, generator=g)
                    objs.append((asset, rig, bg))
                tr = time.perf_counter()
                images, alphas = _render(cfg, objs, device)
                render_s += time.perf_counter() - tr
                for k, (i, (asset, rig, _)) in enumerate(zip(batch, objs)):
                    key = _key(i)
                    if cfg.save_ply:
                        save_ply(os.path.join(out, "assets", f"{key}.ply"), asset.means, asset.quats, asset.scales,
                                 asset.opacities, asset.sh)
                    same_el = bool((rig.elevations == rig.elevations[0]).all())
                    samples.append(MultiViewSample(
                        key=key, images=images[k], alphas=alphas[k], viewmats=rig.viewmats, Ks=rig.Ks,
                        caption=asset.caption, source="rendered3d", quality=1.0,
                        elevation=float(rig.elevations[0]) if same_el else None))
                if bar is not None:
                    bar.update(len(batch))
            if errors:
                raise errors[0]
            jobs.put((j, samples))
    finally:
        jobs.put(None)
        writer.join()
        if bar is not None:
            bar.close()
    if errors:
        raise errors[0]
    return {"shards_written": len(todo), "shards_skipped": len(done), "samples": n_samples,
            "seconds": time.perf_counter() - t0, "render_seconds": render_s}


def reader_from_env(worker: int, workers: int) -> tuple[int, int]:
    """(reader, readers) for local worker `worker` of `workers` on the distributed rank in RANK /
    WORLD_SIZE (set by torchrun and the DeepSpeed launcher); one rank without them."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE); got RANK={rank}, WORLD_SIZE={world}")
    return rank * workers + worker, world * workers


def run_workers(job, workers: int) -> list[dict]:
    """``job(worker, reader, readers) -> dict`` in ``workers`` local processes (one in-process when
    1), each on its share of the CPU threads, readers counted over RANK / WORLD_SIZE too. ``job``
    must pickle (a module-level function or a ``functools.partial`` of one). One dict per worker."""
    if workers == 1:
        return [job(0, *reader_from_env(0, 1))]
    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // workers)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_spawned, args=(job, workers, threads, results), nprocs=workers, join=True)
        return [results[w] for w in range(workers)]


def _spawned(worker: int, job, workers: int, threads: int, results) -> None:
    torch.set_num_threads(threads)
    results[worker] = job(worker, *reader_from_env(worker, workers))


def _job(out: str, cfg: ProceduralConfig, worker: int, reader: int, readers: int) -> dict:
    return generate(out, cfg, reader, readers)


def run(out: str, cfg: ProceduralConfig, workers: int = 1) -> list[dict]:
    """Generate with `workers` local processes (each on its share of the CPU threads)."""
    if workers <= 0:
        raise ValueError(f"workers must be positive; got {workers}")
    prepare_output(out, cfg)
    return run_workers(functools.partial(_job, out, cfg), workers)
