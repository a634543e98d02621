"""Simulated raters (VADER ground truth) and the token CLI, against the real service and broker."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from grpc import aio
from typer.testing import CliRunner

from flywheel.bus import TypedConsumer, TypedProducer
from flywheel.bus.topics import ROLLOUTS
from flywheel.preference.cli import app as cli_app
from flywheel.preference.settings import PreferenceSettings
from flywheel.preference.simulated_rater import (RaterClient, SimulatedRater, SimulatedRaterRunner,
                                                 competition_ranks, ground_truth, make_pool)
from flywheel.preference.validation import ranks_are_valid
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

from test_preference_service import start_service, wait_known  # noqa: E402  (tests/ is on sys.path)
from waiting import wait_until  # noqa: E402

TEXTS = ["What a wonderful, delightful idea, I love it!", "That sounds good.", "It is a table.",
         "This is bad and sad.", "Horrible, disgusting, the worst thing ever."]


def candidates(prompt_id: str, texts=TEXTS) -> list[common_pb2.Rollout]:
    return [common_pb2.Rollout(rollout_id=f"{prompt_id}-{i}", prompt_id=prompt_id, response_text=t, candidate_index=i,
                               raw_prompt=f"Tell me about {prompt_id}", policy_version="policy-0002",
                               sampling=common_pb2.SamplingParams(n=len(texts))) for i, t in enumerate(texts)]


def test_ground_truth_is_vader_and_raters_rank_by_it() -> None:
    truth = [ground_truth(t) for t in TEXTS]
    assert truth == sorted(truth, reverse=True) and truth[0] > 0.5 > -0.5 > truth[-1]
    cands = candidates("p")
    honest = SimulatedRater("h", noise=0.0).rate("p", "q", cands)
    assert list(honest.ranks) == [1, 2, 3, 4, 5]
    assert honest.rater_id == "h" and honest.responses[0].response_id == "p-0"
    assert honest.responses[0].policy_version == "policy-0002"
    assert honest.created_at.ToNanoseconds() < honest.submitted_at.ToNanoseconds()
    assert list(SimulatedRater("a", kind="adversarial", noise=0.0).rate("p", "q", cands).ranks) == [5, 4, 3, 2, 1]
    rnd = SimulatedRater("r", kind="random", seed=1)
    orders = {tuple(rnd.rate("p", "q", cands).ranks) for _ in range(20)}
    assert len(orders) > 5 and all(ranks_are_valid(list(o)) for o in orders)
    # deterministic event ids: same rater + prompt + candidates -> same id (retries are duplicates)
    assert honest.event_id == SimulatedRater("h", noise=0.5).rate("p", "q", list(reversed(cands))).event_id
    assert honest.event_id != SimulatedRater("h2").rate("p", "q", cands).event_id
    assert competition_ranks([0.9, 0.5, 0.48, 0.1], tie_threshold=0.05) == [1, 2, 2, 4]
    noisy = SimulatedRater("n", noise=5.0, seed=3)
    assert len({tuple(noisy.rate("p", "q", cands).ranks) for _ in range(20)}) > 1, "noise changes rankings"


def test_make_pool_fractions() -> None:
    pool = make_pool(9, adversarial_fraction=1 / 3, random_fraction=1 / 3)
    kinds = [r.kind for r in pool]
    assert kinds.count("adversarial") == 3 and kinds.count("random") == 3 and kinds.count("honest") == 3
    assert len({r.rater_id for r in pool}) == 9
    with pytest.raises(ValueError):
        make_pool(2, adversarial_fraction=0.6, random_fraction=0.6)


async def test_runner_rates_rollouts_and_consensus_follows_ground_truth(kafka_bootstrap, settings_factory, unique):
    settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                preference_refresh_interval_s=3600.0)
    pool = make_pool(6, adversarial_fraction=1 / 6, noise=0.05, prefix=f"sim-{unique}", seed=5)
    service, target, tokens = await start_service(settings, raters=[r.rater_id for r in pool])
    try:
        prompts = [f"sim-{unique}-{i}" for i in range(4)]
        rollouts = [r for p in prompts for r in candidates(p)]
        producer = TypedProducer(kafka_bootstrap, client_id="test")
        for r in rollouts:
            producer.send(ROLLOUTS, r, key=r.prompt_id)
        producer.flush()
        await wait_known(service, [r.rollout_id for r in rollouts])

        def run(group: str) -> SimulatedRaterRunner:
            clients = [(r, RaterClient(target, tokens[r.rater_id])) for r in pool]
            consumer = TypedConsumer(ROLLOUTS, bootstrap_servers=kafka_bootstrap, group_id=group,
                                     dead_letters=producer, max_poll_records=500)
            runner = SimulatedRaterRunner(consumer, clients, raters_per_prompt=5, max_wait_s=5.0,
                                          accept=lambda r: r.prompt_id.startswith(f"sim-{unique}-"))
            # other tests' rollouts may be on the topic too: run until ours are all rated

            def all_ours_rated() -> bool:
                runner.run_once()
                return runner.prompts_rated >= len(prompts)

            wait_until(all_ours_rated, 60, interval_s=0, what="our prompts rated")
            consumer.close()
            for _, c in clients:
                c.close()
            return runner

        first = await asyncio.to_thread(run, f"sim-{unique}")
        assert first.submitted == 4 * 5
        for p in prompts:
            assert service.store.count_events(prompt_id=p) == 5
        # a fresh consumer group sees the same rollouts again: every submission is a duplicate
        again = await asyncio.to_thread(run, f"sim-{unique}-again")
        assert again.duplicates == again.submitted == 4 * 5
        for p in prompts:
            assert service.store.count_events(prompt_id=p) == 5

        service.engine.refresh()
        async with aio.insecure_channel(target) as ch:
            stub = preference_pb2_grpc.PreferenceServiceStub(ch)
            metadata = (("authorization", f"Bearer {tokens[pool[0].rater_id]}"),)
            for p in prompts:
                agg = await stub.GetConsensus(preference_pb2.GetConsensusRequest(prompt_id=p), metadata=metadata)
                assert agg.responses[0].response_id == f"{p}-0", "the most positive response wins"
                assert agg.responses[-1].response_id == f"{p}-4"
        adversary = next(r.rater_id for r in pool if r.kind == "adversarial")
        assert service.engine.rater_weights[adversary] < 0 < min(
            w for r, w in service.engine.rater_weights.items() if r != adversary and r.startswith(f"sim-{unique}"))
        producer.close()
    finally:
        await service.runtime.stop(grace=0)


async def test_cli_issues_and_revokes_tokens(kafka_bootstrap, settings_factory, unique, tmp_path):
    settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                preference_allow_external_responses=True, preference_refresh_interval_s=3600.0)
    service, target, _ = await start_service(settings, raters=())
    db = str(settings.auth_db_path())
    try:
        runner = CliRunner()
        issued = runner.invoke(cli_app, ["issue-token", "--rater", "dana", "--db", db])
        assert issued.exit_code == 0, issued.output
        token = issued.output.strip()
        assert token.startswith("fwp_") and len(token) > 40
        assert token not in (tmp_path / "home" / "preference" / "auth.sqlite").read_bytes().decode("latin-1"), \
            "only the hash is stored"
        listed = runner.invoke(cli_app, ["list-tokens", "--db", db])
        assert "dana" in listed.output and "active" in listed.output
        demo = common_pb2.Demonstration(event_id=uuid.uuid4().hex, prompt_id=f"cli-{unique}", response_text="ok")
        metadata = (("authorization", f"Bearer {token}"),)
        async with aio.insecure_channel(target) as ch:
            stub = preference_pb2_grpc.PreferenceServiceStub(ch)
            assert not (await stub.SubmitDemonstration(demo, metadata=metadata)).duplicate
            revoked = runner.invoke(cli_app, ["revoke-token", "--rater", "dana", "--db", db])
            assert revoked.exit_code == 0 and "revoked 1" in revoked.output
            with pytest.raises(aio.AioRpcError) as err:
                await stub.SubmitDemonstration(demo, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert runner.invoke(cli_app, ["revoke-token", "--rater", "dana", "--db", db]).exit_code == 1
    finally:
        await service.runtime.stop(grace=0)


async def test_runner_retries_rollouts_the_service_has_not_seen_yet(kafka_bootstrap, settings_factory, unique):
    """The runner may read a rollout before the service did: 'unknown response id' is retried, not fatal."""
    settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                preference_refresh_interval_s=3600.0)
    rater = SimulatedRater(f"late-{unique}", noise=0.0)
    service, target, tokens = await start_service(settings, raters=[rater.rater_id])
    try:
        rollouts = candidates(f"late-{unique}")
        client = RaterClient(target, tokens[rater.rater_id])
        runner = SimulatedRaterRunner(None, [(rater, client)], raters_per_prompt=1, retry_for_s=30)
        ranking = rater.rate(rollouts[0].prompt_id, "q", rollouts)

        def publish_later():
            time.sleep(1.5)
            p = TypedProducer(kafka_bootstrap, client_id="test-late")
            for r in rollouts:
                p.send(ROLLOUTS, r, key=r.prompt_id)
            p.flush()
            p.close()

        publisher = asyncio.get_running_loop().run_in_executor(None, publish_later)
        ack = await asyncio.to_thread(runner._submit, client, ranking)
        await publisher
        assert not ack.duplicate
        assert service.store.count_events(prompt_id=rollouts[0].prompt_id) == 1
        with pytest.raises(grpc.RpcError) as err:  # a real validation error is not retried
            bad = rater.rate(rollouts[0].prompt_id, "q", rollouts)
            bad.ranks[:] = [1, 1, 1, 1, 9]
            await asyncio.to_thread(runner._submit, client, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.close()
    finally:
        await service.runtime.stop(grace=0)
