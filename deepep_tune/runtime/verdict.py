"""The audit's verdict, shared by every library's audit (runtime/audit.py for DeepEP v1, runtime/elastic.py and
runtime/hybrid.py for V2 and HybridEP): a status, one line to print, and the parts that are not in effect."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

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
