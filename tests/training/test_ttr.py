"""TTR: each source's timestep support and distribution, the rendered3d band share, source mixing."""

import math

import pytest
import torch

from fast3d.training import SOURCES, TTRConfig, TTRSampler

N = 60_000


def _counts(t, lo, hi):
    return torch.bincount(t - lo, minlength=hi - lo).double()


def assert_uniform(t, lo, hi, what):
    """Support exactly [lo, hi) and every value's count within 6 sigma of uniform."""
    assert t.min() >= lo and t.max() < hi, f"{what}: support [{t.min()}, {t.max()}] not in [{lo}, {hi})"
    c = _counts(t, lo, hi)
    n, k = len(t), hi - lo
    expected, sigma = n / k, math.sqrt(n / k * (1 - 1 / k))
    worst = (c - expected).abs().max().item()
    assert worst < 6 * sigma, f"{what}: a timestep count deviates {worst:.0f} from {expected:.0f} (6 sigma {6 * sigma:.0f})"
    assert (c > 0).all() or n < 5 * k, f"{what}: some timesteps never drawn"


def test_synthetic_only_structure_timesteps(gen):
    t = TTRSampler().sample_timesteps(["synthetic"] * N, gen)
    assert t.dtype == torch.int64
    assert_uniform(t, 200, 1000, "synthetic")


def test_image2d_only_texture_timesteps(gen):
    assert_uniform(TTRSampler().sample_timesteps(["image2d"] * N, gen), 0, 50, "image2d")


def test_rendered3d_favours_the_band(gen):
    s = TTRSampler(TTRConfig(rendered3d_band_share=0.3))
    t = s.sample_timesteps(torch.full((N,), SOURCES.index("rendered3d")), gen)
    assert t.min() >= 0 and t.max() < 1000
    # Mixture: 0.3 uniform on [50, 200) + 0.7 uniform on [0, 1000).
    frac_in_band = ((t >= 50) & (t < 200)).double().mean().item()
    expected = 0.3 + 0.7 * 150 / 1000
    assert abs(frac_in_band - expected) < 6 * math.sqrt(expected * (1 - expected) / N)
    outside = t[(t < 50) | (t >= 200)]
    assert_uniform(outside[outside >= 200], 200, 1000, "rendered3d above the band")


def test_zero_share_is_plain_uniform(gen):
    t = TTRSampler(TTRConfig(rendered3d_band_share=0.0)).sample_timesteps(["rendered3d"] * N, gen)
    assert_uniform(t, 0, 1000, "rendered3d share 0")


def test_mixed_batch_keeps_each_source_in_its_interval(gen):
    s = TTRSampler()
    ids = s.sample_sources(N, gen)
    t = s.sample_timesteps(ids, gen)
    assert (t[ids == 0] >= 200).all() and (t[ids == 2] < 50).all()


def test_source_weights_set_the_mix(gen):
    s = TTRSampler(TTRConfig(source_weights={"synthetic": 2.0, "rendered3d": 1.0, "image2d": 1.0}))
    frac = torch.bincount(s.sample_sources(N, gen), minlength=3).double() / N
    for got, want in zip(frac.tolist(), [0.5, 0.25, 0.25]):
        assert abs(got - want) < 6 * math.sqrt(want * (1 - want) / N)
    only = TTRSampler(TTRConfig(source_weights={"image2d": 1.0}))
    assert (only.sample_sources(100, gen) == SOURCES.index("image2d")).all()


def test_config_from_dict_and_thresholds(gen):
    c = TTRConfig.from_dict({"synthetic_min_t": 300, "rendered3d_band": [60, 120], "num_train_timesteps": 500})
    s = TTRSampler(c)
    assert_uniform(s.sample_timesteps(["synthetic"] * 20_000, gen), 300, 500, "synthetic 300")


@pytest.mark.parametrize("kwargs, match", [
    (dict(synthetic_min_t=1000), r"synthetic_min_t must be in \[0, 1000\); got 1000"),
    (dict(image2d_max_t=0), r"image2d_max_t must be in \(0, 1000\]; got 0"),
    (dict(rendered3d_band=(200, 50)), "rendered3d_band must satisfy"),
    (dict(rendered3d_band_share=1.5), r"rendered3d_band_share must be in \[0, 1\]; got 1.5"),
    (dict(source_weights={"video": 1.0}), r"unknown sources \['video'\]"),
    (dict(source_weights={"synthetic": 0.0}), "positive sum"),
    (dict(num_train_timesteps=1), "num_train_timesteps must be an int >= 2; got 1"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TTRConfig(**kwargs)


def test_bad_keys_and_sources(gen):
    with pytest.raises(ValueError, match=r"unknown TTR config keys \['threshold'\]"):
        TTRConfig.from_dict({"threshold": 200})
    with pytest.raises(ValueError, match=r"unknown sources \['video'\]; valid: synthetic, rendered3d, image2d"):
        TTRSampler().sample_timesteps(["video"], gen)
    with pytest.raises(ValueError, match=r"source ids must be in \[0, 3\)"):
        TTRSampler().sample_timesteps(torch.tensor([3]), gen)
