"""``datagen`` in ``fast3d bench``: procedural data generation throughput (issue: VFusion3D's 16
views at 256 px), with its two costs apart.

* ``orbit16-256``: one batch of objects rendered from their 16-view rigs in one rasterization
  call and encoded as a shard's sample bytes (PNGs, cameras JSON): the generator's work per batch.
* ``orbit16-256-render``: the same batch, rendering only; encoding's share is the difference.

Samples/s = ``params["objects"]`` / median. Asset and rig construction stay outside the timing
(they are drawn in ``make_inputs``, as the generator overlaps them with nothing). Forward only.
Backends: those of ``fast3d.rasterization`` (the dense ``torch`` reference is skipped where it
cannot hold the images, with its reason).
"""

from __future__ import annotations

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench

OP = "datagen"

_FULL = dict(objects=4, views=16, resolution=256, gaussians=20_000)
_QUICK = dict(objects=1, views=4, resolution=32, gaussians=800)
WORKLOADS = [
    Workload("orbit16-256", dict(_FULL, encode=True), quick=dict(_QUICK, encode=True),
             source="VFusion3D's orbit (16 views, 256 px), fast3d datagen procedural's defaults: 4 objects "
                    "per rasterization call, 20,000 Gaussians each; render + encode"),
    Workload("orbit16-256-render", dict(_FULL, encode=False), quick=dict(_QUICK, encode=False),
             source="the same batch, rendering only (encoding's share = the difference)"),
]


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    from fast3d import cameras
    from fast3d.datagen import assets

    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
    objs = []
    for i in range(p["objects"]):
        g = torch.Generator().manual_seed(seed + i)
        a = assets.make_asset(g, p["gaussians"])
        rig = cameras.orbit16(g, resolution=p["resolution"], n_views=p["views"])
        objs.append((a, rig))
    st = lambda xs: torch.stack(xs).to(device)  # noqa: E731
    return dict(means=st([a.means for a, _ in objs]), quats=st([a.quats for a, _ in objs]),
                scales=st([a.scales for a, _ in objs]), opacities=st([a.opacities for a, _ in objs]),
                sh=st([a.sh for a, _ in objs]), viewmats=st([r.viewmats for _, r in objs]),
                Ks=st([r.Ks for _, r in objs]), resolution=p["resolution"], encode=p["encode"],
                captions=[a.caption for a, _ in objs])


def run(backend: str, x: dict) -> tuple:
    import fast3d
    from fast3d.data.shards import MultiViewSample, encode_sample

    R, B, V = x["resolution"], x["means"].shape[0], x["viewmats"].shape[1]
    bg = torch.ones(B, V, 3, device=x["means"].device)
    with torch.no_grad():
        rgb, alpha, _ = fast3d.rasterization(x["means"], x["quats"], x["scales"], x["opacities"], x["sh"],
                                             x["viewmats"], x["Ks"], R, R, sh_degree=0, backgrounds=bg,
                                             backend=backend)
    if x["encode"]:
        images, alphas = rgb.permute(0, 1, 4, 2, 3).clamp(0, 1).cpu(), alpha.permute(0, 1, 4, 2, 3).clamp(0, 1).cpu()
        for b in range(B):
            encode_sample(MultiViewSample(key=f"b{b}", images=images[b], alphas=alphas[b],
                                          viewmats=x["viewmats"][b].cpu(), Ks=x["Ks"][b].cpu(),
                                          caption=x["captions"][b], source="rendered3d", quality=1.0,
                                          elevation=None))
    return rgb, alpha


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Bytes: the Gaussians read once per image (14 floats each), the RGBA images written once."""
    B, V, R, N = p["objects"], p["views"], p["resolution"], p["gaussians"]
    return B * V * (N * 14 * 4 + R * R * 4 * 4), 0


SPEC = register_bench(BenchSpec(op=OP, workloads=WORKLOADS, make_inputs=make_inputs, run=run, model=model,
                                passes=("forward",), kernel_op="rasterization"))
