"""API keys: hashed storage, scopes, revocation, token-bucket quotas, per-key metrics - on real
reward servers over gRPC and HTTP, and the admin scope on the trainer's control RPCs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from flywheel.reward.app import build_app
from flywheel.reward.scorers import VaderScorer
from flywheel.reward.settings import RewardSettings
from flywheel.runtime.auth import TokenBucket, TokenStore, hash_token
from flywheel.v1 import reward_pb2, reward_pb2_grpc


def test_keys_are_stored_hashed_scoped_and_revocable(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "keys.sqlite")
    key = store.issue("shop-app", scope=["score", "generate"], requests_per_s=5, label="prod")
    assert key.startswith("fwk_") and store.issue("alice").startswith("fwp_")  # rater tokens keep their prefix
    assert key.encode() not in (tmp_path / "keys.sqlite").read_bytes()
    principal = store.lookup(key)
    assert principal.owner == "shop-app" and principal.allows("score") and principal.allows("generate")
    assert not principal.allows("admin") and principal.requests_per_s == 5
    assert principal.key_id == hash_token(key)[:12]
    with pytest.raises(ValueError, match="unknown scope"):
        store.issue("x", scope="superuser")
    assert store.revoke_key_id(principal.key_id) == 1 and store.lookup(key) is None
    store.close()


def test_databases_from_before_quotas_are_migrated(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript("CREATE TABLE tokens (token_sha256 TEXT PRIMARY KEY, rater_id TEXT NOT NULL, scope TEXT NOT NULL,"
                     " created_at REAL NOT NULL, revoked_at REAL, label TEXT NOT NULL DEFAULT '');")
    db.execute("INSERT INTO tokens VALUES (?, 'bob', 'rater', 0, NULL, '')", (hash_token("fwp_old"),))
    db.commit()
    db.close()
    store = TokenStore(tmp_path / "old.sqlite")
    assert store.lookup("fwp_old").rater_id == "bob" and store.lookup("fwp_old").requests_per_s == 0
    store.close()


def test_token_bucket_refills_at_its_rate_and_admits_big_takes_from_a_full_bucket() -> None:
    bucket = TokenBucket(rate=2.0, capacity=2.0)
    t = bucket.updated
    assert bucket.take(1, t) == 0 and bucket.take(1, t) == 0
    assert bucket.take(1, t) == pytest.approx(0.5)  # one token refills in 1/rate s
    assert bucket.take(1, t + 0.5) == 0
    big = TokenBucket(rate=1.0, capacity=1.0)
    assert big.take(5, big.updated) == 0  # larger than the bucket: admitted when full, then in debt
    assert big.take(1, big.updated + 1.0) == pytest.approx(4.0)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def secured(settings_factory, serve, tmp_path):
    settings = settings_factory(RewardSettings, reward_worker_enabled=False, reward_reload_enabled=False,
                                reward_http_port=0, reward_max_wait_ms=1.0, auth_enabled=True,
                                auth_keys_db=tmp_path / "keys.sqlite", service_name=f"reward-{tmp_path.name[-12:]}")
    app = build_app(settings, scorer=VaderScorer())
    target = await serve(app.runtime)
    store = TokenStore(tmp_path / "keys.sqlite")
    yield app, target, f"http://127.0.0.1:{app.http.port}", store, settings.service_name
    store.close()


def score_request(n: int = 1) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(id=str(i), response="Great!") for i in range(n)])


async def test_grpc_keys_scopes_quotas_and_metrics(secured) -> None:
    app, target, _, store, service = secured
    app_key = store.issue("shop", scope="score")
    rater = store.issue("alice")
    slow = store.issue("slow-app", scope="score", requests_per_s=1)
    small = store.issue("small-app", scope="score", items_per_s=3)

    def auth(key: str):
        return (("authorization", f"Bearer {key}"),)

    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for metadata, code in [(None, grpc.StatusCode.UNAUTHENTICATED), (auth("fwk_nope"), grpc.StatusCode.UNAUTHENTICATED),
                               (auth(rater), grpc.StatusCode.PERMISSION_DENIED)]:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.Score(score_request(), metadata=metadata)
            assert err.value.code() == code
        assert "scope 'score'" in err.value.details()
        reply = await stub.Score(score_request(2), metadata=auth(app_key))
        assert reply.scorer == "vader" and len(reply.scores) == 2
        # Probes stay public.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        await stub.Score(score_request(), metadata=auth(slow))
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(score_request(), metadata=auth(slow))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after" in err.value.details()
        assert 0 < float(dict(err.value.trailing_metadata())["retry-after"]) <= 1.0

        await stub.Score(score_request(3), metadata=auth(small))
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(score_request(1), metadata=auth(small))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "items quota" in err.value.details()

        store.revoke_token(app_key)  # effective on the next call
        with pytest.raises(aio.AioRpcError) as err:
            await stub.Score(score_request(), metadata=auth(app_key))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    assert metric("flywheel_api_key_calls_total", service=service, key="shop") == 1
    assert metric("flywheel_api_key_items_total", service=service, key="shop") == 2
    assert metric("flywheel_api_key_refusals_total", service=service, key="slow-app", reason="rate_limited") == 1
    assert metric("flywheel_api_key_refusals_total", service=service, key="alice", reason="permission_denied") == 1
    assert metric("flywheel_api_key_refusals_total", service=service, key="-", reason="unauthenticated") == 3


async def test_http_keys_and_quotas(secured) -> None:
    _, _, url, store, _ = secured
    key = store.issue("web", scope="score", requests_per_s=1)
    body = {"query": ["What a lovely day!"]}
    async with aiohttp.ClientSession() as http:
        assert (await http.get(f"{url}/v2/health/live")).status == 200  # public
        async with http.post(f"{url}/get_reward", json=body) as r:
            assert r.status == 401 and (await r.json())["code"] == "UNAUTHENTICATED"
        async with http.post(f"{url}/get_reward", json=body, headers={"Authorization": "Basic abc"}) as r:
            assert r.status == 401 and "Bearer" in (await r.json())["error"]
        headers = {"Authorization": f"Bearer {key}"}
        async with http.post(f"{url}/get_reward", json=body, headers=headers) as r:
            assert r.status == 200 and len((await r.json())["rewards"]) == 1
        async with http.post(f"{url}/get_reward", json=body, headers=headers) as r:
            error = await r.json()
            assert r.status == 429 and r.headers["Retry-After"] == "1" and 0 < error["retry_after_s"] <= 1
        # RL frameworks take only a URL: the key may be a path segment.
        framework = store.issue("openrlhf-run", scope="score")
        async with http.post(f"{url}/key/{framework}/get_reward", json=body) as r:
            assert r.status == 200 and len((await r.json())["rewards"]) == 1
        async with http.post(f"{url}/key/fwk_wrong/slime/reward", json={"prompt": "", "response": "hi"}) as r:
            assert r.status == 401
        admin = store.issue("ops", scope="admin")  # admin implies every scope
        async with http.get(f"{url}/v2/models/reward", headers={"Authorization": f"Bearer {admin}"}) as r:
            assert r.status == 200


@pytest.mark.slow
@pytest.mark.kafka
async def test_trainer_control_rpcs_need_the_admin_scope(kafka_bootstrap, unique, settings_factory, tmp_path, serve):
    from flywheel.trainer.app import build_app as build_trainer
    from flywheel.trainer.testing import tiny_llama_dir
    from flywheel.v1 import trainer_pb2, trainer_pb2_grpc

    from test_trainer_loop import trainer_settings

    model = tiny_llama_dir(tmp_path / "tiny-llama")
    settings = trainer_settings(settings_factory, kafka_bootstrap, unique, model, tmp_path, trainer_start_paused=True,
                                auth_enabled=True, auth_keys_db=tmp_path / "keys.sqlite")
    target = await serve(build_trainer(settings).runtime)
    store = TokenStore(tmp_path / "keys.sqlite")
    reader, admin = store.issue("dashboard", scope="score"), store.issue("ops", scope="admin")
    async with aio.insecure_channel(target) as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        await stub.Status(trainer_pb2.StatusRequest(), metadata=(("authorization", f"Bearer {reader}"),))
        for call in (stub.Resume(trainer_pb2.ResumeRequest(), metadata=(("authorization", f"Bearer {reader}"),)),
                     stub.TriggerRewardModelTraining(trainer_pb2.TriggerRewardModelTrainingRequest(),
                                                     metadata=(("authorization", f"Bearer {reader}"),))):
            with pytest.raises(aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin" in err.value.details()
        status = await stub.Pause(trainer_pb2.PauseRequest(), metadata=(("authorization", f"Bearer {admin}"),))
        assert status.state
    store.close()


async def test_policy_grpc_and_tgi_http_need_the_generate_scope(settings_factory, serve, tmp_path) -> None:
    """The policy forwards to a TGI server that is down: a call that passed auth fails UNAVAILABLE
    (503), one that did not is refused before it reaches the backend."""
    from flywheel.policy.app import build_components
    from flywheel.policy.settings import PolicySettings
    from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc

    settings = settings_factory(PolicySettings, policy_backend="tgi", policy_tgi_url="http://127.0.0.1:9",
                                policy_tgi_version="policy-x", policy_http_port=0, policy_worker_enabled=False,
                                policy_reload_enabled=False, auth_enabled=True, auth_keys_db=tmp_path / "keys.sqlite")
    parts = build_components(settings)
    target = await serve(parts.runtime)
    store = TokenStore(tmp_path / "keys.sqlite")
    generate, score = store.issue("chat-app", scope="generate"), store.issue("scorer-app", scope="score")
    request = policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(prompt_id="p", text="Hi")])
    async with aio.insecure_channel(target) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for key, code in [(None, grpc.StatusCode.UNAUTHENTICATED), (score, grpc.StatusCode.PERMISSION_DENIED),
                          (generate, grpc.StatusCode.UNAVAILABLE)]:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),) if key else None,
                                    timeout=30)
            assert err.value.code() == code, err.value.details()
    url = f"http://127.0.0.1:{parts.http.port}"
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/health") as r:
            assert r.status == 503  # public probe, honest answer: the TGI server is down
        async with http.post(f"{url}/generate", json=body) as r:
            assert r.status == 401
        async with http.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {score}"}) as r:
            assert r.status == 403
        async with http.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {generate}"}) as r:
            assert r.status not in (401, 403, 429)
    store.close()
