"""TrainerService reward-model jobs, SFT on demonstrations, and the CLI against a served trainer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from flywheel.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from waiting import wait_until, wait_until_async

from test_trainer_loop import trainer_settings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel.trainer.testing import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _pairs_file(path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        rows.append({"prompt_id": f"p{i}", "prompt_text": f"How was day {i}?",
                     "chosen_text": "It was wonderful, thank you, I loved it!", "chosen_id": f"c{i}",
                     "rejected_text": "It was awful and I hated every minute.", "rejected_id": f"r{i}", "margin": 1.0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.slow
async def test_reward_model_job_and_cli(kafka_bootstrap, unique, settings_factory, tiny_model, tmp_path, serve):
    from typer.testing import CliRunner

    from flywheel.trainer.app import build_app
    from flywheel.trainer.cli import app as cli_app

    settings = trainer_settings(settings_factory, kafka_bootstrap, unique, tiny_model, tmp_path,
                                trainer_reward_output_dir=str(tmp_path / "reward"), trainer_start_paused=True,
                                trainer_reward_dataset_roots=[tmp_path])
    app = build_app(settings)
    target = await serve(app.runtime)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(epochs=-1))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "epochs" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.TriggerRewardModelTraining(
                trainer_pb2.TriggerRewardModelTrainingRequest(dataset_uri=str(tmp_path / "missing.jsonl")))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dataset_uri" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRewardModelTrainingJob(trainer_pb2.GetRewardModelTrainingJobRequest(job_id="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        # A broken dataset: the job is accepted, then fails with the reason.
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt_text": "x"}) + "\n")
        job = await stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(
            dataset_uri=bad.as_uri()))
        job = await _wait_job(stub, job.job_id)
        assert job.state == "failed" and "chosen_text" in job.message

        # A real (tiny) preference dataset: flywheel.reward.training trains MiniLM and publishes.
        job = await stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(
            dataset_uri=str(_pairs_file(tmp_path / "pairs.jsonl")), epochs=1))
        assert job.state in ("queued", "running") and job.job_id
        job = await _wait_job(stub, job.job_id)
        assert job.state == "succeeded", job.message
        assert job.model_version.kind == common_pb2.MODEL_KIND_REWARD
        assert job.model_version.version == "reward-0001"
        assert Path(job.model_version.checkpoint_uri.removeprefix("file://"), "model.safetensors").exists()
        status = await stub.Status(trainer_pb2.StatusRequest())
        assert status.reward_model_job.job_id == job.job_id and status.reward_model_job.state == "succeeded"

    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, cli_app, ["status", "--target", target])
    assert result.exit_code == 0, result.output
    assert "state paused" in result.output and "version policy-0000" in result.output
    result = await asyncio.to_thread(runner.invoke, cli_app, ["resume", "--target", target])
    assert result.exit_code == 0 and "state paused" not in result.output
    result = await asyncio.to_thread(runner.invoke, cli_app, ["status", "--json", "--target", target])
    assert json.loads(result.output)["policyVersion"]["version"] == "policy-0000"


@pytest.mark.slow
def test_reward_model_training_runs_in_its_own_process_and_leaves_threads_alone(tmp_path, monkeypatch):
    import torch

    from flywheel.trainer.service import RewardJobRunner

    runner = RewardJobRunner(default_dataset_uri=None, output_dir=tmp_path / "reward", default_epochs=1,
                             bootstrap_servers=None, model_versions_topic=None, torch_threads=2,
                             dtype="bfloat16", cache_dir=tmp_path / "cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the demo runs the trainer; the job asks for 2 in its own process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the demo's trainer environment
    try:
        job = runner.submit(_pairs_file(tmp_path / "pairs.jsonl", n=6).as_uri(), 1)
        wait_until(lambda: job.state in ("succeeded", "failed"), 300, what="the reward-model job")
        assert job.state == "succeeded", job.message
        assert torch.get_num_threads() == 1
        # The job itself trained with its own 2 threads, not the trainer's inherited OMP_NUM_THREADS=1.
        assert job.model_version.metrics["train_threads"] == 2
        assert job.model_version.metrics["train_bf16"] == 1.0  # and in the precision it was given
    finally:
        torch.set_num_threads(threads)
        runner.shutdown()
    assert job.model_version.version == "reward-0001"
    assert Path(job.model_version.checkpoint_uri.removeprefix("file://"), "model.safetensors").exists()


async def _wait_job(stub, job_id: str, timeout_s: float = 240) -> trainer_pb2.RewardModelTrainingJob:
    async def finished() -> list[trainer_pb2.RewardModelTrainingJob]:
        job = await stub.GetRewardModelTrainingJob(trainer_pb2.GetRewardModelTrainingJobRequest(job_id=job_id))
        return [job] if job.state in ("succeeded", "failed") else []

    [job] = await wait_until_async(finished, timeout_s, interval_s=0.5, what=f"reward-model job {job_id}")
    return job


@pytest.mark.slow
def test_sft_learns_demonstrations_and_becomes_the_reference(tiny_model, tmp_path):
    import torch

    from flywheel.trainer.checkpoint import CheckpointStore
    from flywheel.trainer.loop import load_trainer
    from flywheel.trainer.ppo import PPOConfig
    from flywheel.trainer.sft import SFTConfig, load_demonstrations_file, run_sft

    data = tmp_path / "demos.jsonl"
    data.write_text("\n".join(json.dumps({"prompt_text": f"Say something nice #{i}",
                                          "response_text": "What a lovely day it is!"}) for i in range(8)))
    demos = load_demonstrations_file(data)
    store = CheckpointStore(tmp_path / "ckpt")
    mv = run_sft(demos, store=store, base_model_path=tiny_model,
                 config=SFTConfig(epochs=6, learning_rate=3e-3, batch_size=4, progress=False))
    assert mv.version == "policy-0001" and mv.parent_version == "policy-0000"
    assert mv.metrics["sft_final_nll"] < mv.metrics["sft_initial_nll"] - 1.0
    meta = json.loads((Path(mv.checkpoint_uri.removeprefix("file://")) / "flywheel.json").read_text())
    assert meta["stage"] == "sft" and len(meta["demonstration_ids"]) == 8

    # PPO after SFT starts from the SFT weights, and the SFT model is the frozen reference.
    loaded = load_trainer(PPOConfig(), store, tiny_model)
    assert loaded.version == "policy-0001"
    assert loaded.reference_uri == mv.checkpoint_uri
    for a, b in zip(loaded.trainer.module.lm.parameters(), loaded.trainer.ref_model.parameters()):
        assert torch.equal(a, b)


async def test_dataset_uri_is_confined_and_jobs_are_bounded(settings_factory, tmp_path, serve):
    """No caller-chosen file read or connection, no INTERNAL, bounded queue (findings 1, 2, 5).

    The servicer and job runner are the real ones on a real server; only the training step is
    replaced by a recorder that blocks (the PPO loop is not needed for these RPCs).
    """
    import sys

    from flywheel.runtime import ServiceRuntime
    from flywheel.runtime.uris import UriPolicy
    from flywheel.trainer.service import RewardJobRunner, TrainerServicer, registrations

    roots = tmp_path / "exports"
    roots.mkdir()
    pairs = _pairs_file(roots / "pairs.jsonl")
    trained: list[object] = []
    release = tmp_path / "release"

    class RecordingJobs(RewardJobRunner):
        """Records what a job would train on and runs a child that waits for the test instead."""

        def command(self, job, result_file):
            trained.append(job.dataset_uri)
            return [sys.executable, "-c", "import os, time\n"
                    f"while not os.path.exists({str(release)!r}): time.sleep(0.05)"]

    jobs = RecordingJobs(default_dataset_uri=None, output_dir=None, default_epochs=1, bootstrap_servers=None,
                         model_versions_topic=None, dataset_policy=UriPolicy("dataset_uri", [roots]), max_queued=2)
    runtime = ServiceRuntime(settings_factory())
    for name, register in registrations(TrainerServicer(None, jobs)):
        runtime.add_service(name, register)
    target = await serve(runtime)
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            cases = [("/etc/passwd", grpc.StatusCode.PERMISSION_DENIED),
                     ("file:///etc/passwd", grpc.StatusCode.PERMISSION_DENIED),
                     ("http://127.0.0.1:9/x", grpc.StatusCode.PERMISSION_DENIED),
                     (f"{roots}/../../outside.jsonl", grpc.StatusCode.PERMISSION_DENIED),
                     ("bogusproto://x", grpc.StatusCode.PERMISSION_DENIED),
                     (f"{roots}/{'a' * 300}.jsonl", grpc.StatusCode.INVALID_ARGUMENT),
                     ("x" * 5000, grpc.StatusCode.INVALID_ARGUMENT),
                     ("\x00\x01garbage", grpc.StatusCode.INVALID_ARGUMENT),
                     (f"{roots}/missing.jsonl", grpc.StatusCode.INVALID_ARGUMENT)]
            for uri, code in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(dataset_uri=uri))
                assert err.value.code() == code, (uri[:60], err.value.details())
                assert "dataset_uri" in err.value.details()
            assert trained == [], "nothing was read on a refused request's behalf"

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetRewardModelTrainingJob(trainer_pb2.GetRewardModelTrainingJobRequest(job_id="j" * 2_000_000))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and len(err.value.details()) < 1100

            for uri in (str(pairs), pairs.as_uri()):
                await stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(dataset_uri=uri))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(dataset_uri=str(pairs)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.touch()
        jobs.shutdown()
