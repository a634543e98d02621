"""`flywheel reward ...`: train a reward model, score text against a running service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flywheel.runtime.keys_cli import add_key_commands

app = typer.Typer(help="Reward service: train reward models, score text, API keys.", no_args_is_help=True)


@app.command()
def train(
    data: Optional[Path] = typer.Option(None, help="Preference export: JSONL/Parquet file or directory of them."),
    from_topic: bool = typer.Option(False, help="Read pairs from flywheel.aggregated-preferences.v1 instead."),
    sentiment_demo: bool = typer.Option(False, help="Train on the built-in VADER-labelled chatterbot pairs."),
    output_dir: Optional[Path] = typer.Option(None, help="Checkpoint root (default: <home>/checkpoints/reward)."),
    base_model: Optional[str] = typer.Option(None, help="Start from this checkpoint (default: MiniLM backbone)."),
    version: Optional[str] = typer.Option(None, help="Version name (default: next reward-NNNN)."),
    epochs: int = typer.Option(1, min=1),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimiser steps."),
    batch_size: int = typer.Option(16, min=1),
    learning_rate: float = typer.Option(5e-5),
    max_length: int = typer.Option(128, min=8),
    eval_fraction: float = typer.Option(0.2, min=0.0, max=0.9),
    center_rewards: float = typer.Option(0.0, help="Reward-centering coefficient (0: off)."),
    no_margin: bool = typer.Option(False, help="Ignore the pairs' margins."),
    seed: int = typer.Option(0),
    publish: bool = typer.Option(False, help="Publish the ModelVersion to flywheel.model-versions.v1."),
    model_versions_topic: Optional[str] = typer.Option(None, help="Publish here instead of the default topic."),
    bootstrap_servers: str = typer.Option("127.0.0.1:9092", envvar="FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS"),
    torch_threads: int = typer.Option(0, min=0, envvar="FLYWHEEL_TORCH_THREADS",
                                      help="torch intra-op threads of this process (0: torch's default)."),
    result_file: Optional[Path] = typer.Option(None, help="Also write the JSON result (or {\"error\": ...}) here."),
    dtype: str = typer.Option("float32", help="Forward passes in float32, bfloat16 (autocast; weights stay fp32) "
                                              "or auto (bfloat16 where the hardware computes it natively)."),
) -> None:
    """Train a pairwise reward model; prints the ModelVersion and metrics as JSON.

    Runs as its own process (the trainer launches it as a job), so its threads and seeds are set
    here, once, and never change another process's.
    """
    from google.protobuf.json_format import MessageToDict

    from flywheel.reward.training import RewardTrainingConfig, load_pairs_from_topic, train_reward_model
    from flywheel.runtime.config import ServiceSettings
    from flywheel.runtime.process import configure_process

    sources = sum([data is not None, from_topic, sentiment_demo])
    if sources != 1:
        raise typer.BadParameter("give exactly one of --data, --from-topic, --sentiment-demo")
    configure_process(torch_threads=torch_threads, seed=seed)
    settings = ServiceSettings()  # the launching trainer's FLYWHEEL_HOME and FLYWHEEL_KAFKA_*
    config = RewardTrainingConfig(
        data=data, base_model=base_model, version=version, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, learning_rate=learning_rate, max_length=max_length, eval_fraction=eval_fraction,
        center_rewards_coefficient=center_rewards, use_margin=not no_margin, seed=seed, publish=publish, dtype=dtype,
        bootstrap_servers=bootstrap_servers, model_versions_topic=model_versions_topic,
        kafka_config=settings.kafka_client_config(),
        # under FLYWHEEL_HOME, where the reward service loads announced versions from by default
        output_dir=output_dir or settings.home / "checkpoints" / "reward")
    try:
        if from_topic:
            config.pairs = load_pairs_from_topic(bootstrap_servers, **config.kafka_config)
        if sentiment_demo:
            from flywheel.reward.datasets import sentiment_pairs

            config.pairs, config.eval_pairs = sentiment_pairs(seed=seed)
        result = train_reward_model(config)
    except Exception as exc:
        if result_file is not None:  # the launching trainer reports this as the job's failure
            result_file.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    output = json.dumps({"model_version": MessageToDict(result.model_version),
                         "checkpoint_path": str(result.checkpoint_path), "metrics": result.metrics}, indent=2)
    if result_file is not None:
        result_file.write_text(output)
    typer.echo(output)


@app.command()
def score(
    response: list[str] = typer.Argument(..., help="Response texts to score."),
    prompt: str = typer.Option("", help="The prompt all responses answer."),
    target: str = typer.Option("127.0.0.1:50052", help="host:port of a reward service."),
    timeout_s: float = typer.Option(10.0),
) -> None:
    """Score responses with a running reward service."""
    from flywheel.runtime.client import cli_channel
    from flywheel.v1 import reward_pb2, reward_pb2_grpc

    with cli_channel(target) as channel:  # TLS and $FLYWHEEL_API_KEY from the environment
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        reply = stub.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id=str(i), prompt=prompt, response=r)
                                                          for i, r in enumerate(response)]), timeout=timeout_s)
    typer.echo(f"scorer {reply.scorer} {reply.scorer_version}")
    for item, text in zip(reply.scores, response):
        typer.echo(f"{item.score:+.4f}\t{text}")


def _settings():  # noqa: ANN202
    from flywheel.reward.settings import RewardSettings

    return RewardSettings()


add_key_commands(app, "score", _settings)
