"""Rendering the Helm chart (helm/exaone-cluster) offline, and reading the objects it renders: what
the chart's tests share."""

from __future__ import annotations

import base64
from pathlib import Path

import helm_python as helm
import yaml

from cluster.commands.serve import BUNDLED_MODEL
from cluster.config import ClusterConfig
from tests.paths import ROOT

CHART = ROOT / "helm" / "exaone-cluster"
KUBERAY = ROOT / "tests" / "fixtures" / "kuberay" / "rayservice-ray.io-v1.json"  # vendored
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
INGRESS = "exaone_ingress"  # the head's custom resource, which the Router replicas ask for


def render_chart(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    try:
        out = chart.render(values, name="demo", namespace="llm", is_install=True)
    finally:
        chart.close()
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def load_values(path: Path | None) -> dict:
    return yaml.safe_load(path.read_text()) if path else {}


NAMES = "demo-exaone-cluster"  # the fullname of the release the tests render
RAY_SELECTOR = {
    "app.kubernetes.io/name": "exaone-cluster",
    "app.kubernetes.io/instance": "demo",
    "exaone.ai/ray": "true",
}


def by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def secret_value(docs: list[dict], name: str, key: str) -> str:
    return base64.b64decode(by_name(docs, "Secret")[name]["data"][key]).decode()


def pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(role, pod template) of every pod the release runs: the Ray head and workers, Redis."""
    pods = []
    for doc in docs:
        if doc["kind"] == "RayService":
            cluster = doc["spec"]["rayClusterConfig"]
            pods.append(("head", cluster["headGroupSpec"]["template"]))
            pods += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
        elif doc["kind"] == "StatefulSet":
            pods.append(("redis", doc["spec"]["template"]))
    return pods


def ray_containers(docs: list[dict]) -> list[dict]:
    return [
        c for role, pod in pod_templates(docs) if role != "redis" for c in pod["spec"]["containers"]
    ]


def env_by_name(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def parse_cluster_config(args: dict) -> ClusterConfig:
    """ClusterConfig as build_app parses the arguments. model_path (a mount in the pods) is
    pointed at the bundled checkpoint, so the checks that read the checkpoint run too."""
    return ClusterConfig.model_validate({**args, "model_path": str(BUNDLED_MODEL)})
