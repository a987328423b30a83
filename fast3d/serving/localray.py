"""The embedded local Ray of ``fast3d serve`` and ``fast3d loadtest``, every port on the loopback
interface.

Ray's node address decides where its processes listen (GCS, raylet, object manager, workers,
dashboard agent, runtime-env agent, Serve's controller and proxies' gRPC): by default it is the
machine's external address, so a local Ray would accept connections from the network. Ray uses the
loopback address instead when clusters are disabled (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, Ray's
default on macOS and Windows): :func:`init` sets that for Ray's processes before it starts them,
and the dashboard stays off. One server ignores the node address: Ray Serve (2.60) starts each
replica's inter-deployment gRPC server on ``[::]:0``, every interface, with no setting
(``ray/serve/_private/replica.py``); :func:`loopback_replica_grpc`, called in each replica,
puts it on the loopback interface too. Serve's HTTP proxy binds where ``--host`` says. To serve from a
reachable Ray (a cluster, or more nodes), start it yourself (``ray start --head``) and pass
``fast3d serve --address``.
"""

from __future__ import annotations

import os
import sys

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def init(**kwargs) -> None:
    """``ray.init(address="local", include_dashboard=False, **kwargs)`` with the node on the
    loopback interface (module docstring)."""
    os.environ.update(LOOPBACK_ENV)   # read by Ray's child processes as they start
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:         # this process imported Ray before: its constant was read then
        constants.ENABLE_RAY_CLUSTER = False
    import ray

    ray.init(address="local", include_dashboard=False, **kwargs)


def loopback_replica_grpc() -> None:
    """In a Serve replica of a loopback-only Ray (its environment has :data:`LOOPBACK_ENV`), make
    the replica's inter-deployment gRPC server bind 127.0.0.1 instead of every interface (the
    module docstring); elsewhere (a cluster joined with ``--address``) leave it as Ray has it."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    import ray
    from ray.serve._private import replica

    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None:   # the private hook this relies on moved: refuse rather than listen on [::]
        raise RuntimeError(f"fast3d's loopback-only local Ray needs ray.serve._private.replica."
                           f"add_port_to_grpc_server (Ray Serve 2.60); Ray {ray.__version__} has none: "
                           "install the tested Ray version or start Ray yourself and pass --address")
    if getattr(add_port, "fast3d_loopback", False):
        return

    def loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return add_port(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0") else address)

    loopback.fast3d_loopback = True
    replica.add_port_to_grpc_server = loopback
