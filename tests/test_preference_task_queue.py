"""The open-task index behind TaskBoard.lease: same choices as a scan of the whole pool, without the scan.

The reference is the rule the board documents (tasks.py): among the groups a rater may take (free
slot, not seen, settled, enough unflagged candidates), the newest policy version first, then the
least certain consensus (smallest z), then the fewest raters; ties at random.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from test_preference_service import rollouts_for

from flywheel.preference.store import PreferenceStore
from flywheel.preference.task_queue import OpenTasks
from flywheel.preference.tasks import QUEUE_DEPTH, TaskBoard, TaskDB
from flywheel.v1 import preference_pb2


def test_first_takes_the_highest_priority_accepted_key_and_keeps_the_rest():
    q = OpenTasks(random.Random(0))
    for key, prio in (("a", (0, 2.0)), ("b", (0, 1.0)), ("c", (-1, 5.0)), ("d", (0, 0.5))):
        q.put(key, prio)
    assert q.first(lambda k: True) == "c"
    assert q.first(lambda k: k != "c") == "d"
    q.put("d", (1, 0.0))  # moved behind everyone: its old entry is stale
    assert q.first(lambda k: k != "c") == "b"
    q.discard("b")
    assert q.first(lambda k: k != "c") == "a"
    assert sorted(q) == ["a", "c", "d"] and len(q) == 3 and "b" not in q
    assert q.first(lambda k: False) is None
    assert q.first(lambda k: True) == "c"  # keys passed over were put back


def test_draw_is_uniform_over_accepted_keys_and_stale_entries_are_compacted():
    rng = random.Random(1)
    q = OpenTasks(rng)
    for i in range(20):
        q.put(i, (i,))
    for _ in range(2000):  # re-prioritising leaves stale entries; the heap must not grow without bound
        q.put(rng.randrange(20), (rng.random(),))
    assert len(q._heap) <= 4 * len(q) + 1024
    draws = Counter(q.draw(lambda k: k % 4 == 0) for _ in range(5000))
    assert set(draws) == {0, 4, 8, 12, 16}
    assert min(draws.values()) > 850 and max(draws.values()) < 1150  # 1000 each expected
    assert q.draw(lambda k: k == 19) == 19  # falls back to a scan when rejection keeps missing
    assert q.draw(lambda k: False) is None


def reference_best(board: TaskBoard, rater: str, need: int) -> set[tuple]:
    """Priorities of the groups a full scan would consider best for `rater` (the old lease rule)."""
    seen = board._seen.get(rater, set())
    eligible = [g for g in board._groups.values()
                if len(g.done) + g.active < board.overlap and g.key not in seen
                and len(board._candidates(g)) >= need]
    if not eligible:
        return set()
    best = min((-g.version_order, g.z, len(g.done) + g.active) for g in eligible)
    return {g.key for g in eligible if (-g.version_order, g.z, len(g.done) + g.active) == best}


def test_leases_match_a_full_scan_under_random_traffic(tmp_path):
    rng = random.Random(7)
    store = PreferenceStore(tmp_path / "store.sqlite")
    board = TaskBoard(store, TaskDB(tmp_path / "tasks.sqlite"), overlap=2, lease_s=600, random_share=0.0,
                      gold_rate=0.0, max_candidates=4, seed=3)
    raters = [f"r{i}" for i in range(6)]
    live: list[tuple[str, str, str]] = []  # (lease id, rater, prompt)
    prompt = 0
    checked = 0
    for step in range(600):
        op = rng.random()
        if op < 0.08:  # a new batch of rollouts: sometimes a new version, sometimes single-candidate groups
            version = f"v{step // 150}"
            batch = []
            for _ in range(rng.randint(1, 6)):
                batch += rollouts_for(f"p{prompt}", rng.choice([1, 2, 4]), version)
                prompt += 1
            store.record_rollouts(batch)
            board.refresh()
        elif op < 0.14 and board._groups:  # consensus refits change certainty
            keys = rng.sample(sorted(board._groups), min(5, len(board._groups)))
            fits = {k[0]: [(r, rng.gauss(0, 1), rng.uniform(0.1, 1)) for r in board._groups[k].response_ids]
                    for k in keys}
            board.refresh(fits)
        elif op < 0.20 and live:  # a rater skips
            lease_id, rater, _ = live.pop(rng.randrange(len(live)))
            board.release(lease_id, rater)
        elif op < 0.45 and live:  # a rater submits
            lease_id, rater, prompt_id = live.pop(rng.randrange(len(live)))
            board.complete(lease_id, rater, prompt_id)
        elif op < 0.48 and live:  # a flag removes a candidate
            lease_id, rater, _ = live[rng.randrange(len(live))]
            lease = board.lease_of(lease_id, rater)
            board.flag(lease_id, rater, rng.choice(lease.response_ids), preference_pb2.FLAG_REASON_NONSENSE, "")
        else:
            rater = rng.choice(raters)
            demonstrate = rng.random() < 0.1
            kind = preference_pb2.TASK_KIND_DEMONSTRATE if demonstrate else preference_pb2.TASK_KIND_UNSPECIFIED
            expected = reference_best(board, rater, 1 if demonstrate else 2)
            lease, remaining = board.lease(rater, kind)
            if lease is None:
                assert not expected, f"step {step}: no lease, but a scan finds {expected}"
            else:
                assert lease.key in expected, f"step {step}: leased {lease.key}, a scan picks among {expected}"
                live.append((lease.lease_id, rater, lease.prompt_id))
                checked += 1
    assert checked > 150 and prompt > 50


def test_random_share_draws_only_eligible_groups_and_gauges_count_open_slots(tmp_path):
    store = PreferenceStore(tmp_path / "store.sqlite")
    store.record_rollouts([r for p in range(30) for r in rollouts_for(f"p{p}", 3, "vq")])
    board = TaskBoard(store, TaskDB(tmp_path / "tasks.sqlite"), overlap=2, lease_s=600, random_share=1.0,
                      gold_rate=0.0, max_candidates=4, seed=5)
    board.refresh()
    assert QUEUE_DEPTH.labels("vq")._value.get() == 60 and board.queue_depth() == {"vq": 60}
    got = set()
    for _ in range(30):
        lease, remaining = board.lease("solo")
        assert lease is not None and lease.key not in got
        got.add(lease.key)
        assert remaining == 30 - len(got)
    assert board.lease("solo") == (None, 0)
    assert board.queue_depth() == {"vq": 30}  # each group: one slot leased, one free


@pytest.mark.parametrize("groups", [20_000])
def test_a_lease_does_not_scan_the_pool(tmp_path, groups):
    """Leasing from a large pool touches the best groups, not all of them (it used to scan them all)."""
    store = PreferenceStore(tmp_path / "store.sqlite")
    store.record_rollouts([r for p in range(groups) for r in rollouts_for(f"p{p}", 2, "v")])
    board = TaskBoard(store, TaskDB(tmp_path / "tasks.sqlite"), overlap=1, lease_s=600, random_share=0.5,
                      gold_rate=0.0, max_candidates=4, seed=0)
    board.refresh()
    looked: list[int] = []
    real = board._candidates
    board._flagged = {"nothing-flagged"}  # makes eligibility read the candidates, so looks can be counted

    def counting(g):
        looked.append(1)
        return real(g)

    board._candidates = counting
    for i in range(50):
        assert board.lease(f"r{i}")[0] is not None
    assert len(looked) < 50 * 20, f"{len(looked)} groups examined for 50 leases from a pool of {groups}"
