"""Policy benchmark: generated tokens/s with N concurrent gRPC clients vs HF `generate` one request at a time.

    python bench/policy_bench.py [--clients 16] [--requests-per-client 2] [--max-new-tokens 32]

Both sides use the same model (SmolLM2-135M-Instruct, float32, CPU), the same prompts (chat
template applied) and the same sampling (temperature 0.8, top-p 0.95) and both return per-token
logprobs (the baseline via `output_scores` + `compute_transition_scores`). EOS ends a response
on both sides; tokens/s counts the tokens actually generated. The service side goes through the
real gRPC server (loopback) and the batcher.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

TOPICS = ["the ocean", "a small robot", "autumn leaves", "coffee", "a lighthouse", "mathematics", "the moon",
          "a busy city", "mountains", "a library", "friendship", "the wind", "a garden", "trains", "music", "snow"]


def prompts(n: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def run_baseline(engine, texts: list[str], max_new_tokens: int, temperature: float, top_p: float):
    import torch

    policy = engine.current
    model, tok = policy.model, policy.tokenizer
    tokens, latencies = 0, []
    start = time.perf_counter()
    for i, text in enumerate(texts):
        ids = torch.tensor([policy.encode(policy.template(text))])
        t0 = time.perf_counter()
        with torch.inference_mode():
            torch.manual_seed(i)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                                 top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        latencies.append(time.perf_counter() - t0)
        tokens += out.sequences.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start, latencies


async def run_service(engine, clients: int, per_client: int, max_new_tokens: int, temperature: float,
                      top_p: float, max_batch_size: int):
    from flywheel.policy.app import build_components
    from flywheel.policy.backends import LocalBackend
    from flywheel.policy.settings import PolicySettings
    from flywheel.runtime.client import aio_channel
    from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc

    settings = PolicySettings(host="127.0.0.1", grpc_port=0, metrics_port=0, metrics_enabled=False,
                              policy_http_enabled=False, policy_worker_enabled=False, policy_reload_enabled=False,
                              shutdown_delay_s=0, policy_max_batch_size=max_batch_size)
    parts = build_components(settings, LocalBackend(engine, max_batch_size=max_batch_size))
    await parts.runtime.start()
    stub = policy_pb2_grpc.PolicyServiceStub(aio_channel(f"127.0.0.1:{parts.runtime.grpc_port}", retries=False))
    texts = prompts(clients * per_client)
    latencies: list[float] = []

    async def client(c: int) -> int:
        tokens = 0
        for r in range(per_client):
            i = c * per_client + r
            request = policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(prompt_id=f"b{i}", text=texts[i])],
                                                 sampling=common_pb2.SamplingParams(
                                                     temperature=temperature, top_p=top_p,
                                                     max_new_tokens=max_new_tokens, n=1, seed=i))
            t0 = time.perf_counter()
            response = await stub.Generate(request, timeout=600)
            latencies.append(time.perf_counter() - t0)
            tokens += sum(len(ro.response_token_ids) for ro in response.rollouts)
        return tokens

    try:
        await stub.Generate(policy_pb2.GenerateRequest(prompts=[common_pb2.Prompt(text="warm up")],
                                                       sampling=common_pb2.SamplingParams(max_new_tokens=4, n=1)))
        parts.backend.batcher.stats.__init__()
        start = time.perf_counter()
        counts = await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
        stats = parts.backend.batcher.stats
        mean_batch = stats.tokens / max(1, stats.steps)  # rows decoded per step
    finally:
        await parts.runtime.stop(grace=0)
    return sum(counts), elapsed, latencies, mean_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, default=8,
                        help="sequential HF generate calls (tokens/s is a rate; fewer keeps the run short)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from flywheel.policy.engine import PolicyEngine

    engine = PolicyEngine.from_checkpoint()
    run_baseline(engine, ["warm up"], 4, args.temperature, args.top_p)
    b_tokens, b_secs, b_lat = run_baseline(engine, prompts(args.baseline_requests), args.max_new_tokens,
                                           args.temperature, args.top_p)
    s_tokens, s_secs, s_lat, mean_batch = asyncio.run(run_service(
        engine, args.clients, args.requests_per_client, args.max_new_tokens, args.temperature, args.top_p,
        args.max_batch_size))
    b_rate, s_rate = b_tokens / b_secs, s_tokens / s_secs
    print(f"\nSmolLM2-135M-Instruct, CPU, torch threads={torch.get_num_threads()}, max_new_tokens={args.max_new_tokens}, "
          f"temperature={args.temperature}, top_p={args.top_p}")
    header = f"{'mode':<44} {'requests':>8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'p50 lat s':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'HF generate, one request at a time':<44} {len(b_lat):>8} {b_tokens:>7} {b_secs:>8.2f} {b_rate:>9.1f} "
          f"{statistics.median(b_lat):>9.2f} {1.0:>7.2f}x")
    label = f"Flywheel gRPC, {args.clients} concurrent clients"
    print(f"{label:<44} {len(s_lat):>8} {s_tokens:>7} {s_secs:>8.2f} {s_rate:>9.1f} "
          f"{statistics.median(s_lat):>9.2f} {s_rate / b_rate:>7.2f}x")
    print(f"(service: {mean_batch:.1f} sequences decoded per step on average; goal >= 4x)")


if __name__ == "__main__":
    main()
