"""Alert rules, Prometheus config and Grafana dashboard: parsed, unit-tested, and held to the metrics
the services really export.

promtool (pinned, built by deploy/tools/install-promtool.sh through the Go module proxy) parses and
checks the rules and runs their unit tests (deploy/prometheus/tests/alerts.test.yaml: synthetic
series in, expected alerts with labels and rendered annotations out). Every metric name in an alert
or a dashboard query must be one that a running service exposes: the test starts each service with
its container command (`flywheel serve <service>`, configured through FLYWHEEL_* variables, against
the real Kafka broker), waits for gRPC health SERVING with the image's health-check script and
scrapes its /metrics endpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "charts" / "flywheel" / "files" / "prometheus-rules.yaml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "tests" / "alerts.test.yaml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "charts" / "flywheel" / "files" / "grafana-dashboard.json"
HEALTHCHECK = REPO / "docker" / "grpc_health_check.py"
FLYWHEEL = Path(sys.executable).parent / "flywheel"  # the console script of the running environment
SERVICES = ("policy", "reward", "preference", "trainer")
# A cold first run builds the pinned tools (`go install`, ~15 min on 2 cores) inside the first test's
# fixture; `deploy/tools/install-tools.sh` warms the cache beforehand. Tests themselves take seconds.
pytestmark = pytest.mark.timeout(2400)
# Series Prometheus itself attaches to every target: not exported by any service.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@pytest.fixture(scope="session")
def promtool() -> Path:
    out = subprocess.run([str(REPO / "deploy" / "tools" / "install-promtool.sh")], capture_output=True, text=True,
                         timeout=3000)
    assert out.returncode == 0, out.stderr[-4000:]
    return Path(out.stdout.strip().splitlines()[-1])


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


# -- a PromQL metric-name extractor (validity is promtool's job) ------------------------------------
_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<number>0x[0-9a-fA-F]+|\d*\.?\d+(?:[eE][+-]?\d+)?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<punct>=~|!~|!=|==|>=|<=|[-+*/%^(){}\[\],:=<>@])
  | (?P<space>\s+)
""", re.VERBOSE)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                 "count_values", "group", "limitk", "limit_ratio"}


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (`foo{...}`, bare `foo`, `{__name__="foo"}`)."""
    tokens = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        pos = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
    names: set[str] = set()
    brace = 0
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text in ("{", "["):
            brace += 1
        elif text in ("}", "]"):
            brace -= 1
        elif brace:  # label matchers, range and subquery durations
            if kind == "ident" and text == "__name__" and nxt in ("=",):
                names.add(tokens[i + 2][1].strip("\"'`"))
        elif kind == "ident" and text in _LABEL_LISTS:
            if nxt == "(":  # skip the label list
                depth, i = 0, i + 1
                while True:
                    if tokens[i][1] == "(":
                        depth += 1
                    elif tokens[i][1] == ")":
                        depth -= 1
                        if depth == 0:
                            break
                    i += 1
        elif kind == "ident" and text in _AGGREGATIONS and nxt in ("by", "without"):
            pass  # `sum by (...) (...)`: an operator, not a metric
        elif kind == "ident" and nxt != "(" and text.lower() not in _KEYWORDS:
            names.add(text)
        i += 1
    return names


def test_metric_name_extractor() -> None:
    assert metric_names('sum by (job, le) (rate(a_bucket{job=~"x", le!="1"}[5m])) / on (job) group_left (x) b') \
        == {"a_bucket", "b"}
    assert metric_names('histogram_quantile(0.99, sum without (instance) (rate(h_bucket[1m] offset 1h)))') \
        == {"h_bucket"}
    assert metric_names('max_over_time(x[1h:5m]) > bool 3 and {__name__="y", job="j"} unless z @ end()') \
        == {"x", "y", "z"}
    assert metric_names("up == 0") == {"up"}
    assert metric_names('avg(avg_over_time(m[6h] offset 30m)) - 3 * stddev_over_time(m[6h])') == {"m"}


# -- rules ---------------------------------------------------------------------------------------
def test_promtool_checks_the_rules(promtool) -> None:
    out = subprocess.run([str(promtool), "check", "rules", "--lint=all", "--lint-fatal", str(RULES)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_rejects_a_broken_rule(promtool, tmp_path) -> None:
    """The check above can fail: a missing parenthesis is reported."""
    broken = yaml.safe_load(RULES.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum(rate(up[5m])"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    out = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "unclosed left parenthesis" in out.stderr + out.stdout


def test_required_alerts_exist_with_routing_metadata() -> None:
    names = {r["alert"] for r in rules()}
    # what the deployment issue asks for, by intent
    assert {"FlywheelServiceDown", "FlywheelConsumerLagGrowing", "FlywheelDeadLetters", "FlywheelRewardCollapse",
            "FlywheelKLBlowUp", "FlywheelScoringLatencyHigh"} <= names
    for rule in rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert 'job=~"flywheel-.+"' in rule["expr"], f"{rule['alert']} must select Flywheel jobs only"


def test_alert_unit_tests_pass_and_cover_every_alert(promtool) -> None:
    suite = yaml.safe_load(RULE_TESTS.read_text())
    assert [(RULE_TESTS.parent / f).resolve() for f in suite["rule_files"]] == [RULES]
    firing = {check["alertname"] for test in suite["tests"] for check in test["alert_rule_test"] if check["exp_alerts"]}
    assert firing == {r["alert"] for r in rules()}, "every alert needs a unit test in which it fires"
    out = subprocess.run([str(promtool), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                         cwd=RULE_TESTS.parent)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "SUCCESS" in out.stdout


def test_alert_unit_tests_can_fail(promtool, tmp_path) -> None:
    """Raising a threshold beyond the synthetic data must break the KL test: the suite has teeth."""
    changed = RULES.read_text().replace("(flywheel_trainer_kl{job=~\"flywheel-.+\"}) > 20",
                                        "(flywheel_trainer_kl{job=~\"flywheel-.+\"}) > 50")
    assert changed != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(changed)
    suite = yaml.safe_load(RULE_TESTS.read_text())
    suite["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    out = subprocess.run([str(promtool), "test", "rules", str(tmp_path / "t.yaml")], capture_output=True, text=True)
    assert out.returncode != 0 and "FlywheelKLBlowUp" in out.stdout + out.stderr


def test_compose_prometheus_config_is_valid(promtool, tmp_path) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/flywheel.yaml"]
    config["rule_files"] = [str(RULES)]  # where compose mounts it from
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([str(promtool), "check", "config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# -- dashboard ----------------------------------------------------------------------------------
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*", "$job": "flywheel-.+"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unknown Grafana variable in {target['expr']}"
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_queries_parse(promtool) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, expr in queries:
        out = subprocess.run([str(promtool), "--experimental", "promql", "format", expr], capture_output=True,
                             text=True)
        assert out.returncode == 0, f"{title}: {expr}\n{out.stderr}"


def test_dashboard_layout() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"] == "flywheel-overview"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


# -- metric names against running services ----------------------------------------------------------
def exported_names(exposition: str) -> set[str]:
    """Sample names a scrape can return, from the `# TYPE` lines (families without samples included)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind in ("histogram", "gaugehistogram"):
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group())
    return names


def test_exported_names_from_an_exposition() -> None:
    text = ("# HELP a_total x\n# TYPE a_total counter\n# HELP h y\n# TYPE h histogram\n"
            'h_bucket{le="1"} 0\n# TYPE g gauge\ng 1\n')
    assert exported_names(text) == {"a_total", "h_bucket", "h_sum", "h_count", "g"}


@pytest.fixture(scope="module")
def service_metrics(kafka_bootstrap, tmp_path_factory) -> dict[str, set[str]]:
    """Start every service as its container does (`flywheel serve <service>`), scrape /metrics."""
    procs = {}
    ports = {}
    for service in SERVICES:
        home = tmp_path_factory.mktemp(f"{service}-home")
        grpc_port, metrics_port = free_port(), free_port()
        env = {**os.environ, "FLYWHEEL_HOST": "127.0.0.1", "FLYWHEEL_GRPC_PORT": str(grpc_port),
               "FLYWHEEL_PREFERENCE_UI_PORT": "0",
               "FLYWHEEL_METRICS_PORT": str(metrics_port), "FLYWHEEL_HOME": str(home),
               "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "FLYWHEEL_LOG_LEVEL": "WARNING",
               "FLYWHEEL_SHUTDOWN_DELAY_S": "0", "FLYWHEEL_SHUTDOWN_GRACE_S": "1"}
        if service == "policy":
            env["FLYWHEEL_POLICY_HTTP_PORT"] = str(free_port())
        log = open(home / "service.log", "w")
        procs[service] = (subprocess.Popen([str(FLYWHEEL), "serve", service], env=env, stdout=log,
                                           stderr=subprocess.STDOUT), home / "service.log")
        ports[service] = (grpc_port, metrics_port)
    scraped: dict[str, set[str]] = {}
    try:
        pending = set(SERVICES)

        def all_running() -> None:
            for service in pending:
                proc, log = procs[service]
                assert proc.poll() is None, f"{service} exited:\n{log.read_text()[-4000:]}"

        def all_serving_and_scraped() -> bool:
            for service in sorted(pending):
                grpc_port, metrics_port = ports[service]
                check = subprocess.run([sys.executable, str(HEALTHCHECK), "--address", f"127.0.0.1:{grpc_port}",
                                        "--service", f"flywheel.v1.{service.capitalize()}Service", "--timeout", "2"],
                                       capture_output=True, text=True)
                if check.returncode == 0:
                    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
                        scraped[service] = exported_names(reply.read().decode())
                    pending.discard(service)
            return not pending

        try:
            wait_until(all_serving_and_scraped, 420, interval_s=1, what="every service SERVING", alive=all_running)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; never SERVING: " + "; ".join(
                f"{s}:\n{procs[s][1].read_text()[-3000:]}" for s in pending)) from None
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return scraped


@pytest.mark.slow
def test_alerts_and_dashboard_use_metrics_the_services_export(service_metrics) -> None:
    everything = set().union(*service_metrics.values()) | PROMETHEUS_SYNTHETIC
    # the shared runtime's and bus's metrics are exported by every service
    for service, names in service_metrics.items():
        assert {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket", "flywheel_service_serving",
                "flywheel_bus_consumer_lag"} <= names, service
    missing = {}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - everything
        if unknown:
            missing[rule["alert"]] = sorted(unknown)
    for title, expr in dashboard_queries():
        unknown = metric_names(expr) - everything
        if unknown:
            missing[f"dashboard: {title}"] = sorted(unknown)
    assert not missing, f"metrics no service exports: {missing}"
    assert metric_names('rate(flywheel_trainer_kl_typo_total[5m]) > 0') - everything  # the check has teeth
    # and service-specific metrics come from the service the alert is about
    assert "flywheel_trainer_kl" in service_metrics["trainer"]
    assert "flywheel_trainer_mean_score" in service_metrics["trainer"]
    assert "flywheel_reward_scoring_seconds_bucket" in service_metrics["reward"]
