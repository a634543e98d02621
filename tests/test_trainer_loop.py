"""The Kafka-driven trainer loop and gRPC TrainerService on the real broker (tiny random Llama)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from flywheel.bus import TypedConsumer, TypedProducer, ensure_topics
from flywheel.bus.topics import MODEL_VERSIONS, SCORED_ROLLOUTS, Topic
from flywheel.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from waiting import wait_until, wait_until_async


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel.trainer.testing import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def scored(i: int, version: str = "policy-0000", split: str = "train", reward: float | None = None,
           rollout_id: str | None = None) -> common_pb2.ScoredRollout:
    prompt = [1, 9690, 198] + [100 + (i * 7 + k) % 900 for k in range(4 + i % 3)]
    response = [200 + (i * 13 + k) % 800 for k in range(5 + i % 4)] + [2]
    rollout = common_pb2.Rollout(
        rollout_id=rollout_id or f"r-{i:04d}", prompt_id=f"p-{i // 2}", prompt_token_ids=prompt,
        response_token_ids=response, token_logprobs=[-10.8] * len(response), policy_version=version,
        finish_reason=common_pb2.FINISH_REASON_EOS_TOKEN, split=split,
        sampling=common_pb2.SamplingParams(temperature=1.0))
    return common_pb2.ScoredRollout(rollout=rollout, reward=float(i % 3) - 1.0 if reward is None else reward,
                                    scorer="test", scorer_version="reward-0000")


def produce(bootstrap: str, topic: Topic, messages: list[common_pb2.ScoredRollout]) -> None:
    producer = TypedProducer(bootstrap)
    try:
        for m in messages:
            producer.send(topic, m, key=m.rollout.prompt_id)
        producer.flush(30)
    finally:
        producer.close()


def read_versions(bootstrap: str, topic: Topic, unique: str, expect: int, timeout_s: float = 120,
                  done=None) -> list[common_pb2.ModelVersion]:
    consumer = TypedConsumer(topic, bootstrap_servers=bootstrap, group_id=f"reader-{unique}-{time.time()}",
                             dead_letters=TypedProducer(bootstrap))
    out: list[common_pb2.ModelVersion] = []

    def enough() -> bool:
        out.extend(d.value for d in consumer.poll(timeout_ms=500))
        return done(out) if done else len(out) >= expect

    try:
        wait_until(enough, timeout_s, interval_s=0, what=f"model versions on {topic.name}")
    finally:
        consumer.close()
    return out


def run_until(loop, condition, what: str, timeout_s: float = 60) -> None:
    """Drive the trainer loop (poll, train, checkpoint, commit) on this thread until `condition()` holds."""
    def step() -> bool:
        loop.run_once()
        return condition()

    wait_until(step, timeout_s, interval_s=0, what=what)


def trainer_settings(settings_factory, bootstrap: str, unique: str, model: Path, tmp_path: Path, **extra):
    from flywheel.trainer.settings import TrainerSettings

    base = dict(
        kafka_bootstrap_servers=bootstrap, trainer_base_model=str(model),
        trainer_checkpoint_uri=(tmp_path / "ckpt").as_uri(), kafka_consumer_group=f"trainer-{unique}",
        trainer_scored_rollouts_topic=f"scored-{unique}", trainer_model_versions_topic=f"versions-{unique}",
        trainer_batch_size=4, trainer_mini_batch_size=2, trainer_ppo_epochs=2, kafka_topic_partitions=2,
        trainer_learning_rate=1e-4, kafka_poll_timeout_ms=200,
    )
    base.update(extra)
    return settings_factory(TrainerSettings, **base)


async def test_loop_trains_publishes_and_serves_status(kafka_bootstrap, unique, settings_factory, tiny_model,
                                                       tmp_path, serve):
    import asyncio

    from transformers import AutoModelForCausalLM

    from flywheel.trainer.app import build_app
    from flywheel.trainer.checkpoint import METADATA_FILE

    settings = trainer_settings(settings_factory, kafka_bootstrap, unique, tiny_model, tmp_path,
                                trainer_start_paused=True)
    scored_topic = Topic(settings.trainer_scored_rollouts_topic, SCORED_ROLLOUTS.message_type)
    versions_topic = Topic(settings.trainer_model_versions_topic, MODEL_VERSIONS.message_type)
    ensure_topics(kafka_bootstrap, [scored_topic, versions_topic], partitions=2)
    batch = [scored(i) for i in range(8)]
    extras = [scored(100, split="eval"), scored(101, split="eval"),  # eval: never trained
              scored(0),  # a redelivered duplicate of r-0000 (same version, same id)
              scored(102, version="policy-0000", rollout_id="bad")]
    extras[-1].rollout.token_logprobs.pop()  # invalid: logprobs/tokens length mismatch
    produce(kafka_bootstrap, scored_topic, batch + extras)

    app = build_app(settings)
    paused_iterations = []
    loop_step = app.loop.step

    def counted_step() -> None:  # the loop thread's iterations that found the loop paused
        if app.loop.paused:
            paused_iterations.append(1)
        loop_step()

    app.loop.step = counted_step
    target = await serve(app.runtime)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        status = await stub.Status(trainer_pb2.StatusRequest())
        assert status.state == trainer_pb2.TRAINER_STATE_PAUSED
        assert status.policy_version.version == "policy-0000"
        # the loop thread has run (and passed over) paused iterations with every rollout waiting: nothing trained
        await wait_until_async(lambda: len(paused_iterations) >= 3, 30, what="paused loop iterations")
        status = await stub.Status(trainer_pb2.StatusRequest())
        assert status.step == 0 and status.rollouts_consumed == 0

        status = await stub.Resume(trainer_pb2.ResumeRequest())
        assert status.state != trainer_pb2.TRAINER_STATE_PAUSED

        async def two_steps_over_every_rollout():
            status = await stub.Status(trainer_pb2.StatusRequest())
            return status if status.step >= 2 and status.rollouts_consumed >= 12 else None

        status = await wait_until_async(two_steps_over_every_rollout, 120, interval_s=0.5,
                                        what="two steps over all 12 rollouts")
        assert status.step == 2
        assert status.policy_version.version == "policy-0002"
        assert status.policy_version.parent_version == "policy-0001"
        assert status.rollouts_consumed == 12
        assert status.metrics["rollouts_trained"] == 8
        assert status.metrics["rollouts_skipped_eval"] == 2
        assert status.metrics["rollouts_duplicate"] == 1
        assert status.metrics["rollouts_invalid"] == 1
        assert status.kl_coef == pytest.approx(0.05)
        assert status.metrics["num_sequences"] == 4
        paused = await stub.Pause(trainer_pb2.PauseRequest())
        assert paused.state == trainer_pb2.TRAINER_STATE_PAUSED

    import urllib.request

    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.runtime.metrics_port}/metrics", timeout=10).read().decode())
    for name in ("flywheel_trainer_step 2.0", "flywheel_trainer_policy_version 2.0", "flywheel_trainer_kl ",
                 "flywheel_trainer_policy_loss ", "flywheel_trainer_rollout_version_lag_bucket",
                 'flywheel_trainer_rollouts_total{outcome="eval"}', 'flywheel_trainer_rollouts_total{outcome="trained"}',
                 "flywheel_trainer_checkpoint_seconds_count", "flywheel_trainer_paused 1.0",
                 # the trainer's consumer is a bus consumer: its lag is on /metrics like every group's
                 f'flywheel_bus_consumer_lag{{group="{settings.kafka_consumer_group}",topic="{scored_topic.name}"}}',
                 f'flywheel_bus_consumed_total{{group="{settings.kafka_consumer_group}",topic="{scored_topic.name}"}} 12.0'):
        assert name in body, name

    versions = read_versions(kafka_bootstrap, versions_topic, unique, expect=2)
    assert [v.version for v in versions] == ["policy-0001", "policy-0002"]
    assert [v.parent_version for v in versions] == ["policy-0000", "policy-0001"]
    assert all(v.kind == common_pb2.MODEL_KIND_POLICY for v in versions)
    assert [v.step for v in versions] == [1, 2]
    assert "kl" in versions[1].metrics and "policy_loss" in versions[1].metrics

    # Lineage: each checkpoint lists exactly the rollouts it was trained on; together: all 8 once.
    trained: list[str] = []
    for v in versions:
        path = Path(v.checkpoint_uri.removeprefix("file://"))
        meta = json.loads((path / METADATA_FILE).read_text())
        assert meta["version"] == v.version and meta["parent_version"] == v.parent_version
        assert meta["behaviour_versions"] == ["policy-0000"]
        trained += meta["rollout_ids"]
        model = AutoModelForCausalLM.from_pretrained(path)  # what the policy service does on reload
        assert model.config.vocab_size > 0
    assert sorted(trained) == sorted(m.rollout.rollout_id for m in batch)

    # The policy changed, and the new weights are what the checkpoint holds.
    import torch
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    newest = AutoModelForCausalLM.from_pretrained(Path(versions[-1].checkpoint_uri.removeprefix("file://")))
    diffs = [float((a - b).detach().abs().max()) for a, b in zip(base.parameters(), newest.parameters())]
    assert max(diffs) > 0
    live = app.loop.trainer.module.lm
    for a, b in zip(live.parameters(), newest.parameters()):
        assert torch.equal(a, b)

    # Offsets were committed: a new member of the group sees nothing left.
    consumer = TypedConsumer(scored_topic, bootstrap_servers=kafka_bootstrap, group_id=settings.kafka_consumer_group,
                             dead_letters=TypedProducer(kafka_bootstrap))
    try:
        committed = [consumer.committed(p) or 0 for p in range(2)]
    finally:
        consumer.close()
    assert sum(committed) == 12


def test_crash_between_checkpoint_and_commit_trains_nothing_twice(kafka_bootstrap, unique, settings_factory,
                                                                  tiny_model, tmp_path):
    """The step's checkpoint is durable but the commit never happens: after the restart the batch is
    redelivered, recognised from the checkpoint's state, and skipped (trained once, none lost)."""
    from flywheel.trainer.app import build_app
    from flywheel.trainer.checkpoint import METADATA_FILE

    settings = trainer_settings(settings_factory, kafka_bootstrap, unique, tiny_model, tmp_path)
    scored_topic = Topic(settings.trainer_scored_rollouts_topic, SCORED_ROLLOUTS.message_type)
    ensure_topics(kafka_bootstrap, [scored_topic], partitions=2)
    messages = [scored(i) for i in range(8)]
    produce(kafka_bootstrap, scored_topic, messages)

    first = build_app(settings)

    def crash() -> None:
        raise RuntimeError("process died before committing")

    first.loop.consumer.commit = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        for _ in range(100):
            first.loop.run_once()
    first.loop.consumer.close()
    assert first.store.latest().version == "policy-0001"

    second = build_app(settings)
    assert second.loop.version == "policy-0001"
    # 4 consumed before the crash (restored from the checkpoint) + all 8 again (4 redelivered, 4 new)
    run_until(second.loop, lambda: second.loop.snapshot().counters.consumed >= 12, "12 rollouts consumed")
    snap = second.loop.snapshot()
    second.loop.consumer.close()
    assert snap.version == "policy-0002"
    assert snap.counters.duplicates == 4  # the redelivered first batch, recognised from the checkpoint
    assert snap.counters.trained == 8
    ids = []
    for info in second.store.versions():
        ids += json.loads((Path(info.uri.removeprefix("file://")) / METADATA_FILE).read_text())["rollout_ids"]
    assert sorted(ids) == sorted(m.rollout.rollout_id for m in messages)


def test_stale_rollouts_dropped_and_counted(kafka_bootstrap, unique, settings_factory, tiny_model, tmp_path):
    from flywheel.trainer.app import build_app

    settings = trainer_settings(settings_factory, kafka_bootstrap, unique, tiny_model, tmp_path,
                                trainer_max_version_lag=0, kafka_topic_partitions=1)
    scored_topic = Topic(settings.trainer_scored_rollouts_topic, SCORED_ROLLOUTS.message_type)
    ensure_topics(kafka_bootstrap, [scored_topic], partitions=1)
    # 4 fresh rollouts -> policy-0001; then 3 from policy-0000 (lag 1 > 0: dropped), 4 from policy-0001.
    first = [scored(i) for i in range(4)]
    stale = [scored(10 + i, version="policy-0000") for i in range(3)]
    fresh = [scored(20 + i, version="policy-0001") for i in range(4)]
    produce(kafka_bootstrap, scored_topic, first)
    app = build_app(settings)
    run_until(app.loop, lambda: app.loop.trainer.global_step >= 1, "step 1")
    produce(kafka_bootstrap, scored_topic, stale + fresh)
    run_until(app.loop, lambda: app.loop.trainer.global_step >= 2, "step 2")
    snap = app.loop.snapshot()
    app.loop.consumer.close()
    assert snap.counters.dropped_stale == 3
    assert snap.counters.trained == 8
    assert snap.last_stats["max_version_lag"] == 0


def test_restarted_trainer_reannounces_identically_and_keeps_the_model_name(kafka_bootstrap, unique,
                                                                             settings_factory, tiny_model, tmp_path):
    """After a restart the trainer re-publishes its last version with exactly the content it first
    published, and names later versions after the model it started from, not the checkpoint directory."""
    from flywheel.trainer.app import build_app

    settings = trainer_settings(settings_factory, kafka_bootstrap, unique, tiny_model, tmp_path,
                                kafka_topic_partitions=1)
    scored_topic = Topic(settings.trainer_scored_rollouts_topic, SCORED_ROLLOUTS.message_type)
    versions_topic = Topic(settings.trainer_model_versions_topic, MODEL_VERSIONS.message_type)
    ensure_topics(kafka_bootstrap, [scored_topic, versions_topic], partitions=1)
    produce(kafka_bootstrap, scored_topic, [scored(i) for i in range(4)])
    first = build_app(settings)
    run_until(first.loop, lambda: first.loop.trainer.global_step >= 1, "step 1")
    first.loop.consumer.close()

    second = build_app(settings)  # resumes from policy-0001's directory
    assert second.loop.model_name == tiny_model.name
    second.loop.announce()
    produce(kafka_bootstrap, scored_topic, [scored(10 + i, version="policy-0001") for i in range(4)])
    run_until(second.loop, lambda: second.loop.trainer.global_step >= 2, "step 2")
    second.loop.consumer.close()

    published = read_versions(kafka_bootstrap, versions_topic, unique, expect=3)
    assert [v.version for v in published] == ["policy-0001", "policy-0001", "policy-0002"]
    assert published[0] == published[1]  # the same ModelVersion, byte for byte
    assert {v.model_name for v in published} == {tiny_model.name}
