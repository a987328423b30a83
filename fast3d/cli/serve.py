"""``fast3d serve``: the image-to-3D HTTP server on Ray Serve; ``fast3d loadtest``: its bounded
load test against one ``fast3d infer`` process per request."""

from __future__ import annotations

import os
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def read_api_key(path: str) -> str:
    """The bearer token in ``path`` (surrounding whitespace stripped, at least 16 characters)."""
    try:
        with open(path) as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"--api-key-file {path!r} cannot be read ({e.strerror})") from None
    if len(key) < 16 or any(c.isspace() for c in key):
        raise ValueError(f"--api-key-file {path!r} must hold one token of at least 16 characters, no spaces")
    return key


def cmd_serve(args, fail) -> int:
    try:
        if args.host not in LOOPBACK and not args.api_key_file:
            raise ValueError(f"--host {args.host}: binding beyond the loopback interface needs --api-key-file "
                             f"(clients then send Authorization: Bearer KEY)")
        key = read_api_key(args.api_key_file) if args.api_key_file else None
        if args.cuda_graphs and args.address is None:
            _check_cuda_graphs(args.device)
        from fast3d.models import checkpoints
        from fast3d.serving.app import ServeOptions, application, options_json

        model_dir = checkpoints.resolve_checkpoint(args.checkpoint)
        mv_dir, views = None, None
        if args.mv_model is not None:
            from fast3d.inference.generate import parse_views
            from fast3d.models.mvdiff import MVDiffConfig

            mv_dir = checkpoints.resolve_checkpoint(args.mv_model, what="--mv-model")
            if checkpoints.model_type(mv_dir) != "mvdiff":
                raise ValueError(f"--mv-model {args.mv_model!r} holds a {checkpoints.model_type(mv_dir)!r} model; the "
                                 f"generate model needs an image-conditioned multi-view diffusion model ('mvdiff')")
            views = parse_views(args.views, checkpoints.read_config(mv_dir, "mvdiff", MVDiffConfig).num_views)
        elif args.views is not None:
            raise ValueError("--views applies with --mv-model (the views of the generate model the reconstructor takes)")
        opts = ServeOptions(model_dir, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                            deadline_s=args.deadline_s, max_body_bytes=args.max_body_mb * 1024 * 1024,
                            turntable_frames=args.turntable_frames, api_key=key, device=args.device,
                            threads=args.threads, fixed_batch=False if args.variable_batch else None,
                            mv_model=mv_dir, views=views, dtype=args.dtype, compile=args.compile,
                            cuda_graphs=args.cuda_graphs)
        app = application(opts, replicas=args.replicas, max_ongoing_requests=args.max_ongoing,
                          max_queued_requests=args.max_queued)
    except ValueError as e:
        return fail("serve", str(e))
    return serve_forever(app, opts, args.host, args.port, args.address, options_json(opts))


def _check_cuda_graphs(device: str | None) -> None:
    """Refuse --cuda-graphs before Ray starts when the local replicas would run on the CPU (on a
    cluster, ``--address``, each replica checks its own device as it loads)."""
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not dev.startswith("cuda"):
        why = "--device cpu" if device else "this machine has no CUDA device"
        raise ValueError(f"--cuda-graphs needs a CUDA device ({why}): a CUDA graph replays GPU kernels captured "
                         f"once; serve without --cuda-graphs on the CPU")


def serve_forever(app, opts, host: str, port: int, address: str | None, described: str) -> int:
    """Start a local Ray (:mod:`fast3d.serving.localray`: loopback only) or join ``address``, run
    the app, print the ready line, block until SIGTERM or SIGINT, then drain: the app is deleted
    (each replica finishes the requests it holds, up to the deadline) before Ray stops."""
    import signal
    import threading

    import ray
    from ray import serve

    if address is None:
        from fast3d.serving import localray

        localray.init(log_to_driver=True)   # every Ray port on 127.0.0.1
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own (aborting) handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.deadline_s + 30})
        serve.run(app, name="fast3d", route_prefix="/")
        print(f"fast3d serve: ready on http://{host}:{port} ({described})", flush=True)
        stop.wait()
        print("fast3d serve: draining", flush=True)
        serve.delete("fast3d")
    finally:
        if address is None:
            serve.shutdown()
        ray.shutdown()
    print("fast3d serve: stopped", flush=True)
    return 0


def cmd_loadtest(args, fail) -> int:
    from fast3d.serving import loadtest

    try:
        rows = loadtest.run(args.checkpoint, out=args.out, concurrencies=args.concurrency, requests=args.requests,
                            infer_requests=args.infer_requests, time_limit_s=args.time_limit,
                            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, modes=args.mode or loadtest.MODES,
                            port=args.port, variants=args.variant or ["fp32"],
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    except ValueError as e:
        return fail("loadtest", str(e))
    print(f"{rows[0]['device']}, {rows[0]['checkpoint']}\n{loadtest.format_table(rows)}")
    return 0


def register(sub, fail) -> None:
    s = sub.add_parser("serve", help="image-to-3D over HTTP (Ray Serve, dynamic batching); blocks until SIGTERM")
    s.add_argument("--checkpoint", required=True, help="LGM or LRM model, checkpoint or training run directory "
                                                       "(with --mv-model: the reconstructor)")
    s.add_argument("--mv-model", help="serve fast3d generate's image path: this multi-view diffusion (mvdiff) model's "
                                      "views of a request's one image, reconstructed by --checkpoint")
    s.add_argument("--views", help="with --mv-model: the views the reconstructor takes (as fast3d generate --views)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; any other "
                                                       "needs --api-key-file)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--replicas", type=int, default=1, help="model replicas (each one GPU where there are GPUs)")
    s.add_argument("--max-batch", type=int, default=8, help="largest batch (1: batching off)")
    s.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    s.add_argument("--max-ongoing", type=int, help="requests a replica holds (default 2 x --max-batch)")
    s.add_argument("--max-queued", type=int, help="requests queued beyond those before 503 (default 8 x --max-batch)")
    s.add_argument("--deadline-s", type=float, default=60.0, help="a request not answered by then gets 504")
    s.add_argument("--max-body-mb", type=int, default=64, help="largest request body (413 past it)")
    s.add_argument("--turntable-frames", type=int, default=12, help="frames of a requested turntable")
    s.add_argument("--address", help="join this Ray cluster (default: start a local Ray)")
    s.add_argument("--api-key-file", help="file holding the bearer token clients must send")
    s.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    s.add_argument("--threads", type=int, help="torch CPU threads per replica")
    s.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: the network under bf16 autocast (weights and outputs float32; default fp32)")
    s.add_argument("--compile", action="store_true", help="torch.compile the model's forward (compiled while it "
                                                          "warms up, for every batch size)")
    s.add_argument("--cuda-graphs", action="store_true",
                   help="capture the LGM's forward and turntable rasterization (its capacity mode) in a CUDA graph "
                        "per batch size (CUDA only)")
    s.add_argument("--variable-batch", action="store_true",
                   help="run each batch at its own size on the CPU too (default there: padded to --max-batch, so a "
                        "request's output is bitwise the same alone or batched)")
    s.set_defaults(fn=lambda a: cmd_serve(a, fail))

    s = sub.add_parser("loadtest", help="bounded loopback load test: one fast3d infer process per request vs the "
                                        "server with batching off and on (rows to profiling/serve)")
    s.add_argument("--checkpoint", required=True, help="LGM model directory")
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    s.add_argument("--requests", type=int, default=32, help="requests per server cell")
    s.add_argument("--infer-requests", type=int, default=8, help="requests per fast3d-infer cell")
    s.add_argument("--time-limit", type=float, default=120.0, help="seconds after which a cell starts no request")
    s.add_argument("--max-batch", type=int, default=8)
    s.add_argument("--max-wait-ms", type=float, default=5.0)
    s.add_argument("--mode", action="append", help="infer_process | batching_off | batching_on | batching_variable "
                                                   "(default: all)")
    s.add_argument("--variant", action="append",
                   help="the server modes' speed switches: fp32 | bf16 | compile | cuda_graphs | all (those this "
                        "machine can run); repeatable (default: fp32)")
    s.add_argument("--port", type=int, default=8123)
    s.add_argument("--out", default="profiling/serve", help="results folder")
    s.set_defaults(fn=lambda a: cmd_loadtest(a, fail))
