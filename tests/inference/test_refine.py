"""fast3d.inference.refine (``fast3d refine``, Magic-Boost's SDS refinement with the Anchor Iterative
Update) on a tiny random-init Magic-Boost model (preset ``tiny``: pixel latents, 32 px) and small
procedural objects: the outputs, the SDS gradient reaching every optimised parameter, the anchor
update leaving each anchor out of its own conditioning, resume after a kill equal to an
uninterrupted run, a step that keeps no graph (memory flat over steps), and bad inputs refused
before anything is written."""

from __future__ import annotations

import gc
import json
import math
import os
import weakref

import pytest
import torch

from fast3d import cameras as cams
from fast3d import rasterization
from fast3d.datagen.assets import make_asset
from fast3d.inference import refine as rf
from fast3d.inference.common import save_image
from fast3d.io import load_ply, save_ply
from fast3d.models.magicboost import MagicBoost, MagicBoostConfig

R = 32          # the tiny preset's resolution
K = 4           # its anchors
# Few and cheap steps (the tiny UNet is the cost: one call a step without guidance, one per anchor
# and DDIM step in an anchor update); guidance is on where a test is about it.
FAST = dict(steps=4, views_per_step=2, guidance_scale=1.0, aiu_every=3, aiu_denoise_steps=2, aiu_strength=0.5,
            checkpoint_every=2, turntable_frames=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random-init Magic-Boost model directory (weights drawn from the config's random_seed)."""
    path = str(tmp_path_factory.mktemp("model") / "magicboost")
    MagicBoost(MagicBoostConfig.preset("tiny")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return rf.load_model(model_dir, torch.device("cpu"))[0]


def anchor_cameras(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # -> [K, 4, 4], [K, 3, 3]
    """K orbit cameras 90 degrees apart from a random start, a random elevation in [0, 30] degrees."""
    az = float(torch.rand((), generator=gen)) * 2 * math.pi + torch.arange(K, dtype=torch.float64) * (math.pi / 2)
    el = torch.full((K,), math.radians(30 * float(torch.rand((), generator=gen))), dtype=torch.float64)
    return cams.orbit_cameras(az, el, cams.DEFAULT_DISTANCE, cams.DEFAULT_FOV_Y_DEG, R)


def render(g: dict, vm: torch.Tensor, Ks: torch.Tensor) -> torch.Tensor:  # -> [C, 3, R, R] on white
    rgb, _, _ = rasterization(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], vm, Ks, R, R,
                              sh_degree=0, backgrounds=torch.ones(vm.shape[0], 3))
    return rgb.permute(0, 3, 1, 2).clamp(0, 1)


@pytest.fixture
def scene(tmp_path, gen):
    """A procedural object (the truth), its degraded copy (jittered positions, blurred colours)
    as the coarse PLY, K anchor views of the truth with cameras.json, in tmp_path."""
    a = make_asset(gen, 256)
    truth = dict(means=a.means, quats=a.quats, scales=a.scales, opacities=a.opacities, sh=a.sh)
    coarse = dict(truth, means=a.means + 0.02 * torch.randn(a.means.shape, generator=gen),
                  sh=0.5 * a.sh + 0.5 * a.sh.mean(0, keepdim=True))
    save_ply(tmp_path / "coarse.ply", coarse["means"], coarse["quats"], coarse["scales"], coarse["opacities"],
             coarse["sh"])
    vm, Ks = anchor_cameras(gen)
    os.makedirs(tmp_path / "anchors")
    for i, img in enumerate(render(truth, vm, Ks)):
        save_image(img, str(tmp_path / "anchors" / f"view{i}.png"))
    with open(tmp_path / "cameras.json", "w") as f:
        json.dump({"viewmats": vm.tolist(), "Ks": Ks.tolist(), "width": R, "height": R}, f)
    return dict(ply=str(tmp_path / "coarse.ply"), anchors=[str(tmp_path / "anchors")],
                cameras=str(tmp_path / "cameras.json"), viewmats=vm, Ks=Ks, truth=truth, coarse=coarse)


def make_refiner(model, scene, **settings) -> rf.Refiner:
    from fast3d.inference.common import load_images

    g = load_ply(scene["ply"])
    x = load_images(rf.anchor_paths(scene["anchors"]))
    return rf.Refiner(model, g, x, scene["viewmats"], scene["Ks"], rf.RefineSettings(**{**FAST, **settings}))


def run(scene, model_dir, out, **settings) -> dict:
    with open(os.devnull, "w") as null:
        return rf.refine(scene["ply"], scene["anchors"], scene["cameras"], model_dir, str(out),
                         rf.RefineSettings(**{**FAST, **settings}), device="cpu", stream=null)


@pytest.mark.slow
def test_refine_writes_the_refined_asset_turntable_and_report(scene, model_dir, tmp_path):
    out = tmp_path / "out"
    report = run(scene, model_dir, out)
    assert sorted(os.listdir(out)) == ["compare.png", "refined.ply", "report.json", "turntable.gif"]  # no checkpoint
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["stages_ms"]) == {"load", "refine", "export", "turntable"}
    assert all(v > 0 for v in report["stages_ms"].values())
    assert report["resumed_from"] == 0 and report["settings"]["steps"] == FAST["steps"]
    refined, coarse = load_ply(out / "refined.ply"), load_ply(scene["ply"])
    assert refined["means"].shape == coarse["means"].shape and refined["sh_degree"] == 0
    for k in ("means", "scales", "opacities", "sh"):  # every optimised quantity moved
        assert not torch.equal(refined[k], coarse[k]), k
    from PIL import Image

    with Image.open(out / "turntable.gif") as gif:   # before | after, side by side
        assert gif.size == (2 * R, R) and gif.n_frames == FAST["turntable_frames"]
    with Image.open(out / "compare.png") as png:     # rows: anchors, coarse, refined at the anchor cameras
        assert png.size == (K * R, 3 * R)


def test_sds_gradient_reaches_every_optimised_parameter(scene, model):
    r = make_refiner(model, scene, aiu=False)
    before = {k: v.detach().clone() for k, v in r.params.items()}
    losses = r.step()
    assert losses["aiu"] == 0.0 and losses["sds"] > 0
    for k, p in r.params.items():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), k
        assert float(p.grad.abs().sum()) > 0, f"no SDS gradient reaches {k}"
        assert not torch.equal(p.detach(), before[k]), f"{k} did not move"


def test_sds_gradient_is_the_guided_noise_residual(scene, model):
    """The surrogate's gradient in latent space is w(t) (eps_hat - eps) / V, w(t) = 1 - alpha_bar_t,
    eps_hat the guided prediction u + s (c - u): checked against the model's own predictions for the
    step's draws (redrawn from the generator's state before the step)."""
    r = make_refiner(model, scene, aiu=False, guidance_scale=2.0)
    state = r.generator.get_state()
    captured = {}
    encode = model.encode_latents

    def keep(images):
        z = encode(images)
        z.retain_grad()
        captured["z"] = z
        return z

    model.encode_latents = keep
    try:
        r.step()
    finally:
        del model.encode_latents
    z = captured["z"].detach()
    V = FAST["views_per_step"]
    r.generator.set_state(state)   # the step's draws, in its order: cameras, timesteps, noise
    vm, _ = r.random_cameras(V)
    t = torch.randint(r.t_lo, r.t_hi + 1, (V,), generator=r.generator)
    eps = torch.randn(z.shape, generator=r.generator)
    assert r.t_lo <= int(t.min()) and int(t.max()) <= r.t_hi
    ab = r.alphas_cumprod[t].float()[:, None, None, None]
    noisy = ab.sqrt() * z + (1 - ab).sqrt() * eps
    with torch.no_grad():
        c = model.predict(noisy, t, vm, r.cond)
        u = model.predict(noisy, t, vm, r.cond, drop=torch.ones(V, K, dtype=torch.bool))
    want = (1 - ab) * (u + 2.0 * (c - u) - eps) / V
    # the same ops on the same values (the step batches c and u in one predict call, which runs
    # them as separate UNet calls): float32 rounding at most
    torch.testing.assert_close(captured["z"].grad, want, atol=1e-5, rtol=1e-4)


def test_anchor_update_leaves_each_anchor_out_of_its_own_conditioning(scene, model, gen):
    """Anchor k's update depends on the other anchors, not on anchor k itself: replacing anchor k's
    image changes every other update, and leaves update k bitwise as it was."""
    a, b = make_refiner(model, scene), make_refiner(model, scene)
    k = int(torch.randint(0, K, (), generator=gen))
    b.anchors[k] = torch.rand(b.anchors[k].shape, generator=gen)
    with torch.no_grad():
        b.cond = model.condition(b.anchors, b.anchor_viewmats)
    a.update_anchors()
    b.update_anchors()
    assert torch.equal(a.anchor_targets[k], b.anchor_targets[k])
    for j in range(K):
        if j != k:
            assert not torch.equal(a.anchor_targets[j], b.anchor_targets[j]), j
    assert a.anchor_targets.shape == (K, 3, R, R) and 0 <= float(a.anchor_targets.min()) <= 1


def test_aiu_supervises_the_anchor_renders(scene, model):
    r = make_refiner(model, scene, aiu=True)
    losses = r.step()
    assert r.anchor_targets is not None and losses["aiu"] > 0
    with torch.no_grad():
        now = r.render(r.anchor_viewmats, r.anchor_Ks)
    assert float((now - r.anchor_targets).abs().mean()) > 0


@pytest.mark.slow
def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(scene, model_dir, tmp_path, monkeypatch):
    """Bitwise: the checkpoint holds the parameters, Adam's state, the step, the generator's state
    and the updated anchors, and every op on the CPU is deterministic."""
    settings = dict(steps=5, checkpoint_every=2, aiu_every=3)   # anchor updates at steps 0 and 3
    run(scene, model_dir, tmp_path / "a", **settings)
    step = rf.Refiner.step

    def killed_at_3(self):
        if self.step_index == 3:
            raise KeyboardInterrupt  # as a kill: nothing after this runs
        return step(self)

    monkeypatch.setattr(rf.Refiner, "step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(scene, model_dir, tmp_path / "b", **settings)
    assert os.listdir(tmp_path / "b") == [rf.CHECKPOINT]   # step 2's checkpoint, nothing else
    monkeypatch.setattr(rf.Refiner, "step", step)
    (tmp_path / "b" / f".{rf.CHECKPOINT}.tmp99999").write_bytes(b"half a checkpoint")   # a kill mid-write
    report = run(scene, model_dir, tmp_path / "b", **settings)
    assert report["resumed_from"] == 2   # step 2 trains on the checkpoint's updated anchors (step 0's)
    assert (tmp_path / "a" / "refined.ply").read_bytes() == (tmp_path / "b" / "refined.ply").read_bytes()
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "a"))   # no checkpoint, no litter
    # a checkpoint of other settings is not resumed
    monkeypatch.setattr(rf.Refiner, "step", killed_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(scene, model_dir, tmp_path / "c", **settings)
    monkeypatch.setattr(rf.Refiner, "step", step)
    with pytest.raises(ValueError, match="--out: .* checkpoint of another refinement"):
        run(scene, model_dir, tmp_path / "c", **dict(settings, seed=1))


def _saved_by_step(r: rf.Refiner, leak: list | None = None) -> list:
    """Weak references to every tensor autograd saved during one step (for the leak control, the
    step's anchor renders are kept, with their graph)."""
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r.step()
        if leak is not None:
            leak.append(r.render(r.anchor_viewmats, r.anchor_Ks).sum())
    return refs


def _live_tensors() -> tuple[int, int]:
    gc.collect()
    ts = [o for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]
    return len(ts), sum(t.untyped_storage().nbytes() for t in ts)


@pytest.mark.slow
def test_a_step_keeps_no_graph_so_memory_does_not_grow(scene, model):
    """Every tensor autograd saves in a step is freed when the step returns (unless it is kept
    state: a parameter, the anchors, the model's weights), and the live tensors after 2 and after
    5 steps (anchor updates among them) are the same in number and bytes. The control keeps one graph a step and is caught."""
    r = make_refiner(model, scene, aiu=True, aiu_every=2, steps=100)
    for _ in range(2):
        r.step()
    count, nbytes = _live_tensors()
    keep = {t.untyped_storage().data_ptr() for t in [*r.params.values(), r.anchors, r.anchor_viewmats,
                                                      r.anchor_Ks, *model.state_dict().values()]}
    for _ in range(3):
        refs = _saved_by_step(r)
        gc.collect()
        alive = [w() for w in refs if w() is not None and w().untyped_storage().data_ptr() not in keep]
        assert refs and not alive, [tuple(t.shape) for t in alive]
    assert _live_tensors() == (count, nbytes)
    leak = []
    refs = _saved_by_step(r, leak)
    gc.collect()
    assert any(w() is not None and w().untyped_storage().data_ptr() not in keep for w in refs)
    assert _live_tensors()[1] > nbytes


# --- bad input -------------------------------------------------------------------------------------


def _bad_inputs(scene, tmp_path, gen, model_dir) -> dict:
    """name -> (refine() keyword overrides or a settings dict, the message's pattern)."""
    from fast3d.io.ply import save_points_ply

    raw = open(scene["ply"], "rb").read()
    (tmp_path / "truncated.ply").write_bytes(raw[:-7])
    points = tmp_path / "points.ply"
    save_points_ply(points, torch.rand(10, 3, generator=gen), torch.rand(10, 3, generator=gen))
    header_end = raw.index(b"end_header\n") + len(b"end_header\n")
    nan = bytearray(raw)
    nan[header_end:header_end + 4] = bytes.fromhex("0000c07f")   # x of the first Gaussian: NaN
    (tmp_path / "nan.ply").write_bytes(bytes(nan))
    three = sorted(os.path.join(scene["anchors"][0], n) for n in os.listdir(scene["anchors"][0]))[:3]
    big = tmp_path / "big"
    os.makedirs(big)
    for i in range(K):
        save_image(torch.rand(3, 2 * R, 2 * R, generator=gen), str(big / f"v{i}.png"))
    other = str(tmp_path / "mvdiff")
    from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion

    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(other)
    return {
        "ply not 3DGS": (dict(ply=str(points)), r"--ply .*missing properties"),
        "ply truncated": (dict(ply=str(tmp_path / "truncated.ply")), r"--ply .*truncated"),
        "ply NaN": (dict(ply=str(tmp_path / "nan.ply")), r"--ply .*non-finite"),
        "anchor count": (dict(anchors=three), r"--anchors has 3 images but --cameras .* has 4 cameras"),
        "anchor size": (dict(anchors=[str(big)]), r"--anchors are 64x64 px but --cameras .* width 32"),
        "model kind": (dict(model_dir=other), r"--model .* holds a 'mvdiff' model, not a Magic-Boost model"),
        "t-range": ({"t_range": (0.02, 1.0)}, r"--t-range HI must be a real number in \(0, 1\)"),
        "t-range order": ({"t_range": (0.5, 0.1)}, r"--t-range must have LO <= HI"),
    }


def test_anchor_cameras_must_be_for_the_anchors_size(tmp_path, gen):
    """Without width/height in the file, intrinsics whose principal points fall outside the anchors
    are for images of another size; with them, the sizes must match; the count must match."""
    vm, Ks = anchor_cameras(gen)                      # pixels of R x R images
    f = tmp_path / "cameras.json"
    f.write_text(json.dumps({"viewmats": vm.tolist(), "Ks": Ks.tolist()}))
    got_vm, got_Ks = rf.read_anchor_cameras(str(f), K, R, R)
    assert torch.equal(got_vm, vm) and torch.equal(got_Ks, Ks)
    with pytest.raises(ValueError, match=r"--cameras .*principal points .* outside the 8x8 px anchors"):
        rf.read_anchor_cameras(str(f), K, R // 4, R // 4)
    with pytest.raises(ValueError, match=r"--anchors has 3 images but --cameras .* has 4 cameras"):
        rf.read_anchor_cameras(str(f), 3, R, R)
    f.write_text(json.dumps({"viewmats": vm.tolist(), "Ks": Ks.tolist(), "width": [R] * K, "height": [R] * K}))
    with pytest.raises(ValueError, match=r"--anchors are 16x32 px but --cameras .* says width"):
        rf.read_anchor_cameras(str(f), K, R // 2, R)


def test_bad_inputs_are_refused_before_anything_is_written(scene, model_dir, tmp_path, gen):
    for name, (change, pattern) in _bad_inputs(scene, tmp_path, gen, model_dir).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        kwargs = dict(ply=scene["ply"], anchors=scene["anchors"], cameras=scene["cameras"], model_dir=model_dir,
                      out=str(out))
        settings = dict(FAST)
        if "t_range" in change:
            with pytest.raises(ValueError, match=pattern):
                rf.RefineSettings(**{**settings, **change})
            continue
        kwargs.update(change)
        with pytest.raises(ValueError, match=pattern):
            rf.refine(**kwargs, settings=rf.RefineSettings(**settings), device="cpu")
        assert not out.exists(), name
