"""Union-find over dense integer ids: the one disjoint-set structure of the walk.

The tracer joins coupled (node, side, channel) triples and then coupled sides with it; the group builders join
positions into units (stripes of grouped convolutions, positions reached through several roots).
"""

from __future__ import annotations

__all__ = ["UnionFind"]


class UnionFind:
    """Disjoint sets over ids ``0 .. len - 1``; ``add`` appends a fresh singleton. A union keeps the smaller root,
    so every set's representative is its smallest member."""

    def __init__(self, n: int = 0):
        self.parent = list(range(n))

    def __len__(self) -> int:
        return len(self.parent)

    def add(self) -> int:
        """A new singleton set; returns its id."""
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_by_key(self, ids, keys) -> None:
        """Join every two ids whose keys are equal (``ids[i]`` has key ``keys[i]``)."""
        first: dict = {}
        for r, k in zip(ids, keys, strict=True):
            if k in first:
                self.union(first[k], r)
            else:
                first[k] = r
