"""A redelivered unseeded prompt reproduces the same rollouts (ids and texts), on the real broker."""

from __future__ import annotations

import asyncio

import torch

from flywheel.bus import Topic, TypedConsumer, TypedProducer, ensure_topics
from flywheel.policy.app import build_components
from flywheel.policy.backends import LocalBackend
from flywheel.policy.engine import PolicyEngine
from flywheel.policy.settings import PolicySettings
from flywheel.v1 import common_pb2
from waiting import wait_until_async

async def test_redelivered_unseeded_prompt_reproduces_its_rollouts(kafka_bootstrap, unique, settings_factory,
                                                                    serve) -> None:
    prompts = Topic(f"test.prompts.{unique}", common_pb2.Prompt)
    rollouts = Topic(f"test.rollouts.{unique}", common_pb2.Rollout)
    ensure_topics(kafka_bootstrap, [prompts, rollouts], partitions=1)
    settings = settings_factory(PolicySettings, kafka_bootstrap_servers=kafka_bootstrap, policy_http_enabled=False,
                                policy_reload_enabled=False, policy_prompts_topic=prompts.name,
                                policy_rollouts_topic=rollouts.name, kafka_consumer_group=f"policy-{unique}",
                                kafka_poll_timeout_ms=200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    producer = TypedProducer(kafka_bootstrap, client_id="test-redelivery")
    consumer = TypedConsumer(rollouts, bootstrap_servers=kafka_bootstrap, group_id=f"check-{unique}",
                             dead_letters=producer)
    try:
        parts = build_components(settings, LocalBackend(PolicyEngine.from_checkpoint(), max_batch_size=4))
        await serve(parts.runtime)
        # no seed: sampling at temperature 1 would differ between deliveries with a random seed
        prompt = common_pb2.Prompt(prompt_id="redelivered", text="Name three colours.",
                                   sampling=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=12, n=2))
        got: list = []

        async def poll_until(n: int) -> bool:
            got.extend(await asyncio.to_thread(consumer.poll, 500))
            return len(got) >= n

        producer.send_and_wait(prompts, prompt, key=prompt.prompt_id)
        await wait_until_async(lambda: poll_until(2), 120, what="the first delivery's rollouts")
        producer.send_and_wait(prompts, prompt, key=prompt.prompt_id)  # the same record, delivered again
        await wait_until_async(lambda: poll_until(4), 120, what="the redelivery's rollouts")
    finally:
        consumer.close()
        producer.close()
        torch.set_num_threads(threads)
    first, again = [sorted((d.value for d in got[i:i + 2]), key=lambda r: r.candidate_index) for i in (0, 2)]
    assert [r.rollout_id for r in first] == [r.rollout_id for r in again]
    assert [r.response_text for r in first] == [r.response_text for r in again]
    assert [list(r.response_token_ids) for r in first] == [list(r.response_token_ids) for r in again]
    assert first[0].response_token_ids != first[1].response_token_ids  # candidates still differ
    assert not first[0].sampling.HasField("seed")  # the derived seed is not the request's
