"""``fast3d datagen train-filter``: fit the quality filter and the elevation estimator on labelled
multi-view shards; apply a saved filter to images."""

from __future__ import annotations

import csv
import json
import math
import os

import torch
from torch import Tensor

from fast3d import checks
from fast3d.datagen.quality.features import (
    ELEVATION_FRAMES,
    FILTER_FRAMES,
    RANDOM_TINY,
    FeatureExtractor,
    sample_features,
)
from fast3d.datagen.quality.models import ElevationEstimator, QualityFilter
from fast3d.io.atomic import atomic_open


def read_labels(path: str) -> dict[str, int]:
    """A labels file: JSON {"key": 0|1, ...} or CSV rows `key,label` (an optional `key,label` header)."""
    if not os.path.isfile(path):
        raise ValueError(f"labels_file {path!r} does not exist")
    if path.endswith(".json"):
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"labels_file {path!r} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"labels_file {path!r} must hold a JSON object {{key: 0|1}}; got {type(raw).__name__}")
        pairs = list(raw.items())
    elif path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and [c.strip() for c in rows[0]] == ["key", "label"]:
            rows = rows[1:]
        pairs = []
        for i, row in enumerate(rows):
            if len(row) != 2:
                raise ValueError(f"labels_file {path!r} row {i + 1}: expected `key,label`; got {row}")
            pairs.append((row[0].strip(), row[1].strip()))
    else:
        raise ValueError(f"labels_file must end in .json or .csv; got {path!r}")
    labels: dict[str, int] = {}
    for key, label in pairs:
        if isinstance(label, bool) or label not in (0, 1, "0", "1"):
            raise ValueError(f"labels_file {path!r}: the label of {key!r} must be 0 or 1; got {label!r}")
        if key in labels:
            raise ValueError(f"labels_file {path!r}: key {key!r} appears more than once")
        labels[key] = int(label)
    if set(labels.values()) != {0, 1}:
        raise ValueError(f"labels_file {path!r} must label samples of both classes 0 and 1; "
                         f"got {len(labels)} label(s) of class(es) {sorted(set(labels.values()))}")
    return labels


def iter_videos(data_dirs: list[str]):
    """Every sample of the shard directories (or shard files) ``data_dirs`` with all its frames, as
    :class:`~fast3d.data.shards.MultiViewSample`; malformed samples and unreadable shard tails are
    skipped with a warning, as :class:`~fast3d.data.MultiViewDataset` skips them."""
    import glob
    import tarfile

    from fast3d.data.shards import SampleError, decode_sample, iter_tar_groups, warn_skipped

    shards = []
    for p in data_dirs:
        if os.path.isdir(p):
            shards += sorted(glob.glob(os.path.join(p, "*.tar")))
        elif os.path.isfile(p):
            shards.append(p)
        else:
            raise ValueError(f"data_dirs: {p!r} is neither a shard nor a directory of shards")
    if not shards:
        raise ValueError(f"data_dirs: no .tar shards under {list(data_dirs)}")
    for shard in shards:
        try:
            for key, group in iter_tar_groups(shard):
                try:
                    sample = decode_sample(key, group)
                except SampleError as e:
                    warn_skipped(f"sample {key!r} in {shard}", str(e))
                    continue
                yield sample
        except (tarfile.TarError, SampleError, OSError, EOFError) as e:
            warn_skipped(f"the rest of shard {shard}", f"{type(e).__name__}: {e}")


def _features_of(extractor: FeatureExtractor, sample, frames: int, what: str) -> Tensor:  # -> [D]
    """:func:`sample_features` of one sample's video, naming the sample when it has too few frames."""
    if sample.images.shape[0] < frames:
        raise ValueError(f"sample {sample.key!r} has {sample.images.shape[0]} frames, fewer than the {frames} "
                         f"{what} averages")
    return sample_features(extractor, sample.images[None], frames)[0]


def train_filter(data_dirs: list[str], labels_file: str, out_dir: str, dinov2: str = RANDOM_TINY,
                 threshold: float = 0.0, elevation: bool = True, seed: int = 0, views: int = FILTER_FRAMES,
                 elevation_steps: int = 1000, elevation_views: int = ELEVATION_FRAMES) -> dict:
    """Fit the quality filter on the labelled samples of `data_dirs` (and, with `elevation`, the
    elevation MLP on the samples whose elevation is known), save both into `out_dir` with
    metrics.json, and return the metrics (training accuracy, kept fraction, elevation MAE).

    Features are :func:`sample_features` of `views` frames for the filter and `elevation_views`
    for the elevation MLP (VFusion3D's 8 and 4), spread uniformly over each sample's frames; both
    counts are saved with the models, and every use of them computes the same features."""
    if isinstance(data_dirs, str) or not data_dirs:
        raise ValueError(f"data_dirs must be a non-empty list of shard directories; got {data_dirs!r}")
    threshold = checks.real("threshold", threshold)
    for name, n in (("views", views), ("elevation_views", elevation_views)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int; got {n!r}")
    labels = read_labels(labels_file)
    extractor = FeatureExtractor.load(dinov2)
    seen: set[str] = set()
    filter_feats, filter_keys, elev_feats, elevs = [], [], [], []
    for s in iter_videos(data_dirs):
        if s.key in seen:
            raise ValueError(f"data_dirs: sample key {s.key!r} appears more than once")
        seen.add(s.key)
        if s.key in labels:
            filter_keys.append(s.key)
            filter_feats.append(_features_of(extractor, s, views, "the quality filter"))
        if elevation and s.elevation is not None and math.isfinite(s.elevation):
            elev_feats.append(_features_of(extractor, s, elevation_views, "the elevation estimator"))
            elevs.append(float(s.elevation))
    unknown = sorted(set(labels) - seen)
    if unknown:
        raise ValueError(f"labels_file {labels_file!r} names {len(unknown)} key(s) not in data_dirs, e.g. "
                         f"{unknown[:5]}")
    if elevation and not elevs:
        raise ValueError("elevation=True but no sample in data_dirs has a known elevation; "
                         "pass elevation=False to fit the filter alone")
    X = torch.stack(filter_feats)
    y = torch.tensor([labels[k] for k in filter_keys])
    quality = QualityFilter(threshold=threshold, dinov2=dinov2, frames=views).fit(X, y, seed=seed)
    scores = quality.score(X)
    metrics = dict(samples_read=len(seen), labelled=len(y), positives=int(y.sum()), threshold=threshold,
                   train_accuracy=((scores > 0).long() == y).double().mean().item(),
                   kept_fraction=(scores > threshold).double().mean().item())
    os.makedirs(out_dir, exist_ok=True)
    quality.save(out_dir)
    if elevation:
        est = ElevationEstimator(extractor.dim, dinov2=dinov2, frames=elevation_views)
        E, e = torch.stack(elev_feats), torch.tensor(elevs, dtype=torch.float32)
        est.fit(E, e, steps=elevation_steps, seed=seed)
        metrics.update(elevation_samples=len(elevs), elevation_mae=(est.predict(E) - e).abs().mean().item())
        est.save(out_dir)
    with atomic_open(os.path.join(out_dir, "metrics.json")) as f:
        json.dump(metrics, f, indent=2)
    return metrics


def apply_filter(filter_dir: str, images: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 extractor: FeatureExtractor | None = None) -> tuple[Tensor, Tensor]:  # [N] bool, [N] float64
    """(keep, scores) of a saved filter on `images` (:func:`sample_features` of the filter's frames),
    with the DINOv2 it was trained on unless `extractor` is given (reuse one across calls: loading DINOv2 is the slow part)."""
    quality = QualityFilter.load(filter_dir)
    if extractor is None:
        if quality.dinov2 is None:
            raise ValueError(f"filter_dir {filter_dir!r} names no dinov2; pass an extractor")
        extractor = FeatureExtractor.load(quality.dinov2)
    feats = sample_features(extractor, images, quality.frames)
    return quality.keep(feats), quality.score(feats)
