"""The TGI-compatible HTTP API, served by a second Flywheel policy *process*, driven by the real
`text-generation` client; and the TGI backend of another policy service pointed at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import FinishReason

from flywheel.policy.app import build_components
from flywheel.policy.settings import PolicySettings
from flywheel.runtime.client import aio_channel
from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from conftest import REPO, free_port
from waiting import wait_until

REMOTE_VERSION = "policy-0007"


@pytest.fixture(scope="module")
def tgi_url(tmp_path_factory):
    port = free_port()
    env = dict(os.environ, FLYWHEEL_HOST="127.0.0.1", FLYWHEEL_GRPC_PORT="0", FLYWHEEL_METRICS_PORT="0",
               FLYWHEEL_POLICY_HTTP_PORT=str(port), FLYWHEEL_POLICY_WORKER_ENABLED="false",
               FLYWHEEL_POLICY_RELOAD_ENABLED="false", FLYWHEEL_TORCH_THREADS="1",
               FLYWHEEL_POLICY_MODEL_VERSION=REMOTE_VERSION, FLYWHEEL_SHUTDOWN_DELAY_S="0",
               FLYWHEEL_HOME=str(tmp_path_factory.mktemp("tgi-home")))
    log = tmp_path_factory.mktemp("tgi-log") / "policy.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.policy.app"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:  # refused connections count as "not yet"
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return resp.status == 200

        def running() -> None:
            if proc.poll() is not None:
                raise RuntimeError(f"policy process exited:\n{log.read_text()[-3000:]}")

        wait_until(healthy, 180, interval_s=0.3, what="the policy process's /health", alive=running)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def template(text: str) -> str:
    return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_text_generation_client_generate_and_stream(tgi_url: str) -> None:
    client = Client(tgi_url, timeout=120)
    prompt = template("Say hello.")
    greedy = client.generate(prompt, max_new_tokens=10, decoder_input_details=True)
    details = greedy.details
    assert details.finish_reason in (FinishReason.Length, FinishReason.EndOfSequenceToken)
    assert details.generated_tokens == len(details.tokens) > 0
    assert all(t.logprob is not None and t.logprob <= 0 for t in details.tokens)
    assert details.prefill and details.prefill[0].id == 1  # <|im_start|>
    assert greedy.generated_text

    events = list(client.generate_stream(prompt, max_new_tokens=10))
    assert len(events) == len(details.tokens)
    assert [e.token.id for e in events] == [t.id for t in details.tokens]  # greedy: identical
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    assert events[-1].generated_text == greedy.generated_text
    assert events[-1].details.generated_tokens == len(events)
    assert "".join(e.token.text for e in events if not e.token.special) == greedy.generated_text

    sampled = [client.generate(prompt, do_sample=True, temperature=0.9, top_p=0.95, max_new_tokens=8, seed=s)
               for s in (1, 1, 2)]
    assert sampled[0].details.seed == 1
    assert [t.id for t in sampled[0].details.tokens] == [t.id for t in sampled[1].details.tokens]
    assert [t.id for t in sampled[0].details.tokens] != [t.id for t in sampled[2].details.tokens]
    stopped = client.generate(prompt, max_new_tokens=10, stop_sequences=[greedy.generated_text.split()[1]])
    assert stopped.details.finish_reason == FinishReason.StopSequence


def test_info_health_metrics_and_errors(tgi_url: str) -> None:
    with urllib.request.urlopen(tgi_url + "/info") as resp:
        info = json.loads(resp.read())
    assert info["model_sha"] == REMOTE_VERSION and info["max_best_of"] == 1
    status, body = post(tgi_url + "/generate", {"inputs": "hi", "parameters": {"temperature": -1}})
    assert status == 422 and body["error_type"] == "validation" and "temperature" in body["error"]
    status, body = post(tgi_url + "/generate", {"inputs": "", "parameters": {}})
    assert status == 422 and body["error_type"] == "validation"
    status, body = post(tgi_url + "/generate", {"inputs": "hi", "parameters": {"best_of": 2, "do_sample": True}})
    assert status == 422
    status, body = post(tgi_url + "/generate", {"inputs": template("hi"), "parameters": {"max_new_tokens": 3}})
    assert status == 200 and isinstance(body["generated_text"], str) and "details" not in body
    with pytest.raises(ValidationError):  # the client maps our 422 body back to its ValidationError
        Client(tgi_url).generate("hi", max_new_tokens=10**6)
    # the explicit SSE route (the client uses POST / with stream=true)
    req = urllib.request.Request(tgi_url + "/generate_stream", data=json.dumps(
        {"inputs": template("hi"), "parameters": {"max_new_tokens": 4}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")]
    assert 1 <= len(events) <= 4
    assert events[-1]["details"]["generated_tokens"] == len(events)
    assert all(e["generated_text"] is None for e in events[:-1])
    with urllib.request.urlopen(tgi_url + "/metrics") as resp:
        text = resp.read().decode()
    assert "flywheel_policy_generated_tokens_total" in text and f'version="{REMOTE_VERSION}"' in text


async def test_tgi_backend_serves_the_policy_api(tgi_url: str, settings_factory, serve) -> None:
    settings = settings_factory(PolicySettings, policy_backend="tgi", policy_tgi_url=tgi_url,
                                policy_http_enabled=False, policy_worker_enabled=False, policy_reload_enabled=False)
    parts = build_components(settings)
    stub = policy_pb2_grpc.PolicyServiceStub(aio_channel(await serve(parts.runtime), retries=False))
    prompt = common_pb2.Prompt(prompt_id="tgi-1", text="Say hello.", split="train")
    response = await stub.Generate(policy_pb2.GenerateRequest(
        prompts=[prompt], sampling=common_pb2.SamplingParams(temperature=0.9, max_new_tokens=8, n=2, seed=5)),
        timeout=180)
    assert response.policy_version == REMOTE_VERSION
    assert len(response.rollouts) == 2
    assert response.rollouts[0].response_token_ids != response.rollouts[1].response_token_ids
    for r in response.rollouts:
        assert r.policy_version == REMOTE_VERSION and r.split == "train" and r.raw_prompt == "Say hello."
        assert r.prompt_text == template("Say hello.")
        assert len(r.token_logprobs) == len(r.response_token_ids) > 0
        assert r.prompt_token_ids[0] == 1
    # the remote's greedy output, through the TGI backend and directly, is the same
    greedy = await stub.Generate(policy_pb2.GenerateRequest(
        prompts=[prompt], sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=8, n=1)), timeout=180)
    direct = Client(tgi_url, timeout=120).generate(template("Say hello."), max_new_tokens=8)
    assert list(greedy.rollouts[0].response_token_ids) == [t.id for t in direct.details.tokens]
    assert list(greedy.rollouts[0].token_logprobs) == pytest.approx([t.logprob for t in direct.details.tokens],
                                                                     abs=1e-5)
    chunks = [c async for c in stub.GenerateStream(policy_pb2.GenerateStreamRequest(
        prompt=prompt, sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=8, n=1)), timeout=180)]
    assert [c.token.id for c in chunks[:-1]] == list(greedy.rollouts[0].response_token_ids)
    assert chunks[-1].rollout.response_text == greedy.rollouts[0].response_text
    assert (await stub.GetModelVersion(common_pb2.GetModelVersionRequest())).version == REMOTE_VERSION
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(text="x", sampling=common_pb2.SamplingParams(
            temperature=-1, n=1))]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
