#!/usr/bin/env python3
"""Generate the Flywheel Grafana dashboard (charts/flywheel/files/grafana-dashboard.json).

The chart ships it as a ConfigMap for the kube-prometheus-stack Grafana sidecar; docker compose
users import the same file. Edit the panel list here and rerun; tests check the JSON is fresh and
that every query parses and uses metrics the services export.

    python deploy/tools/gen_grafana_dashboard.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "charts" / "flywheel" / "files" / "grafana-dashboard.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", job=~"$job"'


class Layout:
    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.y = 0

    def _id(self) -> int:
        return len(self.panels) + 1

    def row(self, title: str) -> None:
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": self._id(),
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def line(self, *panels: tuple, height: int = 8) -> None:
        """One row of panels: (kind, title, [(expr, legend)], unit, description)."""
        width = 24 // len(panels)
        for i, (kind, title, targets, unit, description) in enumerate(panels):
            panel = {
                "type": kind, "title": title, "description": description, "datasource": DS, "id": self._id(),
                "gridPos": {"h": height, "w": width, "x": i * width, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend, "datasource": DS}
                            for j, (expr, legend) in enumerate(targets)],
            }
            if kind == "stat":
                panel["fieldConfig"]["defaults"]["thresholds"] = {
                    "mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]}
                panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                                    "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"}
            else:
                panel["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 1, "fillOpacity": 10}
                panel["options"] = {"legend": {"displayMode": "table", "placement": "bottom",
                                               "calcs": ["lastNotNull", "max"]}, "tooltip": {"mode": "multi"}}
            self.panels.append(panel)
        self.y += height


def rate(metric: str, by: str, extra: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{SEL}{extra}}}[$__rate_interval]))"


def quantile(q: float, metric: str, by: str, extra: str = "") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}{extra}}}[$__rate_interval])))"


def dashboard() -> dict:
    g = Layout()
    g.row("Services")
    g.line(("stat", "Targets up", [(f"sum by (job) (up{{{SEL}}})", "{{job}}")], "short",
            "Scrape targets answering per service."),
           ("stat", "Serving (gRPC health)", [(f"sum by (job) (flywheel_service_serving{{{SEL}}})", "{{job}}")],
            "short", "Instances whose gRPC health is SERVING."), height=4)
    g.line(("timeseries", "RPC rate", [(rate("grpc_server_handled_total", "grpc_service, grpc_method"),
                                        "{{grpc_service}}/{{grpc_method}}")], "reqps", "Completed RPCs per second."),
           ("timeseries", "RPC errors", [(rate("grpc_server_handled_total", "grpc_method, grpc_code",
                                               ', grpc_code!="OK"'), "{{grpc_method}} {{grpc_code}}")], "reqps",
            "RPCs that ended with a non-OK status, by code."))
    g.line(("timeseries", "RPC latency p99", [(quantile(0.99, "grpc_server_handling_seconds",
                                                        "grpc_service, grpc_method"), "{{grpc_method}}")], "s", ""),
           ("timeseries", "RPC latency p50", [(quantile(0.5, "grpc_server_handling_seconds",
                                                        "grpc_service, grpc_method"), "{{grpc_method}}")], "s", ""))
    g.row("Kafka")
    g.line(("timeseries", "Consumer lag", [(f"sum by (group, topic) (flywheel_bus_consumer_lag{{{SEL}}})",
                                            "{{group}} @ {{topic}}")], "short",
            "Records behind the partition end, per consumer group and topic."),
           ("timeseries", "Consumed records/s", [(rate("flywheel_bus_consumed_total", "group, topic"),
                                                  "{{group}} @ {{topic}}")], "ops", ""))
    g.line(("timeseries", "Produced records/s", [(rate("flywheel_bus_produced_total", "topic"), "{{topic}}"),
                                                 (rate("flywheel_bus_produce_errors_total", "topic"),
                                                  "errors {{topic}}")], "ops", ""),
           ("timeseries", "Dead-lettered and failing batches",
            [(f"sum by (group, topic) (increase(flywheel_bus_dead_lettered_total{{{SEL}}}[$__rate_interval]))",
              "DLQ {{group}} @ {{topic}}"),
             (f"sum by (group, topic) (increase(flywheel_bus_handler_failures_total{{{SEL}}}[$__rate_interval]))",
              "failures {{group}} @ {{topic}}")], "short", "Records sent to <topic>.dlq and handler retries."),
           ("timeseries", "Batch handling p99", [(quantile(0.99, "flywheel_bus_handle_seconds", "group, topic"),
                                                  "{{group}} @ {{topic}}")], "s", ""))
    g.row("Policy and reward")
    g.line(("timeseries", "Generated tokens/s", [(rate("flywheel_policy_generated_tokens_total", "job"),
                                                  "{{job}}")], "short", ""),
           ("timeseries", "Policy queue depth", [(f"sum by (job) (flywheel_policy_queue_depth{{{SEL}}})", "{{job}}")],
            "short", "Sequences waiting for a generation batch."),
           ("timeseries", "Policy version", [(f"max by (job) (flywheel_policy_version_number{{{SEL}}})", "{{job}}")],
            "none", "Policy version served (hot reloads move it)."))
    g.line(("timeseries", "Scoring latency", [(quantile(0.99, "flywheel_reward_scoring_seconds", "job"), "p99"),
                                              (quantile(0.5, "flywheel_reward_scoring_seconds", "job"), "p50")], "s",
            "Queueing plus forward pass of one scoring request (alert: p99 > 1 s)."),
           ("timeseries", "Reward queue depth", [(f"sum by (job) (flywheel_reward_queue_depth{{{SEL}}})", "{{job}}")],
            "short", ""),
           ("timeseries", "Scored rollouts/s", [(rate("flywheel_reward_scored_rollouts_total", "job"), "{{job}}")],
            "ops", ""))
    g.line(("timeseries", "Policy latency", [(quantile(0.99, "flywheel_policy_request_latency_seconds", "job"), "p99"),
                                             (quantile(0.5, "flywheel_policy_request_latency_seconds", "job"), "p50")],
            "s", "Submit to completion of one generation request."),
           ("timeseries", "Time to first token", [(quantile(0.99, "flywheel_policy_time_to_first_token_seconds",
                                                            "job"), "p99"),
                                                  (quantile(0.5, "flywheel_policy_time_to_first_token_seconds",
                                                            "job"), "p50")],
            "s", "Submit to first sampled token (alert: p99 > 5 s)."),
           ("timeseries", "Reward load shedding", [(rate("flywheel_reward_rejected_total", "reason"), "{{reason}}")],
            "reqps", "Scoring requests refused or dropped (queue full, deadline): alert above 1/s for 10 min."))
    g.row("Lag and access")
    g.line(("timeseries", "Preference replay lag", [(f"max by (instance, topic) (flywheel_preference_replay_lag{{{SEL}}})",
                                                     "{{instance}} {{topic}}")], "short",
            "Records not yet applied to the preference store; the service is unready until 0."),
           ("timeseries", "Trainer consumer lag", [(f'sum by (topic) (flywheel_bus_consumer_lag{{{SEL}, job="flywheel-trainer"}})',
                                                    "{{topic}}")], "short",
            "Scored rollouts waiting for the trainer (it cannot scale out; late ones go stale)."),
           ("timeseries", "Auth failures", [(rate("flywheel_preference_auth_failures_total", "job, reason"),
                                             "{{job}} {{reason}}")], "reqps",
            "Refused calls: missing/bad token (unauthenticated) or missing scope (permission_denied)."))
    g.row("Training")
    g.line(("timeseries", "Mean reward-model score", [(f"avg by (job) (flywheel_trainer_mean_score{{{SEL}}})",
                                                       "score"),
                                                      (f"avg by (job) (flywheel_trainer_mean_reward{{{SEL}}})",
                                                       "reward (score + KL penalty)")], "short",
            "Per PPO step (alert: collapse below the 6-hour baseline)."),
           ("timeseries", "KL(policy || reference)", [(f"max by (job) (flywheel_trainer_kl{{{SEL}}})", "KL"),
                                                      (f"max by (job) (flywheel_trainer_kl_coef{{{SEL}}})",
                                                       "KL coefficient")], "short", "Nats per sequence."))
    g.line(("timeseries", "PPO step", [(f"max by (job) (flywheel_trainer_step{{{SEL}}})", "step"),
                                       (f"max by (job) (flywheel_trainer_policy_version{{{SEL}}})",
                                        "published policy version")], "none", ""),
           ("timeseries", "Episodes/s", [(f"avg by (job) (flywheel_trainer_episodes_per_second{{{SEL}}})",
                                          "{{job}}")], "short", ""),
           ("timeseries", "Rollouts by outcome", [(rate("flywheel_trainer_rollouts_total", "outcome"),
                                                   "{{outcome}}")], "ops", "trained, stale, duplicate, ..."))
    g.row("PPO health")
    g.line(("timeseries", "Gradient norm", [(f"max by (job) (flywheel_trainer_grad_norm{{{SEL}}})", "grad norm")],
            "short", "Mean gradient norm before clipping: spikes precede divergence."),
           ("timeseries", "Approx KL and clip fraction",
            [(f"max by (job) (flywheel_trainer_approx_kl{{{SEL}}})", "approx KL"),
             (f"max by (job) (flywheel_trainer_clipfrac{{{SEL}}})", "clip fraction")], "short",
            "Size of each update (alert: approx KL > 0.1 or clip fraction > 0.3 for 30 min)."),
           ("timeseries", "Entropy", [(f"avg by (job) (flywheel_trainer_entropy{{{SEL}}})", "entropy")], "short",
            "Mean per-token policy entropy (alert: below 0.05 for 30 min)."),
           ("timeseries", "Reward-model jobs", [(f"sum by (state) (increase(flywheel_trainer_reward_model_jobs_total"
                                                 f"{{{SEL}}}[24h]))", "{{state}}")], "short",
            "TriggerRewardModelTraining jobs finished in the last 24 hours, by final state."))
    g.row("Raters")
    g.line(("timeseries", "Tasks by outcome", [(rate("flywheel_preference_tasks_total", "outcome"), "{{outcome}}")],
            "ops", "Leases handed out and how they ended: completed (on time / late), expired, released (skipped)."),
           ("timeseries", "Seconds per judgement", [(quantile(0.5, "flywheel_preference_judgement_seconds", "job"),
                                                     "p50"),
                                                    (quantile(0.9, "flywheel_preference_judgement_seconds", "job"),
                                                     "p90")], "s", "From lease to submission."),
           ("timeseries", "Open task slots by policy version",
            [(f"sum by (policy_version) (flywheel_preference_task_queue_depth{{{SEL}}})", "{{policy_version}}")],
            "short", "Rater slots still open per policy version (the queue raters work through)."))
    g.line(("timeseries", "Newest version waiting unrated",
            [(f"max by (job) (flywheel_preference_newest_version_unrated_seconds{{{SEL}}})", "{{job}}")], "s",
            "Age of the oldest task of the newest policy version nobody answered (alert: > 1 h for 10 min)."),
           ("timeseries", "Gold accuracy per rater",
            [(f"min by (rater) (flywheel_preference_rater_gold_accuracy{{{SEL}}})", "{{rater}}")], "percentunit",
            "Share of known-answer pairs each rater ordered correctly."),
           ("timeseries", "Flags", [(rate("flywheel_preference_flags_total", "reason"), "{{reason}}")], "ops",
            "Responses flagged unsafe / nonsense / cannot judge (left out of exports)."))
    variable_query = "label_values(flywheel_service_serving, namespace)"
    job_query = 'label_values(flywheel_service_serving{namespace=~"$namespace"}, job)'
    return {
        "title": "Flywheel", "uid": "flywheel-overview",
        "description": "Flywheel RLHF loop: gRPC services, Kafka bus, policy, reward and training health.",
        "tags": ["flywheel", "rlhf"], "timezone": "browser", "schemaVersion": 39, "version": 1,
        "editable": True, "graphTooltip": 1, "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "panels": g.panels, "annotations": {"list": []},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
             "current": {}, "hide": 0},
            {"name": "namespace", "type": "query", "label": "Namespace", "datasource": DS,
             "query": {"query": variable_query, "refId": "namespace"}, "definition": variable_query,
             "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "current": {}},
            {"name": "job", "type": "query", "label": "Service", "datasource": DS,
             "query": {"query": job_query, "refId": "job"}, "definition": job_query,
             "includeAll": True, "allValue": "flywheel-.+", "multi": True, "refresh": 2, "current": {}},
        ]},
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/tools/gen_grafana_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
