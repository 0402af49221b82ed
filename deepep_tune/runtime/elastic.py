"""Runtime side of DeepEP V2 (`deep_ep.ElasticBuffer`): put a tuned answer into effect, and audit which SM count
each dispatch/combine really used.

    from deepep_tune.runtime.elastic import apply, audit
    apply("RESULTS_EP8_deepep-v2.json")        # before the first MoE forward (the buffer may already exist)
    with audit() as a:                        # compares with what apply installed (or audit(path))
        train()
    print(a.verdict().line)

Where a V2 consumer's SM count comes from (DeepEP main dd758ca, deep_ep/buffers/elastic.py):
  dispatch(num_sms=0)   -> self.get_theoretical_num_sms(num_experts, num_topk)         (L927-929)
  combine(num_sms=0)    -> handle.num_sms, the SM count of the dispatch that made the handle  (L1086)
  torchtitan main passes buffer.get_theoretical_num_sms(...) explicitly to the forward dispatch and nothing to
  the combines; vLLM passes nothing; SGLang passes SGLANG_DEEPEP_V2_NUM_SMS (0 -> get_theoretical_num_sms) to
  dispatch AND combine.

apply() therefore
  1. replaces ElasticBuffer.get_theoretical_num_sms on the class with one that returns the tuned dispatch count
     for buffers of the tuned rank count (DeepEP's own model otherwise). Attribute lookup goes through the class
     at each call, so it reaches buffers that already exist and modules that bound the class at import;
  2. wraps ElasticBuffer.combine so that a call with num_sms=0 (torchtitan, vLLM) runs the tuned combine count
     (intranode buffers of the tuned rank count only: multi-node hybrid mode ties combine to the dispatch split);
  3. with force=True, also overwrites explicit num_sms= (and lets DeepEP re-derive num_qps): the only way to
     reach a combine count that differs from the dispatch one in SGLang, which passes one value explicitly to both.
It cannot reach: other processes (spawned workers must apply themselves: a vllm.general_plugins entry point, a
sitecustomize), kernels already captured in a CUDA graph, and without force any explicit num_sms= a caller passes.

The audit wraps ElasticBuffer.dispatch/combine (one wrapper per method, shared with apply, so the recorded count
is the one passed on to DeepEP after apply's changes) and records per call the SM count DeepEP resolves:
explicit num_sms if non-zero; else for a handle-less dispatch the returned handle.num_sms (built from the count
used, L999-1015); for a cached dispatch get_theoretical_num_sms(num_experts, topk) (L928); for combine
handle.num_sms (L1086).

Only deepep_tune.record and the standard library are imported here; deep_ep (and torch) only when called.
"""

from __future__ import annotations

import collections
import functools
import gc
import inspect
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

from ..record.results import Results, TunedKnobs, load_tuned
from .verdict import (  # noqa: F401
    IN_EFFECT,
    NO_CALLS,
    NO_RESULTS,
    NOT_IN_EFFECT,
    PREFIX,
    UNCONFIRMED,
    AuditLifecycle,
    Verdict,
    other_sizes_note,
)

LIBRARY = "deepep-v2"
APPLY_ENV = "DEEPEP_TUNE_APPLY"
FORCE_ENV = "DEEPEP_TUNE_APPLY_FORCE"  # "1": apply_from_env(force=True)
SGLANG_ENV = "SGLANG_DEEPEP_V2_NUM_SMS"
# The same marks as deepep_tune.runtime.apply: re-applying (even after this module was reloaded) unwraps.
MARK = "__deepep_tune__"
ORIGINAL = "__deepep_tune_original__"

# Verdict statuses (the same strings as deepep_tune.runtime.audit)
OPS = ("dispatch", "combine")


class TunedConfigWarning(UserWarning):
    """The results may not fit this process, or part of them cannot be put into effect here."""


# ----------------------------------------------------------------------------------------------------------
# Shared helpers (runtime.hybrid uses them too)


def tuned_sms(tuned: TunedKnobs) -> dict[str, int]:
    return {op: int(getattr(tuned, op)["num_sms"]) for op in OPS}


def fit_notes(tuned: TunedKnobs, shapes: Optional[Mapping[str, Optional[int]]] = None) -> list[str]:
    """Why the results may not fit this process: another GPU, another world size, other model shapes (hidden,
    num_topk, num_experts, when given), not a real measurement."""
    notes = []
    differ = [(k, tuned.workload.get(k), v) for k, v in (shapes or {}).items()
              if v is not None and tuned.workload.get(k) is not None and tuned.workload.get(k) != v]
    if differ:
        notes.append("deepep-tune: results were tuned for " + ", ".join(f"{k}={w}" for k, w, _ in differ)
                     + " but this model has " + ", ".join(f"{k}={v}" for k, _, v in differ)
                     + "; re-tune for these shapes")
    here = _device_name()
    if here is not None and tuned.device_name and here != tuned.device_name:
        notes.append(f"deepep-tune: results were measured on {tuned.device_name!r} but this process runs on "
                     f"{here!r}; re-tune on this hardware")
    world = os.environ.get("WORLD_SIZE", "").strip()
    if world.isdigit() and int(world) != tuned.ep_size:
        notes.append(f"deepep-tune: results are for {tuned.ep_size} ranks but this job has {world}; the tuned values "
                     f"serve only {tuned.ep_size}-rank EP groups")
    if tuned.backend not in (None, "deepep", "deepep-v2", "hybridep", "v2", "hybrid"):
        notes.append(f"deepep-tune: results come from the {tuned.backend!r} backend, not a measurement on the "
                     "library; use them to test the plumbing, not for speed")
    elif tuned.colocated:
        notes.append("deepep-tune: results were measured with several ranks sharing one GPU; they are functional, "
                     "not values for a real node")
    return notes


def _device_name() -> Optional[str]:
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:
        pass
    return None


def unwrap(raw: Any) -> Any:
    """The library's own class attribute under any deepep_tune wrappers."""
    while getattr(raw, MARK, False):
        raw = getattr(raw, ORIGINAL)
    return raw


def mark(wrapper: Callable, original: Callable) -> Callable:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, True)
    setattr(wrapper, ORIGINAL, original)
    return wrapper


def live_instances(cls: type) -> list[Any]:
    # type(o), not isinstance: some objects (torch's deprecated aliases) warn when their __class__ is read.
    return [o for o in gc.get_objects() if issubclass(type(o), cls)]


def count_text(n: int, cached: int | None = None) -> str:
    return f"x{n}" + (f" ({n - cached} non-cached, {cached} cached)" if cached is not None else "")


def is_printing_rank() -> bool:
    rank = os.environ.get("RANK", "").strip()
    return os.environ.get("DEEPEP_TUNE_AUDIT_ALL_RANKS", "") == "1" or not rank.isdigit() or int(rank) == 0


# ----------------------------------------------------------------------------------------------------------
# apply / unapply


@dataclass(frozen=True)
class Applied:
    library: str
    ep_size: int
    dispatch_sms: int
    combine_sms: int
    force: bool
    source: str
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        how = "forced on every call" if self.force else "where the caller leaves num_sms to DeepEP"
        return (f"deepep-tune: applied {self.source} ({self.library}) for ep{self.ep_size}: dispatch "
                f"{self.dispatch_sms} SMs, combine {self.combine_sms} SMs ({how})")


_applied: Optional[Applied] = None


def current() -> Optional[Applied]:
    return _applied


def apply(results: Results, *, force: bool = False, hidden: Optional[int] = None, num_topk: Optional[int] = None,
          num_experts: Optional[int] = None) -> Applied:
    """Put the tuned V2 SM counts of `results` (a results file or its dict, library deepep-v2) into effect in this
    process: ElasticBuffer.get_theoretical_num_sms returns the tuned dispatch count and combine(num_sms=0) runs
    the tuned combine count, for buffers of the tuned rank count. force=True also overwrites explicit num_sms=
    (SGLang). hidden/num_topk/num_experts, when given, are checked against the tuned workload (a warning). Applying
    again replaces the previous apply; unapply() restores DeepEP."""
    global _applied
    tuned = load_tuned(results, LIBRARY)
    sms = tuned_sms(tuned)
    for op, n in sms.items():
        if n <= 0:
            raise ValueError(f"{tuned.source}: best.{op}.num_sms must be positive, got {n}")
    import deep_ep
    cls = _buffer_class(deep_ep)
    notes = fit_notes(tuned, {"hidden": hidden, "num_topk": num_topk, "num_experts": num_experts})
    sgl = os.environ.get(SGLANG_ENV, "").strip()
    if not force and sgl not in ("", "0") and sgl != str(sms["dispatch"]):
        notes.append(f"deepep-tune: {SGLANG_ENV}={sgl} is set: SGLang passes it as num_sms= to dispatch and combine, "
                     f"so apply does not reach SGLang; set it to {sms['dispatch']} (one count for both ops) or "
                     "apply(..., force=True)")
    for note in notes:
        warnings.warn(note, TunedConfigWarning, stacklevel=2)
    if _applied is not None:
        _uninstall_theoretical(cls)
    _applied = Applied(LIBRARY, tuned.ep_size, sms["dispatch"], sms["combine"], force, tuned.source, tuple(notes))
    _install_theoretical(cls)
    _ensure_call_wrappers(cls)
    return _applied


def unapply() -> bool:
    """Restore DeepEP's get_theoretical_num_sms and (when no audit is active) dispatch/combine."""
    global _applied
    if _applied is None:
        return False
    _applied = None
    cls = _hooks.get("cls")
    if cls is not None:
        _uninstall_theoretical(cls)
    _release_call_wrappers()
    return True


def apply_from_env() -> Optional[Applied]:
    """apply($DEEPEP_TUNE_APPLY, force=$DEEPEP_TUNE_APPLY_FORCE == "1") when the variable is set."""
    path = os.environ.get(APPLY_ENV, "").strip()
    return apply(path, force=os.environ.get(FORCE_ENV, "") == "1") if path else None


def _buffer_class(deep_ep: Any) -> type:
    cls = getattr(deep_ep, "ElasticBuffer", None)
    if cls is None:
        raise ImportError(f"this deep_ep ({getattr(deep_ep, '__file__', '?')}) has no ElasticBuffer: DeepEP V2 "
                          "(deepseek-ai/DeepEP main) is not the installed deep_ep")
    return cls


def _install_theoretical(cls: type) -> None:
    original = unwrap(cls.__dict__["get_theoretical_num_sms"])

    def get_theoretical_num_sms(self: Any, *args: Any, **kwargs: Any) -> int:
        a = _applied
        if a is not None and _ranks(self) == a.ep_size and _scaleout(self) <= 1:
            return a.dispatch_sms
        return original(self, *args, **kwargs)

    setattr(cls, "get_theoretical_num_sms", mark(get_theoretical_num_sms, original))


def _uninstall_theoretical(cls: type) -> None:
    raw = cls.__dict__.get("get_theoretical_num_sms")
    if getattr(raw, MARK, False):
        setattr(cls, "get_theoretical_num_sms", unwrap(raw))


def _ranks(buffer: Any) -> int:
    return int(getattr(buffer, "num_ranks", 0) or 0)


def _scaleout(buffer: Any) -> int:
    return int(getattr(buffer, "num_scaleout_ranks", 1) or 1)


# ----------------------------------------------------------------------------------------------------------
# The dispatch/combine wrappers, installed while apply or an audit is active. Apply's changes are made first and
# the audit records what is passed on, so the audit is always "innermost".

_hooks: dict = {}  # "cls": ElasticBuffer, "originals": {name: raw attribute}
_active: list["Audit"] = []


def _ensure_call_wrappers(cls: type) -> None:
    if _hooks:
        return
    originals = {}
    for name, make in (("dispatch", _wrap_dispatch), ("combine", _wrap_combine)):
        raw = unwrap(cls.__dict__[name])  # left by an earlier copy of this module: never stack
        originals[name] = raw
        setattr(cls, name, make(raw))
    _hooks.update(cls=cls, originals=originals)


def _release_call_wrappers() -> None:
    if _applied is not None or _active or not _hooks:
        return
    cls = _hooks["cls"]
    for name, raw in _hooks["originals"].items():
        if getattr(cls.__dict__.get(name), MARK, False):
            setattr(cls, name, raw)
    _hooks.clear()


def _intranode_tuned(self: Any, a: Applied) -> bool:
    return _ranks(self) == a.ep_size and _scaleout(self) <= 1


def _wrap_dispatch(original: Callable) -> Callable:
    signature = inspect.signature(original)

    def dispatch(self: Any, *args: Any, **kwargs: Any) -> Any:
        a = _applied
        if (a is None or not a.force) and not _active:
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # let DeepEP report the bad call
        arg = bound.arguments
        asked = int(arg.get("num_sms", 0) or 0)
        source = "explicit" if asked else ("theoretical" if arg.get("handle") is None else "theoretical (cached)")
        if a is not None and a.force and _intranode_tuned(self, a) and asked != a.dispatch_sms:
            arg["num_sms"], arg["num_qps"] = a.dispatch_sms, 0  # num_qps: DeepEP re-derives it from num_sms
            source = "forced"
        call = (bound.args, bound.kwargs)
        if not _active:
            return original(*call[0], **call[1])
        cached = arg.get("handle") is not None
        try:
            out = original(*call[0], **call[1])
        except BaseException:
            _record("dispatch", self, int(arg.get("num_sms", 0) or 0), source, cached, asked, failed=True)
            raise
        used = int(arg.get("num_sms", 0) or 0)
        if not used:
            try:
                used = int(out[3].num_sms) if not cached else int(self.get_theoretical_num_sms(
                    arg.get("num_experts"), arg["handle"].topk_idx.shape[1]))  # L928 with the handle's top-k
            except Exception:
                used = 0
        _record("dispatch", self, used, source, cached, asked, failed=False)
        return out
    return mark(dispatch, original)


def _wrap_combine(original: Callable) -> Callable:
    signature = inspect.signature(original)

    def combine(self: Any, *args: Any, **kwargs: Any) -> Any:
        a = _applied
        if a is None and not _active:
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)
        arg = bound.arguments
        asked = int(arg.get("num_sms", 0) or 0)
        source = "explicit" if asked else "handle"
        if a is not None and _intranode_tuned(self, a):
            if not asked:
                arg["num_sms"], source = a.combine_sms, "applied"
            elif a.force and asked != a.combine_sms:
                arg["num_sms"], arg["num_qps"], source = a.combine_sms, 0, "forced"
        if not _active:
            return original(*bound.args, **bound.kwargs)
        handle = arg.get("handle")
        used = int(arg.get("num_sms", 0) or 0) or int(getattr(handle, "num_sms", 0) or 0)  # L1086
        try:
            out = original(*bound.args, **bound.kwargs)
        except BaseException:
            _record("combine", self, used, source, False, asked, failed=True)
            raise
        _record("combine", self, used, source, False, asked, failed=False)
        return out
    return mark(combine, original)


def _record(op: str, buffer: Any, used: int, source: str, cached: bool, asked: int, failed: bool) -> None:
    key = CallRecord(op, used, source, cached, _ranks(buffer), _scaleout(buffer),
                     bool(getattr(buffer, "prefer_overlap_with_compute", True)), failed)
    for a in list(_active):
        a._calls[key] += 1


# ----------------------------------------------------------------------------------------------------------
# The audit


@dataclass(frozen=True)
class CallRecord:
    """Calls that ran alike (counted by the audit)."""

    op: str
    num_sms: int  # the SM count DeepEP ran the call with (0: could not be determined)
    source: str  # explicit | theoretical | theoretical (cached) | handle | applied | forced
    cached: bool  # a dispatch given a handle
    num_ranks: int
    num_scaleout_ranks: int
    prefer_overlap_with_compute: bool
    failed: bool = False


SOURCE_TEXT = {"explicit": "num_sms= passed by the caller", "theoretical": "DeepEP's get_theoretical_num_sms",
               "theoretical (cached)": "DeepEP's get_theoretical_num_sms", "handle": "handle.num_sms of its dispatch",
               "applied": "filled by deepep_tune.apply", "forced": "forced by deepep_tune.apply"}


class Audit(AuditLifecycle):
    """Records ElasticBuffer dispatch/combine calls while active; context manager or start()/stop()."""

    library = LIBRARY

    def __init__(self, results: Optional[Results] = None, *, quiet: bool = False) -> None:
        self._tuned = load_tuned(results, LIBRARY) if results is not None else None  # fail now, not at exit
        self.quiet = quiet
        self._calls: collections.Counter = collections.Counter()
        self.active = False

    def _install(self) -> None:
        import deep_ep
        cls = _buffer_class(deep_ep)
        _active.append(self)
        _ensure_call_wrappers(cls)

    def _uninstall(self) -> None:
        _active.remove(self)
        _release_call_wrappers()

    @property
    def records(self) -> list[tuple[CallRecord, int]]:
        return list(self._calls.items())

    def used(self, op: str) -> list[int]:
        """The SM counts `op` ran with, one entry per distinct count, most frequent first."""
        c = collections.Counter()
        for r, n in self._calls.items():
            if r.op == op and not r.failed:
                c[r.num_sms] += n
        return [k for k, _ in c.most_common()]

    def tuned(self) -> Optional[tuple[int, dict[str, int]]]:
        if self._tuned is not None:
            return self._tuned.ep_size, tuned_sms(self._tuned)
        a = current()
        return (a.ep_size, {"dispatch": a.dispatch_sms, "combine": a.combine_sms}) if a is not None else None

    def verdict(self) -> Verdict:
        return verdict(self.records, self.tuned())


def audit(results: Optional[Results] = None, *, quiet: bool = False) -> Audit:
    """`with audit(path) as a:` prints the verdict line on stderr at the end of the block. Without results it
    compares with what apply() installed."""
    return Audit(results, quiet=quiet)


def verdict(records: Iterable[tuple[CallRecord, int]], tuned: Optional[tuple[int, Mapping[str, int]]]) -> Verdict:
    """One line: whether every call on a tuned-size group ran the tuned SM count of its op, and if not, which."""
    records = list(records)
    if tuned is None:
        seen = _seen(records) or "no dispatch/combine calls"
        return Verdict(NO_RESULTS, f"{PREFIX}{LIBRARY}: no tuned results to compare; seen: {seen}")
    ep, want = tuned
    mine = [(r, n) for r, n in records if r.num_ranks == ep]
    other_note = other_sizes_note(((r.num_ranks, n) for r, n in records), ep, "buffers")
    if not mine:
        return Verdict(NO_CALLS, f"{PREFIX}{LIBRARY}: no dispatch/combine calls on a {ep}-rank buffer seen; tuned "
                                 f"SMs not exercised{other_note}")
    return judge(LIBRARY, ep, mine, want, other_note)


def judge(library: str, ep: int, mine: list[tuple[Any, int]], want: Mapping[str, int], other_note: str,
          extra: Optional[dict[str, str]] = None, in_effect_detail: str = "") -> Verdict:
    """The verdict from call records having .op, .num_sms, .source, .cached, .failed (shared with hybrid)."""
    parts: dict[str, str] = {}
    for op in OPS:
        ran = [(r, n) for r, n in mine if r.op == op and not r.failed]
        wrong = [(r, n) for r, n in ran if r.num_sms != want[op]]
        if wrong:
            by_sms: dict[int, list] = {}
            for r, n in wrong:
                by_sms.setdefault(r.num_sms, []).append((r, n))
            texts = []
            for sms, group in by_sms.items():
                n = sum(k for _, k in group)
                why = ", ".join(dict.fromkeys(SOURCE_TEXT.get(r.source, r.source) for r, _ in group))
                used = f"{sms} SMs" if sms else "an unknown SM count"
                texts.append(f"{op} used {used} instead of {want[op]} in {_op_count(op, group)} ({why})")
            parts[f"{op}_sms"] = "; ".join(texts)
    parts.update(extra or {})
    failed = [(r, n) for r, n in mine if r.failed]
    if failed:
        parts["failed"] = ", ".join(f"{op} {_op_count(op, [(r, n) for r, n in failed if r.op == op])}"
                                    for op in OPS if any(r.op == op for r, _ in failed)) + " raised"
    missing = [op for op in OPS if not any(r.op == op and not r.failed for r, _ in mine)]
    if missing:
        parts["missing"] = "no " + " or ".join(missing) + " calls completed"
    if set(parts) - {"missing"}:
        status, head = NOT_IN_EFFECT, "tuned answer NOT in effect"
    elif parts:
        status, head = UNCONFIRMED, "tuned answer UNCONFIRMED"
    else:
        d = [(r, n) for r, n in mine if r.op == "dispatch"]
        c = [(r, n) for r, n in mine if r.op == "combine"]
        return Verdict(IN_EFFECT, f"{PREFIX}{library} tuned answer IN EFFECT for ep{ep}: dispatch {want['dispatch']} "
                                  f"SMs {_op_count('dispatch', d)}, combine {want['combine']} SMs "
                                  f"{_op_count('combine', c)}{in_effect_detail}{other_note}")
    return Verdict(status, f"{PREFIX}{library} {head} for ep{ep}: " + "; ".join(parts.values()) + other_note, parts)


def _op_count(op: str, group: list[tuple[Any, int]]) -> str:
    n = sum(k for _, k in group)
    if op == "dispatch":
        return count_text(n, sum(k for r, k in group if r.cached))
    return count_text(n)


def _seen(records: list[tuple[CallRecord, int]]) -> str:
    c = collections.Counter()
    for r, n in records:
        c[(r.op, r.num_sms, r.num_ranks)] += n
    return ", ".join(f"{op} {sms} SMs on {g} ranks x{n}" for (op, sms, g), n in c.items())
