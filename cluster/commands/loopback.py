"""Keep Ray Serve's own gRPC listeners on loopback for single-node runs.

Ray Serve 2.60 hard-codes ``[::]`` for the gRPC proxy port and for each replica's inter-deployment
gRPC server, with no setting to change it. ``bind_loopback`` runs in every Ray worker process
(``runtime_env={"worker_process_setup_hook": ...}``) and rewrites those addresses to 127.0.0.1.
Only for local clusters: on Kubernetes pods must listen on their pod IP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray.serve._private.grpc_util import gRPCGenericServer

HOOK = "cluster.commands.loopback.bind_loopback"
_PATCHED = "_loopback"  # set on our wrappers, so that a second call keeps them


def _loopback(address: str) -> str:
    return "127.0.0.1:" + address.rsplit(":", 1)[1] if address.startswith("[::]") else address


def bind_loopback() -> None:
    from ray.serve._private import default_impl, replica

    add_address, add_port = default_impl.add_grpc_address, replica.add_port_to_grpc_server
    if getattr(add_address, _PATCHED, False):
        return

    def add_grpc_address(grpc_server: gRPCGenericServer, server_address: str):
        return add_address(grpc_server, _loopback(server_address))

    def add_port_to_grpc_server(server, address: str):
        return add_port(server, _loopback(address))

    setattr(add_grpc_address, _PATCHED, True)
    setattr(add_port_to_grpc_server, _PATCHED, True)
    default_impl.add_grpc_address = add_grpc_address
    replica.add_port_to_grpc_server = add_port_to_grpc_server
