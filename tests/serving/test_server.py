"""The server over HTTP on one Ray instance (started once for the module: Ray's start-up is tens of
seconds on 2 cores): the page and its request, bad and good requests at once, back-pressure,
limits, deadline, metrics, and a replica killed with SIGKILL under load."""

import base64
import io
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from fast3d.io import load_ply
from fast3d.models.lgm import LGM, LGMConfig
from fast3d.serving import localray
from fast3d.serving.loadtest import multipart, post

pytestmark = pytest.mark.slow

# Bounds: room for the 12 requests of the mixed test (Ray's router sees a replica's queue with a lag,
# so it can refuse some below the sum); the back-pressure test sends twice the sum.
MAX_BATCH, ONGOING, QUEUED, FRAMES = 4, 16, 16, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _URL(str):
    """The server's base URL; ``.lgm``: the model directory it serves."""
    lgm: str


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from fast3d.serving.app import ServeOptions, application

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    LGM(LGMConfig.preset("tiny")).save_pretrained(str(root / "lgm"))
    port = _free_port()
    localray.init(num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        opts = ServeOptions(str(root / "lgm"), max_batch=MAX_BATCH, max_wait_ms=50, max_body_bytes=256 * 1024,
                            turntable_frames=FRAMES)
        serve.run(application(opts, max_ongoing_requests=ONGOING, max_queued_requests=QUEUED), name="fast3d",
                  route_prefix="/")
        url = _URL(f"http://127.0.0.1:{port}")
        url.lgm = str(root / "lgm")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _views(gen, size=64) -> list[bytes]:
    out = []
    for _ in range(4):
        arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _reconstruct(server, images, fields=None, headers=None):
    body, ctype = multipart(images, fields)
    return post(f"{server}/v1/reconstruct", body, {"Content-Type": ctype, **(headers or {})})


def _concurrently(calls: list) -> list:
    out = [None] * len(calls)

    def run(i):
        out[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    return out


def test_page_static_files_health_openapi_and_the_pages_request(server, gen, tmp_path):
    status, headers, page = _get(f"{server}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    html = page.decode()
    assert '<form id="upload">' in html and 'src="/static/app.js"' in html and 'href="/static/style.css"' in html
    status, _, js = _get(f"{server}/static/app.js")
    assert status == 200 and b'fetch("/v1/reconstruct"' in js and b'form.append("turntable", "true")' in js
    assert _get(f"{server}/static/style.css")[0] == 200
    assert _get(f"{server}/static/..%2Fapp.py")[0] == 404
    assert _get(f"{server}/healthz")[0] == 200
    status, _, ready = _get(f"{server}/readyz")
    ready = json.loads(ready)
    assert status == 200 and ready["model"] == "lgm" and ready["images"] == 4
    assert ready["fixed_batch"] is not torch.cuda.is_available()  # padded batches are the CPU default
    api = json.loads(_get(f"{server}/openapi.json")[2])
    assert "multipart/form-data" in api["paths"]["/v1/reconstruct"]["post"]["requestBody"]["content"]
    # what app.js sends: multipart images + format + turntable, Accept JSON
    status, headers, body = _reconstruct(server, _views(gen), {"format": "ply", "turntable": "true"},
                                         {"Accept": "application/json"})
    assert status == 200, body[:300]
    d = json.loads(body)
    gif = Image.open(io.BytesIO(base64.b64decode(d["turntable_gif_base64"])))
    assert gif.n_frames == FRAMES and gif.size == (64, 64)
    (tmp_path / "g.ply").write_bytes(base64.b64decode(d["data_base64"]))
    assert load_ply(str(tmp_path / "g.ply"))["means"].shape == (4 * 32 * 32, 3)
    assert set(d["latency_ms"]) == {"decode", "queue", "model", "render", "encode", "total"}
    assert "model;dur=" in headers["server-timing"]
    # a turntable needs a JSON answer; the binary answer is the file, .splat 32 bytes a Gaussian
    status, _, body = _reconstruct(server, _views(gen), {"turntable": "true"})
    assert status == 400 and json.loads(body)["error"]["field"] == "turntable"
    status, headers, body = _reconstruct(server, _views(gen), {"format": "splat"})
    assert status == 200 and len(body) == 32 * 4 * 32 * 32 and headers["x-fast3d-batch-size"] == "1"


class _CDP:
    """A minimal Chrome DevTools Protocol client over a page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws, self.next_id = connect(ws_url, max_size=None, open_timeout=60), 0

    def __call__(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=120))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expr: str):
        return self("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)["result"].get("value")


@pytest.mark.skipif(not os.access(os.environ.get("FAST3D_CHROMIUM", ""), os.X_OK),
                    reason="set FAST3D_CHROMIUM to a Chromium binary: export FAST3D_CHROMIUM=$(.ci/chromium) "
                           "(CI does)")
def test_page_in_headless_chromium_shows_the_result(server, gen, tmp_path):
    """Open / in headless Chromium (WebGL2 on SwiftShader, the CPU), upload 4 views into the form,
    submit, wait for the turntable, and check the screenshot: the turntable's area is blank before
    and holds the rendering after, and the interactive viewer's canvas (gsplat.js) shows the
    object: many pixels unlike its background, in many colours."""
    import subprocess

    paths = []
    for i, data in enumerate(_views(gen)):
        paths.append(str(tmp_path / f"v{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    port = _free_port()
    proc = subprocess.Popen([os.environ["FAST3D_CHROMIUM"], "--headless=shell", "--no-sandbox", "--no-zygote",
                             "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                             f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}",
                             "--window-size=800,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while True:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?{server}/", method="PUT")
                with urllib.request.urlopen(req, timeout=10) as r:
                    target = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() - t0 < 120, "Chromium's DevTools endpoint never came up"
                time.sleep(0.5)
        cdp = _CDP(target["webSocketDebuggerUrl"])
        cdp("Page.enable")
        cdp("Runtime.enable")
        while cdp.eval("document.readyState") != "complete" or "Model: lgm" not in (cdp.eval(
                "document.getElementById('model').textContent") or ""):
            assert time.monotonic() - t0 < 180, "the page never loaded its model description"
            time.sleep(0.5)
        box = cdp.eval("JSON.stringify((() => { const r = document.getElementById('result'); r.hidden = false; "
                       "const b = document.getElementById('turntable').getBoundingClientRect(); r.hidden = true; "
                       "return [b.x, b.y, b.width, b.height]; })())")
        x, y, w, h = (int(v) for v in json.loads(box))

        def shot(x=x, y=y, w=w, h=h):
            png = base64.b64decode(cdp("Page.captureScreenshot", format="png")["data"])
            img = Image.open(io.BytesIO(png)).convert("RGB")
            return torch.from_numpy(np.asarray(img.crop((x + 2, y + 2, x + w - 2, y + h - 2))).copy())

        before = shot()
        node = cdp("DOM.querySelector", nodeId=cdp("DOM.getDocument")["root"]["nodeId"], selector="#images")["nodeId"]
        cdp("DOM.setFileInputFiles", nodeId=node, files=paths)
        assert cdp.eval("document.getElementById('images').files.length") == 4
        cdp.eval("document.getElementById('upload').requestSubmit()")
        while not cdp.eval("!document.getElementById('result').hidden && "
                           "document.getElementById('turntable').naturalWidth > 0"):
            status = cdp.eval("document.getElementById('status').textContent")
            assert "Error" not in status, status
            assert time.monotonic() - t0 < 300, f"no result on the page: {status!r}"
            time.sleep(0.5)
        assert cdp.eval("document.getElementById('download').download") == "gaussians.ply"
        assert cdp.eval("document.getElementById('download').href").startswith("blob:")
        after = shot()
        assert (before == before.flatten(0, 1)[0]).all(), "the turntable area was not blank before the upload"
        assert not torch.equal(after, before) and len(torch.unique(after.flatten(0, 1), dim=0)) > 8, \
            "the screenshot shows no rendering where the turntable is"
        # The viewer: its canvas shown, the .splat loaded; gsplat.js fades splats in (~1 s) while it sorts them.
        status = cdp.eval("document.getElementById('viewer-status').textContent")
        assert status.startswith(f"{4 * 32 * 32} Gaussians"), status  # the tiny LGM: 4 views x 32^2 splats
        cdp.eval("window.scrollTo(0, document.getElementById('viewer').offsetTop)")
        box = json.loads(cdp.eval("JSON.stringify((() => { const b = document.getElementById('viewer')"
                                  ".getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })())"))
        time.sleep(3)
        view = shot(*(int(v) for v in box))
        fg = view.int().amax(-1) > 24  # gsplat.js clears its canvas to black (WebGLRenderer's background)
        assert fg.float().mean() > 0.02 and len(torch.unique(view[fg], dim=0)) > 64, \
            f"the viewer's canvas shows no object: {float(fg.float().mean()):.4f} of it differs from the background"
        Image.fromarray(view.numpy()).save(tmp_path / "viewer.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_and_good_requests_at_once(server, gen):
    goods = [_views(gen) for _ in range(4)]
    alone = []
    for g in goods:
        status, _, body = _reconstruct(server, g)
        assert status == 200
        alone.append(body)
    png = goods[0][0]
    nan_cams = json.dumps({"viewmats": [[[float("nan")] * 4] * 4] * 4, "Ks": [[[1.0] * 3] * 3] * 4})
    bad = [
        (lambda: _reconstruct(server, goods[0][:3] + [b"not an image"]), 400, "images[3]"),
        (lambda: _reconstruct(server, goods[0][:3] + [png[:len(png) // 2]]), 400, "images[3]"),
        (lambda: _reconstruct(server, goods[0][:3]), 400, "images"),
        (lambda: _reconstruct(server, goods[0], {"cameras": json.dumps({"viewmats": [[1]], "Ks": [[1]]})}), 400,
         "cameras"),
        (lambda: _reconstruct(server, goods[0], {"cameras": nan_cams}), 400, "cameras"),
        (lambda: post(f"{server}/v1/reconstruct", b"hello", {"Content-Type": "text/plain"}), 415, "content-type"),
        (lambda: post(f"{server}/v1/reconstruct", b'{"images": ["%%"]}', {"Content-Type": "application/json"}), 400,
         "images[0]"),
        (lambda: _reconstruct(server, goods[0], {"format": "obj"}), 400, "format"),
    ]
    calls = [lambda g=g: _reconstruct(server, g) for g in goods] + [c for c, _, _ in bad]
    out = _concurrently(calls)
    sizes = []
    for (status, headers, body), ref in zip(out[:4], alone):
        assert status == 200 and body == ref
        sizes.append(int(headers["x-fast3d-batch-size"]))
    assert max(sizes) > 1, f"the good requests were never batched: {sizes}"
    for (status, _, body), (_, want_status, field) in zip(out[4:], bad):
        assert status == want_status and json.loads(body)["error"]["field"] == field, body[:300]
    status, _, body = _reconstruct(server, goods[1])  # still serving, same answer
    assert status == 200 and body == alone[1]


def test_backpressure_gives_503_with_retry_after_and_never_a_wrong_answer(server, gen):
    views = _views(gen)
    status, _, ref = _reconstruct(server, views)
    assert status == 200
    out = _concurrently([lambda: _reconstruct(server, views)] * (2 * (ONGOING + QUEUED)))
    statuses = [s for s, _, _ in out]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) >= MAX_BATCH
    for status, headers, body in out:
        if status == 200:
            assert body == ref
        else:
            assert headers.get("retry-after") == "1"


def test_body_limit_deadline_auth_free_routes_and_metrics(server, gen):
    status, _, body = _reconstruct(server, [os.urandom(300 * 1024)])
    assert status == 413 and json.loads(body)["error"]["field"] == "body"
    status, _, body = _reconstruct(server, _views(gen), headers={"X-Deadline-Ms": "1"})
    assert status == 504 and json.loads(body)["error"]["kind"] == "deadline"
    status, _, body = _reconstruct(server, _views(gen), headers={"X-Deadline-Ms": "soon"})
    assert status == 400 and json.loads(body)["error"]["field"] == "x-deadline-ms"
    status, _, text = _get(f"{server}/metrics")
    assert status == 200
    metrics = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)

    def value(prefix, **labels):
        hits = [v for k, v in metrics.items() if k.startswith(prefix + "{") and
                all(f'{a}="{b}"' in k for a, b in labels.items())]
        return sum(hits)

    assert value("fast3d_errors_total", kind="too_large") >= 1
    assert value("fast3d_errors_total", kind="deadline") >= 1
    assert value("fast3d_errors_total", kind="invalid") >= 1
    assert value("fast3d_batch_size_count") >= 1 and value("fast3d_request_latency_seconds_count", status="200") >= 1
    assert value("fast3d_stage_seconds_count", stage="model") >= 1
    assert "fast3d_queue_depth" in text.decode() and value("fast3d_in_flight") == 0


def test_replica_killed_mid_load_restarts_without_hangs_or_wrong_answers(server, gen):
    """SIGKILL the replica while 12 clients send requests: every client gets an answer (no hang):
    the right bytes, or an error status; Ray starts a new replica, which then answers right."""
    views = _views(gen)
    status, _, ref = _reconstruct(server, views)
    assert status == 200
    pid = json.loads(_get(f"{server}/readyz")[2])["pid"]
    payload, ctype = multipart(views)
    outcomes = {}
    lock = threading.Lock()
    stop = time.monotonic() + 90

    def client():
        for _ in range(6):
            if time.monotonic() > stop:
                return
            try:
                status, _, body = post(f"{server}/v1/reconstruct", payload, {"Content-Type": ctype}, timeout=120)
                kind = "ok" if status == 200 and body == ref else ("wrong" if status == 200 else f"http_{status}")
            except TimeoutError:
                kind = "hang"
            except OSError as e:  # connection reset by the proxy: an answer, not a hang
                kind = f"reset_{type(e).__name__}"
            with lock:
                outcomes[kind] = outcomes.get(kind, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=400)
    assert not any(t.is_alive() for t in threads), f"clients hung: {outcomes}"
    print("outcomes after SIGKILL:", outcomes)
    assert outcomes.get("wrong", 0) == 0 and outcomes.get("hang", 0) == 0, outcomes
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status, _, ready = _get(f"{server}/readyz")
        if status == 200 and json.loads(ready)["pid"] != pid:
            break
        time.sleep(1)
    else:
        raise AssertionError("no new replica within 180 s")
    status, _, body = _reconstruct(server, views)
    assert status == 200 and body == ref


def test_local_ray_listens_on_loopback_only(server):
    """Every socket the embedded Ray listens on (GCS, raylet, workers, agents, Serve's controller
    and proxy) is on the loopback interface: nothing of it is reachable from the network."""
    import psutil

    me = psutil.Process()
    listening = []
    for p in [me, *me.children(recursive=True)]:
        try:
            listening += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    names = {n for n, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own processes were seen
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip, _ in listening), \
        [x for x in listening if x[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]


def test_metrics_show_every_replica(server, gen):
    """A second application with 2 replicas: /metrics (answered by one of them) holds both
    replicas' series, merged into one valid exposition, and their request counts add up to the
    requests sent."""
    from prometheus_client.parser import text_string_to_metric_families
    from ray import serve

    from fast3d.serving.app import ServeOptions, application

    opts = ServeOptions(str(server.lgm), max_batch=2, max_wait_ms=20, turntable_frames=2)
    serve.run(application(opts, replicas=2, num_cpus=0.5), name="two", route_prefix="/two")
    try:
        url = f"{server}/two"
        views = _views(gen)
        statuses = _concurrently([lambda: _reconstruct(url, views)[0] for _ in range(6)])
        assert statuses == [200] * 6
        t0 = time.monotonic()
        while True:
            status, _, text = _get(f"{url}/metrics")
            assert status == 200
            fams = {f.name: f for f in text_string_to_metric_families(text.decode())}  # a valid exposition
            replicas = {s.labels["replica"] for s in fams["fast3d_errors"].samples}
            served = sum(s.value for s in fams["fast3d_request_latency_seconds"].samples
                         if s.name.endswith("_count"))
            if len(replicas) == 2 and served == 6:
                break
            assert time.monotonic() - t0 < 60, f"replicas {replicas}, requests counted {served} of 6"
            time.sleep(1)
    finally:
        serve.delete("two")
