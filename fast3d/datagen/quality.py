"""VFusion3D's data quality filter and elevation estimator for generated multi-view samples.

VFusion3D keeps the good multi-view videos out of its generated ones with a linear SVM on DINOv2
features averaged over frames, and labels the camera elevation of each video's first view with a
2-layer MLP on the same features (trained on rendered 3D data whose elevations are known):

* `FeatureExtractor`: DINOv2 (a local checkpoint, or "random-tiny" for tests) -> [N, D] features.
* `QualityFilter`: the SVM (scikit-learn `LinearSVC` on standardised features); `score`, `keep`.
* `ElevationEstimator`: the MLP (torch, MSE) predicting elevation in radians.
* `train_filter`: labelled shards -> both models in a directory (the `fast3d datagen train-filter`
  entry point); `apply_filter`: that directory + images -> (keep, scores).

Nothing is pickled: each model is a safetensors file of its parameters plus a YAML config (read with
`yaml.safe_load`), both checked on loading.
"""

from __future__ import annotations

import csv
import json
import math
import os

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fast3d._yaml import load_yaml
from fast3d.data.dataset import MultiViewDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_TINY = "random-tiny"
FILTER_NAME = "quality_filter"
ELEVATION_NAME = "elevation_mlp"
FORMAT_VERSION = 1


class FeatureExtractor:
    """DINOv2 CLS (pooler) features, averaged over the frames of each sample."""

    def __init__(self, model, spec: str, image_size: int | None = None, batch_size: int = 32):
        self.model = model.eval()
        self.spec = spec  # how to rebuild this extractor: a local path or RANDOM_TINY
        self.image_size = int(image_size or model.config.image_size)
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)

    @classmethod
    def load(cls, spec: str, **kwargs) -> "FeatureExtractor":
        """`spec`: a local DINOv2 directory (never downloaded) or "random-tiny" (a small randomly
        initialised DINOv2, the same weights every time: for tests and smoke runs)."""
        from transformers import Dinov2Config, Dinov2Model

        if spec == RANDOM_TINY:
            config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  patch_size=8, image_size=32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return cls(Dinov2Model(config), spec, **kwargs)
        if not os.path.isdir(spec):
            raise ValueError(f"dinov2 must be {RANDOM_TINY!r} or a local DINOv2 directory; got {spec!r} "
                             f"(no such directory)")
        return cls(Dinov2Model.from_pretrained(spec, local_files_only=True), spec, **kwargs)

    @torch.no_grad()
    def features(self, images: Tensor,  # [N, V, 3, H, W] in [0, 1]
                 ) -> Tensor:  # [N, D] float32
        if images.dim() != 5 or images.shape[2] != 3 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [N, V, 3, H, W]; got {images.dtype} "
                             f"{tuple(images.shape)}")
        N, V = images.shape[:2]
        device = next(self.model.parameters()).device
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        frames = images.flatten(0, 1)
        out = []
        for chunk in frames.split(self.batch_size):
            x = chunk.to(device, torch.float32)
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                                  align_corners=False)
            out.append(self.model(pixel_values=(x - mean) / std).pooler_output.float().cpu())
        return torch.cat(out).view(N, V, -1).mean(1)


class QualityFilter:
    """A linear SVM on standardised features; `score` is its decision function, > 0 for class 1
    (good); `keep` keeps the samples that score above `threshold`."""

    def __init__(self, threshold: float = 0.0, C: float = 1.0, dinov2: str | None = None):
        self.threshold = _finite("threshold", threshold)
        self.C = _finite("C", C)
        if self.C <= 0:
            raise ValueError(f"C must be positive; got {C!r}")
        self.dinov2 = dinov2  # the FeatureExtractor spec the features come from
        self.params: dict[str, Tensor] | None = None  # mean, std, coef [D]; intercept [1] (float64)

    def fit(self, features: Tensor,  # [N, D]
            labels: Tensor,  # [N] in {0, 1}
            seed: int = 0) -> "QualityFilter":
        from sklearn.svm import LinearSVC

        x = _features("features", features).double()
        y = _vector("labels", labels, len(x))
        if not ((y == 0) | (y == 1)).all():
            raise ValueError(f"labels must be 0 or 1; got values {sorted(set(y.tolist()))}")
        if len(set(y.tolist())) < 2:
            raise ValueError(f"labels must hold both classes 0 and 1; got only {int(y[0])}")
        mean, std = _standardisation(x)
        svm = LinearSVC(C=self.C, max_iter=20_000, random_state=seed).fit(((x - mean) / std).numpy(),
                                                                           y.long().numpy())
        self.params = dict(mean=mean, std=std, coef=torch.from_numpy(svm.coef_[0]).double(),
                           intercept=torch.from_numpy(svm.intercept_).double().view(1))
        return self

    def score(self, features: Tensor,  # [N, D]
              ) -> Tensor:  # [N] float64
        p = self._fitted()
        x = _features("features", features, dim=len(p["coef"])).double()
        return ((x - p["mean"]) / p["std"]) @ p["coef"] + p["intercept"]

    def keep(self, features: Tensor,  # [N, D]
             ) -> Tensor:  # [N] bool
        return self.score(features) > self.threshold

    def save(self, directory: str) -> None:
        p = self._fitted()
        _save(directory, FILTER_NAME, p, dict(feature_dim=len(p["coef"]), threshold=self.threshold, C=self.C,
                                              dinov2=self.dinov2))

    @classmethod
    def load(cls, directory: str) -> "QualityFilter":
        tensors, config = _load(directory, FILTER_NAME, ("feature_dim", "threshold", "C", "dinov2"))
        D = _positive_int(config, "feature_dim")
        _check_tensors(directory, FILTER_NAME, tensors, dict(mean=(D,), std=(D,), coef=(D,), intercept=(1,)))
        if not (tensors["std"] > 0).all():
            raise ValueError(f"{FILTER_NAME}.safetensors: std must be positive")
        out = cls(threshold=config["threshold"], C=config["C"], dinov2=_spec(config))
        out.params = {k: v.double() for k, v in tensors.items()}
        return out

    def _fitted(self) -> dict[str, Tensor]:
        if self.params is None:
            raise ValueError("this QualityFilter is not fitted: call fit() or QualityFilter.load()")
        return self.params


class ElevationEstimator(nn.Module):
    """VFusion3D's 2-layer MLP: standardised features -> elevation (radians) of the first view."""

    def __init__(self, feature_dim: int, hidden: int = 256, dinov2: str | None = None):
        super().__init__()
        self.feature_dim, self.hidden, self.dinov2 = feature_dim, hidden, dinov2
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: Tensor,  # [N, D]
                ) -> Tensor:  # [N]
        return self.mlp((features - self.mean) / self.std).squeeze(-1)

    def fit(self, features: Tensor,  # [N, D]
            elevations: Tensor,  # [N] radians
            steps: int = 1000, lr: float = 1e-3, seed: int = 0) -> float:
        """Full-batch Adam on the MSE from a fresh initialisation; returns the final training MSE."""
        x = _features("features", features, dim=self.feature_dim).float()
        y = _vector("elevations", elevations, len(x)).float()
        if not torch.isfinite(y).all():
            raise ValueError("elevations must be finite (drop the samples whose elevation is unknown)")
        if steps <= 0 or not lr > 0:
            raise ValueError(f"steps and lr must be positive; got steps={steps}, lr={lr}")
        mean, std = _standardisation(x)
        self.mean.copy_(mean)
        self.std.copy_(std)
        g = torch.Generator().manual_seed(seed)
        for layer in (self.mlp[0], self.mlp[2]):
            bound = 1 / math.sqrt(layer.in_features)
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=g)
                layer.bias.uniform_(-bound, bound, generator=g)
        opt = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        self.train()
        for _ in range(steps):
            loss = F.mse_loss(self(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.eval()
        with torch.no_grad():
            return F.mse_loss(self(x), y).item()

    @torch.no_grad()
    def predict(self, features: Tensor,  # [N, D]
                ) -> Tensor:  # [N] radians
        return self(_features("features", features, dim=self.feature_dim).float())

    def save(self, directory: str) -> None:
        _save(directory, ELEVATION_NAME, {k: v.detach() for k, v in self.state_dict().items()},
              dict(feature_dim=self.feature_dim, hidden=self.hidden, dinov2=self.dinov2))

    @classmethod
    def load(cls, directory: str) -> "ElevationEstimator":
        tensors, config = _load(directory, ELEVATION_NAME, ("feature_dim", "hidden", "dinov2"))
        D, H = _positive_int(config, "feature_dim"), _positive_int(config, "hidden")
        out = cls(D, H, dinov2=_spec(config))
        _check_tensors(directory, ELEVATION_NAME, tensors,
                       {k: tuple(v.shape) for k, v in out.state_dict().items()})
        out.load_state_dict({k: v.float() for k, v in tensors.items()})
        return out.eval()


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
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
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


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _features(name: str, x: Tensor, dim: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or len(x) == 0 or (dim is not None and x.shape[1] != dim):
        want = f"[N, {dim}]" if dim is not None else "[N, D]"
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty 2-D tensor {want}; got {got}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


def _vector(name: str, x: Tensor, n: int) -> Tensor:
    if not isinstance(x, Tensor) or tuple(x.shape) != (n,):
        raise ValueError(f"{name} must be a tensor [{n}] (one per feature row); "
                         f"got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x


def _standardisation(x: Tensor) -> tuple[Tensor, Tensor]:
    std = x.std(0, unbiased=False)
    return x.mean(0), torch.where(std > 1e-8, std, torch.ones_like(std))


def _save(directory: str, name: str, tensors: dict[str, Tensor], config: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, f"{name}.safetensors"))
    with open(os.path.join(directory, f"{name}.yaml"), "w") as f:
        yaml.safe_dump(dict(kind=name, version=FORMAT_VERSION, **config), f, sort_keys=False)


def _load(directory: str, name: str, keys: tuple[str, ...]) -> tuple[dict[str, Tensor], dict]:
    cfg_path, st_path = (os.path.join(directory, f"{name}.{ext}") for ext in ("yaml", "safetensors"))
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            raise ValueError(f"{p} does not exist (save a {name} into {directory!r} first)")
    config = load_yaml(cfg_path)
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a mapping; got {type(config).__name__}")
    missing = [k for k in ("kind", "version", *keys) if k not in config]
    if missing:
        raise ValueError(f"{cfg_path} lacks key(s) {missing}")
    if config["kind"] != name or config["version"] != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: expected kind {name!r} version {FORMAT_VERSION}; "
                         f"got kind {config['kind']!r} version {config['version']!r}")
    try:
        tensors = load_file(st_path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{st_path} is not a readable safetensors file: {e}") from None
    return tensors, config


def _check_tensors(directory: str, name: str, tensors: dict[str, Tensor], shapes: dict[str, tuple]) -> None:
    path = os.path.join(directory, f"{name}.safetensors")
    if set(tensors) != set(shapes):
        raise ValueError(f"{path}: expected tensors {sorted(shapes)}; got {sorted(tensors)}")
    for k, shape in shapes.items():
        t = tensors[k]
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} must be floating point of shape {shape}; "
                             f"got {t.dtype} {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {k!r} must be finite")


def _positive_int(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"config {key} must be a positive integer; got {value!r}")
    return value


def _spec(config: dict) -> str | None:
    if config["dinov2"] is not None and not isinstance(config["dinov2"], str):
        raise ValueError(f"config dinov2 must be a string or null; got {config['dinov2']!r}")
    return config["dinov2"]
