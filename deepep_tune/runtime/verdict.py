"""The audit's verdict, shared by every library's audit (runtime/audit.py for DeepEP v1, runtime/elastic.py and
runtime/hybrid.py for V2 and HybridEP): a status, one line to print, and the parts that are not in effect."""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Iterable, Mapping

PREFIX = "deepep-tune audit: "
IN_EFFECT, NOT_IN_EFFECT, UNCONFIRMED, NO_CALLS, NO_RESULTS = (
    "in effect", "NOT in effect", "unconfirmed", "no calls", "no results")


@dataclass(frozen=True)
class Verdict:
    status: str
    line: str
    # Which parts are not in effect, keyed by the part ("num_sms", "dispatch", "combine", "buffer", ...); each
    # value is that part's text in the line.
    parts: Mapping[str, str] = field(default_factory=dict)

    @property
    def in_effect(self) -> bool:
        return self.status == IN_EFFECT


def other_sizes_note(calls: Iterable[tuple[int, int]], ep: int, noun: str) -> str:
    """Calls (group size, count) on groups of another size than ep are not judged, but are mentioned so they are not
    silently dropped."""
    others: collections.Counter[int] = collections.Counter()
    for size, n in calls:
        if size != ep:
            others[size] += n
    return "".join(f" (+{n} calls on {g}-rank {noun}, not ep{ep})" for g, n in sorted(others.items()))


class AuditLifecycle:
    """start()/stop() and the context manager every library's audit shares (runtime/audit.py, elastic.py,
    hybrid.py); a subclass says how it hooks into its library (_install/_uninstall) and gives verdict()."""

    active = False
    quiet = False

    def _install(self) -> None:
        raise NotImplementedError

    def _uninstall(self) -> None:
        raise NotImplementedError

    def verdict(self) -> Verdict:
        raise NotImplementedError

    def start(self) -> "AuditLifecycle":
        if not self.active:
            self._install()
            self.active = True
        return self

    def stop(self) -> None:
        if self.active:
            self.active = False
            self._uninstall()

    def __enter__(self) -> "AuditLifecycle":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if not self.quiet:
            print(self.verdict().line, file=sys.stderr, flush=True)
