"""The open task groups in leasing order, so that a lease costs O(log pool) and not a scan of the pool.

`TaskBoard.lease` used to scan every group ever seen, under the board's lock: 1.6 ms at 800 groups,
25 ms at 10,000 and 142 ms at 50,000 (measured 2026-12-02), and a running loop's pool only grows.
`OpenTasks` holds the groups that can still be leased and serves the two draws a lease makes:

- `first(accept)`: the highest-priority group a predicate accepts (a rater's own exclusions: groups
  it has seen, groups still settling). A heap with lazy deletion: changing a group's priority pushes
  a new entry with a new stamp; entries whose stamp is not current are dropped when they surface.
  Groups passed over are pushed back, so a lease costs O((passed over + 1) log n).
- `draw(accept)`: a uniformly random accepted group (the board's unbiased evaluation share), by
  rejection from an array of the keys (swap-remove keeps it dense): exactly uniform over the accepted
  groups, with a scan only when a rater has seen nearly all of the pool.

Priorities are tuples (smaller leases first); ties are broken at random, as the scan did.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Hashable

Key = Hashable


class OpenTasks:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._heap: list[tuple[tuple, float, int, Key]] = []  # (priority, tie-break, stamp, key)
        self._stamp: dict[Key, int] = {}
        self._keys: list[Key] = []
        self._pos: dict[Key, int] = {}
        self._counter = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Key) -> bool:
        return key in self._pos

    def __iter__(self):
        return iter(self._keys)

    def put(self, key: Key, priority: tuple) -> None:
        """Add `key` with `priority`, or move it there."""
        if key not in self._pos:
            self._pos[key] = len(self._keys)
            self._keys.append(key)
        self._counter += 1
        self._stamp[key] = self._counter
        heapq.heappush(self._heap, (priority, self._rng.random(), self._counter, key))
        if len(self._heap) > 4 * len(self._keys) + 1024:  # stale entries would otherwise pile up
            self._heap = [e for e in self._heap if self._stamp.get(e[3]) == e[2]]
            heapq.heapify(self._heap)

    def discard(self, key: Key) -> None:
        i = self._pos.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._pos[last] = i
        del self._stamp[key]

    def first(self, accept: Callable[[Key], bool]) -> Key | None:
        """The highest-priority key that `accept` takes, or None. `accept` may `discard` keys."""
        passed: list[tuple[tuple, float, int, Key]] = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._stamp.get(entry[3]) != entry[2]:
                continue  # stale: the key moved or left
            passed.append(entry)
            if accept(entry[3]):
                found = entry[3]
                break
        for entry in passed:
            heapq.heappush(self._heap, entry)
        return found

    def draw(self, accept: Callable[[Key], bool], tries: int = 64) -> Key | None:
        """A uniformly random key among those `accept` takes, or None."""
        for _ in range(tries):
            if not self._keys:
                return None
            key = self._keys[self._rng.randrange(len(self._keys))]
            if accept(key):
                return key
        accepted = [k for k in list(self._keys) if accept(k)]
        return self._rng.choice(accepted) if accepted else None

    def count_unseen(self, seen: set) -> int:
        """Open keys not in `seen` (O(len(seen)))."""
        return len(self._keys) - sum(1 for k in seen if k in self._pos)
