"""The reward service's HTTP/JSON APIs on real loopback servers: Open Inference Protocol REST,
OpenRLHF's /get_reward driven by OpenRLHF's own request code, slime's remote RM contract,
/v1/score, and bad input on every route (including a bounded fuzz of the JSON routes)."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import aiohttp
import pytest
from grpc import aio
from hypothesis import HealthCheck, given, settings, strategies as st

from flywheel.kserve.v2 import open_inference_grpc_pb2 as kserve_pb2
from flywheel.kserve.v2 import open_inference_grpc_pb2_grpc as kserve_pb2_grpc
from flywheel.reward.app import build_app
from flywheel.reward.scorers import EnsembleScorer, VaderScorer
from flywheel.reward.settings import RewardSettings
from flywheel.v1 import reward_pb2, reward_pb2_grpc

PAIRS = [("How was your day?", "It was wonderful, thank you so much!"),
         ("Weather?", "Terrible storms all week, I hate it."),
         ("Film?", "A boring film.")]
OPENRLHF_VERSION = "0.11.2"
CACHE = Path.home() / ".cache" / "flywheel" / "third-party"


async def start(settings_factory, serve, scorer=None, **overrides):
    base = dict(reward_worker_enabled=False, reward_reload_enabled=False, reward_http_port=0, reward_max_wait_ms=1.0)
    base.update(overrides)
    app = build_app(settings_factory(RewardSettings, **base), scorer=scorer or VaderScorer())
    target = await serve(app.runtime)
    return app, target, f"http://127.0.0.1:{app.http.port}"


def vader(responses: list[str]) -> list[float]:
    return VaderScorer().score([""] * len(responses), responses)


async def test_open_inference_protocol_rest_matches_grpc_model_infer(settings_factory, serve) -> None:
    app, target, url = await start(settings_factory, serve)
    async with aiohttp.ClientSession() as http:
        assert (await (await http.get(f"{url}/v2/health/live")).json()) == {"live": True}
        assert (await http.get(f"{url}/v2/health/ready")).status == 200
        meta = await (await http.get(f"{url}/v2/models/reward")).json()
        assert [t["name"] for t in meta["inputs"]] == ["prompt", "response"]
        assert meta["outputs"] == [{"name": "score", "datatype": "FP32", "shape": [-1]}]
        assert (await (await http.get(f"{url}/v2/models/reward/ready")).json())["ready"] is True
        body = {"id": "r1", "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [3, 1], "data": [[p] for p, _ in PAIRS]},
            {"name": "response", "datatype": "BYTES", "shape": [3], "data": [r for _, r in PAIRS]}],
            "outputs": [{"name": "score"}]}
        reply = await http.post(f"{url}/v2/models/reward/infer", json=body)
        assert reply.status == 200, await reply.text()
        out = await reply.json()
        missing = await http.post(f"{url}/v2/models/nope/infer", json=body)
        assert missing.status == 404 and "nope" in (await missing.json())["error"]
    assert out["id"] == "r1" and out["outputs"][0]["shape"] == [3]
    async with aio.insecure_channel(target) as channel:
        grpc_reply = await kserve_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(kserve_pb2.ModelInferRequest(
            model_name="reward", inputs=[kserve_pb2.ModelInferRequest.InferInputTensor(
                name="response", datatype="BYTES", shape=[3],
                contents=kserve_pb2.InferTensorContents(bytes_contents=[r.encode() for _, r in PAIRS]))]))
    assert out["outputs"][0]["data"] == pytest.approx(list(grpc_reply.outputs[0].contents.fp32_contents))
    assert out["outputs"][0]["data"] == pytest.approx(vader([r for _, r in PAIRS]), abs=1e-6)


def openrlhf_agent_module():
    """OpenRLHF's own remote-RM client (`SingleTurnAgentExecutor._fetch_rewards_via_http` in
    openrlhf/utils/agent.py), from the released wheel (pip download, cached), imported alone: the
    rest of the package needs GPUs (deepspeed, vllm, ray)."""
    wheel_dir = CACHE / f"openrlhf-{OPENRLHF_VERSION}"
    wheels = list(wheel_dir.glob("openrlhf-*.whl"))
    if not wheels:
        pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else (
            [shutil.which("pip3") or shutil.which("pip")] if (shutil.which("pip3") or shutil.which("pip")) else None)
        if pip is None:
            pytest.skip("OpenRLHF's client code is not importable: no pip to download the openrlhf wheel")
        out = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", f"openrlhf=={OPENRLHF_VERSION}",
                              "-d", str(wheel_dir)], capture_output=True, text=True, timeout=300)
        wheels = list(wheel_dir.glob("openrlhf-*.whl"))
        if out.returncode != 0 or not wheels:
            pytest.skip(f"OpenRLHF's client code is not importable: pip download failed: {out.stderr[-500:]}")
    source_dir = wheel_dir / "src"
    agent = source_dir / "agent.py"
    if not agent.exists():
        with zipfile.ZipFile(wheels[0]) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith("openrlhf/utils/agent.py"))
            source_dir.mkdir(parents=True, exist_ok=True)
            agent.write_bytes(wheel.read(name))
    # Its only package import is a logger factory; give it the standard one.
    logging_utils = types.ModuleType("openrlhf.utils.logging_utils")
    logging_utils.init_logger = logging.getLogger  # type: ignore[attr-defined]
    for name in ("openrlhf", "openrlhf.utils"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["openrlhf.utils.logging_utils"] = logging_utils
    spec = importlib.util.spec_from_file_location("openrlhf_agent_under_test", agent)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_openrlhf_remote_reward_model_client_scores_against_flywheel(settings_factory, serve) -> None:
    agent = openrlhf_agent_module()
    ensemble = EnsembleScorer([(VaderScorer(), 1.0), (VaderScorer(), 0.5)])
    _, _, url = await start(settings_factory, serve, scorer=ensemble)
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=f"{url}/get_reward")
    prompts = [p for p, _ in PAIRS]
    queries = [p + r for p, r in PAIRS]  # OpenRLHF sends the decoded prompt + response
    replies = []
    for query, prompt in zip(queries, prompts):  # as its rollout loop does: one query per call
        [reply] = await executor._fetch_rewards_via_http([query], [prompt], ["label"])
        replies.append(reply)
    expected = [1.5 * v for v in vader([r for _, r in PAIRS])]
    assert [r["rewards"][0] for r in replies] == pytest.approx(expected, abs=1e-6)
    assert [r["scores"][0] for r in replies] == pytest.approx(expected, abs=1e-6)
    assert set(replies[0]["extra_logs"]) == {"vader_scores"}  # per-component values for its logs
    # A batch in one call, without prompts: the whole query is the response.
    [batch] = await executor._fetch_rewards_via_http([r for _, r in PAIRS], [None] * 3, [None] * 3)
    assert batch["rewards"] == pytest.approx(expected, abs=1e-6)


async def test_slime_remote_rm_contract(settings_factory, serve) -> None:
    """slime (not on PyPI) posts {prompt, response, label} and uses the JSON reply as the reward."""
    _, _, url = await start(settings_factory, serve)
    async with aiohttp.ClientSession() as http:
        for prompt, response in PAIRS:
            async with http.post(f"{url}/slime/reward",
                                 json={"prompt": prompt, "response": response, "label": "x"}) as reply:
                reply.raise_for_status()
                assert await reply.json() == pytest.approx(vader([response])[0], abs=1e-6)
        chat = [{"role": "user", "content": "Hello"}]
        async with http.post(f"{url}/slime/reward", json={"prompt": chat, "response": "Great!", "label": None}) as r:
            assert isinstance(await r.json(), float)


async def test_v1_score_matches_grpc_score(settings_factory, serve) -> None:
    _, target, url = await start(settings_factory, serve)
    items = [{"id": f"i{k}", "prompt": p, "response": r} for k, (p, r) in enumerate(PAIRS)]
    async with aiohttp.ClientSession() as http:
        reply = await (await http.post(f"{url}/v1/score", json={"items": items},
                                       headers={"X-Flywheel-Timeout-S": "5"})).json()
    async with aio.insecure_channel(target) as channel:
        expected = await reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(
            items=[reward_pb2.ScoreItem(**i) for i in items]))
    assert [s["id"] for s in reply["scores"]] == ["i0", "i1", "i2"]
    assert [s["score"] for s in reply["scores"]] == pytest.approx([s.score for s in expected.scores])
    assert reply["scorer"] == "vader"


BAD = [
    ("/get_reward", {"query": "not a list"}, "query"),
    ("/get_reward", {"query": ["a", 3]}, "query[1]"),
    ("/get_reward", {"query": ["a"], "prompts": ["a", "b"]}, "prompts"),
    ("/get_reward", {"query": []}, "query"),
    ("/get_reward", {"query": ["x" * 2001]}, "query[0]"),
    ("/get_reward", [1, 2], "body"),
    ("/slime/reward", {"prompt": "p"}, "response"),
    ("/slime/reward", {"prompt": [{"role": "user"}], "response": "r"}, "prompt[0].content"),
    ("/v1/score", {"items": [{"prompt": "p", "response": 7}]}, "body"),
    ("/v1/score", {"items": []}, "items"),
    ("/v1/score", {"items": [{"prompt": "", "response": ""}]}, "items[0].response"),
    ("/v2/models/reward/infer", {"inputs": [{"name": "response", "datatype": "FP32", "shape": [1],
                                             "data": ["x"]}]}, "inputs[0].datatype"),
    ("/v2/models/reward/infer", {"inputs": [{"name": "response", "datatype": "BYTES", "shape": [2],
                                             "data": ["x"]}]}, "inputs[0].contents"),
    ("/v2/models/reward/infer", {"inputs": [{"name": "response", "datatype": "BYTES", "shape": "2",
                                             "data": ["x"]}]}, "inputs[0].shape"),
    ("/v2/models/reward/infer", {"inputs": []}, "inputs"),
]


async def test_bad_input_on_every_route_is_a_4xx_naming_the_field(settings_factory, serve) -> None:
    _, _, url = await start(settings_factory, serve, reward_max_text_chars=2000, reward_http_max_body_bytes=64_000)
    async with aiohttp.ClientSession() as http:
        for route, body, field in BAD:
            async with http.post(url + route, json=body) as reply:
                error = await reply.json()
                assert reply.status == 400, (route, body, error)
                assert error["field"] == field and error["code"] == "INVALID_ARGUMENT", (route, error)
        for route in ("/get_reward", "/slime/reward", "/v1/score", "/v2/models/reward/infer"):
            async with http.post(url + route, data="{not json", headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400 and (await r.json())["field"] == "body"
            async with http.post(url + route, data="query=a", headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415 and (await r.json())["field"] == "Content-Type"
            # Refused from Content-Length alone: the body is never read or parsed.
            async with http.post(url + route, data=b"{" + b" " * 70_000 + b"}",
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 413 and (await r.json())["field"] == "body"
        async with http.get(f"{url}/nowhere") as r:
            assert r.status == 404 and "error" in await r.json()
        async with http.get(f"{url}/get_reward") as r:
            assert r.status == 405 and "error" in await r.json()
        async with http.post(f"{url}/v1/score", json={"items": [{"response": "hi"}]},
                             headers={"X-Flywheel-Timeout-S": "soon"}) as r:
            assert r.status == 400 and (await r.json())["field"] == "X-Flywheel-Timeout-S"


JSON = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = {"/get_reward": ["query", "prompts", "labels"], "/slime/reward": ["prompt", "response", "label"],
          "/v1/score": ["items"], "/v2/models/reward/infer": ["inputs", "outputs", "id"]}


def shaped(route: str):
    """Bodies that look like the route's contract, with any JSON in any field (plus arbitrary JSON)."""
    return JSON | st.fixed_dictionaries({}, optional={f: JSON | st.lists(JSON, max_size=3) for f in FIELDS[route]})


async def test_fuzzed_json_bodies_never_get_a_5xx(settings_factory, serve) -> None:
    _, _, url = await start(settings_factory, serve)
    async with aiohttp.ClientSession() as http:
        for route in FIELDS:
            bodies: list = []

            @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(shaped(route))
            def collect(body) -> None:
                bodies.append(body)

            collect()
            for body in bodies:
                async with http.post(url + route, data=json.dumps(body),
                                     headers={"Content-Type": "application/json"}) as reply:
                    text = await reply.text()
                    assert reply.status < 500, (route, body, text)
                    if reply.status >= 400:
                        assert "error" in json.loads(text), (route, body, text)
