"""How many channels each group loses for a channel ratio, and which ones.

``uniform``: every group loses ``ratio`` of its channels. ``global``: one threshold over all groups' scores, each
group's scores divided by their mean first (so groups compare on one scale), then the same total as uniform is
removed where the scores are lowest. Every group keeps at least ``min_keep`` channels (``round_to`` when rounding);
``round_to`` rounds each kept count to a multiple of it (8 suits the SIMD widths of CPU kernels).
"""

from __future__ import annotations

import numpy as np

ALLOCATIONS = ("global", "uniform")


def _keep_count(size: int, keep: int, round_to: int, min_keep: int) -> int:
    keep = max(keep, min_keep, 1)
    if round_to > 1 and size > round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(keep, size)


def allocate(scores: dict[int, np.ndarray], ratio: float, mode: str = "global", round_to: int = 1,
             min_keep: int = 1) -> dict[int, np.ndarray]:
    """Channel indices to remove per group id for a fraction ``ratio`` of all prunable channels."""
    if ratio <= 0 or not scores:
        return {gid: np.zeros(0, dtype=np.int64) for gid in scores}
    counts: dict[int, int] = {}
    if mode == "uniform":
        for gid, s in scores.items():
            counts[gid] = s.size - int(round(s.size * (1.0 - ratio)))
    else:
        flat = []
        for gid, s in scores.items():
            mean = float(np.mean(s))
            norm = s / mean if mean > 0 else s
            order = np.argsort(norm, kind="stable")
            # The channels that must stay (min_keep) are never candidates.
            for rank, idx in enumerate(order[: max(0, s.size - max(min_keep, 1))]):
                flat.append((float(norm[idx]), gid, rank))
        total = sum(s.size for s in scores.values())
        budget = int(round(total * ratio))
        flat.sort()
        counts = {gid: 0 for gid in scores}
        for _, gid, _ in flat[:budget]:
            counts[gid] += 1
    removed: dict[int, np.ndarray] = {}
    for gid, s in scores.items():
        keep = _keep_count(s.size, s.size - counts[gid], round_to, min_keep)
        order = np.argsort(s, kind="stable")
        removed[gid] = np.sort(order[: s.size - keep]).astype(np.int64)
    return removed


def removed_fraction(scores: dict[int, np.ndarray], removed: dict[int, np.ndarray]) -> float:
    total = sum(s.size for s in scores.values())
    return sum(r.size for r in removed.values()) / total if total else 0.0
