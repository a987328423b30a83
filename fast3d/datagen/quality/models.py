"""The two models fitted on DINOv2 features: VFusion3D's quality filter (a linear SVM) and
elevation estimator (a 2-layer MLP), each saved as a safetensors file of its parameters plus a YAML
config (read with ``yaml.safe_load``), both checked on loading; nothing is pickled."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fast3d import checks
from fast3d._yaml import load_yaml
from fast3d.datagen.quality.features import ELEVATION_FRAMES, FILTER_FRAMES
from fast3d.io.atomic import atomic_open, atomic_path

FILTER_NAME = "quality_filter"
ELEVATION_NAME = "elevation_mlp"
FORMAT_VERSION = 2  # 2: each model records the frames its features average (sample_features)


class QualityFilter:
    """A linear SVM on standardised features; `score` is its decision function, > 0 for class 1
    (good); `keep` keeps the samples that score above `threshold`."""

    def __init__(self, threshold: float = 0.0, C: float = 1.0, dinov2: str | None = None,
                 frames: int = FILTER_FRAMES):
        self.threshold = checks.real("threshold", threshold)
        self.frames = checks.positive_int("frames", frames)  # of sample_features, at training and at use
        self.C = checks.real("C", C)
        if self.C <= 0:
            raise ValueError(f"C must be positive; got {C!r}")
        self.dinov2 = dinov2  # the FeatureExtractor spec the features come from
        self.params: dict[str, Tensor] | None = None  # mean, std, coef [D]; intercept [1] (float64)

    def fit(self, features: Tensor,  # [N, D]
            labels: Tensor,  # [N] in {0, 1}
            seed: int = 0) -> QualityFilter:
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
                                              dinov2=self.dinov2, frames=self.frames))

    @classmethod
    def load(cls, directory: str) -> QualityFilter:
        tensors, config = _load(directory, FILTER_NAME, ("feature_dim", "threshold", "C", "dinov2", "frames"))
        D = checks.positive_int("config feature_dim", config["feature_dim"])
        _check_tensors(directory, FILTER_NAME, tensors, dict(mean=(D,), std=(D,), coef=(D,), intercept=(1,)))
        if not (tensors["std"] > 0).all():
            raise ValueError(f"{FILTER_NAME}.safetensors: std must be positive")
        out = cls(threshold=config["threshold"], C=config["C"], dinov2=_spec(config),
                  frames=checks.positive_int("config frames", config["frames"]))
        out.params = {k: v.double() for k, v in tensors.items()}
        return out

    def _fitted(self) -> dict[str, Tensor]:
        if self.params is None:
            raise ValueError("this QualityFilter is not fitted: call fit() or QualityFilter.load()")
        return self.params


class ElevationEstimator(nn.Module):
    """VFusion3D's 2-layer MLP: standardised features -> elevation (radians) of the first view."""

    def __init__(self, feature_dim: int, hidden: int = 256, dinov2: str | None = None,
                 frames: int = ELEVATION_FRAMES):
        super().__init__()
        self.feature_dim, self.hidden, self.dinov2 = feature_dim, hidden, dinov2
        self.frames = checks.positive_int("frames", frames)  # of sample_features, at training and at use
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
              dict(feature_dim=self.feature_dim, hidden=self.hidden, dinov2=self.dinov2, frames=self.frames))

    @classmethod
    def load(cls, directory: str) -> ElevationEstimator:
        tensors, config = _load(directory, ELEVATION_NAME, ("feature_dim", "hidden", "dinov2", "frames"))
        D = checks.positive_int("config feature_dim", config["feature_dim"])
        H = checks.positive_int("config hidden", config["hidden"])
        out = cls(D, H, dinov2=_spec(config), frames=checks.positive_int("config frames", config["frames"]))
        _check_tensors(directory, ELEVATION_NAME, tensors,
                       {k: tuple(v.shape) for k, v in out.state_dict().items()})
        out.load_state_dict({k: v.float() for k, v in tensors.items()})
        return out.eval()


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
    with atomic_path(os.path.join(directory, f"{name}.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    with atomic_open(os.path.join(directory, f"{name}.yaml")) as f:
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


def _spec(config: dict) -> str | None:
    if config["dinov2"] is not None and not isinstance(config["dinov2"], str):
        raise ValueError(f"config dinov2 must be a string or null; got {config['dinov2']!r}")
    return config["dinov2"]
