"""`flywheel trainer ...`: control a running trainer, watch it with progress bars, run SFT."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from flywheel.runtime.keys_cli import add_key_commands

app = typer.Typer(help="PPO trainer: status, pause/resume, live progress, reward-model jobs, SFT, API keys.",
                  no_args_is_help=True)

TARGET = typer.Option("127.0.0.1:50054", "--target", envvar="FLYWHEEL_TRAINER_TARGET", help="TrainerService host:port.")


def _stub(target: str):  # noqa: ANN202
    from flywheel.runtime.client import cli_channel
    from flywheel.v1 import trainer_pb2_grpc

    return trainer_pb2_grpc.TrainerServiceStub(cli_channel(target))  # TLS and $FLYWHEEL_API_KEY from the environment


def _state_name(state: int) -> str:
    from flywheel.v1 import trainer_pb2

    return trainer_pb2.TrainerState.Name(state).removeprefix("TRAINER_STATE_").lower()


def _print_status(status) -> None:  # noqa: ANN001
    typer.echo(f"state {_state_name(status.state)}  step {status.step}  version {status.policy_version.version} "
               f"(parent {status.policy_version.parent_version or '-'})")
    typer.echo(f"kl {status.kl:.4f} (coef {status.kl_coef:.4f})  reward {status.mean_reward:.4f}  "
               f"policy loss {status.policy_loss:.4f}  value loss {status.value_loss:.4f}  entropy {status.entropy:.3f}")
    typer.echo(f"rollouts: consumed {status.rollouts_consumed}, trained {int(status.metrics.get('rollouts_trained', 0))}, "
               f"stale {status.rollouts_dropped_stale}, buffered {status.buffered_rollouts}")
    if status.HasField("reward_model_job"):
        job = status.reward_model_job
        typer.echo(f"reward-model job {job.job_id}: {job.state} {job.message}")


@app.command()
def status(target: str = TARGET, json_output: bool = typer.Option(False, "--json")) -> None:
    """Print the trainer's status."""
    from google.protobuf import json_format

    from flywheel.v1 import trainer_pb2

    result = _stub(target).Status(trainer_pb2.StatusRequest(), timeout=10)
    if json_output:
        typer.echo(json_format.MessageToJson(result))
    else:
        _print_status(result)


@app.command()
def pause(target: str = TARGET) -> None:
    """Pause training (rollouts stay in Kafka, uncommitted)."""
    from flywheel.v1 import trainer_pb2

    _print_status(_stub(target).Pause(trainer_pb2.PauseRequest(), timeout=10))


@app.command()
def resume(target: str = TARGET) -> None:
    """Resume training."""
    from flywheel.v1 import trainer_pb2

    _print_status(_stub(target).Resume(trainer_pb2.ResumeRequest(), timeout=10))


@app.command()
def watch(target: str = TARGET, interval: float = typer.Option(1.0, help="Seconds between polls."),
          steps: Optional[int] = typer.Option(None, help="Exit after this many new steps.")) -> None:
    """Live progress bars: rollouts buffered towards the next step, and PPO steps with their stats."""
    from tqdm.auto import tqdm

    from flywheel.v1 import trainer_pb2

    stub = _stub(target)
    first = stub.Status(trainer_pb2.StatusRequest(), timeout=10)
    batch = int(first.metrics.get("batch_size", 0)) or None
    step_bar = tqdm(total=steps, desc="ppo steps", unit="step", position=0)
    buffer_bar = tqdm(total=batch, desc="next batch", unit="rollout", position=1)
    start_step = first.step
    try:
        while True:
            s = stub.Status(trainer_pb2.StatusRequest(), timeout=10)
            step_bar.n = s.step - start_step
            step_bar.set_postfix(version=s.policy_version.version, kl=f"{s.kl:.3f}", reward=f"{s.mean_reward:.3f}",
                                 state=_state_name(s.state), refresh=False)
            step_bar.refresh()
            buffer_bar.n = s.buffered_rollouts
            buffer_bar.set_postfix(consumed=s.rollouts_consumed, stale=s.rollouts_dropped_stale, refresh=False)
            buffer_bar.refresh()
            if steps is not None and s.step - start_step >= steps:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        buffer_bar.close()
        step_bar.close()


@app.command("train-reward-model")
def train_reward_model(target: str = TARGET,
                       dataset_uri: str = typer.Option("", help="Preference export (JSONL/Parquet); empty = latest."),
                       epochs: int = typer.Option(0, help="0 = the trainer's default."),
                       wait: bool = typer.Option(True, help="Wait for the job to finish.")) -> None:
    """Start a reward-model training job on the trainer and (by default) wait for it."""
    from flywheel.v1 import trainer_pb2

    stub = _stub(target)
    job = stub.TriggerRewardModelTraining(
        trainer_pb2.TriggerRewardModelTrainingRequest(dataset_uri=dataset_uri, epochs=epochs), timeout=30)
    typer.echo(f"job {job.job_id}: {job.state}")
    while wait and job.state in ("queued", "running"):
        time.sleep(2.0)
        job = stub.GetRewardModelTrainingJob(trainer_pb2.GetRewardModelTrainingJobRequest(job_id=job.job_id),
                                             timeout=10)
    if wait:
        typer.echo(f"job {job.job_id}: {job.state} {job.message} {job.model_version.version}")
        if job.state != "succeeded":
            raise typer.Exit(1)


@app.command()
def sft(data: Optional[Path] = typer.Option(None, help="JSONL of {prompt_text, response_text}."),
        from_topic: bool = typer.Option(False, help="Read Demonstration events from the preferences topic."),
        epochs: int = 1, learning_rate: float = 2e-5, batch_size: int = 8,
        publish: bool = typer.Option(True, help="Publish the new version to the model-versions topic.")) -> None:
    """Supervised fine-tuning on demonstrations (progress bar); writes the next policy version."""
    import logging

    from flywheel.bus import producer_for, topics
    from flywheel.bus.topics import Topic
    from flywheel.trainer.app import base_model_path
    from flywheel.trainer.checkpoint import CheckpointStore
    from flywheel.trainer.settings import TrainerSettings
    from flywheel.trainer.sft import SFTConfig, load_demonstrations_file, load_demonstrations_from_topic, run_sft

    settings = TrainerSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (data is None) == (not from_topic):
        raise typer.BadParameter("give exactly one of --data or --from-topic")
    demos = load_demonstrations_file(data) if data else load_demonstrations_from_topic(
        settings.kafka_bootstrap_servers, **settings.kafka_client_config())
    typer.echo(f"{len(demos)} demonstrations")
    store = CheckpointStore(settings.checkpoint_root())
    mv = run_sft(demos, store=store, base_model_path=base_model_path(settings),
                 config=SFTConfig(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size))
    typer.echo(f"{mv.version} <- {mv.parent_version}: NLL {mv.metrics['sft_initial_nll']:.3f} -> "
               f"{mv.metrics['sft_final_nll']:.3f} ({mv.checkpoint_uri})")
    if publish:
        producer = producer_for(settings)
        try:
            topic = Topic(settings.trainer_model_versions_topic, topics.MODEL_VERSIONS.message_type)
            producer.send_and_wait(topic, mv, key="POLICY")
        finally:
            producer.close()


def _settings():  # noqa: ANN202
    from flywheel.trainer.settings import TrainerSettings

    return TrainerSettings()


add_key_commands(app, "admin", _settings)

