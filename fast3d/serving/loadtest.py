"""``fast3d loadtest``: a bounded load generator on loopback, comparing what a user has today
(one ``fast3d infer`` process per request) with the server, batching off (``max_batch`` 1), on
(batches padded to ``max_batch``: bitwise the same answers; the CPU default) and on with
variable-size batches (``--variable-batch``), at fixed concurrencies. Each server mode runs in
every ``variant`` asked for: the server's speed switches (``fp32``: none, ``bf16``, ``compile``,
``cuda_graphs``: :mod:`fast3d.serving.accel`); ``all`` is every variant this machine can run
(``cuda_graphs`` needs CUDA), and a row exists only for a variant that ran.

Each cell (mode x concurrency) sends a fixed number of requests from ``concurrency`` client
threads and stops after ``time_limit_s`` whatever is left; every answer is checked against the
answer to the same request sent alone (a wrong answer is counted, not just a failed one): the same
bytes, or with variable batches (whose CPU kernels differ in the last bits between batch sizes)
the same PLY header and floats within ``VARIABLE_ATOL``. Rows
(p50/p95/p99 latency, requests/s, outcome counts, the device) are appended as JSON lines to
``<out>/<device-slug>/serve.jsonl``.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

MODES = ("infer_process", "batching_off", "batching_on", "batching_variable")
# The server's switches (ServeOptions fields) of each variant.
VARIANTS = {"fp32": {}, "bf16": {"dtype": "bf16"}, "compile": {"compile": True}, "cuda_graphs": {"cuda_graphs": True}}
DEFAULT_OUT = "profiling/serve"
VARIABLE_ATOL = 1e-4   # measured differences between batch sizes are ~1e-6 on the tiny LGM's PLY


def percentile(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _summary(latencies: list[float], outcomes: dict, wall: float, sent: int) -> dict:
    return {"sent": sent, "ok": outcomes.get("ok", 0), "outcomes": outcomes,
            "p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99), "rps": outcomes.get("ok", 0) / wall if wall > 0 else None,
            "wall_s": wall}


def drive(one, requests: int, concurrency: int, time_limit_s: float) -> dict:
    """Call ``one()`` ``requests`` times from ``concurrency`` threads, none started after
    ``time_limit_s``. ``one`` returns an outcome name ("ok", "wrong", "http_503", ...); the
    latencies of the "ok" ones make the percentiles."""
    lock = threading.Lock()
    state = {"next": 0}
    latencies, outcomes = [], {}
    t_end = time.monotonic() + time_limit_s

    def worker():
        while True:
            with lock:
                if state["next"] >= requests or time.monotonic() >= t_end:
                    return
                state["next"] += 1
            t = time.perf_counter()
            try:
                outcome = one()
            except Exception as e:  # a client-side failure (reset, timeout) is an outcome too
                outcome = f"client_{type(e).__name__}"
            dt = (time.perf_counter() - t) * 1e3
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "ok":
                    latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _summary(latencies, outcomes, time.perf_counter() - t0, state["next"])


def post(url: str, body: bytes, headers: dict, timeout: float = 120.0) -> tuple[int, dict, bytes]:
    """One HTTP POST over a fresh connection: (status, headers, body)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("POST", u.path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def multipart(images: list[bytes], fields: dict | None = None, boundary: str = "fast3dload") -> tuple[bytes, str]:
    """A multipart/form-data body with one ``images`` part per image: (body, content type)."""
    parts = []
    for i, data in enumerate(images):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    for k, v in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png(seed: int, size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def same_ply(a: bytes, b: bytes, atol: float) -> bool:
    """Whether two binary PLY files have the same header and float32 data within ``atol``."""
    import numpy as np

    end = b"end_header\n"
    ia, ib = a.find(end), b.find(end)
    if ia < 0 or a[:ia] != b[:ib] or len(a) != len(b):
        return False
    x = np.frombuffer(a[ia + len(end):], dtype="<f4")
    y = np.frombuffer(b[ib + len(end):], dtype="<f4")
    return bool(np.allclose(x, y, rtol=0, atol=atol))


def _server_cell(url: str, images: list[bytes], requests: int, concurrency: int, time_limit_s: float,
                 exact: bool = True) -> dict:
    body, ctype = multipart(images)
    headers = {"Content-Type": ctype}
    status, _, reference = post(url, body, headers)
    if status != 200:
        raise RuntimeError(f"the server answered {status} to the reference request: {reference[:500]!r}")

    def one():
        status, _, data = post(url, body, headers)
        if status != 200:
            return f"http_{status}"
        return "ok" if data == reference or (not exact and same_ply(data, reference, VARIABLE_ATOL)) else "wrong"

    return drive(one, requests, concurrency, time_limit_s)


def _infer_cell(checkpoint: str, paths: list[str], requests: int, concurrency: int, time_limit_s: float,
                work: str) -> dict:
    counter = iter(range(10**9))
    lock = threading.Lock()
    fast3d = [sys.executable, "-m", "fast3d.cli"]

    def one():
        with lock:
            i = next(counter)
        out = os.path.join(work, f"infer{i}")
        r = subprocess.run(fast3d + ["infer", "--checkpoint", checkpoint, "--images", *paths, "--out", out,
                                     "--frames", "1", "--device", "cpu"], capture_output=True, text=True, timeout=600)
        if r.returncode == 0 and os.path.isfile(os.path.join(out, "gaussians.ply")):
            return "ok"
        with lock:
            errors.append(r.stderr.strip().splitlines()[-1:] or [""])
        return f"exit_{r.returncode}"

    errors = []
    row = drive(one, requests, concurrency, time_limit_s)
    if errors:
        row["first_error"] = errors[0][0][-500:]
    return row


def run(checkpoint: str, out: str = DEFAULT_OUT, concurrencies=(1, 4, 16), requests: int = 32,
        infer_requests: int = 8, time_limit_s: float = 120.0, max_batch: int = 8, max_wait_ms: float = 5.0,
        modes=MODES, port: int = 8123, variants=("fp32",), log=print) -> list[dict]:
    """Every mode x concurrency cell (module docstring); returns and appends the rows.

    Args:
        checkpoint: an LGM model directory (4 images a request).
        out: results folder.
        concurrencies: client threads of each cell.
        requests: requests a server cell sends; infer_requests: a ``fast3d infer`` cell's.
        time_limit_s: no request is started after this many seconds of a cell.
        max_batch, max_wait_ms: the batching-on server's.
        modes: some of ``MODES``.
        port: the loopback port of the server.
        variants: some of ``VARIANTS``, or ``["all"]`` (those this machine can run).
    """
    import torch

    from fast3d import checks
    from fast3d.bench import environment as env
    from fast3d.models import checkpoints

    for c in concurrencies:
        checks.positive_int("concurrency", c)
    requests = checks.positive_int("requests", requests)
    infer_requests = checks.positive_int("infer_requests", infer_requests)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be some of {list(MODES)}; got {list(modes)}")
    variants = list(dict.fromkeys(variants))
    if not variants or any(v not in VARIANTS and v != "all" for v in variants):
        raise ValueError(f"variants must be some of {list(VARIANTS)} or ['all']; got {variants}")
    if "all" in variants:
        variants = [v for v in VARIANTS if v != "cuda_graphs" or torch.cuda.is_available()]
        if "cuda_graphs" not in variants:
            log("variant cuda_graphs: not run (no CUDA device: a CUDA graph replays GPU kernels)")
    elif "cuda_graphs" in variants and not torch.cuda.is_available():
        raise ValueError("variant cuda_graphs needs a CUDA device (a CUDA graph replays GPU kernels); this machine "
                         "has none")
    path = checkpoints.resolve_checkpoint(checkpoint)
    if checkpoints.model_type(path) != "lgm":
        raise ValueError(f"checkpoint {checkpoint!r}: the load test drives an LGM (4 images a request)")
    from fast3d.inference.common import default_device
    from fast3d.models.checkpoints import read_config
    from fast3d.models.lgm import LGMConfig

    cfg = read_config(path, "lgm", LGMConfig)
    images = [_png(i, cfg.input_size) for i in range(cfg.num_input_views)]
    device = default_device()
    base = {"kind": "serve_load", "model": "lgm", "model_config": {"input_size": cfg.input_size,
                                                                    "num_gaussians": cfg.num_gaussians},
            "checkpoint": os.path.basename(os.path.normpath(path)), "device": env.device_name(device),
            "device_slug": env.device_slug(device), "commit": env.git_commit(),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cpus": os.cpu_count(), "time_limit_s": time_limit_s}
    rows = []
    with tempfile.TemporaryDirectory(prefix="fast3d_load_") as work:
        if "infer_process" in modes:
            paths = []
            for i, data in enumerate(images):
                paths.append(os.path.join(work, f"view{i}.png"))
                with open(paths[-1], "wb") as f:
                    f.write(data)
            for c in concurrencies:
                log(f"infer_process  concurrency {c}: {infer_requests} requests")
                rows.append({**base, "mode": "infer_process", "variant": "fp32", "concurrency": c,
                             "requests": infer_requests,
                             **_infer_cell(path, paths, infer_requests, c, time_limit_s, work)})
        server_modes = [m for m in modes if m != "infer_process"]
        if server_modes:
            import ray
            from ray import serve

            from fast3d.serving import localray
            from fast3d.serving.app import ServeOptions, application

            localray.init(num_cpus=os.cpu_count(), log_to_driver=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                url = f"http://127.0.0.1:{port}/v1/reconstruct"
                for mode in server_modes:
                    mb = 1 if mode == "batching_off" else max_batch
                    exact = mode != "batching_variable"
                    for variant in variants:
                        opts = ServeOptions(path, max_batch=mb, max_wait_ms=max_wait_ms, threads=os.cpu_count(),
                                            fixed_batch=exact, **VARIANTS[variant])
                        # the queue holds every request of the largest cell: the load test measures latency, not 503s
                        serve.run(application(opts, max_queued_requests=max(concurrencies) * 2), name="fast3d",
                                  route_prefix="/")
                        for c in concurrencies:
                            log(f"{mode:<14} {variant:<11} concurrency {c}: {requests} requests")
                            rows.append({**base, "mode": mode, "variant": variant, "concurrency": c,
                                         "requests": requests, "max_batch": mb, "max_wait_ms": max_wait_ms,
                                         "fixed_batch": exact,
                                         **_server_cell(url, images, requests, c, time_limit_s, exact)})
                        serve.delete("fast3d")
            finally:
                serve.shutdown()
                ray.shutdown()
    write_rows(rows, out)
    return rows


def write_rows(rows: list[dict], out: str) -> str | None:
    """Append the rows to ``<out>/<device_slug>/serve.jsonl``; returns the path."""
    from fast3d.io.atomic import atomic_open

    if not rows:
        return None
    path = os.path.join(out, rows[0]["device_slug"], "serve.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = open(path).read() if os.path.isfile(path) else ""
    with atomic_open(path) as f:
        f.write(old + "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows: mode, variant, concurrency, p50/p95/p99 (ms), req/s, outcomes."""
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    lines = ["| mode | variant | concurrency | requests ok/sent | p50 ms | p95 ms | p99 ms | req/s | other outcomes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        other = ", ".join(f"{k} {v}" for k, v in sorted(r["outcomes"].items()) if k != "ok") or "-"
        lines.append(f"| {r['mode']} | {r.get('variant', 'fp32')} | {r['concurrency']} | {r['ok']}/{r['sent']} | {f(r['p50_ms'], '.0f')} | "
                     f"{f(r['p95_ms'], '.0f')} | {f(r['p99_ms'], '.0f')} | {f(r['rps'], '.2f')} | {other} |")
    return "\n".join(lines)
