"""The ExpertBalancer deployment: the live expert balancer's one replica (the phases are
cluster.ops.rebalancer's)."""

from __future__ import annotations

import threading
import time
from typing import Any

from ray import serve

from cluster.config import ClusterConfig
from cluster.deployments.threads import Every


@serve.deployment(name="ExpertBalancer")
class ExpertBalancerDeployment:
    """The live expert balancer: replicas report their load and map version here and get back
    what to hold or dispatch with (cluster.ops.rebalancer.Rebalancer has the phases)."""

    def __init__(self, config: ClusterConfig):
        from cluster.ops.rebalancer import Rebalancer
        from replicas.experts.placement import ExpertMap

        cfg = config.read_model_config()
        placement = config.placement(cfg.num_experts)
        self.rebalancer = Rebalancer.starting(
            ExpertMap.of(placement),
            cfg.moe_layers,
            config.experts.balancer.rebalance_config(),
            epoch=int(time.time()),
        )
        self.lock = threading.Lock()
        from cluster.ops.metrics import BalancerMetrics

        self.metrics = BalancerMetrics()
        self.metrics_loop = Every(config.metrics_interval_s, self._update_metrics).start()

    def _update_metrics(self) -> None:
        with self.lock:
            r, now = self.rebalancer, time.time()
            rebalances = sum(h.get("reason") != "start" for h in r.history)
            args = (r.measured_imbalance(now), r.published.version, rebalances)
        self.metrics.update(*args)

    def initial_holdings(self, group: int):
        with self.lock:
            return self.rebalancer.initial_holdings(group)

    def expert_report(self, replica: str, group: int, version: int, counts):
        with self.lock:
            return self.rebalancer.expert_report(replica, group, version, counts, time.time())

    def attention_report(self, replica: str, version: int):
        with self.lock:
            return self.rebalancer.attention_report(replica, version, time.time())

    def status(self) -> dict[str, Any]:
        with self.lock:
            r, now = self.rebalancer, time.time()
            return {
                "phase": r.phase,
                "version": r.published.version,
                "imbalance": r.imbalance(now),
                "measured_imbalance": r.measured_imbalance(now),
                "history": list(r.history),
                "holdings": {layer: r.published.holdings(layer) for layer in r.moe_layers},
                "load": r.load(now),
            }
