"""The durable event store the aggregation reads (SQLite, one file per service instance).

Kafka's `flywheel.preferences.v1` is the system of record; this store is derived from it: every
event is written after the broker acknowledged it (with its partition and offset), and a follower
(`replay.py`) replays the topic into the store with the topic offsets kept in the same SQLite
transaction, so a fresh or stale store converges to exactly the topic's contents. Event ids are the
primary key: an event seen twice (a retried submit, a replayed record) is stored once.

Rows derived from an event are a pure function of the PreferenceEvent (`derive`), so the live path
and a rebuild produce identical tables.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from flywheel.v1 import common_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id        TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    rater_id        TEXT NOT NULL,
    prompt_id       TEXT NOT NULL,
    payload         BLOB NOT NULL,
    topic_partition INTEGER,
    topic_offset    INTEGER,
    stored_at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_prompt ON events (prompt_id);
CREATE TABLE IF NOT EXISTS judgements (
    event_id  TEXT NOT NULL,
    idx       INTEGER NOT NULL,
    prompt_id TEXT NOT NULL,
    rater_id  TEXT NOT NULL,
    winner_id TEXT NOT NULL,   -- for ties: the first response
    loser_id  TEXT NOT NULL,   -- for ties: the second response
    tie       INTEGER NOT NULL,
    weight    REAL NOT NULL,
    PRIMARY KEY (event_id, idx)
);
CREATE INDEX IF NOT EXISTS judgements_by_prompt ON judgements (prompt_id);
CREATE TABLE IF NOT EXISTS demonstrations (
    event_id      TEXT PRIMARY KEY,
    prompt_id     TEXT NOT NULL,
    prompt_text   TEXT NOT NULL,
    response_text TEXT NOT NULL,
    rater_id      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    response_id    TEXT PRIMARY KEY,
    prompt_id      TEXT NOT NULL,
    text           TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    source         TEXT NOT NULL   -- 'rollout', 'eval' (held-out split: no tasks) or 'event' (external)
);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id   TEXT PRIMARY KEY,
    prompt_text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""


@dataclass(frozen=True)
class KnownResponse:
    response_id: str
    prompt_id: str
    text: str
    policy_version: str
    source: str


@dataclass(frozen=True)
class StoredEvent:
    event_id: str
    kind: str
    rater_id: str
    prompt_id: str
    payload: bytes


@dataclass
class Derived:
    """Rows one PreferenceEvent contributes."""

    event_id: str
    kind: str
    rater_id: str
    prompt_id: str
    judgements: list[tuple[str, int, str, str, str, str, int, float]] = field(default_factory=list)
    demonstration: tuple[str, str, str, str, str] | None = None
    responses: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    prompt_text: str = ""


_IN_CHUNK = 500  # bound parameters per statement (SQLite's limit is 999 on older builds)


def _select_in(db: sqlite3.Connection, sql: str, ids: Iterable[str]) -> list[tuple]:
    """Rows of `sql` (whose `IN ({})` takes the ids) for the distinct `ids`, queried in chunks."""
    unique = list(dict.fromkeys(ids))
    rows: list[tuple] = []
    for start in range(0, len(unique), _IN_CHUNK):
        chunk = unique[start:start + _IN_CHUNK]
        rows.extend(db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall())
    return rows


def event_body(event: common_pb2.PreferenceEvent):
    kind = event.WhichOneof("event")
    if kind is None:
        raise ValueError("PreferenceEvent has no event set")
    return kind, getattr(event, kind)


def derive(event: common_pb2.PreferenceEvent) -> Derived:
    """Judgements (rankings broken into all pairs), demonstrations, responses and prompt text of an event.

    A ranking of k responses contributes its k(k-1)/2 pairs with weight 2/k each, i.e. k-1 comparisons
    in total: the number of independent choices a Plackett–Luce ranking holds (full rank breaking).
    """
    kind, body = event_body(event)
    d = Derived(body.event_id, kind, body.rater_id, body.prompt_id, prompt_text=body.prompt_text)
    if kind == "demonstration":
        d.demonstration = (body.event_id, body.prompt_id, body.prompt_text, body.response_text, body.rater_id)
        return d
    if kind == "comparison":
        refs = [body.response_a, body.response_b]
        weight = float(body.strength) if body.strength > 0 else 1.0
        a, b = body.response_a.response_id, body.response_b.response_id
        if body.choice == common_pb2.CHOICE_B:
            a, b = b, a
        d.judgements.append((body.event_id, 0, body.prompt_id, body.rater_id, a, b,
                             int(body.choice == common_pb2.CHOICE_TIE), weight))
    else:
        refs = list(body.responses)
        k = len(refs)
        weight = 2.0 / k
        idx = 0
        for i in range(k):
            for j in range(i + 1, k):
                ri, rj = body.ranks[i], body.ranks[j]
                a, b = (refs[i].response_id, refs[j].response_id)
                if rj < ri:
                    a, b = b, a
                d.judgements.append((body.event_id, idx, body.prompt_id, body.rater_id, a, b, int(ri == rj), weight))
                idx += 1
    d.responses = [(r.response_id, body.prompt_id, r.text, r.policy_version, "event") for r in refs]
    return d


@dataclass
class Judgements:
    """Column arrays of all judgements (winner first; `tie` marks unordered pairs)."""

    prompt_id: list[str]
    rater_id: list[str]
    winner_id: list[str]
    loser_id: list[str]
    tie: list[int]
    weight: list[float]

    def __len__(self) -> int:
        return len(self.prompt_id)


class PreferenceStore:
    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()
        self._readers = threading.local()
        self.changes = 0  # bumped on every write that added events (aggregation cache key)
        self._next: dict[tuple[str, int], int] = {}       # live path: next contiguous offset per partition
        self._pending: dict[tuple[str, int], set[int]] = {}  # live path: written offsets beyond it

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection, for every read but the followers' offsets. WAL readers
        see the last commit without taking the writer's lock, so reads (a lease's candidates, a
        submission's lineage and duplicate check, the pool refresh, consensus fits) never queue behind
        a commit, and commits queue only behind other commits. Closed with its thread."""
        db = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            db.execute("PRAGMA query_only=ON")
            self._readers.db = db
        return db

    # -- writes ------------------------------------------------------------------------------
    def _insert_events(self, items: Sequence[tuple[common_pb2.PreferenceEvent, int | None, int | None]]) -> list[bool]:
        now = time.time()
        db = self._db
        ids = [event_body(e)[1].event_id for e, _, _ in items]
        existing = {r[0] for r in _select_in(db, "SELECT event_id FROM events WHERE event_id IN ({})", ids)}
        inserted: list[bool] = []
        events, judgements, demos, responses, prompts = [], [], [], [], []
        for (event, partition, offset), event_id in zip(items, ids):
            if event_id in existing:
                inserted.append(False)
                continue
            existing.add(event_id)
            inserted.append(True)
            d = derive(event)
            events.append((d.event_id, d.kind, d.rater_id, d.prompt_id, event.SerializeToString(), partition, offset,
                           now))
            judgements.extend(d.judgements)
            if d.demonstration:
                demos.append(d.demonstration)
            responses.extend(d.responses)
            if d.prompt_text:
                prompts.append((d.prompt_id, d.prompt_text))
        if events:
            db.executemany("INSERT INTO events (event_id, kind, rater_id, prompt_id, payload, topic_partition, "
                           "topic_offset, stored_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", events)
            db.executemany("INSERT OR IGNORE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?)", judgements)
            db.executemany("INSERT OR IGNORE INTO demonstrations VALUES (?, ?, ?, ?, ?)", demos)
            db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?)", responses)
            db.executemany("INSERT OR IGNORE INTO prompts VALUES (?, ?)", prompts)
        return inserted

    def _set_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        self._db.executemany(
            "INSERT INTO offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
            [(topic, p, o) for p, o in offsets.items()])
        for p, o in offsets.items():
            key = (topic, p)
            if key in self._next:
                self._next[key] = max(self._next[key], o)
                self._pending[key] = {x for x in self._pending.get(key, ()) if x >= self._next[key]}

    def _advance_contiguous(self, topic: str, written: Iterable[tuple[int, int]]) -> dict[int, int]:
        """Offsets written by the live path: advance a partition's next offset while they are contiguous.

        Lets the follower skip records this instance already stored (it seeks past them instead of
        fetching and decoding them again). Gaps (other instances' records) wait for the follower.
        """
        advanced: dict[int, int] = {}
        for partition, offset in written:
            key = (topic, partition)
            if key not in self._next:
                row = self._db.execute("SELECT next_offset FROM offsets WHERE topic = ? AND partition = ?",
                                       key).fetchone()
                self._next[key] = row[0] if row else 0
            if offset < self._next[key]:
                continue
            pending = self._pending.setdefault(key, set())
            pending.add(offset)
            nxt = self._next[key]
            while nxt in pending:
                pending.discard(nxt)
                nxt += 1
            if nxt != self._next[key]:
                self._next[key] = advanced[partition] = nxt
        return advanced

    def record_events(self, items: Sequence[tuple[common_pb2.PreferenceEvent, int | None, int | None]], *,
                      topic: str | None = None, offsets: dict[int, int] | None = None) -> list[bool]:
        """Store events (event, partition, offset) in one transaction; True where the event was new.

        Followers pass `offsets` (next offset per partition of `topic`), advanced in the same
        transaction. The live path passes only `topic`: the offsets of what it wrote advance the
        partition's next offset where they are contiguous with it.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                inserted = self._insert_events(items)
                if topic is not None and offsets:
                    self._set_offsets(topic, offsets)
                elif topic is not None:
                    advanced = self._advance_contiguous(
                        topic, [(p, o) for _, p, o in items if p is not None and o is not None])
                    if advanced:
                        self._set_offsets(topic, advanced)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._next.clear()  # in-memory offsets may be ahead of what was committed
                self._pending.clear()
                raise
            if any(inserted):
                self.changes += 1
            return inserted

    def record_rollouts(self, rollouts: Iterable[common_pb2.Rollout], *, topic: str | None = None,
                        offsets: dict[int, int] | None = None) -> int:
        # held-out (eval split) rollouts are known responses but never handed to raters as tasks
        rows = [(r.rollout_id, r.prompt_id, r.response_text, r.policy_version,
                 "eval" if r.split == "eval" else "rollout") for r in rollouts]
        prompts = [(r.prompt_id, r.raw_prompt or r.prompt_text) for r in rollouts if (r.raw_prompt or r.prompt_text)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?)", rows)
                self._db.executemany("INSERT OR IGNORE INTO prompts VALUES (?, ?)", prompts)
                if topic is not None and offsets:
                    self._set_offsets(topic, offsets)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    # -- reads -------------------------------------------------------------------------------
    def offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            rows = self._db.execute("SELECT partition, next_offset FROM offsets WHERE topic = ?", (topic,)).fetchall()
        return {p: o for p, o in rows}

    def events(self, event_ids: Sequence[str]) -> dict[str, StoredEvent]:
        rows = _select_in(self._reader(), "SELECT event_id, kind, rater_id, prompt_id, payload FROM events "
                          "WHERE event_id IN ({})", event_ids)
        return {row[0]: StoredEvent(*row) for row in rows}

    def responses(self, response_ids: Sequence[str]) -> dict[str, KnownResponse]:
        rows = _select_in(self._reader(), "SELECT response_id, prompt_id, text, policy_version, source FROM responses "
                          "WHERE response_id IN ({})", response_ids)
        return {row[0]: KnownResponse(*row) for row in rows}

    def prompt_texts(self, prompt_ids: Sequence[str] | None = None) -> dict[str, str]:
        db = self._reader()
        if prompt_ids is None:
            return dict(db.execute("SELECT prompt_id, prompt_text FROM prompts").fetchall())
        return dict(_select_in(db, "SELECT prompt_id, prompt_text FROM prompts WHERE prompt_id IN ({})", prompt_ids))

    def judgements(self, prompt_id: str | None = None) -> Judgements:
        sql = "SELECT prompt_id, rater_id, winner_id, loser_id, tie, weight FROM judgements"
        args: tuple = ()
        if prompt_id is not None:
            sql += " WHERE prompt_id = ?"
            args = (prompt_id,)
        rows = self._reader().execute(sql + " ORDER BY prompt_id, event_id, idx", args).fetchall()
        cols = list(zip(*rows)) if rows else [(), (), (), (), (), ()]
        return Judgements(*[list(c) for c in cols])

    def demonstrations(self) -> list[tuple[str, str, str, str, str]]:
        """(event_id, prompt_id, prompt_text, response_text, rater_id), ordered by prompt and event."""
        return self._reader().execute(
            "SELECT event_id, prompt_id, prompt_text, response_text, rater_id FROM demonstrations "
            "ORDER BY prompt_id, event_id").fetchall()

    def count_events(self, kind: str | None = None, prompt_id: str | None = None) -> int:
        sql, args = "SELECT count(*) FROM events WHERE 1=1", []
        if kind is not None:
            sql, args = sql + " AND kind = ?", args + [kind]
        if prompt_id is not None:
            sql, args = sql + " AND prompt_id = ?", args + [prompt_id]
        return self._reader().execute(sql, args).fetchone()[0]

    def count_responses(self) -> int:
        return self._reader().execute("SELECT count(*) FROM responses").fetchone()[0]

    def rollout_responses(self, after_rowid: int = 0) -> list[tuple[int, str, str, str]]:
        """(rowid, prompt_id, response_id, policy_version) of the rollouts stored after `after_rowid`, in
        storage order (the task pool reads them incrementally; eval-split rollouts are left out)."""
        return self._reader().execute(
            "SELECT rowid, prompt_id, response_id, policy_version FROM responses "
            "WHERE rowid > ? AND source = 'rollout' ORDER BY rowid", (after_rowid,)).fetchall()

    def answered_keys(self, after_rowid: int = 0) -> list[tuple[int, str, str, str]]:
        """(rowid, prompt_id, rater_id, policy_version) of the events stored after `after_rowid`: which
        rollout group each answered. Demonstrations answer a prompt, not a group: policy_version '*'."""
        return self._reader().execute(
            "SELECT e.rowid, e.prompt_id, e.rater_id, coalesce(r.policy_version, '*') FROM events e "
            "LEFT JOIN judgements j ON j.event_id = e.event_id AND j.idx = 0 "
            "LEFT JOIN responses r ON r.response_id = j.winner_id WHERE e.rowid > ? ORDER BY e.rowid",
            (after_rowid,)).fetchall()

    def judgements_since(self, since: float) -> list[tuple[str, str, float]]:
        """(event_id, rater_id, stored_at) of events stored after `since` (unix seconds)."""
        return self._reader().execute("SELECT event_id, rater_id, stored_at FROM events WHERE stored_at > ?",
                                      (since,)).fetchall()

    def content_version(self) -> str:
        """A short digest of the set of stored event ids (names a dataset export)."""
        digest = hashlib.sha256()
        n = 0
        for (event_id,) in self._reader().execute("SELECT event_id FROM events ORDER BY event_id"):
            digest.update(event_id.encode())
            digest.update(b"\0")
            n += 1
        return f"pref-{n:08d}-{digest.hexdigest()[:12]}"
