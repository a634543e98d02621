"""Health tells the truth about the broker: with the broker stopped, preference (which cannot
acknowledge anything) reports NOT_SERVING and answers UNAVAILABLE saying why, while reward (whose
scoring needs no broker) stays SERVING and reports the lost dependency in a metric; both recover on
their own when the broker is back. Uses its own broker (it is stopped mid-test)."""

from __future__ import annotations

import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import KAFKA_SH, free_port
from waiting import wait_until_async

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def kafka_sh(*args: str) -> str:
    out = subprocess.run([str(KAFKA_SH), *args], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


async def health(target: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=5)
        return reply.status


def metric(port: int, line_start: str) -> float | None:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in body.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_preference_not_serving_and_reward_reports_dependency_while_broker_is_down(
        tmp_path: Path, settings_factory, serve) -> None:
    from flywheel.preference.app import build_service
    from flywheel.preference.settings import PreferenceSettings
    from flywheel.reward.app import build_app
    from flywheel.reward.settings import RewardSettings
    from flywheel.v1 import common_pb2, preference_pb2_grpc, reward_pb2, reward_pb2_grpc

    data, port = tmp_path / "kafka", free_port()
    bootstrap = kafka_sh("start", "--data-dir", str(data), "--port", str(port))
    try:
        common = dict(kafka_bootstrap_servers=bootstrap, kafka_poll_timeout_ms=200)
        pref = build_service(settings_factory(PreferenceSettings, preference_auth_enabled=False,
                                              preference_allow_external_responses=True, **common))
        reward = build_app(settings_factory(RewardSettings, reward_scorer="vader", reward_reload_enabled=False, **common))
        pref_target = await serve(pref.runtime)
        reward_target = await serve(reward.runtime)
        SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        await wait_until_async(lambda: health(pref_target), 90, interval_s=0.2)
        await wait_until_async(lambda: _is(health(pref_target, "flywheel.v1.PreferenceService"), SERVING), 90)
        up = 'flywheel_dependency_up{dependency="kafka",service="reward"}'
        await wait_until_async(lambda: metric(reward.runtime.metrics_port, up) == 1.0, 30)

        kafka_sh("stop", "--data-dir", str(data))
        await wait_until_async(lambda: _is(health(pref_target, "flywheel.v1.PreferenceService"), NOT_SERVING), 30)
        assert await health(pref_target) == NOT_SERVING
        async with grpc.aio.insecure_channel(pref_target) as channel:
            ranking = common_pb2.Ranking(event_id="e-1", rater_id="r", prompt_id="p", ranks=[1, 2], responses=[
                common_pb2.ResponseRef(response_id="a", text="a"), common_pb2.ResponseRef(response_id="b", text="b")])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await preference_pb2_grpc.PreferenceServiceStub(channel).SubmitRanking(ranking, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Kafka broker is unreachable" in err.value.details()

        await wait_until_async(lambda: metric(reward.runtime.metrics_port, up) == 0.0, 30)
        assert await health(reward_target) == SERVING  # scoring needs no broker: still ready
        async with grpc.aio.insecure_channel(reward_target) as channel:
            scored = await reward_pb2_grpc.RewardServiceStub(channel).Score(
                reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="hi", response="great, thanks")]),
                timeout=30)
        assert len(scored.scores) == 1

        kafka_sh("start", "--data-dir", str(data), "--port", str(port))  # same data, same port
        await wait_until_async(lambda: _is(health(pref_target, "flywheel.v1.PreferenceService"), SERVING), 60)
        await wait_until_async(lambda: metric(reward.runtime.metrics_port, up) == 1.0, 30)
    finally:
        subprocess.run([str(KAFKA_SH), "stop", "--data-dir", str(data)], timeout=60, check=False)


async def _is(status, expected: int) -> bool:  # noqa: ANN001
    try:
        return await status == expected
    except grpc.aio.AioRpcError:
        return False
