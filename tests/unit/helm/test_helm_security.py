"""The Helm chart's secure defaults, rendered offline: every container locked down, Ray's token
auth on with a Secret the chart owns, network policies that allow only what is needed, generated
passwords and keys kept off command lines, gRPC TLS from a Secret."""

from __future__ import annotations

import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.unit.helm.render import (
    DEFAULTS,
    KUBE_VERSION,
    KUBERAY,
    NAMES,
    RAY_SELECTOR,
    VALUES_FILES,
    by_name,
    env_by_name,
    load_values,
    parse_cluster_config,
    pod_templates,
    ray_containers,
    render_chart,
    secret_value,
    selects,
)


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_every_container_is_locked_down(values_file):
    docs = render_chart(load_values(values_file))
    pods = pod_templates(docs)
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
            env = env_by_name(
                container
            )  # every cache under /tmp (replicas/kernels/cpu.py, Triton, ...)
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
    docs = render_chart({})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    auth = rs["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": f"{NAMES}-ray-auth"}
    token = secret_value(docs, f"{NAMES}-ray-auth", "auth_token")  # KubeRay's key
    assert len(token) == 48 and token.isalnum()
    # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in the Ray containers itself.
    for container in ray_containers(docs):
        assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & env_by_name(container).keys()
    # A Secret of one's own; or no auth.
    docs = render_chart({"rayAuth": {"existingSecret": "mine"}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "mine"}
    assert f"{NAMES}-ray-auth" not in by_name(docs, "Secret")
    docs = render_chart({"rayAuth": {"enabled": False}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "disabled"}
    assert f"{NAMES}-ray-auth" not in by_name(docs, "Secret")
    with pytest.raises(helm.HelmError, match="2.52.0"):  # KubeRay refuses token auth before
        render_chart({"rayVersion": "2.51.0"})
    assert render_chart({"rayVersion": "2.51.0", "rayAuth": {"enabled": False}})


def test_the_network_policies_are_on_by_default_and_allow_only_what_is_needed():
    docs = render_chart({})
    policies = by_name(docs, "NetworkPolicy")
    assert set(policies) == {
        f"{NAMES}-{p}" for p in ("internal", "grpc", "kuberay", "metrics", "redis")
    }
    for policy in policies.values():  # ingress only: egress (DNS, API server) is not restricted
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    pods = dict(pod_templates(docs))
    labels = {role: pod["metadata"]["labels"] for role, pod in pods.items()}
    # Every pod is isolated: some policy selects it.
    for role, pod_labels in labels.items():
        assert any(selects(p["spec"]["podSelector"], pod_labels) for p in policies.values()), role

    def rule(name: str) -> tuple[dict, list, list]:
        policy = policies[f"{NAMES}-{name}"]
        [only] = policy["spec"]["ingress"]
        return policy["spec"]["podSelector"], only["from"], only.get("ports")

    # Ray pods among themselves, any port; not Redis.
    selector, peers, ports = rule("internal")
    assert ports is None and peers == [{"podSelector": {"matchLabels": RAY_SELECTOR}}]
    assert [r for r in labels if selects(selector, labels[r])] == ["head", "attention", "experts"]
    assert not selects(peers[0]["podSelector"], labels["redis"])
    # gRPC and OpenAI HTTP on the head from the release's namespace only (an empty
    # podSelector: its pods).
    selector, peers, ports = rule("grpc")
    assert [r for r in labels if selects(selector, labels[r])] == ["head"]
    assert peers == [{"podSelector": {}}]
    assert ports == [{"port": 9000, "protocol": "TCP"}, {"port": 9080, "protocol": "TCP"}]
    # The KubeRay operator: the dashboard (Serve deploys, status) and the Serve proxy's health.
    selector, peers, ports = rule("kuberay")
    assert [r for r in labels if selects(selector, labels[r])] == ["head"]
    assert peers == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
        }
    ]
    assert sorted(p["port"] for p in ports) == [8000, 8265]
    # Prometheus on every Ray pod's metrics port.
    selector, peers, ports = rule("metrics")
    assert [r for r in labels if selects(selector, labels[r])] == ["head", "attention", "experts"]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    assert peers[0]["namespaceSelector"]["matchLabels"] == monitoring
    assert ports == [{"port": 8080, "protocol": "TCP"}]
    # Redis from the Ray pods only.
    selector, peers, ports = rule("redis")
    assert [r for r in labels if selects(selector, labels[r])] == ["redis"]
    assert peers == [{"podSelector": {"matchLabels": RAY_SELECTOR}}]
    assert ports == [{"port": 6379, "protocol": "TCP"}]
    # Opened up, other namespaces, another port, no OpenAI port; no Redis, no Redis policy.
    docs = render_chart(
        {
            "grpc": {"port": 9100},
            "openai": {"enabled": False},
            "redis": {"enabled": False},
            "networkPolicy": {
                "grpcFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                "kuberayOperator": {"namespace": "", "podLabels": None},
                "prometheus": {"namespace": "obs"},
            },
        }
    )
    policies = by_name(docs, "NetworkPolicy")
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
    first, second = render_chart({}), render_chart({})
    password = secret_value(first, f"{NAMES}-redis", "redis-password")
    assert len(password) == 32 and password.isalnum()
    assert password != secret_value(second, f"{NAMES}-redis", "redis-password")  # random
    with pytest.raises(helm.HelmError, match="change-me"):
        render_chart({"redis": {"password": {"value": "change-me"}}})
    with pytest.raises(helm.HelmError, match="change-me"):
        render_chart({"redis": {"password": {"value": "change-me", "existingSecret": "mine"}}})
    chosen = render_chart({"redis": {"password": {"value": "Chosen-Pass-1"}}})
    assert secret_value(chosen, f"{NAMES}-redis", "redis-password") == "Chosen-Pass-1"
    # An existing Secret: no Secret of the chart's; Redis and the Ray pods read that one.
    docs = render_chart({"redis": {"password": {"existingSecret": "mine", "key": "pw"}}})
    assert f"{NAMES}-redis" not in by_name(docs, "Secret")
    [redis] = by_name(docs, "StatefulSet")[f"{NAMES}-redis"]["spec"]["template"]["spec"][
        "containers"
    ]
    ref = {"name": "mine", "key": "pw"}
    assert env_by_name(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    for container in ray_containers(docs):
        assert env_by_name(container)["EXAONE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
    # An external Redis without a password: nothing generated, no variable.
    docs = render_chart({"redis": {"enabled": False, "externalUrl": "redis://cache:6379/0"}})
    assert f"{NAMES}-redis" not in by_name(docs, "Secret")
    assert all("EXAONE_REDIS_PASSWORD" not in env_by_name(c) for c in ray_containers(docs))


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
def test_every_ray_container_gets_the_prefix_cache_key_from_a_secret(values_file):
    values = load_values(values_file)
    docs = render_chart(values)
    mac_key = values.get("prefixCache", {}).get("macKey", {})
    name = mac_key.get("existingSecret") or f"{NAMES}-prefix-cache"
    key = mac_key.get("key", DEFAULTS["prefixCache"]["macKey"]["key"])
    containers = ray_containers(docs)
    assert len(containers) == 3
    for container in containers:
        ref = env_by_name(container)["EXAONE_PREFIX_CACHE_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": name, "key": key}
    if not mac_key.get("existingSecret"):
        secret = secret_value(docs, name, key)
        assert len(secret) == 48 and secret.isalnum()
    else:
        assert f"{NAMES}-prefix-cache" not in by_name(docs, "Secret")


def test_no_secret_is_on_a_command_line():
    password = "Not-On-Any-Command-Line-42"
    docs = render_chart(
        {
            "redis": {"password": {"value": password}},
            "model": {"fetch": {"enabled": True, "command": ["sync"]}},
        }
    )
    generated = render_chart({})
    generated_password = secret_value(generated, f"{NAMES}-redis", "redis-password")
    for rendered, secret in ((docs, password), (generated, generated_password)):
        # The value is in its Secret and nowhere else (no argv, no literal env).
        for doc in rendered:
            if doc["kind"] != "Secret":
                assert secret not in json.dumps(doc), doc["kind"]
        for _, pod in pod_templates(rendered):
            for container in [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]:
                argv = " ".join(container.get("command", []) + container.get("args", []))
                assert secret not in argv and "--requirepass" not in argv, container["name"]
    # Redis reads its password from its standard input: a config file named "-".
    [redis] = by_name(docs, "StatefulSet")[f"{NAMES}-redis"]["spec"]["template"]["spec"][
        "containers"
    ]
    [script] = redis["args"]
    assert "exec redis-server - " in script and 'requirepass "$pass"' in script
    assert (
        env_by_name(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
        == f"{NAMES}-redis"
    )


def test_grpc_tls_mounts_the_secret_on_the_head_and_sets_the_router_files():
    docs = render_chart({"grpc": {"tls": {"secretName": "exaone-tls"}}})
    [rs] = [d for d in docs if d["kind"] == "RayService"]
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    [volume] = [v for v in head["volumes"] if v["name"] == "grpc-tls"]
    assert volume["secret"]["secretName"] == "exaone-tls"
    [container] = head["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "grpc-tls"]
    assert mount["readOnly"] is True
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    config = parse_cluster_config(args)
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
    [rs] = [d for d in render_chart({}) if d["kind"] == "RayService"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert parse_cluster_config(args).router.tls_cert_file is None
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert all(v["name"] != "grpc-tls" for v in head["volumes"])
    with pytest.raises(helm.HelmError, match="leave them unset"):
        router = {"tls_cert_file": "/x.crt", "tls_key_file": "/x.key"}
        render_chart({"grpc": {"tls": {"secretName": "exaone-tls"}}, "config": {"router": router}})
