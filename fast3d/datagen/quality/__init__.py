"""VFusion3D's data quality filter and elevation estimator for generated multi-view samples.

VFusion3D keeps the good multi-view videos out of its generated ones with a linear SVM on DINOv2
features averaged over frames, and labels the camera elevation of each video's first view with a
2-layer MLP on the same features (trained on rendered 3D data whose elevations are known):

* `FeatureExtractor` (features): DINOv2 (a local checkpoint, or "random-tiny" for tests) -> [N, D] features;
  `sample_features`: the one function giving both models their input at training and at use (the
  mean feature of `frames` frames spread uniformly over the video: 8 for the filter, 4 for the MLP).
* `QualityFilter` (models): the SVM (scikit-learn `LinearSVC` on standardised features); `score`, `keep`.
* `ElevationEstimator` (models): the MLP (torch, MSE) predicting elevation in radians.
* `train_filter` (train): labelled shards -> both models in a directory (the `fast3d datagen train-filter`
  entry point); `apply_filter`: that directory + images -> (keep, scores).

Nothing is pickled: each model is a safetensors file of its parameters plus a YAML config (read with
`yaml.safe_load`), both checked on loading.
"""

from fast3d.datagen.quality.features import (
    ELEVATION_FRAMES,
    FILTER_FRAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM_TINY,
    FeatureExtractor,
    sample_features,
    uniform_frames,
)
from fast3d.datagen.quality.models import ELEVATION_NAME, FILTER_NAME, FORMAT_VERSION, ElevationEstimator, QualityFilter
from fast3d.datagen.quality.train import apply_filter, iter_videos, read_labels, train_filter

__all__ = ["ELEVATION_FRAMES", "FILTER_FRAMES", "IMAGENET_MEAN", "IMAGENET_STD", "RANDOM_TINY", "FeatureExtractor",
           "sample_features", "uniform_frames", "ELEVATION_NAME", "FILTER_NAME", "FORMAT_VERSION",
           "ElevationEstimator", "QualityFilter", "apply_filter", "iter_videos", "read_labels", "train_filter"]
