"""The `flywheel` command: run services, the local loop, Kafka, and housekeeping.

Service packages contribute their own sub-commands (`flywheel <service> ...`) through a `cli`
module exposing a typer `app`; heavy imports (torch, transformers) stay inside commands so the
CLI starts fast.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from enum import Enum

import typer

app = typer.Typer(help="Flywheel: continuous RLHF as gRPC microservices over Kafka.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)

SERVICES = ("policy", "reward", "preference", "trainer")


class Service(str, Enum):
    policy = "policy"
    reward = "reward"
    preference = "preference"
    trainer = "trainer"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every connection and offset reset at INFO; keep service logs readable.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))


@app.command()
def serve(service: Service = typer.Argument(..., help="Which service to run.")) -> None:
    """Run one service until SIGTERM (configuration from FLYWHEEL_* environment variables)."""
    from flywheel.runtime.config import UnknownSettingError
    from flywheel.runtime.process import start_service_process

    module = importlib.import_module(f"flywheel.{service.value}.app")
    settings = module.Settings()
    _setup_logging(settings.log_level)
    try:
        start_service_process(settings)
    except UnknownSettingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    asyncio.run(module.serve(settings))


@app.command("config-docs")
def config_docs() -> None:
    """Print the configuration reference (markdown) generated from the settings classes."""
    from flywheel.docs import configuration_markdown

    typer.echo(configuration_markdown(), nl=False)


@app.command("create-topics")
def create_topics(bootstrap_servers: str = typer.Option("127.0.0.1:9092", envvar="FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS"),
                  partitions: int = 3, replication_factor: int = 1) -> None:
    """Create every Flywheel topic and its dead-letter topic (idempotent)."""
    from flywheel.bus import ensure_topics
    from flywheel.runtime.config import ServiceSettings

    # Security (FLYWHEEL_KAFKA_SECURITY_PROTOCOL, _SASL_*, _SSL_*) from the environment, as the services read it.
    security = ServiceSettings().kafka_client_config()
    created = ensure_topics(bootstrap_servers, partitions=partitions, replication_factor=replication_factor,
                            **security)
    typer.echo("created: " + (", ".join(created) if created else "nothing (all topics exist)"))


def _add_service_commands() -> None:
    for name in SERVICES:
        try:
            module = importlib.import_module(f"flywheel.{name}.cli")
        except ModuleNotFoundError as exc:
            if exc.name not in (f"flywheel.{name}", f"flywheel.{name}.cli"):
                raise
            continue
        app.add_typer(module.app, name=name)


_add_service_commands()


def _add_demo() -> None:
    from flywheel.loop.demo import demo

    app.command("demo")(demo)


_add_demo()


if __name__ == "__main__":
    app()
