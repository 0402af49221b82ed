"""The knob space a tuned library declares, and the candidates the tuner measures.

A library (DeepEP v1's Buffer, V2's ElasticBuffer, HybridEP) declares its knobs per op, which of them one answer
gives both ops the same value, which knob counts SMs, the grid it sweeps, its validity rules and its baselines.
Search, measurement records, resume, the results file and the reports work from that declaration alone, so a
new library is a backend plus a declaration; nothing under tune/ changes for it."""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

OPS = ("dispatch", "combine")
SMS = "num_sms"  # every library names the knob that counts an op's SMs so


@dataclass(frozen=True, order=True)
class Knobs:
    """One candidate for one op: knob names and values in the declaration's order. Hashable and ordered by its
    values, so it keys the timings; `cfg.num_sms` reads a knob."""

    items: tuple[tuple[str, Any], ...]

    def __hash__(self) -> int:
        # By value only: str hashes differ per process (PYTHONHASHSEED), and every rank must iterate sets of
        # configs in the same order, or the ranks would measure different configs in one collective.
        return hash(self.values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "items":
            raise AttributeError(name)
        for k, v in self.items:
            if k == name:
                return v
        raise AttributeError(f"no knob {name!r} in {self.names}")

    @classmethod
    def of(cls, names: Iterable[str], values: Iterable[Any]) -> "Knobs":
        return cls(tuple(zip(names, values)))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.items)

    @property
    def values(self) -> tuple[Any, ...]:
        return tuple(v for _, v in self.items)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.items)

    def replace(self, **changes: Any) -> "Knobs":
        return Knobs(tuple((k, changes.get(k, v)) for k, v in self.items))

    def __str__(self) -> str:
        return "(" + ", ".join(str(v) for v in self.values) + ")"


@dataclass
class Baseline:
    """A fixed pair of configs the pick is compared with, measured like any config."""

    name: str
    description: str
    dispatch: Knobs
    combine: Knobs
    dispatch_us: float | None = None
    combine_us: float | None = None
    skipped: str | None = None

    @property
    def total_us(self) -> float | None:
        if self.dispatch_us is None or self.combine_us is None:
            return None
        return self.dispatch_us + self.combine_us


Grid = Mapping[str, Mapping[str, tuple[Any, ...]]]  # op -> knob -> values, in the declaration's knob order


@dataclass(frozen=True, eq=False)
class KnobSpace:
    """What a library declares about its knobs.

    knobs: the knob names of each op, in order (a measurement record carries them as top-level keys).
    shared: knobs an answer gives both ops the same value (DeepEP v1's num_sms: the dispatch handle fixes it for
    the combine).
    grid(sms_cap): the values each op sweeps. error(op, cfg): why the library would refuse cfg, or None.
    fits(op, cfg, ep_size, workload, max_buffer_bytes): why cfg is left out of this run (memory), or None.
    baselines(ep_size, answer_sms, facts): the library's own choices, compared with the pick; facts are the
    backend's (e.g. an SM count the library's model computed on this node).
    probe(op, grid): the config quick mode measures first at one SM count.
    Every op has a knob named num_sms (SMS): the SMs it occupies, which an SM budget and the per-num_sms table use.
    buffer_needs(dispatch, combine, workload, ep_size): communication-buffer bytes the answer needs, or None.
    layer_baselines: the baselines the MoE layer check times beside the pick; the first is its speed-up reference
    (what the library's consumers run untuned)."""

    library: str
    knobs: Mapping[str, tuple[str, ...]]
    shared: tuple[str, ...]
    grid: Callable[[int], Grid]
    error: Callable[[str, Knobs], str | None]
    baselines: Callable[[int, int, Mapping[str, Any]], list[Baseline]]
    fits: Callable[[str, Knobs, int, Any, float], str | None] | None = None
    probe: Callable[[str, list[Knobs]], Knobs] | None = None
    buffer_needs: Callable[[Knobs, Knobs, Any, int], dict[str, int] | None] | None = None
    layer_baselines: tuple[str, ...] = ()
    notes: Mapping[str, str] = field(default_factory=dict)

    def config(self, op: str, *values: Any, **named: Any) -> Knobs:
        names = self.knobs[op]
        vals = list(values) + [named[n] for n in names[len(values):]]
        return Knobs.of(names, vals)

    def sms_of(self, cfg: Knobs) -> int:
        return int(getattr(cfg, SMS))

    @property
    def sms_shared(self) -> bool:
        return SMS in self.shared

    def group_of(self, cfg: Knobs) -> tuple[tuple[str, Any], ...]:
        """The values of the shared knobs other than the SM count: configs of one answer agree on them."""
        return tuple((k, v) for k, v in cfg.items if k in self.shared and k != SMS)

    def key_of(self, rec: Mapping[str, Any]) -> tuple[str, Knobs]:
        """(op, config) of a measurement record."""
        op = rec["op"]
        return op, Knobs.of(self.knobs[op], (rec[k] for k in self.knobs[op]))

    def is_record(self, rec: Any) -> bool:
        """A measurement of this library: an op and every knob of it, each an int or a bool (JSON's own types)."""
        return (isinstance(rec, Mapping) and rec.get("op") in OPS
                and all(type(rec.get(k)) in (int, bool) for k in self.knobs[rec["op"]]))

    def build(self, sms_cap: int, fits: Callable[[str, Knobs], bool]) -> tuple["Space", int]:
        """The grid's product per op, keeping configs the library accepts and `fits` admits: (space, pruned)."""
        grid = self.grid(sms_cap)
        ops: dict[str, list[Knobs]] = {op: [] for op in OPS}
        pruned = 0
        for op in OPS:
            names = self.knobs[op]
            for values in itertools.product(*(grid[op][n] for n in names)):
                cfg = Knobs.of(names, values)
                if self.error(op, cfg) is None and fits(op, cfg):
                    ops[op].append(cfg)
                else:
                    pruned += 1
        return Space(self, tuple(ops["dispatch"]), tuple(ops["combine"])), pruned

    def space_of(self, points: Iterable[tuple[str, Knobs]]) -> "Space":
        ops: dict[str, set[Knobs]] = {op: set() for op in OPS}
        for op, cfg in points:
            ops[op].add(cfg)
        return Space(self, tuple(sorted(ops["dispatch"])), tuple(sorted(ops["combine"])))

    def probe_config(self, op: str, grid: list[Knobs]) -> Knobs:
        if self.probe is not None:
            return self.probe(op, grid)
        # A value a third of the way up each other knob's range: neither the smallest nor the largest.
        free = [k for k in self.knobs[op] if k != SMS]
        target = {k: sorted({getattr(c, k) for c in grid})[len({getattr(c, k) for c in grid}) // 3] for k in free}
        return min(grid, key=lambda c: (tuple(abs(getattr(c, k) - target[k]) for k in free), c))


@dataclass(frozen=True)
class Space:
    """The configs each op may be measured at."""

    decl: KnobSpace = field(compare=False)
    dispatch: tuple[Knobs, ...]
    combine: tuple[Knobs, ...]

    def configs(self, op: str) -> tuple[Knobs, ...]:
        return self.dispatch if op == "dispatch" else self.combine

    def sms_values(self) -> list[int]:
        """SM counts of the table: those both ops have when they share the count, else those either has."""
        d, c = ({self.decl.sms_of(x) for x in self.configs(op)} for op in OPS)
        return sorted(d & c if self.decl.sms_shared else d | c)

    def groups(self) -> list[tuple[tuple[str, Any], ...]]:
        d, c = ({self.decl.group_of(x) for x in self.configs(op)} for op in OPS)
        return sorted(d & c)

    def grid(self, op: str, num_sms: int) -> list[Knobs]:
        return sorted(c for c in self.configs(op) if self.decl.sms_of(c) == num_sms)

    def size(self) -> int:
        return len(self.dispatch) + len(self.combine)

    def restrict(self, max_sms: int | None) -> "Space":
        if max_sms is None:
            return self
        keep = lambda cs: tuple(c for c in cs if self.decl.sms_of(c) <= max_sms)  # noqa: E731
        return Space(self.decl, keep(self.dispatch), keep(self.combine))


# The libraries this tool knows, by name; "package.module:ATTR" names any other declaration (tests use that).
LIBRARIES = {
    "deepep-v1": "deepep_tune.deepep.config:V1",
    "deepep-v2": "deepep_tune.deepep.elastic:V2",
    "hybridep": "deepep_tune.deepep.hybrid:HYBRID",
}


def load_library(name: str) -> KnobSpace:
    """The declaration called `name`: a known library or "module:attribute". Raises ValueError (one line)."""
    spec = LIBRARIES.get(name, name)
    module, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"unknown library {name!r}: use one of {', '.join(LIBRARIES)} or module:ATTRIBUTE")
    try:
        decl = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"library {name!r}: cannot load {spec} ({e})") from None
    if not isinstance(decl, KnobSpace):
        raise ValueError(f"library {name!r}: {spec} is not a KnobSpace")
    return decl
