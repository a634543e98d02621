"""flywheel.client against real servers: keys, retries that honour retry-after, deadlines, TLS,
and the example app (examples/feedback-app) scoring text and recording thumbs as comparisons."""

from __future__ import annotations

import importlib.util
import time
import uuid

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc import aio

from conftest import REPO
from test_preference_service import self_signed, start_service

from flywheel.client import AsyncPreferenceClient, AsyncRewardClient, ClientOptions, RewardClient
from flywheel.preference.settings import PreferenceSettings
from flywheel.reward.app import build_app
from flywheel.reward.scorers import VaderScorer
from flywheel.reward.settings import RewardSettings
from flywheel.reward.testing import GatedScorer
from flywheel.runtime.auth import TokenStore


async def start_reward(settings_factory, serve, tmp_path, scorer=None, **overrides):
    settings = settings_factory(RewardSettings, reward_worker_enabled=False, reward_reload_enabled=False,
                                reward_http_port=0, reward_max_wait_ms=1.0, auth_enabled=True,
                                auth_keys_db=tmp_path / "keys.sqlite", **overrides)
    app = build_app(settings, scorer=scorer or VaderScorer())
    target = await serve(app.runtime)
    return app, target, TokenStore(tmp_path / "keys.sqlite")


async def test_async_client_scores_compares_and_retries_after_the_quota_refills(settings_factory, serve,
                                                                                 tmp_path) -> None:
    _, target, keys = await start_reward(settings_factory, serve, tmp_path)
    key = keys.issue("app", scope="score", requests_per_s=2)
    async with AsyncRewardClient(target, api_key=key, retries=3) as reward:
        scores = await reward.score("How was your day?", ["Wonderful, thanks!", "Awful."])
        assert scores[0].score > 0 > scores[1].score and scores[0].components == {"vader": scores[0].score}
        start = time.monotonic()
        for _ in range(3):  # over 2 requests/s: the third waits for the retry-after the server sent
            assert (await reward.compare("Hi", "Great!", "Terrible.")).probability_a_preferred > 0.5
        assert time.monotonic() - start >= 0.3
    async with AsyncRewardClient(target, api_key="fwk_wrong") as reward:
        with pytest.raises(aio.AioRpcError) as err:  # not retried: a wrong key stays wrong
            await reward.score("", "hi")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    keys.close()


async def test_sync_client_deadline_and_no_retry_when_retries_are_off(settings_factory, serve, tmp_path) -> None:
    gated = GatedScorer()
    _, target, keys = await start_reward(settings_factory, serve, tmp_path, scorer=gated)
    key = keys.issue("app", scope="score")
    import asyncio

    def blocking() -> None:
        with RewardClient(target, ClientOptions(api_key=key, timeout_s=0.3, retries=0)) as reward:
            with pytest.raises(grpc.RpcError) as err:
                reward.score("", ["held"])
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gated.gate.set()
            assert [s.score for s in reward.score("", ["four"], timeout_s=10)] == [4.0]

    await asyncio.to_thread(blocking)
    keys.close()


async def test_tls_with_custom_roots(settings_factory, serve, tmp_path) -> None:
    try:
        cert, key = self_signed(tmp_path)
    except Exception as exc:  # pragma: no cover - openssl is in the image
        pytest.skip(f"openssl unavailable: {exc}")
    app, _, keys = await start_reward(settings_factory, serve, tmp_path, tls_cert_file=cert, tls_key_file=key)
    api_key = keys.issue("app", scope="score")
    async with AsyncRewardClient(f"localhost:{app.runtime.grpc_port}", api_key=api_key,
                                 root_certificates=cert.read_bytes()) as reward:
        assert len(await reward.score("", ["Lovely."])) == 1
    keys.close()


def load_example_app():
    spec = importlib.util.spec_from_file_location("feedback_app", REPO / "examples" / "feedback-app" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.kafka
async def test_example_app_scores_text_and_records_thumbs_as_comparisons(kafka_bootstrap, settings_factory, serve,
                                                                          tmp_path) -> None:
    _, reward_target, keys = await start_reward(settings_factory, serve, tmp_path)
    api_key = keys.issue("feedback-app", scope="score")
    pref_settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                     preference_allow_external_responses=True,
                                     preference_refresh_interval_s=3600.0, home=tmp_path / "pref-home")
    service, pref_target, tokens = await start_service(pref_settings, raters=("feedback-app",))
    runner = None
    try:
        example = load_example_app()
        reward = AsyncRewardClient(reward_target, api_key=api_key)
        preference = AsyncPreferenceClient(pref_target, api_key=tokens["feedback-app"])
        runner = web.AppRunner(example.make_app(reward, preference))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        prompt = f"Say something nice ({uuid.uuid4().hex[:6]})"
        answers = ["You are doing great!", "Whatever."]
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/score", json={"prompt": prompt, "responses": answers}) as r:
                scores = (await r.json())["scores"]
            assert scores[0]["score"] > scores[1]["score"]
            async with http.post(f"{url}/feedback", json={"prompt": prompt, "responses": answers, "index": 1,
                                                          "thumbs": "down"}) as r:
                assert r.status == 200, await r.text()
                ack = await r.json()
            async with http.post(f"{url}/feedback", json={"prompt": prompt, "responses": answers, "index": 3}) as r:
                assert r.status == 400
        assert ack["event_id"] and not ack["duplicate"]
        from flywheel.v1 import common_pb2

        stored = common_pb2.PreferenceEvent.FromString(service.store.events([ack["event_id"]])[ack["event_id"]].payload)
        # Thumbs-down on B: A is preferred.
        assert stored.comparison.choice == common_pb2.CHOICE_A
        assert stored.comparison.prompt_id == example._prompt_id(prompt)
        assert stored.comparison.response_b.text == "Whatever."
        await reward.close()
        await preference.close()
    finally:
        if runner is not None:
            await runner.cleanup()
        await service.runtime.stop(grace=0)
        keys.close()
