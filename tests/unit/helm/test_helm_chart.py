"""The Helm chart (helm/exaone-cluster), without a cluster: strict lint, offline render with the
defaults and the CI values files, every Kubernetes object validated strictly, the RayService
against KubeRay's CRD schema, the Serve arguments against ClusterConfig, and values.schema.json
refusing bad values. helm-python-sdk (Helm's Go SDK, no binary) and kubernetes-validate."""

from __future__ import annotations

import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster.helm_schema import values_schema
from cluster.ray_env import RAY_ENV
from tests.unit.helm.render import (
    CHART,
    DEFAULTS,
    INGRESS,
    KUBE_VERSION,
    KUBERAY,
    VALUES_FILES,
    env_by_name,
    load_values,
    parse_cluster_config,
    ray_containers,
    render_chart,
)


def test_lint_is_clean_in_strict_mode():
    result = helm.lint(CHART, strict=True, kube_version=KUBE_VERSION)
    assert not result["errors"], result
    assert [m for m in result["messages"] if m["severity"] > 1] == [], result["messages"]
    for path in VALUES_FILES:
        assert not helm.lint(CHART, load_values(path), strict=True)["errors"], path.name


def test_the_committed_schema_is_the_generated_one():
    assert json.loads((CHART / "values.schema.json").read_text()) == values_schema()


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_renders_and_every_object_validates(values_file):
    docs = render_chart(load_values(values_file))
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
            config = parse_cluster_config(app["args"])
            values = load_values(values_file)
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


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_every_ray_container_gets_the_ray_env_serve_sets(values_file):
    """The pods' Ray runs as `exaone-cluster serve`'s does (cluster.ray_env.RAY_ENV)."""
    containers = ray_containers(render_chart(load_values(values_file)))
    assert len(containers) >= 2  # the head and a worker group at least
    for container in containers:
        env = env_by_name(container)
        got = {name: env.get(name, {}).get("value") for name in RAY_ENV}
        assert got == RAY_ENV, container["name"]


def test_serve_arguments_are_the_values_config_plus_what_the_chart_sets():
    [rs] = [d for d in render_chart({}) if d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert args["model_path"] == defaults["model"]["mountPath"]
    assert args["prefix_cache"]["redis_url"] == "redis://demo-exaone-cluster-redis:6379/0"
    assert args["experts"] == defaults["config"]["experts"]
    config = parse_cluster_config(args)
    assert config.experts.num_groups == 4 and config.dtype == "bfloat16"
    [ext] = [p for p in VALUES_FILES if "external" in p.name]
    [rs] = [d for d in render_chart(load_values(ext)) if d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["prefix_cache"]["redis_url"] == "redis://redis.cache.svc.cluster.local:6379/2"
    assert not [d for d in render_chart(load_values(ext)) if d["kind"] == "StatefulSet"]


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
        render_chart(bad)
    assert where in str(failure.value)


def test_the_options_render_what_they_promise():
    [prod] = [p for p in VALUES_FILES if "production" in p.name]
    docs = render_chart(load_values(prod))
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
            "ports": [{"port": 9000, "protocol": "TCP"}, {"port": 9080, "protocol": "TCP"}],
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
    [rs] = [d for d in render_chart(load_values(ext)) if d["kind"] == "RayService"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    [init] = head["initContainers"]
    assert init["volumeMounts"][0].get("readOnly") is None and init["command"][0] == "/s5cmd"
    assert head["containers"][0]["volumeMounts"][0]["readOnly"] is True
    assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "demo-exaone-cluster-model"
    # Defaults: none of the optional objects; the NetworkPolicies are on unless turned off.
    kinds = {d["kind"] for d in render_chart({})}
    assert not kinds & {"ServiceMonitor", "PersistentVolumeClaim"}
    assert "NetworkPolicy" in kinds
    closed = render_chart({"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in {d["kind"] for d in closed}
    with pytest.raises(helm.HelmError, match="redisAddress is required"):
        render_chart({"gcsFaultTolerance": {"enabled": True}})


def test_router_fields_from_values_are_kept_and_the_chart_fills_in_the_rest():
    def router(values: dict) -> dict:
        [rs] = [d for d in render_chart(values) if d["kind"] == "RayService"]
        return yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]["router"]

    defaults = {"grpc_host": "0.0.0.0", "openai_api": True, "resources": {INGRESS: 1}}
    assert router({}) == {**defaults, "grpc_port": 9000, "openai_port": 9080}
    assert router(
        {
            "grpc": {"port": 9100},
            "openai": {"port": 8088},
            "config": {"router": {"num_replicas": 3}},
        }
    ) == {**defaults, "grpc_port": 9100, "openai_port": 8088, "num_replicas": 3}
    custom = router({"config": {"router": {"grpc_host": "::", "resources": {INGRESS: 0.5}}}})
    assert custom["grpc_host"] == "::" and custom["resources"] == {INGRESS: 0.5}
    assert router({"config": {"router": {"grpc_port": 9000}}})["grpc_port"] == 9000
    with pytest.raises(helm.HelmError, match="must equal grpc.port"):
        router({"config": {"router": {"grpc_port": 9001}}})
    assert router({"config": {"router": {"openai_port": 9080}}})["openai_port"] == 9080
    with pytest.raises(helm.HelmError, match="must equal openai.port"):
        router({"config": {"router": {"openai_port": 9081}}})
    with pytest.raises(helm.HelmError, match="openai.enabled"):
        router({"config": {"router": {"openai_api": False}}})


@pytest.mark.parametrize("enabled", [True, False])
def test_the_openai_port_service_and_policy_follow_openai_values(enabled):
    """openai.enabled: the Router replicas serve the OpenAI API on openai.port, which the head
    container exposes, a Service of its own targets and the client NetworkPolicy opens; off:
    none of them."""
    docs = render_chart({"openai": {"enabled": enabled, "port": 8088, "service": {"port": 80}}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    config = parse_cluster_config(
        yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    )
    assert config.router.openai_api is enabled and config.router.openai_port == 8088
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    ports = head["spec"]["containers"][0]["ports"]
    assert ({"name": "openai", "containerPort": 8088} in ports) is enabled
    services = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-openai")
    ]
    [policy] = [
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith("-grpc")
    ]
    opened = [p["port"] for p in policy["spec"]["ingress"][0]["ports"]]
    if enabled:
        [svc] = services
        assert svc["spec"]["ports"] == [
            {"name": "http", "port": 80, "targetPort": "openai", "protocol": "TCP"}
        ]
        assert svc["spec"]["selector"].items() <= head["metadata"]["labels"].items()
        assert svc["spec"]["selector"]["exaone.ai/role"] == "head"
        assert opened == [9000, 8088]
    else:
        assert services == [] and opened == [9000]


def test_the_grpc_service_reaches_the_routers_on_the_head():
    docs = render_chart({"networkPolicy": {"enabled": True}})
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
