"""fast3d.models.lgm: the LGM Gaussian reconstruction model, its camera normalisation, rendering,
save/load and configs. Tiny random-weight models on the CPU (no pretrained weights here)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fast3d import cameras
from fast3d.cameras import rotmat_to_quat
from fast3d.models import checkpoints
from fast3d.models.lgm import (
    LGM,
    CrossViewAttention,
    LGMConfig,
    apply_transform_to_gaussians,
    apply_transform_to_viewmats,
    canonical_viewmat,
    lora_target_modules,
    normalize_cameras,
)
from fast3d.models.lgm.model import pixel_anchors
from fast3d.ops.rasterization.reference import quat_to_rotmat

TINY = LGMConfig.preset("tiny")
# A deeper asymmetric net (4 down levels, 3 up blocks, attention at the 2 lowest levels, two layers
# per block): the skip bookkeeping of the big model at a size the CPU runs in milliseconds.
DEEP = dataclasses.replace(TINY, input_size=32, splat_size=16, down_channels=(8, 8, 16, 16), up_channels=(16, 16, 8),
                           layers_per_block=2, attention_levels=2, attention_heads=2)


def _model(cfg: LGMConfig, seed: int) -> LGM:
    torch.manual_seed(seed)
    return LGM(cfg).eval()


def _random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:  # -> [n, 3, 3] float64, det +1
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.linalg.det(q)[:, None, None]


def _random_rigid(n: int, gen: torch.Generator) -> torch.Tensor:  # -> [n, 4, 4] float64
    m = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    m[:, :3, :3] = _random_rotations(n, gen)
    m[:, :3, 3] = torch.randn(n, 3, generator=gen, dtype=torch.float64) * 2
    return m


def _inputs(cfg: LGMConfig, B: int, gen: torch.Generator):
    """Images in [0, 1] and normalised cameras of random 4-view rigs around the unit box."""
    rigs = [cameras.random_sphere(gen, cfg.num_input_views, cfg.input_size, distance_range=(2.0, 2.4))
            for _ in range(B)]
    viewmats, _ = normalize_cameras(torch.stack([r.viewmats for r in rigs]), cfg.camera_distance)
    Ks = torch.stack([r.Ks for r in rigs])
    images = torch.rand(B, cfg.num_input_views, 3, cfg.input_size, cfg.input_size, generator=gen)
    return images, viewmats, Ks


@pytest.mark.parametrize("cfg", [TINY, DEEP], ids=["tiny", "deep"])
def test_forward_shapes_and_value_ranges(cfg, seed, gen):
    B = 2
    images, viewmats, Ks = _inputs(cfg, B, gen)
    with torch.no_grad():
        g = _model(cfg, seed)(images, viewmats, Ks)
    N = cfg.num_input_views * cfg.splat_size ** 2
    assert N == cfg.num_gaussians
    shapes = {k: tuple(v.shape) for k, v in g.items()}
    assert shapes == dict(means=(B, N, 3), quats=(B, N, 4), scales=(B, N, 3), opacities=(B, N), colors=(B, N, 3))
    for k, v in g.items():
        assert torch.isfinite(v).all(), k
    # Each mean is its pixel's anchor plus an offset in [-1, 1]; an anchor, the point of its ray
    # closest to the centre, is within the camera's distance x the tangent of the half-diagonal field
    # of view of the centre (~1.4 for 49.1 degrees at 2.2; the rig's cameras are at 2.0-2.4).
    anchors = pixel_anchors(viewmats, Ks, cfg.input_size, cfg.splat_size)
    assert (g["means"] - anchors).abs().max() <= 1.0 + 1e-6
    centres = -(viewmats[..., :3, :3].transpose(-1, -2) @ viewmats[..., :3, 3:])[..., 0]     # [B, V, 3]
    reach = centres.norm(dim=-1) * math.sqrt(2) * math.tan(math.radians(cameras.DEFAULT_FOV_Y_DEG) / 2)
    per_view = anchors.reshape(B, cfg.num_input_views, -1, 3).norm(dim=-1)                 # [B, V, p * p]
    assert (per_view <= reach[..., None] * 1.001).all()
    assert_close(g["quats"].norm(dim=-1), torch.ones(B, N), atol=1e-5, rtol=0, name="|quat|")
    assert (g["scales"] > 0).all()
    assert ((g["opacities"] > 0) & (g["opacities"] < 1)).all()
    assert ((g["colors"] >= 0) & (g["colors"] <= 1)).all()
    assert g["means"].std(dim=1).min() > 1e-4   # the Gaussians are not all at one point


def test_gradients_reach_every_parameter_through_render(seed, gen):
    model = _model(TINY, seed).train()
    images, viewmats, Ks = _inputs(TINY, 1, gen)
    Ks_render = Ks / 2
    Ks_render[..., 2, 2] = 1
    rendered, alphas = model.render(model(images, viewmats, Ks), viewmats, Ks_render, 32, 32)
    assert rendered.shape == (1, 4, 3, 32, 32) and alphas.shape == (1, 4, 1, 32, 32)
    target = F.interpolate(images.flatten(0, 1), size=32, mode="area").unflatten(0, (1, 4))
    F.mse_loss(rendered, target).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().max() > 0, f"{name}: zero gradient"


def test_activation_checkpointing_gives_the_same_gradients(seed, gen):
    images, viewmats, Ks = _inputs(DEEP, 1, gen)
    grads = []
    for flag in (False, True):
        model = _model(dataclasses.replace(DEEP, activation_checkpointing=flag), seed).train()
        g = model(images, viewmats, Ks)
        (g["means"].sum() + g["colors"].square().sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-5, name=name)


def _drop_attention(model: LGM) -> None:
    for module in model.modules():
        if getattr(module, "attn", None) is not None:
            module.attn = None


def test_cross_view_attention_mixes_views(seed, gen):
    model = _model(TINY, seed)
    images, viewmats, Ks = _inputs(TINY, 1, gen)
    perturbed = images.clone()
    perturbed[:, 2] = torch.rand(perturbed[:, 2].shape, generator=gen)
    P = TINY.splat_size ** 2

    def per_view_means(m, imgs):  # [V, P, 3]: Gaussians ordered by view
        with torch.no_grad():
            return m(imgs, viewmats, Ks)["means"][0].unflatten(0, (TINY.num_input_views, P))

    before, after = per_view_means(model, images), per_view_means(model, perturbed)
    assert (after[0] - before[0]).abs().max() > 1e-4, "view 2's image does not reach view 0's Gaussians"
    _drop_attention(model)   # the rest of the net is per view: GroupNorm and convs see one view at a time
    before, after = per_view_means(model, images), per_view_means(model, perturbed)
    for v in (0, 1, 3):
        assert_close(after[v], before[v], atol=1e-6, rtol=0, name=f"view {v} without attention")
    assert (after[2] - before[2]).abs().max() > 1e-4


def test_attention_backend_argument_reaches_every_cross_view_attention(seed, gen):
    images, viewmats, Ks = _inputs(DEEP, 1, gen)
    torch.manual_seed(seed)
    model = LGM(DEEP, attention_backend="torch").eval()
    layers = [m for m in model.modules() if isinstance(m, CrossViewAttention)]
    assert len(layers) > 1 and all(m.backend == "torch" for m in layers) and model.attention_backend == "torch"
    model.set_attention_backend("no-such-backend")   # the op, called with it, names the bad backend
    with pytest.raises(ValueError, match="multiview_attention: backend must be .*'no-such-backend'"), torch.no_grad():
        model(images, viewmats, Ks)
    with pytest.raises(ValueError, match="attention_backend must be a backend name"):
        LGM(TINY, attention_backend=None)


def test_cross_view_attention_equals_sdpa_on_rearranged_tokens(gen):
    B, V, C, heads, h, w = 2, 3, 16, 2, 3, 5
    attn = CrossViewAttention(C, heads, groups=4, num_views=V)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.4 if p.dim() > 1 else 0.2) + (p.dim() == 1) * 0.5)
    x = torch.randn(B * V, C, h, w, generator=gen)                         # [B*V, C, h, w]
    with torch.no_grad():
        out = attn(x)

        def reference(groups: int):  # tokens of `groups` consecutive views attend to each other
            t = F.group_norm(x, 4, attn.norm.weight, attn.norm.bias, eps=attn.norm.eps)
            t = t.flatten(2).transpose(1, 2).reshape(B * V // groups, groups * h * w, C)   # [G, (views L), C]
            q, k, v = (F.linear(t, p.weight).unflatten(-1, (heads, C // heads)).transpose(1, 2)
                       for p in (attn.to_q, attn.to_k, attn.to_v))                      # [G, H, views L, Dh]
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            o = attn.to_out(o).reshape(B * V, h * w, C).transpose(1, 2).reshape(B * V, C, h, w)
            return (o + x) * math.sqrt(0.5)

        expected, per_view = reference(V), reference(1)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, name="cross-view attention")
    # The check can tell: attention within each view alone is far from it.
    assert (per_view - expected).abs().max() > 1e-2


def test_normalize_cameras_canonical_and_invariant_to_world_motion(gen):
    B, V = 3, 5
    viewmats = torch.stack([cameras.random_sphere(gen, V, 32, distance_range=(1.5, 3.0)).viewmats.double()
                            for _ in range(B)])
    moved = viewmats @ torch.linalg.inv(_random_rigid(B, gen))[:, None]     # the same rigs in another world
    normalized, transform = normalize_cameras(viewmats)
    normalized_moved, _ = normalize_cameras(moved)
    canonical = canonical_viewmat().expand(B, 4, 4)
    assert_close(normalized[:, 0], canonical, atol=1e-10, rtol=0, name="first camera")
    assert_close(normalized_moved[:, 0], canonical, atol=1e-10, rtol=0, name="first camera (moved world)")
    assert_close(normalized_moved, normalized, atol=1e-10, rtol=0, name="normalised cameras after a world motion")
    relative = viewmats @ torch.linalg.inv(viewmats[:, :1])
    assert_close(normalized @ torch.linalg.inv(normalized[:, :1]), relative, atol=1e-10, rtol=0, name="relative poses")
    assert_close(apply_transform_to_viewmats(viewmats, transform), normalized, atol=1e-10, rtol=0, name="same map")
    # canonical pose: on +X at the distance, looking at the origin, upright
    assert_close(cameras.camera_centers(canonical[0]), torch.tensor([2.2, 0, 0], dtype=torch.float64),
                 atol=1e-12, rtol=0, name="canonical centre")
    # cameras looking at the object's centre from the configured distance keep it at the origin
    rig = cameras.mvdream(32, elevation_deg=25.0, azimuth_offset_deg=70.0)
    _, T = normalize_cameras(rig.viewmats[None].double(), cameras.DEFAULT_DISTANCE)
    assert_close(T[0, :3, 3], torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0, name="origin stays")


def test_rigid_transform_of_gaussians_rotates_covariances(gen):
    R = _random_rotations(64, gen)
    R[0] = torch.diag(torch.tensor([1.0, -1, -1], dtype=torch.float64))      # 180 deg turns: w = 0
    R[1] = torch.diag(torch.tensor([-1.0, -1, 1], dtype=torch.float64))
    assert_close(quat_to_rotmat(rotmat_to_quat(R)), R, atol=1e-12, rtol=0, name="rotmat -> quat -> rotmat")
    T = _random_rigid(2, gen)
    g = dict(means=torch.randn(2, 7, 3, generator=gen, dtype=torch.float64),
             quats=torch.randn(2, 7, 4, generator=gen, dtype=torch.float64), scales=torch.rand(2, 7, 3))
    out = apply_transform_to_gaussians(g, T)
    expected_means = (T[:, None, :3, :3] @ g["means"][..., None])[..., 0] + T[:, None, :3, 3]
    assert_close(out["means"], expected_means, atol=1e-12, rtol=0, name="means")
    assert_close(quat_to_rotmat(out["quats"]), T[:, None, :3, :3] @ quat_to_rotmat(g["quats"]), atol=1e-12, rtol=0,
                 name="rotations")
    assert out["scales"] is g["scales"]


def test_render_in_asset_world_equals_render_in_normalised_world(gen):
    B, N, C, size = 2, 300, 3, 48
    g = dict(means=(torch.rand(B, N, 3, generator=gen) - 0.5) * 0.8,
             quats=torch.randn(B, N, 4, generator=gen),
             scales=torch.rand(B, N, 3, generator=gen) * torch.tensor([0.08, 0.02, 0.005]) + 0.005,  # anisotropic
             opacities=torch.rand(B, N, generator=gen) * 0.5 + 0.5, colors=torch.rand(B, N, 3, generator=gen))
    rigs = [cameras.random_sphere(gen, C, size, distance_range=(2.0, 2.4)) for _ in range(B)]
    world_motion = _random_rigid(B, gen)
    viewmats = (torch.stack([r.viewmats for r in rigs]).double() @ torch.linalg.inv(world_motion)[:, None]).float()
    Ks = torch.stack([r.Ks for r in rigs])
    normalized, transform = normalize_cameras(viewmats)
    expected, alpha = LGM.render(g, normalized, Ks, size, size)
    assert alpha.mean() > 0.05, "the Gaussians barely cover the images: the comparison would be vacuous"
    back = apply_transform_to_gaussians(g, torch.linalg.inv(transform.double()))
    actual, _ = LGM.render(back, viewmats, Ks, size, size)
    assert_close(actual, expected, atol=2e-4, rtol=0, name="renders")
    unrotated, _ = LGM.render({**back, "quats": g["quats"]}, viewmats, Ks, size, size)
    assert (unrotated - expected).abs().max() > 0.05, "the quaternions' rotation does not show in the renders"


def test_save_load_roundtrip_gives_identical_outputs(tmp_path, seed, gen):
    model = _model(TINY, seed)
    inputs = _inputs(TINY, 1, gen)
    model.save_pretrained(str(tmp_path))
    loaded = LGM.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == TINY
    with torch.no_grad():
        expected, actual = model(*inputs), loaded(*inputs)
        other = _model(TINY, seed + 1)(*inputs)
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k
    assert not torch.equal(other["means"], expected["means"])   # outputs do depend on the weights


def test_loading_another_models_checkpoint_fails_clearly(tmp_path):
    checkpoints.save_pretrained(str(tmp_path), "lrm", TINY, {})
    with pytest.raises(ValueError, match="'lrm' model, not 'lgm'"):
        LGM.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="config.yaml"):
        LGM.from_pretrained(str(tmp_path / "missing"))


def _bad_inputs(case: str):
    images = torch.rand(1, 4, 3, 64, 64)
    viewmats = cameras.mvdream(64).viewmats[None]
    Ks = cameras.mvdream(64).Ks[None]
    if case == "size":
        images = torch.rand(1, 4, 3, 32, 32)
    elif case == "channels":
        images = torch.rand(1, 4, 4, 64, 64)
    elif case == "fewer-views":
        images, viewmats, Ks = images[:, :3], viewmats[:, :3], Ks[:, :3]
    elif case == "viewmats":
        viewmats = viewmats[:, :3]
    elif case == "Ks":
        Ks = Ks.expand(2, 4, 3, 3)
    return images, viewmats, Ks


@pytest.mark.parametrize("case, match", [("size", "images must be 64 x 64.*got 32 x 32"), ("channels", "images"),
                                         ("fewer-views", "images has fewer views than the model needs.*V = 3"),
                                         ("viewmats", r"viewmats must have shape \[B, V, 4, 4\]"), ("Ks", "Ks")])
def test_bad_model_inputs_raise_value_error_naming_them(case, match):
    model = LGM(TINY)
    with pytest.raises(ValueError, match=match):
        model(*_bad_inputs(case))


def test_bad_camera_and_gaussian_inputs_raise_value_error():
    viewmats = cameras.mvdream(32).viewmats[None]
    with pytest.raises(ValueError, match="viewmats must hold rigid transforms"):
        normalize_cameras(viewmats * 2)
    with pytest.raises(ValueError, match="viewmats"):
        normalize_cameras(viewmats[0])
    with pytest.raises(ValueError, match="transform"):
        apply_transform_to_gaussians(dict(means=torch.zeros(1, 5, 3), quats=torch.zeros(1, 5, 4)), torch.eye(4))
    with pytest.raises(ValueError, match="gaussians must have the keys.*'opacities'"):
        LGM.render(dict(means=torch.zeros(1, 5, 3)), viewmats, cameras.mvdream(32).Ks[None], 32, 32)


def test_presets_and_config_validation():
    big = LGMConfig.preset("big")
    assert (big.input_size, big.splat_size, big.render_size, big.num_sup_views) == (256, 128, 512, 8)
    assert big.num_gaussians == 65_536 and big == LGMConfig()
    assert (TINY.input_size, TINY.splat_size, TINY.render_size, TINY.num_gaussians) == (64, 32, 64, 4096)
    with torch.device("meta"):   # structure only: no memory, no initialisation
        n_big = sum(p.numel() for p in LGM(big).parameters())
    n_tiny = sum(p.numel() for p in LGM(TINY).parameters())
    assert 400e6 < n_big < 430e6, n_big    # LGM's ~415 M
    assert 0.3e6 < n_tiny < 1e6, n_tiny
    for changes, match in [(dict(splat_size=64), "splat_size must be .* = 32"),
                           (dict(attention_heads=3), "attention_heads=3 must divide"),
                           (dict(up_channels=(64, 32, 16, 16)), "up_channels must have at most"),
                           (dict(down_channels=(16, 30, 64)), "down_channels must be multiples of norm_groups"),
                           (dict(input_size=66, splat_size=33), "input_size must be a multiple of"),
                           (dict(attention_levels=4), "attention_levels must be an integer in"),
                           (dict(camera_distance=-1.0), "camera_distance"),
                           (dict(activation_checkpointing=1), "activation_checkpointing")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(TINY, **changes)
    with pytest.raises(ValueError, match="preset name must be one of"):
        LGMConfig.preset("huge")


def test_lora_targets_are_the_attention_projections():
    model = LGM(TINY)
    names = lora_target_modules(model)
    modules = dict(model.named_modules())
    attention = [n for n, m in modules.items() if isinstance(m, CrossViewAttention)]
    assert len(attention) == 4 and len(names) == 4 * len(attention)
    assert {n.rsplit(".", 1)[1] for n in names} == {"to_q", "to_k", "to_v", "to_out"}
    assert all(isinstance(modules[n], torch.nn.Linear) for n in names)


def test_gaussians_start_pixel_aligned(gen):
    """With zero position offsets, each view's Gaussians sit on their own pixels' rays."""
    from fast3d.models.lgm.model import pixel_anchors

    rig = cameras.orbit16(gen, resolution=TINY.input_size)
    vm, K = rig.viewmats[None, :4], rig.Ks[None, :4]
    p = TINY.splat_size
    a = pixel_anchors(vm, K, TINY.input_size, p).unflatten(1, (4, p, p))        # [1, 4, p, p, 3]
    cam = torch.einsum("vij,vhwj->vhwi", vm[0, :, :3, :3], a[0]) + vm[0, :, None, None, :3, 3]
    Ks = K[0].clone()
    Ks[:, :2] *= p / TINY.input_size
    uv = torch.einsum("vij,vhwj->vhwi", Ks, cam)
    uv = uv[..., :2] / uv[..., 2:]
    v, u = torch.meshgrid(torch.arange(p) + 0.5, torch.arange(p) + 0.5, indexing="ij")
    assert_close(uv, torch.stack([u, v], -1).expand_as(uv), atol=1e-3, rtol=0, name="anchor pixel")
    assert_close((a[0] * (a[0] - cameras.camera_centers(vm[0])[:, None, None])).sum(-1), torch.zeros(4, p, p),
                 atol=1e-5, rtol=0, name="anchor is the ray's closest point to the origin")
