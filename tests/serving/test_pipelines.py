"""The serving pipelines without Ray: a request's output is bitwise the same alone or in a batch
(every position, every batch size, one and two threads), the .splat layout, the PLY matches what
``fast3d infer`` writes, and request parsing names the field at fault."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fast3d.inference import common, lgm
from fast3d.io import load_ply
from fast3d.io.ply import ply_bytes
from fast3d.io.splat import load_splat, splat_bytes
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.serving.loadtest import multipart, percentile, same_ply
from fast3d.serving.pipelines import RequestError, load_pipeline
from fast3d.serving.request import parse_request

# Tolerances (one table, a reason each).
TOL = {
    # The server runs the LGM at its padded batch shape, `fast3d infer` at batch 1: oneDNN's
    # convolutions differ in the last bits between those shapes (measured ~1e-6 on positions).
    "served_vs_infer": dict(atol=1e-4, rtol=1e-4),
    # .splat stores colours and opacity in 8 bits: half a step of 1/255.
    "splat_u8": 0.5 / 255 + 1e-7,
    # The quaternion's components are stored as round(128 q + 128) in 8 bits: half a step of 1/128,
    # except that +1 is not representable (255 decodes to 127/128), so a component above 255.5/256
    # is off by up to a full step (seen: 0.9994 -> 0.9922).
    "splat_rot": 0.5 / 128 + 1e-7,
    "splat_rot_top": 1 / 128 + 1e-7,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_models")
    torch.manual_seed(0)
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(root / "lgm"))
    LRM(LRMConfig.preset("tiny")).save_pretrained(str(root / "lrm"))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lgm", "lrm"])
@pytest.mark.parametrize("threads", [1, 2])
def test_output_is_bitwise_the_same_alone_or_in_any_batch(models, kind, threads, gen):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe = load_pipeline(str(models / kind), max_batch=4, turntable_frames=2, warmup=False)
        pipe.point_grid = 32  # the LRM's export grid: small, for time
        assert pipe.fixed_batch  # the CPU default
        sizes = [48, 40, 48, 64]  # requests of different sizes batch together (resized per request)
        reqs = [pipe.prepare([torch.rand(3, s, s, generator=gen) for _ in range(pipe.num_images)], None, i % 2 == 0)
                for i, s in enumerate(sizes)]
        alone = [pipe.run([r])[0] for r in reqs]
        for batch in ([3, 2, 1, 0], [1, 3]):
            out = pipe.run([reqs[i] for i in batch])
            for r, i in zip(out, batch):
                assert r.batch_size == len(batch)
                for fmt in ("ply", "splat"):
                    assert pipe.encode(r.scene, fmt) == pipe.encode(alone[i].scene, fmt), (kind, batch, i, fmt)
                if reqs[i].turntable:
                    assert torch.equal(r.turntable, alone[i].turntable)
                    assert r.turntable.shape[0] == 2
                else:
                    assert r.turntable is None
    finally:
        torch.set_num_threads(old)


@pytest.mark.slow
def test_variable_batches_are_not_padded(models, gen):
    pipe = load_pipeline(str(models / "lgm"), max_batch=3, turntable_frames=2, fixed_batch=False, warmup=False)
    calls = []
    forward = pipe.forward
    pipe.forward = lambda inputs, n: calls.append(inputs["images"].shape[0]) or forward(inputs, n)
    req = pipe.prepare([torch.rand(3, 64, 64, generator=gen) for _ in range(4)], None, False)
    pipe.run([req])
    pipe.fixed_batch = True
    pipe.run([req])
    assert calls == [1, 3]


@pytest.mark.slow
def test_served_ply_is_what_fast3d_infer_writes(models, tmp_path, gen):
    paths = []
    for i in range(4):
        paths.append(str(tmp_path / f"v{i}.png"))
        common.save_image(torch.rand(3, 64, 64, generator=gen), paths[-1])
    lgm.infer(str(models / "lgm"), paths, str(tmp_path / "out"), turntable_frames=1)
    pipe = load_pipeline(str(models / "lgm"), max_batch=2, warmup=False)
    images = [common.load_image(p) for p in paths]
    served = pipe.encode(pipe.run([pipe.prepare(images, None, False)])[0].scene, "ply")
    written = (tmp_path / "out" / "gaussians.ply").read_bytes()
    head = written[:written.index(b"end_header\n")]
    assert served.startswith(head) and len(served) == len(written)
    (tmp_path / "served.ply").write_bytes(served)
    a, b = load_ply(str(tmp_path / "served.ply")), load_ply(str(tmp_path / "out" / "gaussians.ply"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOL["served_vs_infer"])


def test_splat_layout(gen):
    N = 50
    means, scales = torch.randn(N, 3, generator=gen), torch.rand(N, 3, generator=gen) + 0.01
    quats = torch.randn(N, 4, generator=gen)
    opac, colors = torch.rand(N, generator=gen), torch.rand(N, 3, generator=gen) * 1.2 - 0.1
    data = splat_bytes(means, quats, scales, opac, colors)
    assert len(data) == 32 * N
    rec = np.frombuffer(data[32:64], dtype="<f4", count=6)  # the second Gaussian: position then scale
    assert np.array_equal(rec[:3], means[1].numpy()) and np.array_equal(rec[3:], scales[1].numpy())
    d = load_splat(data)
    assert torch.equal(d["means"], means) and torch.equal(d["scales"], scales)
    assert (d["colors"] - colors.clamp(0, 1)).abs().max() <= TOL["splat_u8"]
    assert (d["opacities"] - opac).abs().max() <= TOL["splat_u8"]
    unit = quats / quats.norm(dim=-1, keepdim=True)
    top = unit > 127.5 / 128
    err = (d["quats"] - unit).abs()
    assert err[~top].max() <= TOL["splat_rot"] and (err[top].max() if top.any() else 0) <= TOL["splat_rot_top"]
    edge = load_splat(splat_bytes(means[:1], torch.tensor([[1.0, 0, 0, 0]]), scales[:1], opac[:1], colors[:1]))
    assert torch.equal(edge["quats"], torch.tensor([[127 / 128, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="multiple of 32"):
        load_splat(data[:-1])
    quats[3] = 0
    with pytest.raises(ValueError, match="zero-length"):
        splat_bytes(means, quats, scales, opac, colors)


def _png_bytes(gen, size=16, mode="RGB") -> bytes:
    arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_parse_multipart_and_json_agree(gen):
    imgs = [_png_bytes(gen) for _ in range(2)]
    body, ctype = multipart(imgs, {"format": "splat", "turntable": "true", "cameras": json.dumps({"azimuth_deg": 3})})
    a = parse_request(ctype, body, 1 << 20, 1 << 20)
    js = json.dumps({"images": [base64.b64encode(i).decode() for i in imgs], "format": "splat", "turntable": True,
                     "cameras": {"azimuth_deg": 3}}).encode()
    b = parse_request("application/json; charset=utf-8", js, 1 << 20, 1 << 20)
    assert (a.format, a.turntable, a.cameras) == (b.format, b.turntable, b.cameras) == ("splat", True, {"azimuth_deg": 3})
    assert len(a.images) == 2 and all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert a.images[0].shape == (3, 16, 16)


def test_parse_rejects_bad_input_naming_the_field(gen):
    png = _png_bytes(gen)
    cases = [
        ("text/plain", b"hi", "content-type", 415),
        ("application/json", b"{nope", "body", 400),
        ("application/json", b"[]", "body", 400),
        ("application/json", json.dumps({"images": ["!!"]}).encode(), "images[0]", 400),
        ("application/json", json.dumps({"images": [], "x": 1}).encode(), "x", 400),
        ("application/json", json.dumps({"images": "abc"}).encode(), "images", 400),
        ("application/json", json.dumps({"images": []}).encode(), "images", 400),
        ("application/json", json.dumps({"images": [base64.b64encode(png).decode()], "format": "obj"}).encode(),
         "format", 400),
        ("application/json", json.dumps({"images": [base64.b64encode(png).decode()], "cameras": [1]}).encode(),
         "cameras", 400),
        ("application/json", json.dumps({"images": [base64.b64encode(png).decode()], "turntable": "maybe"}).encode(),
         "turntable", 400),
        (*reversed(multipart([png, b"not an image"])), "images[1]", 400),
        (*reversed(multipart([png[: len(png) // 2]])), "images[0]", 400),
        (*reversed(multipart([png], {"cameras": "{bad json"})), "cameras", 400),
        (*reversed(multipart([png], {"model": "/etc/passwd"})), "model", 400),
        ("multipart/form-data", b"--x\r\n", "content-type", 400),  # no boundary parameter
        # More parts than any request has: refused by counting, before the MIME parser runs.
        ("multipart/form-data; boundary=b", b"--b\r\n" * 40_000 + b"--b--\r\n", "body", 400),
        # Nesting deeper than the JSON parser's recursion: a 400, not a 500.
        ("application/json", b"[" * 200_000, "body", 400),
        (*reversed(multipart([png], {"cameras": "[" * 200_000})), "cameras", 400),
    ]
    for ctype, body, field, status in cases:
        with pytest.raises(RequestError) as e:
            parse_request(ctype, body, 1 << 20, 1 << 20)
        assert (e.value.field, e.value.status) == (field, status), (ctype, body[:60], e.value)
    big = _png_bytes(gen, size=64)
    with pytest.raises(RequestError, match="over the limit") as e:
        parse_request(*reversed(multipart([big])), max_pixels=32 * 32, max_image_bytes=1 << 20)
    assert e.value.field == "images[0]"


def test_prepare_checks_views_and_cameras(models, gen):
    pipe = load_pipeline(str(models / "lgm"), max_batch=1, warmup=False)
    img = [torch.rand(3, 32, 32, generator=gen) for _ in range(4)]
    bad = [
        (img[:3], None, "images"),
        (img[:3] + [torch.rand(3, 32, 40, generator=gen)], None, "images[3]"),
        (img[:3] + [torch.rand(3, 16, 16, generator=gen)], None, "images[3]"),
        (img, {"viewmats": [[[1.0] * 4] * 4] * 3, "Ks": [[[1.0] * 3] * 3] * 3}, "cameras"),
        (img, {"viewmats": [[[float("nan")] * 4] * 4] * 4, "Ks": [[[1.0] * 3] * 3] * 4}, "cameras"),
        (img, {"Ks": []}, "cameras"),
    ]
    for images, cams, field in bad:
        with pytest.raises(RequestError) as e:
            pipe.prepare(images, cams, False)
        assert e.value.field == field, e.value
    vm, K = lgm.default_input_cameras(pipe.model.config, 32)
    ok = pipe.prepare(img, {"viewmats": vm.tolist(), "Ks": K.tolist()}, False)
    default = pipe.prepare(img, None, False)
    assert all(torch.equal(ok.inputs[k], default.inputs[k]) for k in ok.inputs)
    lrm_pipe = load_pipeline(str(models / "lrm"), max_batch=1, warmup=False)
    with pytest.raises(RequestError) as e:
        lrm_pipe.prepare(img[:1], {"elevation_deg": 95}, False)
    assert e.value.field == "cameras" and "elevation_deg" in e.value.message


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_same_ply_compares_headers_and_floats(gen):
    N = 10
    args = [torch.randn(N, 3, generator=gen), torch.randn(N, 4, generator=gen), torch.rand(N, 3, generator=gen) + 0.1,
            torch.rand(N, generator=gen) * 0.9 + 0.05, torch.randn(N, 1, 3, generator=gen)]
    a = ply_bytes(*args)
    near = ply_bytes(args[0] + 1e-6, *args[1:])
    far = ply_bytes(args[0] + 1e-2, *args[1:])
    fewer = ply_bytes(*(x[:-1] for x in args))
    assert same_ply(a, a, 0) and same_ply(a, near, 1e-4) and not same_ply(a, near, 0)
    assert not same_ply(a, far, 1e-4) and not same_ply(a, fewer, 1e-4)
