"""The feature cache of multi-view DiT training: VAE latents of the 2x2 view grids and T5 caption
embeddings, computed once (``fast3d train ttr-extract`` calls :func:`extract`) so that training runs
neither encoder, as Bootstrap3D and PixArt-alpha do. :class:`FeatureCacheDataset` reads it back.

A cache directory holds

    cache.json                 the manifest: VAE and text-encoder fingerprints, grid size, latent shape,
                               scaling factor, caption tokens/channels, the grid's azimuths, the input
                               shards' names; once
                               every shard exists, ``complete: true`` with per-shard and per-source counts
    null_caption.safetensors   the embedding of the empty caption "", for caption dropout (CFG) in training
    features-NNNNNN.tar        the features of input shard NNNNNN (in sorted order), written atomically
    features-NNNNNN.json       its counts ({"samples": n, "sources": {...}}), written just before it

and each tar holds, per sample, a WebDataset entry group named by the sample's key:

    <key>.features.safetensors   latent_mean, latent_std [C, h, w] float32: the VAE posterior of the
                                 grid made in [-1, 1]; caption_embeds [n, C_text] bfloat16: the T5
                                 output at the caption's n tokens (the padding is not stored)
    <key>.meta.json              {"source", "caption", "quality"}

Latents are stored unscaled, in the VAE's own space, so that training can sample the posterior:
the diffusion latent is ``(latent_mean + latent_std * eps) * scaling_factor`` (the manifest's
``scaling_factor`` = ``cfg.vae_scaling_factor``), and ``vae.decode(z / scaling_factor)`` undoes it.
Caption embeddings are stored in bfloat16 (the dtype training runs in; T5-XXL's 4096 channels are
most of the cache) and padded back with zeros to ``caption_tokens`` on reading, with the mask: the
DiT masks padded tokens out of cross-attention, so the padded values never matter.

The 2x2 grid holds the views of a sample nearest to the azimuths ``grid_azimuths`` (degrees from the
first view's, default 0, 90, 180, 270: four views around the object, as Bootstrap3D's grids), found
from the views' cameras (:func:`grid_view_indices`), not the first four frames: on a 21-frame SV3D
orbit those are 0, 17, 34 and 51 degrees. A sample with no view within half the azimuths' smallest
spacing of one of them is skipped with a warning; an ``image2d`` sample (one image) is tiled.

Resumable: output shard j corresponds to input shard j, so a rerun (on any number of ranks) writes
only the missing shards. Every file is parsed as untrusted (JSON, safetensors; never pickle) and a
malformed entry stops reading with an error naming its shard and key: a cache is derived data, and
silently training on part of it would hide the fault.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import re
import sys
import tarfile
import time

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from fast3d.cameras import camera_centers
from fast3d.data.dataset import MultiViewDataset, reader_index
from fast3d.data.shards import SOURCES, SampleError, iter_tar_groups, warn_skipped
from fast3d.inference.common import default_device
from fast3d.io.atomic import temp_path, write_atomic
from fast3d.models.mvdit import MVDiTConfig, build_text_encoder, build_vae, encode_prompts, fingerprint, make_grid

FORMAT, VERSION = "fast3d-feature-cache", 2   # 2: the grid's views by azimuth (grid_azimuths)
MANIFEST, NULL_CAPTION, PREFIX = "cache.json", "null_caption.safetensors", "features"
CAPTION_DTYPE = torch.bfloat16
# What identifies a cache; the rest of the manifest (completion and counts) describes its progress.
HEADER_KEYS = ("format", "version", "vae", "text_encoder", "grid_size", "latent_shape", "scaling_factor",
               "caption_tokens", "caption_channels", "caption_dtype", "grid_azimuths", "inputs")
GRID_AZIMUTHS = (0.0, 90.0, 180.0, 270.0)   # degrees from the first view: the 2x2 grid's four views


class FeatureCacheError(ValueError):
    """A cache file or entry is missing or malformed."""


_SHARD = re.compile(rf"{PREFIX}-\d{{6}}\.tar")


def check_azimuths(azimuths) -> tuple[float, ...]:
    """The grid's 4 azimuths (degrees, distinct modulo 360) as floats; ValueError naming grid_azimuths."""
    ok = (isinstance(azimuths, (list, tuple)) and len(azimuths) == 4
          and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in azimuths))
    if not ok or len({round(float(a) % 360.0, 9) for a in azimuths}) != 4:
        raise ValueError(f"grid_azimuths must be 4 distinct finite azimuths in degrees (the 2x2 grid's views, "
                         f"row-major); got {azimuths!r}")
    return tuple(float(a) for a in azimuths)


def _circular_gap(a: Tensor, b: Tensor) -> Tensor:  # [...] degrees -> [...] in [0, 180]
    d = (a - b) % 360.0
    return torch.minimum(d, 360.0 - d)


def grid_view_indices(viewmats: Tensor,  # [V, 4, 4] world-to-camera, z up
                      azimuths: tuple = GRID_AZIMUTHS) -> tuple[Tensor, float]:  # -> [4] int64, degrees
    """The views nearest to ``azimuths`` (degrees, measured from the first view's azimuth about the
    world z axis), and the largest angle between a chosen view and its azimuth.

    Args:
        viewmats: [V, 4, 4] the sample's cameras.
        azimuths: the 4 grid azimuths, row-major (:func:`fast3d.models.mvdit.make_grid`).

    Returns:
        ([4] view indices, the largest azimuth gap in degrees).
    """
    centres = camera_centers(viewmats.double())                                        # [V, 3]
    az = torch.rad2deg(torch.atan2(centres[:, 1], centres[:, 0]))                      # [V]
    rel = (az - az[0]) % 360.0
    gaps = _circular_gap(rel[None, :], torch.tensor(azimuths, dtype=torch.float64)[:, None])   # [4, V]
    best, idx = gaps.min(1)
    return idx, float(best.max())


def max_azimuth_gap(azimuths: tuple) -> float:
    """Half the smallest spacing of ``azimuths`` (degrees): a chosen view farther off is not that view."""
    a = torch.tensor(azimuths, dtype=torch.float64)
    spacing = _circular_gap(a[:, None], a[None, :]) + torch.eye(len(a), dtype=torch.float64) * 360
    return float(spacing.min()) / 2


class GridViewDataset(MultiViewDataset):
    """:class:`~fast3d.data.MultiViewDataset` whose 4 views are those nearest to ``azimuths``
    (:func:`grid_view_indices`) rather than the first four; samples without such views are
    skipped with a warning, ``image2d`` samples tiled."""

    def __init__(self, path, azimuths: tuple = GRID_AZIMUTHS, **kwargs):
        super().__init__(path, views=4, **kwargs)
        self.azimuths = check_azimuths(azimuths)
        self.max_gap = max_azimuth_gap(self.azimuths)

    def _prepare(self, s) -> dict | None:
        if s.source != "image2d" and s.images.shape[0] >= 4:
            idx, gap = grid_view_indices(s.viewmats, self.azimuths)
            if gap > self.max_gap:
                warn_skipped(f"sample {s.key!r}", f"it has no view within {self.max_gap:g} degrees of each grid "
                                                  f"azimuth {list(self.azimuths)} (the worst is {gap:.1f} off)")
                return None
            s = dataclasses.replace(s, images=s.images[idx], alphas=s.alphas[idx], viewmats=s.viewmats[idx],
                                    Ks=s.Ks[idx])
        return super()._prepare(s)


def shard_name(index: int, ext: str = "tar") -> str:
    return f"{PREFIX}-{index:06d}.{ext}"


# --- writing -----------------------------------------------------------------------------------------


def _shard_done(out: str, index: int) -> bool:
    return all(os.path.exists(os.path.join(out, shard_name(index, ext))) for ext in ("tar", "json"))


class _ShardWriter:
    """Writes shard ``index`` of ``out`` through a hidden temporary file; on success its counts file
    first, then the tar renamed into place, so a shard whose tar exists is complete and counted."""

    def __init__(self, out: str, index: int):
        self.path, self.counts = os.path.join(out, shard_name(index)), os.path.join(out, shard_name(index, "json"))
        self.samples, self.sources = 0, dict.fromkeys(SOURCES, 0)

    def __enter__(self):
        self.tar = tarfile.open(temp_path(self.path), "w")
        return self

    def add(self, key: str, members: dict[str, bytes], source: str) -> None:
        for suffix, data in members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.sources[source] += 1

    def __exit__(self, exc_type, exc, tb):
        self.tar.close()
        if exc_type is not None:
            os.unlink(temp_path(self.path))
            return
        write_atomic(self.counts, json.dumps({"samples": self.samples, "sources": self.sources}).encode())
        with open(temp_path(self.path), "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp_path(self.path), self.path)


def _batches(items, n: int):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _caption_lengths(mask: Tensor,  # [B, L] int, 1 = token
                     ) -> Tensor:   # [B]
    n = mask.sum(1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None] < n[:, None]):
        raise ValueError("the tokenizer must pad on the right (attention mask 1...1 0...0); got another mask")
    return n


def _encode_batch(batch: list[dict], vae, text_encoder, tokenizer, cfg: MVDiTConfig) -> list[tuple[str, dict, str]]:
    """(key, tar members, source) of each sample of a MultiViewDataset batch."""
    from safetensors.torch import save

    device = next(vae.parameters()).device
    grids = make_grid(torch.stack([s["images"] for s in batch])).to(device) * 2 - 1   # [B, 3, G, G]
    with torch.no_grad():
        posterior = vae.encode(grids).latent_dist
    mean = posterior.mean.float().cpu().contiguous()                                   # [B, C, h, w]
    std = posterior.std.float().cpu().contiguous()
    embeds, mask = encode_prompts(text_encoder, tokenizer, [s["caption"] for s in batch], cfg.max_caption_tokens)
    n = _caption_lengths(mask).tolist()
    embeds = embeds.to("cpu", CAPTION_DTYPE)
    out = []
    for i, s in enumerate(batch):
        blob = save({"latent_mean": mean[i].clone(), "latent_std": std[i].clone(),
                     "caption_embeds": embeds[i, : n[i]].clone()})
        meta = json.dumps({"source": s["source"], "caption": s["caption"], "quality": float(s["quality"])})
        out.append((s["key"], {"features.safetensors": blob, "meta.json": meta.encode()}, s["source"]))
    return out


def _header(cfg: MVDiTConfig, vae_fp: str, text_fp: str, inputs: list[str], azimuths: tuple) -> dict:
    return {"format": FORMAT, "version": VERSION, "vae": vae_fp, "text_encoder": text_fp, "grid_size": cfg.grid_size,
            "latent_shape": [cfg.latent_channels, cfg.latent_size, cfg.latent_size],
            "scaling_factor": cfg.vae_scaling_factor, "caption_tokens": cfg.max_caption_tokens,
            "caption_channels": cfg.caption_channels, "caption_dtype": str(CAPTION_DTYPE).replace("torch.", ""),
            "grid_azimuths": list(azimuths), "inputs": [os.path.basename(p) for p in inputs], "complete": False}


def _describe_difference(theirs: dict, ours: dict) -> str:
    names = {"vae": "VAE", "text_encoder": "text encoder"}
    for k in ("vae", "text_encoder"):
        if theirs.get(k) != ours[k]:
            return (f"a feature cache made with another {names[k]} (fingerprint {theirs.get(k)}; "
                    f"this {names[k]}'s is {ours[k]})")
    diff = {k: (theirs.get(k), ours[k]) for k in HEADER_KEYS if theirs.get(k) != ours[k]}
    return f"another feature cache: (cache, this run) differ in {diff}"


def _prepare(out: str, header: dict, text_encoder, tokenizer) -> None:
    """Create the cache directory for ``header``, or check that it holds this same cache."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, MANIFEST)
    if os.path.exists(path):
        theirs = _read_manifest(out)
        if any(theirs.get(k) != header[k] for k in HEADER_KEYS):
            raise ValueError(f"{out} holds {_describe_difference(theirs, header)}; use another output directory")
    else:
        if glob.glob(os.path.join(out, f"{PREFIX}-*.tar")):
            raise ValueError(f"{out} holds feature shards but no {MANIFEST}; refusing to mix caches")
        write_atomic(path, json.dumps(header, indent=1).encode())
    null_path = os.path.join(out, NULL_CAPTION)
    if not os.path.exists(null_path):
        from safetensors.torch import save

        embeds, mask = encode_prompts(text_encoder, tokenizer, [""], header["caption_tokens"])
        n = int(_caption_lengths(mask)[0])
        write_atomic(null_path, save({"caption_embeds": embeds[0, :n].to("cpu", CAPTION_DTYPE).contiguous()}))


def _finalize(out: str, header: dict) -> bool:
    """If every shard exists, rewrite the manifest as complete, with counts; whether it did. Several
    ranks may do it at once: the content is a function of the complete shards alone."""
    n = len(header["inputs"])
    if not all(_shard_done(out, j) for j in range(n)):
        return False
    shards, sources = {}, dict.fromkeys(SOURCES, 0)
    for j in range(n):
        f = os.path.join(out, shard_name(j, "json"))
        try:
            with open(f, "rb") as fh:
                counts = json.loads(fh.read())
            shards[shard_name(j)] = int(counts["samples"])
            for s in SOURCES:
                sources[s] += int(counts["sources"][s])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FeatureCacheError(f"{f}: unreadable counts ({type(e).__name__}: {e}); delete it and "
                                    f"{shard_name(j)} to rewrite them") from None
    manifest = {**header, "complete": True, "samples": sum(shards.values()), "sources": sources, "shards": shards}
    write_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    return True


def extract(data: str | list, out: str, cfg: MVDiTConfig, batch_size: int = 8, rank: int = 0, world_size: int = 1,
            progress: bool = True, device: str | torch.device | None = None,
            grid_azimuths: tuple = GRID_AZIMUTHS) -> dict:
    """Encode the multi-view dataset ``data`` (shards or directories of them) into a feature cache in
    ``out``: this rank's input shards j = rank, rank + world_size, ..., skipping those already written.

    Each sample's 4 views nearest to ``grid_azimuths`` (:class:`GridViewDataset`) at ``cfg.view_size``
    px become a grid in [-1, 1] for ``build_vae(cfg)``;
    captions go through ``build_text_encoder(cfg)`` (both on ``device``, default CUDA when there is
    one). Returns counts: shards_written, shards_skipped, samples (written now), seconds, and
    complete (whether every rank's shards exist and the manifest says so)."""
    if not isinstance(cfg, MVDiTConfig):
        raise ValueError(f"cfg must be an MVDiTConfig; got {type(cfg).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank and world_size must be ints with 0 <= rank < world_size; got rank={rank!r}, "
                         f"world_size={world_size!r}")
    grid_azimuths = check_azimuths(grid_azimuths)
    t0 = time.perf_counter()
    inputs = MultiViewDataset(data, views=4, resolution=cfg.view_size).shards
    device = default_device(device)
    vae = build_vae(cfg)
    text_encoder, tokenizer = build_text_encoder(cfg)
    header = _header(cfg, fingerprint(vae), fingerprint(text_encoder, tokenizer), inputs, grid_azimuths)
    vae, text_encoder = vae.to(device), text_encoder.to(device)
    _prepare(out, header, text_encoder, tokenizer)

    mine = range(rank, len(inputs), world_size)
    for j in mine:  # temporary files of a killed run
        for tmp in glob.glob(os.path.join(out, f".{PREFIX}-{j:06d}.*.tmp*")):
            os.unlink(tmp)
    todo = [j for j in mine if not _shard_done(out, j)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="sample", desc=f"ttr-extract[{rank}/{world_size}]", file=sys.stderr, dynamic_ncols=True)
    samples = 0
    try:
        for j in todo:
            reader = GridViewDataset(inputs[j], grid_azimuths, resolution=cfg.view_size, rank=0, world_size=1)
            with _ShardWriter(out, j) as shard:
                for batch in _batches(reader, batch_size):
                    for key, members, source in _encode_batch(batch, vae, text_encoder, tokenizer, cfg):
                        shard.add(key, members, source)
                    if bar is not None:
                        bar.update(len(batch))
            samples += shard.samples
    finally:
        if bar is not None:
            bar.close()
    complete = _finalize(out, header)
    return {"shards_written": len(todo), "shards_skipped": len(mine) - len(todo), "samples": samples,
            "seconds": time.perf_counter() - t0, "complete": complete}


# --- reading -----------------------------------------------------------------------------------------


def _read_manifest(path: str) -> dict:
    f = os.path.join(path, MANIFEST)
    if not os.path.isfile(f):
        raise FeatureCacheError(f"{path!r} has no {MANIFEST}; expected a feature cache written by extract")
    try:
        with open(f, "rb") as fh:
            m = json.loads(fh.read())
    except (OSError, ValueError) as e:
        raise FeatureCacheError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise FeatureCacheError(f"{f}: not a {FORMAT} manifest of version {VERSION}")
    missing = [k for k in HEADER_KEYS if k not in m]
    if missing:
        raise FeatureCacheError(f"{f}: missing keys {missing}")
    shape = m["latent_shape"] if isinstance(m["latent_shape"], list) and len(m["latent_shape"]) == 3 else [None]
    sizes = [m["caption_tokens"], m["caption_channels"], *shape]
    if not all(isinstance(x, int) and x > 0 for x in sizes) or not isinstance(m["scaling_factor"], (int, float)):
        raise FeatureCacheError(f"{f}: caption_tokens, caption_channels, latent_shape [C, h, w] must be positive ints "
                                f"and scaling_factor a number")
    shards = m.get("shards", {})
    if not isinstance(shards, dict) or not all(isinstance(k, str) and _SHARD.fullmatch(k) and isinstance(v, int)
                                               for k, v in shards.items()):
        raise FeatureCacheError(f"{f}: shards must map {PREFIX}-NNNNNN.tar names to counts")
    return m


def _iter_groups(shard: str):
    """(key, members) of a shard, turning unreadable tar files into FeatureCacheError."""
    try:
        yield from iter_tar_groups(shard)
    except (tarfile.TarError, SampleError, OSError, EOFError) as e:
        raise FeatureCacheError(f"shard {shard}: unreadable ({type(e).__name__}: {e})") from None


def _decode_meta(data: bytes | None, where: str) -> dict:
    if data is None:
        raise FeatureCacheError(f"{where}: missing meta.json")
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FeatureCacheError(f"{where}: meta.json is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("source") not in SOURCES or not isinstance(meta.get("caption"), str):
        raise FeatureCacheError(f"{where}: meta.json must hold source (one of {SOURCES}) and caption (str); got "
                                f"{str(meta)[:120]}")
    q = meta.get("quality")
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q):
        raise FeatureCacheError(f"{where}: meta.json quality must be a finite number; got {q!r}")
    return meta


def _load_tensors(data: bytes | None, where: str, specs: dict) -> dict:
    """Parse a safetensors blob; ``specs``: name -> (dtype, check(shape) -> bool, expected shape in words)."""
    from safetensors.torch import load

    if data is None:
        raise FeatureCacheError(f"{where}: missing features.safetensors")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError, and others on hostile headers
        raise FeatureCacheError(f"{where}: not a readable safetensors blob ({type(e).__name__}: {e})") from None
    for name, (dtype, ok, expected) in specs.items():
        t = tensors.get(name)
        if t is None:
            raise FeatureCacheError(f"{where}: missing tensor {name!r}; has {sorted(tensors)}")
        if t.dtype != dtype or not ok(tuple(t.shape)):
            raise FeatureCacheError(f"{where}: {name} must be {str(dtype).replace('torch.', '')} {expected}; got "
                                    f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise FeatureCacheError(f"{where}: {name} has non-finite values")
    return tensors


class FeatureCacheDataset(IterableDataset):
    """Yields dicts: latent_mean, latent_std [C, h, w] float32 (unscaled, see the module docstring),
    caption_embeds [L, C_text] bfloat16 (zeros past the caption), caption_mask [L] int64, source,
    caption, quality, key; L = the manifest's caption_tokens.

    ``expect_vae`` / ``expect_text``: the :func:`fast3d.models.mvdit.fingerprint` of the VAE and of the
    text encoder (with its tokenizer) the trained model will be used with; a cache made with others
    raises ValueError (None skips that check). Each DataLoader worker of each rank reads a disjoint
    part: whole shards when there are at least as many shards as readers, else every k-th entry.
    """

    def __init__(self, path: str, expect_vae: str | None, expect_text: str | None, rank: int | None = None,
                 world_size: int | None = None):
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank and world_size must be given together with 0 <= rank < world_size; "
                             f"got rank={rank}, world_size={world_size}")
        m = _read_manifest(path)
        if not m.get("complete") or "shards" not in m or not isinstance(m.get("samples"), int):
            raise FeatureCacheError(f"{path!r} is an incomplete feature cache; run extract until every rank's shards "
                                    "are written")
        for name, want, fp in (("VAE", expect_vae, m["vae"]), ("text encoder", expect_text, m["text_encoder"])):
            if want is not None and want != fp:
                raise ValueError(f"{path!r} is a feature cache made with another {name}: its fingerprint is {fp}, "
                                 f"expected {want}")
        self.shards = [os.path.join(path, name) for name in sorted(m["shards"])]
        absent = [s for s in self.shards if not os.path.isfile(s)]
        if absent:
            raise FeatureCacheError(f"{path!r}: the manifest lists shards that do not exist: {absent[:5]}")
        self.path, self.manifest = path, m
        self.scaling_factor = float(m["scaling_factor"])
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        """Samples in the whole cache (all readers together)."""
        return int(self.manifest["samples"])

    def null_caption(self) -> tuple[Tensor, Tensor]:
        """Embeddings [L, C_text] and mask [L] of the empty caption, to drop captions for CFG training."""
        f = os.path.join(self.path, NULL_CAPTION)
        data = None
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                data = fh.read()
        return self._pad(_load_tensors(data, f, {"caption_embeds": self._caption_spec()})["caption_embeds"])

    def _caption_spec(self) -> tuple:
        L, C = self.manifest["caption_tokens"], self.manifest["caption_channels"]
        return CAPTION_DTYPE, lambda s: len(s) == 2 and 1 <= s[0] <= L and s[1] == C, f"[1..{L}, {C}]"

    def _pad(self, embeds: Tensor,  # [n, C_text]
             ) -> tuple[Tensor, Tensor]:
        L = self.manifest["caption_tokens"]
        n = embeds.shape[0]
        padded = torch.zeros(L, embeds.shape[1], dtype=embeds.dtype)
        padded[:n] = embeds
        return padded, (torch.arange(L) < n).long()

    def _decode(self, shard: str, key: str, group: dict[str, bytes]) -> dict:
        m = self.manifest
        where = f"entry {key!r} of shard {shard}"
        shape = tuple(m["latent_shape"])
        latent = (torch.float32, lambda s: s == shape, str(list(shape)))
        t = _load_tensors(group.get("features.safetensors"), where,
                          {"latent_mean": latent, "latent_std": latent, "caption_embeds": self._caption_spec()})
        if bool((t["latent_std"] < 0).any()):
            raise FeatureCacheError(f"{where}: latent_std has negative values")
        meta = _decode_meta(group.get("meta.json"), where)
        embeds, mask = self._pad(t["caption_embeds"])
        return dict(latent_mean=t["latent_mean"], latent_std=t["latent_std"], caption_embeds=embeds,
                    caption_mask=mask, source=meta["source"], caption=meta["caption"], quality=float(meta["quality"]),
                    key=key)

    def _reader(self) -> tuple[int, int]:
        return reader_index(self.rank, self.world_size)

    def __iter__(self):
        reader, readers = self._reader()
        by_shard = len(self.shards) >= readers
        index = -1
        for shard in self.shards[reader::readers] if by_shard else self.shards:
            count = 0
            for key, group in _iter_groups(shard):
                index += 1
                count += 1
                if by_shard or index % readers == reader:
                    yield self._decode(shard, key, group)
            expected = self.manifest["shards"][os.path.basename(shard)]
            if count != expected:  # a tar cut at a member boundary reads as a shorter valid tar
                raise FeatureCacheError(f"shard {shard} has {count} entries; the manifest says {expected}")
