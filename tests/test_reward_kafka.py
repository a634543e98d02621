"""The reward service on the real Kafka broker: scoring worker end to end, hot reload under load."""

from __future__ import annotations

import asyncio

import pytest
from grpc import aio
from kafka import KafkaConsumer

from flywheel.bus import Topic, TypedProducer, codec, ensure_topics
from flywheel.reward.app import build_app
from flywheel.reward.scorers import TransformerRewardScorer
from flywheel.reward.settings import RewardSettings
from flywheel.reward.testing import tiny_reward_checkpoint
from flywheel.reward.training import publish_model_version
from flywheel.reward.worker import HEADER_ROLLOUT_ID
from flywheel.v1 import common_pb2, reward_pb2, reward_pb2_grpc
from conftest import committed_offsets
from waiting import wait_until, wait_until_async

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-ckpts")
    return {v: tiny_reward_checkpoint(root / v, version=v, seed=seed)
            for v, seed in (("reward-0001", 11), ("reward-0002", 22))}


def topics_for(kafka_bootstrap: str, unique: str) -> dict[str, Topic]:
    t = {
        "rollouts": Topic(f"test.rollouts.{unique}", common_pb2.Rollout),
        "scored": Topic(f"test.scored-rollouts.{unique}", common_pb2.ScoredRollout),
        "versions": Topic(f"test.model-versions.{unique}", common_pb2.ModelVersion),
    }
    ensure_topics(kafka_bootstrap, t.values(), partitions=2)
    return t


def read_records(kafka_bootstrap: str, topic_name: str, n: int, timeout_s: float = 60.0, done=None) -> list:
    """Records of `topic_name` until there are `n` of them (or `done(records)` holds)."""
    done = done or (lambda got: len(got) >= n)
    consumer = KafkaConsumer(topic_name, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None)
    try:
        got: list = []

        def enough() -> bool:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
            return done(got)

        wait_until(enough, timeout_s, interval_s=0, what=f"records on {topic_name}")
        return got
    finally:
        consumer.close()


def rollout(i: int) -> common_pb2.Rollout:
    return common_pb2.Rollout(
        rollout_id=f"roll-{i}", prompt_id=f"prompt-{i % 3}", raw_prompt=f"Question {i % 3}: how are you?",
        prompt_text=f"<|im_start|>user\nQuestion {i % 3}: how are you?<|im_end|>",
        response_text=["I am great, thanks!", "Awful, everything is broken.", "Fine."][i % 3] + f" ({i})",
        response_token_ids=[1, 2, 3], token_logprobs=[-0.1, -0.2, -0.3], policy_version="policy-0007",
        candidate_index=i % 2)


async def test_scoring_worker_end_to_end(kafka_bootstrap, unique, settings_factory, serve, checkpoints) -> None:
    t = topics_for(kafka_bootstrap, unique)
    settings = settings_factory(RewardSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                reward_model_uri=str(checkpoints["reward-0001"]), reward_reload_enabled=False,
                                kafka_consumer_group=f"flywheel-reward-{unique}", kafka_poll_timeout_ms=200)
    app = build_app(settings, rollouts_topic=t["rollouts"], scored_topic=t["scored"], versions_topic=t["versions"])
    await serve(app.runtime)
    reference = TransformerRewardScorer(checkpoints["reward-0001"], max_length=settings.reward_max_length)

    producer = TypedProducer(kafka_bootstrap, client_id="test")
    try:
        rollouts = [rollout(i) for i in range(10)]
        for r in rollouts:
            producer.send(t["rollouts"], r, key=r.prompt_id)
        producer.send(t["rollouts"], rollouts[4], key=rollouts[4].prompt_id)  # a redelivered duplicate
        invalid = common_pb2.Rollout(prompt_id="prompt-x", response_text="no id")
        producer.send(t["rollouts"], invalid, key="prompt-x")
        producer.flush(30)
    finally:
        producer.close()

    wanted = {r.rollout_id for r in rollouts}

    def all_scored(records) -> bool:
        return {codec.decode(t["scored"], r.value, r.headers).rollout.rollout_id for r in records} >= wanted

    records = await asyncio.to_thread(read_records, kafka_bootstrap, t["scored"].name, 0, 60.0, all_scored)
    scored = {}
    for record in records:
        msg = codec.decode(t["scored"], record.value, record.headers)
        headers = codec.header_dict(record.headers)
        assert record.key.decode() == msg.rollout.prompt_id
        assert headers[HEADER_ROLLOUT_ID] == msg.rollout.rollout_id
        scored.setdefault(msg.rollout.rollout_id, []).append(msg)
    assert set(scored) == {r.rollout_id for r in rollouts}
    expected = reference.score([r.raw_prompt for r in rollouts], [r.response_text for r in rollouts])
    for r, value in zip(rollouts, expected):
        for msg in scored[r.rollout_id]:  # at-least-once: a duplicate, if any, is identical in content
            assert msg.rollout == r  # full lineage: the rollout travels unchanged
            assert (msg.scorer, msg.scorer_version) == ("transformer", "reward-0001")
            assert msg.reward == pytest.approx(value, abs=1e-5)
            assert [(s.scorer, s.scorer_version) for s in msg.scores] == [("transformer", "reward-0001")]
            assert msg.scores[0].value == msg.reward and msg.HasField("scored_at")
    dead = await asyncio.to_thread(read_records, kafka_bootstrap, t["rollouts"].dlq, 1)
    assert len(dead) == 1
    dlq_headers = codec.header_dict(dead[0].headers)
    assert "rollout_id is empty" in dlq_headers[codec.HEADER_ERROR_MESSAGE]


async def test_hot_reload_under_load_loses_no_request(kafka_bootstrap, unique, settings_factory, serve,
                                                      checkpoints) -> None:
    t = topics_for(kafka_bootstrap, unique)
    settings = settings_factory(RewardSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                reward_model_uri=str(checkpoints["reward-0001"]), reward_worker_enabled=False,
                                reward_instance_id=unique, kafka_poll_timeout_ms=200, reward_max_wait_ms=2.0,
                                checkpoint_roots=[checkpoints["reward-0002"].parent])
    app = build_app(settings, rollouts_topic=t["rollouts"], scored_topic=t["scored"], versions_topic=t["versions"])
    target = await serve(app.runtime)
    new_model = TransformerRewardScorer(checkpoints["reward-0002"], max_length=settings.reward_max_length)
    old_model = TransformerRewardScorer(checkpoints["reward-0001"], max_length=settings.reward_max_length)
    item = reward_pb2.ScoreItem(id="x", prompt="How are you?", response="Very well, thank you.")
    expected = {"reward-0001": old_model.score([item.prompt], [item.response])[0],
                "reward-0002": new_model.score([item.prompt], [item.response])[0]}
    assert expected["reward-0001"] != pytest.approx(expected["reward-0002"], abs=1e-4)

    sent = 0
    replies: list[reward_pb2.ScoreResponse] = []
    stop = asyncio.Event()

    async def client(stub) -> list[str]:
        nonlocal sent
        versions = []
        while not stop.is_set():
            sent += 1
            reply = await stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30)
            replies.append(reply)
            versions.append(reply.scorer_version)
        return versions

    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        clients = [asyncio.ensure_future(client(stub)) for _ in range(8)]
        await wait_until_async(lambda: len(replies) >= 8, 30, what="load on the old model")
        mv = common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_REWARD, version="reward-0002",
                                     checkpoint_uri=checkpoints["reward-0002"].as_uri(), parent_version="reward-0001")
        await asyncio.to_thread(publish_model_version, mv, kafka_bootstrap, t["versions"].name)
        await wait_until_async(lambda: app.batcher.scorer.version == "reward-0002", 60, what="the swap")
        await wait_until_async(lambda: sum(r.scorer_version == "reward-0002" for r in replies) >= 8, 30,
                               what="load on the new model")
        stop.set()
        per_client = await asyncio.gather(*clients)  # any failed request would raise here

        assert app.batcher.scorer.version == "reward-0002"
        assert len(replies) == sent  # every request answered
        for versions in per_client:  # never back to the old model once a client saw the new one
            assert versions == sorted(versions)
        seen = {r.scorer_version for r in replies}
        assert seen == {"reward-0001", "reward-0002"}
        for reply in replies:  # every answer came entirely from the model it names
            assert reply.scores[0].score == pytest.approx(expected[reply.scorer_version], abs=1e-5)
        got = await stub.GetModelVersion(common_pb2.GetModelVersionRequest())
        assert got.version == "reward-0002"

        # Older and broken versions never replace the newest one.
        for stale in (common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_REWARD, version="reward-0001",
                                              checkpoint_uri=checkpoints["reward-0001"].as_uri()),
                      common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_REWARD, version="reward-0009",
                                              checkpoint_uri="file:///nonexistent/reward-0009"),
                      common_pb2.ModelVersion(kind=common_pb2.MODEL_KIND_POLICY, version="policy-0010",
                                              checkpoint_uri=checkpoints["reward-0001"].as_uri())):
            await asyncio.to_thread(publish_model_version, stale, kafka_bootstrap, t["versions"].name)
        # the follower has rejected reward-0009, the newest of them (outside the checkpoint roots)
        await wait_until_async(lambda: "reward-0009" in app.reload.rejected, 30, what="the stale versions handled")
        reply = await stub.Score(reward_pb2.ScoreRequest(items=[item]), timeout=30)
        assert reply.scorer_version == "reward-0002"
    assert app.reload is not None and app.reload.loaded == ["reward-0002"]


async def test_scoring_worker_retries_a_failed_batch_and_commits_after_producing(
        kafka_bootstrap, unique, settings_factory, serve) -> None:
    from flywheel.reward.scorers import VaderScorer

    class FlakyVader(VaderScorer):
        """Fails its first forward pass, like a transient error in a real model."""

        def __init__(self) -> None:
            super().__init__()
            self.failures = 0

        def score(self, prompts, responses):
            if self.failures == 0:
                self.failures += 1
                raise RuntimeError("transient scorer failure")
            return super().score(prompts, responses)

    t = topics_for(kafka_bootstrap, unique)
    overrides = dict(kafka_bootstrap_servers=kafka_bootstrap, reward_reload_enabled=False, kafka_poll_timeout_ms=200,
                     kafka_retry_backoff_s=0.2, kafka_consumer_group=f"flywheel-reward-{unique}")
    flaky = FlakyVader()
    app = build_app(settings_factory(RewardSettings, **overrides), scorer=flaky,
                    rollouts_topic=t["rollouts"], scored_topic=t["scored"], versions_topic=t["versions"])
    await serve(app.runtime)
    producer = TypedProducer(kafka_bootstrap, client_id="test")
    try:
        first = [rollout(i) for i in range(6)]
        for r in first:
            producer.send(t["rollouts"], r, key=r.prompt_id)
        producer.flush(30)
        ids = lambda records: {codec.decode(t["scored"], r.value, r.headers).rollout.rollout_id  # noqa: E731
                               for r in records}
        records = await asyncio.to_thread(read_records, kafka_bootstrap, t["scored"].name, 0, 60.0,
                                          lambda got: ids(got) >= {r.rollout_id for r in first})
        assert ids(records) == {r.rollout_id for r in first} and flaky.failures == 1  # retried, nothing lost
        for record in records:
            msg = codec.decode(t["scored"], record.value, record.headers)
            assert msg.scorer == "vader" and msg.reward == pytest.approx(
                VaderScorer().score([""], [msg.rollout.response_text])[0])
        await app.runtime.stop(grace=0)

        # A new instance in the same group resumes after the committed offsets: only new rollouts.
        second = build_app(settings_factory(RewardSettings, **overrides), scorer=VaderScorer(),
                           rollouts_topic=t["rollouts"], scored_topic=t["scored"], versions_topic=t["versions"])
        await serve(second.runtime)
        later = [rollout(i) for i in range(100, 103)]
        for r in later:
            producer.send(t["rollouts"], r, key=r.prompt_id)
        producer.flush(30)
        wanted = {r.rollout_id for r in first + later}
        # every input offset committed: the output of any redone work is on the topic by now
        await wait_until_async(lambda: committed_offsets(kafka_bootstrap, overrides["kafka_consumer_group"])
                               >= len(first) + len(later), 60, interval_s=0.2, what="all offsets committed")
        records = await asyncio.to_thread(read_records, kafka_bootstrap, t["scored"].name, 0, 60.0,
                                          lambda got: ids(got) >= wanted)
        counts: dict[str, int] = {}
        for record in records:
            rid = codec.decode(t["scored"], record.value, record.headers).rollout.rollout_id
            counts[rid] = counts.get(rid, 0) + 1
        assert set(counts) == wanted
        assert all(n == 1 for n in counts.values()), counts  # committed work was not redone
    finally:
        producer.close()
