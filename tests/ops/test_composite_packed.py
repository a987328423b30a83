"""composite's packed form (nerfacc's layout): equal, values and gradients, to compositing each
ray on its own; both index forms; errors."""

import pytest
import torch
from helpers import assert_close

import fast3d

# `triton` composites the packed samples in place (interpreter on CPU tensors); the others pad.
BACKENDS = [b for b in ("torch", "cpu", "triton") if fast3d.backends.availability("composite")[b] is None]


def packed_rays(gen, counts, D=3):
    M = sum(counts)
    sig = (torch.rand(M, generator=gen, dtype=torch.float64) * 6).requires_grad_()
    rgb = torch.rand(M, D, generator=gen, dtype=torch.float64).requires_grad_()
    t0 = torch.cat([torch.sort(torch.rand(c, generator=gen, dtype=torch.float64))[0] * 2 for c in counts])
    t1 = t0 + 0.05
    return sig, rgb, t0, t1


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_each_ray_composited_alone(gen, backend):
    counts = [int(c) for c in torch.randint(0, 9, (12,), generator=gen)] + [0, 7]
    sig, rgb, t0, t1 = packed_rays(gen, counts)
    bg = torch.rand(3, generator=gen, dtype=torch.float64).requires_grad_()
    ri = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if backend in ("cpu", "triton"):  # float32 kernels
        sig, rgb, t0, t1, bg = (x.detach().float().requires_grad_(x.requires_grad) for x in (sig, rgb, t0, t1, bg))
    out = fast3d.composite(sig, rgb, t0, t1, bg, ray_indices=ri, backend=backend)
    up = [torch.rand(o.shape, generator=gen, dtype=o.dtype) for o in out]
    g = torch.autograd.grad(sum((o * u).sum() for o, u in zip(out, up)), (sig, rgb, bg))
    ref_out, st = [[], [], [], []], 0
    for n in counts:
        if n == 0:  # an empty ray is the background
            ref_out[0].append(bg[None])
            ref_out[1].append(bg.new_zeros(1, 1))
            ref_out[2].append(bg.new_zeros(1, 1))
            continue
        c, o, d, w = fast3d.composite(sig[st:st + n][None], rgb[st:st + n][None], t0[st:st + n][None],
                                      t1[st:st + n][None], bg, backend="torch")
        for lst, x in zip(ref_out, (c, o, d, w[0])):
            lst.append(x)
        st += n
    ref = [torch.cat(x) for x in ref_out]
    ref_g = torch.autograd.grad(sum((o * u).sum() for o, u in zip(ref, up)), (sig, rgb, bg))
    tol = dict(atol=1e-5, rtol=1e-5) if backend in ("cpu", "triton") else dict(atol=1e-12, rtol=1e-12)
    for name, a, b in zip(("color", "opacity", "depth", "weights"), out, ref):
        assert_close(a, b, name=name, **tol)
    for name, a, b in zip(("d sigmas", "d rgbs", "d background"), g, ref_g):
        assert_close(a, b, name=name, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_info_in_any_ray_order_equals_ray_indices(gen, backend):
    """Rays listed in another order; the last sample belongs to no ray (weight and gradients 0)."""
    counts = [3, 1, 4, 0, 2]
    sig, rgb, t0, t1 = packed_rays(gen, counts + [1])
    if backend in ("cpu", "triton"):  # float32 kernels
        sig, rgb = (x.detach().float().requires_grad_() for x in (sig, rgb))
        t0, t1 = t0.float(), t1.float()
    ri = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    a = fast3d.composite(sig[:10], rgb[:10], t0[:10], t1[:10], ray_indices=ri, backend="torch")
    starts = torch.tensor([0, 3, 4, 8, 8])
    order = torch.tensor([2, 0, 4, 1, 3])  # the same rays listed in another order
    info = torch.stack([starts[order], torch.tensor(counts)[order]], 1)
    b = fast3d.composite(sig, rgb, t0, t1, packed_info=info, backend=backend)
    exact = dict(atol=0, rtol=0) if backend == "torch" else dict(atol=1e-6, rtol=1e-5)
    for name, x, y in zip(("color", "opacity", "depth"), a[:3], b[:3]):
        assert_close(y, x[order], name=name, **exact)
    assert_close(b[3][:10], a[3], name="weights (flat, same order as the samples)", **exact)
    assert b[3][10] == 0
    g_sig, g_rgb = torch.autograd.grad(b[0].sum() + b[3].sum(), (sig, rgb))
    assert g_sig[10] == 0 and (g_rgb[10] == 0).all()


@pytest.mark.parametrize("kw, match", [
    (dict(ray_indices=torch.tensor([0, 0, 1, 0])), "non-decreasing"),
    (dict(ray_indices=torch.tensor([0, 0, 1, 1]), packed_info=torch.tensor([[0, 4]])), "not both"),
    (dict(ray_indices=torch.tensor([0, 0, 1, 2]), n_rays=2), "n_rays=2 but ray_indices reaches ray 2"),
    (dict(ray_indices=torch.tensor([0.0, 0, 1, 1])), "int32/int64"),
    (dict(packed_info=torch.tensor([[0, 3], [2, 3]])), "start \\+ count <= 4"),
    (dict(packed_info=torch.tensor([[0, 2], [2, 2]]), n_rays=2), "n_rays goes with ray_indices"),
    (dict(ray_indices=torch.tensor([0, 0, 1])), "ray_indices must have shape \\[M\\] = \\[4\\]"),
])
def test_packed_errors_name_the_argument(gen, kw, match):
    sig, rgb, t0, t1 = packed_rays(gen, [2, 2])
    with pytest.raises(ValueError, match=match):
        fast3d.composite(sig, rgb, t0, t1, **kw)


def test_n_rays_without_the_packed_form_is_refused(gen):
    with pytest.raises(ValueError, match="n_rays goes with ray_indices"):
        fast3d.composite(torch.rand(2, 3), torch.rand(2, 3, 3), torch.rand(2, 3), torch.rand(2, 3) + 1, n_rays=2)
