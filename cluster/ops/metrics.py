"""The cluster's metrics, through ``ray.util.metrics``: Ray exports them in Prometheus
format from every node's metrics agent (prefixed ``ray_``), where Ray's Grafana integration and
our dashboard (cluster/grafana/exaone.json) read them.

Each deployment owns one recorder, created in its replica process:
- ``RouterMetrics``: per request, from the final message: time to first token, time per output
  token, end-to-end latency, tokens (prompt, cached, output, drafted, accepted), finish reasons.
- ``ShardMetrics``: every few seconds, from the attention replica's stats: running and waiting
  requests, KV-cache use, prefix-cache lookups and hits, MTP acceptance per draft position, and
  the expert groups' load imbalance as this replica dispatches it.
- ``ExpertMetrics``: every few seconds, from an expert replica's stats: tokens/s per (layer,
  expert) and per group, busy fraction, seconds from start to ready.
- ``BalancerMetrics``: the measured imbalance, the expert map version, rebalances.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

from protos.exaone.v1.generation_pb2 import FinishReason

LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
PER_TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
HOP_S = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]


class _Totals:
    """Counters fed from cumulative totals (stats report totals; counters take increments)."""

    def __init__(self):
        self._last: dict[tuple, float] = {}

    def add(self, counter: Counter, total: float, tags: dict[str, str]) -> None:
        key = (counter.info["name"], tuple(sorted(tags.items())))
        delta = total - self._last.get(key, 0.0)
        if delta > 0:
            counter.inc(delta, tags=tags)
        self._last[key] = total


class RouterMetrics:
    def __init__(self):
        self.requests = Counter(
            "exaone_requests",
            "Finished Generate calls, by finish reason.",
            tag_keys=("finish_reason",),
        )
        self.errors = Counter(
            "exaone_request_errors",
            "Generate calls that ended with an error status, by gRPC code.",
            tag_keys=("code",),
        )
        self.ttft = Histogram(
            "exaone_time_to_first_token_seconds",
            "Arrival at the router to the first token.",
            boundaries=LATENCY_S,
        )
        self.tpot = Histogram(
            "exaone_time_per_output_token_seconds",
            "Mean time between output tokens of a request.",
            boundaries=PER_TOKEN_S,
        )
        self.e2e = Histogram(
            "exaone_request_latency_seconds", "Arrival to the final message.", boundaries=LATENCY_S
        )
        self.tokens = Counter(
            "exaone_tokens",
            "Tokens by kind: prompt, cached_prompt, output, drafted, accepted_draft.",
            tag_keys=("kind",),
        )
        self.hop = Histogram(
            "exaone_stream_hop_seconds",
            "A token delta's time per hop of the "
            "served path: engine_to_publish, publish_to_router, router "
            "(router.hops; at most one sample of each hop per 0.1 s).",
            boundaries=HOP_S,
            tag_keys=("hop",),
        )

    def hop_observed(self, hop: str, seconds: float) -> None:
        self.hop.observe(max(seconds, 0.0), tags={"hop": hop})

    def finished(self, final) -> None:
        """One stream's final message (exaone.v1 Final), from either protocol."""
        usage, timings = final.usage, final.timings
        reason = FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
        self.requests.inc(1, tags={"finish_reason": reason})
        ttft_s, total_s = timings.time_to_first_token_ms / 1e3, timings.total_ms / 1e3
        self.ttft.observe(ttft_s)
        self.e2e.observe(total_s)
        if usage.completion_tokens > 1:
            self.tpot.observe((total_s - ttft_s) / (usage.completion_tokens - 1))
        for kind, n in (
            ("prompt", usage.prompt_tokens),
            ("cached_prompt", usage.cached_prompt_tokens),
            ("output", usage.completion_tokens),
            ("drafted", usage.drafted_tokens),
            ("accepted_draft", usage.accepted_draft_tokens),
        ):
            if n:
                self.tokens.inc(n, tags={"kind": kind})

    def failed(self, code: str) -> None:
        self.errors.inc(1, tags={"code": code})


class ShardMetrics:
    def __init__(self, replica: str):
        self.tags = {"replica": replica}
        keys = ("replica",)
        self.running = Gauge("exaone_running_requests", "Sequences being decoded.", keys)
        self.waiting = Gauge("exaone_waiting_requests", "Requests queued (queue depth).", keys)
        self.kv_usage = Gauge("exaone_kv_cache_usage", "Global-layer KV blocks in use (0-1).", keys)
        self.prefix = Counter(
            "exaone_prefix_cache_lookups",
            "Prefix-cache lookups by result: local_hit, redis_hit, miss.",
            ("replica", "result"),
        )
        self.redis_issues = Counter(
            "exaone_prefix_cache_redis_issues",
            "Prefix-cache Redis "
            "trouble by kind: error (failed calls), rejected (values "
            "failing their checks or MAC), dropped (writes not queued: "
            "the write queue was full).",
            ("replica", "kind"),
        )
        self.acceptance = Gauge(
            "exaone_mtp_acceptance_rate",
            "Accepted / drafted MTP tokens at each draft position, since start.",
            ("replica", "position"),
        )
        self.imbalance = Gauge(
            "exaone_expert_imbalance",
            "Busiest expert group's slots over the "
            "mean group's, summed over MoE layers, as this replica dispatches "
            "(1 = even).",
            keys,
        )
        self._totals = _Totals()

    def update(self, stats, acceptance=None, imbalance: float | None = None) -> None:
        self.running.set(stats.num_running, tags=self.tags)
        self.waiting.set(stats.num_waiting, tags=self.tags)
        self.kv_usage.set(stats.num_blocks_in_use / max(stats.num_blocks_total, 1), tags=self.tags)
        if (p := stats.prefix_cache) is not None:
            for result, total in (
                ("local_hit", p.num_local_hits),
                ("redis_hit", p.num_redis_hits),
                ("miss", p.num_misses),
            ):
                self._totals.add(self.prefix, total, {**self.tags, "result": result})
            for kind, total in (
                ("error", p.num_redis_errors),
                ("rejected", p.num_corrupt_values),
                ("dropped", p.num_redis_writes_dropped),
            ):
                self._totals.add(self.redis_issues, total, {**self.tags, "kind": kind})
        if acceptance is not None:
            for i, (a, d) in enumerate(zip(acceptance.accepted, acceptance.drafted, strict=True)):
                if d:
                    self.acceptance.set(a / d, tags={**self.tags, "position": str(i + 1)})
        if imbalance is not None:
            self.imbalance.set(imbalance, tags=self.tags)


class ExpertMetrics:
    def __init__(self, group: int, replica: str):
        self.tags = {"group": str(group), "replica": replica}
        keys = ("group", "replica")
        self.expert = Gauge(
            "exaone_expert_tokens_per_s",
            "Slots per second an expert served, by MoE layer and expert id.",
            (*keys, "layer", "expert"),
        )
        self.group = Gauge(
            "exaone_expert_group_tokens_per_s",
            "Slots per second per MoE layer an expert replica served.",
            keys,
        )
        self.busy = Gauge(
            "exaone_expert_group_busy", "Fraction of time an expert replica spent computing.", keys
        )
        self.ready = Gauge(
            "exaone_expert_replica_ready_seconds",
            "Seconds from an expert replica's start to ready (it loads only its experts).",
            keys,
        )

    def update(self, stats) -> None:
        self.group.set(stats.tokens_per_s, tags=self.tags)
        self.busy.set(stats.busy, tags=self.tags)
        self.ready.set(stats.ready_s, tags=self.tags)
        held = set(stats.expert_ids)
        for layer, row in zip(stats.layers, stats.window_counts, strict=True):
            for expert, n in enumerate(row):
                if expert in held:
                    self.expert.set(
                        n / max(stats.window_s, 1e-3),
                        tags={**self.tags, "layer": str(layer), "expert": str(expert)},
                    )


class BalancerMetrics:
    def __init__(self):
        self.imbalance = Gauge(
            "exaone_expert_measured_imbalance",
            "Busiest group's served "
            "slots over the mean group's, summed over MoE layers (1 = "
            "even).",
        )
        self.version = Gauge("exaone_expert_map_version", "Published expert map version.")
        self.rebalances = Counter("exaone_expert_rebalances", "Rebalances started.")
        self._totals = _Totals()

    def update(self, measured_imbalance: float, version: int, num_rebalances: int) -> None:
        self.imbalance.set(measured_imbalance)
        self.version.set(version)
        self._totals.add(self.rebalances, num_rebalances, {})
