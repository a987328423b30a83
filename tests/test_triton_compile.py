"""Every Triton kernel fast3d launches compiles for sm_80 and sm_90, without a GPU.

The ops run forward and backward on small CPU inputs under the interpreter (TRITON_INTERPRET=1,
set by conftest) while their launches are recorded; each distinct launch (argument types,
constexprs, warps) is then compiled in a process without the interpreter (fast3d.triton_aot).
The interpreter alone would pass kernels the GPU compiler rejects (a non-constexpr global read in
a kernel did exactly that). Registers and spill stack of each build are printed (pytest -s)."""

from __future__ import annotations

import os

import pytest
import torch

import fast3d
from fast3d import backends
from fast3d.nn.triplane import TriplaneMLP
from fast3d.triton_aot import compile_launches, record_launches

# Every kernel a forward + backward of the four Triton ops launches.
EXPECTED = {
    "fast3d.ops.composite.triton._composite_fwd", "fast3d.ops.composite.triton._composite_bwd",
    "fast3d.ops.triplane.triton._triplane_fwd", "fast3d.ops.triplane.triton._triplane_bwd",
    "fast3d.ops.triplane.march._march_fwd", "fast3d.ops.triplane.march._march_bwd",
    "fast3d.ops.attention.triton._fwd_kernel", "fast3d.ops.attention.triton._delta_kernel",
    "fast3d.ops.attention.triton._dkdv_kernel", "fast3d.ops.attention.triton._dq_kernel",
}


def _run_ops(gen) -> None:
    def backward(*outs):
        torch.autograd.backward([o for o in outs if o.requires_grad], [torch.randn_like(o) for o in outs
                                                                       if o.requires_grad])

    for dtype in (torch.float32, torch.bfloat16):
        R, S = 5, 9
        sig = torch.rand(R, S, generator=gen).to(dtype).requires_grad_()
        rgb = torch.rand(R, S, 3, generator=gen).to(dtype).requires_grad_()
        t = torch.sort(torch.rand(R, S + 1, generator=gen), -1).values.to(dtype)
        backward(*fast3d.composite(sig, rgb, t[:, :-1], t[:, 1:], backend="triton")[:3])
        wide = torch.rand(R * S, 20, generator=gen).to(dtype).requires_grad_()   # packed, two channel chunks
        ri = torch.arange(R).repeat_interleave(S)
        backward(*fast3d.composite(sig.reshape(-1), wide, t[:, :-1].reshape(-1), t[:, 1:].reshape(-1),
                                   ray_indices=ri, backend="triton")[:3])

        planes = torch.randn(2, 3, 20, 6, 7, generator=gen).to(dtype).requires_grad_()
        pts = (torch.rand(2, 11, 3, generator=gen) * 2 - 1).requires_grad_()
        backward(fast3d.triplane_sample(planes, pts, backend="triton"))

        dec = TriplaneMLP(20, 64, 4).to(dtype)
        o = torch.tensor([0.0, 0.0, -2.0]).expand(2, 6, 3).contiguous().requires_grad_()
        d = torch.nn.functional.normalize(torch.randn(2, 6, 3, generator=gen) * 0.2 + torch.tensor([0.0, 0.0, 1.0]),
                                          dim=-1).requires_grad_()
        out = fast3d.render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=6, n_importance=4, backend="triton")
        backward(*out.values())

        q, k, v = (torch.randn(4, 19, 2, 40, generator=gen).to(dtype).requires_grad_() for _ in range(3))
        backward(fast3d.multiview_attention(q, k, v, num_views=2, backend="triton"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under TRITON_INTERPRET=1")
def test_every_triton_kernel_compiles_for_sm80_and_sm90(gen):
    reason = backends.triton_reason()
    if reason:
        pytest.skip(f"triton unavailable: {reason}")
    with record_launches() as launches:
        _run_ops(gen)
    assert {f"{s['module']}.{s['kernel']}" for s in launches} == EXPECTED
    results = compile_launches(launches, archs=(80, 90))
    for r in results:
        dt = r["constants"].get("DT", "")
        print(f"{r['arch']} {r['kernel']:50s} {dt:5s} warps={r.get('num_warps', 4)} "
              + (f"regs={r['reg']} stack={r['stack']} shared={r['shared']}" if r["ok"] else "FAILED"))
    failed = [f"{r['arch']} {r['kernel']} {r['constants']}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "Triton kernels that do not compile for the GPU:\n" + "\n".join(failed)
    assert len(results) == 2 * len(launches)
