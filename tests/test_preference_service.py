"""The preference service end to end: real gRPC server on loopback, real Kafka broker, real SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from pathlib import Path

import grpc
import pytest
from grpc import aio
from kafka import KafkaConsumer

from flywheel.bus import TypedProducer
from flywheel.bus.topics import AGGREGATED_PREFERENCES, PREFERENCES, ROLLOUTS
from flywheel.preference.app import build_service
from flywheel.preference.auth import SCOPE_ADMIN, TokenStore
from flywheel.preference.export import read_pairs
from flywheel.preference.settings import PreferenceSettings
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc
from waiting import wait_until, wait_until_async


def rollouts_for(prompt_id: str, n: int = 4, version: str = "policy-0001") -> list[common_pb2.Rollout]:
    texts = ["I love this, wonderful!", "It is fine.", "This is bad.", "Terrible, awful, I hate it."]
    return [common_pb2.Rollout(rollout_id=f"{prompt_id}-r{i}", prompt_id=prompt_id, raw_prompt=f"prompt {prompt_id}",
                               prompt_text=f"<user>prompt {prompt_id}", response_text=texts[i % len(texts)] + f" #{i}",
                               policy_version=version, candidate_index=i) for i in range(n)]


def ref(r: common_pb2.Rollout, with_text: bool = False) -> common_pb2.ResponseRef:
    return common_pb2.ResponseRef(response_id=r.rollout_id, text=r.response_text if with_text else "")


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Harness:
    def __init__(self, service, target: str, tokens: dict[str, str]) -> None:
        self.service = service
        self.target = target
        self.tokens = tokens


async def start_service(settings: PreferenceSettings, raters=("alice", "bob", "carol")) -> tuple:
    tokens = TokenStore(settings.auth_db_path())
    issued = {r: tokens.issue(r) for r in raters}
    issued["admin"] = tokens.issue("admin", scope=SCOPE_ADMIN)
    tokens.close()
    service = build_service(settings)
    await service.runtime.start()
    await wait_until_async(lambda: service.servicer.ready, 60, what="the store to catch up")
    return service, f"127.0.0.1:{service.runtime.grpc_port}", issued


async def wait_known(service, response_ids, timeout_s: float = 30.0) -> None:
    await wait_until_async(lambda: len(service.store.responses(list(response_ids))) == len(set(response_ids)),
                           timeout_s, what="the rollouts to reach the store")


def publish_rollouts(bootstrap: str, rollouts) -> None:
    p = TypedProducer(bootstrap, client_id="test-rollouts")
    for r in rollouts:
        p.send(ROLLOUTS, r, key=r.prompt_id)
    p.flush()
    p.close()


def topic_events(bootstrap: str, topic: str, predicate, expect: int, timeout_s: float = 15.0) -> list:
    """Records on `topic` matching `predicate(value_bytes)`; reads until `expect` found or the timeout."""
    c = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                      group_id=None)
    got = []

    def read() -> int:
        for records in c.poll(timeout_ms=200).values():
            got.extend(r for r in records if predicate(r.value))
        return len(got)

    try:
        wait_until(lambda: read() >= expect, timeout_s, interval_s=0, what=f"{expect} matching records on {topic}")
        # keep reading a little: more than expected is a failure (the usual outcome is none within 1 s)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: read() > expect, 1.0, interval_s=0)
        return got
    finally:
        c.close()


@pytest.fixture
async def harness(kafka_bootstrap, settings_factory, tmp_path):
    settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                preference_refresh_interval_s=3600.0,
                                preference_export_roots=[tmp_path / "datasets", tmp_path / "home"])
    service, target, tokens = await start_service(settings)
    yield Harness(service, target, tokens)
    await service.runtime.stop(grace=0)


@pytest.fixture
async def prompt(harness, kafka_bootstrap, unique):
    rollouts = rollouts_for(f"p-{unique}")
    publish_rollouts(kafka_bootstrap, rollouts)
    await wait_known(harness.service, [r.rollout_id for r in rollouts])
    return rollouts


def ranking(rollouts, ranks, rater="alice", event_id=None) -> common_pb2.Ranking:
    return common_pb2.Ranking(event_id=uuid.uuid4().hex if event_id is None else event_id, rater_id=rater, prompt_id=rollouts[0].prompt_id,
                              responses=[ref(r) for r in rollouts], ranks=ranks, lead_time_ms=1200)


async def test_auth_refuses_missing_wrong_revoked_token_and_impersonation(harness, prompt) -> None:
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        req = ranking(prompt, [1, 2, 3, 4])
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitRanking(req)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for bad in (auth("fwp_not-a-real-token"), (("authorization", "Basic abc"),), (("authorization", "Bearer "),)):
            with pytest.raises(aio.AioRpcError) as err:
                await stub.SubmitRanking(req, metadata=bad)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, bad
        # bob's token cannot submit alice's judgement
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitRanking(req, metadata=auth(harness.tokens["bob"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "rater_id" in err.value.details()
        # a rater may not export datasets
        with pytest.raises(aio.AioRpcError) as err:
            await stub.ExportDataset(preference_pb2.ExportDatasetRequest(), metadata=auth(harness.tokens["bob"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # alice's own token works; an empty rater_id is filled in from the token
        ack = await stub.SubmitRanking(req, metadata=auth(harness.tokens["alice"]))
        assert not ack.duplicate
        anon = ranking(prompt, [2, 1, 3, 4], rater="")
        await stub.SubmitRanking(anon, metadata=auth(harness.tokens["carol"]))
        assert harness.service.store.events([anon.event_id])[anon.event_id].rater_id == "carol"
        # revoked tokens stop working immediately
        tokens = TokenStore(harness.service.settings.auth_db_path())
        assert tokens.revoke_rater("alice") == 1
        tokens.close()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitRanking(ranking(prompt, [1, 2, 3, 4]), metadata=auth(harness.tokens["alice"]))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert harness.service.store.count_events(prompt_id=prompt[0].prompt_id) == 2


async def test_validation_names_the_field(harness, prompt, kafka_bootstrap) -> None:
    token = auth(harness.tokens["alice"])
    cases = [
        (ranking(prompt, [1, 2, 2, 4, 5]), "ranks"),
        (ranking(prompt, [1, 3, 3, 5]), "ranks"),       # neither dense nor competition
        (ranking(prompt, [2, 2, 3, 4]), "ranks"),       # no first place
        (ranking(prompt[:1], [1]), "responses"),
        (ranking(prompt, [1, 2, 3, 4], event_id=""), "event_id"),
    ]
    unknown = ranking(prompt, [1, 2, 3, 4])
    unknown.responses[2].response_id = "no-such-rollout"
    cases.append((unknown, "responses[2].response_id"))
    dup = ranking(prompt, [1, 2, 3, 4])
    dup.responses[3].response_id = dup.responses[0].response_id
    cases.append((dup, "responses"))
    wrong_text = ranking(prompt, [1, 2, 3, 4])
    wrong_text.responses[1].text = "not what the policy wrote"
    cases.append((wrong_text, "responses[1].text"))
    big = ranking(prompt, [1, 2, 3, 4])
    big.prompt_text = "x" * (harness.service.settings.preference_max_text_chars + 1)
    cases.append((big, "prompt_text"))
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        for req, field in cases:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.SubmitRanking(req, metadata=token)
                pytest.fail(f"{field}: invalid ranking accepted")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert f"invalid {field}:" in err.value.details(), (field, err.value.details())
        comparison = common_pb2.Comparison(event_id="c-" + uuid.uuid4().hex, prompt_id=prompt[0].prompt_id,
                                           response_a=ref(prompt[0]), response_b=ref(prompt[1]))
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitComparison(comparison, metadata=token)
        assert "invalid choice:" in err.value.details()
        comparison.choice = common_pb2.CHOICE_B
        comparison.strength = 1.5
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitComparison(comparison, metadata=token)
        assert "invalid strength:" in err.value.details()
        other = rollouts_for("other-" + prompt[0].prompt_id)
        publish_rollouts(kafka_bootstrap, other)
        await wait_known(harness.service, [r.rollout_id for r in other])
        comparison.strength = 0.5
        comparison.response_b.CopyFrom(ref(other[0]))
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitComparison(comparison, metadata=token)
        assert "invalid response_b.response_id:" in err.value.details()
        assert "belongs to prompt" in err.value.details()
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitDemonstration(common_pb2.Demonstration(event_id="d1", prompt_id="p"), metadata=token)
        assert "invalid response_text:" in err.value.details()
    assert harness.service.store.count_events(prompt_id=prompt[0].prompt_id) == 0, "nothing invalid is stored"


async def test_hostile_timestamps_uris_and_ids_are_refused_cleanly(harness, prompt, tmp_path) -> None:
    """Out-of-range timestamps, unsafe export URIs and megabyte ids: never INTERNAL (findings 1, 5)."""
    token = auth(harness.tokens["alice"])
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        for field, seconds, nanos in (("submitted_at", 2**62, 0), ("submitted_at", -2**62, 0),
                                      ("submitted_at", 253402300800, 0), ("submitted_at", 0, -5),
                                      ("submitted_at", 0, 2_000_000_000), ("created_at", -2**62, 0),
                                      ("created_at", 1, 2_000_000_000)):
            req = ranking(prompt, [1, 2, 3, 4])
            getattr(req, field).seconds, getattr(req, field).nanos = seconds, nanos
            if field == "created_at":
                req.submitted_at.GetCurrentTime()
            with pytest.raises(aio.AioRpcError) as err:
                await stub.SubmitRanking(req, metadata=token)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, seconds, nanos, err.value.details())
            assert f"invalid {field}." in err.value.details()

        admin = auth(harness.tokens["admin"])
        (tmp_path / "datasets").mkdir()
        (tmp_path / "datasets" / "a-file").write_text("x")
        cases = [("bogusproto://x", grpc.StatusCode.PERMISSION_DENIED),
                 ("http://127.0.0.1:9/x", grpc.StatusCode.PERMISSION_DENIED),
                 ("/proc/self/unwritable", grpc.StatusCode.PERMISSION_DENIED),
                 (str(tmp_path / "datasets" / "x" / "../../../escape"), grpc.StatusCode.PERMISSION_DENIED),
                 (str(tmp_path / "datasets") + "/" + "a" * 5000, grpc.StatusCode.INVALID_ARGUMENT),
                 (str(tmp_path / "datasets" / ("b" * 300)), grpc.StatusCode.INVALID_ARGUMENT),
                 (str(tmp_path / "datasets" / "a-file" / "below"), grpc.StatusCode.FAILED_PRECONDITION)]
        for uri, code in cases:
            with pytest.raises(aio.AioRpcError) as err:
                await stub.ExportDataset(preference_pb2.ExportDatasetRequest(output_uri=uri), metadata=admin)
            assert err.value.code() == code, (uri[:80], err.value.details())
            assert "output_uri" in err.value.details()
        assert not (tmp_path / "escape").exists()

        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetConsensus(preference_pb2.GetConsensusRequest(prompt_id="i" * 2_000_000), metadata=token)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert len(err.value.details()) < 1100


async def test_events_are_published_with_lineage_and_duplicates_counted_once(harness, prompt, kafka_bootstrap):
    token = auth(harness.tokens["alice"])
    req = ranking(prompt, [2, 1, 3, 3])
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        first = await stub.SubmitRanking(req, metadata=token)
        again = await stub.SubmitRanking(req, metadata=token)
        # concurrent retries of one new event: exactly one is produced
        racing = ranking(prompt, [1, 2, 3, 4])
        acks = await asyncio.gather(*[stub.SubmitRanking(racing, metadata=token) for _ in range(5)])
        # reusing an id for a different event is refused
        clash = ranking(prompt, [1, 2, 3, 4], event_id=req.event_id)
        clash.prompt_id = "another"
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitRanking(clash, metadata=token)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (first.duplicate, again.duplicate) == (False, True)
    assert sorted(a.duplicate for a in acks) == [False, True, True, True, True]
    for event_id in (req.event_id, racing.event_id):
        found = topic_events(kafka_bootstrap, PREFERENCES.name, lambda v, e=event_id: e.encode() in v, 1)
        assert len(found) == 1, f"{event_id} must be on the topic exactly once"
    record = topic_events(kafka_bootstrap, PREFERENCES.name, lambda v: req.event_id.encode() in v, 1)[0]
    assert record.key.decode() == prompt[0].prompt_id
    event = common_pb2.PreferenceEvent.FromString(record.value)
    assert event.ranking.rater_id == "alice"
    assert event.ranking.prompt_text == "prompt " + prompt[0].prompt_id, "prompt text filled from the rollouts"
    assert [r.text for r in event.ranking.responses] == [r.response_text for r in prompt]
    assert {r.policy_version for r in event.ranking.responses} == {"policy-0001"}
    assert event.ranking.HasField("submitted_at")
    assert harness.service.store.count_events(prompt_id=prompt[0].prompt_id) == 2


async def test_bulk_stream_consensus_and_export(harness, prompt, tmp_path, kafka_bootstrap):
    pid = prompt[0].prompt_id
    events = []
    # three raters agree r0 > r1 > r2 > r3 (carol sees r2 and r3 as a tie), plus comparisons and a demonstration
    for rater, ranks in (("alice", [1, 2, 3, 4]), ("bob", [1, 2, 3, 4]), ("carol", [1, 2, 3, 3])):
        events.append((rater, common_pb2.PreferenceEvent(ranking=ranking(prompt, ranks, rater=rater))))
    events.append(("alice", common_pb2.PreferenceEvent(comparison=common_pb2.Comparison(
        event_id=uuid.uuid4().hex, rater_id="alice", prompt_id=pid, response_a=ref(prompt[1]),
        response_b=ref(prompt[3]), choice=common_pb2.CHOICE_A, strength=0.8))))
    events.append(("bob", common_pb2.PreferenceEvent(demonstration=common_pb2.Demonstration(
        event_id=uuid.uuid4().hex, rater_id="bob", prompt_id=pid, response_text="A careful human answer."))))
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        total = {"accepted": 0, "duplicates": 0}
        for rater in ("alice", "bob", "carol"):
            mine = [e for r, e in events if r == rater]

            async def stream(items=mine):
                for e in items + items[:1]:  # the first event twice: counted once
                    yield e

            ack = await stub.SubmitBulk(stream(), metadata=auth(harness.tokens[rater]))
            total["accepted"] += ack.accepted
            total["duplicates"] += ack.duplicates
            assert len(ack.event_ids) == len(mine) + 1
        assert total == {"accepted": len(events), "duplicates": 3}

        # a bulk stream with one impersonated event is refused
        async def bad():
            yield common_pb2.PreferenceEvent(ranking=ranking(prompt, [1, 2, 3, 4], rater="bob"))

        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitBulk(bad(), metadata=auth(harness.tokens["alice"]))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "events[0].ranking.rater_id" in err.value.details()

        consensus = await stub.GetConsensus(preference_pb2.GetConsensusRequest(prompt_id=pid),
                                            metadata=auth(harness.tokens["carol"]))
        assert [r.response_id for r in consensus.responses] == [r.rollout_id for r in prompt]
        assert consensus.responses[0].text == prompt[0].response_text
        assert all(r.stderr > 0 for r in consensus.responses)
        assert list(consensus.rater_ids) == ["alice", "bob", "carol"]
        assert consensus.num_judgements == 3 * 6 + 1
        assert 0 < consensus.confidence <= 1
        assert consensus.pairs[0].chosen_id == prompt[0].rollout_id and consensus.pairs[0].margin > 0
        with pytest.raises(aio.AioRpcError) as err:
            await stub.GetConsensus(preference_pb2.GetConsensusRequest(prompt_id="nobody-judged-this"),
                                    metadata=auth(harness.tokens["carol"]))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        admin = auth(harness.tokens["admin"])
        out = tmp_path / "datasets"
        jsonl = await stub.ExportDataset(preference_pb2.ExportDatasetRequest(
            format=preference_pb2.DATASET_FORMAT_JSONL, output_uri=str(out), publish=True), metadata=admin)
        rows = [r for r in read_pairs(jsonl.pairs_uri) if r["prompt_id"] == pid]
        assert len(rows) == 6
        # a threshold between this prompt's smallest and largest margin must drop some of its pairs
        # (the store also holds other tests' prompts, so count this prompt's rows only)
        cut = (min(r["margin"] for r in rows) + max(r["margin"] for r in rows)) / 2
        parquet = await stub.ExportDataset(preference_pb2.ExportDatasetRequest(
            format=preference_pb2.DATASET_FORMAT_PARQUET, output_uri=str(out), min_margin=cut), metadata=admin)
    assert jsonl.dataset_version == parquet.dataset_version
    assert set(rows[0]) == {f.name for f in common_pb2.PreferencePair.DESCRIPTOR.fields}
    best = max(rows, key=lambda r: r["margin"])
    assert (best["chosen_id"], best["rejected_id"]) == (prompt[0].rollout_id, prompt[3].rollout_id)
    assert best["prompt_text"] == "prompt " + pid and best["chosen_text"] == prompt[0].response_text
    pq_rows = read_pairs(parquet.pairs_uri)
    assert pq_rows and all(r["margin"] >= cut for r in pq_rows)
    assert 0 < len([r for r in pq_rows if r["prompt_id"] == pid]) < len(rows)
    demos = [json.loads(line) for line in Path(jsonl.demonstrations_uri).read_text().splitlines()]
    demo = next(d for d in demos if d["prompt_id"] == pid)
    assert demo["response_text"] == "A careful human answer." and demo["rater_id"] == "bob"
    assert set(demo) == {"prompt_id", "prompt_text", "response_text", "rater_id", "event_id"}
    assert demo["prompt_text"] == "prompt " + pid
    published = topic_events(kafka_bootstrap, AGGREGATED_PREFERENCES.name, lambda v: pid.encode() in v, 1)
    agg = common_pb2.AggregatedPreference.FromString(published[-1].value)
    assert agg.dataset_version == jsonl.dataset_version
    assert agg.responses[0].response_id == prompt[0].rollout_id


async def test_store_is_rebuilt_from_the_topic_on_a_fresh_start(harness, prompt, settings_factory, kafka_bootstrap,
                                                                tmp_path):
    token = auth(harness.tokens["alice"])
    reqs = [ranking(prompt, [1, 2, 3, 4]), ranking(prompt, [1, 3, 2, 4])]
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        for r in reqs:
            await stub.SubmitRanking(r, metadata=token)
    before = harness.service.store.judgements(prompt[0].prompt_id)
    fresh = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                             preference_store_path=tmp_path / "fresh" / "store.sqlite",
                             preference_auth_db_path=harness.service.settings.auth_db_path(),
                             preference_refresh_interval_s=3600.0)
    service, target, _ = await start_service(fresh, raters=())
    try:
        after = service.store.judgements(prompt[0].prompt_id)
        assert sorted(zip(after.winner_id, after.loser_id, after.rater_id)) == \
            sorted(zip(before.winner_id, before.loser_id, before.rater_id))
        assert set(service.store.events([r.event_id for r in reqs])) == {r.event_id for r in reqs}
        assert service.store.responses([prompt[0].rollout_id]), "rollouts are replayed too"
        async with aio.insecure_channel(target) as ch:  # and a retry against the rebuilt store is a duplicate
            ack = await preference_pb2_grpc.PreferenceServiceStub(ch).SubmitRanking(reqs[0], metadata=token)
        assert ack.duplicate
    finally:
        await service.runtime.stop(grace=0)


async def test_external_responses_need_the_setting(kafka_bootstrap, settings_factory, unique):
    settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                                preference_allow_external_responses=True, preference_refresh_interval_s=3600.0)
    service, target, tokens = await start_service(settings)
    try:
        cmp = common_pb2.Comparison(event_id=uuid.uuid4().hex, prompt_id=f"ext-{unique}", prompt_text="Say hi",
                                    response_a=common_pb2.ResponseRef(text="Hello there!"),
                                    response_b=common_pb2.ResponseRef(response_id=f"vendor-{unique}", text="hi"),
                                    choice=common_pb2.CHOICE_TIE)
        async with aio.insecure_channel(target) as ch:
            await preference_pb2_grpc.PreferenceServiceStub(ch).SubmitComparison(cmp, metadata=auth(tokens["bob"]))
        stored = common_pb2.PreferenceEvent.FromString(service.store.events([cmp.event_id])[cmp.event_id].payload)
        assert stored.comparison.response_a.response_id.startswith("ext-")
        j = service.store.judgements(f"ext-{unique}")
        assert j.tie == [1]
    finally:
        await service.runtime.stop(grace=0)


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


async def test_tls(kafka_bootstrap, settings_factory, tmp_path, unique):
    try:
        cert, key = self_signed(tmp_path)
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:  # pragma: no cover - openssl is in the image
        pytest.skip(f"openssl unavailable: {exc}")
    settings = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap, tls_cert_file=cert,
                                tls_key_file=key, preference_refresh_interval_s=3600.0)
    service, target, tokens = await start_service(settings)
    try:
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        demo = common_pb2.Demonstration(event_id=uuid.uuid4().hex, prompt_id=f"tls-{unique}", response_text="hi")
        async with aio.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
            ack = await preference_pb2_grpc.PreferenceServiceStub(ch).SubmitDemonstration(
                demo, metadata=auth(tokens["alice"]))
        assert ack.event_id == demo.event_id and not ack.duplicate
        async with aio.insecure_channel(target) as ch:  # plaintext is not served
            with pytest.raises(aio.AioRpcError) as err:
                await preference_pb2_grpc.PreferenceServiceStub(ch).SubmitDemonstration(
                    demo, metadata=auth(tokens["alice"]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await service.runtime.stop(grace=0)


async def test_batched_bulk_names_the_event_across_batches(harness, prompt):
    events = [common_pb2.PreferenceEvent(ranking=ranking(prompt, [1, 2, 3, 4], rater="bob")) for _ in range(5)]
    events[3].ranking.ranks[:] = [1, 1, 1, 5]

    async def batches(items):
        yield preference_pb2.PreferenceEventBatch(events=items[:2])
        yield preference_pb2.PreferenceEventBatch(events=items[2:])

    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        with pytest.raises(aio.AioRpcError) as err:
            await stub.SubmitBulkBatched(batches(events), metadata=auth(harness.tokens["bob"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "events[3].ranking.ranks" in err.value.details()
        del events[3]
        ack = await stub.SubmitBulkBatched(batches(events), metadata=auth(harness.tokens["bob"]))
    assert ack.accepted + ack.duplicates == 4 and list(ack.event_ids) == [e.ranking.event_id for e in events]
    assert harness.service.store.count_events(prompt_id=prompt[0].prompt_id) == 4


async def test_a_second_instance_follows_events_written_by_the_first(harness, prompt, settings_factory,
                                                                      kafka_bootstrap, tmp_path):
    other = settings_factory(PreferenceSettings, kafka_bootstrap_servers=kafka_bootstrap,
                             preference_store_path=tmp_path / "b" / "store.sqlite",
                             preference_auth_db_path=harness.service.settings.auth_db_path(),
                             preference_refresh_interval_s=3600.0, preference_follow_interval_s=0.2)
    b, target_b, _ = await start_service(other, raters=())
    try:
        req = ranking(prompt, [4, 3, 2, 1])
        async with aio.insecure_channel(harness.target) as ch:
            await preference_pb2_grpc.PreferenceServiceStub(ch).SubmitRanking(req, metadata=auth(harness.tokens["alice"]))
        await wait_until_async(lambda: b.store.events([req.event_id]), 20, what="instance B to see A's event")
        async with aio.insecure_channel(target_b) as ch:
            ack = await preference_pb2_grpc.PreferenceServiceStub(ch).SubmitRanking(
                req, metadata=auth(harness.tokens["alice"]))
        assert ack.duplicate
        found = topic_events(kafka_bootstrap, PREFERENCES.name, lambda v: req.event_id.encode() in v, 1)
        assert len(found) == 1
    finally:
        await b.runtime.stop(grace=0)


async def test_rater_statistics_report_weights_with_uncertainty_and_gold(harness, prompt, unique):
    # The store replays the shared preferences topic (other tests' raters too): raters of its own.
    alice, bob, carol = (f"{name}-{unique}" for name in ("alice", "bob", "carol"))
    tokens = TokenStore(harness.service.settings.auth_db_path())
    harness.tokens.update({r: tokens.issue(r) for r in (alice, bob, carol)})
    tokens.close()
    async with aio.insecure_channel(harness.target) as ch:
        stub = preference_pb2_grpc.PreferenceServiceStub(ch)
        for rater, ranks in ((alice, [1, 2, 3, 4]), (bob, [1, 2, 3, 4]), (carol, [4, 3, 2, 1])):
            await stub.SubmitRanking(ranking(prompt, ranks, rater=rater), metadata=auth(harness.tokens[rater]))
        admin = auth(harness.tokens["admin"])
        stats = await stub.GetRaterStatistics(preference_pb2.GetRaterStatisticsRequest(), metadata=admin)
        assert stats.converged and stats.reliability and stats.num_prompts >= 1 and stats.iterations > 0
        by = {r.rater_id: r for r in stats.raters if r.rater_id in (alice, bob, carol)}
        assert set(by) == {alice, bob, carol}
        for r in by.values():
            assert -1 < r.weight < 1 and 0 < r.weight_stderr < 1 and r.accuracy == pytest.approx((1 + r.weight) / 2)
            assert r.judgements == pytest.approx(6 * 0.5)  # a ranking of 4: six pairs of weight 2/4
        assert by[carol].weight < by[alice].weight  # carol contradicts the two others

        own = await stub.GetRaterStatistics(preference_pb2.GetRaterStatisticsRequest(rater_ids=[alice]),
                                            metadata=auth(harness.tokens[alice]))
        assert [r.rater_id for r in own.raters] == [alice]
        for asked in ([bob], []):
            with pytest.raises(aio.AioRpcError) as err:
                await stub.GetRaterStatistics(preference_pb2.GetRaterStatisticsRequest(rater_ids=asked),
                                              metadata=auth(harness.tokens[alice]))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # the workbench's gold hook: carol got 2 of 20 known-answer items right
        engine = harness.service.servicer.engine
        engine.set_gold_counts({carol: (2, 20)})
        assert engine.stale
        await asyncio.to_thread(engine.refresh)
        after = await stub.GetRaterStatistics(preference_pb2.GetRaterStatisticsRequest(rater_ids=[carol]),
                                              metadata=admin)
        [carol_after] = after.raters
        assert (carol_after.gold_correct, carol_after.gold_total) == (2, 20)
        assert carol_after.weight < by[carol].weight - 0.3 and carol_after.weight_stderr < by[carol].weight_stderr
        with pytest.raises(ValueError, match="correct <= total"):
            engine.set_gold_counts({carol: (3, 2)})
