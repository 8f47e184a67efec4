"""The Helm chart (helm/exaone-cluster), without a cluster: strict lint, offline render with the
defaults and the CI values files, every Kubernetes object validated strictly, the RayService
against KubeRay's CRD schema, the Serve arguments against ClusterConfig, and values.schema.json
refusing bad values. helm-python-sdk (Helm's Go SDK, no binary) and kubernetes-validate."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.commands.serve import BUNDLED_MODEL
from cluster.config import ClusterConfig
from cluster.helm_schema import values_schema

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "exaone-cluster"
KUBERAY = ROOT / "tests" / "fixtures" / "kuberay" / "rayservice-ray.io-v1.json"  # vendored
VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.30.0"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
INGRESS = "exaone_ingress"  # the head's custom resource, which the Router replicas ask for


def _render(values: dict) -> list[dict]:
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


def _values(path: Path | None) -> dict:
    return yaml.safe_load(path.read_text()) if path else {}


def test_lint_is_clean_in_strict_mode():
    result = helm.lint(CHART, strict=True, kube_version=KUBE_VERSION)
    assert not result["errors"], result
    assert [m for m in result["messages"] if m["severity"] > 1] == [], result["messages"]
    for path in VALUES_FILES:
        assert not helm.lint(CHART, _values(path), strict=True)["errors"], path.name


def test_the_committed_schema_is_the_generated_one():
    assert json.loads((CHART / "values.schema.json").read_text()) == values_schema()


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_renders_and_every_object_validates(values_file):
    docs = _render(_values(values_file))
    kinds = sorted(d["kind"] for d in docs)
    assert "RayService" in kinds and kinds.count("Service") >= 2, kinds
    crd = json.loads(KUBERAY.read_text())
    for doc in docs:
        if doc["kind"] == "RayService":
            errors = [e.message for e in jsonschema.Draft7Validator(crd).iter_errors(doc)]
            assert not errors, errors
            serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
            [app] = serve["applications"]
            assert app["import_path"] == "cluster.app:build_app"
            # No Serve gRPC proxy: the Router replicas serve gRPC themselves, on the head pod.
            assert "grpc_options" not in serve
            config = _parse_cluster_config(app["args"])
            values = _values(values_file)
            grpc_port = values.get("grpc", {}).get("port", DEFAULTS["grpc"]["port"])
            assert config.router.grpc_host == "0.0.0.0"
            assert config.router.grpc_port == grpc_port
            assert config.router.resources == {INGRESS: 1}
            head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]
            assert _ray_resources(head)[INGRESS] >= 1
            [container] = head["template"]["spec"]["containers"]
            assert {"name": "grpc", "containerPort": grpc_port} in container["ports"]
            groups = {
                g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
            }
            assert set(groups) == {"attention", "experts"}
            assert "attention_shard" in groups["attention"]["rayStartParams"]["resources"]
            assert all(INGRESS not in _ray_resources(g) for g in groups.values())
            assert config.attention.resources.keys() <= {"attention_shard"}
        elif doc["kind"] == "ServiceMonitor":  # the Prometheus Operator's CRD: no schema here
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["spec"]["endpoints"]
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def _ray_resources(group: dict) -> dict[str, float]:
    """A group's custom resources as Ray reads them: the rayStartParams value is a JSON string
    in quotes (KubeRay passes it to `ray start --resources` through the shell)."""
    quoted = group["rayStartParams"].get("resources")
    if quoted is None:
        return {}
    assert quoted.startswith('"') and quoted.endswith('"'), quoted
    return json.loads(json.loads(quoted))


def _parse_cluster_config(args: dict) -> ClusterConfig:
    """ClusterConfig as build_app parses the arguments. model_path (a mount in the pods) is
    pointed at the bundled checkpoint, so the checks that read the checkpoint run too."""
    return ClusterConfig.model_validate({**args, "model_path": str(BUNDLED_MODEL)})


def test_serve_arguments_are_the_values_config_plus_what_the_chart_sets():
    [rs] = [d for d in _render({}) if d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert args["model_path"] == defaults["model"]["mountPath"]
    assert args["prefix_cache"]["redis_url"] == "redis://demo-exaone-cluster-redis:6379/0"
    assert args["experts"] == defaults["config"]["experts"]
    config = _parse_cluster_config(args)
    assert config.experts.num_groups == 4 and config.dtype == "bfloat16"
    [ext] = [p for p in VALUES_FILES if "external" in p.name]
    [rs] = [d for d in _render(_values(ext)) if d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["prefix_cache"]["redis_url"] == "redis://redis.cache.svc.cluster.local:6379/2"
    assert not [d for d in _render(_values(ext)) if d["kind"] == "StatefulSet"]


@pytest.mark.parametrize(
    "bad,where",
    [
        ({"attentionWorkers": {"replicas": -1}}, "replicas"),
        ({"expertWorkers": {"maxReplicas": 0}}, "maxReplicas"),
        ({"grpc": {"port": "9000"}}, "port"),
        ({"unknownKey": 1}, "unknownKey"),
        ({"config": {"experts": {"num_groups": -2}}}, "num_groups"),
        ({"config": {"engine": {"max_num_seqs": "many"}}}, "max_num_seqs"),
        ({"config": {"engine": {"no_such_option": 1}}}, "no_such_option"),
        ({"redis": {"maxmemoryPolicy": "random"}}, "maxmemoryPolicy"),
        ({"rayAuth": {"enable": True}}, "enable"),
        ({"networkPolicy": {"grpcFrom": [{"namespaceSelectors": {}}]}}, "namespaceSelectors"),
        ({"networkPolicy": {"kuberayOperator": {"namespace": 1}}}, "namespace"),
        ({"prefixCache": {"macKey": {"secret": "x"}}}, "secret"),
        ({"grpc": {"tls": {"secret": "x"}}}, "secret"),
    ],
)
def test_the_values_schema_rejects_bad_values(bad, where):
    with pytest.raises(helm.HelmError) as failure:
        _render(bad)
    assert where in str(failure.value)


def test_the_options_render_what_they_promise():
    [prod] = [p for p in VALUES_FILES if "production" in p.name]
    docs = _render(_values(prod))
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    [rs] = by_kind["RayService"]
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].endswith(":6379")
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {
        "name": "gcs-redis",
        "key": "password",
    }
    assert len(by_kind["NetworkPolicy"]) == 5 and len(by_kind["PodDisruptionBudget"]) == 2
    [grpc_only] = [p for p in by_kind["NetworkPolicy"] if p["metadata"]["name"].endswith("-grpc")]
    gateway = {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}
    assert grpc_only["spec"]["ingress"] == [
        {
            "from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}, {"namespaceSelector": gateway}],
            "ports": [{"port": 9000, "protocol": "TCP"}],
        }
    ]
    [kuberay] = [p for p in by_kind["NetworkPolicy"] if p["metadata"]["name"].endswith("-kuberay")]
    [peer] = kuberay["spec"]["ingress"][0]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "ray-system"}
    assert by_kind["ServiceMonitor"][0]["metadata"]["labels"]["release"] == "prometheus"
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all(w["template"]["spec"]["tolerations"] for w in workers)
    gpu = workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpu == 1
    # The fetch hook: an init container with the model volume read-write, Ray read-only.
    [ext] = [p for p in VALUES_FILES if "external" in p.name]
    [rs] = [d for d in _render(_values(ext)) if d["kind"] == "RayService"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    [init] = head["initContainers"]
    assert init["volumeMounts"][0].get("readOnly") is None and init["command"][0] == "/s5cmd"
    assert head["containers"][0]["volumeMounts"][0]["readOnly"] is True
    assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "demo-exaone-cluster-model"
    # Defaults: none of the optional objects; the NetworkPolicies are on unless turned off.
    kinds = {d["kind"] for d in _render({})}
    assert not kinds & {"ServiceMonitor", "PersistentVolumeClaim"}
    assert "NetworkPolicy" in kinds
    closed = _render({"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in {d["kind"] for d in closed}
    with pytest.raises(helm.HelmError, match="redisAddress is required"):
        _render({"gcsFaultTolerance": {"enabled": True}})


def test_router_fields_from_values_are_kept_and_the_chart_fills_in_the_rest():
    def router(values: dict) -> dict:
        [rs] = [d for d in _render(values) if d["kind"] == "RayService"]
        return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["router"]

    assert router({}) == {"grpc_host": "0.0.0.0", "grpc_port": 9000, "resources": {INGRESS: 1}}
    assert router({"grpc": {"port": 9100}, "config": {"router": {"num_replicas": 3}}}) == {
        "grpc_host": "0.0.0.0",
        "grpc_port": 9100,
        "resources": {INGRESS: 1},
        "num_replicas": 3,
    }
    custom = router({"config": {"router": {"grpc_host": "::", "resources": {INGRESS: 0.5}}}})
    assert custom["grpc_host"] == "::" and custom["resources"] == {INGRESS: 0.5}
    assert router({"config": {"router": {"grpc_port": 9000}}})["grpc_port"] == 9000
    with pytest.raises(helm.HelmError, match="must equal grpc.port"):
        router({"config": {"router": {"grpc_port": 9001}}})


def test_the_grpc_service_reaches_the_routers_on_the_head():
    docs = _render({"networkPolicy": {"enabled": True}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    [svc] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc")]
    selects = svc["spec"]["selector"].items()
    assert selects <= head["metadata"]["labels"].items()
    assert svc["spec"]["selector"]["exaone.ai/role"] == "head"
    assert svc["spec"]["ports"][0]["targetPort"] == "grpc"
    workers = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for worker in workers:  # the Service selects no worker pod
        assert not selects <= worker["template"]["metadata"]["labels"].items()
    # Pod-to-pod on any port among the release's pods (step streams on OS-chosen ports).
    [internal] = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-internal")
    ]
    [rule] = internal["spec"]["ingress"]
    assert "ports" not in rule
    selector = rule["from"][0]["podSelector"]["matchLabels"]
    for pod in [head, *(w["template"] for w in workers)]:
        assert selector.items() <= pod["metadata"]["labels"].items()


# Secure by default (issue 22, item 4).

NAMES = "demo-exaone-cluster"  # the fullname of the release the tests render
RAY_SELECTOR = {
    "app.kubernetes.io/name": "exaone-cluster",
    "app.kubernetes.io/instance": "demo",
    "exaone.ai/ray": "true",
}


def _by_name(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _secret(docs: list[dict], name: str, key: str) -> str:
    return base64.b64decode(_by_name(docs, "Secret")[name]["data"][key]).decode()


def _pods(docs: list[dict]) -> list[tuple[str, dict]]:
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


def _ray_containers(docs: list[dict]) -> list[dict]:
    return [c for role, pod in _pods(docs) if role != "redis" for c in pod["spec"]["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_every_container_is_locked_down(values_file):
    docs = _render(_values(values_file))
    pods = _pods(docs)
    assert {role for role, _ in pods} >= {"head", "attention", "experts"}
    for role, pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert spec["securityContext"]["runAsNonRoot"] is True, role
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, (role, container["name"])
            assert context["allowPrivilegeEscalation"] is False, (role, container["name"])
            assert context["capabilities"] == {"drop": ["ALL"]}, (role, container["name"])
            if role != "redis":  # Ray (session files, logs, caches) and the fetch hook write /tmp
                [tmp] = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp["name"] in empty_dirs and not tmp.get("readOnly"), container["name"]
        for container in spec["containers"] if role != "redis" else []:
            env = _env(container)  # every cache under /tmp (replicas/kernels/cpu.py, Triton, ...)
            for name in (
                "EXAONE_KERNEL_CACHE",
                "TRITON_HOME",
                "TRITON_CACHE_DIR",
                "XDG_CACHE_HOME",
                "CUDA_CACHE_PATH",
            ):
                assert env[name]["value"].startswith("/tmp"), name
    # KubeRay's autoscaler sidecar in the head pod: the same, with its own /tmp.
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    autoscaler = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["readOnlyRootFilesystem"] is True
    [tmp] = autoscaler["volumeMounts"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert tmp["mountPath"] == "/tmp"
    assert {"name": tmp["name"], "emptyDir": {}} in head["volumes"]


def test_ray_token_auth_is_on_by_default_with_a_secret_the_chart_owns():
    docs = _render({})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    auth = rs["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": f"{NAMES}-ray-auth"}
    token = _secret(docs, f"{NAMES}-ray-auth", "auth_token")  # KubeRay's key
    assert len(token) == 48 and token.isalnum()
    # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in the Ray containers itself.
    for container in _ray_containers(docs):
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & _env(container).keys()
    # A Secret of one's own; or no auth.
    docs = _render({"rayAuth": {"existingSecret": "mine"}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "mine"}
    assert f"{NAMES}-ray-auth" not in _by_name(docs, "Secret")
    docs = _render({"rayAuth": {"enabled": False}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    assert f"{NAMES}-ray-auth" not in _by_name(docs, "Secret")
    with pytest.raises(helm.HelmError, match="2.52.0"):  # KubeRay refuses token auth before
        _render({"rayVersion": "2.51.0"})
    assert _render({"rayVersion": "2.51.0", "rayAuth": {"enabled": False}})


def test_the_network_policies_are_on_by_default_and_allow_only_what_is_needed():
    docs = _render({})
    policies = _by_name(docs, "NetworkPolicy")
    assert set(policies) == {
        f"{NAMES}-{p}" for p in ("internal", "grpc", "kuberay", "metrics", "redis")
    }
    for policy in policies.values():  # ingress only: egress (DNS, API server) is not restricted
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    pods = dict(_pods(docs))
    labels = {role: pod["metadata"]["labels"] for role, pod in pods.items()}
    # Every pod is isolated: some policy selects it.
    for role, pod_labels in labels.items():
        assert any(_selects(p["spec"]["podSelector"], pod_labels) for p in policies.values()), role

    def rule(name: str) -> tuple[dict, list, list]:
        policy = policies[f"{NAMES}-{name}"]
        [only] = policy["spec"]["ingress"]
        return policy["spec"]["podSelector"], only["from"], only.get("ports")

    # Ray pods among themselves, any port; not Redis.
    selector, peers, ports = rule("internal")
    assert ports is None and peers == [{"podSelector": {"matchLabels": RAY_SELECTOR}}]
    assert [r for r in labels if _selects(selector, labels[r])] == ["head", "attention", "experts"]
    assert not _selects(peers[0]["podSelector"], labels["redis"])
    # gRPC on the head from the release's namespace only (an empty podSelector: its pods).
    selector, peers, ports = rule("grpc")
    assert [r for r in labels if _selects(selector, labels[r])] == ["head"]
    assert peers == [{"podSelector": {}}] and ports == [{"port": 9000, "protocol": "TCP"}]
    # The KubeRay operator: the dashboard (Serve deploys, status) and the Serve proxy's health.
    selector, peers, ports = rule("kuberay")
    assert [r for r in labels if _selects(selector, labels[r])] == ["head"]
    assert peers == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        }
    ]
    assert sorted(p["port"] for p in ports) == [8000, 8265]
    # Prometheus on every Ray pod's metrics port.
    selector, peers, ports = rule("metrics")
    assert [r for r in labels if _selects(selector, labels[r])] == ["head", "attention", "experts"]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert peers[0]["namespaceSelector"]["matchLabels"] == monitoring
    assert ports == [{"port": 8080, "protocol": "TCP"}]
    # Redis from the Ray pods only.
    selector, peers, ports = rule("redis")
    assert [r for r in labels if _selects(selector, labels[r])] == ["redis"]
    assert peers == [{"podSelector": {"matchLabels": RAY_SELECTOR}}]
    assert ports == [{"port": 6379, "protocol": "TCP"}]
    # Opened up, other namespaces, another port; no Redis, no Redis policy.
    docs = _render(
        {
            "grpc": {"port": 9100},
            "redis": {"enabled": False},
            "networkPolicy": {
                "grpcFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                "kuberayOperator": {"namespace": "", "podLabels": None},
                "prometheus": {"namespace": "obs"},
            },
        }
    )
    policies = _by_name(docs, "NetworkPolicy")
    assert f"{NAMES}-redis" not in policies
    [grpc_rule] = policies[f"{NAMES}-grpc"]["spec"]["ingress"]
    assert grpc_rule == {
        "from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
        "ports": [{"port": 9100, "protocol": "TCP"}],
    }
    assert policies[f"{NAMES}-kuberay"]["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {}}]
    metrics = policies[f"{NAMES}-metrics"]["spec"]["ingress"][0]["from"][0]
    assert metrics["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "obs"}
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_the_redis_password_is_generated_and_change_me_is_refused():
    assert DEFAULTS["redis"]["password"]["value"] == ""
    first, second = _render({}), _render({})
    password = _secret(first, f"{NAMES}-redis", "redis-password")
    assert len(password) == 32 and password.isalnum()
    assert password != _secret(second, f"{NAMES}-redis", "redis-password")  # random
    with pytest.raises(helm.HelmError, match="change-me"):
        _render({"redis": {"password": {"value": "change-me"}}})
    with pytest.raises(helm.HelmError, match="change-me"):
        _render({"redis": {"password": {"value": "change-me", "existingSecret": "mine"}}})
    chosen = _render({"redis": {"password": {"value": "Chosen-Pass-1"}}})
    assert _secret(chosen, f"{NAMES}-redis", "redis-password") == "Chosen-Pass-1"
    # An existing Secret: no Secret of the chart's; Redis and the Ray pods read that one.
    docs = _render({"redis": {"password": {"existingSecret": "mine", "key": "pw"}}})
    assert f"{NAMES}-redis" not in _by_name(docs, "Secret")
    [redis] = _by_name(docs, "StatefulSet")[f"{NAMES}-redis"]["spec"]["template"]["spec"][
        "containers"
    ]
    ref = {"name": "mine", "key": "pw"}
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    for container in _ray_containers(docs):
        assert _env(container)["EXAONE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    # An external Redis without a password: nothing generated, no variable.
    docs = _render({"redis": {"enabled": False, "externalUrl": "redis://cache:6379/0"}})
    assert f"{NAMES}-redis" not in _by_name(docs, "Secret")
    assert all("EXAONE_REDIS_PASSWORD" not in _env(c) for c in _ray_containers(docs))


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_every_ray_container_gets_the_prefix_cache_key_from_a_secret(values_file):
    values = _values(values_file)
    docs = _render(values)
    mac_key = values.get("prefixCache", {}).get("macKey", {})
    name = mac_key.get("existingSecret") or f"{NAMES}-prefix-cache"
    key = mac_key.get("key", DEFAULTS["prefixCache"]["macKey"]["key"])
    containers = _ray_containers(docs)
    assert len(containers) == 3
    for container in containers:
        ref = _env(container)["EXAONE_PREFIX_CACHE_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": name, "key": key}
    if not mac_key.get("existingSecret"):
        secret = _secret(docs, name, key)
        assert len(secret) == 48 and secret.isalnum()
    else:
        assert f"{NAMES}-prefix-cache" not in _by_name(docs, "Secret")


def test_no_secret_is_on_a_command_line():
    password = "Not-On-Any-Command-Line-42"
    docs = _render(
        {
            "redis": {"password": {"value": password}},
            "model": {"fetch": {"enabled": True, "command": ["sync"]}},
        }
    )
    generated = _render({})
    generated_password = _secret(generated, f"{NAMES}-redis", "redis-password")
    for rendered, secret in ((docs, password), (generated, generated_password)):
        # The value is in its Secret and nowhere else (no argv, no literal env).
        for doc in rendered:
            if doc["kind"] != "Secret":
                assert secret not in json.dumps(doc), doc["kind"]
        for _, pod in _pods(rendered):
            for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
                argv = " ".join(container.get("command", []) + container.get("args", []))
                assert secret not in argv and "--requirepass" not in argv, container["name"]
    # Redis reads its password from its standard input: a config file named "-".
    [redis] = _by_name(docs, "StatefulSet")[f"{NAMES}-redis"]["spec"]["template"]["spec"][
        "containers"
    ]
    [script] = redis["args"]
    assert "exec redis-server - " in script and 'requirepass "$pass"' in script
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == f"{NAMES}-redis"


def test_grpc_tls_mounts_the_secret_on_the_head_and_sets_the_router_files():
    docs = _render({"grpc": {"tls": {"secretName": "exaone-tls"}}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    [volume] = [v for v in head["volumes"] if v["name"] == "grpc-tls"]
    assert volume["secret"]["secretName"] == "exaone-tls"
    [container] = head["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "grpc-tls"]
    assert mount["readOnly"] is True
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    config = _parse_cluster_config(args)
    assert config.router.tls_cert_file == f"{mount['mountPath']}/tls.crt"
    assert config.router.tls_key_file == f"{mount['mountPath']}/tls.key"
    for group in cluster["workerGroupSpecs"]:  # the Routers run on the head only
        assert all(v["name"] != "grpc-tls" for v in group["template"]["spec"]["volumes"])
    for doc in docs:
        if doc["kind"] == "RayService":
            crd = json.loads(KUBERAY.read_text())
            assert not list(jsonschema.Draft7Validator(crd).iter_errors(doc))
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # Off by default: plaintext, nothing mounted.
    [rs] = [d for d in _render({}) if d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert _parse_cluster_config(args).router.tls_cert_file is None
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert all(v["name"] != "grpc-tls" for v in head["volumes"])
    with pytest.raises(helm.HelmError, match="leave them unset"):
        router = {"tls_cert_file": "/x.crt", "tls_key_file": "/x.key"}
        _render({"grpc": {"tls": {"secretName": "exaone-tls"}}, "config": {"router": router}})
