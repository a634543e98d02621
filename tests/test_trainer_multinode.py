"""The chart's multi-node trainer, run for real: the rendered StatefulSet's torchrun command as two
"pods" (two process groups on this machine, one per node rank), through a real PPO step.

The chart renders `trainer.distributed.nodes=2`; this test takes the container's command and the
trainer ConfigMap exactly as rendered and changes only what a cluster provides differently: the
pod's HOSTNAME (its ordinal is the node rank), the rendezvous host (pod 0's DNS name -> 127.0.0.1),
ports, the broker and local paths. Rank 0 then serves the TrainerService and consumes scored
rollouts; a PPO step completes only if both ranks take part (DistributedDataParallel all-reduces
every gradient), and rank 0 publishes the new policy version.
Cost: two tiny-Llama trainer processes (~1 min on 2 cores).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from waiting import wait_until
from test_deploy_helm import by_kind, helm, render  # noqa: F401 - `helm` is a fixture
from test_trainer_loop import produce, read_versions, scored

from flywheel.bus import ensure_topics
from flywheel.bus.topics import MODEL_VERSIONS, SCORED_ROLLOUTS, Topic

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
HEALTH_CHECK = REPO / "docker" / "grpc_health_check.py"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel.trainer.testing import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def test_rendered_two_node_trainer_runs_a_ppo_step(helm, kafka_bootstrap, unique, tiny_model, tmp_path) -> None:
    docs = render(helm, "default", "--set", "trainer.distributed.nodes=2")
    sts = by_kind(docs, "StatefulSet")["rel-flywheel-trainer"]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["/bin/sh", "-ec"]
    script = container["args"][0]
    host = "rel-flywheel-trainer-0.rel-flywheel-trainer-ranks.ml.svc"
    assert by_kind(docs, "Service")["rel-flywheel-trainer-ranks"]["spec"]["clusterIP"] == "None"
    assert f"--master-addr {host} --master-port 29400" in script
    rendezvous = free_port()
    script = script.replace(host, "127.0.0.1").replace("--master-port 29400", f"--master-port {rendezvous}")
    config = by_kind(docs, "ConfigMap")["rel-flywheel-trainer"]["data"]

    scored_topic = Topic(f"scored-{unique}", SCORED_ROLLOUTS.message_type)
    versions_topic = Topic(f"versions-{unique}", MODEL_VERSIONS.message_type)
    ensure_topics(kafka_bootstrap, [scored_topic, versions_topic], partitions=2)
    grpc_port = free_port()
    local = {  # what differs between a pod and this machine
        "FLYWHEEL_HOST": "127.0.0.1", "FLYWHEEL_GRPC_PORT": str(grpc_port), "FLYWHEEL_METRICS_PORT": "0",
        "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "FLYWHEEL_KAFKA_REPLICATION_FACTOR": "1",
        "FLYWHEEL_TRAINER_BASE_MODEL": str(tiny_model), "FLYWHEEL_KAFKA_CONSUMER_GROUP": f"trainer-{unique}",
        "FLYWHEEL_TRAINER_SCORED_ROLLOUTS_TOPIC": scored_topic.name,
        "FLYWHEEL_TRAINER_MODEL_VERSIONS_TOPIC": versions_topic.name,
        "FLYWHEEL_TRAINER_BATCH_SIZE": "4", "FLYWHEEL_TRAINER_MINI_BATCH_SIZE": "2", "FLYWHEEL_TRAINER_PPO_EPOCHS": "1",
        "FLYWHEEL_TORCH_THREADS": "1", "FLYWHEEL_KAFKA_POLL_TIMEOUT_MS": "200",
        "FLYWHEEL_SHUTDOWN_DELAY_S": "0", "FLYWHEEL_LOG_LEVEL": "INFO",
    }
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    base_env.update(OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                    PYTHONPATH=f"{REPO / 'services'}:{os.environ.get('PYTHONPATH', '')}")
    pods: list[tuple[subprocess.Popen, Path]] = []
    try:
        for ordinal in (0, 1):
            home = tmp_path / f"pod-{ordinal}"
            home.mkdir()
            env = {**base_env, **config, **local, "HOSTNAME": f"rel-flywheel-trainer-{ordinal}",
                   "FLYWHEEL_HOME": str(home), "FLYWHEEL_KAFKA_CLIENT_ID": f"rel-flywheel-trainer-{ordinal}",
                   "FLYWHEEL_TRAINER_CHECKPOINT_URI": (home / "ckpt").as_uri()}
            log = home / "pod.log"
            proc = subprocess.Popen(["/bin/sh", "-ec", script], env=env, cwd=home, stdout=log.open("w"),
                                    stderr=subprocess.STDOUT, start_new_session=True)
            pods.append((proc, log))

        def logs() -> str:
            return "\n".join(f"--- pod {i}\n{log.read_text()[-3000:]}" for i, (_, log) in enumerate(pods))

        # pod 0's readiness probe, as rendered (its non-zero pods answer "ready" without a server)
        probe = [part.replace("/opt/flywheel/bin/grpc_health_check.py", str(HEALTH_CHECK))  # where the image has it
                 for part in container["readinessProbe"]["exec"]["command"]]
        def ranks_run() -> None:
            for proc, _ in pods:
                assert proc.poll() is None, f"a rank exited early:\n{logs()}"

        env0 = {**base_env, "HOSTNAME": "rel-flywheel-trainer-0", "FLYWHEEL_GRPC_PORT": str(grpc_port)}
        try:
            wait_until(lambda: subprocess.run(probe, env=env0, capture_output=True, timeout=60).returncode == 0, 420,
                       interval_s=2, what="rank 0's readiness probe", alive=ranks_run)
        except AssertionError as exc:
            raise AssertionError(f"rank 0 never became ready ({exc}):\n{logs()}") from None
        env1 = {**base_env, "HOSTNAME": "rel-flywheel-trainer-1", "FLYWHEEL_GRPC_PORT": str(free_port())}
        assert subprocess.run(probe, env=env1, capture_output=True, timeout=60).returncode == 0

        produce(kafka_bootstrap, scored_topic, [scored(i) for i in range(4)])  # one batch: one PPO step
        versions = read_versions(kafka_bootstrap, versions_topic, unique, expect=1, timeout_s=300,
                                 done=lambda got: any(v.version == "policy-0001" for v in got))
        assert "policy-0001" in [v.version for v in versions], logs()
        # rank 1 took part (DDP cannot step without it) and is still following rank 0's batches
        assert all(proc.poll() is None for proc, _ in pods), logs()
        assert "WORLD_SIZE" not in config  # torchrun, not the ConfigMap, sets the world
    finally:
        for proc, _ in pods:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in pods:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
