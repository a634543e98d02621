"""Policy service on the real Kafka broker: prompts -> rollouts, and hot reload under load."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

from flywheel.bus import Topic, TypedConsumer, TypedProducer, ensure_topics
from flywheel.models import smollm2_checkpoint
from flywheel.policy.app import build_components
from flywheel.policy.backends import LocalBackend
from flywheel.policy.engine import PolicyEngine
from flywheel.policy.rollouts import rollout_id
from flywheel.policy.settings import PolicySettings
from flywheel.runtime.client import aio_channel
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from waiting import wait_until_async

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_policy_engine.py
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def topics(kafka_bootstrap: str, unique: str) -> dict[str, Topic]:
    t = {
        "prompts": Topic(f"test.prompts.{unique}", common_pb2.Prompt),
        "rollouts": Topic(f"test.rollouts.{unique}", common_pb2.Rollout),
        "versions": Topic(f"test.model-versions.{unique}", common_pb2.ModelVersion),
    }
    ensure_topics(kafka_bootstrap, t.values(), partitions=2)
    return t


@pytest.fixture
def producer(kafka_bootstrap: str):
    p = TypedProducer(kafka_bootstrap, client_id="test-policy")
    yield p
    p.close()


def settings_for(settings_factory, kafka_bootstrap: str, topics: dict[str, Topic], unique: str, **overrides):
    opts = dict(kafka_bootstrap_servers=kafka_bootstrap, policy_http_enabled=False,
                policy_prompts_topic=topics["prompts"].name, policy_rollouts_topic=topics["rollouts"].name,
                policy_model_versions_topic=topics["versions"].name, kafka_consumer_group=f"policy-{unique}",
                kafka_poll_timeout_ms=200)
    opts.update(overrides)
    return settings_factory(PolicySettings, **opts)


def sample(name: str) -> float | None:
    return REGISTRY.get_sample_value(name.split("{")[0], labels=_labels(name))


def _labels(name: str) -> dict[str, str]:
    if "{" not in name:
        return {}
    body = name[name.index("{") + 1:-1]
    return dict(part.split("=") for part in body.replace('"', "").split(","))


async def test_prompts_become_rollouts_on_kafka(kafka_bootstrap, topics, producer, settings_factory, unique,
                                                serve) -> None:
    settings = settings_for(settings_factory, kafka_bootstrap, topics, unique, policy_reload_enabled=False)
    parts = build_components(settings, LocalBackend(PolicyEngine.from_checkpoint(), max_batch_size=16))
    await serve(parts.runtime)
    prompts = [
        common_pb2.Prompt(prompt_id=f"kp-{i}", text=f"Give me a one-word name for a pet, number {i}.",
                          split="train" if i else "eval",
                          sampling=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=100 + i))
        for i in range(3)
    ]
    # a prompt without sampling params takes the service defaults (n = 1 here)
    prompts.append(common_pb2.Prompt(prompt_id="kp-default", text="Hi!"))
    bad = common_pb2.Prompt(prompt_id="kp-bad", text="")  # empty: dead-lettered, never retried
    for p in [*prompts, bad]:
        producer.send(topics["prompts"], p, key=p.prompt_id)
    producer.flush()

    consumer = TypedConsumer(topics["rollouts"], bootstrap_servers=kafka_bootstrap, group_id=f"check-{unique}",
                             dead_letters=producer)
    try:
        got: list = []

        async def seven() -> bool:
            got.extend(await asyncio.to_thread(consumer.poll, 500))
            return len(got) >= 7

        await wait_until_async(seven, 240, interval_s=0, what="7 rollouts")
    finally:
        consumer.close()
    rollouts = [d.value for d in got]
    assert len(rollouts) == 7, [r.prompt_id for r in rollouts]
    assert all(d.key == d.value.prompt_id for d in got)
    by_prompt: dict[str, list] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt_id, []).append(r)
    assert sorted(by_prompt) == ["kp-0", "kp-1", "kp-2", "kp-default"]
    for i in range(3):
        pair = sorted(by_prompt[f"kp-{i}"], key=lambda r: r.candidate_index)
        assert [r.candidate_index for r in pair] == [0, 1]
        for r in pair:
            assert r.rollout_id == rollout_id(f"kp-{i}", "policy-0000", r.candidate_index, 100 + i)
            assert len(r.token_logprobs) == len(r.response_token_ids) > 0
            assert r.split == ("train" if i else "eval")
            assert r.raw_prompt == prompts[i].text and r.prompt_text.endswith("assistant\n")
            assert r.policy_version == "policy-0000"
    assert by_prompt["kp-default"][0].sampling.n == 1
    assert parts.rollout_worker is not None
    await wait_until_async(lambda: parts.rollout_worker.produced >= 7, 30, what="7 acknowledged rollouts")
    assert parts.rollout_worker.produced == 7
    # the bad prompt went to the dead-letter topic of the prompts topic
    dlq = TypedConsumer(Topic(topics["prompts"].dlq, common_pb2.Prompt), bootstrap_servers=kafka_bootstrap,
                        group_id=f"dlq-{unique}", dead_letters=producer)
    try:
        dead = await wait_until_async(lambda: asyncio.to_thread(dlq.poll, 500), 30, interval_s=0,
                                      what="the bad prompt on the dead-letter topic")
    finally:
        dlq.close()
    assert [d.value.prompt_id for d in dead] == ["kp-bad"]
    assert "prompt.text" in dead[0].headers["flywheel-error-message"]


def fake_checkpoint_dir(tmp_path: Path, name: str) -> Path:
    """A real, loadable copy of the base checkpoint (weights symlinked), as the trainer would publish."""
    base = smollm2_checkpoint()
    target = tmp_path / name
    target.mkdir()
    for f in base.iterdir():
        (target / f.name).symlink_to(f)
    (target / "value_head.safetensors").write_bytes(b"ignored by the policy service")
    (target / "flywheel.json").write_text('{"step": 1}')
    return target


def broken_checkpoint_dir(tmp_path: Path) -> Path:
    base = smollm2_checkpoint()
    target = tmp_path / "broken"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, target / name)
    (target / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated weights
    return target


@pytest.mark.slow
async def test_hot_reload_under_concurrent_load_drops_nothing(kafka_bootstrap, topics, producer, settings_factory,
                                                              unique, serve, tmp_path) -> None:
    settings = settings_for(settings_factory, kafka_bootstrap, topics, unique, policy_worker_enabled=False)
    parts = build_components(settings, LocalBackend(PolicyEngine.from_checkpoint(), max_batch_size=16))
    target = await serve(parts.runtime)
    stub = policy_pb2_grpc.PolicyServiceStub(aio_channel(target, retries=False))
    request = policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(prompt_id="load", text="Say something.")],
                                         sampling=common_pb2.SamplingParams(temperature=1.0, max_new_tokens=4, n=1))
    # a reward model version on the same topic is not for us; once the reload consumer has handled
    # it, it is assigned and caught up (no race between the publish below and the group join)
    good = fake_checkpoint_dir(tmp_path, "policy-0001")
    producer.send_and_wait(topics["versions"], common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_REWARD, version="reward-0009", checkpoint_uri=good.as_uri()), key="REWARD")
    assert parts.reload_worker is not None
    await wait_until_async(lambda: parts.reload_worker.handled >= 1, 120, what="the reload consumer's first record")
    assert parts.reload_worker.handled == 1, "the reload consumer never received the topic's records"
    assert parts.backend.version == "policy-0000"
    seen: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            try:
                response = await stub.Generate(request, timeout=120)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)
                return
            assert {r.policy_version for r in response.rollouts} == {response.policy_version}
            seen[i].append(response.policy_version)

    clients = [asyncio.ensure_future(client(i)) for i in range(4)]
    await wait_until_async(lambda: all(seen), 120, what="every client served by the old version")
    producer.send_and_wait(topics["versions"], common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_POLICY, version="policy-0001", checkpoint_uri=good.as_uri(),
        parent_version="policy-0000", step=1), key="POLICY")
    await wait_until_async(lambda: parts.backend.version == "policy-0001", 180, what="policy-0001 serving")
    assert parts.backend.version == "policy-0001"
    counts = [len(s) for s in seen]
    await wait_until_async(lambda: all(len(s) >= c + 2 for s, c in zip(seen, counts)), 180,
                           what="every client served by the new version too")
    rejected_before = sample('flywheel_policy_reloads_total{outcome="rejected"}') or 0.0
    # a broken newer checkpoint is rejected; policy-0001 keeps serving
    producer.send_and_wait(topics["versions"], common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_POLICY, version="policy-0002", checkpoint_uri=broken_checkpoint_dir(tmp_path).as_uri(),
        step=2), key="POLICY")
    await wait_until_async(lambda: "policy-0002" in parts.reloader.rejected, 180, what="policy-0002 rejected")
    stop.set()
    await asyncio.gather(*clients)

    assert not errors, errors
    assert "policy-0002" in parts.reloader.rejected
    assert parts.backend.version == "policy-0001"
    assert sample('flywheel_policy_reloads_total{outcome="rejected"}') == rejected_before + 1
    assert sample('flywheel_policy_version_info{version="policy-0001"}') == 1.0
    assert sample('flywheel_policy_version_info{version="policy-0000"}') is None
    for versions in seen:  # each client saw the old version, then only the new one (atomic swap)
        assert versions[0] == "policy-0000" and versions[-1] == "policy-0001"
        switch = versions.index("policy-0001")
        assert set(versions[switch:]) == {"policy-0001"}
    response = await stub.Generate(request, timeout=120)
    assert response.rollouts[0].policy_version == "policy-0001"
    assert (await stub.GetModelVersion(common_pb2.GetModelVersionRequest())).version == "policy-0001"
