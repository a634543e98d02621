"""Task assignment: which question a rater answers next, leased so two raters never hold one slot.

A task is one prompt's candidates of one policy version (the task key is (prompt_id, version)):
a rollout group is a new question when a newer policy answers the same prompt again. Each key has
`overlap` slots; a slot is taken by a live lease or by a rater who answered. A rater never gets the
same key twice (answered, leased, skipped or expired).

Order of the next task (`TaskBoard.lease`), unless a random or gold draw intervenes:
  1. the newest policy version (what PPO needs feedback on now),
  2. the least certain Bradley-Terry consensus: smallest |score gap| / standard error over the
     group's adjacent pairs (unjudged groups count as 0, i.e. maximally uncertain),
  3. the fewest raters so far (under-covered first), then a random tie-break.
With probability `random_share` the task is drawn uniformly among the eligible ones (an unbiased
evaluation sample); with probability `gold_rate` a gold task (known ordering, set by an admin) the
rater has not seen is served instead, looking exactly like any other task.

State: the pool and who answered what are derived from the store (so they survive restarts and
include other instances' events); leases live in memory only. After a restart the live leases are
gone: their slots return to the pool, and a submission that still carries such a lease id is
accepted (counted as `unknown_lease`) - nothing a rater did is lost, only the lease bookkeeping.
Gold orderings and flags are not derivable from Kafka and live in their own SQLite file (`TaskDB`).

Cost: the groups with a free slot are kept in leasing order (`task_queue.OpenTasks`), so a lease does
not scan the pool, which grows for as long as the loop runs.
"""

from __future__ import annotations

import heapq
import random
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from prometheus_client import Counter, Gauge, Histogram

from flywheel.preference.store import PreferenceStore
from flywheel.preference.task_queue import OpenTasks
from flywheel.preference.validation import ranks_are_valid
from flywheel.runtime import InvalidArgument, NotFound, PermissionDenied, require
from flywheel.v1 import preference_pb2

GOLD = "gold"  # version slot of a gold task key: (prompt_id, GOLD)
GAUGE_INTERVAL_S = 10.0  # queue gauges are recomputed at most this often (scrapes come every 15-30 s)

TASKS = Counter("flywheel_preference_tasks_total",
                "Task leases by outcome: leased, completed, completed_late, unknown_lease, expired, released.",
                ("outcome",))
JUDGEMENT_SECONDS = Histogram("flywheel_preference_judgement_seconds", "Seconds from lease to submission.",
                              buckets=(5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600))
QUEUE_DEPTH = Gauge("flywheel_preference_task_queue_depth", "Open task slots by policy version.",
                    ("policy_version",))
NEWEST_UNRATED_SECONDS = Gauge(
    "flywheel_preference_newest_version_unrated_seconds",
    "Age of the oldest task of the newest policy version that no rater has answered yet (0: none waiting).")
GOLD_ACCURACY = Gauge("flywheel_preference_rater_gold_accuracy", "Share of gold pairs a rater ordered correctly.",
                      ("rater",))
FLAGS = Counter("flywheel_preference_flags_total", "Responses flagged by raters, by reason.", ("reason",))

for _outcome in ("leased", "completed", "completed_late", "unknown_lease", "expired", "released"):
    TASKS.labels(_outcome)  # exported from the start, so rates and alerts see 0 rather than nothing

FLAG_REASONS = {preference_pb2.FLAG_REASON_UNSAFE: "unsafe", preference_pb2.FLAG_REASON_NONSENSE: "nonsense",
                preference_pb2.FLAG_REASON_CANNOT_JUDGE: "cannot_judge"}
for _reason in FLAG_REASONS.values():
    FLAGS.labels(_reason)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS gold (
    prompt_id   TEXT NOT NULL,
    response_id TEXT NOT NULL,
    rank        INTEGER NOT NULL,
    PRIMARY KEY (prompt_id, response_id)
);
CREATE TABLE IF NOT EXISTS flags (
    flag_id     TEXT PRIMARY KEY,
    rater_id    TEXT NOT NULL,
    prompt_id   TEXT NOT NULL,
    response_id TEXT NOT NULL,
    reason      TEXT NOT NULL,
    note        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
"""


class TaskDB:
    """Gold orderings and flags (not derived from Kafka: back this file up with the token db)."""

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def set_gold(self, prompt_id: str, ranks: dict[str, int]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM gold WHERE prompt_id = ?", (prompt_id,))
            self._db.executemany("INSERT INTO gold VALUES (?, ?, ?)", [(prompt_id, r, k) for r, k in ranks.items()])
            self._db.execute("COMMIT")

    def gold(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for prompt_id, response_id, rank in self._db.execute("SELECT prompt_id, response_id, rank FROM gold"):
                out.setdefault(prompt_id, {})[response_id] = rank
        return out

    def add_flag(self, rater_id: str, prompt_id: str, response_id: str, reason: str, note: str) -> str:
        flag_id = uuid.uuid4().hex
        with self._lock:
            self._db.execute("INSERT INTO flags VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (flag_id, rater_id, prompt_id, response_id, reason, note, time.time()))
        return flag_id

    def flags(self) -> list[tuple[str, str, str, str, str, str, float]]:
        with self._lock:
            return self._db.execute("SELECT * FROM flags ORDER BY created_at").fetchall()

    def flagged_response_ids(self) -> set[str]:
        with self._lock:
            return {r for (r,) in self._db.execute("SELECT DISTINCT response_id FROM flags")}


@dataclass
class Lease:
    lease_id: str
    rater_id: str
    key: tuple[str, str]  # (prompt_id, policy_version or GOLD)
    kind: int
    response_ids: tuple[str, ...]
    leased_at: float
    expires_at: float

    @property
    def prompt_id(self) -> str:
        return self.key[0]


@dataclass
class _Group:
    """One task key: a prompt's responses of one policy version."""

    key: tuple[str, str]
    version_order: int
    response_ids: list[str]
    first_seen: float
    done: set[str] = field(default_factory=set)  # raters who answered
    active: int = 0                               # live leases
    z: float = 0.0                                # consensus certainty (smaller: less certain)
    pair: tuple[str, str] | None = None           # its least certain adjacent pair


@dataclass
class RaterCounts:
    leased: int = 0
    completed: int = 0
    late: int = 0
    released: int = 0
    expired: int = 0


class TaskBoard:
    def __init__(self, store: PreferenceStore, db: TaskDB, *, overlap: int, lease_s: float, random_share: float,
                 gold_rate: float, max_candidates: int, settle_s: float = 0.0, seed: int | None = None) -> None:
        self.store = store
        self.db = db
        self.overlap = overlap
        self.lease_s = lease_s
        self.random_share = random_share
        self.gold_rate = gold_rate
        self.max_candidates = max_candidates
        self.settle_s = settle_s  # a group is leasable this long after it appeared (its candidates arrive together)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._groups: dict[tuple[str, str], _Group] = {}
        self._by_prompt: dict[str, list[tuple[str, str]]] = {}  # prompt -> its group keys
        self._demonstrated: dict[str, set[str]] = {}           # prompt -> raters who wrote a demonstration
        self._version_order: dict[str, int] = {}
        self._response_cursor = self._event_cursor = 0
        self._built = False
        self._gold: dict[str, dict[str, int]] = db.gold()
        self._flagged: set[str] = db.flagged_response_ids()
        self._seen: dict[str, set[tuple[str, str]]] = {}     # rater -> keys answered or leased
        self._answered: dict[tuple[str, str], set[str]] = {}  # key -> raters who completed it in this process
        # Non-gold groups with a free slot, by the candidates a task needs (1: demonstrate, 2: compare)
        self._open = {1: OpenTasks(self._rng), 2: OpenTasks(self._rng)}
        self._gold_keys: set[tuple[str, str]] = set()
        self._newest = -1  # version_order of the newest policy version with a (non-gold) group
        self._gauges_at = 0.0
        self._leases: dict[str, Lease] = {}
        self._ended: dict[str, Lease] = {}                   # expired or released (late submissions)
        self._expiry: list[tuple[float, str]] = []
        self._dirty: set[str] = set()                        # prompts whose certainty needs a refit
        self.counts: dict[str, RaterCounts] = {}

    # -- pool (derived from the store) ---------------------------------------------------------
    def refresh(self, certainty: dict[str, list[tuple[str, float, float]]] | None = None) -> None:
        """Bring the pool up to date with the store (blocking: call off the event loop).

        Incremental: only rollouts and events stored since the last call are read (rowid cursors);
        a change of the gold set re-keys groups and rebuilds from the start.
        `certainty` maps prompt_id -> [(response_id, score, stderr)] of fresh consensus fits.
        """
        gold = self.db.gold()
        flagged = self.db.flagged_response_ids()
        with self._lock:
            if set(gold) != set(self._gold) or not self._built:
                self._groups, self._response_cursor, self._event_cursor = {}, 0, 0
                self._version_order, self._by_prompt, self._demonstrated = {}, {}, {}
                self._open = {1: OpenTasks(self._rng), 2: OpenTasks(self._rng)}
                self._gold_keys, self._newest = set(), -1
            self._gold, self._flagged = gold, flagged
            response_cursor, event_cursor = self._response_cursor, self._event_cursor
        rows = self.store.rollout_responses(response_cursor)
        answered = self.store.answered_keys(event_cursor)
        now = time.time()
        with self._lock:
            self._built = True
            groups = self._groups
            touched: set[tuple[str, str]] = set()
            leased: dict[tuple[str, str], int] = {}  # live leases per key (a group re-created after a gold change)
            for lease in self._leases.values() if rows else ():
                leased[lease.key] = leased.get(lease.key, 0) + 1
            for rowid, prompt_id, response_id, version in rows:
                order = self._version_order.setdefault(version, rowid)
                key = (prompt_id, GOLD if prompt_id in gold else version)
                g = groups.get(key)
                if g is None:
                    g = groups[key] = _Group(key, order, [], now)
                    g.active = leased.get(key, 0)
                    g.done.update(self._answered.get(key, ()))
                    self._by_prompt.setdefault(prompt_id, []).append(key)
                    if key[1] == GOLD:
                        self._gold_keys.add(key)
                    else:
                        self._newest = max(self._newest, order)
                    for rater in self._demonstrated.get(prompt_id, ()):
                        self._seen.setdefault(rater, set()).add(key)
                g.response_ids.append(response_id)
                touched.add(key)
                self._response_cursor = rowid
            for rowid, prompt_id, rater_id, version in answered:
                self._event_cursor = rowid
                seen = self._seen.setdefault(rater_id, set())
                if version == "*":  # a demonstration answers the prompt: none of its groups again
                    self._demonstrated.setdefault(prompt_id, set()).add(rater_id)
                    seen.update(self._by_prompt.get(prompt_id, ()))
                    continue
                key = (prompt_id, GOLD if prompt_id in gold else version)
                if key in groups:
                    groups[key].done.add(rater_id)
                    touched.add(key)
                seen.add(key)
            for prompt_id, fits in (certainty or {}).items():
                keys = self._by_prompt.get(prompt_id, ())
                self._apply_certainty(groups, keys, fits)
                touched.update(keys)
            for key in touched:
                if key in groups:
                    self._reindex(groups[key])
            if now - self._gauges_at >= GAUGE_INTERVAL_S:  # O(open groups): not on every refresh
                self._export_gauges(now)
                self._gauges_at = now

    @staticmethod
    def _apply_certainty(groups, keys, fits: list[tuple[str, float, float]]) -> None:
        by_id = {rid: (score, se) for rid, score, se in fits}
        for key in keys:
            g = groups.get(key)
            if g is None:
                continue
            known = sorted((by_id[r] + (r,) for r in g.response_ids if r in by_id), reverse=True)
            best: tuple[float, tuple[str, str] | None] = (0.0, None)
            for (s1, e1, r1), (s2, e2, r2) in zip(known, known[1:]):
                z = (s1 - s2) / max((e1 * e1 + e2 * e2) ** 0.5, 1e-9)
                if best[1] is None or z < best[0]:
                    best = (z, (r1, r2))
            g.z, g.pair = best if best[1] is not None else (0.0, None)

    def _reindex(self, g: _Group) -> None:
        """Put `g` in the open indexes it qualifies for, at its current priority (under the lock)."""
        if g.key[1] == GOLD:
            return  # gold groups have no slots to fill; lease() looks at them apart
        taken = len(g.done) + g.active
        candidates = len(self._candidates(g)) if self._flagged else len(g.response_ids)
        for need, index in self._open.items():
            if taken < self.overlap and candidates >= need:
                index.put(g.key, (-g.version_order, g.z, taken))
            else:
                index.discard(g.key)

    def dirty_prompts(self, limit: int = 200) -> list[str]:
        """Prompts answered since the last call that still have open slots (their certainty needs a
        refit; full groups are never leased again, so refitting them would be wasted work)."""
        with self._lock:
            open_prompts = [p for p in self._dirty if any(
                len(self._groups[k].done) + self._groups[k].active < self.overlap
                for k in self._by_prompt.get(p, ()) if k in self._groups)]
            out = open_prompts[:limit]
            self._dirty -= set(self._dirty if len(open_prompts) <= limit else out)
        return out

    def _open_slots(self) -> dict[str, int]:
        """Free slots per policy version (under the lock); only open groups have any."""
        depth: dict[str, int] = {}
        for key in self._open[1]:
            g = self._groups[key]
            depth[key[1]] = depth.get(key[1], 0) + self.overlap - len(g.done) - g.active
        return depth

    def _export_gauges(self, now: float) -> None:
        oldest_unrated = 0.0
        for key in self._open[2]:
            g = self._groups[key]
            if g.version_order == self._newest and not g.done and len(self._candidates(g)) >= 2:
                oldest_unrated = max(oldest_unrated, now - g.first_seen)
        QUEUE_DEPTH.clear()
        for version, n in self._open_slots().items():
            QUEUE_DEPTH.labels(version).set(n)
        NEWEST_UNRATED_SECONDS.set(oldest_unrated)

    def queue_depth(self) -> dict[str, int]:
        """Open slots per policy version (admin page)."""
        with self._lock:
            return self._open_slots()

    def coverage(self) -> tuple[int, int]:
        """(task keys with `overlap` answers, all task keys)."""
        with self._lock:
            keys = [g for g in self._groups.values() if g.key[1] != GOLD]
            return sum(1 for g in keys if len(g.done) >= self.overlap), len(keys)

    # -- leases ------------------------------------------------------------------------------
    def _candidates(self, g: _Group) -> list[str]:
        return [r for r in g.response_ids if r not in self._flagged][:self.max_candidates]

    def _expire(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                continue  # completed or released already
            self._end(lease, "expired")

    def _end(self, lease: Lease, outcome: str) -> None:
        g = self._groups.get(lease.key)
        if g is not None:
            g.active = max(0, g.active - 1)
            self._reindex(g)
        self._ended[lease.lease_id] = lease
        counts = self.counts.setdefault(lease.rater_id, RaterCounts())
        setattr(counts, outcome, getattr(counts, outcome) + 1)
        TASKS.labels(outcome).inc()

    def lease(self, rater_id: str, kind: int = preference_pb2.TASK_KIND_UNSPECIFIED) -> tuple[Lease | None, int]:
        """The next task for `rater_id` (None when there is none) and how many more are open to it."""
        now = time.time()
        with self._lock:
            self._expire(now)
            seen = self._seen.setdefault(rater_id, set())
            need = 1 if kind == preference_pb2.TASK_KIND_DEMONSTRATE else 2
            settled = now - self.settle_s
            index = self._open[need]

            def eligible(key: tuple[str, str]) -> bool:
                g = self._groups[key]
                if key in seen or g.first_seen > settled:
                    return False
                if self._flagged and len(self._candidates(g)) < need:
                    index.discard(key)  # flags only remove candidates; new responses re-index it
                    return False
                return True

            chosen = None
            if need == 2 and self._gold_keys and self._rng.random() < self.gold_rate:
                gold = [k for k in self._gold_keys if k not in seen and self._groups[k].first_seen <= settled
                        and len(self._candidates(self._groups[k])) >= need]
                chosen = self._groups[self._rng.choice(gold)] if gold else None
            if chosen is None:
                key = index.draw(eligible) if self._rng.random() < self.random_share else index.first(eligible)
                if key is None:
                    return None, 0
                chosen = self._groups[key]
            candidates = self._candidates(chosen)
            if kind == preference_pb2.TASK_KIND_UNSPECIFIED:
                kind = preference_pb2.TASK_KIND_RANK if len(candidates) >= 3 else preference_pb2.TASK_KIND_COMPARE
            if kind == preference_pb2.TASK_KIND_COMPARE:
                pair = chosen.pair if chosen.pair and not set(chosen.pair) & self._flagged else None
                candidates = list(pair) if pair else candidates[:2]
            lease = Lease(uuid.uuid4().hex, rater_id, chosen.key, kind, tuple(candidates), now, now + self.lease_s)
            self._leases[lease.lease_id] = lease
            heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))
            seen.add(chosen.key)
            chosen.active += 1
            self._reindex(chosen)
            self.counts.setdefault(rater_id, RaterCounts()).leased += 1
            TASKS.labels("leased").inc()
            return lease, index.count_unseen(seen)

    def _owned(self, lease_id: str, rater_id: str | None) -> Lease | None:
        lease = self._leases.get(lease_id) or self._ended.get(lease_id)
        if lease is not None and rater_id is not None and lease.rater_id != rater_id:
            raise PermissionDenied(f"lease_id: lease {lease_id!r} belongs to another rater")
        return lease

    def check(self, lease_id: str, rater_id: str, prompt_id: str, field: str = "lease_id") -> None:
        """Before a submission is made durable: the lease, when known, must be this rater's for this prompt."""
        with self._lock:
            lease = self._owned(lease_id, rater_id)
            if lease is not None:
                require(lease.prompt_id == prompt_id, field, f"is for prompt {lease.prompt_id!r}, not {prompt_id!r}")

    def complete(self, lease_id: str, rater_id: str, prompt_id: str) -> str:
        """Record a durable submission; returns completed, completed_late or unknown_lease."""
        now = time.time()
        with self._lock:
            self._dirty.add(prompt_id)
            lease = self._leases.pop(lease_id, None)
            counts = self.counts.setdefault(rater_id, RaterCounts())
            if lease is not None:
                g = self._groups.get(lease.key)
                if g is not None:
                    g.active = max(0, g.active - 1)
                    self._reindex(g)
            else:
                lease = self._ended.get(lease_id)
            if lease is None:
                outcome = "unknown_lease"  # issued before a restart, or by another instance
                counts.late += 1
            else:
                late = lease.lease_id in self._ended or now > lease.expires_at
                outcome = "completed_late" if late else "completed"
                counts.late += late
                self._answered.setdefault(lease.key, set()).add(rater_id)
                g = self._groups.get(lease.key)
                if g is not None:
                    g.done.add(rater_id)
                    self._reindex(g)
                JUDGEMENT_SECONDS.observe(now - lease.leased_at)
            counts.completed += 1
            TASKS.labels(outcome).inc()
            return outcome

    def release(self, lease_id: str, rater_id: str | None) -> None:
        with self._lock:
            lease = self._owned(lease_id, rater_id)
            if lease is None:
                raise NotFound(f"no lease {lease_id!r} (expired before a restart?)")
            if self._leases.pop(lease_id, None) is not None:
                self._end(lease, "released")

    def lease_of(self, lease_id: str, rater_id: str | None) -> Lease:
        with self._lock:
            lease = self._owned(lease_id, rater_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}")
        return lease

    def live_leases(self) -> list[Lease]:
        with self._lock:
            self._expire(time.time())
            return list(self._leases.values())

    # -- gold and flags ----------------------------------------------------------------------
    def mark_gold(self, prompt_id: str, response_ids: Sequence[str], ranks: Sequence[int]) -> None:
        require(bool(prompt_id), "prompt_id", "required")
        require(len(response_ids) >= 2, "response_ids", "a gold ordering needs at least 2 responses")
        require(len(set(response_ids)) == len(response_ids), "response_ids", "contains duplicates")
        require(len(ranks) == len(response_ids), "ranks", f"has {len(ranks)} entries for {len(response_ids)} responses")
        require(ranks_are_valid(list(ranks)), "ranks", "not a ranking: use 1..m (ties share a rank)")
        known = self.store.responses(list(response_ids))
        for i, rid in enumerate(response_ids):
            hit = known.get(rid)
            require(hit is not None, f"response_ids[{i}]", f"unknown response id {rid!r}")
            require(hit.prompt_id == prompt_id, f"response_ids[{i}]", f"belongs to prompt {hit.prompt_id!r}")
        self.db.set_gold(prompt_id, dict(zip(response_ids, ranks)))

    def flag(self, lease_id: str, rater_id: str, response_id: str, reason: int, note: str) -> str:
        require(reason in FLAG_REASONS, "reason", "must be UNSAFE, NONSENSE or CANNOT_JUDGE")
        require(len(note) <= 2000, "note", "longer than 2000 characters")
        lease = self.lease_of(lease_id, rater_id)
        require(response_id in lease.response_ids, "response_id", "is not a candidate of this task")
        flag_id = self.db.add_flag(rater_id, lease.prompt_id, response_id, FLAG_REASONS[reason], note)
        with self._lock:
            self._flagged.add(response_id)
        FLAGS.labels(FLAG_REASONS[reason]).inc()
        return flag_id

    def flagged(self) -> set[str]:
        with self._lock:
            return set(self._flagged)

    def gold_counts(self) -> dict[str, tuple[int, int]]:
        """rater -> (correct, total) over the strictly ordered gold pairs the rater judged.

        The evidence the reliability estimator can take: a judgement of a gold pair is correct when
        it prefers the gold winner (a tie on a strict gold pair is wrong; gold ties are not scored).
        """
        gold = self.db.gold()
        out: dict[str, list[int]] = {}
        for prompt_id, ranks in gold.items():
            j = self.store.judgements(prompt_id)
            for rater, winner, loser, tie in zip(j.rater_id, j.winner_id, j.loser_id, j.tie):
                if winner not in ranks or loser not in ranks or ranks[winner] == ranks[loser]:
                    continue
                c = out.setdefault(rater, [0, 0])
                c[0] += int(not tie and ranks[winner] < ranks[loser])
                c[1] += 1
        for rater, (correct, total) in out.items():
            GOLD_ACCURACY.labels(rater).set(correct / total)
        return {r: (c, t) for r, (c, t) in out.items()}
