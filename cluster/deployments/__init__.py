"""The Serve deployments, one file each (``router``, ``attention``, ``expert_group``,
``expert_balancer``; ``cluster.app.build_app`` binds them), and the served path's pieces they are
made of: the Router's own gRPC server, the attention replica's step stream and the router's side
of it, the expert transport, prefix-affinity replica choice."""
