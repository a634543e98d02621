"""Task assignment over gRPC: real preference service on loopback, real broker, real SQLite.

The rollouts topic is shared by the whole session, so each test names its policy versions uniquely:
the newest version (first seen last) is always this test's, and it is leased first.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from grpc import aio
from test_preference_service import auth, publish_rollouts, rollouts_for, start_service, wait_known
from waiting import wait_until_async

from flywheel.preference.export import read_pairs
from flywheel.preference.settings import PreferenceSettings
from flywheel.preference.tasks import TASKS
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

pytestmark = pytest.mark.kafka

RATERS = tuple(f"r{i}" for i in range(12))


@pytest.fixture
async def service_factory(kafka_bootstrap, settings_factory):
    started = []

    async def make(**overrides):
        base = dict(kafka_bootstrap_servers=kafka_bootstrap, preference_refresh_interval_s=3600.0,
                    preference_task_refresh_s=0.1, preference_task_settle_s=0.0, preference_ui_enabled=False,
                    preference_task_random_share=0.0,
                    preference_task_gold_rate=0.0)
        base.update(overrides)
        settings = settings_factory(PreferenceSettings, **base)
        service, target, tokens = await start_service(settings, raters=RATERS)
        started.append(service)
        return service, target, tokens

    yield make
    for service in started:
        await service.runtime.stop(grace=0)


async def publish_groups(service, kafka_bootstrap, unique, prompts: int, version: str, n: int = 4):
    groups = [rollouts_for(f"t{i}-{unique}", n=n, version=version) for i in range(prompts)]
    for g in groups:  # rollout ids are per prompt; make them per version too
        for r in g:
            r.rollout_id = f"{r.rollout_id}-{version}"
    flat = [r for g in groups for r in g]
    publish_rollouts(kafka_bootstrap, flat)
    await wait_known(service, [r.rollout_id for r in flat])
    await wait_until_async(lambda: all((g[0].prompt_id, version) in service.board._groups for g in groups),
                           what="task pool refreshed")
    return groups


def ranking_for(task: preference_pb2.Task, ranks=None, event_id=None) -> common_pb2.Ranking:
    return common_pb2.Ranking(event_id=event_id or uuid.uuid4().hex, prompt_id=task.prompt_id,
                              responses=[common_pb2.ResponseRef(response_id=c.response_id) for c in task.candidates],
                              ranks=ranks or list(range(1, len(task.candidates) + 1)), lease_id=task.lease_id)


def key(task: preference_pb2.Task) -> tuple[str, str]:
    return task.prompt_id, task.policy_version


def count(outcome: str) -> float:
    return TASKS.labels(outcome)._value.get()


async def test_newest_version_first_overlap_and_never_twice(service_factory, kafka_bootstrap, unique):
    service, target, tokens = await service_factory(preference_task_overlap=2)
    old = await publish_groups(service, kafka_bootstrap, unique, 2, f"old-{unique}")
    new = await publish_groups(service, kafka_bootstrap, unique, 1, f"new-{unique}")
    async with aio.insecure_channel(target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        first = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r0"]))
        assert first.lease_id and first.prompt_id == new[0][0].prompt_id
        assert first.policy_version == f"new-{unique}" and first.kind == preference_pb2.TASK_KIND_RANK
        assert [c.text for c in first.candidates] == [r.response_text for r in new[0]]
        assert first.lease_expires_at.ToNanoseconds() / 1e9 > time.time()
        completed = count("completed")
        ack = await stub.SubmitRanking(ranking_for(first), metadata=auth(tokens["r0"]))
        assert not ack.duplicate and count("completed") == completed + 1
        # r0 never gets that group again; the next newest-version slot goes to r1, then it is full
        again = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r0"]))
        assert key(again) != key(first)
        second = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r1"]))
        assert key(second) == key(first)
        third = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r2"]))
        assert key(third) != key(first)  # overlap 2: one answer + one live lease
        # a lease is its rater's, for its prompt
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitRanking(ranking_for(second), metadata=auth(tokens["r2"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        wrong = common_pb2.Ranking(event_id=uuid.uuid4().hex, prompt_id=old[1][0].prompt_id, ranks=[1, 2],
                                   responses=[common_pb2.ResponseRef(response_id=r.rollout_id) for r in old[1][:2]],
                                   lease_id=second.lease_id)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitRanking(wrong, metadata=auth(tokens["r1"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "lease_id" in err.value.details()
    # the answered group survives a restart (derived from the store): r0 is not offered it again
    await service.runtime.stop(grace=0)
    service, target, _ = await service_factory(preference_task_overlap=2, home=service.settings.home)
    await wait_until_async(lambda: (first.prompt_id, f"new-{unique}") in service.board._groups, what="pool rebuilt")
    offered = set()
    while True:
        lease, _ = service.board.lease("r0")
        if lease is None:
            break
        offered.add(lease.key)
    assert (first.prompt_id, f"new-{unique}") not in offered


async def test_concurrent_raters_never_share_a_slot(service_factory, kafka_bootstrap, unique):
    service, target, tokens = await service_factory(preference_task_overlap=1)
    groups = await publish_groups(service, kafka_bootstrap, unique, 5, f"v-{unique}", n=3)
    mine = {g[0].prompt_id for g in groups}
    async with aio.insecure_channel(target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        tasks = await asyncio.gather(*[stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens[r]))
                                       for r in RATERS])
    leased = [(t.prompt_id, t.policy_version) for t in tasks if t.lease_id]
    assert len(leased) == len(set(leased)), "a slot was leased twice"
    assert {p for p, _ in leased} >= mine  # this test's groups (the newest) were all handed out


async def test_expired_lease_returns_to_pool_and_late_submission_counts(service_factory, kafka_bootstrap, unique):
    service, target, tokens = await service_factory(preference_task_overlap=1, preference_task_lease_s=0.5)
    [group] = await publish_groups(service, kafka_bootstrap, unique, 1, f"v-{unique}")
    async with aio.insecure_channel(target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        held = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r0"]))
        assert held.prompt_id == group[0].prompt_id
        blocked = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r1"]))
        assert blocked.prompt_id != held.prompt_id
        if blocked.lease_id:
            await stub.ReleaseTask(preference_pb2.ReleaseTaskRequest(lease_id=blocked.lease_id),
                                   metadata=auth(tokens["r1"]))

        async def taken_over():
            t = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r2"]))
            if t.lease_id and t.prompt_id != held.prompt_id:
                await stub.ReleaseTask(preference_pb2.ReleaseTaskRequest(lease_id=t.lease_id),
                                       metadata=auth(tokens["r2"]))
                return None
            return t if t.lease_id else None

        late, expired = count("completed_late"), count("expired")
        other = await wait_until_async(taken_over, timeout_s=10, what="the expired task back in the pool")
        assert other.prompt_id == held.prompt_id and count("expired") == expired + 1
        ack = await stub.SubmitRanking(ranking_for(held), metadata=auth(tokens["r0"]))  # after expiry
        assert not ack.duplicate and count("completed_late") == late + 1
        assert service.store.events([ack.event_id])  # nothing the rater did is thrown away
        assert service.board.counts["r0"].late == 1


async def test_flags_release_and_gold(service_factory, kafka_bootstrap, unique, tmp_path):
    service, target, tokens = await service_factory(preference_task_overlap=3, preference_task_gold_rate=1.0)
    groups = await publish_groups(service, kafka_bootstrap, unique, 2, f"v-{unique}")
    gold, plain = groups
    async with aio.insecure_channel(target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        admin = auth(tokens["admin"])
        with pytest.raises(aio.AioRpcError) as err:
            await stub.MarkGold(preference_pb2.MarkGoldRequest(prompt_id=gold[0].prompt_id),
                                metadata=auth(tokens["r0"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(aio.AioRpcError) as err:
            await stub.MarkGold(preference_pb2.MarkGoldRequest(prompt_id=gold[0].prompt_id,
                                                               response_ids=[r.rollout_id for r in gold],
                                                               ranks=[1, 2, 2, 5]), metadata=admin)
        assert "invalid ranks:" in err.value.details()
        await stub.MarkGold(preference_pb2.MarkGoldRequest(prompt_id=gold[0].prompt_id,
                                                           response_ids=[r.rollout_id for r in gold],
                                                           ranks=[1, 2, 3, 4]), metadata=admin)
        await wait_until_async(lambda: (gold[0].prompt_id, "gold") in service.board._groups, what="gold in pool")
        # gold rate 1: every rater's first task is the gold one; r0 agrees, r1 reverses
        for rater, ranks in (("r0", [1, 2, 3, 4]), ("r1", [4, 3, 2, 1])):
            t = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens[rater]))
            assert t.prompt_id == gold[0].prompt_id
            order = {c.response_id: i for i, c in enumerate(t.candidates)}
            by_gold = {r.rollout_id: k for r, k in zip(gold, ranks)}
            await stub.SubmitRanking(ranking_for(t, ranks=[by_gold[c] for c in order]), metadata=auth(tokens[rater]))
        acc = await stub.GetGoldAccuracy(preference_pb2.GetGoldAccuracyRequest(), metadata=admin)
        assert {(g.rater_id, g.correct, g.total) for g in acc.raters} == {("r0", 6, 6), ("r1", 0, 6)}
        # flag a candidate of the plain task: left out of later tasks and of the export
        t = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r2"]))
        assert t.prompt_id == gold[0].prompt_id  # gold first; answer it, then the plain task
        await stub.SubmitRanking(ranking_for(t), metadata=auth(tokens["r2"]))
        t = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r2"]))
        assert t.prompt_id == plain[0].prompt_id
        bad = t.candidates[0].response_id
        with pytest.raises(aio.AioRpcError) as err:
            await stub.FlagResponse(preference_pb2.FlagResponseRequest(lease_id=t.lease_id, response_id=bad),
                                    metadata=auth(tokens["r2"]))
        assert "invalid reason:" in err.value.details()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.FlagResponse(preference_pb2.FlagResponseRequest(
                lease_id=t.lease_id, response_id=bad, reason=preference_pb2.FLAG_REASON_UNSAFE),
                metadata=auth(tokens["r3"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await stub.FlagResponse(preference_pb2.FlagResponseRequest(
            lease_id=t.lease_id, response_id=bad, reason=preference_pb2.FLAG_REASON_UNSAFE, note="harmful"),
            metadata=auth(tokens["r2"]))
        await stub.SubmitRanking(ranking_for(t), metadata=auth(tokens["r2"]))  # ranked before they flagged it
        released = count("released")
        t4 = await stub.LeaseTask(preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r4"]))
        t4 = t4 if t4.prompt_id == plain[0].prompt_id else await stub.LeaseTask(
            preference_pb2.LeaseTaskRequest(), metadata=auth(tokens["r4"]))
        assert t4.prompt_id == plain[0].prompt_id and bad not in {c.response_id for c in t4.candidates}
        await stub.ReleaseTask(preference_pb2.ReleaseTaskRequest(lease_id=t4.lease_id), metadata=auth(tokens["r4"]))
        assert count("released") == released + 1
        export = await stub.ExportDataset(preference_pb2.ExportDatasetRequest(), metadata=admin)  # default dir
        rows = [r for r in read_pairs(export.pairs_uri) if r["prompt_id"] == plain[0].prompt_id]
        assert rows and not [r for r in rows if bad in (r["chosen_id"], r["rejected_id"])]


async def test_simulated_raters_work_through_leases(service_factory, kafka_bootstrap, unique):
    from flywheel.preference.simulated_rater import LeasingRaterRunner, RaterClient, SimulatedRater

    service, target, tokens = await service_factory(preference_task_overlap=2)
    groups = await publish_groups(service, kafka_bootstrap, unique, 3, f"v-{unique}")
    clients = [(SimulatedRater(r, noise=0.0), RaterClient(target, tokens[r])) for r in ("r0", "r1", "r2")]
    runner = LeasingRaterRunner(clients, raters_per_prompt=2)

    def ours_rated() -> bool:  # the shared topic's older groups may be leased too (its 3 partitions are
        return all(len(_event_ids(service, g[0].prompt_id)) >= 2 for g in groups)  # read in any order)

    try:
        deadline = time.monotonic() + 60
        while not ours_rated():
            assert time.monotonic() < deadline, "the raters did not answer this test's groups within 60 s"
            await asyncio.to_thread(runner.run_once)
    finally:
        for _, c in clients:
            c.close()
    assert runner.prompts_rated >= 3 and runner.submitted >= 6
    for g in groups:
        raters = [e.rater_id for e in service.store.events(
            [e for e in _event_ids(service, g[0].prompt_id)]).values()]
        assert sorted(raters) == sorted(set(raters)) and len(raters) == 2  # two raters, never one twice


def _event_ids(service, prompt_id: str) -> list[str]:
    rows = service.store._reader().execute("SELECT event_id FROM events WHERE prompt_id = ?", (prompt_id,))
    return [r[0] for r in rows]
