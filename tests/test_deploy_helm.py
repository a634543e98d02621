"""The Helm chart charts/flywheel, tested offline: lint, render, schema-validate, structure, security.

helm and helm-unittest are the pinned builds from deploy/tools/install-helm.sh (`go install` through
the Go module proxy, cached under ~/.cache/flywheel/bin); checkov runs from its own pinned venv
(deploy/tools/install-checkov.sh). Both are installed on first use, so nothing is skipped.
Rendered manifests are validated against the Kubernetes 1.37 OpenAPI schemas (kubernetes-validate)
and held to the code: env names must be fields of the service's settings class and ports its
defaults.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "flywheel"
TOOLS = REPO / "deploy" / "tools"
SERVICES = ("policy", "reward", "preference", "trainer")
K8S_VERSION = "1.37.0"
# A cold first run builds the pinned tools (`go install`, ~15 min on 2 cores) inside the first test's
# fixture; `deploy/tools/install-tools.sh` warms the cache beforehand. Tests themselves take seconds.
pytestmark = pytest.mark.timeout(2400)
MONITORING = ["monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PrometheusRule"]
KEDA = ["keda.sh/v1alpha1/ScaledObject"]
CERT_MANAGER = ["cert-manager.io/v1/Certificate"]
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Pod"}

# name -> (values files under charts/flywheel/ci, --set pairs, capabilities)
SCENARIOS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "default": ([], [], []),
    "default-with-crds": ([], [], MONITORING + KEDA),
    "all-off": (["all-off-values.yaml"], [], MONITORING),
    "scoring-only-hpa": (["scoring-only-values.yaml"], [], MONITORING),
    "keda": (["keda-values.yaml"], [], MONITORING + KEDA),
    "kafka-internal": (["kafka-internal-values.yaml"], [], MONITORING),
    "shared-checkpoints": ([], ["checkpoints.shared.enabled=true", "trainer.persistence.enabled=false",
                                "rewardTraining.job.enabled=true"], []),
    "secure": (["secure-values.yaml"], [], MONITORING + KEDA + CERT_MANAGER),
    "gpu-multinode": (["gpu-multinode-values.yaml"], [], MONITORING),
}


def settings_class(service: str):
    try:
        module = importlib.import_module(f"flywheel.{service}.settings")
    except ModuleNotFoundError as exc:
        if exc.name in (f"flywheel.{service}", f"flywheel.{service}.settings"):
            return None
        raise
    return getattr(module, f"{service.capitalize()}Settings")


# -- tools ---------------------------------------------------------------------------------------
def _install(script: str, *args: str) -> Path:
    out = subprocess.run([str(TOOLS / script), *args], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{script} failed:\n{out.stderr[-4000:]}"
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def helm() -> Path:
    return _install("install-helm.sh", "--with-unittest")


@pytest.fixture(scope="session")
def checkov() -> Path:
    return _install("install-checkov.sh")


def run_helm(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": "/tmp/flywheel-helm-cache", "HELM_CONFIG_HOME": "/tmp/flywheel-helm-config",
           "HELM_DATA_HOME": "/tmp/flywheel-helm-data"}
    out = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert out.returncode == 0, f"helm {' '.join(args)}:\n{out.stderr}"
    return out


def scenario_args(name: str) -> list[str]:
    files, sets, caps = SCENARIOS[name]
    args: list[str] = []
    for f in files:
        args += ["-f", str(CHART / "ci" / f)]
    for s in sets:
        args += ["--set", s]
    for c in caps:
        args += ["--api-versions", c]
    return args


def render(helm: Path, name: str, *extra: str) -> list[dict]:
    out = run_helm(helm, "template", "rel", str(CHART), "--namespace", "ml", *scenario_args(name), *extra)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered(helm) -> dict[str, list[dict]]:
    return {name: render(helm, name) for name in SCENARIOS}


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def pod_specs(docs: list[dict]):
    """(resource, pod spec) for every workload, including the helm test hook pod and the
    reward-training job template."""
    for doc in docs:
        if doc["kind"] == "Pod":
            yield doc, doc["spec"]
        elif doc["kind"] in ("Deployment", "StatefulSet"):
            yield doc, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "CronJob":
            yield doc, doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


# -- lint, render, unit tests ----------------------------------------------------------------------
def test_pinned_helm_version(helm) -> None:
    out = run_helm(helm, "version", "--template", "{{.Version}}")
    assert out.stdout.strip() == re.search(r'HELM_VERSION:-(v[\d.]+)', (TOOLS / "install-helm.sh").read_text())[1]


@pytest.mark.parametrize("scenario", ["default", "all-off", "scoring-only-hpa", "keda", "kafka-internal", "secure",
                                      "gpu-multinode"])
def test_lint_strict(helm, scenario: str) -> None:
    files, sets, _ = SCENARIOS[scenario]
    args = [a for f in files for a in ("-f", str(CHART / "ci" / f))] + [a for s in sets for a in ("--set", s)]
    out = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", "ml", *args, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_helm_unittest_suites(helm) -> None:
    suites = sorted(p.name for p in (CHART / "tests").glob("*_test.yaml"))
    assert len(suites) >= 4
    out = subprocess.run([str(helm.parent / "helm-unittest"), "--color=false", str(CHART)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr
    assert re.search(rf"Test Suites: {len(suites)} passed, {len(suites)} total", out.stdout), out.stdout


def test_every_ci_values_file_is_exercised() -> None:
    used = {f for files, _, _ in SCENARIOS.values() for f in files}
    assert used == {p.name for p in (CHART / "ci").glob("*.yaml")}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_rendered_manifests_match_kubernetes_schemas(rendered, scenario: str) -> None:
    docs = rendered[scenario]
    crds = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication", "Certificate"}
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in crds:
            continue  # not in the Kubernetes schemas: checked structurally below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{scenario}: {where}: {exc.message} at {'.'.join(map(str, exc.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{scenario}: {where}: no Kubernetes {K8S_VERSION} schema for {doc['apiVersion']}")


def test_component_switches(rendered) -> None:
    def workloads(docs):
        return {component(d) for d in docs if d["kind"] in ("Deployment", "StatefulSet")}

    assert workloads(rendered["default"]) == set(SERVICES)
    assert workloads(rendered["all-off"]) == set()
    assert workloads(rendered["scoring-only-hpa"]) == {"reward", "preference"}
    assert workloads(rendered["kafka-internal"]) == {*SERVICES, "kafka"}
    for scenario, docs in rendered.items():
        for kind in ("Service", "ConfigMap", "ServiceAccount", "NetworkPolicy"):
            names = {component(d) for d in docs if d["kind"] == kind} & set(SERVICES)
            assert names == workloads(docs) & set(SERVICES), f"{scenario}: {kind} for {names}"


def test_disruption_budgets_only_where_more_than_one_replica_runs(rendered) -> None:
    for scenario, docs in rendered.items():
        for pdb in by_kind(docs, "PodDisruptionBudget").values():
            workload = by_kind(docs, "Deployment")[pdb["metadata"]["name"]]
            replicas = workload["spec"].get("replicas")
            scaled = [s for kind in ("HorizontalPodAutoscaler", "ScaledObject") for s in by_kind(docs, kind).values()
                      if s["spec"]["scaleTargetRef"]["name"] == pdb["metadata"]["name"]]
            least = replicas if replicas is not None else scaled[0]["spec"].get(
                "minReplicas", scaled[0]["spec"].get("minReplicaCount"))
            assert least > 1, f"{scenario}: a budget on {least} replica protects nothing"
    assert not by_kind(rendered["default"], "PodDisruptionBudget")
    assert set(by_kind(rendered["gpu-multinode"], "PodDisruptionBudget")) == {"rel-flywheel-policy"}


def test_standard_labels_everywhere(rendered) -> None:
    required = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                "app.kubernetes.io/managed-by", "app.kubernetes.io/component", "app.kubernetes.io/part-of",
                "helm.sh/chart"}
    for scenario, docs in rendered.items():
        for doc in docs:
            missing = required - set(doc["metadata"].get("labels", {}))
            assert not missing, f"{scenario}: {doc['kind']}/{doc['metadata']['name']} lacks {missing}"
            assert doc["metadata"].get("namespace") == "ml", f"{doc['kind']}/{doc['metadata']['name']}"


# -- security and probes --------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_container_is_hardened_with_probes_and_limits(rendered, scenario: str) -> None:
    for doc, spec in pod_specs(rendered[scenario]):
        runs_to_completion = "helm.sh/hook" in doc["metadata"].get("annotations", {}) or doc["kind"] == "CronJob"
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True and pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        # Service links would inject FLYWHEEL_<SERVICE>_PORT=tcp://... for a release named "flywheel",
        # right in the settings' environment namespace.
        assert spec.get("enableServiceLinks") is False
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{scenario}: {doc['kind']}/{doc['metadata']['name']}/{container['name']}"
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) >= 10000, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged", False) is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            limits = container.get("resources", {}).get("limits", {})
            requests = container.get("resources", {}).get("requests", {})
            assert {"cpu", "memory"} <= set(limits) and {"cpu", "memory"} <= set(requests), where
            if not runs_to_completion:
                assert "livenessProbe" in container and "readinessProbe" in container, where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"


@pytest.mark.parametrize("scenario", ["default", "keda", "shared-checkpoints"])
def test_service_containers_use_native_grpc_probes(rendered, scenario: str) -> None:
    v = values()
    for doc, spec in pod_specs(rendered[scenario]):
        name = component(doc)
        if name not in SERVICES:
            continue
        (container,) = spec["containers"]
        port = v[name]["grpcPort"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{name} {probe}"
        assert container["readinessProbe"]["grpc"]["service"] == f"flywheel.v1.{name.capitalize()}Service"
        # liveness never waits for readiness (a replay or model load must not restart the pod)
        from flywheel.runtime.server import LIVENESS_SERVICE

        assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert container["startupProbe"]["grpc"]["service"] == LIVENESS_SERVICE
        assert container["args"] == ["serve", name]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/var/lib/flywheel", "/tmp"}


def test_schema_keeps_the_security_context_restricted(helm) -> None:
    for bad in ("securityContext.readOnlyRootFilesystem=false", "securityContext.runAsNonRoot=false",
                "podSecurityContext.runAsNonRoot=false", "securityContext.allowPrivilegeEscalation=true"):
        out = run_helm(helm, "template", "rel", str(CHART), "--set", bad, check=False)
        assert out.returncode != 0 and "values don't meet the specifications of the schema" in out.stderr, bad


def test_schema_rejects_typos_and_chart_owned_settings(helm) -> None:
    cases = {
        "reward.replicas=2": "additional properties 'replicas' not allowed",
        "reward.config.grpc_port=1": "/reward/config",
        "config.kafka_bootstrap_servers=x:1": "/config",
        "reward.grpcPort=70000": "/reward/grpcPort",
        "kafka.securityProtocol=TLS": "/kafka/securityProtocol",
        "reward.image.digest=latest": "/reward/image/digest",
    }
    for setting, message in cases.items():
        out = run_helm(helm, "template", "rel", str(CHART), "--set", setting, check=False)
        assert out.returncode != 0 and message in out.stderr, f"{setting}: {out.stderr}"
    out = run_helm(helm, "template", "rel", str(CHART), "--set", "reward.autoscaling.enabled=true",
                   "--set", "reward.keda.enabled=true", check=False)
    assert out.returncode != 0 and "either autoscaling (HPA) or keda" in out.stderr


# -- settings and ports against the code ---------------------------------------------------------
@pytest.mark.parametrize("service", SERVICES)
def test_chart_ports_are_the_code_defaults(rendered, service: str) -> None:
    cls = settings_class(service)
    v = values()[service]
    if cls is None:
        pytest.fail(f"flywheel.{service}.settings is missing")
    fields = cls.model_fields
    assert v["grpcPort"] == fields["grpc_port"].default
    assert v["metricsPort"] == fields["metrics_port"].default
    for extra in v.get("extraPorts", []):
        assert extra["port"] == fields[extra["setting"]].default, extra
    # every *_port setting of the service is exposed by the chart
    port_fields = {n for n, f in fields.items() if n.endswith("_port") and isinstance(f.default, int)}
    assert port_fields == {"grpc_port", "metrics_port", *(e["setting"] for e in v.get("extraPorts", []))}

    docs = rendered["default"]
    svc = by_kind(docs, "Service")[f"rel-flywheel-{service}"]
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports["grpc"] == v["grpcPort"] and ports["metrics"] == v["metricsPort"]
    config = by_kind(docs, "ConfigMap")[f"rel-flywheel-{service}"]["data"]
    assert int(config["FLYWHEEL_GRPC_PORT"]) == v["grpcPort"]
    assert int(config["FLYWHEEL_METRICS_PORT"]) == v["metricsPort"]
    workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and component(d) == service)
    container_ports = {p["name"]: p["containerPort"] for p in workload["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert container_ports == ports
    for extra in v.get("extraPorts", []):
        assert int(config[f"FLYWHEEL_{extra['setting'].upper()}"]) == extra["port"]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_env_names_are_settings_fields(rendered, scenario: str, monkeypatch) -> None:
    docs = rendered[scenario]
    configmaps = by_kind(docs, "ConfigMap")
    checked = 0
    for doc, spec in pod_specs(docs):
        name = {"reward-train": "trainer"}.get(component(doc), component(doc))  # the job runs as the trainer
        if name not in SERVICES:
            continue
        cls = settings_class(name)
        assert cls is not None, f"flywheel.{name}.settings is missing"
        fields = {f"FLYWHEEL_{n.upper()}" for n in cls.model_fields}
        container = spec["containers"][0]
        names = {e["name"] for e in container.get("env", []) if e["name"].startswith("FLYWHEEL_")}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:  # a secretRef's keys are the operator's (auth.existingSecret)
                names |= set(configmaps[source["configMapRef"]["name"]]["data"])
        unknown = names - fields
        assert not unknown, f"{scenario}: {name} gets variables its settings do not define: {sorted(unknown)}"
        # and the settings class accepts the rendered values (Secret-backed ones with stand-ins)
        env = {k: v for k, v in configmaps[f"rel-flywheel-{name}"]["data"].items()}
        env |= {e["name"]: "from-secret" for e in container.get("env", [])
                if e["name"].startswith("FLYWHEEL_") and "secretKeyRef" in e.get("valueFrom", {})}
        with monkeypatch.context() as environment:  # parsed as the service parses them (JSON lists too)
            for key, value in env.items():
                environment.setenv(key, value)
            parsed = cls(_env_file=None)
        assert parsed.grpc_port == values()[name]["grpcPort"]
        checked += 1
    if scenario != "all-off":
        assert checked


def test_user_config_reaches_the_service_settings(helm) -> None:
    cls = settings_class("reward")
    assert cls is not None
    field = next(n for n, f in cls.model_fields.items() if n.startswith("reward_") and f.annotation is int)
    docs = render(helm, "default", "--set", f"reward.config.{field}=7", "--set", "config.log_level=DEBUG")
    data = by_kind(docs, "ConfigMap")["rel-flywheel-reward"]["data"]
    settings = cls(_env_file=None, **{k[len("FLYWHEEL_"):].lower(): v for k, v in data.items()})
    assert getattr(settings, field) == 7 and settings.log_level == "DEBUG"
    assert by_kind(docs, "ConfigMap")["rel-flywheel-policy"]["data"]["FLYWHEEL_LOG_LEVEL"] == "DEBUG"


def test_internal_kafka_is_what_services_connect_to(rendered) -> None:
    docs = rendered["kafka-internal"]
    kafka_svc = by_kind(docs, "Service")["rel-flywheel-kafka"]
    for name, cm in by_kind(docs, "ConfigMap").items():
        if component(cm) in SERVICES:
            # fully qualified: the name the broker advertises, resolvable from KEDA's namespace too
            assert cm["data"]["FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS"] == f"{kafka_svc['metadata']['name']}.ml.svc:9092"
            assert cm["data"]["FLYWHEEL_KAFKA_REPLICATION_FACTOR"] == "1"
    broker = by_kind(docs, "StatefulSet")["rel-flywheel-kafka"]
    props = by_kind(docs, "ConfigMap")["rel-flywheel-kafka"]["data"]["server.properties"]
    assert "process.roles=broker,controller" in props  # KRaft
    assert f"advertised.listeners=PLAINTEXT://rel-flywheel-kafka.ml.svc:9092" in props
    assert broker["spec"]["template"]["spec"]["containers"][0]["image"].startswith("docker.io/apache/kafka:")


def test_shared_checkpoints_are_written_by_the_trainer_only(rendered) -> None:
    docs = rendered["shared-checkpoints"]
    claim = by_kind(docs, "PersistentVolumeClaim")["rel-flywheel-checkpoints"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for doc, spec in pod_specs(docs):
        name = component(doc)
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        if name in ("policy", "reward", "trainer", "reward-train"):
            assert mounts["checkpoints"]["mountPath"] == "/var/lib/flywheel/shared"
            assert mounts["checkpoints"].get("readOnly", False) is (name not in ("trainer", "reward-train"))
        elif name == "preference":
            assert "checkpoints" not in mounts
    assert "rel-flywheel-reward-train" in by_kind(docs, "CronJob")
    trainer_cm = by_kind(docs, "ConfigMap")["rel-flywheel-trainer"]["data"]
    assert trainer_cm["FLYWHEEL_TRAINER_CHECKPOINT_URI"] == "file:///var/lib/flywheel/shared/checkpoints/policy"
    assert trainer_cm["FLYWHEEL_TRAINER_REWARD_OUTPUT_DIR"] == "/var/lib/flywheel/shared/checkpoints/reward"
    for name in ("policy", "reward"):  # where they may load announced versions from: the trainer's writes
        data = by_kind(docs, "ConfigMap")[f"rel-flywheel-{name}"]["data"]
        assert json.loads(data["FLYWHEEL_CHECKPOINT_ROOTS"]) == ["/var/lib/flywheel/shared/checkpoints"]


def test_policy_and_reward_may_load_from_where_the_trainer_writes(helm) -> None:
    """An object-store checkpoint URI of the trainer is allowed (scheme://host) for policy and reward;
    without one (and no shared volume) they keep the service default, <home>/checkpoints."""
    docs = render(helm, "default", "--set", "trainer.config.trainer_checkpoint_uri=s3://Ckpt:9000/flywheel/policy",
                  "--set", "reward.config.checkpoint_remote={s3://mine}")
    maps = by_kind(docs, "ConfigMap")
    assert json.loads(maps["rel-flywheel-policy"]["data"]["FLYWHEEL_CHECKPOINT_REMOTE"]) == ["s3://ckpt"]
    assert json.loads(maps["rel-flywheel-reward"]["data"]["FLYWHEEL_CHECKPOINT_REMOTE"]) == ["s3://mine"]  # user wins
    for name in ("preference", "trainer"):
        assert "FLYWHEEL_CHECKPOINT_REMOTE" not in maps[f"rel-flywheel-{name}"]["data"]
    default = by_kind(render(helm, "default"), "ConfigMap")
    assert not any("FLYWHEEL_CHECKPOINT_" in key for cm in default.values() for key in cm.get("data", {}))


# -- wiring: selectors, autoscaling, monitoring ------------------------------------------------------
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_selectors_and_targets_resolve(rendered, scenario: str) -> None:
    docs = rendered[scenario]
    workloads = {d["metadata"]["name"]: d for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    pod_labels = [d["spec"]["template"]["metadata"]["labels"] for d in workloads.values()]
    pod_labels += [d["metadata"]["labels"] for d in docs if d["kind"] == "Pod"]

    def selects(selector: dict) -> int:
        # statefulset.kubernetes.io/pod-name is set by the controller (the trainer Service picks pod 0)
        selector = {k: v for k, v in selector.items() if k != "statefulset.kubernetes.io/pod-name"}
        return sum(all(labels.get(k) == v for k, v in selector.items()) for labels in pod_labels)

    for d in workloads.values():
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for svc in by_kind(docs, "Service").values():
        assert selects(svc["spec"]["selector"]) == 1, svc["metadata"]["name"]
    for kind in ("PodDisruptionBudget",):
        for pdb in by_kind(docs, kind).values():
            assert selects(pdb["spec"]["selector"]["matchLabels"]) == 1
    for policy in by_kind(docs, "NetworkPolicy").values():
        assert selects(policy["spec"]["podSelector"]["matchLabels"]) == 1
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for scaler in by_kind(docs, kind).values():
            target = scaler["spec"]["scaleTargetRef"]
            assert target["name"] in workloads and workloads[target["name"]]["kind"] == "Deployment"
            assert "replicas" not in workloads[target["name"]]["spec"], "the autoscaler owns replicas"
    for sts in by_kind(docs, "StatefulSet").values():
        assert sts["spec"]["serviceName"] in by_kind(docs, "Service")


def test_monitoring_is_gated_on_the_crds(rendered) -> None:
    kinds = {name: {d["kind"] for d in docs} for name, docs in rendered.items()}
    assert not kinds["default"] & {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds["default-with-crds"]
    assert "ConfigMap" in kinds["default"]  # the dashboard needs no CRD
    assert "ScaledObject" not in kinds["default-with-crds"]  # KEDA only when asked for
    assert sum(d["kind"] == "ScaledObject" for d in rendered["keda"]) == 2
    assert not any(d["kind"] == "HorizontalPodAutoscaler" for d in rendered["keda"])
    assert sum(d["kind"] == "HorizontalPodAutoscaler" for d in rendered["scoring-only-hpa"]) == 1


def test_service_monitor_scrapes_every_service_as_its_alert_job(rendered) -> None:
    docs = rendered["kafka-internal"]
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]
    scraped = []
    for svc in by_kind(docs, "Service").values():
        labels = svc["metadata"]["labels"]
        if all(labels.get(k) == v for k, v in selector["matchLabels"].items()) and \
                all(e["key"] in labels for e in selector["matchExpressions"]):
            assert {p["name"] for p in svc["spec"]["ports"]} >= {monitor["spec"]["endpoints"][0]["port"]}
            scraped.append(labels[monitor["spec"]["jobLabel"]])
    assert sorted(scraped) == sorted(f"flywheel-{s}" for s in SERVICES)


def test_keda_scales_on_each_services_input_topic_and_group(rendered) -> None:
    from flywheel.bus import topics

    names = {t.name for t in topics.ALL_TOPICS}
    for obj in by_kind(rendered["keda"], "ScaledObject").values():
        trigger = obj["spec"]["triggers"][0]
        assert trigger["type"] == "kafka"
        meta = trigger["metadata"]
        assert meta["topic"] in names
        service = component(obj)
        cls = settings_class(service)
        group_field = next((n for n in cls.model_fields if n.endswith(("consumer_group", "group_id"))), None)
        expected_group = cls.model_fields[group_field].default if group_field else f"flywheel-{service}"
        assert meta["consumerGroup"] == expected_group
        topic_field = next((n for n in cls.model_fields if n.endswith("prompts_topic")), None)
        if topic_field:
            assert meta["topic"] == cls.model_fields[topic_field].default


def test_prometheus_rule_carries_the_rules_file(rendered) -> None:
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    (rule,) = by_kind(rendered["kafka-internal"], "PrometheusRule").values()
    assert [g["name"] for g in rule["spec"]["groups"]] == [g["name"] for g in rules["groups"]]
    for got, want in zip(rule["spec"]["groups"], rules["groups"]):
        for r_got, r_want in zip(got["rules"], want["rules"], strict=True):
            assert r_got["expr"] == r_want["expr"] and r_got["alert"] == r_want["alert"]
            assert r_got["labels"] == {**r_want["labels"], "team": "rlhf"}


def test_dashboard_configmap_is_the_generated_dashboard(rendered) -> None:
    dash = by_kind(rendered["default"], "ConfigMap")["rel-flywheel-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["flywheel.json"]) == json.loads((CHART / "files/grafana-dashboard.json").read_text())
    out = subprocess.run([sys.executable, str(TOOLS / "gen_grafana_dashboard.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_helm_test_hook_checks_every_enabled_service(rendered) -> None:
    for scenario in ("default", "scoring-only-hpa"):
        (pod,) = [d for d in rendered[scenario] if d["kind"] == "Pod"]
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        script = pod["spec"]["containers"][0]["args"][0]
        enabled = {component(d) for d in rendered[scenario] if d["kind"] in ("Deployment", "StatefulSet")}
        for service in SERVICES:
            target = f"rel-flywheel-{service}.ml.svc:{values()[service]['grpcPort']}"
            assert (target in script) is (service in enabled), (scenario, service)
        assert script.count("grpc_health_check.py") == len(enabled)


def test_chart_config_keys_are_the_settings_fields() -> None:
    out = subprocess.run([sys.executable, str(TOOLS / "gen_chart_config_schema.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # regenerate with deploy/tools/gen_chart_config_schema.py


def test_chart_readme_values_table_is_fresh() -> None:
    out = subprocess.run([sys.executable, str(TOOLS / "gen_chart_readme.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    readme = (CHART / "README.md").read_text()
    for key in ("kafka.internal.enabled", "metrics.serviceMonitor.additionalLabels", "trainer.persistence.size"):
        assert f"`{key}`" in readme


# -- security scan ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_checkov_finds_nothing_in_the_rendered_chart_and_dockerfile(helm, checkov, rendered, tmp_path) -> None:
    for name, docs in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (tmp_path / "Dockerfile").write_text((REPO / "docker" / "Dockerfile").read_text())
    out = subprocess.run([str(checkov), "--directory", str(tmp_path),
                          "--framework", "kubernetes", "dockerfile", "--output", "json", "--compact",
                          "--skip-download"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "BC_API_KEY": ""})
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed, skipped = [], []
    for report in reports:
        failed += [f"{r['check_id']} {r['check_name']} {r['resource']}" for r in report["results"]["failed_checks"]]
        skipped += report["results"]["skipped_checks"]
        assert report["summary"]["parsing_errors"] == 0
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    # checkov without a platform key reports no severities: every finding counts, not only HIGH ones
    assert not failed, "\n".join(failed)
    assert {c["check_id"] for c in skipped} <= {"CKV_K8S_15", "CKV_K8S_43", "CKV_K8S_35"}
    # checkov's JSON drops the reasons of Kubernetes skips: read them from the manifests
    for docs in rendered.values():
        for doc in docs:
            for key, value in doc["metadata"].get("annotations", {}).items():
                if key.startswith("checkov.io/skip"):
                    check_id, _, reason = value.partition("=")
                    assert re.fullmatch(r"CKV2?_\w+", check_id) and len(reason) > 30, f"{key}: {value}"


def test_packaged_chart_ships_templates_not_dev_files(helm, tmp_path) -> None:
    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    import tarfile

    (archive,) = tmp_path.glob("flywheel-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "flywheel/templates/tests/test-health.yaml" in names  # the `helm test` hook
    assert {"flywheel/values.schema.json", "flywheel/files/prometheus-rules.yaml", "flywheel/README.md",
            "flywheel/templates/NOTES.txt"} <= names
    assert not any(n.startswith(("flywheel/tests/", "flywheel/ci/")) for n in names), "dev files in the package"


def test_values_in_docs_deploy_md_render(helm, tmp_path) -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    block = re.search(r"cat > flywheel-values.yaml <<'YAML'\n(.*?)\nYAML\n", text, re.S).group(1)
    path = tmp_path / "flywheel-values.yaml"
    path.write_text(block)
    docs = [d for d in yaml.safe_load_all(run_helm(helm, "template", "flywheel", str(CHART), "-n", "flywheel",
                                                   "-f", str(path), *sum((["--api-versions", c] for c in MONITORING),
                                                                         [])).stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"ServiceMonitor", "PrometheusRule", "PersistentVolumeClaim"} <= kinds
    assert by_kind(docs, "StatefulSet")["flywheel-kafka"]  # the trial broker the doc enables
    images = {c["image"] for _, spec in pod_specs(docs) for c in spec["containers"]}
    assert "registry.example.com/flywheel/flywheel-reward:0.1.0" in images


def test_secure_values_in_docs_deploy_md_render(helm, tmp_path) -> None:
    """The secure-install walk-through: TLS, auth Secret, SASL_SSL and per-service clients render."""
    text = (REPO / "docs" / "deploy.md").read_text()
    for name in ("flywheel-values", "flywheel-secure"):
        block = re.search(rf"cat > {name}.yaml <<'YAML'\n(.*?)\nYAML\n", text, re.S).group(1)
        (tmp_path / f"{name}.yaml").write_text(block)
    docs = [d for d in yaml.safe_load_all(run_helm(
        helm, "template", "flywheel", str(CHART), "-n", "flywheel", "-f", str(tmp_path / "flywheel-values.yaml"),
        "-f", str(tmp_path / "flywheel-secure.yaml"), "--api-versions", "cert-manager.io/v1/Certificate").stdout) if d]
    assert by_kind(docs, "Certificate")["flywheel-tls"]["spec"]["secretName"] == "flywheel-tls"
    for doc, spec in pod_specs(docs):
        if component(doc) in SERVICES:
            container = spec["containers"][0]
            assert "exec" in container["readinessProbe"], component(doc)  # TLS: the probe script
            assert {"secretRef": {"name": "flywheel-auth"}} in container["envFrom"]
    policy = by_kind(docs, "NetworkPolicy")["flywheel-trainer"]
    assert len(policy["spec"]["ingress"][0]["from"]) == 1  # the release's own pods only


def test_versions_agree_with_the_package() -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version  # default image tag
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    for service in SERVICES:
        assert compose["services"][service]["image"] == f"flywheel-{service}:{version}"


@pytest.mark.kafka  # starts a broker of its own (not the kafka_bootstrap fixture)
def test_in_chart_kraft_config_boots_a_real_broker(rendered, tmp_path) -> None:
    """The broker config the chart renders, formatted and started the way its container does it
    (StorageTool format --standalone --ignore-formatted, twice as on a restart, then kafka.Kafka),
    with only paths and ports moved to the test machine. Flywheel then creates its topics on it."""
    from conftest import KAFKA_SH, free_port

    from flywheel.bus import ensure_topics

    docs = rendered["kafka-internal"]
    props = by_kind(docs, "ConfigMap")["rel-flywheel-kafka"]["data"]["server.properties"]
    container = by_kind(docs, "StatefulSet")["rel-flywheel-kafka"]["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    assert "kafka-storage.sh format --standalone --ignore-formatted" in script
    cluster_id = next(e["value"] for e in container["env"] if e["name"] == "KAFKA_CLUSTER_ID")

    port, cport = free_port(), free_port()
    local = (props.replace("0.0.0.0:9092", f"127.0.0.1:{port}").replace("127.0.0.1:9093", f"127.0.0.1:{cport}")
             .replace("rel-flywheel-kafka.ml.svc:9092", f"127.0.0.1:{port}")
             .replace("/var/lib/kafka/data", str(tmp_path / "data")))
    assert local.count(str(port)) == 2 and local.count(str(cport)) == 2
    (tmp_path / "server.properties").write_text(local)
    libs = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel")) / "kafka-4.1.1" / "libs"
    if not (libs / ".complete").exists():  # fetched by the session broker's launcher
        subprocess.run([str(KAFKA_SH), "fetch"], check=False, capture_output=True, timeout=600)
    assert (libs / ".complete").exists(), "Kafka jars missing (deploy/kafka/kafka.sh fetches them)"
    java = ["java", "-cp", f"{libs}/*"]
    for _ in range(2):
        fmt = subprocess.run([*java, "kafka.tools.StorageTool", "format", "--standalone", "--ignore-formatted",
                              "-t", cluster_id, "-c", str(tmp_path / "server.properties")],
                             capture_output=True, text=True, timeout=120)
        assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    log = open(tmp_path / "kafka.log", "w")
    broker = subprocess.Popen([*java[:1], "-Xmx512m", f"-Dkafka.logs.dir={tmp_path}", *java[1:], "kafka.Kafka",
                               str(tmp_path / "server.properties")], stdout=log, stderr=subprocess.STDOUT)
    try:
        def broker_runs() -> None:
            assert broker.poll() is None, (tmp_path / "kafka.log").read_text()[-3000:]

        # raises "not up yet" until the broker listens
        created = wait_until(lambda: ensure_topics(f"127.0.0.1:{port}", partitions=3, replication_factor=1), 120,
                             interval_s=1, what="Flywheel's topics on the in-chart broker config", alive=broker_runs)
        assert "flywheel.prompts.v1" in created and "flywheel.prompts.v1.dlq" in created
    finally:
        broker.terminate()
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            broker.kill()


@pytest.mark.kafka
@pytest.mark.slow
def test_in_chart_sasl_ssl_broker_boots_and_admits_only_its_users(helm, tmp_path) -> None:
    """kafka.securityProtocol=SASL_SSL on the in-chart broker: the container's own start script and
    server.properties, run with the Kafka jars (the image's two launcher scripts become two-line
    wrappers) and a test-made CA; the Secret's user then creates Flywheel's topics over SASL_SSL
    with SCRAM-SHA-512 and with PLAIN, and a wrong password is refused."""
    from conftest import KAFKA_SH, free_port
    from kafka.admin import KafkaAdminClient
    from tls_certs import make_pki

    from flywheel.bus import ensure_topics_for
    from flywheel.runtime.config import ServiceSettings

    docs = render(helm, "kafka-internal", "--set", "kafka.securityProtocol=SASL_SSL", "--set",
                  "kafka.sasl.existingSecret=kafka-user", "--set", "kafka.internal.tlsSecret=kafka-tls")
    props = by_kind(docs, "ConfigMap")["rel-flywheel-kafka"]["data"]["server.properties"]
    container = by_kind(docs, "StatefulSet")["rel-flywheel-kafka"]["spec"]["template"]["spec"]["containers"][0]
    assert "PLAINTEXT://0.0.0.0" not in props  # clients reach only the SASL_SSL listener

    pki = make_pki(tmp_path / "pki", dns_names=("rel-flywheel-kafka.ml.svc",))
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for src, dst in (("server.crt", "tls.crt"), ("server.key", "tls.key"), ("ca.crt", "ca.crt")):
        (tls_dir / dst).write_bytes((pki / src).read_bytes())
    port, cport, iport = free_port(), free_port(), free_port()
    # "/tmp/" first: the local paths substituted after it live under /tmp themselves
    local = (props.replace("/tmp/", f"{tmp_path}/run/").replace("0.0.0.0:9092", f"127.0.0.1:{port}")
             .replace("127.0.0.1:9093", f"127.0.0.1:{cport}").replace("127.0.0.1:9094", f"127.0.0.1:{iport}")
             .replace("rel-flywheel-kafka.ml.svc:9092", f"127.0.0.1:{port}")
             .replace("/var/lib/kafka/data", str(tmp_path / "data")))
    (tmp_path / "run").mkdir()
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "server.properties").write_text(local)
    libs = Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel")) / "kafka-4.1.1" / "libs"
    if not (libs / ".complete").exists():
        subprocess.run([str(KAFKA_SH), "fetch"], check=False, capture_output=True, timeout=600)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for script, main in (("kafka-storage.sh", "kafka.tools.StorageTool"), ("kafka-server-start.sh", "kafka.Kafka")):
        (bin_dir / script).write_text(f'#!/bin/sh\nexec java -Xmx384m -Dkafka.logs.dir={tmp_path}/run '
                                      f'-cp "{libs}/*" {main} "$@"\n')
        (bin_dir / script).chmod(0o755)
    start = (container["args"][0].replace("/tmp/", f"{tmp_path}/run/").replace("/opt/kafka/bin/", f"{bin_dir}/")
             .replace("/etc/flywheel-kafka-tls/", f"{tls_dir}/").replace("/etc/flywheel-kafka/", f"{tmp_path}/config/"))
    env = {**os.environ, "KAFKA_CLUSTER_ID": "Zmx5d2hlZWwta3JhZnQtMQ", "KAFKA_SASL_USERNAME": "flywheel",
           "KAFKA_SASL_PASSWORD": "s3cret-pw"}
    log = open(tmp_path / "broker.log", "w")
    broker = subprocess.Popen(["/bin/bash", "-ec", start], env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)

    def settings(mechanism: str, password: str = "s3cret-pw") -> ServiceSettings:
        return ServiceSettings(kafka_bootstrap_servers=f"127.0.0.1:{port}", kafka_security_protocol="SASL_SSL",
                               kafka_sasl_mechanism=mechanism, kafka_sasl_username="flywheel",
                               kafka_sasl_password=password, kafka_ssl_cafile=tls_dir / "ca.crt",
                               kafka_topic_partitions=1)
    try:
        def broker_runs() -> None:
            assert broker.poll() is None, (tmp_path / "broker.log").read_text()[-3000:]

        # raises "not up yet" until the broker listens
        created = wait_until(lambda: ensure_topics_for(settings("SCRAM-SHA-512")), 240, interval_s=2,
                             what="topics over SASL_SSL", alive=broker_runs)
        assert "flywheel.prompts.v1.dlq" in created
        assert ensure_topics_for(settings("PLAIN")) == []  # the same user over PLAIN: all exist already
        bad = settings("SCRAM-SHA-512", password="wrong")
        with pytest.raises(Exception):
            KafkaAdminClient(bootstrap_servers=bad.bootstrap_servers, bootstrap_timeout_ms=5000,
                             **bad.kafka_client_config()).list_topics()
        assert "s3cret-pw" not in props  # the password reaches the broker from the Secret, not the ConfigMap
    finally:
        if broker.poll() is None:
            os.killpg(broker.pid, 15)
        try:
            broker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(broker.pid, 9)
            broker.wait(timeout=30)
