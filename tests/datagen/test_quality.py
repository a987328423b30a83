"""VFusion3D's quality filter and elevation estimator: the SVM separates what is separable and
survives save/load bit for bit, tampered files are refused, features average over frames, the
elevation MLP fits and round-trips, and `train_filter` runs end to end on procedural shards."""

import json
import os

import pytest
import torch
from helpers import assert_close
from safetensors.torch import load_file, save_file

from fast3d.data import MultiViewDataset
from fast3d.datagen import procedural
from fast3d.datagen.quality import (
    ELEVATION_NAME,
    FILTER_NAME,
    ElevationEstimator,
    FeatureExtractor,
    QualityFilter,
    apply_filter,
    sample_features,
    train_filter,
    uniform_frames,
)


def clusters(gen, n=100, dim=16, shift=3.0):
    """Two Gaussian clusters [2n, dim] whose means are `shift` apart along a random direction."""
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
    x = torch.randn(2 * n, dim, generator=gen, dtype=torch.float64) * 0.5
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    return x + y[:, None] * shift * direction, y


def test_filter_separates_clusters_and_round_trips(tmp_path, gen):
    x, y = clusters(gen, n=200)
    f = QualityFilter(threshold=0.25).fit(x[::2], y[::2])  # fit on half, check on the other half
    held_out = (f.score(x[1::2]) > 0).long()
    assert (held_out == y[1::2]).double().mean() >= 0.95
    f.save(str(tmp_path))
    g = QualityFilter.load(str(tmp_path))
    assert g.threshold == 0.25
    assert torch.equal(g.score(x), f.score(x))
    assert torch.equal(g.keep(x), f.score(x) > 0.25)


def test_filter_rejects_bad_input(gen):
    x, y = clusters(gen, n=10)
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        QualityFilter().fit(x, y * 2)
    with pytest.raises(ValueError, match="both classes"):
        QualityFilter().fit(x, torch.ones_like(y))
    with pytest.raises(ValueError, match=r"features must be a non-empty 2-D tensor \[N, 16\]; got \(20, 3\)"):
        QualityFilter().fit(x, y).score(x[:, :3])
    with pytest.raises(ValueError, match="not fitted"):
        QualityFilter().score(x)


def tamper_missing_key(d):
    t = load_file(os.path.join(d, f"{FILTER_NAME}.safetensors"))
    del t["std"]
    save_file(t, os.path.join(d, f"{FILTER_NAME}.safetensors"))


def tamper_wrong_shape(d):
    t = load_file(os.path.join(d, f"{FILTER_NAME}.safetensors"))
    t["coef"] = torch.zeros(15, dtype=torch.float64)
    save_file(t, os.path.join(d, f"{FILTER_NAME}.safetensors"))


def tamper_not_safetensors(d):
    with open(os.path.join(d, f"{FILTER_NAME}.safetensors"), "wb") as f:
        f.write(b"\x80\x04\x95not a safetensors file at all")


def tamper_config(d):
    with open(os.path.join(d, f"{FILTER_NAME}.yaml"), "w") as f:
        f.write("kind: quality_filter\nversion: 2\nthreshold: 0.0\n")


def tamper_no_file(d):
    os.remove(os.path.join(d, f"{FILTER_NAME}.safetensors"))


@pytest.mark.parametrize("tamper, message", [
    (tamper_missing_key, r"expected tensors \['coef', 'intercept', 'mean', 'std'\]"),
    (tamper_wrong_shape, r"tensor 'coef' must be floating point of shape \(16,\)"),
    (tamper_not_safetensors, "not a readable safetensors file"),
    (tamper_config, r"lacks key\(s\) \['feature_dim', 'C', 'dinov2', 'frames'\]"),
    (tamper_no_file, "does not exist"),
])
def test_load_rejects_malformed_filter(tmp_path, gen, tamper, message):
    x, y = clusters(gen, n=10)
    QualityFilter().fit(x, y).save(str(tmp_path))
    QualityFilter.load(str(tmp_path))
    tamper(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        QualityFilter.load(str(tmp_path))


def test_features_average_over_frames(gen):
    ext = FeatureExtractor.load("random-tiny")
    frames = torch.rand(3, 1, 3, 20, 20, generator=gen)
    one = ext.features(frames)
    assert one.shape == (3, ext.dim)
    assert_close(ext.features(frames.expand(3, 4, 3, 20, 20)), one, atol=1e-5, rtol=1e-5, name="identical frames")
    assert_close(ext.features(frames.transpose(0, 1)), one.mean(0, keepdim=True), atol=1e-5, rtol=1e-5,
                 name="mean over frames")
    assert not torch.allclose(one[0], one[1], atol=1e-4)  # the features do depend on the image
    with pytest.raises(ValueError, match=r"images must be a float tensor \[N, V, 3, H, W\]"):
        ext.features(frames[:, 0])
    with pytest.raises(ValueError, match="dinov2 must be 'random-tiny' or a local DINOv2 directory"):
        FeatureExtractor.load(str(os.path.join("no", "such", "dir")))


def test_elevation_fits_a_linear_function_and_round_trips(tmp_path, gen):
    x = torch.randn(256, 12, generator=gen)
    w = torch.randn(12, generator=gen) * 0.1
    elev = (x @ w + 0.4).clamp(0, 0.785)
    est = ElevationEstimator(12, hidden=64)
    mse = est.fit(x, elev, steps=500, lr=1e-2)
    mae = (est.predict(x) - elev).abs().mean().item()
    assert mse < 1e-3 and mae < 0.03, (mse, mae)
    est.save(str(tmp_path))
    back = ElevationEstimator.load(str(tmp_path))
    assert torch.equal(back.predict(x), est.predict(x))
    t = load_file(os.path.join(tmp_path, f"{ELEVATION_NAME}.safetensors"))
    t["mlp.0.weight"] = t["mlp.0.weight"][:, :5].contiguous()
    save_file(t, os.path.join(tmp_path, f"{ELEVATION_NAME}.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'mlp.0.weight' must be floating point of shape \(64, 12\)"):
        ElevationEstimator.load(str(tmp_path))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("procedural"))
    procedural.run(out, procedural.ProceduralConfig(num_objects=8, views=4, rig="orbit16", resolution=24,
                                                    gaussians_per_object=400, samples_per_shard=2, batch_size=2))
    return out


def write_labels(path, labels: dict) -> str:
    with open(path, "w") as f:
        if str(path).endswith(".json"):
            json.dump(labels, f)
        else:
            f.write("key,label\n" + "".join(f"{k},{v}\n" for k, v in labels.items()))
    return str(path)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_train_filter_end_to_end(tmp_path, shards, fmt):
    keys = [f"obj{i:08d}" for i in range(8)]
    labels = write_labels(tmp_path / f"labels.{fmt}", {k: int(i < 4) for i, k in enumerate(keys)})
    out = str(tmp_path / "filter")
    metrics = train_filter([shards], labels, out, threshold=0.0, elevation_steps=300, views=4)
    assert sorted(os.listdir(out)) == sorted(["metrics.json", f"{FILTER_NAME}.safetensors", f"{FILTER_NAME}.yaml",
                                              f"{ELEVATION_NAME}.safetensors", f"{ELEVATION_NAME}.yaml"])
    assert metrics == json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["samples_read"] == 8 and metrics["labelled"] == 8 and metrics["positives"] == 4
    assert metrics["elevation_samples"] == 8
    assert 0.0 <= metrics["train_accuracy"] <= 1.0 and 0.0 <= metrics["kept_fraction"] <= 1.0
    assert 0.0 <= metrics["elevation_mae"] < 0.2
    samples = list(MultiViewDataset(shards, views=4, resolution=24))
    keep, scores = apply_filter(out, torch.stack([s["images"] for s in samples]))
    assert keep.shape == scores.shape == (8,) and keep.dtype == torch.bool
    assert torch.equal(keep, scores > 0.0)
    assert ((scores > 0).long() == torch.tensor([int(i < 4) for i in range(8)])).double().mean().item() == \
        pytest.approx(metrics["train_accuracy"])
    elev = ElevationEstimator.load(out)
    assert elev.dinov2 == "random-tiny" and elev.feature_dim == FeatureExtractor.load("random-tiny").dim


@pytest.mark.parametrize("name, content, message", [
    ("labels.json", {"obj00000000": 1, "obj00000001": 0, "nosuchkey": 1}, r"names 1 key\(s\) not in data_dirs"),
    ("labels.json", {"obj00000000": 1, "obj00000001": 2}, "the label of 'obj00000001' must be 0 or 1; got 2"),
    ("labels.json", {"obj00000000": 1, "obj00000001": 1}, r"both classes 0 and 1; got 2 label\(s\) of class"),
    ("labels.json", ["obj00000000", 1], "must hold a JSON object"),
    ("labels.csv", "obj00000000,1,extra\n", "row 1: expected `key,label`"),
    ("labels.csv", "obj00000000,1\nobj00000000,0\n", "appears more than once"),
    ("labels.txt", "", "must end in .json or .csv"),
])
def test_labels_file_errors(tmp_path, shards, name, content, message):
    path = tmp_path / name
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=message):
        train_filter([shards], str(path), str(tmp_path / "out"), views=4)
    assert not os.path.exists(tmp_path / "out")


def write_videos(out, gen, n=16, frames=8, size=16):
    """``n`` samples of ``frames`` random frames each (every frame its own content), on a turntable."""
    from fast3d import cameras
    from fast3d.data.shards import MultiViewSample, ShardWriter

    viewmats, Ks = cameras.turntable(frames, size)
    videos = torch.rand(n, frames, 3, size, size, generator=gen)
    with ShardWriter(str(out), prefix="vid", samples_per_shard=8) as w:
        for i in range(n):
            w.write(MultiViewSample(key=f"vid{i:04d}", images=videos[i], alphas=torch.ones(frames, 1, size, size),
                                    viewmats=viewmats.float(), Ks=Ks.float(), caption="", source="synthetic",
                                    elevation=0.1 * (i % 5)))
    # what the shards hold (8-bit PNG), the frames the pipeline would hand the filter
    return torch.stack([s["images"] for s in MultiViewDataset(str(out), views=frames, resolution=size)])


def test_filter_features_are_the_same_at_training_and_in_the_pipeline(tmp_path, gen):
    """Defect: the filter was trained on the mean feature of the first `views` frames and applied by
    the pipeline to the mean over all frames. Trained on separable labels, the pipeline's filter
    must give the training labels back on the very same videos."""
    from fast3d.datagen.pipeline.stages import Filter

    videos = write_videos(tmp_path / "videos", gen)
    labels = {f"vid{i:04d}": int(v) for i, v in enumerate(torch.randperm(16, generator=gen) < 8)}
    out = str(tmp_path / "filter")
    metrics = train_filter([str(tmp_path / "videos")], write_labels(tmp_path / "l.json", labels), out, views=4,
                           elevation_steps=200)
    assert metrics["train_accuracy"] == 1.0  # 16 samples in 32 dimensions: separable
    keep, scores = Filter(out, None, torch.device("cpu"))(videos)
    assert keep.tolist() == [bool(labels[f"vid{i:04d}"]) for i in range(16)]
    assert torch.equal(apply_filter(out, videos)[1], scores)
    # the elevation MLP likewise: the pipeline's labeller reproduces the training fit
    from fast3d.datagen.pipeline.stages import ElevationLabeler

    est = ElevationEstimator.load(out)
    ext = FeatureExtractor.load("random-tiny")
    fitted = est.predict(sample_features(ext, videos, est.frames))
    assert_close(ElevationLabeler(out, torch.device("cpu"))(videos), fitted.double(), atol=0, rtol=0,
                 name="pipeline elevation")
    assert abs(metrics["elevation_mae"] - (fitted - 0.1 * (torch.arange(16) % 5)).abs().mean().item()) < 1e-6


def test_uniform_frames_spread_over_the_video():
    assert uniform_frames(21, 8).tolist() == [0, 2, 5, 7, 10, 13, 15, 18]
    assert uniform_frames(16, 4).tolist() == [0, 4, 8, 12]
    assert uniform_frames(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="a video of 3 frames has fewer frames than the 4 requested"):
        uniform_frames(3, 4)
    with pytest.raises(ValueError, match="frames must be a positive int; got 0"):
        uniform_frames(3, 0)


def test_train_filter_names_a_video_with_too_few_frames(tmp_path, gen):
    write_videos(tmp_path / "videos", gen, n=4, frames=4)
    labels = write_labels(tmp_path / "l.json", {"vid0000": 0, "vid0001": 1})
    with pytest.raises(ValueError, match="sample 'vid0000' has 4 frames, fewer than the 8 the quality filter averages"):
        train_filter([str(tmp_path / "videos")], labels, str(tmp_path / "out"))
