"""fast3d.rasterization as a drop-in for gsplat 1.5.3's rasterization.

* gsplat's own per-scene optimisation loop: ``gsplat.strategy.DefaultStrategy`` densifying and
  pruning around ``fast3d.rasterization`` called with the keyword arguments gsplat's
  ``examples/simple_trainer.py`` passes, packed and not, absgrad and not: the loss falls, Gaussians
  are duplicated, split and pruned, and every decision (each mask the strategy hands to
  duplicate / split / remove) is the one it makes when the same loop runs on fast3d's reference
  backend.
* The signature: every gsplat parameter, in gsplat's order; unsupported values refused with a
  ValueError naming the parameter, the value and what is supported.
* meta: gsplat's keys and shapes, packed and not; ``meta["means2d"]`` on the autograd path in
  every backend (``.grad`` after ``retain_grad()``, ``.absgrad``), equal to the reference's.
* covars (vs the same Gaussians as quats/scales), the orthographic camera (vs gsplat's PyTorch
  projection), radius_clip, channel_chunk, per-camera SH, sparse_grad.
* Validation of the new arguments.
"""

from __future__ import annotations

import copy
import inspect
import math

import gsplat
import pytest
import torch
import torch.nn.functional as F
from gsplat.strategy import DefaultStrategy
from helpers import assert_close, random_like
from test_rasterization import make_scene, require

from fast3d.ops.rasterization import rasterization, reference

OP = "rasterization"
NATIVE = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]

# (atol, rtol) of a backend against the float64 reference, by dtype; the reasons are those of
# test_rasterization.TOL (same kernels); atol is relative to the largest reference element.
TOL = {torch.float64: (1e-9, 1e-8), torch.float32: (2e-4, 1e-3)}


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "cuda" else torch.float64


# --- gsplat's per-scene loop with DefaultStrategy ---------------------------------------------------

W, H, N_TRUE, N_INIT, STEPS = 32, 24, 60, 40, 31


def _gt_scene(gen: torch.Generator):
    """Target images: a random scene (colours as degree-1 SH) rendered by the reference from 3
    orbit cameras; camtoworlds [3, 4, 4] and Ks [3, 3, 3] as a dataset holds them."""
    x = make_scene(gen, 1, 3, N_TRUE, W, H, sh_degree=1, odd=False)
    viewmats, Ks = x["viewmats"][0].float(), x["Ks"][0].float()
    with torch.no_grad():
        images, _, _ = rasterization(x["means"][0].float(), x["quats"][0].float(), x["scales"][0].float(),
                                     x["opacities"][0].float(), x["colors"][0].float(), viewmats, Ks, W, H,
                                     sh_degree=1, backend="torch")
    return torch.linalg.inv(viewmats), Ks, images                              # [3, H, W, 3]


def _splats(gen: torch.Generator) -> dict:
    """The trainer's parameterisation: log scales, logit opacities, SH split in sh0 / shN; some
    Gaussians start nearly transparent (pruned), some small (duplicated), most large (split)."""
    means = (torch.rand(N_INIT, 3, generator=gen) - 0.5) * 1.2
    scales = 0.08 * (0.6 + 0.8 * torch.rand(N_INIT, 3, generator=gen))       # anisotropic: quats matter
    scales[: N_INIT // 3] = 0.03 * (0.6 + 0.8 * torch.rand(N_INIT // 3, 3, generator=gen))
    opac = 0.1 + 0.5 * torch.rand(N_INIT, generator=gen)
    opac[N_INIT // 3: N_INIT // 3 + 6] = 0.002
    return dict(means=means, scales=scales.log(), quats=torch.randn(N_INIT, 4, generator=gen),
                opacities=torch.logit(opac), sh0=torch.randn(N_INIT, 1, 3, generator=gen) * 0.3,
                shN=torch.zeros(N_INIT, 3, 3))


def _render(splats, backend: str, packed: bool, absgrad: bool, camtoworld, K, step: int):
    """The trainer's rasterize_splats + rasterization call, keyword for keyword (backend= added)."""
    colors = torch.cat([splats["sh0"], splats["shN"]], 1)                      # [N, 4, 3]
    return rasterization(
        means=splats["means"], quats=splats["quats"], scales=torch.exp(splats["scales"]),
        opacities=torch.sigmoid(splats["opacities"]), colors=colors, viewmats=torch.linalg.inv(camtoworld),
        Ks=K, width=W, height=H, packed=packed, absgrad=absgrad, sparse_grad=False, rasterize_mode="classic",
        distributed=False, camera_model="pinhole", with_ut=False, with_eval3d=False, ftheta_coeffs=None,
        radial_coeffs=None, tangential_coeffs=None, thin_prism_coeffs=None, sh_degree=min(step // 10, 1),
        near_plane=0.01, far_plane=1e10, render_mode="RGB", backend=backend)


def _fit(packed: bool, absgrad: bool, init: dict, cams, monkeypatch) -> tuple[list, list, list]:
    """gsplat's simple_trainer loop (batch size 1, cameras in turn, L1 loss, Adam per parameter,
    DefaultStrategy around each step) on fast3d's cpu backend, with a twin strategy fed by the
    reference backend in lock step: at every step the reference renders the same parameters, its
    strategy state is updated from its own meta and backward, and its strategy refines a copy of
    the parameters and optimizers (so float32 differences between the backends cannot accumulate
    through the optimisation). Returns the losses and the two strategies' decisions [(op, step,
    mask)] (cpu, reference)."""
    import gsplat.strategy.ops as strategy_ops
    from gsplat.strategy import default

    camtoworlds, Ks, images = cams
    lrs = dict(means=1e-2, scales=3e-2, quats=1e-2, opacities=5e-2, sh0=3e-2, shN=3e-2 / 20)
    splats = torch.nn.ParameterDict({k: torch.nn.Parameter(v.clone()) for k, v in init.items()})
    optimizers = {k: torch.optim.Adam([{"params": splats[k], "lr": lr, "name": k}], eps=1e-15)
                  for k, lr in lrs.items()}
    # Thresholds for this small, short fit (the trainer's are for 30k steps): about half the Gaussians
    # grow at each refinement; the small ones (scale 0.03 <= grow_scale3d) duplicate, the others split.
    strategy = DefaultStrategy(refine_start_iter=5, refine_every=10, refine_stop_iter=STEPS, reset_every=1000,
                               grow_scale3d=0.05, grow_grad2d=5e-3 if not absgrad else 1.3e-2, prune_opa=0.005,
                               absgrad=absgrad)
    strategy.check_sanity(splats, optimizers)
    states = {be: strategy.initialize_state(scene_scale=1.0) for be in ("cpu", "torch")}
    decisions = {"cpu": [], "torch": []}
    log = decisions["cpu"]
    for op in ("duplicate", "split", "remove"):
        real = getattr(strategy_ops, op)

        def record(*a, _real=real, _op=op, **kw):
            log.append((_op, step, kw["mask"].clone()))
            return _real(*a, **kw)
        monkeypatch.setattr(default, op, record)
    losses = []
    for step in range(STEPS):
        i = step % len(Ks)
        # the reference, on the same parameters: its meta, loss and backward feed its own strategy state
        renders, _, info_ref = _render(splats, "torch", packed, absgrad, camtoworlds[i:i + 1], Ks[i:i + 1], step)
        strategy.step_pre_backward(params=splats, optimizers=optimizers, state=states["torch"], step=step,
                                   info=info_ref)
        F.l1_loss(renders, images[i:i + 1]).backward()
        ref_grads = {k: p.grad.clone() for k, p in splats.items()}
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        # the trainer's step on the cpu backend
        renders, alphas, info = _render(splats, "cpu", packed, absgrad, camtoworlds[i:i + 1], Ks[i:i + 1], step)
        strategy.step_pre_backward(params=splats, optimizers=optimizers, state=states["cpu"], step=step, info=info)
        loss = F.l1_loss(renders, images[i:i + 1])
        loss.backward()
        losses.append(loss.item())
        for k, p in splats.items():
            assert_close(p.grad, ref_grads[k], atol=2e-4 * ref_grads[k].abs().max().item(), rtol=1e-3,
                         name=f"step {step}: grad {k}")
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        twin = copy.deepcopy((splats, optimizers))  # what the reference's strategy refines
        log = decisions["cpu"]
        strategy.step_post_backward(params=splats, optimizers=optimizers, state=states["cpu"], step=step, info=info,
                                    packed=packed)
        log = decisions["torch"]
        strategy.step_post_backward(params=twin[0], optimizers=twin[1], state=states["torch"], step=step,
                                    info=info_ref, packed=packed)
        for key in ("grad2d", "count"):
            assert_close(states["cpu"][key], states["torch"][key], atol=1e-6, rtol=1e-4, name=f"step {step}: {key}")
    return losses, decisions["cpu"], decisions["torch"]


@pytest.mark.slow
@pytest.mark.parametrize("packed, absgrad", [(False, False), (True, True)], ids=["dense", "packed-absgrad"])
def test_default_strategy_fit(packed, absgrad, gen, monkeypatch):
    require("cpu")
    losses, decisions, ref_decisions = _fit(packed, absgrad, _splats(gen), _gt_scene(gen), monkeypatch)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3  # one pass over the 3 cameras each
    assert last < 0.8 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    grown = sum(int(m.sum()) for op, _, m in decisions if op in ("duplicate", "split"))
    pruned = sum(int(m.sum()) for op, _, m in decisions if op == "remove")
    assert grown > 0 and pruned > 0, f"strategy grew {grown} and pruned {pruned} Gaussians"
    assert [(op, s) for op, s, _ in decisions] == [(op, s) for op, s, _ in ref_decisions]
    for (op, s, m), (_, _, m_ref) in zip(decisions, ref_decisions):
        assert torch.equal(m, m_ref), f"{op} at step {s}: {int((m != m_ref).sum())} decisions differ"


# --- signature and refusals -------------------------------------------------------------------------


def test_every_gsplat_parameter_in_gsplat_order():
    ours = list(inspect.signature(rasterization).parameters)
    theirs = list(inspect.signature(gsplat.rasterization).parameters)
    assert gsplat.__version__ == "1.5.3"
    assert ours[:len(theirs)] == theirs
    for name in ("deterministic", "backend", "capacity"):  # fast3d's own, keyword only
        assert inspect.signature(rasterization).parameters[name].kind is inspect.Parameter.KEYWORD_ONLY


def _small(gen, **kw):
    x = make_scene(gen, 1, 2, 9, 12, 10, odd=False, background=False, **kw)
    return {k: v[0].float() if isinstance(v, torch.Tensor) else v for k, v in x.items()}


def _call(x, **kw):
    a = dict(means=x["means"], quats=x["quats"], scales=x["scales"], opacities=x["opacities"], colors=x["colors"],
             viewmats=x["viewmats"], Ks=x["Ks"], width=x["width"], height=x["height"], sh_degree=x["sh_degree"])
    a.update(kw)
    return rasterization(**a)


REFUSED = {  # keyword arguments gsplat accepts and fast3d does not implement -> message
    "distributed": (dict(distributed=True), r"distributed=True \(multi-GPU rendering\) is not supported; "
                                            r"supported: False"),
    "with_ut": (dict(with_ut=True), r"with_ut=True is not supported; supported: False"),
    "with_eval3d": (dict(with_eval3d=True), r"with_eval3d=True is not supported; supported: False"),
    "fisheye": (dict(camera_model="fisheye"), r"camera_model='fisheye' is not supported; supported: "
                                              r"\('pinhole', 'ortho'\)"),
    "ftheta": (dict(camera_model="ftheta"), r"camera_model='ftheta' is not supported"),
    "tile_size": (dict(tile_size=8), r"tile_size=8 is not supported; supported: 16"),
    "radial": (dict(radial_coeffs=torch.zeros(2, 6)), r"radial_coeffs is not supported .*supported: None; "
                                                      r"got a tensor of shape \(2, 6\)"),
    "tangential": (dict(tangential_coeffs=torch.zeros(2, 2)), r"tangential_coeffs is not supported"),
    "thin_prism": (dict(thin_prism_coeffs=torch.zeros(2, 4)), r"thin_prism_coeffs is not supported"),
    "ftheta_coeffs": (dict(ftheta_coeffs=object()), r"ftheta_coeffs is not supported"),
    "viewmats_rs": (dict(viewmats_rs=torch.eye(4).expand(2, 4, 4)), r"viewmats_rs is not supported"),
    "rolling_shutter": (dict(rolling_shutter="ROLLING_TOP_TO_BOTTOM"),
                        r"rolling_shutter='ROLLING_TOP_TO_BOTTOM' is not supported; supported: global shutter"),
    "sparse_grad-dense": (dict(sparse_grad=True), r"sparse_grad=True needs packed=True"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_values_are_refused(case, gen):
    kw, pattern = REFUSED[case]
    with pytest.raises(ValueError, match=pattern):
        _call(_small(gen), **kw)


def test_gsplat_defaults_and_enums_are_accepted(gen):
    from gsplat.cuda._wrapper import RollingShutterType

    x = _small(gen)
    base = _call(x, backend="cpu")
    same = _call(x, backend="cpu", rolling_shutter=RollingShutterType.GLOBAL, segmented=True, tile_size=16,
                 radius_clip=0.0, distributed=False, with_ut=False, with_eval3d=False)
    assert torch.equal(base[0], same[0]) and torch.equal(base[1], same[1])
    with pytest.raises(ValueError, match=r"rolling_shutter=<RollingShutterType.ROLLING_LEFT_TO_RIGHT: 1> is not"):
        _call(x, rolling_shutter=RollingShutterType.ROLLING_LEFT_TO_RIGHT)


# --- meta -------------------------------------------------------------------------------------------

GSPLAT_KEYS = {"batch_ids", "camera_ids", "gaussian_ids", "radii", "means2d", "depths", "conics", "opacities",
               "tile_width", "tile_height", "tiles_per_gauss", "width", "height", "tile_size", "n_batches",
               "n_cameras"}


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_meta_keys_and_shapes(packed, gen):
    x = make_scene(gen, 1, 3, 40, 33, 21, odd=True)
    x = {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    _, _, meta = _call(x, packed=packed, far_plane=100.0, backend="cpu")
    assert GSPLAT_KEYS <= set(meta)
    _, _, dense = _call(x, far_plane=100.0, backend="cpu")
    C, N = 3, 40
    assert (meta["width"], meta["height"], meta["n_cameras"], meta["n_batches"], meta["tile_size"]) == (33, 21, C, 1, 16)
    assert (meta["tile_width"], meta["tile_height"]) == (3, 2)
    vis = (dense["radii"] > 0).all(-1)                                        # [C, N]
    assert 0 < int(vis.sum()) < C * N                                         # some culled: a real test of packing
    if not packed:
        assert meta["gaussian_ids"] is None and meta["camera_ids"] is None and meta["batch_ids"] is None
        for key, shape in (("radii", (C, N, 2)), ("means2d", (C, N, 2)), ("depths", (C, N)), ("conics", (C, N, 3)),
                           ("opacities", (C, N)), ("tiles_per_gauss", (C, N))):
            assert meta[key].shape == shape, key
        assert meta["radii"].dtype == torch.int32
        return
    c_ids, g_ids = vis.nonzero(as_tuple=True)
    nnz = len(g_ids)
    assert torch.equal(meta["camera_ids"], c_ids) and torch.equal(meta["gaussian_ids"], g_ids)
    assert torch.equal(meta["batch_ids"], torch.zeros_like(g_ids))
    for key in ("radii", "means2d", "depths", "conics", "opacities", "tiles_per_gauss", "colors"):
        assert meta[key].shape[0] == nnz, key
        assert torch.equal(meta[key], dense[key][c_ids, g_ids]), key
    assert (meta["radii"] > 0).all()


def _means2d_grads(x: dict, backend: str, dtype, gen_seed: int, **kw):
    """(render, d loss / d means2d, absgrad, d loss / d means) for a fixed random upstream gradient."""
    leaves = {k: x[k].to(dtype).requires_grad_() for k in ("means", "quats", "scales", "opacities", "colors")}
    out, alpha, meta = _call(dict(x, **leaves), viewmats=x["viewmats"].to(dtype), Ks=x["Ks"].to(dtype),
                             far_plane=100.0, backend=backend, absgrad=True, **kw)
    meta["means2d"].retain_grad()
    g = torch.Generator().manual_seed(gen_seed)
    (out * random_like(out, g)).sum().add((alpha * random_like(alpha, g)).sum()).backward()
    return out, meta["means2d"].grad, meta["means2d"].absgrad, leaves["means"].grad, meta


@pytest.mark.parametrize("camera_model", ["pinhole", "ortho"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend", NATIVE)
def test_means2d_grad_on_the_autograd_path(backend, packed, camera_model, gen):
    """meta["means2d"].grad (retain_grad) and .absgrad equal the reference's, per camera; with a
    batch dim, channel chunks (D = 5 in chunks of 2) and both camera models (the native
    projection kernels implement both) on top."""
    require(backend)
    x = make_scene(gen, 2, 3, 37, 29, 23, odd=True, D=5, per_camera=True, background=False)
    if camera_model == "ortho":  # ~14 px per world unit: the cube of Gaussians fills the image
        x["Ks"] = x["Ks"].clone()
        x["Ks"][..., 0, 0] = x["Ks"][..., 1, 1] = 14.0
    x = {k: v.to(_device(backend)) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    dtype = _dtype(backend)
    atol, rtol = TOL[dtype]
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    kw = dict(packed=packed, channel_chunk=2, camera_model=camera_model)
    ref = _means2d_grads(x, "torch", torch.float64, seed, **kw)
    got = _means2d_grads(x, backend, dtype, seed, **kw)
    assert ref[1].abs().sum() > 0 and ref[2].abs().sum() > 0
    assert got[1].shape == ((2, 3, 37, 2) if not packed else (len(ref[4]["gaussian_ids"]), 2))
    for name, a, b in zip(("render", "means2d.grad", "means2d.absgrad", "means.grad"), got[:4], ref[:4]):
        assert_close(a, b, atol=atol * (b.abs().max().item() + 1e-30), rtol=rtol, name=f"{backend} {name}")


# --- covars, ortho, radius_clip, channel_chunk, per-camera SH, sparse_grad --------------------------

def _one(gen, C=2, N=30, W=27, H=21, **kw) -> dict:
    x = make_scene(gen, 1, C, N, W, H, odd=False, **kw)
    return {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in x.items()}


def _grads(fn, leaves: dict, gen_seed: int):
    """Render with fn(**leaves) and backprop a fixed random upstream gradient: (render, alpha, grads)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    out, alpha, meta = fn(**leaves)
    g = torch.Generator().manual_seed(gen_seed)
    ((out * random_like(out, g)).sum() + (alpha * random_like(alpha, g)).sum()).backward()
    return out, alpha, {k: v.grad for k, v in leaves.items()}


def test_covars_equal_quats_and_scales(gen):
    """covars = R diag(s)^2 R^T renders what quats/scales render (cpu backend), and the gradients
    through covars, chained back to quats/scales, equal the direct ones."""
    x = _one(gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))

    def direct(means, quats, scales, opacities):
        return _call(dict(x, means=means, quats=quats, scales=scales, opacities=opacities), backend="cpu",
                     far_plane=100.0)

    def via_covars(means, quats, scales, opacities):
        M = reference.quat_to_rotmat(quats) * scales[..., None, :]
        return _call(dict(x, means=means, quats=None, scales=None, opacities=opacities),
                     covars=M @ M.transpose(-1, -2), backend="cpu", far_plane=100.0)

    leaves = {k: x[k] for k in ("means", "quats", "scales", "opacities")}
    a, b = _grads(direct, leaves, seed), _grads(via_covars, leaves, seed)
    for name, u, w in (("render", a[0], b[0]), ("alpha", a[1], b[1]), *((f"grad {k}", a[2][k], b[2][k]) for k in leaves)):
        assert_close(w, u, atol=1e-9 * (u.abs().max().item() + 1e-30), rtol=1e-8, name=name)


def test_ortho_projection_matches_gsplat_and_backends_agree(gen):
    """The reference's orthographic projection is gsplat's (_torch_impl); the cpu backend's native
    orthographic projection renders and differentiates as the reference does."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    x = _one(gen, C=3, N=40)
    x["Ks"] = x["Ks"].clone()
    x["Ks"][:, 0, 0] = x["Ks"][:, 1, 1] = 14.0  # pixels per world unit: the cube fills the image
    covars, _ = _quat_scale_to_covar_preci(x["quats"], x["scales"], compute_covar=True, compute_preci=False,
                                           triu=False)
    _, m2, depths, conics, _ = _fully_fused_projection(x["means"], covars, x["viewmats"], x["Ks"], 27, 21,
                                                       camera_model="ortho")
    r = reference.project(x["means"][None], x["quats"][None], x["scales"][None], x["opacities"][None],
                          x["viewmats"][None], x["Ks"][None], 27, 21, 0.01, 1e10, 0.3, False, camera_model="ortho")
    assert r[4].all()
    assert_close(r[0][0], m2, atol=1e-10, rtol=1e-10, name="ortho means2d")
    assert_close(r[1][0], conics, atol=1e-10, rtol=1e-10, name="ortho conics")
    assert_close(r[2][0], depths, atol=1e-12, rtol=1e-12, name="ortho depths")
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    leaves = {k: x[k] for k in ("means", "quats", "scales", "opacities", "colors")}
    outs = [_grads(lambda **lv: _call(dict(x, **lv), camera_model="ortho", backend=be), leaves, seed)
            for be in ("torch", "cpu")]
    assert outs[0][1].amax() > 0.5  # the Gaussians are in view
    for name, u, w in (("render", outs[0][0], outs[1][0]), ("alpha", outs[0][1], outs[1][1]),
                       *((f"grad {k}", outs[0][2][k], outs[1][2][k]) for k in leaves)):
        assert_close(w, u, atol=1e-9 * (u.abs().max().item() + 1e-30), rtol=1e-8, name=name)


def test_radius_clip_drops_small_gaussians(gen):
    """radius_clip=r: Gaussians whose radii are both <= r get radii 0 and are not drawn: the
    render equals that of the scene without them (one camera)."""
    x = _one(gen, C=1, N=40)
    _, _, meta = _call(x, backend="cpu", far_plane=100.0)
    r = meta["radii"][0]
    clip = float(r.max(-1).values.float().median())
    small = (r <= clip).all(-1) & (r > 0).all(-1)
    assert 0 < int(small.sum()) < 40
    out, alpha, clipped = _call(x, backend="cpu", far_plane=100.0, radius_clip=clip)
    assert ((clipped["radii"][0] == 0).all(-1) == (small | (r == 0).all(-1))).all()
    keep = ~small
    kept = dict(x, **{k: x[k][keep] for k in ("means", "quats", "scales", "opacities", "colors")})
    out_k, alpha_k, _ = _call(kept, backend="cpu", far_plane=100.0)
    assert_close(out, out_k, atol=1e-12, rtol=1e-12, name="clipped render")
    assert_close(alpha, alpha_k, atol=1e-12, rtol=1e-12, name="clipped alpha")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_channel_chunks_equal_one_pass(backend, gen):
    """D = 7 in chunks of 3 renders and differentiates as in one pass of 32 (the colours; alphas
    from the first chunk)."""
    x = _one(gen, D=7, background=True)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    leaves = {k: x[k] for k in ("means", "quats", "scales", "opacities", "colors")}
    a, b = (_grads(lambda **lv: _call(dict(x, **lv), backgrounds=x["backgrounds"], backend=backend,
                                      render_mode="RGB+D", channel_chunk=cc), leaves, seed) for cc in (32, 3))
    for name, u, w in (("render", a[0], b[0]), ("alpha", a[1], b[1]), *((f"grad {k}", a[2][k], b[2][k]) for k in leaves)):
        assert_close(w, u, atol=1e-10 * (u.abs().max().item() + 1e-30), rtol=1e-9, name=name)


def test_per_camera_sh_coefficients(gen):
    """SH [C, N, K, 3], the same for every camera, renders as SH [N, K, 3]; the shared
    coefficients' gradient is the sum of the per-camera ones."""
    x = _one(gen, C=3, sh_degree=2)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    shared = _grads(lambda colors: _call(dict(x, colors=colors), backend="cpu", far_plane=100.0),
                    {"colors": x["colors"]}, seed)
    per_cam = _grads(lambda colors: _call(dict(x, colors=colors), backend="cpu", far_plane=100.0),
                     {"colors": x["colors"][None].expand(3, -1, -1, -1).contiguous()}, seed)
    assert_close(per_cam[0], shared[0], atol=1e-12, rtol=1e-12, name="render")
    assert_close(per_cam[2]["colors"].sum(0), shared[2]["colors"], atol=1e-12, rtol=1e-10, name="SH grad")


def test_sparse_grad(gen):
    """packed + sparse_grad: the gradients of means, quats and scales are sparse COO tensors over
    the drawn Gaussians, equal to the dense gradients (which are 0 elsewhere)."""
    x = make_scene(gen, 1, 2, 40, 27, 21, odd=True)
    x = {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    leaves = {k: x[k] for k in ("means", "quats", "scales", "opacities")}
    dense = _grads(lambda **lv: _call(dict(x, **lv), packed=True, backend="cpu", far_plane=100.0), leaves, seed)
    sparse = _grads(lambda **lv: _call(dict(x, **lv), packed=True, sparse_grad=True, backend="cpu", far_plane=100.0),
                    leaves, seed)
    _, _, meta = _call(x, packed=True, backend="cpu", far_plane=100.0)
    drawn = torch.unique(meta["gaussian_ids"])
    assert 0 < len(drawn) < 40
    for k in ("means", "quats", "scales"):
        g = sparse[2][k]
        assert g.is_sparse, k
        assert torch.equal(g.coalesce().indices()[0], drawn), k
        assert torch.equal(g.to_dense(), dense[2][k]), k
    assert not sparse[2]["opacities"].is_sparse
    assert torch.equal(sparse[2]["opacities"], dense[2]["opacities"])


# --- validation of the new arguments ----------------------------------------------------------------

def _covars(x):
    M = reference.quat_to_rotmat(x["quats"]) * x["scales"][..., None, :]
    return M @ M.transpose(-1, -2)


def _nonsym(x):
    c = _covars(x).clone()
    c[3, 0, 1] += 0.1
    return c


def _not_pd(x):
    c = _covars(x).clone()
    c[5] = torch.diag(torch.tensor([1.0, -1.0, 1.0]))
    return c


BAD = {  # case: (keyword arguments from a valid call x, exception, message)
    "packed-int": (lambda x: dict(packed=1), ValueError, r"packed must be a bool; got 1"),
    "sparse_grad-str": (lambda x: dict(sparse_grad="yes"), ValueError, r"sparse_grad must be a bool"),
    "segmented-none": (lambda x: dict(segmented=None), ValueError, r"segmented must be a bool"),
    "radius_clip-negative": (lambda x: dict(radius_clip=-1.0), ValueError,
                             r"radius_clip must be a real number >= 0; got -1.0"),
    "radius_clip-nan": (lambda x: dict(radius_clip=math.nan), ValueError, r"radius_clip must be a real number >= 0"),
    "channel_chunk-zero": (lambda x: dict(channel_chunk=0), ValueError, r"channel_chunk must be a positive integer"),
    "tile_size-float": (lambda x: dict(tile_size=16.0), ValueError, r"tile_size must be a positive integer"),
    "camera_model-unknown": (lambda x: dict(camera_model="spherical"), ValueError,
                             r"camera_model must be one of \('pinhole', 'ortho', 'fisheye', 'ftheta'\)"),
    "covars-with-quats": (lambda x: dict(covars=_covars(x)), ValueError,
                          r"covars replaces quats and scales: pass quats=None and scales=None with covars; "
                          r"got quats and scales as well"),
    "covars-with-scales": (lambda x: dict(quats=None, covars=_covars(x)), ValueError, r"got scales as well"),
    "no-quats-no-covars": (lambda x: dict(quats=None), ValueError,
                           r"quats and scales are required unless covars is given; got quats=None"),
    "covars-shape": (lambda x: dict(quats=None, scales=None, covars=_covars(x)[:, :2]), ValueError,
                     r"covars must have shape \[\.\.\., N, 3, 3\]"),
    "covars-nonsymmetric": (lambda x: dict(quats=None, scales=None, covars=_nonsym(x)), ValueError,
                            r"covars must be symmetric; covars\[3\] differs from its transpose by 0.1"),
    "covars-not-pd": (lambda x: dict(quats=None, scales=None, covars=_not_pd(x)), ValueError,
                      r"covars must be positive definite; covars\[5\] is not"),
    "covars-nan": (lambda x: dict(quats=None, scales=None, covars=_covars(x).index_fill(0, torch.tensor([2]), math.nan)),
                   ValueError, r"covars must be finite"),
    "covars-dtype": (lambda x: dict(quats=None, scales=None, covars=_covars(x).double()), TypeError,
                     r"covars has dtype float64"),
    "sparse_grad-batch": (lambda x: dict(means=x["means"][None], quats=x["quats"][None], scales=x["scales"][None],
                                         opacities=x["opacities"][None], colors=x["colors"][None],
                                         viewmats=x["viewmats"][None], Ks=x["Ks"][None], packed=True,
                                         sparse_grad=True), ValueError,
                          r"sparse_grad=True takes Gaussians without batch dims \(means \[N, 3\]\); got means of "
                          r"shape \(1, 9, 3\)"),
    "sh-per-camera-C": (lambda x: dict(colors=torch.rand(3, 9, 4, 3), sh_degree=1), ValueError,
                        r"colors must have shape \[\.\.\., C, N, K, 3\]"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_bad_new_arguments_are_rejected(case, backend, gen):
    make, exc, pattern = BAD[case]
    x = _small(gen)
    with pytest.raises(exc, match=pattern):
        _call(x, backend=backend, **make(x))


def test_scene_bench_workload_runs_the_trainer_step(gen):
    """The bench's `scene` workload (quick size): its step renders, backpropagates the L1 loss and
    leaves DefaultStrategy's 2D-gradient statistics (once per backward, whatever forwards came
    before), equal on the cpu backend and the reference."""
    from fast3d.ops.rasterization import bench

    w = next(w for w in bench.WORKLOADS if w.name == "scene")
    x = bench.make_inputs(w.quick, torch.device("cpu"), gen)
    stats = {}
    for be in ("torch", "cpu"):
        x["strategy_state"] = x["strategy"].initialize_state(scene_scale=1.0)
        bench.run(be, x)  # a forward whose backward never runs (the harness draws upstream gradients so)
        (loss,) = bench.run(be, x)
        loss.backward()
        stats[be] = {k: x["strategy_state"][k] for k in ("grad2d", "count")}
        for k in ("means", "quats", "scales", "opacities", "colors"):
            x[k].grad = None
    assert 0 < int((stats["cpu"]["count"] > 0).sum()) and stats["cpu"]["grad2d"].sum() > 0
    assert torch.equal(stats["cpu"]["count"], stats["torch"]["count"]) and int(stats["cpu"]["count"].max()) == 1
    ref = stats["torch"]["grad2d"]
    assert_close(stats["cpu"]["grad2d"], ref, atol=2e-4 * ref.abs().max().item(), rtol=1e-3, name="grad2d")
