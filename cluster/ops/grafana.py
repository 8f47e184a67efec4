"""The Grafana dashboard for Ray's Grafana integration: latency, throughput, queues,
KV use, MTP acceptance, prefix-cache hits, expert-group load and imbalance, and a heatmap of the
load per expert. Every query reads a metric cluster/ops/metrics.py defines (Ray prefixes ``ray_``).

    .venv/bin/python -m cluster.ops.grafana cluster/grafana/exaone.json

writes the committed JSON (tests check the two agree). Import it in Grafana, or put it in the
folder Ray's Grafana provisions dashboards from (``/tmp/ray/session_latest/metrics/grafana/
dashboards``); its data source is the ``datasource`` variable (default: Prometheus).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
WIDTH = 12


def _panel(
    i: int,
    title: str,
    targets: list[tuple[str, str]],
    unit: str = "short",
    kind: str = "timeseries",
    height: int = 8,
) -> dict[str, Any]:
    return {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": WIDTH, "x": (i % 2) * WIDTH, "y": (i // 2) * height},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + j),
            }
            for j, (expr, legend) in enumerate(targets)
        ],
    }


def _quantiles(metric: str) -> list[tuple[str, str]]:
    return [
        (f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket[1m])))", f"p{q * 100:g}")
        for q in (0.5, 0.9, 0.99)
    ]


PANELS: list[tuple[str, list[tuple[str, str]], str, str]] = [
    (
        "Time to first token",
        _quantiles("ray_exaone_time_to_first_token_seconds"),
        "s",
        "timeseries",
    ),
    (
        "Time per output token",
        _quantiles("ray_exaone_time_per_output_token_seconds"),
        "s",
        "timeseries",
    ),
    (
        "Tokens per second",
        [("sum by (kind) (rate(ray_exaone_tokens_total[1m]))", "{{kind}}")],
        "short",
        "timeseries",
    ),
    (
        "Requests per second by finish reason",
        [
            ("sum by (finish_reason) (rate(ray_exaone_requests_total[1m]))", "{{finish_reason}}"),
            ("sum by (code) (rate(ray_exaone_request_errors_total[1m]))", "error {{code}}"),
        ],
        "reqps",
        "timeseries",
    ),
    (
        "Queue depth and running sequences",
        [
            ("sum by (replica) (ray_exaone_waiting_requests)", "waiting {{replica}}"),
            ("sum by (replica) (ray_exaone_running_requests)", "running {{replica}}"),
        ],
        "short",
        "timeseries",
    ),
    (
        "KV cache use",
        [("max by (replica) (ray_exaone_kv_cache_usage)", "{{replica}}")],
        "percentunit",
        "timeseries",
    ),
    (
        "MTP acceptance per draft position",
        [("avg by (position) (ray_exaone_mtp_acceptance_rate)", "position {{position}}")],
        "percentunit",
        "timeseries",
    ),
    (
        "Prefix-cache hit rate",
        [
            (
                'sum(rate(ray_exaone_prefix_cache_lookups_total{result!="miss"}[1m])) / '
                "sum(rate(ray_exaone_prefix_cache_lookups_total[1m]))",
                "hits / lookups",
            )
        ],
        "percentunit",
        "timeseries",
    ),
    (
        "Served-path hops (p50, p99): step end -> sent -> router -> gRPC",
        [
            (
                f"histogram_quantile({q}, sum by (le, hop) "
                f"(rate(ray_exaone_stream_hop_seconds_bucket[1m])))",
                f"{{{{hop}}}} p{q * 100:g}",
            )
            for q in (0.5, 0.99)
        ],
        "s",
        "timeseries",
    ),
    (
        "Prefix-cache Redis issues (errors, rejected values, dropped writes)",
        [("sum by (kind) (rate(ray_exaone_prefix_cache_redis_issues_total[1m]))", "{{kind}}")],
        "short",
        "timeseries",
    ),
    (
        "Expert group load (slots/s per MoE layer)",
        [("sum by (group) (ray_exaone_expert_group_tokens_per_s)", "group {{group}}")],
        "short",
        "timeseries",
    ),
    (
        "Expert replicas busy",
        [("ray_exaone_expert_group_busy", "g{{group}} {{replica}}")],
        "percentunit",
        "timeseries",
    ),
    (
        "Expert imbalance (busiest group / mean)",
        [
            ("max(ray_exaone_expert_imbalance)", "as dispatched"),
            ("max(ray_exaone_expert_measured_imbalance)", "served (balancer)"),
        ],
        "short",
        "timeseries",
    ),
    (
        "Expert replicas and start-up time",
        [
            ("count by (group) (ray_exaone_expert_replica_ready_seconds)", "replicas g{{group}}"),
            ("max by (group) (ray_exaone_expert_replica_ready_seconds)", "ready s g{{group}}"),
        ],
        "short",
        "timeseries",
    ),
    (
        "Expert load heatmap (slots/s by expert, all layers)",
        [("sum by (expert) (ray_exaone_expert_tokens_per_s)", "{{expert}}")],
        "short",
        "heatmap",
    ),
    (
        "Expert load by layer and expert",
        [("sum by (layer, expert) (ray_exaone_expert_tokens_per_s)", "L{{layer}} e{{expert}}")],
        "short",
        "heatmap",
    ),
]


def dashboard() -> dict[str, Any]:
    return {
        "title": "exaone-cluster",
        "uid": "exaone-cluster",
        "tags": ["exaone", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "panels": [
            _panel(i, title, targets, unit, kind)
            for i, (title, targets, unit, kind) in enumerate(PANELS)
        ],
    }


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m cluster.ops.grafana OUT.json")
    Path(sys.argv[1]).write_text(json.dumps(dashboard(), indent=1) + "\n")


if __name__ == "__main__":
    main()
