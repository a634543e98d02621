"""PreferenceService: authenticated, validated, idempotent ingestion; consensus and dataset export.

Ingestion path of every event (unary or bulk):
  authenticate (bearer token) -> validate + normalise (field-level INVALID_ARGUMENT) ->
  de-duplicate on event id (store, in-flight submissions, earlier events of the same stream) ->
  produce to flywheel.preferences.v1 (key = prompt_id, acks=all, idempotent producer) ->
  wait for the broker's acknowledgement -> store (event id is the primary key) -> acknowledge.

A crash after the broker acknowledged but before the client saw the ack is safe: the restarted
service replays the topic into its store before it reports SERVING, so the client's retry finds
the event id and is answered `duplicate=true` without producing again.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Awaitable, Callable, Sequence

from grpc import aio
from prometheus_client import Counter, Histogram

from flywheel.bus import TypedProducer
from flywheel.bus.producer import acknowledged
from flywheel.bus.topics import AGGREGATED_PREFERENCES, PREFERENCES
from flywheel.preference.auth import Authenticator, Principal
from flywheel.preference.engine import ConsensusEngine
from flywheel.preference.export import write_dataset
from flywheel.preference.settings import PreferenceSettings
from flywheel.preference.store import PreferenceStore, event_body
from flywheel.preference.tasks import TaskBoard
from flywheel.preference.validation import Validator
from flywheel.runtime import InvalidArgument, NotFound, NotReady, Readiness, require
from flywheel.runtime.errors import FailedPrecondition, PermissionDenied, clip
from flywheel.runtime.uris import UriPolicy, check_uri
from flywheel.v1 import common_pb2, preference_pb2, preference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "flywheel.v1.PreferenceService"

EVENTS = Counter("flywheel_preference_events_total", "Submitted events by kind and outcome (accepted, duplicate).",
                 ("kind", "outcome"))
AUTH_FAILURES = Counter("flywheel_preference_auth_failures_total",
                        "Refused calls: unauthenticated (bad/missing token) or permission_denied.", ("reason",))
ACK_SECONDS = Histogram("flywheel_preference_broker_ack_seconds",
                        "Time from produce to the broker's acks=all acknowledgement, per batch.",
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EXPORTS = Counter("flywheel_preference_exports_total", "Datasets exported.", ("format",))

_FORMATS = {preference_pb2.DATASET_FORMAT_UNSPECIFIED: "jsonl", preference_pb2.DATASET_FORMAT_JSONL: "jsonl",
            preference_pb2.DATASET_FORMAT_PARQUET: "parquet"}


def trace_id(event_id: str) -> str:
    """The Kafka trace id of an event: derived from its id (cheaper than uuid4, stable across retries)."""
    return hashlib.blake2b(event_id.encode(), digest_size=16).hexdigest()


class PreferenceServicer(preference_pb2_grpc.PreferenceServiceServicer):
    def __init__(self, settings: PreferenceSettings, store: PreferenceStore, auth: Authenticator,
                 producer: TypedProducer, engine: ConsensusEngine, board: TaskBoard | None = None, *,
                 after_produce: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.board = board
        # fault hook for tests: runs after the broker acknowledged, before storing and acking
        self._after_produce = after_produce
        self.store = store
        self.auth = auth
        self.producer = producer
        self.engine = engine
        self.validator = Validator(settings, store)
        self.readiness = Readiness(settings.service_name)  # the runtime's, once wired (app.build_service)
        self._inflight: dict[str, asyncio.Future[None]] = {}
        # Leases get threads of their own: on the shared default executor they queued behind
        # submissions' commits (up to 0.4 s at 200 raters) although a lease itself takes ~0.1 ms.
        self._lease_threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flywheel-lease")

    # -- auth --------------------------------------------------------------------------------
    def _principal(self, context: aio.ServicerContext) -> Principal | None:
        from flywheel.runtime import Unauthenticated

        try:
            return self.auth.authenticate(context.invocation_metadata())
        except Unauthenticated:
            AUTH_FAILURES.labels("unauthenticated").inc()
            raise

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    def _check_ready(self) -> None:
        if not self.readiness.ready:
            raise NotReady(self.readiness.why_not())

    # -- ingestion ---------------------------------------------------------------------------
    async def _ingest(self, events: Sequence[common_pb2.PreferenceEvent], prefixes: Sequence[str],
                      principal: Principal | None) -> list[tuple[str, bool]]:
        """Make `events` durable; returns (event_id, duplicate) per event, in order."""
        from flywheel.runtime import PermissionDenied

        try:
            # Lineage lookups read the SQLite store, which a writer thread may hold: off the loop.
            prepared = await asyncio.to_thread(self.validator.prepare, events, prefixes, principal)
        except PermissionDenied:
            AUTH_FAILURES.labels("permission_denied").inc()
            raise
        bodies = [event_body(e)[1] for e in prepared]
        ids = [b.event_id for b in bodies]
        if self.board is not None:
            for body, prefix, event in zip(bodies, prefixes, prepared):
                if body.lease_id:
                    field = f"{prefix}{event.WhichOneof('event')}.lease_id" if prefix else "lease_id"
                    self.board.check(body.lease_id, body.rater_id, body.prompt_id, field)
        stored = await asyncio.to_thread(self.store.events, ids)
        outcome: list[bool] = []  # duplicate?
        fresh: list[int] = []
        waits: list[asyncio.Future[None]] = []
        seen: dict[str, int] = {}
        for i, (event, body) in enumerate(zip(prepared, bodies)):
            kind = event.WhichOneof("event")
            prefix = prefixes[i]
            field = f"{prefix}{kind}.event_id" if prefix else "event_id"
            previous = stored.get(body.event_id)
            if previous is not None:
                require(previous.rater_id == body.rater_id and previous.prompt_id == body.prompt_id
                        and previous.kind == kind, field, "already used for a different event")
                outcome.append(True)
            elif body.event_id in seen:
                other = bodies[seen[body.event_id]]
                require(other.rater_id == body.rater_id and other.prompt_id == body.prompt_id, field,
                        "used twice in this stream for different events")
                outcome.append(True)
            elif body.event_id in self._inflight:
                waits.append(self._inflight[body.event_id])
                outcome.append(True)
            else:
                seen[body.event_id] = i
                fresh.append(i)
                outcome.append(False)
        loop = asyncio.get_running_loop()
        mine = {ids[i]: loop.create_future() for i in fresh}
        self._inflight.update(mine)
        try:
            if fresh:
                await self._publish([prepared[i] for i in fresh])
            for f in mine.values():
                f.set_result(None)
        except BaseException as exc:
            for f in mine.values():
                if not f.done():
                    f.set_exception(exc if isinstance(exc, Exception) else NotReady("submission interrupted"))
                    f.exception()  # mark retrieved: the waiting duplicates re-raise it themselves
            raise
        finally:
            for event_id in mine:
                self._inflight.pop(event_id, None)
        for f in waits:
            await f  # a concurrent submit of the same id: acknowledge once it is durable
        if self.board is not None:
            for i in fresh:
                if bodies[i].lease_id:
                    self.board.complete(bodies[i].lease_id, bodies[i].rater_id, bodies[i].prompt_id)
        counts: dict[tuple[str, str], int] = {}
        for event, dup in zip(prepared, outcome):
            key = (event.WhichOneof("event"), "duplicate" if dup else "accepted")
            counts[key] = counts.get(key, 0) + 1
        for labels, n in counts.items():
            EVENTS.labels(*labels).inc(n)
        return list(zip(ids, outcome))

    async def _publish(self, events: list[common_pb2.PreferenceEvent]) -> None:
        """Produce with acks=all, wait for every acknowledgement, then store with partition/offset."""
        start = time.perf_counter()
        futures = []
        for e in events:
            body = event_body(e)[1]
            futures.append(self.producer.send(PREFERENCES, e, key=body.prompt_id, trace_id=trace_id(body.event_id)))
        results = await acknowledged(futures, self.settings.preference_ack_timeout_s)
        ACK_SECONDS.observe(time.perf_counter() - start)
        durable = [(e, md.partition, md.offset) for e, md in zip(events, results) if not isinstance(md, Exception)]
        failed = [md for md in results if isinstance(md, Exception)]
        if self._after_produce is not None:
            await self._after_produce()
        if durable:
            await asyncio.to_thread(self.store.record_events, durable, topic=PREFERENCES.name)
        if failed:
            log.error("%d of %d events not acknowledged by the broker: %s", len(failed), len(events), failed[0])
            raise NotReady(f"{len(failed)} event(s) could not be made durable ({type(failed[0]).__name__}); "
                           "retry with the same event ids")

    async def _submit_one(self, event: common_pb2.PreferenceEvent, context) -> preference_pb2.SubmitAck:
        principal = self._principal(context)
        self._check_ready()
        [(event_id, duplicate)] = await self._ingest([event], [""], principal)
        return preference_pb2.SubmitAck(event_id=event_id, duplicate=duplicate)

    async def SubmitDemonstration(self, request, context):
        return await self._submit_one(common_pb2.PreferenceEvent(demonstration=request), context)

    async def SubmitComparison(self, request, context):
        return await self._submit_one(common_pb2.PreferenceEvent(comparison=request), context)

    async def SubmitRanking(self, request, context):
        return await self._submit_one(common_pb2.PreferenceEvent(ranking=request), context)

    async def SubmitBulk(self, request_iterator: AsyncIterator[common_pb2.PreferenceEvent], context):
        """Events are made durable chunk by chunk; the ack comes once all are. An invalid event fails the
        stream (earlier chunks stay durable: resubmitting the stream is safe, they come back as duplicates)."""

        async def singles():
            async for event in request_iterator:
                yield (event,)

        return await self._bulk(singles(), context)

    async def SubmitBulkBatched(self, request_iterator: AsyncIterator[preference_pb2.PreferenceEventBatch], context):
        """SubmitBulk with many events per stream message."""

        async def batches():
            async for batch in request_iterator:
                yield batch.events

        return await self._bulk(batches(), context)

    async def _bulk(self, groups: AsyncIterator[Sequence[common_pb2.PreferenceEvent]], context) -> preference_pb2.BulkAck:
        principal = self._principal(context)
        self._check_ready()
        chunk_size = self.settings.preference_bulk_chunk_size
        ack = preference_pb2.BulkAck()
        chunk: list[common_pb2.PreferenceEvent] = []
        n = 0
        # One chunk is made durable while the next is read from the stream (ordered, at most one in flight).
        in_flight: asyncio.Task | None = None

        async def collect(task: asyncio.Task) -> None:
            for event_id, duplicate in await task:
                ack.event_ids.append(event_id)
                if duplicate:
                    ack.duplicates += 1
                else:
                    ack.accepted += 1

        async def submit(events: list[common_pb2.PreferenceEvent], first: int) -> None:
            nonlocal in_flight
            if in_flight is not None:
                await collect(in_flight)
            prefixes = [f"events[{first + i}]." for i in range(len(events))]
            in_flight = asyncio.ensure_future(self._ingest(events, prefixes, principal))

        try:
            async for group in groups:
                chunk.extend(group)
                n += len(group)
                if len(chunk) >= chunk_size:
                    await submit(chunk, n - len(chunk))
                    chunk = []
            if chunk:
                await submit(chunk, n - len(chunk))
            if in_flight is not None:
                await collect(in_flight)
        except BaseException:
            if in_flight is not None and not in_flight.done():
                await asyncio.wait([in_flight])  # never abandon a chunk half-way through its publish
            raise
        return ack

    # -- consensus and datasets --------------------------------------------------------------
    async def GetConsensus(self, request, context):
        self._principal(context)
        self._check_ready()
        require(bool(request.prompt_id), "prompt_id", "required")
        agg = await asyncio.to_thread(self.engine.prompt, request.prompt_id)
        if agg is None:
            raise NotFound(f"no comparisons or rankings for prompt {clip(request.prompt_id)!r}")
        return agg

    async def GetRaterStatistics(self, request, context):
        """Rater weights with their uncertainty from the last global fit (the background refresh keeps it
        within FLYWHEEL_PREFERENCE_REFRESH_INTERVAL_S of new events; fitted now when there is none yet)."""
        from flywheel.runtime import PermissionDenied

        principal = self._principal(context)
        self._check_ready()
        wanted = list(request.rater_ids)
        if principal is not None and not principal.is_admin and wanted != [principal.rater_id]:
            AUTH_FAILURES.labels("permission_denied").inc()
            raise PermissionDenied("a rater token may only ask for its own rater_ids; all raters need an admin token")
        fitted = self.engine.last_fit()
        if fitted is None:
            fitted = await asyncio.to_thread(self.engine.refresh)
        stats = self.engine.rater_stats
        response = preference_pb2.RaterStatistics(
            converged=fitted.result.converged, iterations=fitted.result.iterations,
            num_prompts=fitted.problem.n_prompts, reliability=self.settings.preference_reliability)
        response.fitted_at.FromNanoseconds(int(fitted.fitted_at * 1e9))
        for rater_id in wanted or sorted(stats):
            s = stats.get(rater_id)
            if s is not None:
                response.raters.add(rater_id=rater_id, weight=s.weight, weight_stderr=s.weight_stderr,
                                    accuracy=s.accuracy, judgements=s.judgements, gold_correct=s.gold_correct,
                                    gold_total=s.gold_total)
        return response

    async def ExportDataset(self, request, context):
        principal = self._principal(context)
        self.auth.require_admin(principal, "ExportDataset")
        self._check_ready()
        fmt = _FORMATS.get(request.format)
        if fmt is None:
            raise InvalidArgument("format", f"unknown format {request.format}")
        require(request.min_margin >= 0, "min_margin", "must be >= 0")
        output = request.output_uri or str(self.settings.export_dir())
        if request.output_uri:
            check_uri(request.output_uri, UriPolicy("output_uri", self.settings.export_roots(),
                                                    self.settings.preference_export_remote))
        try:
            result = await asyncio.to_thread(self._export, output, fmt, request.min_margin)
        except PermissionError as exc:
            raise PermissionDenied(f"output_uri: cannot write there ({exc.strerror})") from exc
        except OSError as exc:  # e.g. a file where a directory should be, a full disk
            raise FailedPrecondition(f"output_uri: cannot write there ({exc.strerror or type(exc).__name__})") from exc
        export, messages = result
        if request.publish:
            await self._publish_aggregates(messages)
        EXPORTS.labels(fmt).inc()
        return preference_pb2.ExportDatasetResponse(
            dataset_version=export.dataset_version, pairs_uri=export.pairs_uri,
            demonstrations_uri=export.demonstrations_uri, num_pairs=export.num_pairs,
            num_demonstrations=export.num_demonstrations, num_prompts=export.num_prompts)

    def _export(self, output: str, fmt: str, min_margin: float):
        version = self.store.content_version()
        fitted = self.engine.refresh()
        messages = self.engine.messages(fitted.problem, fitted.result, dataset_version=version)
        flagged = self.board.flagged() if self.board is not None else set()
        for m in messages:  # published pairs obey the same margin and flag filters as the files
            kept = [p for p in m.pairs if p.margin >= min_margin and p.chosen_id not in flagged
                    and p.rejected_id not in flagged]
            del m.pairs[:]
            m.pairs.extend(kept)
        export = write_dataset(output, version, messages, self.store.demonstrations(), fmt=fmt, min_margin=min_margin)
        return export, messages

    async def _publish_aggregates(self, messages: list[common_pb2.AggregatedPreference]) -> None:
        futures = [self.producer.send(AGGREGATED_PREFERENCES, m, key=m.prompt_id) for m in messages]
        for result in await acknowledged(futures, self.settings.preference_ack_timeout_s):
            if isinstance(result, Exception):
                raise result

    # -- task assignment ---------------------------------------------------------------------
    def _board(self) -> TaskBoard:
        if self.board is None:
            raise NotFound("task assignment is not enabled on this instance")
        return self.board

    async def lease(self, principal: Principal | None, rater_id: str, kind: int) -> preference_pb2.Task:
        """LeaseTask for `principal` (shared by gRPC and the web UI), on the lease threads."""
        call = functools.partial(contextvars.copy_context().run, self.lease_task, principal, rater_id, kind)
        return await asyncio.get_running_loop().run_in_executor(self._lease_threads, call)

    def close(self) -> None:
        self._lease_threads.shutdown(wait=False, cancel_futures=True)

    def lease_task(self, principal: Principal | None, rater_id: str, kind: int) -> preference_pb2.Task:
        """Blocking: it takes the board's lock, which a pool refresh holds while it applies new rows."""
        board = self._board()
        self._check_ready()
        if not rater_id and principal is not None:
            rater_id = principal.rater_id
        require(bool(rater_id), "rater_id", "required")
        Authenticator.check_rater(principal, rater_id)
        require(kind in preference_pb2.TaskKind.values(), "kind", f"unknown task kind {kind}")
        lease, remaining = board.lease(rater_id, kind)
        if lease is None:
            return preference_pb2.Task()
        known = self.store.responses(list(lease.response_ids))
        task = preference_pb2.Task(
            lease_id=lease.lease_id, kind=lease.kind, prompt_id=lease.prompt_id,
            prompt_text=self.store.prompt_texts([lease.prompt_id]).get(lease.prompt_id, ""), remaining=remaining)
        for rid in lease.response_ids:
            hit = known.get(rid)
            task.candidates.add(response_id=rid, text=hit.text if hit else "",
                                policy_version=hit.policy_version if hit else "")
        task.policy_version = task.candidates[0].policy_version if task.candidates else ""
        task.lease_expires_at.FromNanoseconds(int(lease.expires_at * 1e9))
        return task

    async def LeaseTask(self, request, context):
        return await self.lease(self._principal(context), request.rater_id, request.kind)

    async def ReleaseTask(self, request, context):
        principal = self._principal(context)
        require(bool(request.lease_id), "lease_id", "required")
        self._board().release(request.lease_id, principal.rater_id if principal else None)
        return preference_pb2.ReleaseTaskResponse()

    async def FlagResponse(self, request, context):
        principal = self._principal(context)
        require(bool(request.lease_id), "lease_id", "required")
        require(bool(request.response_id), "response_id", "required")
        lease = self._board().lease_of(request.lease_id, principal.rater_id if principal else None)
        flag_id = await asyncio.to_thread(self._board().flag, request.lease_id, lease.rater_id, request.response_id,
                                          request.reason, request.note)
        return preference_pb2.FlagResponseAck(flag_id=flag_id)

    async def MarkGold(self, request, context):
        principal = self._principal(context)
        self.auth.require_admin(principal, "MarkGold")
        self._check_ready()
        await asyncio.to_thread(self._board().mark_gold, request.prompt_id, list(request.response_ids),
                                list(request.ranks))
        return preference_pb2.MarkGoldResponse()

    async def GetGoldAccuracy(self, request, context):
        principal = self._principal(context)
        self.auth.require_admin(principal, "GetGoldAccuracy")
        counts = await asyncio.to_thread(self._board().gold_counts)
        out = preference_pb2.GoldAccuracy()
        for rater, (correct, total) in sorted(counts.items()):
            out.raters.add(rater_id=rater, correct=correct, total=total)
        return out
