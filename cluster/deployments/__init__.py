"""The served path's pieces the Serve deployments (cluster.app) are made of: the Router's own
gRPC server, the attention replica's step stream and the router's side of it, the expert
transport, prefix-affinity replica choice."""
