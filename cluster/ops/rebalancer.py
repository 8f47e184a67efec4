"""Live expert rebalancing: the phases that move a running cluster from one expert map
to the next without failing a request. Pure state machine, driven by the replicas' reports; the
``ExpertBalancer`` Serve deployment (cluster/deployments/expert_balancer.py) only feeds it.

Every expert replica reports about once a second (its group, the map version it has prepared,
the tokens per layer and expert it served over its window) and gets back what to hold. Every
attention replica reports the map version it dispatches with and gets back the published map.

Phases of one rebalance (``ExpertMap.version`` v -> v + 1):

1. ``idle``: when the measured imbalance (balancer.imbalance on the reported loads) is above
   ``threshold`` and ``balance`` finds a map at least ``min_gain`` better, that map becomes the
   target and the phase ``prepare``.
2. ``prepare``: expert replicas load the experts the target adds to their group, keeping the old
   ones (calls made with either map then work). When every live expert replica has, the target
   is published: ``switch``.
3. ``switch``: attention replicas adopt the published map between two steps. When every live one
   has: back to ``idle``, where expert replicas are told to commit: drop the experts the map no
   longer gives them. The next rebalance waits ``min_interval_s`` from this one's start.

A replica that has not reported for ``stale_s`` is taken for gone (Serve replaced or removed it)
and no longer waited for. A new expert replica loads its group's share of the published map.
A balancer that restarts (``Rebalancer.starting``) numbers its maps above its predecessor's and
first walks the cluster back to the initial map through the same phases.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.ops.balancer import balance, busiest_over_mean, imbalance
from replicas.experts.placement import ExpertMap, Holdings


@dataclass(frozen=True)
class RebalanceConfig:
    threshold: float = 1.2
    """Rebalance when the measured imbalance is above this."""
    min_gain: float = 0.05
    """... and the new map's predicted imbalance is at least this fraction lower."""
    redundant_slots: int = 1
    """Expert slots per group and layer beyond an even share: room for copies of hot experts."""
    min_interval_s: float = 30.0
    stale_s: float = 10.0
    min_tokens: int = 256
    """Reported slots (all layers) needed before the load is trusted."""


@dataclass(frozen=True)
class ExpertInstruction:
    version: int
    holdings: dict[int, tuple[int, ...]]
    """{MoE layer: expert ids} the replica's group should hold (prepare loads them)."""
    commit: bool
    """Drop everything else (the cluster has switched)."""


@dataclass
class _ExpertReport:
    group: int
    version: int
    counts: dict[int, list[int]]
    """{MoE layer: slots per global expert id} over the replica's window."""
    time: float


@dataclass
class Rebalancer:
    published: ExpertMap
    moe_layers: tuple[int, ...]
    config: RebalanceConfig = RebalanceConfig()
    phase: str = "idle"
    target: ExpertMap | None = None
    last_started: float = float("-inf")
    experts: dict[str, _ExpertReport] = field(default_factory=dict)
    attention: dict[str, tuple[int, float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    """One entry per rebalance: versions, times and imbalance before/predicted."""

    @classmethod
    def starting(
        cls, initial: ExpertMap, moe_layers: Sequence[int], config: RebalanceConfig, epoch: int
    ) -> Rebalancer:
        """A balancer that may be replacing one that died: replicas may hold a later map than
        ``initial``. Its maps are numbered from ``epoch`` (seconds since 1970 at start, above
        any version an earlier balancer reached), and it begins by moving the cluster back to
        ``initial`` the safe way (prepare, then switch, then commit) instead of telling expert
        replicas to drop what attention replicas may still dispatch to."""
        first = ExpertMap(initial.num_experts, initial.default, initial.layers, epoch)
        return cls(
            first,
            tuple(moe_layers),
            config,
            phase="prepare",
            target=first,
            history=[{"version": epoch, "started": None, "reason": "start"}],
        )

    # ---- reports --------------------------------------------------------------------------------
    def expert_report(
        self, replica: str, group: int, version: int, counts: dict[int, Sequence[int]], now: float
    ) -> ExpertInstruction:
        """An expert replica's report (``counts``: {MoE layer: slots per expert id}) -> what
        its group should hold."""
        rows = {layer: list(row) for layer, row in counts.items()}
        self.experts[replica] = _ExpertReport(group, version, rows, now)
        self.tick(now)
        goal = self.target if self.phase == "prepare" and self.target else self.published
        return ExpertInstruction(
            goal.version, goal.group_holdings(group, self.moe_layers), commit=self.phase == "idle"
        )

    def attention_report(self, replica: str, version: int, now: float) -> ExpertMap:
        self.attention[replica] = (version, now)
        self.tick(now)
        return self.published

    def initial_holdings(self, group: int) -> tuple[int, dict[int, tuple[int, ...]]]:
        """What a starting expert replica of ``group`` loads -> (version, holdings)."""
        return self.published.version, self.published.group_holdings(group, self.moe_layers)

    # ---- state ----------------------------------------------------------------------------------
    def _live_experts(self, now: float) -> list[_ExpertReport]:
        return [r for r in self.experts.values() if now - r.time <= self.config.stale_s]

    def load(self, now: float) -> list[list[float]]:
        """[L][E] slots per MoE layer and expert over the live replicas' windows."""
        e = self.published.num_experts
        total = {layer: [0.0] * e for layer in self.moe_layers}
        for r in self._live_experts(now):
            for layer, counts in r.counts.items():
                if layer in total:
                    total[layer] = [a + b for a, b in zip(total[layer], counts, strict=False)]
        return [total[layer] for layer in self.moe_layers]

    def holdings(self, expert_map: ExpertMap) -> list[Holdings]:
        return [expert_map.holdings(layer) for layer in self.moe_layers]

    def imbalance(self, now: float) -> float:
        """The published map's imbalance under the current load (1.0 with no load)."""
        return imbalance(self.holdings(self.published), self.load(now))

    def measured_imbalance(self, now: float) -> float:
        """Imbalance of the slots the groups actually served (their live replicas' windows):
        sum over layers of the busiest group's slots over the mean group's (1.0: no load)."""
        live = self._live_experts(now)
        per_layer = []
        for layer in self.moe_layers:
            per_group = [0.0] * self.published.num_groups
            for r in live:
                per_group[r.group] += sum(r.counts.get(layer, ()))
            per_layer.append(per_group)
        return busiest_over_mean(per_layer)

    def tick(self, now: float) -> None:
        c = self.config
        if self.phase == "idle":
            reporting = {r.group for r in self._live_experts(now)}
            if len(reporting) < self.published.num_groups:
                return  # decide on the whole picture: every group has reported
            load = self.load(now)
            if sum(map(sum, load)) < c.min_tokens or now - self.last_started < c.min_interval_s:
                return
            before = imbalance(self.holdings(self.published), load)
            if before <= c.threshold:
                return
            groups = self.published.num_groups
            slots = -(-self.published.num_experts // groups) + c.redundant_slots
            layers = balance(load, groups, slots)
            after = imbalance(layers, load)
            if after > before * (1 - c.min_gain):
                return
            self.target = ExpertMap(
                self.published.num_experts,
                self.published.default,
                tuple(zip(self.moe_layers, layers, strict=True)),
                self.published.version + 1,
            )
            self.phase, self.last_started = "prepare", now
            self.history.append(
                {
                    "version": self.target.version,
                    "started": now,
                    "imbalance_before": round(before, 3),
                    "imbalance_predicted": round(after, 3),
                }
            )
        elif self.phase == "prepare":
            assert self.target is not None
            live = self._live_experts(now)
            if live and all(r.version >= self.target.version for r in live):
                self.published, self.phase = self.target, "switch"
        elif self.phase == "switch":
            versions = [v for v, t in self.attention.values() if now - t <= c.stale_s]
            if all(v >= self.published.version for v in versions):
                self.phase, self.target = "idle", None
                self.history[-1]["switched"] = now
