"""``fast3d datagen train-filter``: fit the quality filter and the elevation estimator on labelled
multi-view shards; apply a saved filter to images."""

from __future__ import annotations

import csv
import json
import math
import os

import torch
from torch import Tensor

from fast3d.data.dataset import MultiViewDataset
from fast3d.datagen.quality.features import RANDOM_TINY, FeatureExtractor
from fast3d.datagen.quality.models import ElevationEstimator, QualityFilter, _finite
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


def train_filter(data_dirs: list[str], labels_file: str, out_dir: str, dinov2: str = RANDOM_TINY,
                 threshold: float = 0.0, elevation: bool = True, seed: int = 0, views: int = 4,
                 elevation_steps: int = 1000) -> dict:
    """Fit the quality filter on the labelled samples of `data_dirs` (and, with `elevation`, the
    elevation MLP on the samples whose elevation is known), save both into `out_dir` with
    metrics.json, and return the metrics (training accuracy, kept fraction, elevation MAE)."""
    if isinstance(data_dirs, str) or not data_dirs:
        raise ValueError(f"data_dirs must be a non-empty list of shard directories; got {data_dirs!r}")
    threshold = _finite("threshold", threshold)
    labels = read_labels(labels_file)
    extractor = FeatureExtractor.load(dinov2)
    keys, feats, elevs, seen = [], [], [], set()
    batch: list[dict] = []

    def flush():
        if batch:
            feats.append(extractor.features(torch.stack([s["images"] for s in batch])))
            batch.clear()

    for data_dir in data_dirs:
        for s in MultiViewDataset(data_dir, views=views, resolution=extractor.image_size):
            if s["key"] in seen:
                raise ValueError(f"data_dirs: sample key {s['key']!r} appears more than once")
            seen.add(s["key"])
            if s["key"] in labels or (elevation and math.isfinite(s["elevation"])):
                keys.append(s["key"])
                elevs.append(s["elevation"])
                batch.append(s)
                if len(batch) == extractor.batch_size:
                    flush()
    flush()
    unknown = sorted(set(labels) - seen)
    if unknown:
        raise ValueError(f"labels_file {labels_file!r} names {len(unknown)} key(s) not in data_dirs, e.g. "
                         f"{unknown[:5]}")
    known = torch.isfinite(torch.tensor(elevs, dtype=torch.float64))
    if elevation and not known.any():
        raise ValueError("elevation=True but no sample in data_dirs has a known elevation; "
                         "pass elevation=False to fit the filter alone")
    X = torch.cat(feats)
    labelled = torch.tensor([k in labels for k in keys])
    y = torch.tensor([labels[k] for k in keys if k in labels])
    quality = QualityFilter(threshold=threshold, dinov2=dinov2).fit(X[labelled], y, seed=seed)
    scores = quality.score(X[labelled])
    metrics = dict(samples_read=len(seen), labelled=len(y), positives=int(y.sum()), threshold=threshold,
                   train_accuracy=((scores > 0).long() == y).double().mean().item(),
                   kept_fraction=(scores > threshold).double().mean().item())
    os.makedirs(out_dir, exist_ok=True)
    quality.save(out_dir)
    if elevation:
        est = ElevationEstimator(extractor.dim, dinov2=dinov2)
        e = torch.tensor(elevs, dtype=torch.float32)[known]
        est.fit(X[known], e, steps=elevation_steps, seed=seed)
        metrics.update(elevation_samples=int(known.sum()),
                       elevation_mae=(est.predict(X[known]) - e).abs().mean().item())
        est.save(out_dir)
    with atomic_open(os.path.join(out_dir, "metrics.json")) as f:
        json.dump(metrics, f, indent=2)
    return metrics


def apply_filter(filter_dir: str, images: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 extractor: FeatureExtractor | None = None) -> tuple[Tensor, Tensor]:  # [N] bool, [N] float64
    """(keep, scores) of a saved filter on `images`, with the DINOv2 it was trained on unless
    `extractor` is given (reuse one across calls: loading DINOv2 is the slow part)."""
    quality = QualityFilter.load(filter_dir)
    if extractor is None:
        if quality.dinov2 is None:
            raise ValueError(f"filter_dir {filter_dir!r} names no dinov2; pass an extractor")
        extractor = FeatureExtractor.load(quality.dinov2)
    feats = extractor.features(images)
    return quality.keep(feats), quality.score(feats)
