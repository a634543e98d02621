"""Reward scoring throughput: the gRPC service with dynamic batching vs its two baselines.

    python bench/reward_bench.py [--duration 8] [--concurrency 1 8 32] [--max-length 128]

Scores real MiniLM (the reward-0000 base: MiniLM backbone + fresh head) on (prompt, response)
pairs built from chatterbot-corpus text, and prints one table:

- ceiling: in-process `scorer.score` on batches of max_batch_size (no gRPC, no queueing).
- naive:   in-process, one forward pass per request (what serving without batching costs).
- grpc c=N: N concurrent clients, one pair per Score call, against `flywheel serve reward`
  running in a subprocess (dynamic batching on), so clients and server do not share a GIL.
- grpc-unbatched c=N: the same server with reward_max_batch_size=1 (one forward per request).

Goal: at concurrency 32, batched gRPC >= 0.8x ceiling and >= 5x naive.

A second table, "apps", measures what another app sees (`--apps-only` runs just it):
- HTTP JSON (/v1/score, one pair per call) vs gRPC Score at concurrency 32 on the same server
  (goal: HTTP >= 0.8x gRPC);
- single-caller latency p50/p99 of gRPC and HTTP at concurrency 1, as seqs/s against in-process
  batch 1 (goal >= 0.8x);
- auth + quota: gRPC and HTTP at concurrency 1 against a server that requires an API key with a
  (never reached) quota, vs servers without auth (goal: <= 5% of a request's time). Two servers
  differ by a few percent even with the same settings (measured 2026-12-01: a keyed server looked
  7-8% slower while the guard costs 0.016 ms), so a second server without auth runs too: the A/A
  row is that noise floor, and the auth figure is against the mean of both unkeyed servers, the
  three measured in a rotating order each round.

A second table, "batching headroom", measures what batching can gain on this machine at all:
in-process batch 32 vs batch 1 on pairs of *equal* token length (no padding), at several lengths.
Batched gRPC cannot beat naive by more than this factor, whatever the server does.

A "precision" table (`--precision-only` runs just it) scores the same pairs in process at
reward_dtype float32 (the baseline) and bfloat16 (autocast), same weights, interleaved rounds:
seqs/s at batch max_batch_size and batch 1, and how far bf16 moves the scores (max |diff| against
the fp32 scores' spread, and the share of score pairs whose order it keeps).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "services"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dataset(n: int) -> list[tuple[str, str]]:
    from flywheel.reward.datasets import corpus_sentences

    sentences = corpus_sentences()
    questions = [s for s in sentences if s.endswith("?")]
    answers = [s for s in sentences if not s.endswith("?")]
    return [(questions[(i * 7) % len(questions)], answers[(i * 13) % len(answers)]) for i in range(n)]


def measure(fn, duration_s: float) -> float:
    """Items per second of `fn()` (returns items done) over about `duration_s`."""
    fn()  # warm-up
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration_s:
        done += fn()
    return done / (time.perf_counter() - start)


def equal_length_pairs(scorer, tokens: int, n: int) -> list[tuple[str, str]]:
    """n distinct (prompt, response) pairs that encode to exactly `tokens` tokens each."""
    words = [w for w in scorer.tokenizer.vocab if w.isalpha() and len(w) > 2][:5000]
    pairs = []
    for i in range(n):
        prompt = " ".join(words[(i * 7 + k) % len(words)] for k in range(4))
        response = " ".join(words[(i * 13 + k) % len(words)] for k in range(tokens))
        ids = scorer.tokenizer(prompt, response, truncation="longest_first", max_length=tokens)["input_ids"]
        if len(ids) != tokens:
            raise AssertionError(f"pair encodes to {len(ids)} tokens, not {tokens}")
        pairs.append((prompt, response))
    return pairs


def headroom(scorer, lengths: list[int], batch_size: int, duration_s: float) -> list[tuple[int, float, float]]:
    """(length, batch-`batch_size` seqs/s, batch-1 seqs/s) on equal-length pairs."""
    rows = []
    saved = scorer.max_length
    for tokens in lengths:
        scorer.max_length = tokens
        pairs = equal_length_pairs(scorer, tokens, 256)
        rows.append((tokens, in_process(scorer, pairs, batch_size, duration_s), in_process(scorer, pairs, 1, duration_s)))
    scorer.max_length = saved
    return rows


def in_process(scorer, pairs, batch_size: int, duration_s: float) -> float:
    state = {"i": 0}

    def step() -> int:
        i = state["i"]
        chunk = [pairs[(i + k) % len(pairs)] for k in range(batch_size)]
        state["i"] = i + batch_size
        scorer.score([p for p, _ in chunk], [r for _, r in chunk])
        return batch_size

    return measure(step, duration_s)


def precision_table(args, scorer, pairs) -> None:
    """seqs/s per reward_dtype on the same pairs and weights, and the bf16 scores' distance from fp32."""
    import statistics

    import torch

    from flywheel.reward.scorers import TransformerRewardScorer

    low = TransformerRewardScorer(max_length=args.max_length, max_batch_size=args.max_batch_size, dtype="bfloat16")
    low.model.load_state_dict(scorer.model.state_dict())  # the fresh head is random: share it
    if low.dtype == scorer.dtype:
        print(f"precision: reward_dtype bfloat16 resolved to {low.dtype}; nothing to compare")
        return
    sample = pairs[:128]
    exact = torch.tensor(scorer.score([p for p, _ in sample], [r for _, r in sample]))
    approx = torch.tensor(low.score([p for p, _ in sample], [r for _, r in sample]))
    gaps, moved = exact[:, None] - exact[None, :], approx[:, None] - approx[None, :]
    kept = float(((gaps * moved > 0) | (gaps == 0)).float().mean())
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for s in (scorer, low):
            for b in (args.max_batch_size, 1):
                rates.setdefault((s.dtype, b), []).append(in_process(s, pairs, b, args.duration))
    median = {key: statistics.median(v) for key, v in rates.items()}
    print(f"\nprecision: in-process scoring, medians of {args.rounds} rounds; load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'reward_dtype':12} {'batch':>5} {'seqs/s':>9} {'x float32':>10}")
    print("-" * 40)
    for (dtype, b), rate in median.items():
        print(f"{dtype:12} {b:>5} {rate:9.1f} {rate / median[('float32', b)]:10.2f}")
    print(f"bf16 vs fp32 scores on {len(sample)} pairs: max |diff| {float((approx - exact).abs().max()):.2e}, "
          f"mean {float((approx - exact).abs().mean()):.2e}, fp32 score std {float(exact.std()):.2e}; "
          f"pairwise order kept {kept:.1%}")


class Server:
    """`flywheel serve reward` in a subprocess (no Kafka workers)."""

    def __init__(self, max_batch_size: int, max_length: int, threads: int, max_wait_ms: float,
                 keys_db: Path | None = None) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        env = dict(os.environ,
                   FLYWHEEL_HOST="127.0.0.1", FLYWHEEL_GRPC_PORT=str(self.port),
                   FLYWHEEL_METRICS_PORT=str(self.metrics_port), FLYWHEEL_REWARD_SCORER="transformer",
                   FLYWHEEL_REWARD_WORKER_ENABLED="false", FLYWHEEL_REWARD_RELOAD_ENABLED="false",
                   FLYWHEEL_REWARD_MAX_BATCH_SIZE=str(max_batch_size), FLYWHEEL_REWARD_MAX_LENGTH=str(max_length),
                   FLYWHEEL_TORCH_THREADS=str(threads), FLYWHEEL_REWARD_MAX_WAIT_MS=str(max_wait_ms),
                   FLYWHEEL_SHUTDOWN_DELAY_S="0", FLYWHEEL_LOG_LEVEL="WARNING",
                   FLYWHEEL_REWARD_HTTP_PORT=str(self.http_port),
                   FLYWHEEL_AUTH_ENABLED="true" if keys_db else "false", FLYWHEEL_AUTH_KEYS_DB=str(keys_db or ""),
                   PYTHONPATH=str(REPO / "services"))
        self.proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "serve", "reward"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout_s: float = 900.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError("reward server did not become ready")

    def mean_batch_size(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = float(re.search(r"^flywheel_reward_batch_size_sum ([0-9.e+]+)$", text, re.M).group(1))
        count = float(re.search(r"^flywheel_reward_batch_size_count ([0-9.e+]+)$", text, re.M).group(1))
        return total / count if count else 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def closed_loop(send, n_requests: int, concurrency: int, duration_s: float) -> tuple[float, list[float]]:
    """`concurrency` clients each sending its next request when the last returned, for `duration_s`:
    (requests/s, latencies in seconds). `send(i)` sends request i."""
    await asyncio.gather(*(send(i) for i in range(concurrency)))  # warm-up: connections, first batches
    done = 0
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration_s

    async def client(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await send(i % n_requests)
            latencies.append(time.perf_counter() - t0)
            done += 1
            i += concurrency

    start = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return done / (time.perf_counter() - start), latencies


async def grpc_run(target: str, pairs, concurrency: int, duration_s: float,
                   key: str = "") -> tuple[float, list[float]]:
    from grpc import aio

    from flywheel.v1 import reward_pb2, reward_pb2_grpc

    requests = [reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt=p, response=r)]) for p, r in pairs]
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    async with aio.insecure_channel(target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)

        async def send(i: int) -> None:
            await stub.Score(requests[i], timeout=60, metadata=metadata)

        return await closed_loop(send, len(requests), concurrency, duration_s)


async def grpc_rate(target: str, pairs, concurrency: int, duration_s: float) -> float:
    return (await grpc_run(target, pairs, concurrency, duration_s))[0]


async def http_run(url: str, pairs, concurrency: int, duration_s: float, key: str = "") -> tuple[float, list[float]]:
    import json

    import aiohttp

    bodies = [json.dumps({"items": [{"prompt": p, "response": r}]}).encode() for p, r in pairs]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency + 4)) as http:
        async def send(i: int) -> None:
            async with http.post(f"{url}/v1/score", data=bodies[i], headers=headers) as reply:
                reply.raise_for_status()
                await reply.read()

        return await closed_loop(send, len(bodies), concurrency, duration_s)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def auth_cost_s(keys_db: Path, key: str, calls: int = 2000) -> float:
    """In-process cost of one admitted request: key lookup, scope check, both quota buckets."""
    from flywheel.runtime.auth import Guard, TokenStore

    guard = Guard(TokenStore(keys_db), service="bench")
    metadata = [("authorization", f"Bearer {key}")]
    for _ in range(100):
        guard.charge_items(guard.admit(metadata, "score"), 1)
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            guard.charge_items(guard.admit(metadata, "score"), 1)
        runs.append((time.perf_counter() - start) / calls)
    return min(runs)


def apps_table(args, scorer, pairs, threads: int) -> None:
    """HTTP vs gRPC at c=32, single-caller latency, auth + quota overhead (see the module doc)."""
    import statistics
    import tempfile

    from flywheel.runtime.auth import TokenStore

    keys_dir = Path(tempfile.mkdtemp(prefix="reward-bench-keys-"))
    store = TokenStore(keys_dir / "keys.sqlite")
    key = store.issue("bench", scope="score", requests_per_s=1e6, items_per_s=1e6)  # quota path runs, never refuses
    store.close()
    c_max = max(args.concurrency)
    rates: dict[str, list[float]] = {}
    lat: dict[str, list[float]] = {}

    def record(mode: str, result: tuple[float, list[float]]) -> None:
        rates.setdefault(mode, []).append(result[0])
        lat.setdefault(mode, []).extend(result[1])
        print(f"  {mode:34} {result[0]:8.1f} req/s  p50 {1000 * percentile(result[1], 0.5):6.1f} ms", flush=True)

    plain = Server(args.max_batch_size, args.max_length, threads, args.max_wait_ms)
    plain_b = Server(args.max_batch_size, args.max_length, threads, args.max_wait_ms)
    secured = Server(args.max_batch_size, args.max_length, threads, args.max_wait_ms, keys_db=keys_dir / "keys.sqlite")
    single_caller = [("", plain, ""), (" (2nd server)", plain_b, ""), (", key + quota", secured, key)]
    try:
        plain.wait_ready()
        plain_b.wait_ready()
        secured.wait_ready()
        for round_ in range(args.rounds):
            single: list[float] = []

            def one() -> int:
                t0 = time.perf_counter()
                p, r = pairs[len(single) % len(pairs)]
                scorer.score([p], [r])
                single.append(time.perf_counter() - t0)
                return 1

            record("in-process batch 1", (measure(one, args.duration), single[1:]))
            shift = round_ % len(single_caller)  # each server goes first, middle and last in turn
            for suffix, server, api_key in single_caller[shift:] + single_caller[:shift]:
                record(f"grpc c=1{suffix}", asyncio.run(grpc_run(server.target, pairs, 1, args.duration, api_key)))
                record(f"http c=1{suffix}", asyncio.run(http_run(server.url, pairs, 1, args.duration, api_key)))
            record(f"grpc c={c_max}", asyncio.run(grpc_run(plain.target, pairs, c_max, args.duration)))
            record(f"http c={c_max}", asyncio.run(http_run(plain.url, pairs, c_max, args.duration)))
    finally:
        plain.stop()
        plain_b.stop()
        secured.stop()

    median = {mode: statistics.median(v) for mode, v in rates.items()}
    base = median["in-process batch 1"]
    print(f"\napps: medians of {args.rounds} rounds x {args.duration:.0f}s; latencies pooled over rounds")
    print(f"{'mode':26} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'x in-proc b1':>12} {'x grpc':>7}")
    print("-" * 72)
    for mode, rate in median.items():
        grpc_mode = mode.replace("http", "grpc")
        vs_grpc = f"{rate / median[grpc_mode]:7.2f}" if mode.startswith("http") else f"{'':7}"
        print(f"{mode:26} {rate:8.1f} {1000 * percentile(lat[mode], 0.5):7.2f} {1000 * percentile(lat[mode], 0.99):7.2f}"
              f" {rate / base:12.2f} {vs_grpc}")
    guard_ms = 1000 * auth_cost_s(keys_dir / "keys.sqlite", key)
    print(f"auth + quota in-process: {guard_ms:.3f} ms per request = {guard_ms / (1000 / base):.1%} of an "
          f"in-process batch-1 forward pass")
    for proto in ("grpc", "http"):
        a_ms = 1000 * percentile(lat[f"{proto} c=1"], 0.5)
        b_ms = 1000 * percentile(lat[f"{proto} c=1 (2nd server)"], 0.5)
        plain_ms = (a_ms + b_ms) / 2
        auth_ms = 1000 * percentile(lat[f"{proto} c=1, key + quota"], 0.5)
        print(f"{proto}: A/A, two servers without auth: {a_ms:.2f} vs {b_ms:.2f} ms p50 ({(b_ms - a_ms) / a_ms:+.1%}); "
              f"auth + quota adds {auth_ms - plain_ms:+.2f} ms to their mean {plain_ms:.2f} ms "
              f"({(auth_ms - plain_ms) / plain_ms:+.1%}; goal <= 5%)")
    print(f"c={c_max}: http {median[f'http c={c_max}'] / median[f'grpc c={c_max}']:.2f}x grpc (goal >= 0.8); "
          f"c=1: grpc {median['grpc c=1'] / base:.2f}x, http {median['http c=1'] / base:.2f}x in-process batch 1 "
          f"(goal >= 0.8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: min(cores, 4))")
    parser.add_argument("--skip-unbatched-server", action="store_true")
    parser.add_argument("--apps-only", action="store_true", help="only the apps table (HTTP, latency, auth)")
    parser.add_argument("--precision-only", action="store_true", help="only the precision table (fp32 vs bf16)")
    parser.add_argument("--headroom-lengths", type=int, nargs="*", default=[24, 48, 96],
                        help="token lengths of the batching-headroom table (none: skip it)")
    args = parser.parse_args()

    import statistics

    import torch

    from flywheel.reward.scorers import TransformerRewardScorer, default_torch_threads
    from flywheel.runtime.process import configure_process

    threads = args.threads or default_torch_threads()
    configure_process(torch_threads=threads)  # this process's in-process scorer; servers get FLYWHEEL_TORCH_THREADS
    pairs = dataset(512)
    scorer = TransformerRewardScorer(max_length=args.max_length, max_batch_size=args.max_batch_size)
    load = os.getloadavg()[0]
    print(f"model MiniLM-L6 ({scorer.version}), torch {torch.__version__}, {threads} threads, "
          f"{os.cpu_count()} cores, max_length {args.max_length}, {args.rounds} rounds x {args.duration:.0f}s "
          f"per point, load average at start {load:.1f}", flush=True)
    if args.apps_only:
        apps_table(args, scorer, pairs, threads)
        return
    if args.precision_only:
        precision_table(args, scorer, pairs)
        return
    c_max = max(args.concurrency)
    samples: dict[tuple[str, int], list[float]] = {}
    notes: dict[tuple[str, int], str] = {}

    def record(mode: str, c: int, rate: float) -> None:
        samples.setdefault((mode, c), []).append(rate)
        print(f"  {mode:36} c={c:<3} {rate:8.1f} seqs/s", flush=True)

    batched = Server(args.max_batch_size, args.max_length, threads, args.max_wait_ms)
    unbatched = None if args.skip_unbatched_server else Server(1, args.max_length, threads, 0.0)
    try:
        batched.wait_ready()
        if unbatched is not None:
            unbatched.wait_ready()
        # Interleaved rounds: load changes on a shared machine hit every mode alike.
        for _ in range(args.rounds):
            record(f"ceiling: in-process batch {args.max_batch_size}", 0,
                   in_process(scorer, pairs, args.max_batch_size, args.duration))
            record("naive: in-process batch 1", 0, in_process(scorer, pairs, 1, args.duration))
            for c in args.concurrency:
                record("grpc, dynamic batching", c, asyncio.run(grpc_rate(batched.target, pairs, c, args.duration)))
            if unbatched is not None:
                record("grpc, unbatched server", c_max,
                       asyncio.run(grpc_rate(unbatched.target, pairs, c_max, args.duration)))
        notes[("grpc, dynamic batching", c_max)] = f"mean batch {batched.mean_batch_size():.1f} (all runs)"
    finally:
        batched.stop()
        if unbatched is not None:
            unbatched.stop()

    median = {key: statistics.median(v) for key, v in samples.items()}
    ceiling = median[(f"ceiling: in-process batch {args.max_batch_size}", 0)]
    naive = median[("naive: in-process batch 1", 0)]
    print(f"\nmedians of {args.rounds} rounds; load average now {os.getloadavg()[0]:.1f}")
    print(f"{'mode':36} {'conc':>5} {'seqs/s':>9} {'x ceiling':>10} {'x naive':>8}  note")
    print("-" * 96)
    for (mode, c), rate in median.items():
        print(f"{mode:36} {c or '-':>5} {rate:9.1f} {rate / ceiling:10.2f} {rate / naive:8.2f}  "
              f"{notes.get((mode, c), '')}")
    best = median.get(("grpc, dynamic batching", c_max))
    if best is not None:
        print(f"\nconcurrency {c_max}: {best / ceiling:.2f}x ceiling (goal >= 0.8), "
              f"{best / naive:.1f}x naive (goal >= 5)")

    if args.headroom_lengths:
        print(f"\nbatching headroom on this machine: in-process, equal-length pairs (no padding), "
              f"{args.duration:.0f}s per point")
        print(f"{'tokens':>6} {'batch ' + str(args.max_batch_size):>10} {'batch 1':>9} {'speedup':>8}")
        print("-" * 36)
        for tokens, batched_rate, single_rate in headroom(scorer, args.headroom_lengths, args.max_batch_size,
                                                          args.duration):
            print(f"{tokens:>6} {batched_rate:10.1f} {single_rate:9.1f} {batched_rate / single_rate:7.2f}x")

    precision_table(args, scorer, pairs)
    print()
    apps_table(args, scorer, pairs, threads)


if __name__ == "__main__":
    main()
