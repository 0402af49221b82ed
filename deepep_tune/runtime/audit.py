"""Audit: did the tuned configs actually run?

    with audit("RESULTS_EP8.json") as a:      # in code
        train()
    print(a.verdict().line)

or, without touching the training script:

    PYTHONPATH=$(python -m deepep_tune.audit --pythonpath) DEEPEP_TUNE_AUDIT=RESULTS_EP8.json torchrun ... train.py

The second form writes a sitecustomize.py into a cache directory and prints a PYTHONPATH that puts it first.
At interpreter start it only looks at DEEPEP_TUNE_AUDIT / DEEPEP_TUNE_APPLY; when one is set it waits for
`import deep_ep`, then starts the audit (and/or applies, see deepep_tune.apply) before the script's next line.
At exit it prints one verdict line on stderr (rank 0; every rank with DEEPEP_TUNE_AUDIT_ALL_RANKS=1).

While active, every deep_ep.Buffer.dispatch/combine call is recorded with the config it ran with (the explicit
`config=` or what `self.get_*_config(self.group_size)` returned, exactly DeepEP's choice) and the Buffer's
num_nvl_bytes. Config fields are not readable from Python, so configs are identified by the arguments they were
built with (deepep_tune.apply.acquire_recorder); a config built before the audit started is "unknown".
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import hashlib
import importlib.util
import inspect
import os
import sys
import tempfile
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Optional

from ..deepep.buffer import nvl_bytes
from ..deepep.config import ConfigArgs
from ..deepep.workload import Workload
from ..record.results import Results, TunedResults, load_results
from .apply import (
    APPLY_ENV,
    MARK,
    ORIGINAL,
    acquire_recorder,
    apply_from_env,
    config_args,
    current,
    next_gen,
    release_recorder,
)
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

AUDIT_ENV = "DEEPEP_TUNE_AUDIT"
ALL_RANKS_ENV = "DEEPEP_TUNE_AUDIT_ALL_RANKS"
UNKNOWN = "unknown (built before the audit)"



@dataclass(frozen=True)
class BufferRecord:
    """A deep_ep.Buffer created while the audit was active."""

    buffer_id: int
    group_size: int
    num_nvl_bytes: int
    num_rdma_bytes: int


@dataclass(frozen=True)
class CallRecord:
    """Calls that ran alike, counted. `config` is None when the config was built before the audit."""

    op: str  # "dispatch" or "combine"
    cached: bool  # a dispatch given a handle (the backward of a combine); always False for combine
    source: str  # "explicit" (config= passed) or "default" (the Buffer's get_*_config chose)
    config: Optional[ConfigArgs]
    group_size: int
    num_nvl_bytes: int
    shapes: Workload  # what the NVL buffer asserts depend on besides the config (0 experts: a cached dispatch)
    failed: bool = False  # the call raised (DeepEP rejected it)
    count: int = 1

    def describe_config(self) -> str:
        return str(self.config) if self.config is not None else UNKNOWN


# ----------------------------------------------------------------------------------------------------------
# NVL bytes a call needs: the host asserts of deep_ep.cpp @ v1.2.1 (L496-505 dispatch, L614-618 combine;
# L680-690 / L860-864 @ 567632d). A cached dispatch has no top-k and no experts (num_experts = 0 there).

def needed_nvl_bytes(op: str, config: ConfigArgs, num_ranks: int, shapes: Workload) -> int:
    """The NVL bytes DeepEP's host asserts require for this call (deepep.buffer.nvl_bytes at the call's shapes)."""
    return nvl_bytes(op, config.tuned(), num_ranks, shapes)


# ----------------------------------------------------------------------------------------------------------
# The audit


class Audit(AuditLifecycle):
    """Records DeepEP dispatch/combine calls while active. Use as a context manager or start()/stop()."""

    def __init__(self, results: Optional[Results] = None, *, quiet: bool = False) -> None:
        # Load now so a bad file fails at start, not at exit.
        self._tuned: Optional[TunedResults] = load_results(results) if results is not None else None
        self.quiet = quiet
        self._calls: collections.Counter = collections.Counter()
        self.buffers: list[BufferRecord] = []
        self.active = False

    # lifecycle (start/stop, with: AuditLifecycle)
    def _install(self) -> None:
        _activate(self)

    def _uninstall(self) -> None:
        _deactivate(self)

    # data
    @property
    def records(self) -> list[CallRecord]:
        return [CallRecord(*key, count=count) for key, count in self._calls.items()]

    def tuned(self) -> Optional[TunedResults]:
        """The results compared against: the audit's own, else what deepep_tune.apply has applied."""
        if self._tuned is not None:
            return self._tuned
        applied = current()
        if applied is None:
            return None
        return TunedResults(ep_size=applied.ep_size, dispatch=applied.dispatch, combine=applied.combine,
                            source=applied.source)

    def _record(self, op: str, cached: bool, source: str, config: Any, buffer: Any, shapes: Workload,
                failed: bool) -> None:
        key = (op, cached, source, config_args(config), int(getattr(buffer, "group_size", 0) or 0),
               int(getattr(buffer, "num_nvl_bytes", 0) or 0), shapes, failed)
        self._calls[key] += 1

    # verdict
    def verdict(self) -> Verdict:
        return verdict(self.records, self.tuned())


def audit(results: Optional[Results] = None, *, quiet: bool = False) -> Any:
    """An audit to use as `with audit(path) as a:`; prints the verdict line on stderr when the block ends.
    Without results it compares against what deepep_tune.apply has applied, if anything. Results of DeepEP V2 or
    HybridEP get that library's audit (the SM count each call used)."""
    module = next_gen(results) if results is not None else None
    return module.audit(results, quiet=quiet) if module is not None else Audit(results, quiet=quiet)


def verdict(records: Iterable[CallRecord], tuned: Optional[TunedResults]) -> Verdict:
    """One line: whether every call on an ep_size-rank group ran the tuned configs, and if not, which part."""
    records = list(records)
    if tuned is None:
        seen = _seen_summary(records) or "no dispatch/combine calls"
        return Verdict(NO_RESULTS, f"{PREFIX}no tuned results to compare; seen: {seen}")

    ep = tuned.ep_size
    mine = [r for r in records if r.group_size == ep]
    other_note = other_sizes_note(((r.group_size, r.count) for r in records), ep, "groups")
    if not mine:
        return Verdict(NO_CALLS, f"{PREFIX}no dispatch/combine calls on a {ep}-rank group seen; tuned config not "
                                 f"exercised{other_note}")

    parts = _problems(mine, tuned)
    # Any config, buffer or failure problem means the tuned config is demonstrably not what ran; only
    # unknown configs or missing ops leave the question open.
    mismatch = {"num_sms", "dispatch", "combine", "buffer", "failed"} & parts.keys()
    if mismatch:
        status, head = NOT_IN_EFFECT, "tuned config NOT in effect"
    elif parts:
        status, head = UNCONFIRMED, "tuned config UNCONFIRMED"
    else:
        return Verdict(IN_EFFECT, _in_effect_line(mine, tuned, other_note))
    line = f"{PREFIX}{head} for ep{ep}: " + "; ".join(parts.values()) + other_note
    return Verdict(status, line, parts)


def _completed_by_op(mine: list[CallRecord]) -> dict[str, list[CallRecord]]:
    """The calls on the ep group that did not raise, per op."""
    ran = [r for r in mine if not r.failed]
    return {op: [r for r in ran if r.op == op] for op in ("dispatch", "combine")}


def _problems(mine: list[CallRecord], tuned: TunedResults) -> dict[str, str]:
    """Every way the calls on the ep group differ from the tuned results, keyed by kind; the key order is
    the order the parts appear in the verdict line."""
    ep = tuned.ep_size
    want = {"dispatch": tuned.dispatch, "combine": tuned.combine}
    ran = [r for r in mine if not r.failed]
    parts: dict[str, str] = {}
    parts.update(_config_problems([r for r in ran if r.config is not None], tuned, want))
    small = [(r, needed_nvl_bytes(r.op, want[r.op], ep, r.shapes)) for r in mine]
    small = [(r, need) for r, need in small if r.num_nvl_bytes < need]
    if small:
        parts["buffer"] = _buffer_problem(small)
    unknown = [r for r in ran if r.config is None]
    if unknown:
        parts["unknown"] = f"{_op_counts(unknown)} ran configs {UNKNOWN}"
    failed = [r for r in mine if r.failed]
    if failed:
        parts["failed"] = f"{_op_counts(failed)} raised"
    calls = _completed_by_op(mine)
    missing = [op for op in ("dispatch", "combine") if not calls[op]]
    if missing:
        parts["missing"] = "no " + " or ".join(missing) + " calls completed"
    return parts


def _config_problems(known: list[CallRecord], tuned: TunedResults, want: dict[str, Any]) -> dict[str, str]:
    """num_sms and per-op (chunk, buffer) mismatches among the calls whose config is known."""
    parts: dict[str, str] = {}
    wrong_sms = [r for r in known if r.config.num_sms != want[r.op].num_sms]
    if wrong_sms:
        found = _distinct(str(r.config.num_sms) for r in wrong_sms)
        parts["num_sms"] = f"num_sms {found} instead of {tuned.num_sms} in {_op_counts(wrong_sms)}"
    for op in ("dispatch", "combine"):
        w = want[op]
        wrong = [r for r in known if r.op == op and (r.config.nvl_chunk, r.config.nvl_buffer) != (w.nvl_chunk, w.nvl_buffer)]
        if wrong:
            found = _distinct(f"({r.config.nvl_chunk}, {r.config.nvl_buffer})" for r in wrong)
            parts[op] = f"{op} (chunk, buffer) {found} instead of ({w.nvl_chunk}, {w.nvl_buffer}) in {_count_text(wrong)}"
    return parts


def _buffer_problem(small: list[tuple[CallRecord, int]]) -> str:
    """The calls whose buffer cannot hold the tuned config: the smallest buffer seen against the largest need."""
    have = min(r.num_nvl_bytes for r, _ in small)
    need = max(n for _, n in small)
    ops = _distinct(r.op for r, _ in small)
    n = sum(r.count for r, _ in small)
    return (f"buffer too small for the tuned configs: num_nvl_bytes {_mib(have)} < {_mib(need)} needed "
            f"by the tuned {ops} ({n} call{'s' if n != 1 else ''})")


def _in_effect_line(mine: list[CallRecord], tuned: TunedResults, other_note: str) -> str:
    calls = _completed_by_op(mine)
    d, c = calls["dispatch"], calls["combine"]
    return (f"{PREFIX}tuned config IN EFFECT for ep{tuned.ep_size}: num_sms {tuned.num_sms}, dispatch ({tuned.dispatch.nvl_chunk}, "
            f"{tuned.dispatch.nvl_buffer}) {_count_text(d)}, combine ({tuned.combine.nvl_chunk}, "
            f"{tuned.combine.nvl_buffer}) {_count_text(c)}{other_note}")


def _count_text(records: list[CallRecord]) -> str:
    n = sum(r.count for r in records)
    if records and records[0].op == "dispatch":
        cached = sum(r.count for r in records if r.cached)
        return f"x{n} ({n - cached} non-cached, {cached} cached)"
    return f"x{n}"


def _op_counts(records: list[CallRecord]) -> str:
    return ", ".join(f"{op} {_count_text([r for r in records if r.op == op])}"
                     for op in ("dispatch", "combine") if any(r.op == op for r in records))


def _distinct(values: Iterable[str]) -> str:
    return ", ".join(dict.fromkeys(values))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _seen_summary(records: list[CallRecord]) -> str:
    groups: collections.Counter = collections.Counter()
    for r in records:
        groups[(r.op, r.describe_config())] += r.count
    return ", ".join(f"{op} {cfg} x{n}" for (op, cfg), n in groups.items())


# ----------------------------------------------------------------------------------------------------------
# Wrapping deep_ep.Buffer. Installed while at least one audit is active; each call goes to every active audit.

_active: list[Audit] = []
_installed: dict = {}  # "module": deep_ep, "cls": Buffer, "originals": {name: raw attribute}


def _activate(a: Audit) -> None:
    if not _active:
        import deep_ep
        cls = deep_ep.Buffer
        originals = {}
        for name, make in (("__init__", _wrap_init), ("dispatch", _wrap_dispatch), ("combine", _wrap_combine)):
            raw = cls.__dict__[name]
            while getattr(raw, MARK, False):  # left by an earlier copy of this module: never stack
                raw = getattr(raw, ORIGINAL)
            originals[name] = raw
            setattr(cls, name, make(raw))
        acquire_recorder(deep_ep)
        _installed.update(module=deep_ep, cls=cls, originals=originals)
    _active.append(a)


def _deactivate(a: Audit) -> None:
    _active.remove(a)
    if _active or not _installed:
        return
    cls = _installed["cls"]
    for name, raw in _installed["originals"].items():
        if getattr(cls.__dict__.get(name), MARK, False):
            setattr(cls, name, raw)
    release_recorder()
    _installed.clear()


def _mark(wrapper: Callable, original: Callable) -> Callable:
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, MARK, True)
    setattr(wrapper, ORIGINAL, original)
    return wrapper


def _wrap_init(original: Callable) -> Callable:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        record = BufferRecord(id(self), int(getattr(self, "group_size", 0) or 0),
                              int(getattr(self, "num_nvl_bytes", 0) or 0), int(getattr(self, "num_rdma_bytes", 0) or 0))
        for a in list(_active):
            a.buffers.append(record)
    return _mark(__init__, original)


def _wrap_call(op: str, original: Callable, shapes_of: Callable[[Mapping[str, Any]], tuple[bool, Workload]]) -> Callable:
    signature = inspect.signature(original)
    getter_name = f"get_{op}_config"

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not _active:
            return original(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # let DeepEP report the bad call
        config, source = bound.arguments.get("config"), "explicit"
        if config is None:
            # DeepEP's own choice (buffer.py L373/L435 use self.get_*_config(self.group_size)); passed on explicitly
            # so that what is recorded is what runs.
            config, source = getattr(self, getter_name)(self.group_size), "default"
            bound.arguments["config"] = config
        try:
            cached, shapes = shapes_of(bound.arguments)
        except Exception:  # shapes only refine the buffer check; never break the call
            cached, shapes = False, Workload(0, 0, 0, 0)
        try:
            result = original(*bound.args, **bound.kwargs)
        except BaseException:
            for a in list(_active):
                a._record(op, cached, source, config, self, shapes, failed=True)
            raise
        for a in list(_active):
            a._record(op, cached, source, config, self, shapes, failed=False)
        return result
    return _mark(call, original)


def _dispatch_shapes(arguments: Mapping[str, Any]) -> tuple[bool, Workload]:
    x = arguments.get("x")
    x = x[0] if isinstance(x, tuple) else x  # fp8: (values, per-128-block scales), as Workload counts them
    cached = arguments.get("handle") is not None
    topk_idx, per_expert = arguments.get("topk_idx"), arguments.get("num_tokens_per_expert")
    return cached, Workload(num_tokens=int(x.size(0)), hidden=int(x.size(1)),
                            num_topk=int(topk_idx.size(1)) if topk_idx is not None else 0,
                            num_experts=int(per_expert.size(0)) if per_expert is not None and not cached else 0,
                            dispatch_dtype="fp8" if int(x.element_size()) == 1 else "bf16")


def _combine_shapes(arguments: Mapping[str, Any]) -> tuple[bool, Workload]:
    x, weights = arguments.get("x"), arguments.get("topk_weights")
    return False, Workload(num_tokens=int(x.size(0)), hidden=int(x.size(1)),
                           num_topk=int(weights.size(1)) if weights is not None else 0, num_experts=0)


def _wrap_dispatch(original: Callable) -> Callable:
    return _wrap_call("dispatch", original, _dispatch_shapes)


def _wrap_combine(original: Callable) -> Callable:
    return _wrap_call("combine", original, _combine_shapes)


# ----------------------------------------------------------------------------------------------------------
# Activation without editing the script: a sitecustomize that waits for `import deep_ep`.

_SITE_TEMPLATE = '''\
# Written by `python -m deepep_tune.audit --pythonpath`. Does nothing unless {audit_env} or {apply_env}
# is set; then, when deep_ep is imported, applies and/or audits (see deepep_tune/audit.py).
import os as _os
import sys as _sys
if _os.environ.get({audit_env!r}) or _os.environ.get({apply_env!r}):
    try:
        import importlib.util as _util
        if _util.find_spec("deepep_tune") is None:
            _sys.path.append({root!r})
        from deepep_tune.runtime.audit import site_hook as _site_hook
        _site_hook()
    except Exception as _e:
        print(f"deepep-tune: site hook failed: {{_e!r}}", file=_sys.stderr)


def _run_shadowed_sitecustomize():
    # This file shadows any other sitecustomize (a distribution's, a venv's): run that one too.
    import importlib.machinery
    import importlib.util
    own = _os.path.realpath(_os.path.dirname(_os.path.abspath(__file__)))
    path = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != own]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


try:
    _run_shadowed_sitecustomize()
except Exception as _e:
    print(f"deepep-tune: the shadowed sitecustomize failed: {{_e!r}}", file=_sys.stderr)
'''

_env_audit: Optional[Audit] = None


def site_dir() -> str:
    """Write the sitecustomize directory (once per checkout) and return it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = _SITE_TEMPLATE.format(audit_env=AUDIT_ENV, apply_env=APPLY_ENV, root=root)
    tag = hashlib.sha1(root.encode()).hexdigest()[:10]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates = [os.path.join(cache, "deepep_tune", f"site-{tag}"),
                  os.path.join(tempfile.gettempdir(), f"deepep_tune_site-{os.getuid() if hasattr(os, 'getuid') else 0}-{tag}")]
    for directory in candidates:
        path = os.path.join(directory, "sitecustomize.py")
        try:
            os.makedirs(directory, exist_ok=True)
            if not os.path.exists(path) or open(path).read() != text:
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            return directory
        except OSError:
            continue
    raise OSError("deepep-tune: no writable directory for the audit's sitecustomize.py")


def pythonpath() -> str:
    """The PYTHONPATH that activates the site hook, keeping the current one after it."""
    existing = os.environ.get("PYTHONPATH", "")
    return site_dir() + (os.pathsep + existing if existing else "")


class _DeepEPImportHook:
    """Meta path finder: lets `import deep_ep` run, then calls on_import(deep_ep) before the importer resumes."""

    def __init__(self, on_import: Callable[[ModuleType], None]) -> None:
        self.on_import = on_import

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "deep_ep":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        on_import = self.on_import

        def exec_and_hook(module: ModuleType) -> None:
            exec_module(module)
            try:
                on_import(module)
            except Exception as e:  # never break the training script's import
                print(f"deepep-tune: {e}", file=sys.stderr)
        spec.loader.exec_module = exec_and_hook  # type: ignore[method-assign]
        return spec


def site_hook() -> None:
    """Called by the generated sitecustomize when DEEPEP_TUNE_AUDIT or DEEPEP_TUNE_APPLY is set."""
    if "deep_ep" in sys.modules:
        _on_deep_ep_import(sys.modules["deep_ep"])
    else:
        sys.meta_path.insert(0, _DeepEPImportHook(_on_deep_ep_import))


def _on_deep_ep_import(deep_ep: ModuleType) -> None:
    applied = apply_from_env()
    if applied is not None and _is_printing_rank():
        print(str(applied), file=sys.stderr, flush=True)
    start_from_env()


def start_from_env() -> Optional[Audit]:
    """Start the process-wide audit of $DEEPEP_TUNE_AUDIT (if set) and print its verdict at exit."""
    global _env_audit
    path = os.environ.get(AUDIT_ENV, "").strip()
    if not path or _env_audit is not None:
        return _env_audit
    _env_audit = audit(path, quiet=True).start()
    atexit.register(_print_at_exit, _env_audit)
    return _env_audit


def _rank() -> Optional[int]:
    value = os.environ.get("RANK", "").strip()
    return int(value) if value.isdigit() else None


def _is_printing_rank() -> bool:
    return os.environ.get(ALL_RANKS_ENV, "") == "1" or (_rank() or 0) == 0


def _print_at_exit(a: Audit) -> None:
    if not _is_printing_rank():
        return
    rank = _rank()
    prefix = f"[rank {rank}] " if rank is not None else ""
    print(prefix + a.verdict().line, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepep_tune.audit",
        description="Check that tuned DeepEP configs are in effect in an unmodified training script: "
                    f"PYTHONPATH=$(python -m deepep_tune.audit --pythonpath) {AUDIT_ENV}=RESULTS.json torchrun ... "
                    f"(add {APPLY_ENV}=RESULTS.json to also apply them).")
    parser.add_argument("--pythonpath", action="store_true",
                        help="print a PYTHONPATH whose sitecustomize.py activates the audit/apply from the environment")
    args = parser.parse_args(argv)
    if args.pythonpath:
        print(pythonpath())
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
