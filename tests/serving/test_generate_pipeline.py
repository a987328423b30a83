"""The served generate model (one image -> multi-view diffusion -> LGM) on tiny random models: a
request's PLY is bitwise the file ``fast3d generate`` writes for the same seed (at generate's batch
shape), the same alone or in a padded batch, and within the table's tolerance of generate there;
bad sampling fields are refused naming the field; one HTTP round trip on Ray Serve."""

import os
import socket

import pytest
import torch
from helpers import object_png

from fast3d.cli import main
from fast3d.inference import generate
from fast3d.io.images import read_image
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion
from fast3d.serving import localray
from fast3d.serving.loadtest import multipart, post, same_ply
from fast3d.serving.pipelines import GeneratePipeline, RequestError, load_pipeline

# Tolerances (one table, a reason each).
TOL = {
    # A padded batch runs the LGM at another batch shape than generate's batch of 1: oneDNN's
    # convolutions differ in the last bits between those shapes (as tests/serving/test_pipelines.py's
    # served_vs_infer).
    "padded_vs_generate": 1e-4,
}
STEPS = 2  # sampler steps of a test request: the tiny denoiser's cost is linear in them


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny mvdiff model on the lgm4 rig and a tiny LGM, as tests/inference/test_generate.py builds them."""
    root = tmp_path_factory.mktemp("serve_generate_models")
    torch.manual_seed(0)
    d = {"mv": str(root / "mv4"), "lgm": str(root / "lgm")}
    MVDiffusion(MVDiffConfig.preset("tiny")).save_pretrained(d["mv"])
    LGM(LGMConfig.preset("tiny")).save_pretrained(d["lgm"])
    return d


def _generated_ply(models, png: bytes, tmp_path, seed: int, steps: int = STEPS) -> bytes:
    """``gaussians.ply`` of ``fast3d generate`` (the library call) on the image, for ``seed``."""
    path = tmp_path / f"in{seed}.png"
    path.write_bytes(png)
    out = str(tmp_path / f"gen{seed}")
    generate.run(models["mv"], models["lgm"], out, images=[str(path)], log=lambda *_: None,
                 settings=generate.Settings(seed=seed, steps=steps, turntable_frames=1))
    return open(os.path.join(out, "gaussians.ply"), "rb").read()


def _served(pipe, png: bytes, seed: int, others=()) -> bytes:
    """The PLY of one request (seed, STEPS), run in a batch after the requests ``others``."""
    req = pipe.prepare([read_image(png)], None, False, {"seed": str(seed), "steps": STEPS})
    results = pipe.run([*others, req])
    return pipe.encode(results[-1].scene, "ply")


@pytest.mark.slow
def test_served_ply_is_generates_file_bitwise_and_seeded(models, tmp_path, gen, seed):
    pipe = load_pipeline(models["lgm"], max_batch=1, turntable_frames=2, warmup=False, mv_model=models["mv"])
    assert isinstance(pipe, GeneratePipeline) and pipe.views == [0, 1, 2, 3] and pipe.output_kind == "lgm"
    png = object_png(gen)
    s = seed % 1000
    served = _served(pipe, png, s)
    assert served == _generated_ply(models, png, tmp_path, s)
    assert served != _served(pipe, png, s + 1)  # the request's seed reaches the sampler


@pytest.mark.slow
def test_padded_batch_same_alone_or_batched_and_close_to_generate(models, tmp_path, gen, seed):
    pipe = load_pipeline(models["lgm"], max_batch=3, turntable_frames=2, warmup=False, mv_model=models["mv"])
    assert pipe.fixed_batch  # the CPU default: batches padded to 3
    png, other = object_png(gen), object_png(gen, (30, 60))
    s = seed % 1000
    alone = _served(pipe, png, s)
    first = pipe.prepare([read_image(other)], None, True, {"seed": s + 7, "steps": STEPS, "guidance": "2.5"})
    assert _served(pipe, png, s, others=[first, first]) == alone
    assert same_ply(alone, _generated_ply(models, png, tmp_path, s), TOL["padded_vs_generate"])


@pytest.mark.parametrize("params, field", [
    ({"steps": 0}, "steps"), ({"steps": 201}, "steps"), ({"steps": "2.5"}, "steps"), ({"steps": True}, "steps"),
    ({"seed": -1}, "seed"), ({"seed": 2**31}, "seed"), ({"seed": "x"}, "seed"),
    ({"guidance": 30.5}, "guidance"), ({"guidance": -0.1}, "guidance"), ({"guidance": "nan"}, "guidance"),
    ({"strength": 1}, "strength"),
])
def test_bad_sampling_fields_name_the_field(models, params, field):
    pipe = load_pipeline(models["lgm"], max_batch=1, warmup=False, mv_model=models["mv"])
    with pytest.raises(RequestError) as e:
        pipe.prepare([torch.rand(4, 8, 8)], None, False, params)
    assert e.value.field == field and e.value.status == 400


def test_generate_refuses_cameras_and_image_counts_and_lgm_refuses_seed(models):
    pipe = load_pipeline(models["lgm"], max_batch=1, warmup=False, mv_model=models["mv"])
    with pytest.raises(RequestError) as e:
        pipe.prepare([torch.rand(4, 8, 8)], {"Ks": []}, False)
    assert e.value.field == "cameras"
    with pytest.raises(RequestError) as e:
        pipe.prepare([torch.rand(4, 8, 8)] * 2, None, False)
    assert e.value.field == "images" and "1 image" in e.value.message
    lgm = load_pipeline(models["lgm"], max_batch=1, warmup=False)
    with pytest.raises(RequestError) as e:
        lgm.prepare([torch.rand(3, 8, 8)] * 4, None, False, {"seed": 1})
    assert e.value.field == "seed" and "lgm" in e.value.message
    with pytest.raises(ValueError, match="--views"):
        load_pipeline(models["lgm"], max_batch=1, warmup=False, mv_model=models["mv"], views=[0, 9])


def test_serve_cli_checks_the_generate_flags(models, capsys):
    assert main(["serve", "--checkpoint", models["lgm"], "--views", "0"]) == 2
    assert "--views applies with --mv-model" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", models["lgm"], "--mv-model", models["lgm"]]) == 2
    assert "--mv-model" in (err := capsys.readouterr().err) and "'lgm' model" in err
    assert main(["serve", "--checkpoint", models["lgm"], "--mv-model", models["mv"], "--views", "0,4"]) == 2
    assert "--views must be distinct indices in [0, 4)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(models):
    import ray
    from ray import serve

    from fast3d.serving.app import ServeOptions, application

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    localray.init(num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # one torch thread, as the comparison runs generate: the CPU kernels' last bits depend on the threads
        opts = ServeOptions(models["lgm"], max_batch=1, max_wait_ms=5, mv_model=models["mv"], threads=1)
        serve.run(application(opts), name="fast3d_generate", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_http_round_trip_and_a_bad_field(server, models, tmp_path, gen, seed):
    png = object_png(gen)
    s = seed % 1000
    body, ctype = multipart([png], {"seed": s, "steps": STEPS})
    status, headers, data = post(f"{server}/v1/reconstruct", body, {"Content-Type": ctype})
    assert status == 200, data[:300]
    assert headers["x-fast3d-model"] == "generate" and 'filename="gaussians.ply"' in headers["content-disposition"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert data == _generated_ply(models, png, tmp_path, s)
    finally:
        torch.set_num_threads(threads)
    body, ctype = multipart([png], {"steps": 500})
    status, _, data = post(f"{server}/v1/reconstruct", body, {"Content-Type": ctype})
    assert status == 400 and b'"field":"steps"' in data.replace(b" ", b""), data
