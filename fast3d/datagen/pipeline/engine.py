"""Running the pipeline resumably: prompts -> text-to-image -> image-to-multi-view -> quality filter ->
optional elevation labels, background matting and recaption (of the kept samples) -> shards
``synthetic-NNNNNN.tar`` with ``source=synthetic``.

The design is :mod:`fast3d.datagen.procedural`'s: item i is a pure function of (config, i); shard j
(items j*S .. j*S+S-1) is the unit of work and of resumption; readers (local worker processes x
RANK/WORLD_SIZE) take shards j = reader, reader + readers, ...; a shard appears only once complete
(temporary file, then rename), so a rerun removes a killed run's temporary files and writes exactly
the missing shards. A shard whose items the filter all rejects is an empty tar, so it counts as done.
``dataset.json`` records the configuration; another configuration in the same directory is refused.

Each sample: the V generated frames; their alpha from the matting stage (alpha 1 without one); the
orbit cameras (uniform azimuths from 0) at the elevation the elevation estimator gives that sample
(VFusion3D labels every generated video so), or at ``mv.elevation_deg`` without an estimator; the
filter's captions, else the recaption of the first frame, else the prompt (an empty caption keeps
the prompt); the filter's score as quality (1.0 without a filter); and the elevation in radians.
A sample the filter could not score (a NaN score: the MV-LLM's answer had no parsable grade) is
rejected and counted apart, in the returned counts and on the progress bar.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fast3d import cameras
from fast3d.data.shards import MultiViewSample, ShardWriter, claim_output
from fast3d.datagen.pipeline import stages as st
from fast3d.datagen.pipeline.config import PipelineConfig, item
from fast3d.datagen.procedural import run_workers
from fast3d.io.atomic import atomic_path

PREFIX = "synthetic"


@dataclass
class Stages:
    """The plug-ins one run calls; replace any with a callable of the same signature."""
    t2i: Callable            # (prompts, seeds) -> images [N, 3, R, R]
    mv: Callable             # (images [N, 3, R, R], seeds) -> views [N, V, 3, R', R']
    filter: Callable | None  # views [N, V, 3, R', R'] -> (keep [N] bool, score [N][, captions]); None keeps all
    #                          (a score of NaN: the filter could not score the sample, e.g. no parsable LLM grade)
    recaption: Callable | None  # images [N, 3, R', R'] -> N captions; None keeps the prompts
    matting: Callable | None = None    # views [N, V, 3, R', R'] -> alphas [N, V, 1, R', R']; None: alpha 1
    elevation: Callable | None = None  # views [N, V, 3, R', R'] -> [N] radians; None: mv.elevation_deg


def build_stages(cfg: PipelineConfig, device: torch.device) -> Stages:
    """Every stage of ``cfg`` on ``device``: the kinds of :data:`~fast3d.datagen.pipeline.stages.STAGE_KINDS`."""
    t = cfg.t2i
    built = {section: st.stage_class(section, getattr(cfg, section).kind).from_config(cfg, device)
             for section in ("mv", "matting", "filter", "recaption")}
    return Stages(t2i=st.TextToImage(t.model, t.resolution, t.steps, t.guidance, device), **built,
                  elevation=None if cfg.elevation.estimator is None else st.ElevationLabeler(cfg.elevation.estimator,
                                                                                             device))


def resolve_device(spec: str, worker: int = 0, workers: int = 1) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU; ``auto``/``cuda`` spread local workers of this
    node (LOCAL_RANK x workers + worker) over its GPUs."""
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if spec in ("auto", "cuda"):
        slot = int(os.environ.get("LOCAL_RANK", 0)) * workers + worker
        return torch.device("cuda", slot % max(1, torch.cuda.device_count()))
    return torch.device(spec)


def manifest_of(cfg: PipelineConfig) -> dict:
    """Everything that changes the samples (``device`` only changes where they are computed)."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
    if cfg.prompts.file is not None:  # the prompts themselves, not only the file's name
        with open(cfg.prompts.file, "rb") as f:
            config["prompts"]["file_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return json.loads(json.dumps({"kind": "pipeline", "config": config}))


def prepare_output(out: str, cfg: PipelineConfig) -> None:
    """Check the configuration, then create `out` for it or check that it holds this same dataset;
    with ``prompts.llm``, write (or finish writing) its prompts file first (a pure function of its
    configuration, so the manifest's configuration fixes the prompts)."""
    cfg.validate()
    claim_output(out, manifest_of(cfg), PREFIX)
    if cfg.prompts.llm is not None:
        from fast3d.datagen.pipeline.config import llm_config
        from fast3d.datagen.prompts_llm import generate_prompts

        lm, path = llm_config(cfg.prompts)
        generate_prompts(lm, path, device=str(resolve_device(cfg.device)), progress=False)


def orbit(cfg: PipelineConfig, elevation: float | None = None) -> cameras.Rig:
    """The cameras of the generated frames: V uniform azimuths from 0 (the input view) at one
    elevation, ``elevation`` radians (default: ``mv.elevation_deg``)."""
    m = cfg.mv
    if elevation is None:
        elevation = math.radians(m.elevation_deg)
    az = torch.arange(m.views, dtype=torch.float64) * (2 * math.pi / m.views)
    el = torch.full((m.views,), float(elevation), dtype=torch.float64)
    viewmats = cameras.look_at(cameras.spherical_to_position(az, el, m.distance)).float()
    return cameras.Rig(viewmats=viewmats, Ks=cameras.intrinsics(m.fov_deg, m.resolution, m.resolution, m.views),
                       azimuths=az.float(), elevations=el.float(), width=m.resolution, height=m.resolution)


def _key(i: int) -> str:
    return f"syn{i:08d}"


def _shard_path(out: str, j: int) -> str:
    return os.path.join(out, f"{PREFIX}-{j:06d}.tar")


@dataclass(frozen=True)
class ShardCounts:
    """What the filter did to one shard's items: ``rejected`` in all, ``rejected_unscored`` of them
    with a NaN score (the filter could not score them: the MV-LLM's answer had no parsable grade)."""
    rejected: int = 0
    rejected_unscored: int = 0


def make_shard(cfg: PipelineConfig, stages: Stages, j: int) -> tuple[list[MultiViewSample], ShardCounts]:
    """The samples of shard j that pass the filter, and the counts of those it rejected."""
    S = cfg.shards.samples_per_shard
    indices = list(range(j * S, min((j + 1) * S, cfg.num_items)))
    items = [item(cfg, i) for i in indices]
    images = []
    for b in range(0, len(items), cfg.t2i.batch_size):
        batch = items[b:b + cfg.t2i.batch_size]
        images.append(stages.t2i([p for p, _, _ in batch], [s for _, s, _ in batch]))
    views = stages.mv(torch.cat(images), [s for _, _, s in items])                  # [N, V, 3, R, R]
    N = len(items)
    filter_captions = None
    if stages.filter is None:
        keep, scores = torch.ones(N, dtype=torch.bool), torch.ones(N, dtype=torch.float64)
    else:
        out = stages.filter(views)
        keep, scores = out[0], out[1]
        if len(out) == 3:
            filter_captions = list(out[2])
            if len(filter_captions) != N:
                raise ValueError(f"the filter stage returned {len(filter_captions)} captions for {N} samples")
    kept = [k for k in range(N) if bool(keep[k])]
    counts = ShardCounts(rejected=N - len(kept),
                         rejected_unscored=sum(1 for k in range(N) if not keep[k] and math.isnan(float(scores[k]))))
    if not kept:
        return [], counts
    captions = [items[k][0] for k in kept]
    if filter_captions is not None:
        captions = [filter_captions[k] or p for k, p in zip(kept, captions)]
    elif stages.recaption is not None:
        new = stages.recaption(views[kept, 0])
        captions = [c or p for c, p in zip(new, captions)]  # an empty caption keeps the prompt
    views = views[kept]                                                               # [K, V, 3, R, R]
    alphas = torch.ones_like(views[:, :, :1]) if stages.matting is None else stages.matting(views)
    if stages.elevation is None:
        elevations = [math.radians(cfg.mv.elevation_deg)] * len(kept)
    else:
        elevations = [float(e) for e in stages.elevation(views)]
    samples = []
    for i, (k, c, el) in enumerate(zip(kept, captions, elevations)):
        rig = orbit(cfg, el)
        samples.append(MultiViewSample(key=_key(indices[k]), images=views[i], alphas=alphas[i], viewmats=rig.viewmats,
                                       Ks=rig.Ks, caption=c, source="synthetic", quality=float(scores[k]),
                                       elevation=el))
    return samples, counts


def _write_shard(out: str, j: int, samples: list[MultiViewSample]) -> None:
    if samples:
        with ShardWriter(out, prefix=PREFIX, samples_per_shard=len(samples), start_index=j) as w:
            for s in samples:
                w.write(s)
        return
    with atomic_path(_shard_path(out, j)) as tmp, tarfile.open(tmp, "w"):   # all rejected: an empty shard
        pass


def generate(out: str, cfg: PipelineConfig, reader: int = 0, readers: int = 1, progress: bool = True,
             device: torch.device | None = None, stages: Stages | None = None) -> dict:
    """Write this reader's missing shards (models are loaded only when some are missing). Returns
    counts: shards written / skipped, samples generated / kept / rejected (``rejected_unscored`` of
    them because the filter could not score them: :class:`ShardCounts`), seconds. The progress bar
    shows the same counts as it goes."""
    prepare_output(out, cfg)
    mine = list(range(reader, cfg.num_shards, readers))
    done = {j for j in mine if os.path.exists(_shard_path(out, j))}
    for j in mine:  # temporary files of a killed run
        for tmp in glob.glob(os.path.join(out, f".{PREFIX}-{j:06d}.tar.tmp*")):
            os.unlink(tmp)
    todo = [j for j in mine if j not in done]
    S = cfg.shards.samples_per_shard
    n_items = sum(min(S, cfg.num_items - j * S) for j in todo)
    t0, kept, rejected, unscored = time.perf_counter(), 0, 0, 0
    if todo and stages is None:
        stages = build_stages(cfg, device or resolve_device(cfg.device))
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=n_items, unit="sample", desc=f"pipeline[{reader}/{readers}]", position=reader,
                   file=sys.stderr, dynamic_ncols=True)
    try:
        for j in todo:
            samples, c = make_shard(cfg, stages, j)
            _write_shard(out, j, samples)
            kept, rejected, unscored = kept + len(samples), rejected + c.rejected, unscored + c.rejected_unscored
            if bar is not None:
                bar.set_postfix(kept=kept, rejected=rejected, unscored=unscored, refresh=False)
                bar.update(len(samples) + c.rejected)
    finally:
        if bar is not None:
            bar.close()
    return {"shards_written": len(todo), "shards_skipped": len(done), "samples": n_items, "kept": kept,
            "rejected": rejected, "rejected_unscored": unscored, "seconds": time.perf_counter() - t0}


def _job(out: str, cfg: PipelineConfig, workers: int, worker: int, reader: int, readers: int) -> dict:
    return generate(out, cfg, reader, readers, device=resolve_device(cfg.device, worker, workers))


def run(out: str, cfg: PipelineConfig, workers: int = 1) -> list[dict]:
    """`fast3d datagen pipeline`: generate with `workers` local processes on this rank (RANK /
    WORLD_SIZE), each on its share of the CPU threads and, with CUDA, its GPU. One dict per worker."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise ValueError(f"workers must be a positive int; got {workers!r}")
    prepare_output(out, cfg)
    return run_workers(functools.partial(_job, out, cfg, workers), workers)
