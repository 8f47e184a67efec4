"""Fault tier: a Ray cluster of several nodes on this machine (Ray's own harness,
``ray.cluster_utils.Cluster``), the deployments placed on them through the custom resources the
Helm chart gives its node groups, real gRPC; faults injected for real (nodes removed, processes
killed). ``scripts/test.sh`` runs it with the rest, inside the private network namespace."""
