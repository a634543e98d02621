"""Chunk planning: how one scoring call is split into forward passes of a sequence model."""

from __future__ import annotations

from typing import Sequence


def plan_chunks(sorted_lengths: Sequence[int], max_batch_size: int, overhead_tokens: int) -> list[tuple[int, int]]:
    """Split items sorted by token length into chunks [start, end) of at most `max_batch_size`.

    Cost model of one forward pass: `overhead_tokens + items * longest` token positions (the fixed
    per-pass cost - kernel launches, Python, small matmuls - expressed in tokens, plus the padded
    batch). Exact minimum-cost split by dynamic programming over the sorted order (n <= a few
    hundred, n * max_batch_size steps). Equal lengths give one chunk per `max_batch_size` items;
    one very long pair among short ones gets a pass of its own instead of padding everyone.
    """
    n = len(sorted_lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest plan for the first j items
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = sorted_lengths[end - 1]  # sorted ascending: the chunk's last item is its longest
        for start in range(max(0, end - max_batch_size), end):
            cost = best[start] + overhead_tokens + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks = []
    end = n
    while end > 0:
        chunks.append((cut[end], end))
        end = cut[end]
    return chunks[::-1]
