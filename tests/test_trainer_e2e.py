"""End to end on the real broker: prompts in -> policy rollouts -> reward scores -> PPO step ->
new policy version -> the policy service reloads it; lineage checked at every hop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from flywheel.bus import TypedConsumer, TypedProducer
from flywheel.bus.topics import Topic
from flywheel.v1 import common_pb2, policy_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from waiting import wait_until, wait_until_async

from test_trainer_loop import trainer_settings


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flywheel.trainer.testing import tiny_llama_dir

    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _drain(bootstrap: str, topic: Topic, group: str, expect: int, timeout_s: float = 60) -> list:
    consumer = TypedConsumer(topic, bootstrap_servers=bootstrap, group_id=group, dead_letters=TypedProducer(bootstrap))
    out: list = []
    try:
        wait_until(lambda: out.extend(d.value for d in consumer.poll(timeout_ms=300)) or len(out) >= expect,
                   timeout_s, interval_s=0, what=f"{expect} records on {topic.name}")
    finally:
        consumer.close()
    return out


def _prompts(start: int, n: int, split: str = "train") -> list[common_pb2.Prompt]:
    return [common_pb2.Prompt(prompt_id=f"q{i}", text=f"Tell me about topic number {i}.", split=split,
                              sampling=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=6, seed=i, n=2))
            for i in range(start, start + n)]


@pytest.mark.slow
async def test_prompts_to_new_policy_version_reloaded_with_lineage(kafka_bootstrap, unique, settings_factory,
                                                                   tiny_model, tmp_path, serve):
    from flywheel.policy.app import build_components
    from flywheel.policy.settings import PolicySettings
    from flywheel.reward.app import build_app as build_reward
    from flywheel.reward.settings import RewardSettings
    from flywheel.trainer.app import build_app as build_trainer

    prompts_t = Topic(f"prompts-{unique}", common_pb2.Prompt)
    rollouts_t = Topic(f"rollouts-{unique}", common_pb2.Rollout)
    scored_t = Topic(f"scored-{unique}", common_pb2.ScoredRollout)
    versions_t = Topic(f"versions-{unique}", common_pb2.ModelVersion)

    policy = build_components(settings_factory(
        PolicySettings, kafka_bootstrap_servers=kafka_bootstrap, policy_model_dir=tiny_model,
        policy_http_enabled=False, policy_prompts_topic=prompts_t.name, policy_rollouts_topic=rollouts_t.name,
        policy_model_versions_topic=versions_t.name, kafka_consumer_group=f"policy-{unique}",
        kafka_poll_timeout_ms=200))
    reward = build_reward(settings_factory(
        RewardSettings, kafka_bootstrap_servers=kafka_bootstrap, reward_scorer="vader", reward_reload_enabled=False,
        kafka_consumer_group=f"reward-{unique}", kafka_poll_timeout_ms=200),
        rollouts_topic=rollouts_t, scored_topic=scored_t, versions_topic=versions_t)
    trainer = build_trainer(trainer_settings(
        settings_factory, kafka_bootstrap, unique, tiny_model, tmp_path, trainer_scored_rollouts_topic=scored_t.name,
        trainer_model_versions_topic=versions_t.name, trainer_batch_size=8, trainer_mini_batch_size=4))
    policy_target = await serve(policy.runtime)
    await serve(reward.runtime)
    trainer_target = await serve(trainer.runtime)

    # 4 train prompts x 2 candidates = 8 rollouts = one PPO batch; 1 eval prompt is scored, never trained.
    producer = TypedProducer(kafka_bootstrap)
    for p in _prompts(0, 4) + _prompts(100, 1, split="eval"):
        producer.send(prompts_t, p, key=p.prompt_id)
    producer.flush(30)

    async with grpc.aio.insecure_channel(trainer_target) as tch, grpc.aio.insecure_channel(policy_target) as pch:
        tstub = trainer_pb2_grpc.TrainerServiceStub(tch)
        pstub = policy_pb2_grpc.PolicyServiceStub(pch)
        async def stepped():
            status = await tstub.Status(trainer_pb2.StatusRequest())
            return status if status.step >= 1 else None

        status = await wait_until_async(stepped, 180, interval_s=0.5, what="the first PPO step")
        assert status.policy_version.version == "policy-0001", status
        # The policy service hot-reloads the new version from the model-versions topic.

        async def serving_it() -> bool:
            return (await pstub.GetModelVersion(common_pb2.GetModelVersionRequest())).version == "policy-0001"

        await wait_until_async(serving_it, 120, interval_s=0.5, what="the policy service to serve policy-0001")

        # New prompts are now sampled by the new version (its rollouts carry it).
        for p in _prompts(200, 1):
            producer.send(prompts_t, p, key=p.prompt_id)
        producer.flush(30)
        producer.close()
        await asyncio.sleep(0)

    rollouts = await asyncio.to_thread(_drain, kafka_bootstrap, rollouts_t, f"check-r-{unique}", 12)
    scored = await asyncio.to_thread(_drain, kafka_bootstrap, scored_t, f"check-s-{unique}", 12)
    by_prompt: dict[str, set[str]] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt_id, set()).add(r.policy_version)
    assert by_prompt["q200"] == {"policy-0001"}
    assert all(by_prompt[f"q{i}"] == {"policy-0000"} for i in range(4))

    # Lineage: the version's checkpoint names exactly the 8 train rollouts of policy-0000, which are
    # the rollouts the reward service scored (VADER), which came from the 4 train prompts.
    path = Path(status.policy_version.checkpoint_uri.removeprefix("file://"))
    meta = json.loads((path / "flywheel.json").read_text())
    train_ids = {r.rollout_id for r in rollouts if r.split == "train" and r.policy_version == "policy-0000"}
    assert len(train_ids) == 8 and set(meta["rollout_ids"]) == train_ids
    eval_ids = {r.rollout_id for r in rollouts if r.split == "eval"}
    assert eval_ids and not eval_ids & set(meta["rollout_ids"])
    assert meta["behaviour_versions"] == ["policy-0000"] and meta["parent_version"] == "policy-0000"
    scored_ids = {s.rollout.rollout_id for s in scored}
    assert train_ids <= scored_ids
    vader = {s.rollout.rollout_id: s for s in scored}
    assert all(vader[i].scorer for i in train_ids)
    assert meta["scorer_versions"] == sorted({vader[i].scorer_version for i in train_ids if vader[i].scorer_version})
    assert status.metrics["rollouts_trained"] == 8
    assert status.mean_reward == pytest.approx(sum(vader[i].reward for i in train_ids) / 8, abs=1e-5)
