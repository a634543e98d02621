"""Policy benchmark: the decode engine against a static-batch HF `generate` and the compute ceiling.

    python bench/policy_bench.py [--levels 1,4,16,64] [--max-new-tokens 32] [--dtype auto|float32|bfloat16]

Per concurrency level c (all in the same run, same prompts, same sampling: temperature 0.8,
top-p 0.95, both sides returning per-token logprobs):
- Flywheel: c concurrent clients, one streaming request each (GenerateStream), through the real
  gRPC server and the continuous batcher; tokens/s and client-side time to first token p50/p99;
- baseline: one HF `model.generate` call on a static, left-padded batch of the same c prompts
  (`output_scores` for the logprobs);
- GEMM floor: the decode step's projections alone at c rows, back to back on the engine's weights: the
  upper bound of a decode step at that batch size on this machine (small batches do not reach the
  ceiling's GEMM rate, and read every weight once per step);
- ceiling: matmul GFLOP/s measured in this run (best of a few [1024 x 576] @ [576 x 1536] GEMMs in
  the engine's dtype) / FLOP per token (2 x parameters in the decoder and LM head), and the
  fraction of it each side reaches.
Then the sampler-trainer mismatch: KL(sampler || trainer) per token for each precision pair,
the sampler's behaviour logprobs against the trainer's recomputation (fp32, or bf16 autocast).
Finally a profile of one decode step (where its time goes).
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
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(n)]


def matmul_gflops(dtype) -> float:  # noqa: ANN001
    """Best GFLOP/s of a [1024 x 576] @ [576 x 1536] GEMM over the kernels this machine has: the plain
    matmul and, where available, oneDNN on a prepacked weight (what the decode step uses on CPU)."""
    import torch

    from flywheel.policy.kv_cache import prepack_available

    a, b = torch.randn(1024, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    kernels = [lambda: a @ b]
    if prepack_available(a.device, dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        for _ in range(12):
            t0 = time.perf_counter()
            for _ in range(4):
                kernel()
            best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * 1024 * 576 * 1536 / best / 1e9


def projection_floor(policy, rows: int) -> float:  # noqa: ANN001
    """Seconds the decode step's projections alone take for `rows` rows: every layer's q/k/v, o, gate/up and
    down and the LM head, back to back on the engine's own (prepacked) weights, best of 5. A decode step at
    `rows` rows cannot be faster, so rows / this is the step's upper bound in tokens/s on this machine."""
    import torch

    d = policy.decoder()
    projections = [p for i in range(len(d.layers)) for p in (d.qkv[i], d.o[i], d.gate_up[i], d.down[i])]
    projections.append(d.lm_head)
    inputs = {p.weight.shape[1]: torch.randn(rows, p.weight.shape[1]).to(d.dtype) for p in projections}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(6):
            t0 = time.perf_counter()
            for p in projections:
                p(inputs[p.weight.shape[1]])
            best = min(best, time.perf_counter() - t0)
    return best


def flop_per_token(model) -> float:  # noqa: ANN001
    embed = model.get_input_embeddings().weight.numel()
    decoder = sum(p.numel() for p in model.model.layers.parameters())
    return 2.0 * (decoder + embed)  # the LM head is tied to the embedding: its matmul counts, the lookup is free


def run_static(policy, texts: list[str], max_new_tokens: int, temperature: float, top_p: float) -> tuple[int, float]:  # noqa: ANN001
    import torch

    tok = policy.tokenizer
    encoded = [policy.encode(policy.template(t)) for t in texts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.tensor(e)
        mask[i, width - len(e):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        torch.manual_seed(0)
        out = policy.model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p,
                                    top_k=0, max_new_tokens=max_new_tokens, output_scores=True,
                                    return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        policy.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    elapsed = time.perf_counter() - start
    new = out.sequences[:, width:]
    eos = sorted(policy.eos_token_ids)
    tokens = 0
    for row in new.tolist():  # count up to and including the first eos, as the service does
        n = len(row)
        for j, t in enumerate(row):
            if t in eos:
                n = j + 1
                break
        tokens += n
    return tokens, elapsed


async def run_service(engine, levels: list[int], max_new_tokens: int, temperature: float, top_p: float):  # noqa: ANN001
    from flywheel.policy.app import build_components
    from flywheel.policy.backends import LocalBackend
    from flywheel.policy.settings import PolicySettings
    from flywheel.runtime.client import aio_channel
    from flywheel.v1 import common_pb2, policy_pb2, policy_pb2_grpc

    top = max(levels)
    settings = PolicySettings(host="127.0.0.1", grpc_port=0, metrics_port=0, metrics_enabled=False, auth_enabled=False,
                              policy_http_enabled=False, policy_worker_enabled=False, policy_reload_enabled=False,
                              shutdown_delay_s=0, policy_max_batch_size=top)
    parts = build_components(settings, LocalBackend(engine, max_batch_size=top))
    await parts.runtime.start()
    stub = policy_pb2_grpc.PolicyServiceStub(aio_channel(f"127.0.0.1:{parts.runtime.grpc_port}", retries=False))

    async def client(i: int, text: str) -> tuple[int, float]:
        request = policy_pb2.GenerateStreamRequest(
            prompt=common_pb2.Prompt(prompt_id=f"b{i}", text=text),
            sampling=common_pb2.SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                               n=1, seed=i))
        t0 = time.perf_counter()
        first, tokens = None, 0
        async for chunk in stub.GenerateStream(request, timeout=900):
            if chunk.HasField("token") and first is None:
                first = time.perf_counter() - t0
            if chunk.HasField("rollout"):
                tokens = len(chunk.rollout.response_token_ids)
        return tokens, first or 0.0

    results = {}
    try:
        await client(10**6, "warm up")
        for c in levels:
            stats = parts.backend.batcher.stats
            stats.__init__()
            start = time.perf_counter()
            done = await asyncio.gather(*(client(i, t) for i, t in enumerate(prompts(c))))
            elapsed = time.perf_counter() - start
            ttft = sorted(f for _, f in done)
            results[c] = (sum(t for t, _ in done), elapsed, ttft, stats.tokens / max(1, stats.steps))
            print(f"  measured: Flywheel, {c} clients: {results[c][0] / elapsed:.1f} tokens/s", flush=True)
    finally:
        await parts.runtime.stop(grace=0)
    return results


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def mismatch_table(path, n: int, max_new_tokens: int) -> list[tuple[str, str, float]]:  # noqa: ANN001
    """KL(sampler || trainer) per token for sampler/trainer precision pairs (same weights, same tokens)."""
    import torch

    from flywheel.policy.engine import load_policy
    from flywheel.policy.sampling import SamplingConfig
    from flywheel.policy.engine import PolicyEngine
    from flywheel.trainer.batch import collate
    from flywheel.trainer.losses import sampler_mismatch_kl
    from flywheel.trainer.ppo import response_forward
    from flywheel.v1 import common_pb2

    trainer_fp32 = load_policy(path, "trainer", dtype="float32", validate=False).model
    rows = []
    for sampler_dtype in ("float32", "bfloat16"):
        engine = PolicyEngine(load_policy(path, "policy-0000", dtype=sampler_dtype, validate=False))
        groups = engine.generate(prompts(n), SamplingConfig(temperature=0.8, top_p=0.95, max_new_tokens=max_new_tokens,
                                                            seed=1))
        rollouts = [common_pb2.ScoredRollout(rollout=common_pb2.Rollout(
            prompt_token_ids=g[0].prompt_ids, response_token_ids=g[0].token_ids, token_logprobs=g[0].logprobs,
            sampling=common_pb2.SamplingParams(temperature=0.8))) for g in groups]
        batch = collate(rollouts, pad_token_id=engine.current.pad_token_id)
        for trainer_name, autocast in (("float32", False), ("bfloat16 autocast", True)):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                lp, _, _ = response_forward(trainer_fp32, batch.input_ids, batch.attention_mask, batch.prompt_lengths,
                                            batch.response_ids, batch.temperature)
            kl = float(sampler_mismatch_kl(lp.float(), batch.behaviour_logprobs, batch.response_mask))
            rows.append((sampler_dtype, trainer_name, kl))
    return rows


def profile_step(policy, rows: int) -> str:  # noqa: ANN001
    import torch

    from flywheel.policy.decode import DecodeBatch, Generation

    batch = DecodeBatch(policy)
    batch.add([Generation(prompt_text=policy.template(t), temperature=0.8, top_p=0.95, max_new_tokens=64, seed=i)
               for i, t in enumerate(prompts(rows))])
    for _ in range(3):
        batch.step()
    with torch.profiler.profile() as prof:
        for _ in range(5):
            batch.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent clients per measurement")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--dtype", default="auto", help="engine precision: auto, float32, bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the machine's)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="the engine's projections without oneDNN prepacked weights (the before-state)")
    parser.add_argument("--mismatch-prompts", type=int, default=8, help="0 skips the mismatch table")
    parser.add_argument("--profile-rows", type=int, default=16, help="0 skips the decode-step profile")
    args = parser.parse_args()

    import torch

    from flywheel.models import smollm2_checkpoint
    from flywheel.policy.engine import PolicyEngine, load_policy, machine_threads

    torch.set_num_threads(args.threads or machine_threads())
    levels = [int(x) for x in args.levels.split(",")]
    path = smollm2_checkpoint()
    engine = PolicyEngine(load_policy(path, "policy-0000", dtype=args.dtype, prepack=not args.no_prepack))
    policy = engine.current
    dtype = policy.model.dtype
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[0]
    gflops = matmul_gflops(dtype)
    per_token = flop_per_token(policy.model)
    ceiling = gflops * 1e9 / per_token
    print(f"{policy.dtype_name}: matmul {gflops:.0f} GFLOP/s, ceiling {ceiling:.0f} tokens/s", flush=True)
    run_static(policy, ["warm up"], 4, args.temperature, args.top_p)
    static = {}
    for c in levels:
        static[c] = run_static(policy, prompts(c), args.max_new_tokens, args.temperature, args.top_p)
        print(f"  measured: static generate, {c} prompts: {static[c][0] / static[c][1]:.1f} tokens/s", flush=True)
    floor = {c: projection_floor(policy, c) for c in levels}
    service = asyncio.run(run_service(engine, levels, args.max_new_tokens, args.temperature, args.top_p))
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[0]

    print(f"\nSmolLM2-135M-Instruct, CPU, {policy.dtype_name}, torch threads={torch.get_num_threads()}, "
          f"max_new_tokens={args.max_new_tokens}, temperature={args.temperature}, top_p={args.top_p}; "
          f"load average {load_before} -> {load_after} (a shared machine: compare within this run); "
          f"projections {'prepacked (oneDNN)' if policy.decoder().prepacked else 'F.linear (not prepacked)'}")
    print(f"ceiling: matmul {gflops:.0f} GFLOP/s / {per_token / 1e6:.0f} MFLOP per token = {ceiling:.0f} tokens/s\n")
    header = (f"{'clients':>7} {'static generate tok/s':>21} {'Flywheel tok/s':>14} {'speedup':>8} {'rows/step':>9} "
              f"{'% ceiling':>9} {'GEMM floor tok/s':>16} {'TTFT p50 s':>10} {'TTFT p99 s':>10}")
    print(header)
    print("-" * len(header))
    for c in levels:
        s_tokens, s_secs = static[c]
        f_tokens, f_secs, ttft, rows = service[c]
        s_rate, f_rate = s_tokens / s_secs, f_tokens / f_secs
        print(f"{c:>7} {s_rate:>21.1f} {f_rate:>14.1f} {f_rate / s_rate:>7.2f}x {rows:>9.1f} "
              f"{100 * f_rate / ceiling:>8.1f}% {c / floor[c]:>16.1f} {statistics.median(ttft):>10.2f} "
              f"{percentile(ttft, 0.99):>10.2f}")
    print("(baseline: one HF generate call on a static batch of the same prompts; goal >= 2x at 16 clients;\n"
          " GEMM floor: c rows / the time of one step's projections alone at c rows, the most any decode step at\n"
          " that batch size can make here, before attention, sampling and the prompts' prefill)")

    if args.mismatch_prompts:
        print(f"\nsampler-trainer mismatch, KL(sampler || trainer) per token, {args.mismatch_prompts} prompts")
        print(f"{'sampler':>10} {'trainer':>18} {'KL/token':>10}")
        for sampler, trainer, kl in mismatch_table(path, args.mismatch_prompts, args.max_new_tokens):
            print(f"{sampler:>10} {trainer:>18} {kl:>10.2e}")
    if args.profile_rows:
        print(f"\nprofile of 5 decode steps, {args.profile_rows} rows, {policy.dtype_name}")
        print(profile_step(policy, args.profile_rows))


if __name__ == "__main__":
    main()
