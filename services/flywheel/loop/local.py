"""Run the loop's processes on one machine: a KRaft Kafka broker and the services.

Used by `flywheel demo` and by end-to-end tests. Every service is a real `flywheel serve <name>`
process with its own log file; ports are picked free on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[3]
KAFKA_SH = REPO / "deploy" / "kafka" / "kafka.sh"

SERVICE_NAMES = {
    "policy": "flywheel.v1.PolicyService",
    "reward": "flywheel.v1.RewardService",
    "preference": "flywheel.v1.PreferenceService",
    "trainer": "flywheel.v1.TrainerService",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, service: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Block until grpc.health reports SERVING for `service` (raises on timeout or process exit)."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{service} exited with code {process.returncode} during start-up")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{service} at {target} not SERVING after {timeout_s:.0f}s")


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no chance to clean up (crash tests)."""
        self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def signals_deferred():
    """SIGINT/SIGTERM arriving inside are handled on exit, by the handlers that were in place.

    A child started inside is registered before an interrupt can unwind past it: a Ctrl-C landing
    between `Popen` creating the process and the cluster recording it left that service running
    after the demo had stopped everything it knew of.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers run on the main thread only; nothing to defer here
        return
    pending: list[tuple[int, object]] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in pending[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


class LocalCluster:
    """Kafka + service processes under one run directory; stops everything on exit."""

    def __init__(self, run_dir: Path, *, kafka_heap: str = "512m") -> None:
        # Absolute once, here: services run with cwd=run_dir and get paths below it in their environment.
        self.run_dir = Path(run_dir).absolute()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        self.kafka_dir = self.run_dir / "kafka"
        self.kafka_heap = kafka_heap
        self.bootstrap: str | None = None
        self.services: dict[str, ServiceProcess] = {}

    # -- Kafka -------------------------------------------------------------------------------
    def start_kafka(self, bootstrap: str | None = None, *, port: int | None = None) -> str:
        """Start the broker (or adopt an existing one at `bootstrap`); `port` to restart it where it was."""
        if bootstrap:
            self.bootstrap = bootstrap
            return bootstrap
        out = subprocess.run(
            # (no --controller-port: kafka.sh picks one for new data and reuses the stored one after)
            [str(KAFKA_SH), "start", "--data-dir", str(self.kafka_dir), "--port", str(port or free_port()),
             "--heap", self.kafka_heap],
            capture_output=True, text=True, timeout=180,
            start_new_session=True,  # a terminal's Ctrl-C reaches the demo only; it stops the broker last
        )
        if out.returncode != 0:
            raise RuntimeError(f"Kafka did not start: {out.stderr.strip()}")
        self.bootstrap = out.stdout.strip().splitlines()[-1]
        return self.bootstrap

    def stop_kafka(self) -> None:
        if self.kafka_dir.exists():
            subprocess.run([str(KAFKA_SH), "stop", "--data-dir", str(self.kafka_dir)], timeout=60, check=False)

    # -- services ----------------------------------------------------------------------------
    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
        env.update(
            FLYWHEEL_HOST="127.0.0.1",
            FLYWHEEL_HOME=str(self.run_dir / "home"),
            FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS=self.bootstrap or "",
            FLYWHEEL_SHUTDOWN_DELAY_S="0",
            FLYWHEEL_SHUTDOWN_GRACE_S="5",
            # A local loop on loopback: no API keys for reward/policy/trainer (the preference service
            # keeps its rater tokens); the reward HTTP API on a free port.
            FLYWHEEL_AUTH_ENABLED="false",
            FLYWHEEL_REWARD_HTTP_PORT="0",
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def start_service(self, name: str, env: dict[str, str] | None = None, *, wait: bool = True,
                      timeout_s: float = 300.0) -> ServiceProcess:
        if self.bootstrap is None:
            raise RuntimeError("start Kafka first")
        grpc_port, metrics_port = free_port(), free_port()
        full_env = self.base_env()
        full_env.update(FLYWHEEL_SERVICE_NAME=name, FLYWHEEL_GRPC_PORT=str(grpc_port),
                        FLYWHEEL_METRICS_PORT=str(metrics_port))
        if name == "preference":  # the rater web UI
            full_env["FLYWHEEL_PREFERENCE_UI_PORT"] = str(free_port())
        full_env.update(env or {})
        log_path = self.run_dir / "logs" / f"{name}.log"
        with signals_deferred(), open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "flywheel.cli", "serve", name],
                env=full_env, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.run_dir,
                start_new_session=True,  # Ctrl-C in the terminal reaches the demo, which stops services in order
            )
            service = ServiceProcess(name, process, grpc_port, metrics_port, log_path, full_env)
            self.services[name] = service
        if wait:
            try:
                wait_serving(service.target, SERVICE_NAMES[name], timeout_s, process)
            except Exception as exc:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} failed to start: {exc}\n--- {log_path} (tail) ---\n{tail}") from exc
        return service

    def stop_service(self, name: str) -> None:
        service = self.services.pop(name, None)
        if service is not None:
            service.stop()

    def stop(self) -> None:
        """Services first (all at once: each only needs the broker to shut down cleanly), then Kafka."""
        services = [self.services.pop(name) for name in list(reversed(self.services))]
        for service in services:
            if service.alive():
                service.process.send_signal(signal.SIGTERM)
        for service in services:
            service.stop()
        self.stop_kafka()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
