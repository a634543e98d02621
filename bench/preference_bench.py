"""Preference service benchmark: ingestion through gRPC (acks=all, real broker) and aggregation vs choix.

    python bench/preference_bench.py [--bootstrap HOST:PORT] [--events 20000] [--prompts 10000]

Without --bootstrap (or FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS) a broker is started with
deploy/kafka/kafka.sh in a temporary directory. The service runs as its own process
(`python -m flywheel.preference`, authentication on), exactly as deployed.

1. Ingestion: rankings of 4 known rollouts, each made durable (acks=all) and stored before the ack:
   batched client-streaming SubmitBulk (2 concurrent streams) vs one-at-a-time unary SubmitRanking.
2. Aggregation: 10,000 prompts x 4 responses x 3 raters (Plackett–Luce rankings broken into 6
   pairs each): the vectorised fit vs choix.ilsr_pairwise run per prompt with the equivalent
   regularisation (alpha = lambda / 4), and the largest difference of the estimates; the fit with
   rater reliability on beside it (wall and CPU time, goal <= 1 s).
3. Rater reliability: Kendall's tau against the hidden truth for reliability off / on / oracle
   weights (each rater's weight fitted against the true scores) over rater mixes and overlap
   patterns from `flywheel.preference.rater_mixes`, with iterations and fit time
   (--reliability-only runs just this part, --skip-reliability leaves it out; --reliability-seeds
   averages over more seeds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- ingestion -------------------------------------------------------------------------------------

def start_broker(tmp: Path) -> tuple[str, Path]:
    data = tmp / "kafka"
    out = subprocess.run([str(REPO / "deploy" / "kafka" / "kafka.sh"), "start", "--data-dir", str(data), "--port",
                          str(free_port()), "--controller-port", str(free_port())],
                         capture_output=True, text=True, timeout=180, check=True)
    return out.stdout.strip().splitlines()[-1], data


@contextlib.contextmanager
def bench_broker(args, tmp: Path):
    """The benchmark's broker, with Flywheel's topics: --bootstrap or FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS
    when given, else one started under `tmp` for the benchmark and stopped after it."""
    from flywheel.bus import ensure_topics
    from flywheel.bus.topics import ALL_TOPICS

    bootstrap = args.bootstrap or os.environ.get("FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS")
    broker_dir = None
    if not bootstrap:
        bootstrap, broker_dir = start_broker(tmp)
    try:
        ensure_topics(bootstrap, ALL_TOPICS)
        yield bootstrap
    finally:
        if broker_dir is not None:
            subprocess.run([str(REPO / "deploy" / "kafka" / "kafka.sh"), "stop", "--data-dir", str(broker_dir)],
                           timeout=60, check=False)


def issue_tokens(home: Path, rater_ids: list[str]) -> dict[str, str]:
    """Rater tokens in the preference service's own token store under `home`."""
    from flywheel.preference.auth import TokenStore

    store = TokenStore(home / "preference" / "auth.sqlite")
    try:
        return {rater: store.issue(rater) for rater in rater_ids}
    finally:
        store.close()


def preference_env(bootstrap: str, home: Path, port: int, **settings: str) -> dict[str, str]:
    """Environment of a benchmarked preference service: quiet, no UI, no background refits."""
    return {**os.environ, "FLYWHEEL_KAFKA_BOOTSTRAP_SERVERS": bootstrap, "FLYWHEEL_HOST": "127.0.0.1",
            "FLYWHEEL_GRPC_PORT": str(port), "FLYWHEEL_HOME": str(home), "FLYWHEEL_LOG_LEVEL": "WARNING",
            "FLYWHEEL_SHUTDOWN_DELAY_S": "0", "FLYWHEEL_PREFERENCE_REFRESH_INTERVAL_S": "3600",
            "FLYWHEEL_PREFERENCE_UI_ENABLED": "false", **settings}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("preference service exited")
            try:
                req = health_pb2.HealthCheckRequest(service="flywheel.v1.PreferenceService")
                if stub.Check(req, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("service not SERVING")


async def ingest(target: str, token: str, rollouts_by_prompt: list[list], n_events: int, streams: int,
                 n_unary: int, batch: int, service_pid: int) -> dict[str, float]:
    from grpc import aio

    from flywheel.runtime.client import channel_options
    from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

    rng = np.random.default_rng(0)

    def event(i: int) -> common_pb2.PreferenceEvent:
        rs = rollouts_by_prompt[i % len(rollouts_by_prompt)]
        return common_pb2.PreferenceEvent(ranking=common_pb2.Ranking(
            event_id=f"bench-{uuid.uuid4().hex}", rater_id="bench-rater", prompt_id=rs[0].prompt_id,
            responses=[common_pb2.ResponseRef(response_id=r.rollout_id) for r in rs],
            ranks=list(rng.permutation(4) + 1), lead_time_ms=1500))

    bulk = [event(i) for i in range(n_events)]
    unary = [event(i).ranking for i in range(n_unary)]
    metadata = (("authorization", f"Bearer {token}"),)
    results: dict[str, float] = {}
    async with aio.insecure_channel(target, options=channel_options()) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        await stub.SubmitRanking(unary[0], metadata=metadata)  # warm up
        start = time.perf_counter()
        for r in unary[1:]:
            await stub.SubmitRanking(r, metadata=metadata)
        results["unary"] = (len(unary) - 1) / (time.perf_counter() - start)

        async def one_stream(items, batch: int):
            async def singles():
                for e in items:
                    yield e

            async def batches():
                for i in range(0, len(items), batch):
                    yield preference_pb2.PreferenceEventBatch(events=items[i:i + batch])

            if batch <= 1:
                return await stub.SubmitBulk(singles(), metadata=metadata, timeout=600)
            return await stub.SubmitBulkBatched(batches(), metadata=metadata, timeout=600)

        async def run(events, batch: int, expect_duplicates: bool = False) -> float:
            per_stream = [events[i::streams] for i in range(streams)]
            start = time.perf_counter()
            acks = await asyncio.gather(*[one_stream(items, batch) for items in per_stream])
            elapsed = time.perf_counter() - start
            counted = sum(a.duplicates if expect_duplicates else a.accepted for a in acks)
            assert counted == len(events), f"{counted} of {len(events)}"
            return len(events) / elapsed

        half = len(bulk) // 2
        cpu0 = cpu_seconds(service_pid)
        results["batched"] = await run(bulk[:half], batch)
        results["cpu_us_per_event"] = 1e6 * (cpu_seconds(service_pid) - cpu0) / half
        results["bulk"] = await run(bulk[half:], 1)
        # the same events again: all duplicates, nothing produced (the cost of idempotency alone)
        results["batched_duplicates"] = await run(bulk[:half], batch, expect_duplicates=True)
    return results


def bench_ingestion(args, tmp: Path) -> dict[str, float]:
    from flywheel.bus import TypedProducer
    from flywheel.bus.topics import ROLLOUTS
    from flywheel.v1 import common_pb2

    with bench_broker(args, tmp) as bootstrap:
        home = tmp / "home"
        token = issue_tokens(home, ["bench-rater"])["bench-rater"]
        run = uuid.uuid4().hex[:8]
        rollouts = [[common_pb2.Rollout(rollout_id=f"bench-{run}-{p}-{i}", prompt_id=f"bench-{run}-{p}",
                                        response_text=f"candidate {i} for prompt {p}", policy_version="policy-0001",
                                        candidate_index=i) for i in range(4)] for p in range(500)]
        producer = TypedProducer(bootstrap, client_id="bench")
        for group in rollouts:
            for r in group:
                producer.send(ROLLOUTS, r, key=r.prompt_id)
        producer.flush()
        producer.close()
        port = free_port()
        env = preference_env(bootstrap, home, port, FLYWHEEL_METRICS_ENABLED="false")
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.preference"], env=env)
        try:
            wait_serving(f"127.0.0.1:{port}", proc)
            time.sleep(1.0)  # let the rollouts follower apply the last batch
            return asyncio.run(ingest(f"127.0.0.1:{port}", token, rollouts, args.events, args.streams, args.unary,
                                      args.batch, proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


# -- aggregation -----------------------------------------------------------------------------------

def bench_aggregation(n_prompts: int, K: int = 4, raters: int = 3, lam: float = 0.5) -> dict[str, float]:
    import choix

    from flywheel.preference.aggregation import FitOptions, Problem, fit

    rng = np.random.default_rng(0)
    true = rng.normal(0, 1, (n_prompts, K))
    W, L, R = [], [], []
    per_prompt: list[list[tuple[int, int]]] = [[] for _ in range(n_prompts)]
    for p in range(n_prompts):
        for r in range(raters):
            order = np.argsort(-(true[p] + rng.gumbel(size=K)))
            for i in range(K):
                for j in range(i + 1, K):
                    W.append(p * K + order[i])
                    L.append(p * K + order[j])
                    R.append(r)
                    per_prompt[p].append((int(order[i]), int(order[j])))
    m = len(W)
    problem = Problem(n_prompts, np.repeat(np.arange(n_prompts), K), np.array(W), np.array(L), np.zeros(m, bool),
                      np.ones(m), np.array(R), raters)
    options = FitOptions(prior_strength=lam, reliability=False, tolerance=1e-8)
    fit(problem, options)  # warm up (imports, allocator)
    t0, c0 = time.perf_counter(), time.process_time()
    ours = fit(problem, options)
    t_ours, c_ours = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    weighted = fit(problem, FitOptions(prior_strength=lam, reliability=True))
    t_weighted, c_weighted = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    ref = np.array([choix.ilsr_pairwise(K, per_prompt[p], alpha=lam / K, tol=1e-8) for p in range(n_prompts)])
    t_choix = time.perf_counter() - t0
    # same order of responses (scores rounded to 1e-6 so exact ties order identically)
    same_order = float(np.mean([(np.argsort(-np.round(a, 6), kind="stable") == np.argsort(-np.round(b, 6), kind="stable")).all()
                                for a, b in zip(ours.scores, ref)]))
    return {"ours_s": t_ours, "weighted_s": t_weighted, "choix_s": t_choix, "max_abs_diff": float(np.abs(ours.scores - ref).max()),
            "same_order": same_order, "iterations": ours.iterations, "weighted_iterations": weighted.iterations,
            "weighted_converged": weighted.converged, "ours_cpu_s": c_ours, "weighted_cpu_s": c_weighted,
            "judgements": m}


# -- rater reliability -----------------------------------------------------------------------------

POOL = ["good"] * 8 + ["noisy"] * 4 + ["random"] * 3 + ["adversarial"] * 2  # 17 raters, most of them not good
RELIABILITY_SCENARIOS = [
    # name, prompts, rater kinds, generate() keywords
    ("alike: 5 good raters, everyone judges everything", 500, ["good"] * 5, {}),
    ("mostly not good: 2 good, noisy, random, adversarial; all", 500,
     ["good", "good", "noisy", "random", "adversarial"], {}),
    ("majority good: 3 good, random, adversarial; all", 500, ["good"] * 3 + ["random", "adversarial"], {}),
    ("few careful, many casual: 3 good, 9 noisy, 2 random; 3 per prompt", 1500,
     ["good"] * 3 + ["noisy"] * 9 + ["random"] * 2, dict(raters_per_prompt=3)),
    ("sparse: 3 of 17 raters per prompt, 3 random pairs each", 1500, POOL, dict(raters_per_prompt=3, pairs=3)),
    ("sparse: 2 of 17 raters per prompt, all pairs", 1500, POOL, dict(raters_per_prompt=2)),
    ("sparsest: 3 of 17 per prompt, chain of adjacent pairs", 1500, POOL, dict(raters_per_prompt=3, pairs="chain")),
    ("no overlap: 1 of 17 raters per prompt", 1500, POOL, dict(raters_per_prompt=1)),
    ("ties (nu = 0.5): 2 good, noisy, random, adversarial; all", 500,
     ["good", "good", "noisy", "random", "adversarial"], dict(tie_parameter=0.5)),
]


def bench_reliability(seeds: int) -> list[dict]:
    from flywheel.preference.aggregation import FitOptions, fit
    from flywheel.preference.rater_mixes import generate, kendall_tau, oracle_weights

    rows = []
    for name, prompts, kinds, design in RELIABILITY_SCENARIOS:
        acc: dict[str, list[float]] = {k: [] for k in ("off", "on", "oracle", "iterations", "seconds", "converged")}
        for seed in range(seeds):
            sc = generate(np.random.default_rng(1000 + seed), prompts, 4, kinds, **design)
            off = fit(sc.problem, FitOptions(reliability=False))
            t0 = time.perf_counter()
            on = fit(sc.problem, FitOptions())
            acc["seconds"].append(time.perf_counter() - t0)
            oracle = fit(sc.problem, FitOptions(), fixed_reliability=oracle_weights(sc))
            acc["off"].append(kendall_tau(off.scores, sc.truth))
            acc["on"].append(kendall_tau(on.scores, sc.truth))
            acc["oracle"].append(kendall_tau(oracle.scores, sc.truth))
            acc["iterations"].append(on.iterations)
            acc["converged"].append(float(on.converged))
        # sampling noise of one tau: per-pair sign agreement over prompts x 6 pairs
        noise = 1.0 / math.sqrt(prompts * 6 * seeds)
        rows.append({"name": name, "judgements": len(sc.problem.winner), "noise": noise,
                     **{k: float(np.mean(v)) for k, v in acc.items()}})
    return rows


def print_reliability(rows: list[dict], seeds: int) -> None:
    print(f"\nRater reliability: Kendall tau vs the hidden truth (mean of {seeds} seed(s), 4 responses per prompt; "
          "tau standard error ~ the noise column)")
    head = (f"{'scenario':70} | {'off':>6} | {'on':>6} | {'oracle':>6} | {'on-off':>7} | {'noise':>6} | "
            f"{'iters':>5} | {'s':>6} | conv")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:70} | {r['off']:6.3f} | {r['on']:6.3f} | {r['oracle']:6.3f} | {r['on'] - r['off']:+7.3f} | "
              f"{r['noise']:6.3f} | {r['iterations']:5.0f} | {r['seconds']:6.2f} | {100 * r['converged']:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=None, help="Use this Kafka broker instead of starting one.")
    parser.add_argument("--events", type=int, default=20_000, help="Events sent through SubmitBulk.")
    parser.add_argument("--streams", type=int, default=2, help="Concurrent SubmitBulk streams.")
    parser.add_argument("--batch", type=int, default=200, help="Events per SubmitBulkBatched message.")
    parser.add_argument("--unary", type=int, default=500, help="Events sent one by one (baseline).")
    parser.add_argument("--prompts", type=int, default=10_000, help="Prompts in the aggregation benchmark.")
    parser.add_argument("--skip-ingestion", action="store_true")
    parser.add_argument("--skip-reliability", action="store_true", help="Without the rater-reliability table.")
    parser.add_argument("--reliability-only", action="store_true", help="Only the rater-reliability table.")
    parser.add_argument("--reliability-seeds", type=int, default=3, help="Seeds per reliability scenario.")
    args = parser.parse_args()

    if args.reliability_only:
        print_reliability(bench_reliability(args.reliability_seeds), args.reliability_seeds)
        return

    tmp = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    try:
        ing = None if args.skip_ingestion else bench_ingestion(args, tmp)
        agg = bench_aggregation(args.prompts)
        reliability = None if args.skip_reliability else bench_reliability(args.reliability_seeds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    if ing:
        rows += [
            (f"ingestion: SubmitBulkBatched ({args.batch}/msg), {args.streams} streams, acks=all (events/s)",
             f"{ing['batched']:,.0f}", f"goal >= 5,000; {ing['batched'] / ing['unary']:.0f}x unary"),
            ("  service CPU per event, batched (us)", f"{ing['cpu_us_per_event']:,.0f}",
             "user+sys of the service process"),
            (f"ingestion: SubmitBulk (1 event/msg), {args.streams} streams, acks=all (events/s)",
             f"{ing['bulk']:,.0f}", f"{ing['bulk'] / ing['unary']:.0f}x unary"),
            ("ingestion: batched resubmit, all duplicates (events/s)", f"{ing['batched_duplicates']:,.0f}",
             "idempotency check alone"),
            ("baseline: unary SubmitRanking one at a time (events/s)", f"{ing['unary']:,.0f}", "acks=all per call"),
        ]
    rows += [
        (f"aggregation: vectorised BT, {args.prompts:,} prompts x 4 x 3 raters (s)", f"{agg['ours_s']:.3f}",
         f"{agg['iterations']} Newton steps; {agg['ours_cpu_s']:.3f} s CPU"),
        ("aggregation: + rater reliability (accuracies vs leave-one-rater-out) (s)", f"{agg['weighted_s']:.3f}",
         f"{agg['weighted_iterations']} iterations{'' if agg['weighted_converged'] else ' (NOT converged)'}; "
         f"{agg['weighted_cpu_s']:.3f} s CPU (goal <= 1 s)"),
        ("baseline: choix.ilsr_pairwise per prompt (s)", f"{agg['choix_s']:.3f}",
         f"vectorised {agg['choix_s'] / agg['ours_s']:.1f}x faster (goal >= 10x)"),
        ("estimates: max |ours - choix| (log-strength)", f"{agg['max_abs_diff']:.2e}",
         f"identical rankings in {100 * agg['same_order']:.2f}% of prompts"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)} | {'value':>10} | note")
    print(f"{'-' * width}-+-{'-' * 10}-+-{'-' * 40}")
    for name, value, note in rows:
        print(f"{name.ljust(width)} | {value:>10} | {note}")
    if reliability is not None:
        print_reliability(reliability, args.reliability_seeds)


if __name__ == "__main__":
    main()
