"""Flywheel's own fault-injection suite: `make chaos` (full) or `python tests/chaos.py --quick`.

Real processes on one machine (a KRaft broker, `flywheel serve policy|reward|preference`), real
traffic, real faults:

  policy kill -9      prompts in flight; the policy is killed and restarted with the same static
                      group instance id; every prompt must yield its rollouts
  reward kill -9      rollouts in flight; every rollout must be scored
  preference kill -9  rankings being submitted (clients retry UNAVAILABLE); every acknowledged
                      event must be on the topic, none twice
  broker restart      the broker is stopped under load and started again on the same port; no
                      service is restarted

Each fault prints one row: produced (inputs sent), acknowledged (inputs the broker/service
acknowledged), found (distinct outputs present), missing, duplicates (extra copies of an output
id), differing duplicates (copies whose content differs), DLQ (records dead-lettered from the
inputs), and time to resume: seconds from the restarted service reporting SERVING (or the broker
accepting connections) to its first new output. Half the prompts carry explicit seeds, half none (the
policy derives their seeds), and either way a redelivered prompt must reproduce the same text under
the same id.

The trainer's kill -9 (checkpoint -> publish -> commit window) is covered by
tests/test_trainer_kill9.py and tests/test_trainer_loop.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "services"))

import grpc  # noqa: E402
from kafka import KafkaConsumer, TopicPartition  # noqa: E402

from flywheel.bus import TypedProducer, ensure_topics  # noqa: E402
from flywheel.bus.topics import PREFERENCES, PROMPTS, ROLLOUTS, SCORED_ROLLOUTS  # noqa: E402
from flywheel.loop.local import KAFKA_SH, SERVICE_NAMES, LocalCluster, wait_serving  # noqa: E402
from flywheel.v1 import common_pb2, preference_pb2_grpc  # noqa: E402
from waiting import wait_until  # noqa: E402  (tests/ is on sys.path: pytest, or the script's own dir)

CANDIDATES = 2


@dataclass
class Row:
    fault: str
    produced: int
    acknowledged: int
    found: int
    missing: int
    duplicates: int
    differing: int
    dlq: int
    resume_s: float | None

    def cells(self) -> list[str]:
        resume = "-" if self.resume_s is None else f"{self.resume_s:.1f}"
        return [self.fault, *(str(v) for v in (self.produced, self.acknowledged, self.found, self.missing,
                                               self.duplicates, self.differing, self.dlq)), resume]


HEADER = ["fault", "produced", "acknowledged", "found", "missing", "duplicates", "differing dup.", "DLQ",
          "resume s"]


def table(rows: list[Row]) -> str:
    cells = [HEADER] + [r.cells() for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class Seen:
    """Records observed on one topic: id -> list of (content, monotonic arrival time)."""

    by_id: dict[str, list[tuple[bytes, float]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, key: str, content: bytes, at: float) -> None:
        self.by_id[key].append((content, at))

    def matching(self, prefix: str) -> dict[str, list[tuple[bytes, float]]]:
        return {k: v for k, v in list(self.by_id.items()) if k.startswith(prefix)}


class Observer:
    """Tails the output topics (from their end at start) on a thread, keyed by output id."""

    def __init__(self, bootstrap: str) -> None:
        self.topics = {ROLLOUTS.name: Seen(), SCORED_ROLLOUTS.name: Seen(), PREFERENCES.name: Seen(),
                       PROMPTS.dlq: Seen(), ROLLOUTS.dlq: Seen()}
        self._bootstrap = bootstrap
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-observer", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(60)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _consumer(self) -> KafkaConsumer:
        c = KafkaConsumer(bootstrap_servers=self._bootstrap, group_id=None, enable_auto_commit=False,
                          reconnect_backoff_max_ms=1000)
        tps = [TopicPartition(t, p) for t in self.topics for p in sorted(c.partitions_for_topic(t) or [])]
        c.assign(tps)
        c.seek_to_end(*tps)
        for tp in tps:
            c.position(tp)  # resolve "end" now, not lazily after the faults began
        return c

    def _run(self) -> None:
        consumer = self._consumer()
        self._ready.set()
        try:
            while not self._stop.is_set():
                for tp, records in consumer.poll(timeout_ms=100).items():
                    now = time.monotonic()
                    for r in records:
                        self._add(tp.topic, r, now)
        finally:
            consumer.close()

    def _add(self, topic: str, record, now: float) -> None:  # noqa: ANN001
        seen = self.topics[topic]
        if topic == ROLLOUTS.name:
            m = common_pb2.Rollout.FromString(record.value)
            seen.add(f"{m.prompt_id}/{m.rollout_id}", m.response_text.encode(), now)
        elif topic == SCORED_ROLLOUTS.name:
            m = common_pb2.ScoredRollout.FromString(record.value)
            seen.add(f"{m.rollout.prompt_id}/{m.rollout.rollout_id}", repr(round(m.reward, 6)).encode(), now)
        elif topic == PREFERENCES.name:
            m = common_pb2.PreferenceEvent.FromString(record.value)
            seen.add(m.WhichOneof("event") and getattr(m, m.WhichOneof("event")).event_id or "", record.value, now)
        else:
            seen.add((record.key or b"").decode(errors="replace"), record.value or b"", now)


def summarise(fault: str, seen: Seen, prefix: str, expected: int, produced: int, acknowledged: int, dlq: int,
              resume_s: float | None) -> Row:
    got = seen.matching(prefix)
    copies = sum(len(v) for v in got.values())
    differing = sum(1 for v in got.values() if len({c for c, _ in v}) > 1)
    return Row(fault, produced, acknowledged, len(got), max(0, expected - len(got)), copies - len(got), differing,
               dlq, resume_s)


def first_after(seen: Seen, prefix: str, since: float) -> float | None:
    times = [at for v in seen.matching(prefix).values() for _, at in v if at >= since]
    return min(times) - since if times else None


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:  # noqa: ANN001
    """`wait_until` that reports instead of failing: the harness measures what happened either way."""
    try:
        wait_until(predicate, timeout_s, interval_s)
    except AssertionError:
        return False
    return True


class Chaos:
    def __init__(self, run_dir: Path, *, prompts: int, events: int, broker_down_s: float,
                 bootstrap: str | None = None, completion_timeout_s: float = 300.0) -> None:
        self.run = uuid.uuid4().hex[:6]
        self.prompts = prompts
        self.events = events
        self.broker_down_s = broker_down_s
        self.completion_timeout_s = completion_timeout_s
        self.cluster = LocalCluster(run_dir)
        self.own_broker = bootstrap is None
        self.bootstrap = self.cluster.start_kafka(bootstrap)
        self.port = int(self.bootstrap.rsplit(":", 1)[1])
        ensure_topics(self.bootstrap, [PROMPTS, ROLLOUTS, SCORED_ROLLOUTS, PREFERENCES], partitions=3,
                      replication_factor=1)
        self.producer = TypedProducer(self.bootstrap, client_id="chaos")
        self.observer = Observer(self.bootstrap)
        self.observer.start()
        common = {"FLYWHEEL_METRICS_ENABLED": "false", "FLYWHEEL_KAFKA_POLL_TIMEOUT_MS": "200",
                  "FLYWHEEL_KAFKA_RETRY_BACKOFF_S": "0.5"}
        self.env = {
            "policy": {**common, "FLYWHEEL_POLICY_HTTP_ENABLED": "false", "FLYWHEEL_POLICY_RELOAD_ENABLED": "false",
                       "FLYWHEEL_TORCH_THREADS": "1", "FLYWHEEL_POLICY_WORKER_MAX_PROMPTS": "4",
                       "FLYWHEEL_KAFKA_MAX_POLL_RECORDS": "16",
                       "FLYWHEEL_KAFKA_CONSUMER_GROUP": f"chaos-policy-{self.run}",
                       "FLYWHEEL_KAFKA_GROUP_INSTANCE_ID": f"chaos-policy-{self.run}-0"},
            "reward": {**common, "FLYWHEEL_REWARD_SCORER": "vader", "FLYWHEEL_REWARD_RELOAD_ENABLED": "false",
                       "FLYWHEEL_REWARD_MAX_BATCH_SIZE": "8",
                       "FLYWHEEL_KAFKA_CONSUMER_GROUP": f"chaos-reward-{self.run}",
                       "FLYWHEEL_KAFKA_GROUP_INSTANCE_ID": f"chaos-reward-{self.run}-0"},
            "preference": {**common, "FLYWHEEL_PREFERENCE_AUTH_ENABLED": "false",
                           "FLYWHEEL_PREFERENCE_ALLOW_EXTERNAL_RESPONSES": "true",
                           "FLYWHEEL_KAFKA_CONSUMER_GROUP": f"chaos-preference-{self.run}"},
        }
        self.rows: list[Row] = []

    # -- helpers ---------------------------------------------------------------------------------
    def start(self, name: str) -> float:
        """(Re)start a service; returns the monotonic time it reported SERVING."""
        self.cluster.start_service(name, self.env[name], timeout_s=300)
        return time.monotonic()

    def kill(self, name: str) -> None:
        self.cluster.services.pop(name).kill()

    def send_prompts(self, prefix: str) -> int:
        for i in range(self.prompts):
            prompt = common_pb2.Prompt(
                prompt_id=f"{prefix}{i:04d}", text=f"Write one sentence about the number {i}.", split="train",
                sampling=common_pb2.SamplingParams(n=CANDIDATES, max_new_tokens=8, temperature=1.0))
            if i % 2 == 0:  # the others carry no seed: the policy derives one from (prompt id, version, candidate)
                prompt.sampling.seed = 1000 + i
            self.producer.send(PROMPTS, prompt, key=prompt.prompt_id)
        self.producer.flush(60)
        return self.prompts

    def _expected(self) -> int:
        return self.prompts * CANDIDATES

    def _dlq(self, prefix: str) -> int:
        return sum(len(v) for t in (PROMPTS.dlq, ROLLOUTS.dlq) for v in self.observer.topics[t].matching(prefix).values())

    # -- faults ----------------------------------------------------------------------------------
    def kill_consumer(self, name: str) -> Row:
        """kill -9 `name` (policy or reward) once a quarter of the outputs exist; restart; wait for all."""
        prefix = f"chaos-{self.run}-{name}-"
        seen = self.observer.topics[ROLLOUTS.name if name == "policy" else SCORED_ROLLOUTS.name]
        produced = self.send_prompts(prefix)
        wait_for(lambda: len(seen.matching(prefix)) >= self._expected() // 4, self.completion_timeout_s)
        self.kill(name)
        serving = self.start(name)
        wait_for(lambda: len(seen.matching(prefix)) >= self._expected(), self.completion_timeout_s)
        time.sleep(2.0)  # late duplicates
        return summarise(f"{name} kill -9", seen, prefix, self._expected(), produced, produced, self._dlq(prefix),
                         first_after(seen, prefix, serving))

    def kill_preference(self) -> Row:
        """Submit rankings from 4 client threads (retrying UNAVAILABLE); kill -9 the service a quarter in."""
        prefix = f"chaos-{self.run}-pref-"
        target = self.cluster.services["preference"].target
        acked: dict[str, float] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def submit(worker: int) -> None:
            # The restarted service listens on a new port: follow it, as a client behind a Service would.
            current = [target, grpc.insecure_channel(target)]

            def stub() -> preference_pb2_grpc.PreferenceServiceStub:
                service = self.cluster.services.get("preference")
                if service is not None and service.target != current[0]:
                    current[1].close()
                    current[:] = [service.target, grpc.insecure_channel(service.target)]
                return preference_pb2_grpc.PreferenceServiceStub(current[1])

            try:
                for i in range(worker, self.events, 4):
                    event = common_pb2.Ranking(
                        event_id=f"{prefix}{i:05d}", rater_id=f"rater-{i % 7}", prompt_id=f"{prefix}p{i // 3}",
                        prompt_text="chaos", ranks=[1, 2],
                        responses=[common_pb2.ResponseRef(response_id=f"{prefix}r{i}-{k}", text=f"response {k}")
                                   for k in range(2)])
                    while not stop.is_set():
                        try:
                            stub().SubmitRanking(event, timeout=10)
                            with lock:
                                acked[event.event_id] = time.monotonic()
                            break
                        except grpc.RpcError as exc:
                            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                                raise
                            time.sleep(0.1)
            finally:
                current[1].close()

        threads = [threading.Thread(target=submit, args=(w,), daemon=True) for w in range(4)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acked) >= self.events // 4, self.completion_timeout_s)
        self.kill("preference")
        serving = self.start("preference")
        deadline = time.monotonic() + self.completion_timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stop.set()
        seen = self.observer.topics[PREFERENCES.name]
        wait_for(lambda: len(seen.matching(prefix)) >= len(acked), 30)
        time.sleep(2.0)
        resumed = [at - serving for at in acked.values() if at >= serving]
        row = summarise("preference kill -9", seen, prefix, self.events, self.events, len(acked), 0,
                        min(resumed) if resumed else None)
        return row

    def restart_broker(self) -> Row:
        """Stop the broker under load for `broker_down_s`, start it on the same port; no service restarts."""
        prefix = f"chaos-{self.run}-broker-"
        seen = self.observer.topics[SCORED_ROLLOUTS.name]
        rollouts = self.observer.topics[ROLLOUTS.name]
        produced = self.send_prompts(prefix)
        wait_for(lambda: len(seen.matching(prefix)) >= self._expected() // 4, self.completion_timeout_s)
        self.cluster.stop_kafka()
        time.sleep(self.broker_down_s)  # the outage itself
        self.cluster.start_kafka(port=self.port)
        up = time.monotonic()
        wait_for(lambda: len(seen.matching(prefix)) >= self._expected(), self.completion_timeout_s)
        time.sleep(2.0)
        row = summarise("broker restart", seen, prefix, self._expected(), produced, produced, self._dlq(prefix),
                        first_after(seen, prefix, up))
        policy_resume = first_after(rollouts, prefix, up)
        print(f"broker restart: first rollout {policy_resume}s and first scored rollout {row.resume_s}s after the "
              "broker was back", flush=True)
        return row

    # -- running -------------------------------------------------------------------------------
    def run_faults(self, faults: list[str]) -> list[Row]:
        for name in ("preference", "reward", "policy"):
            self.start(name)
        for fault in faults:
            if fault == "policy":
                row = self.kill_consumer("policy")
            elif fault == "reward":
                row = self.kill_consumer("reward")
            elif fault == "preference":
                row = self.kill_preference()
            elif fault == "broker":
                row = self.restart_broker()
            else:
                raise ValueError(f"unknown fault {fault}")
            self.rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
        return self.rows

    def close(self) -> None:
        self.observer.stop()
        self.producer.close()
        for name in list(self.cluster.services):
            self.cluster.stop_service(name)
        if self.own_broker:
            self.cluster.stop_kafka()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one kill per service (as in the tests)")
    parser.add_argument("--faults", default="policy,reward,preference,broker,policy,reward")
    parser.add_argument("--bootstrap", help="use this broker (no broker-restart fault then)")
    parser.add_argument("--run-dir", type=Path)
    args = parser.parse_args()
    faults = args.faults.split(",")
    if args.bootstrap:
        faults = [f for f in faults if f != "broker"]
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="flywheel-chaos-"))
    sizes = dict(prompts=12, events=200, broker_down_s=10.0) if args.quick else dict(
        prompts=40, events=2000, broker_down_s=20.0)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    chaos = Chaos(run_dir, bootstrap=args.bootstrap, **sizes)
    print(f"chaos run {chaos.run} in {run_dir} (broker {chaos.bootstrap})", flush=True)
    try:
        rows = chaos.run_faults(faults)
    finally:
        chaos.close()
    print()
    print(table(rows))
    bad = [r for r in rows if r.missing or r.differing]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
