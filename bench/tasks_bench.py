"""Task assignment benchmark: informative vs random assignment, and a rating team leasing at once.

    python bench/tasks_bench.py [--prompts 300] [--raters 200] [--tasks-per-rater 3] [--think-s 0 2] [--bootstrap HOST:PORT]

1. Assignment efficiency (in process, no broker: assignment is the TaskBoard's decision, the same
   code LeaseTask runs): prompts of 4 candidates with hidden true scores, simulated raters ranking
   by truth + noise, every judgement leased from the board and recorded in a real PreferenceStore;
   certainty refits as the service does them. Informative order (random share 0) vs uniform random
   (random share 1), same judgement budget: consensus agreement with the hidden truth (share of
   candidate pairs the Bradley-Terry consensus orders like the truth; unjudged prompts count 1/2),
   and how many judgements random assignment needs to reach informative's accuracy.
2. Load: N concurrent raters (asyncio, one gRPC channel each, spread over --client-procs processes
   so that one client event loop is not the bottleneck it measures) lease and submit against one
   preference service process with a real broker (acks=all) for --load-seconds, from a pool of
   N x --tasks-per-rater tasks (large enough that the run is a steady state, not a start-up burst):
   p50/p99 latency of LeaseTask and
   SubmitRanking, double assignments (a group leased to two raters with overlap 1) and lost
   submissions (acknowledged but not in the service's store after it stopped). Once per --think-s
   value: 0 is a stress test (every rater leases again the moment its submission is acknowledged);
   a positive value is the mean of an exponential pause between a rater's acknowledgement and its
   next lease (people read and rank for seconds to minutes), with the raters' first leases spread
   over that mean, as a team signing in over a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preference_bench import (bench_broker, cpu_seconds, free_port, issue_tokens, preference_env,  # noqa: E402
                              wait_serving)

K = 4


# -- 1. informative vs random ----------------------------------------------------------------------

def simulate(strategy: str, n_prompts: int, budget: int, checkpoints: list[int], noise: float, seed: int,
             tmp: Path) -> dict[int, float]:
    from flywheel.preference.aggregation import FitOptions, consensus
    from flywheel.preference.engine import ConsensusEngine
    from flywheel.preference.store import PreferenceStore
    from flywheel.preference.tasks import TaskBoard, TaskDB
    from flywheel.v1 import common_pb2

    rng = np.random.default_rng(seed)
    truth = {f"p{p}-r{i}": float(x) for p in range(n_prompts) for i, x in enumerate(rng.normal(0, 1, K))}
    store = PreferenceStore(tmp / f"{strategy}-{seed}.sqlite")
    store.record_rollouts([common_pb2.Rollout(rollout_id=f"p{p}-r{i}", prompt_id=f"p{p}", response_text=f"{p}/{i}",
                                              policy_version="v1", raw_prompt=f"prompt {p}")
                           for p in range(n_prompts) for i in range(K)])
    options = FitOptions(prior_strength=0.5, reliability=False, reliability_prior_strength=4.0,
                         max_iterations=200, tolerance=1e-6)
    engine = ConsensusEngine(store, options)
    board = TaskBoard(store, TaskDB(tmp / f"{strategy}-{seed}-tasks.sqlite"), overlap=8, lease_s=600,
                      random_share=1.0 if strategy == "random" else 0.0, gold_rate=0.0, max_candidates=K,
                      seed=seed)
    board.refresh()
    raters = [f"rater-{i}" for i in range(40)]
    noisy = random.Random(seed)
    accuracy: dict[int, float] = {}
    done = 0
    while done < budget:
        rater = raters[done % len(raters)]
        lease, _ = board.lease(rater)
        if lease is None:
            break
        ids = list(lease.response_ids)
        scores = [truth[r] + noisy.gauss(0, noise) for r in ids]
        order = sorted(range(len(ids)), key=lambda i: -scores[i])
        ranks = [0] * len(ids)
        for pos, i in enumerate(order):
            ranks[i] = pos + 1
        event = common_pb2.PreferenceEvent(ranking=common_pb2.Ranking(
            event_id=uuid.uuid4().hex, rater_id=rater, prompt_id=lease.prompt_id, ranks=ranks,
            responses=[common_pb2.ResponseRef(response_id=r) for r in ids]))
        store.record_events([(event, None, None)])
        board.complete(lease.lease_id, rater, lease.prompt_id)
        done += 1
        if done % 20 == 0:  # the service refits answered prompts about every second
            certainty = {}
            for prompt_id in board.dirty_prompts():
                agg = engine.prompt(prompt_id)
                certainty[prompt_id] = [(r.response_id, r.score, r.stderr) for r in agg.responses]
            board.refresh(certainty)
        if done in checkpoints:
            fitted = engine.refresh()
            agree, pairs = 0.0, 0
            judged = set()
            for c in consensus(fitted.problem, fitted.result):
                judged.add(c.prompt_id)
                s = dict(zip(c.response_ids, c.scores))
                for i in range(K):
                    for j in range(i + 1, K):
                        a, b = f"{c.prompt_id}-r{i}", f"{c.prompt_id}-r{j}"
                        agree += 1.0 if (s[a] - s[b]) * (truth[a] - truth[b]) > 0 else 0.0
                        pairs += 1
            pairs_per_prompt = K * (K - 1) // 2
            unjudged = n_prompts - len(judged)
            accuracy[done] = (agree + 0.5 * unjudged * pairs_per_prompt) / (pairs + unjudged * pairs_per_prompt)
    store.close()
    return accuracy


def judgements_to_reach(curve: dict[int, float], target: float) -> float | None:
    """Budget at which `curve` first reaches `target` (linear interpolation between checkpoints)."""
    points = sorted(curve.items())
    for (b0, a0), (b1, a1) in zip(points, points[1:]):
        if a1 >= target:
            return b0 if a0 >= target else b0 + (b1 - b0) * (target - a0) / max(a1 - a0, 1e-12)
    return points[0][0] if points and points[0][1] >= target else None


def bench_assignment(args, tmp: Path) -> list[tuple[str, str, str]]:
    n = args.prompts
    checkpoints = [int(n * f) for f in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0)]
    curves = {s: [simulate(s, n, checkpoints[-1], checkpoints, args.noise, seed, tmp) for seed in range(args.seeds)]
              for s in ("informative", "random")}
    mean = {s: {b: float(np.mean([c[b] for c in cs if b in c])) for b in checkpoints} for s, cs in curves.items()}
    rows = []
    for budget in (int(n * 1.0), int(n * 2.0)):
        target = mean["informative"][budget]
        needed = judgements_to_reach(mean["random"], target)
        saving = f"{100 * (1 - budget / needed):.0f}% fewer judgements than random" if needed else \
            f"random never reaches it within {checkpoints[-1]} judgements"
        rows.append((f"informative, {budget} judgements: agreement with hidden truth", f"{target:.3f}",
                     f"{saving} (goal >= 30%)"))
        rows.append((f"baseline: random, {budget} judgements: agreement with hidden truth",
                     f"{mean['random'][budget]:.3f}",
                     f"random needs {needed:.0f} to reach {target:.3f}" if needed else "-"))
    return rows


# -- 2. a rating team at once ----------------------------------------------------------------------

async def rate_concurrently(target: str, tokens: dict[str, str], deadline_s: float, think_s: float = 0.0,
                            seed: int = 0) -> dict:
    from grpc import aio

    from flywheel.runtime.client import channel_options
    from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

    lease_ms: list[float] = []
    submit_ms: list[float] = []
    leased: list[tuple[str, str]] = []
    acked: list[str] = []
    stop_at = time.monotonic() + deadline_s

    rng = random.Random(seed)

    async def rater(rater_id: str, token: str) -> None:
        metadata = (("authorization", f"Bearer {token}"),)
        async with aio.insecure_channel(target, options=channel_options()) as ch:
            stub = preference_pb2_grpc.PreferenceServiceStub(ch)
            await ch.channel_ready()  # connection set-up is not a lease's latency
            if think_s > 0:
                await asyncio.sleep(rng.uniform(0, think_s))
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                task = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=metadata, timeout=60)
                lease_ms.append(1000 * (time.perf_counter() - t0))
                if not task.lease_id:
                    return
                leased.append((task.prompt_id, task.policy_version))
                ranking = common_pb2.Ranking(
                    event_id=uuid.uuid4().hex, prompt_id=task.prompt_id, lease_id=task.lease_id,
                    responses=[common_pb2.ResponseRef(response_id=c.response_id) for c in task.candidates],
                    ranks=list(range(1, len(task.candidates) + 1)))
                t0 = time.perf_counter()
                ack = await stub.SubmitRanking(ranking, metadata=metadata, timeout=60)
                submit_ms.append(1000 * (time.perf_counter() - t0))
                acked.append(ack.event_id)
                if think_s > 0:
                    await asyncio.sleep(rng.expovariate(1 / think_s))

    start = time.perf_counter()
    await asyncio.gather(*[rater(r, t) for r, t in tokens.items()])
    return {"lease_ms": lease_ms, "submit_ms": submit_ms, "leased": leased, "acked": acked,
            "elapsed": time.perf_counter() - start}


def rate_in_processes(target: str, tokens: dict[str, str], deadline_s: float, think_s: float, procs: int) -> dict:
    """`rate_concurrently` with the raters split over `procs` processes (spawned: no forked gRPC state)."""
    items = list(tokens.items())
    shards = [dict(items[i::procs]) for i in range(procs)]
    with ProcessPoolExecutor(max_workers=procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_rate_shard, [(target, shard, deadline_s, think_s, i) for i, shard in enumerate(shards)]))
    merged = {k: [x for part in parts for x in part[k]] for k in ("lease_ms", "submit_ms", "leased", "acked")}
    merged["elapsed"] = max(part["elapsed"] for part in parts)
    return merged


def _rate_shard(args: tuple) -> dict:
    return asyncio.run(rate_concurrently(*args))


def server_latency(metrics_port: int) -> dict[str, float]:
    """p99 upper bound (ms) per method from the service's grpc_server_handling_seconds histogram."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for method in ("LeaseTask", "SubmitRanking"):
        buckets = []
        for line in text.splitlines():
            if line.startswith("grpc_server_handling_seconds_bucket") and f'grpc_method="{method}"' in line:
                le = line.split('le="', 1)[1].split('"', 1)[0]
                buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
        buckets.sort()
        total = buckets[-1][1] if buckets else 0
        out[method] = next((1000 * le for le, n in buckets if n >= 0.99 * total), float("nan")) \
            if total else float("nan")
    return out


def bench_load(args, tmp: Path, think_s: float) -> list[tuple[str, str, str]]:
    from flywheel.bus import TypedProducer
    from flywheel.bus.topics import ROLLOUTS
    from flywheel.v1 import common_pb2

    home = tmp / f"home-think-{think_s:g}"
    with bench_broker(args, tmp / f"broker-think-{think_s:g}") as bootstrap:
        tokens = issue_tokens(home, [f"load-{i:03d}" for i in range(args.raters)])
        run = uuid.uuid4().hex[:8]
        version = f"load-{run}"
        groups = args.raters * args.tasks_per_rater
        producer = TypedProducer(bootstrap, client_id="tasks-bench")
        for p in range(groups):
            for i in range(K):
                producer.send(ROLLOUTS, common_pb2.Rollout(
                    rollout_id=f"{run}-{p}-{i}", prompt_id=f"{run}-{p}", raw_prompt=f"prompt {p}",
                    response_text=f"candidate {i} of prompt {p}", policy_version=version, candidate_index=i),
                    key=f"{run}-{p}")
        producer.flush()
        producer.close()
        port, metrics_port = free_port(), free_port()
        env = preference_env(bootstrap, home, port, FLYWHEEL_METRICS_PORT=str(metrics_port),
                             FLYWHEEL_PREFERENCE_TASK_OVERLAP="1", FLYWHEEL_PREFERENCE_TASK_SETTLE_S="0",
                             FLYWHEEL_PREFERENCE_TASK_GOLD_RATE="0")
        proc = subprocess.Popen([sys.executable, "-m", "flywheel.preference"], env=env)
        try:
            wait_serving(f"127.0.0.1:{port}", proc)
            db = home / "preference" / "store.sqlite"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # all rollouts consumed and the pool refreshed once more
                with sqlite3.connect(db) as c:
                    if c.execute("SELECT count(*) FROM responses WHERE policy_version = ?", (version,)).fetchone()[0] \
                            == groups * K:
                        break
                time.sleep(0.2)
            time.sleep(2.5)
            cpu0 = cpu_seconds(proc.pid)
            result = rate_in_processes(f"127.0.0.1:{port}", tokens, args.load_seconds, think_s, args.client_procs)
            server_cpu = (cpu_seconds(proc.pid) - cpu0) / result["elapsed"]
            server = server_latency(metrics_port)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        with sqlite3.connect(home / "preference" / "store.sqlite") as c:
            stored = {r[0] for r in c.execute("SELECT event_id FROM events")}
    mine = [k for k in result["leased"] if k[1] == version]
    doubles = len(mine) - len(set(mine))
    lost = sum(1 for e in result["acked"] if e not in stored)
    lease, submit = np.array(result["lease_ms"]), np.array(result["submit_ms"])
    n = len(submit)
    how = f"{args.raters} raters, think {think_s:g} s" if think_s else f"{args.raters} raters, no think time"
    return [
        (f"load ({how}): LeaseTask p50 / p99 (ms)",
         f"{np.percentile(lease, 50):.0f} / {np.percentile(lease, 99):.0f}", f"{len(lease)} leases (goal p99 <= 100)"),
        (f"load ({how}): SubmitRanking (acks=all) p50 / p99 (ms)",
         f"{np.percentile(submit, 50):.0f} / {np.percentile(submit, 99):.0f}",
         f"{n} submissions, {n / result['elapsed']:.0f}/s in {result['elapsed']:.0f} s (goal p99 <= 250)"),
        ("  service process CPU (cores busy)", f"{server_cpu:.2f}", f"of {os.cpu_count()}; clients and broker share them"),
        ("  server side (handler time, from /metrics buckets): LeaseTask p99 (ms)",
         f"<= {server['LeaseTask']:.0f}", "excludes the client process and queueing in the kernel"),
        ("  server side: SubmitRanking p99 (ms)", f"<= {server['SubmitRanking']:.0f}", "includes acks=all"),
        (f"load ({how}): double assignments / lost submissions", f"{doubles} / {lost}", "goal 0 / 0"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=300, help="Prompts in the assignment simulation.")
    parser.add_argument("--seeds", type=int, default=2, help="Simulation repeats averaged per strategy.")
    parser.add_argument("--noise", type=float, default=1.0, help="Rater noise (std of truth + noise).")
    parser.add_argument("--raters", type=int, default=200, help="Concurrent raters in the load test.")
    parser.add_argument("--tasks-per-rater", type=int, default=20, help="Tasks in the pool per rater.")
    parser.add_argument("--load-seconds", type=float, default=60.0,
                        help="Stop the load test after this long (or when the pool runs out).")
    parser.add_argument("--client-procs", type=int, default=2, help="Processes the raters are spread over.")
    parser.add_argument("--bootstrap", default=None, help="Use this Kafka broker instead of starting one.")
    parser.add_argument("--think-s", type=float, nargs="+", default=[0.0, 2.0],
                        help="Mean pause (s) between a rater's acknowledgement and next lease; one load run each.")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-assignment", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tasks-bench-"))
    rows: list[tuple[str, str, str]] = []
    try:
        if not args.skip_assignment:
            rows += bench_assignment(args, tmp)
        if not args.skip_load:
            for think_s in args.think_s:
                rows += bench_load(args, tmp, think_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure'.ljust(width)} | {'value':>13} | note")
    print(f"{'-' * width}-+-{'-' * 13}-+-{'-' * 40}")
    for name, value, note in rows:
        print(f"{name.ljust(width)} | {value:>13} | {note}")


if __name__ == "__main__":
    main()
