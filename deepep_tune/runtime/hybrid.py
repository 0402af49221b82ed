"""Runtime side of HybridEP (`deep_ep.HybridEPBuffer`, DeepEP branch hybrid-ep 94a9f8f): put a tuned answer into
effect, and audit which SM count (and chunk, stages) each dispatch/combine really used.

    from deepep_tune.runtime.hybrid import apply, audit
    apply("RESULTS_EP8_hybridep.json")    # best before the consumer builds its HybridEPBuffer
    with audit() as a:
        train()
    print(a.verdict().line)

Where HybridEP's values come from (deep_ep/hybrid_ep_buffer.py, csrc/hybrid_ep/config.cuh):
  SM counts: HybridEPBuffer(num_sms_dispatch_api=, num_sms_combine_api=) -> configurer.buffer_config
    .num_of_blocks_{dispatch,combine}_api (None: 24 on one node, 8 on several). Each handle-less dispatch copies
    them into a fresh config (get_default_config) that travels in the handle; every call runs its handle's config
    (handle[6] of the 7-tuple, handle[9] of the 11-tuple of the permute variants).
  chunk and stages: environment variables read by get_default_config at every handle-less dispatch:
    NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API, NUM_OF_STAGES_DISPATCH_API, NUM_OF_TOKENS_PER_CHUNK_COMBINE_API,
    NUM_OF_STAGES_G2S_COMBINE_API. adjust_template lowers the stage counts until shared memory fits.
  torchtitan main passes its hard-coded 16/16; Megatron passes moe_flex_dispatcher_num_sms for both (or nothing).

apply() therefore
  1. wraps HybridEPBuffer.__init__ on the class so that buffers of the tuned rank count are built with the tuned
     num_sms_dispatch_api / num_sms_combine_api, whatever the consumer passes (it reaches modules that bound the
     class at import: the constructor is looked up on the class);
  2. sets the four environment variables (read per handle-less dispatch; inherited by processes started later);
  3. updates buffers that already exist (only when deep_ep was imported before apply: one gc scan): on one node,
     configurer.buffer_config.num_of_blocks_* is read-write and the next handle-less dispatch uses it.
It cannot reach: handles made before apply (their config is fixed), a buffer spanning several nodes that already
exists (update_buffer refuses to re-allocate there), other processes that do not apply themselves.
unapply() restores the constructor, the environment variables it changed, and the live buffers it changed.

Only deepep_tune.record, deepep_tune.deepep.hybrid (the knob tables), deepep_tune.runtime.elastic (shared verdict
helpers) and the standard library are imported; deep_ep only when called.
"""

from __future__ import annotations

import collections
import inspect
import os
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from ..deepep.hybrid import ENV as ENV_OF
from ..deepep.hybrid import HANDLE_FIELD as FIELD_OF
from ..deepep.hybrid import SMS_FIELD as BUFFER_FIELD
from ..record.results import Results, TunedKnobs, load_tuned
from . import elastic
from .elastic import (
    IN_EFFECT,
    MARK,
    NO_CALLS,
    NO_RESULTS,
    NOT_IN_EFFECT,
    OPS,
    PREFIX,
    UNCONFIRMED,
    TunedConfigWarning,
    Verdict,
    fit_notes,
    judge,
    live_instances,
    mark,
    unwrap,
)
from .verdict import other_sizes_note

LIBRARY = "hybridep"
APPLY_ENV = "DEEPEP_TUNE_APPLY"
# The results file's knob names -> where HybridEP reads them: the declaration's tables (deepep_tune/deepep/hybrid.py),
# one definition for the tuner and the runtime. ENV_OF: op -> knob -> environment variable; FIELD_OF: op -> knob ->
# HybridEpConfigInstance field of the handle (what a launch uses); BUFFER_FIELD: op -> buffer_config SM field.
CTOR_ARG = {"dispatch": "num_sms_dispatch_api", "combine": "num_sms_combine_api"}
STAGE_KNOBS = ("stages", "g2s_stages")  # adjust_template may lower these until shared memory fits
# config.cuh get_default_config defaults when the variable is unset (G2S combine: 10 on one node, 5 on several)
ENV_DEFAULT = {"NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API": 64, "NUM_OF_STAGES_DISPATCH_API": 10,
               "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": 64, "NUM_OF_STAGES_G2S_COMBINE_API": 10}
CALLS = {"dispatch": ("dispatch", 6), "dispatch_with_permute": ("dispatch", 9), "combine": ("combine", 6),
         "combine_with_unpermute": ("combine", 9)}  # method -> (op, index of the config in its handle tuple)


@dataclass(frozen=True)
class Applied:
    library: str
    ep_size: int
    dispatch: Mapping[str, int]
    combine: Mapping[str, int]
    env: Mapping[str, str]
    live_buffers: int
    source: str
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        live = f"; {self.live_buffers} existing buffer(s) updated" if self.live_buffers else ""
        return (f"deepep-tune: applied {self.source} ({self.library}) for ep{self.ep_size}: HybridEPBuffer("
                f"num_sms_dispatch_api={self.dispatch['num_sms']}, num_sms_combine_api={self.combine['num_sms']}), "
                f"{env}{live}")


@dataclass
class _State:
    applied: Applied
    cls: type
    original_init: Any
    env_before: dict  # name -> value before apply (None: unset)
    live: list  # (weakref to buffer, {field: value before})


_state: Optional[_State] = None


def current() -> Optional[Applied]:
    return _state.applied if _state is not None else None


def tuned_values(tuned: TunedKnobs) -> dict[str, dict[str, int]]:
    return {op: {k: int(v) for k, v in getattr(tuned, op).items()} for op in OPS}


def env_of(values: Mapping[str, Mapping[str, int]]) -> dict[str, str]:
    """The environment variables that carry the chunk and stage knobs (the knobs present in the results)."""
    return {name: str(values[op][knob]) for op in OPS for knob, name in ENV_OF[op].items() if knob in values[op]}


def apply(results: Results, *, hidden: Optional[int] = None, num_topk: Optional[int] = None,
          num_experts: Optional[int] = None) -> Applied:
    """Put the tuned HybridEP answer of `results` (library hybridep) into effect in this process. Call it before
    the consumer builds its HybridEPBuffer (torchtitan: before init_buffer; Megatron: before the first MoE forward);
    on one node an existing buffer is updated too. hidden/num_topk/num_experts, when given, are checked against the
    tuned workload (a warning). Applying again replaces the previous apply; unapply() restores."""
    global _state
    tuned = load_tuned(results, LIBRARY)
    values = tuned_values(tuned)
    for op in OPS:
        if values[op].get("num_sms", 0) <= 0:
            raise ValueError(f"{tuned.source}: best.{op}.num_sms must be positive, got {values[op].get('num_sms')}")
    was_loaded = "deep_ep" in sys.modules
    import deep_ep
    cls = _buffer_class(deep_ep)
    notes = fit_notes(tuned, {"hidden": hidden, "num_topk": num_topk, "num_experts": num_experts})
    if _state is not None:
        _uninstall(_state)
        _state = None
    env = env_of(values)
    env_before = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if env_before[k] not in (None, v):
            notes.append(f"deepep-tune: {k} was {env_before[k]}; apply sets it to {v} (unapply puts it back)")
        os.environ[k] = v
    live, skipped = [], 0
    if was_loaded:
        for buf in live_instances(cls):
            if int(getattr(buf, "group_size", 0) or 0) != tuned.ep_size:
                continue
            if int(getattr(buf, "num_of_nodes", 1) or 1) > 1:
                skipped += 1
                continue
            bc = buf.configurer.buffer_config
            before = {BUFFER_FIELD[op]: getattr(bc, BUFFER_FIELD[op]) for op in OPS}
            _set_blocks(buf, values["dispatch"]["num_sms"], values["combine"]["num_sms"])
            live.append((weakref.ref(buf), before))
    if skipped:
        notes.append(f"deepep-tune: {skipped} HybridEPBuffer(s) spanning several nodes already exist; their SM counts "
                     "were fixed at construction (apply before the buffer is built)")
    if live:
        notes.append(f"deepep-tune: {len(live)} HybridEPBuffer(s) existed before apply and were updated on one node; "
                     "handles made before apply keep their old values")
    for note in notes:
        warnings.warn(note, TunedConfigWarning, stacklevel=2)
    original_init = unwrap(cls.__dict__["__init__"])
    applied = Applied(LIBRARY, tuned.ep_size, values["dispatch"], values["combine"], env, len(live), tuned.source,
                      tuple(notes))
    _state = _State(applied, cls, original_init, env_before, live)
    _install_init(cls)
    return applied


def unapply() -> bool:
    """Restore the constructor, the environment variables and the live buffers apply changed."""
    global _state
    if _state is None:
        return False
    state, _state = _state, None
    _uninstall(state)
    return True


def apply_from_env() -> Optional[Applied]:
    path = os.environ.get(APPLY_ENV, "").strip()
    return apply(path) if path else None


def _buffer_class(deep_ep: Any) -> type:
    cls = getattr(deep_ep, "HybridEPBuffer", None)
    if cls is None:
        raise ImportError(f"this deep_ep ({getattr(deep_ep, '__file__', '?')}) has no HybridEPBuffer: DeepEP's "
                          "hybrid-ep branch is not the installed deep_ep")
    return cls


def _set_blocks(buf: Any, dispatch_sms: int, combine_sms: int) -> None:
    bc = buf.configurer.buffer_config  # read, modify, assign back (a pybind property may return a copy)
    bc.num_of_blocks_dispatch_api = dispatch_sms
    bc.num_of_blocks_combine_api = combine_sms
    buf.configurer.buffer_config = bc


def _uninstall(state: _State) -> None:
    env = state.applied.env
    for k, before in state.env_before.items():
        if os.environ.get(k) == env[k]:  # leave a later change by someone else alone
            if before is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = before
    a = state.applied
    for ref, before in state.live:
        buf = ref()
        if buf is None:
            continue
        bc = buf.configurer.buffer_config
        if (bc.num_of_blocks_dispatch_api, bc.num_of_blocks_combine_api) == (a.dispatch["num_sms"], a.combine["num_sms"]):
            _set_blocks(buf, before["num_of_blocks_dispatch_api"], before["num_of_blocks_combine_api"])
    _release_init()


# ----------------------------------------------------------------------------------------------------------
# The constructor wrapper (apply's override + the audit's record) and the call wrappers (audit), installed while
# apply or an audit is active.

_init_hook: dict = {}  # "cls", "raw"
_call_hooks: dict = {}  # "cls", "originals"
_active: list["Audit"] = []


def _install_init(cls: type) -> None:
    if _init_hook:
        return
    raw = unwrap(cls.__dict__["__init__"])
    signature = inspect.signature(raw)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        s = _state
        asked: dict[str, Any] = {}
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return raw(self, *args, **kwargs)
        arg = bound.arguments
        for op in OPS:
            asked[op] = arg.get(CTOR_ARG[op])
        group = arg.get("group")
        applied = False
        if s is not None and _group_size(group) == s.applied.ep_size:
            for op in OPS:
                arg[CTOR_ARG[op]] = (s.applied.dispatch if op == "dispatch" else s.applied.combine)["num_sms"]
            applied = True
        raw(*bound.args, **bound.kwargs)
        record = BufferRecord(id(self), int(getattr(self, "group_size", 0) or 0),
                              int(getattr(self, "num_of_nodes", 1) or 1), asked["dispatch"], asked["combine"],
                              *_blocks(self), applied)
        for a in list(_active):
            a.buffers[id(self)] = record
    setattr(cls, "__init__", mark(__init__, raw))
    _init_hook.update(cls=cls, raw=raw)


def _release_init() -> None:
    if _state is not None or _active or not _init_hook:
        return
    cls = _init_hook["cls"]
    if getattr(cls.__dict__.get("__init__"), MARK, False):
        setattr(cls, "__init__", _init_hook["raw"])
    _init_hook.clear()


def _group_size(group: Any) -> int:
    try:
        return int(group.size())
    except Exception:
        return 0


def _blocks(buf: Any) -> tuple[int, int]:
    try:
        bc = buf.configurer.buffer_config
        return int(bc.num_of_blocks_dispatch_api), int(bc.num_of_blocks_combine_api)
    except Exception:
        return 0, 0


def _ensure_call_wrappers(cls: type) -> None:
    if _call_hooks:
        return
    originals = {}
    for name in CALLS:
        if name not in cls.__dict__:
            continue
        raw = unwrap(cls.__dict__[name])
        originals[name] = raw
        setattr(cls, name, _wrap_call(name, raw))
    _call_hooks.update(cls=cls, originals=originals)


def _release_call_wrappers() -> None:
    if _active or not _call_hooks:
        return
    cls = _call_hooks["cls"]
    for name, raw in _call_hooks["originals"].items():
        if getattr(cls.__dict__.get(name), MARK, False):
            setattr(cls, name, raw)
    _call_hooks.clear()


def _config_of(handle: Any, index: int) -> Any:
    if not isinstance(handle, tuple):
        return None
    if len(handle) == 7:
        return handle[6]
    if len(handle) == 11:
        return handle[9]
    return handle[index] if len(handle) > index else None


def _wrap_call(name: str, original: Callable) -> Callable:
    op, index = CALLS[name]
    signature = inspect.signature(original)

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _active:
            return original(self, *args, **kwargs)
        try:
            handle = signature.bind(self, *args, **kwargs).arguments.get("handle")
        except TypeError:
            return original(self, *args, **kwargs)
        cached = handle is not None
        requested = _requested(self) if not cached and op == "dispatch" else None
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            _record(self, name, op, cached, None, requested, failed=True)
            raise
        config = _config_of(handle if cached else (out[-1] if isinstance(out, tuple) and out else None), index)
        _record(self, name, op, cached, config, requested, failed=False)
        return out
    return mark(call, original)


def _requested(buf: Any) -> tuple[tuple[str, int], ...]:
    """The stage counts get_default_config is about to read from the environment (before adjust_template)."""
    nodes = int(getattr(buf, "num_of_nodes", 1) or 1)
    out = []
    for op in OPS:
        for knob, name in ENV_OF[op].items():
            if knob in STAGE_KNOBS:
                default = 5 if name == "NUM_OF_STAGES_G2S_COMBINE_API" and nodes > 1 else ENV_DEFAULT[name]
                value = os.environ.get(name)
                out.append((f"{op}.{knob}", int(value) if value not in (None, "") else default))
    return tuple(out)


def _record(buf: Any, api: str, op: str, cached: bool, config: Any, requested: Any, failed: bool) -> None:
    values = tuple((knob, int(getattr(config, f, 0) or 0)) for knob, f in FIELD_OF[op].items()) if config is not None \
        else tuple((knob, 0) for knob in FIELD_OF[op])
    key = CallRecord(op, api, dict(values)["num_sms"], values, cached, int(getattr(buf, "group_size", 0) or 0),
                     id(buf), failed)
    for a in list(_active):
        a._calls[key] += 1
        if requested is not None:
            a._requested[requested] += 1


@dataclass(frozen=True)
class BufferRecord:
    """A HybridEPBuffer built while the audit was active: what the consumer asked and what was built."""

    buffer_id: int
    group_size: int
    num_of_nodes: int
    asked_dispatch: Optional[int]  # num_sms_dispatch_api the consumer passed (None: HybridEP's default)
    asked_combine: Optional[int]
    built_dispatch: int  # configurer.buffer_config.num_of_blocks_dispatch_api after construction
    built_combine: int
    applied: bool  # apply's constructor override acted


@dataclass(frozen=True)
class CallRecord:
    op: str  # dispatch | combine
    api: str  # dispatch | dispatch_with_permute | combine | combine_with_unpermute
    num_sms: int  # the handle config's num_of_blocks_<op>_api the call launched with (0: unknown)
    values: tuple[tuple[str, int], ...]  # every tuned knob of the op, read from the handle's config
    cached: bool  # a dispatch given a handle
    group_size: int
    buffer_id: int
    failed: bool = False

    @property
    def source(self) -> str:
        return "the handle's config"


class Audit(elastic.Audit):
    """Records HybridEPBuffer calls (and buffers built) while active; context manager or start()/stop(). Its
    records and used() are V2's audit's; hooks, buffers, tuned values and verdict are its own."""

    library = LIBRARY

    def __init__(self, results: Optional[Results] = None, *, quiet: bool = False) -> None:
        self._tuned = load_tuned(results, LIBRARY) if results is not None else None
        self.quiet = quiet
        self._calls: collections.Counter = collections.Counter()
        self._requested: collections.Counter = collections.Counter()
        self.buffers: dict[int, BufferRecord] = {}
        self.active = False

    def _install(self) -> None:
        import deep_ep
        cls = _buffer_class(deep_ep)
        _active.append(self)
        _install_init(cls)
        _ensure_call_wrappers(cls)

    def _uninstall(self) -> None:
        _active.remove(self)
        _release_call_wrappers()
        _release_init()

    def tuned(self) -> Optional[tuple[int, dict[str, dict[str, int]]]]:
        if self._tuned is not None:
            return self._tuned.ep_size, tuned_values(self._tuned)
        a = current()
        return (a.ep_size, {"dispatch": dict(a.dispatch), "combine": dict(a.combine)}) if a is not None else None

    def verdict(self) -> Verdict:
        return verdict(self.records, self.tuned(), self.buffers, dict(self._requested))


def audit(results: Optional[Results] = None, *, quiet: bool = False) -> Audit:
    return Audit(results, quiet=quiet)


def verdict(records: list[tuple[CallRecord, int]], tuned: Optional[tuple[int, Mapping[str, Mapping[str, int]]]],
            buffers: Optional[Mapping[int, BufferRecord]] = None,
            requested: Optional[Mapping[tuple, int]] = None) -> Verdict:
    buffers, requested = buffers or {}, requested or {}
    if tuned is None:
        seen = collections.Counter()
        for r, n in records:
            seen[(r.op, r.num_sms, r.group_size)] += n
        text = ", ".join(f"{op} {s} SMs on {g} ranks x{n}" for (op, s, g), n in seen.items()) or "no calls"
        return Verdict(NO_RESULTS, f"{PREFIX}{LIBRARY}: no tuned results to compare; seen: {text}")
    ep, want = tuned
    mine = [(r, n) for r, n in records if r.group_size == ep]
    other_note = other_sizes_note(((r.group_size, n) for r, n in records), ep, "buffers")
    if not mine:
        return Verdict(NO_CALLS, f"{PREFIX}{LIBRARY}: no dispatch/combine calls on a {ep}-rank buffer seen; tuned "
                                 f"answer not exercised{other_note}")
    # Why an SM count differs: what the consumer passed to the constructor, when the audit saw it being built.
    sources = {}
    for b in buffers.values():
        asked = ", ".join(f"{CTOR_ARG[op]}={v}" for op, v in (("dispatch", b.asked_dispatch), ("combine", b.asked_combine)))
        sources[b.buffer_id] = f"buffer built with {asked}" + (" (None: HybridEP's default)"
                                                                 if None in (b.asked_dispatch, b.asked_combine) else "")
    keyed = [(_Sourced(r, sources.get(r.buffer_id, "the handle's config")), n) for r, n in mine]
    extra: dict[str, str] = {}
    lowered: list[str] = []
    asked_stages = collections.Counter()
    for req, n in requested.items():
        for k, v in req:
            asked_stages[(k, v)] += n
    for op in OPS:
        for knob, target in want[op].items():
            if knob == "num_sms" or knob not in FIELD_OF[op]:
                continue
            ran = collections.Counter()
            for r, n in mine:
                if r.op == op and not r.failed and r.num_sms:
                    ran[dict(r.values)[knob]] += n
            wrong = {v: n for v, n in ran.items() if v != target}
            if knob in STAGE_KNOBS and wrong:
                asked = {v for (k, v), _ in asked_stages.items() if k == f"{op}.{knob}"}
                if asked == {target} and all(v < target for v in wrong):
                    lowered.append(f"{op} {knob} {target} lowered by HybridEP to "
                                   + "/".join(str(v) for v in sorted(wrong)) + " to fit shared memory")
                    continue
            if wrong:
                extra[f"{op}_{knob}"] = (f"{op} {knob} " + ", ".join(f"{v} (x{n})" for v, n in wrong.items())
                                         + f" instead of {target}")
    detail = ""
    if lowered:
        detail = " (" + "; ".join(lowered) + ")"
    knobs = {op: {k: v for k, v in want[op].items() if k != "num_sms"} for op in OPS}
    detail = (", " + "; ".join(f"{op} " + ", ".join(f"{k} {v}" for k, v in knobs[op].items()) for op in OPS
                               if knobs[op]) + detail) if any(knobs.values()) else detail
    return judge(LIBRARY, ep, keyed, {op: want[op]["num_sms"] for op in OPS}, other_note, extra, detail)


class _Sourced:
    """A call record whose source names the constructor arguments of its buffer (for the verdict text)."""

    def __init__(self, record: CallRecord, source: str) -> None:
        self._r, self.source = record, source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._r, name)


__all__ = ["apply", "unapply", "apply_from_env", "current", "Audit", "audit", "verdict", "Verdict", "Applied",
           "IN_EFFECT", "NOT_IN_EFFECT", "UNCONFIRMED", "NO_CALLS", "NO_RESULTS", "LIBRARY"]
