"""Test helpers that go with the fake deep_ep (not part of the real wheel's layout)."""

from __future__ import annotations

import os

FAKE_DIR = os.path.dirname(os.path.abspath(__file__))


class LocalGroup:
    """Stands in for a torch ProcessGroup of `size` ranks inside one process: deep_ep.Buffer only asks a group
    for rank(), size() and all_gather_object. The fake Buffer answers all_gather_object locally for it."""

    def __init__(self, rank: int = 0, size: int = 2) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return f"LocalGroup(rank={self._rank}, size={self._size})"
