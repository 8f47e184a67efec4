"""``helm/exaone-cluster/values.schema.json``: the chart's values, strictly (unknown keys,
negative counts and wrong types are refused by ``helm install`` and ``helm lint``). Its
``config`` section is ClusterConfig's own JSON schema (pydantic), less ``model_path``, which the
chart sets, so values and the Serve application's arguments cannot drift apart.

    .venv/bin/python -m cluster.helm_schema helm/exaone-cluster/values.schema.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        out["required"] = list(required)
    return out


STRING = {"type": "string"}
BOOL = {"type": "boolean"}
COUNT = {"type": "integer", "minimum": 0}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
QUANTITY = {"type": ["string", "number"]}
RESOURCES = _obj(
    {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    },
    ("requests", "limits"),
)
SERVICE = _obj({"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]}, "port": PORT})
PLACEMENT = {
    "nodeSelector": {"type": "object", "additionalProperties": STRING},
    "tolerations": {"type": "array", "items": {"type": "object"}},
}
LABELS = {"type": "object", "additionalProperties": STRING}
# A NetworkPolicy peer (the rendered policy is checked by the API server; this catches typos).
PEER = {
    **_obj(
        {
            "podSelector": {"type": "object"},
            "namespaceSelector": {"type": "object"},
            "ipBlock": _obj(
                {"cidr": STRING, "except": {"type": "array", "items": STRING}}, ("cidr",)
            ),
        }
    ),
    "minProperties": 1,
}
# Pods by namespace and labels (empty: any).
PODS = _obj({"namespace": STRING, "podLabels": LABELS})


def _workers() -> dict[str, Any]:
    return _obj(
        {
            "replicas": COUNT,
            "minReplicas": COUNT,
            "maxReplicas": {"type": "integer", "minimum": 1},
            "gpus": COUNT,
            "slots": {"type": "integer", "minimum": 1},
            "resources": RESOURCES,
            **PLACEMENT,
        },
        ("replicas", "minReplicas", "maxReplicas", "gpus", "slots", "resources"),
    )


def cluster_config_schema() -> dict[str, Any]:
    from cluster.config import ClusterConfig

    schema = ClusterConfig.model_json_schema()
    schema["properties"].pop("model_path")
    schema["required"] = [r for r in schema.get("required", []) if r != "model_path"]
    if not schema["required"]:
        schema.pop("required")
    schema.pop("title", None)
    return schema


def values_schema() -> dict[str, Any]:
    config = cluster_config_schema()
    defs = config.pop("$defs", {})
    schema = _obj(
        {
            "image": _obj(
                {
                    "repository": STRING,
                    "tag": STRING,
                    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                },
                ("repository", "tag"),
            ),
            "imagePullSecrets": {"type": "array", "items": _obj({"name": STRING}, ("name",))},
            "rayVersion": STRING,
            "rayAuth": _obj({"enabled": BOOL, "existingSecret": STRING}),
            "prefixCache": _obj({"macKey": _obj({"existingSecret": STRING, "key": STRING})}),
            "model": _obj(
                {
                    "mountPath": STRING,
                    "pvc": _obj(
                        {
                            "existingClaim": STRING,
                            "create": BOOL,
                            "size": STRING,
                            "storageClassName": STRING,
                            "accessModes": {"type": "array", "items": STRING},
                        }
                    ),
                    "hostPath": STRING,
                    "fetch": _obj(
                        {
                            "enabled": BOOL,
                            "image": STRING,
                            "command": {"type": "array", "items": STRING},
                            "env": {"type": "array", "items": {"type": "object"}},
                        }
                    ),
                },
                ("mountPath",),
            ),
            "config": config,
            "grpc": _obj({"port": PORT, "service": SERVICE, "tls": _obj({"secretName": STRING})}),
            "openai": _obj({"enabled": BOOL, "port": PORT, "service": SERVICE}),
            "dashboard": _obj({"service": SERVICE}),
            "head": _obj({"resources": RESOURCES, **PLACEMENT}),
            "attentionWorkers": _workers(),
            "expertWorkers": _workers(),
            "redis": _obj(
                {
                    "enabled": BOOL,
                    "externalUrl": STRING,
                    "image": _obj({"repository": STRING, "tag": STRING}),
                    "password": _obj({"existingSecret": STRING, "key": STRING, "value": STRING}),
                    "maxmemory": STRING,
                    "maxmemoryPolicy": {
                        "enum": [
                            "volatile-lru",
                            "allkeys-lru",
                            "volatile-lfu",
                            "allkeys-lfu",
                            "volatile-ttl",
                            "noeviction",
                        ]
                    },
                    "resources": RESOURCES,
                }
            ),
            "gcsFaultTolerance": _obj(
                {
                    "enabled": BOOL,
                    "redisAddress": STRING,
                    "passwordSecret": _obj({"name": STRING, "key": STRING}),
                }
            ),
            "serviceMonitor": _obj({"enabled": BOOL, "interval": STRING, "labels": LABELS}),
            "podDisruptionBudget": _obj({"enabled": BOOL, "maxUnavailable": COUNT}),
            "networkPolicy": _obj(
                {
                    "enabled": BOOL,
                    "grpcFrom": {"type": "array", "items": PEER},
                    "kuberayOperator": PODS,
                    "prometheus": PODS,
                }
            ),
            "podSecurityContext": {"type": "object"},
        }
    )
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["$defs"] = defs
    return schema


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m cluster.helm_schema OUT.json")
    Path(sys.argv[1]).write_text(json.dumps(values_schema(), indent=1) + "\n")


if __name__ == "__main__":
    main()
