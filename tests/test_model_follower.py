"""Model versions, checkpoint resolution and the shared hot-reload follower (policy and reward).

The poison-version tests run on the real broker: a version whose checkpoint cannot be loaded, with
an error of a type no loader anticipates (ImportError: the fsspec backend is not installed), is
rejected and counted, and a newer version published after it is still loaded.
"""

from __future__ import annotations

import fsspec
import pytest
import torch
from prometheus_client import REGISTRY

from flywheel import checkpoints
from flywheel.bus import Topic, TypedProducer, ensure_topics
from flywheel.versions import BASE_POLICY_VERSION, next_version, version_name, version_number, version_order
from flywheel.v1 import common_pb2
from waiting import wait_until_async

POISON_URI = "gcs://flywheel-no-such-bucket/checkpoint"  # gcsfs is not installed: ImportError
POISON_REMOTE = ["gcs://flywheel-no-such-bucket"]  # allowed, so the load itself fails


def test_version_names_round_trip() -> None:
    assert version_name("policy", 7) == "policy-0007" and version_number("policy-0007") == 7
    assert next_version("reward-0009") == "reward-0010" and BASE_POLICY_VERSION == "policy-0000"
    assert version_order("a1b2c3") == -1 and version_order("policy-12345") == 12345
    with pytest.raises(ValueError, match="not a versioned name"):
        version_number("main")


def test_remote_checkpoints_are_cached_once_and_pruned(tmp_path) -> None:
    fs = fsspec.filesystem("memory")
    for n in range(3):
        fs.pipe(f"/ckpt/policy-000{n}/config.json", b'{"n": %d}' % n)
    fs.pipe("/data/pairs.jsonl", b"{}\n")
    cache = tmp_path / "cache"
    first = checkpoints.resolve("memory://ckpt/policy-0000", cache, keep=2)
    assert first == cache / checkpoints.cache_key("memory://ckpt/policy-0000")
    assert (first / "config.json").read_bytes() == b'{"n": 0}'
    fs.pipe("/ckpt/policy-0000/config.json", b"changed")
    assert checkpoints.resolve("memory://ckpt/policy-0000", cache, keep=2) == first  # cached, not re-copied
    assert (first / "config.json").read_bytes() == b'{"n": 0}'
    checkpoints.resolve("memory://ckpt/policy-0001", cache, keep=2)
    checkpoints.resolve("memory://ckpt/policy-0002", cache, keep=2)
    assert not first.exists()  # least recently used entry evicted
    single = checkpoints.resolve("memory://data/pairs.jsonl", cache, keep=2)
    assert single.name == "pairs.jsonl" and single.read_text() == "{}\n"
    local = tmp_path / "local"
    local.mkdir()
    assert checkpoints.resolve(local.as_uri(), cache) == local == checkpoints.resolve(str(local), cache)
    with pytest.raises(FileNotFoundError):
        checkpoints.resolve("memory://ckpt/policy-0404", cache)
    with pytest.raises(FileNotFoundError):
        checkpoints.resolve(tmp_path / "missing", cache)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no staging directory left behind


def _count(metric: str, outcome: str) -> float:
    return REGISTRY.get_sample_value(metric, {"outcome": outcome}) or 0.0


def _versions_topic(kafka_bootstrap: str, unique: str) -> Topic:
    topic = Topic(f"test.model-versions.{unique}", common_pb2.ModelVersion)
    ensure_topics(kafka_bootstrap, [topic], partitions=1)
    return topic


def _publish(kafka_bootstrap: str, topic: Topic, *versions: common_pb2.ModelVersion) -> None:
    producer = TypedProducer(kafka_bootstrap, client_id="test-follower")
    try:
        for mv in versions:
            producer.send_and_wait(topic, mv, key="v")
    finally:
        producer.close()


async def test_poison_reward_version_does_not_wedge_reload(kafka_bootstrap, unique, settings_factory, serve,
                                                           tmp_path) -> None:
    from flywheel.reward.app import build_app
    from flywheel.reward.settings import RewardSettings
    from flywheel.reward.testing import tiny_reward_checkpoint

    good = {v: tiny_reward_checkpoint(tmp_path / v, version=v, seed=s) for v, s in (("reward-0001", 1),
                                                                                   ("reward-0003", 3))}
    topic = _versions_topic(kafka_bootstrap, unique)
    settings = settings_factory(RewardSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                reward_model_uri=str(good["reward-0001"]), reward_worker_enabled=False,
                                reward_instance_id=unique, kafka_poll_timeout_ms=200,
                                checkpoint_remote=POISON_REMOTE)
    app = build_app(settings, versions_topic=topic)
    await serve(app.runtime)
    rejected = _count("flywheel_reward_reloads_total", "rejected")
    _publish(kafka_bootstrap, topic, common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_REWARD, version="reward-0002", checkpoint_uri=POISON_URI))
    await wait_until_async(lambda: "reward-0002" in app.reload.rejected, 60, what="reward-0002 rejected")
    _publish(kafka_bootstrap, topic, common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_REWARD, version="reward-0003", checkpoint_uri=good["reward-0003"].as_uri()))
    # `loaded` is appended after the swap: once it holds the version, the new model is serving
    await wait_until_async(lambda: app.reload.loaded == ["reward-0003"], 60, what="reward-0003 loaded")
    assert app.batcher.scorer.version == "reward-0003"
    assert "ImportError" in app.reload.rejected["reward-0002"]
    assert _count("flywheel_reward_reloads_total", "rejected") == rejected + 1


@pytest.mark.slow
async def test_poison_policy_version_does_not_wedge_reload(kafka_bootstrap, unique, settings_factory, serve,
                                                           tmp_path) -> None:
    from flywheel.models import smollm2_checkpoint
    from flywheel.policy.app import build_components
    from flywheel.policy.backends import LocalBackend
    from flywheel.policy.engine import PolicyEngine
    from flywheel.policy.settings import PolicySettings

    good = tmp_path / "policy-0003"
    good.mkdir()
    for f in smollm2_checkpoint().iterdir():  # a real, loadable copy of the base checkpoint
        (good / f.name).symlink_to(f)
    topic = _versions_topic(kafka_bootstrap, unique)
    settings = settings_factory(PolicySettings, kafka_bootstrap_servers=kafka_bootstrap, policy_http_enabled=False,
                                policy_worker_enabled=False, policy_model_versions_topic=topic.name,
                                kafka_consumer_group=f"policy-{unique}", kafka_poll_timeout_ms=200,
                                checkpoint_remote=POISON_REMOTE)
    threads = torch.get_num_threads()
    parts = build_components(settings, LocalBackend(PolicyEngine.from_checkpoint(), max_batch_size=4))
    try:
        await serve(parts.runtime)
        rejected = _count("flywheel_policy_reloads_total", "rejected")
        _publish(kafka_bootstrap, topic, common_pb2.ModelVersion(
            kind=common_pb2.MODEL_KIND_POLICY, version="policy-0002", checkpoint_uri=POISON_URI))
        await wait_until_async(lambda: "policy-0002" in parts.reloader.rejected, 60, what="policy-0002 rejected")
        _publish(kafka_bootstrap, topic, common_pb2.ModelVersion(
            kind=common_pb2.MODEL_KIND_POLICY, version="policy-0003", checkpoint_uri=good.as_uri()))
        await wait_until_async(lambda: parts.reloader.loaded == ["policy-0003"], 120, what="policy-0003 loaded")
        assert parts.backend.version == "policy-0003"
        assert "ImportError" in parts.reloader.rejected["policy-0002"]
        assert _count("flywheel_policy_reloads_total", "rejected") == rejected + 1
    finally:
        torch.set_num_threads(threads)


def test_checkpoints_outside_the_allowed_locations_are_rejected_unread(tmp_path) -> None:
    """The URI of a version on the topic is checked before anything is read: refused versions are
    rejected and counted, never loaded, and (not counting as considered) hide no other version."""
    from prometheus_client import CollectorRegistry, Counter

    from flywheel.bus.codec import Delivery
    from flywheel.model_follower import ModelVersionFollower
    from flywheel.runtime.uris import UriPolicy

    root, outside = tmp_path / "checkpoints", tmp_path / "elsewhere" / "reward-0009"
    (root / "reward-0002").mkdir(parents=True)
    outside.mkdir(parents=True)
    reloads = Counter("test_reloads", "reloads", ["outcome"], registry=CollectorRegistry())
    read: list[str] = []
    serving = ["reward-0001"]

    def load(mv: common_pb2.ModelVersion) -> str:
        read.append(mv.checkpoint_uri)
        return mv.version

    follower = ModelVersionFollower("reward", load, lambda model: None, serving.append,
                                    current_version=lambda: serving[-1], reloads=reloads,
                                    uri_policy=UriPolicy("checkpoint_uri", [root], ["s3://checkpoints"]))
    forged = {"reward-0009": outside.as_uri(),  # exists, loadable, but not where checkpoints live
              "reward-0008": "http://169.254.169.254/latest/meta-data",
              "reward-0007": f"file://{root}/%2E%2E/elsewhere/reward-0009",  # ".." once decoded
              "reward-0006": "s3://other-bucket/reward-0006",
              "reward-0005": "/" + "x" * 2000}
    batch = [Delivery("versions", 0, n, "REWARD", common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_REWARD, version=version, checkpoint_uri=uri))
        for n, (version, uri) in enumerate([*forged.items(), ("reward-0002", (root / "reward-0002").as_uri())])]
    assert follower(batch) == []
    assert read == [(root / "reward-0002").as_uri()] and serving[-1] == "reward-0002"
    assert set(follower.rejected) == set(forged)
    assert all("checkpoint_uri" in why for why in follower.rejected.values())
    assert reloads.labels("rejected")._value.get() == len(forged)
    follower(batch)  # a replay (restart, rebalance) rejects nothing twice and reads nothing more
    assert reloads.labels("rejected")._value.get() == len(forged) and len(read) == 1
    assert reloads.labels("loaded")._value.get() == 1


async def test_reward_version_outside_the_checkpoint_roots_is_rejected_unread(
        kafka_bootstrap, unique, settings_factory, serve, tmp_path) -> None:
    """On the real broker: a version naming a loadable checkpoint outside `checkpoint_roots` is
    rejected and counted without being loaded; a version published after it still loads."""
    from flywheel.reward.app import build_app
    from flywheel.reward.settings import RewardSettings
    from flywheel.reward.testing import tiny_reward_checkpoint

    roots = tmp_path / "checkpoints"
    serving = tiny_reward_checkpoint(roots / "reward-0001", version="reward-0001", seed=1)
    allowed = tiny_reward_checkpoint(roots / "reward-0002", version="reward-0002", seed=2)
    outside = tiny_reward_checkpoint(tmp_path / "elsewhere" / "reward-0005", version="reward-0005", seed=5)
    topic = _versions_topic(kafka_bootstrap, unique)
    settings = settings_factory(RewardSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                reward_model_uri=str(serving), reward_worker_enabled=False,
                                reward_instance_id=unique, kafka_poll_timeout_ms=200, checkpoint_roots=[roots])
    app = build_app(settings, versions_topic=topic)
    await serve(app.runtime)
    rejected = _count("flywheel_reward_reloads_total", "rejected")
    _publish(kafka_bootstrap, topic, common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_REWARD, version="reward-0005", checkpoint_uri=outside.as_uri()))
    await wait_until_async(lambda: "reward-0005" in app.reload.rejected, 60, what="reward-0005 rejected")
    assert "PermissionDenied: checkpoint_uri" in app.reload.rejected["reward-0005"]
    assert _count("flywheel_reward_reloads_total", "rejected") == rejected + 1
    # numbered below the refused one: a forged version number hides nothing
    _publish(kafka_bootstrap, topic, common_pb2.ModelVersion(
        kind=common_pb2.MODEL_KIND_REWARD, version="reward-0002", checkpoint_uri=allowed.as_uri()))
    await wait_until_async(lambda: app.reload.loaded == ["reward-0002"], 60, what="reward-0002 loaded")
    assert app.batcher.scorer.version == "reward-0002"
