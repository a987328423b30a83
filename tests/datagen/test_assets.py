"""Procedural assets: seeded, varied, normalised, well-formed Gaussians, captions from their parts."""

import pytest
import torch

from fast3d.datagen import assets


def test_same_seed_same_asset_other_seed_other_asset(seed):
    a = assets.make_asset(torch.Generator().manual_seed(seed), 2000)
    b = assets.make_asset(torch.Generator().manual_seed(seed), 2000)
    c = assets.make_asset(torch.Generator().manual_seed(seed + 1), 2000)
    assert torch.equal(a.means, b.means) and torch.equal(a.colors, b.colors) and a.caption == b.caption
    assert not torch.equal(a.means, c.means)


def test_gaussians_are_well_formed_and_in_the_unit_box(gen):
    for _ in range(10):
        a = assets.make_asset(gen, 1001)
        assert a.means.shape == (1001, 3) and a.quats.shape == (1001, 4) and a.scales.shape == (1001, 3)
        assert a.opacities.shape == (1001,) and a.colors.shape == (1001, 3) and a.sh.shape == (1001, 1, 3)
        for t in (a.means, a.quats, a.scales, a.opacities, a.colors):
            assert torch.isfinite(t).all()
        extent = a.means.max(0).values - a.means.min(0).values
        assert a.means.abs().max() <= 0.5 + 1e-6 and abs(extent.max().item() - 1.0) < 1e-5
        assert torch.allclose(a.quats.norm(dim=-1), torch.ones(1001), atol=1e-5)
        assert (a.scales > 0).all() and (a.scales < 0.2).all()
        assert ((a.opacities > 0) & (a.opacities <= 1)).all() and ((a.colors >= 0) & (a.colors <= 1)).all()
        # The DC spherical harmonic reproduces the colour (3DGS: colour = SH_C0 * dc + 0.5).
        assert torch.allclose(a.sh[:, 0] * assets.SH_C0 + 0.5, a.colors, atol=1e-6)


def test_discs_lie_in_the_surface_tangent_plane(gen):
    # A single box: its Gaussians' thin axis (the third column of R(q)) must be a face normal.
    for _ in range(200):  # P(no box in 200 draws) = (6/7)^200 ~ 4e-14
        a = assets.make_asset(gen, 500, max_parts=1)
        if a.parts[0]["shape"] == "box":
            break
    else:
        raise AssertionError("no box drawn in 200 single-part assets")
    w, x, y, z = a.quats.double().unbind(-1)
    normal = torch.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], -1)
    assert (a.scales[:, 2] < a.scales[:, 0]).all()
    # The box may be rotated; its normals take only 3 directions up to sign.
    dirs = torch.unique((normal.abs() * 100).round(), dim=0)
    assert len(dirs) <= 3 * 2, dirs


def test_every_shape_pattern_and_colour_occurs(gen):
    seen = {"shape": set(), "pattern": set(), "color": set()}
    for _ in range(150):
        for p in assets.make_asset(gen, 64).parts:
            for k in seen:
                seen[k].add(p[k])
    assert seen["shape"] == set(assets.SHAPES)
    assert seen["pattern"] == set(assets.PATTERNS)
    assert seen["color"] == set(assets.PALETTE)


def test_caption_names_every_part(gen):
    for _ in range(30):
        a = assets.make_asset(gen, 64)
        for p in a.parts:
            assert p["color"] in a.caption
            assert assets._SHAPE_WORDS.get(p["shape"], p["shape"]) in a.caption
        assert a.caption.startswith(("a ", "an "))
        joins = a.caption.count(" on ") + a.caption.count(" next to ")
        assert joins == len(a.parts) - 1, a.caption


def test_caption_example():
    parts = [{"shape": "box", "color": "blue", "pattern": "solid", "second_color": "red"},
             {"shape": "cylinder", "color": "red", "pattern": "striped", "second_color": "white"}]
    assert assets.caption(parts, "on") == "a red and white striped cylinder on a blue box"


@pytest.mark.parametrize("kwargs, match", [(dict(n_gaussians=3), "n_gaussians must be >= 16; got 3"),
                                           (dict(max_parts=4), "max_parts must be in 1..3; got 4")])
def test_bad_arguments(gen, kwargs, match):
    with pytest.raises(ValueError, match=match):
        assets.make_asset(gen, **kwargs)
