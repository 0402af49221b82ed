"""Put tuned configs into effect in a training process without editing the framework.

    from .apply import apply
    apply("RESULTS_EP8.json")   # before the framework creates its deep_ep.Buffer

Frameworks of the torchtitan-v1 / Megatron-Core / vLLM kind size their Buffer from
`Buffer.get_dispatch_config(n).get_nvl_buffer_size_hint(...)` (and the combine one) and call dispatch/combine
without `config=`, so DeepEP picks `self.get_*_config(self.group_size)` (deep_ep/buffer.py L373, L435).
apply() replaces those two static methods with ones that return the tuned Config for the tuned rank count
(and DeepEP's own answer for any other), and calls `Buffer.set_num_sms`. Both the buffer size and every call
without `config=` then follow the tuned values. `unapply()` restores DeepEP's originals.

apply() also installs a recording subclass of deep_ep.Config (see `acquire_recorder`) so that an audit
(deepep_tune.audit) can tell which config a call ran with: Config's fields cannot be read from Python.

Environment: DEEPEP_TUNE_APPLY=<results path> plus `apply_from_env()`, or the site hook printed by
`python -m deepep_tune.audit --pythonpath`, which applies at `import deep_ep` without editing the script.
"""

from __future__ import annotations

import collections
import gc
import os
import sys
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Optional

from ..deepep.config import ConfigArgs
from ..record.results import Results, TunedResults, library_of, load_results

APPLY_ENV = "DEEPEP_TUNE_APPLY"
# Marks every function and class this package puts into deep_ep, so that re-applying (even after this module
# was reloaded) unwraps instead of stacking.
MARK = "__deepep_tune__"
ORIGINAL = "__deepep_tune_original__"


class TunedConfigWarning(UserWarning):
    """The results may not fit this process (hardware, rank count, shapes, or not a real measurement)."""


@dataclass(frozen=True)
class Applied:
    """What apply() installed into deep_ep.Buffer."""

    ep_size: int
    num_sms: int
    dispatch: ConfigArgs
    combine: ConfigArgs
    source: str
    previous_num_sms: int  # Buffer.num_sms before the first apply; unapply() puts it back
    recorder: str  # "subclass" or "factory": how deep_ep.Config records its arguments
    warnings: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (f"deepep-tune: applied {self.source} for ep{self.ep_size}: Buffer.set_num_sms({self.num_sms}), "
                f"dispatch {self.dispatch}, combine {self.combine}")


# ----------------------------------------------------------------------------------------------------------
# The recording Config. deep_ep.Config's fields are not readable from Python, so while apply or an audit is
# active, deep_ep.Config and the Config global of the module defining Buffer (the one DeepEP's own getters
# use) are replaced by a Python subclass that remembers its constructor arguments. pybind11 classes can be
# subclassed unless declared final; if that fails, a factory builds real Configs and remembers their
# arguments by id, holding a strong reference so the id cannot be reused while it is remembered.

_FACTORY_LIMIT = 1 << 16  # remembered configs in factory mode; DeepEP's getters build 12 per call
_ARGS_ATTR = "_deepep_tune_args"


@dataclass
class _Recorder:
    users: int = 0
    real: Optional[type] = None
    replacement: Any = None
    mode: str = ""
    modules: list = field(default_factory=list)
    remembered: "collections.OrderedDict[int, tuple[Any, ConfigArgs]]" = field(
        default_factory=collections.OrderedDict)
    pinned: dict = field(default_factory=dict)  # id -> (config, args) for apply's tuned configs


_recorder = _Recorder()


def config_args(config: Any) -> Optional[ConfigArgs]:
    """The arguments `config` was built with, or None if it was built while nothing was recording."""
    args = getattr(config, _ARGS_ATTR, None)
    if isinstance(args, ConfigArgs):
        return args
    for table in (_recorder.pinned, _recorder.remembered):
        entry = table.get(id(config))
        if entry is not None and entry[0] is config:
            return entry[1]
    return None


def recorder_mode() -> str:
    """"subclass", "factory", or "" when not recording."""
    return _recorder.mode if _recorder.users else ""


def _real_config(cls: Any) -> type:
    return getattr(cls, ORIGINAL, cls) if getattr(cls, MARK, False) else cls


def _make_subclass(real: type) -> type:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        real.__init__(self, *args, **kwargs)
        # Python subclasses of pybind11 classes get a __dict__, so the arguments can live on the instance.
        setattr(self, _ARGS_ATTR, ConfigArgs.from_call(args, kwargs))

    cls = type(real)("Config", (real,), {"__init__": __init__, "__module__": real.__module__,
                                         "__doc__": real.__doc__, MARK: True, ORIGINAL: real})
    probe = cls(20, 6, 256, 6, 128)  # fails here, not in the training loop, if the instance takes no attributes
    if config_args(probe) != ConfigArgs(20, 6, 256, 6, 128):
        raise TypeError("recording subclass does not keep its arguments")
    return cls


def _make_factory(real: type) -> Callable[..., Any]:
    def Config(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (stands in for the class)
        config = real(*args, **kwargs)
        remembered = _recorder.remembered
        remembered[id(config)] = (config, ConfigArgs.from_call(args, kwargs))
        if len(remembered) > _FACTORY_LIMIT:
            remembered.popitem(last=False)  # the oldest becomes "unknown"; tuned ones are pinned
        return config

    setattr(Config, MARK, True)
    setattr(Config, ORIGINAL, real)
    Config.__doc__ = real.__doc__
    return Config


def _config_modules(deep_ep: ModuleType) -> list[ModuleType]:
    """deep_ep itself and the module whose global Config the default getters use (deep_ep.buffer in v1,
    deep_ep.buffers.legacy in v2)."""
    modules = [deep_ep]
    buffer_module = sys.modules.get(getattr(deep_ep.Buffer, "__module__", ""))
    if buffer_module is not None and buffer_module is not deep_ep:
        modules.append(buffer_module)
    return modules


def acquire_recorder(deep_ep: ModuleType) -> str:
    """Make deep_ep.Config record its arguments (counted: each acquire needs a release). Returns the mode."""
    r = _recorder
    if r.users == 0:
        real = _real_config(deep_ep.Config)
        try:
            replacement, mode = _make_subclass(real), "subclass"
        except Exception:  # e.g. a pybind11 class declared py::is_final
            replacement, mode = _make_factory(real), "factory"
        modules = _config_modules(deep_ep)
        for module in modules:
            if _real_config(getattr(module, "Config", None)) is real:
                module.Config = replacement
        r.real, r.replacement, r.mode, r.modules = real, replacement, mode, modules
    r.users += 1
    return r.mode


def release_recorder() -> None:
    r = _recorder
    if r.users == 0:
        return
    r.users -= 1
    if r.users:
        return
    for module in r.modules:
        if getattr(module, "Config", None) is r.replacement:  # leave anyone else's later patch alone
            module.Config = r.real
    r.remembered.clear()
    r.pinned.clear()
    r.real, r.replacement, r.mode, r.modules = None, None, "", []


def _build_config(args: ConfigArgs, pin: bool = False) -> Any:
    """A Config from the recording class (apply holds the recorder, so it is installed)."""
    config = _recorder.replacement(*args.as_tuple())
    if pin and config_args(config) is not None and _recorder.mode == "factory":
        _recorder.pinned[id(config)] = (config, args)
    return config


# ----------------------------------------------------------------------------------------------------------
# apply / unapply


@dataclass
class _State:
    applied: Applied
    buffer_cls: type
    originals: dict  # name -> the raw class attribute (staticmethod) DeepEP defined
    previous_num_sms: int
    warned_ranks: set = field(default_factory=set)


_state: Optional[_State] = None


def current() -> Optional[Applied]:
    """What is applied now, or None."""
    return _state.applied if _state is not None else None


def next_gen(results: Results) -> Optional[ModuleType]:
    """The runtime module of a results file tuned for DeepEP V2 or HybridEP (runtime/elastic.py, runtime/hybrid.py);
    None for DeepEP v1's (this module)."""
    library = library_of(results)
    if library == "deepep-v1":
        return None
    from . import elastic, hybrid

    modules = {elastic.LIBRARY: elastic, hybrid.LIBRARY: hybrid}
    if library not in modules:
        raise ValueError(f"{getattr(results, '__fspath__', lambda: results)()}: results of {library}, which "
                         f"deepep_tune.apply cannot put into effect")
    return modules[library]


def apply(results: Results, *, hidden: Optional[int] = None, num_topk: Optional[int] = None,
          num_experts: Optional[int] = None, **options: Any) -> Any:
    """Install the tuned configs of `results` (a results-file path or its dict).

    DeepEP v1 (deep_ep.Buffer): call it before the framework creates its Buffer: the buffer is sized from the
    getters it replaces. DeepEP V2 and HybridEP results go to runtime/elastic.py and runtime/hybrid.py (options:
    their own, e.g. force=True for V2). hidden/num_topk/num_experts, when given, are checked against the shapes
    the results were tuned for. Applying again replaces the previous apply; nothing stacks. Returns what was
    installed.
    """
    module = next_gen(results)
    if module is not None:
        return module.apply(results, hidden=hidden, num_topk=num_topk, num_experts=num_experts, **options)
    if options:
        raise TypeError(f"apply() of DeepEP v1 results takes no {', '.join(options)}")
    global _state
    tuned = load_results(results)
    deep_ep_was_loaded = "deep_ep" in sys.modules
    try:
        import deep_ep
    except ImportError as e:
        raise ImportError(f"deepep_tune.apply needs DeepEP (import deep_ep failed: {e})") from e

    notes = _fit_warnings(tuned, hidden=hidden, num_topk=num_topk, num_experts=num_experts)
    if deep_ep_was_loaded and _state is None and _live_buffers(deep_ep.Buffer):
        notes.append("a deep_ep.Buffer already exists and was sized before apply; call apply before the framework "
                     "creates its buffer")
    for note in notes:
        warnings.warn(note, TunedConfigWarning, stacklevel=2)

    if _state is not None:
        _uninstall(_state)
        _state = None
    buffer_cls = deep_ep.Buffer
    mode = acquire_recorder(deep_ep)
    try:
        originals = {name: _unwrap(buffer_cls.__dict__[name]) for name in ("get_dispatch_config", "get_combine_config")}
        previous_num_sms = buffer_cls.num_sms
        buffer_cls.set_num_sms(tuned.num_sms)
    except BaseException:
        release_recorder()
        raise
    applied = Applied(ep_size=tuned.ep_size, num_sms=tuned.num_sms, dispatch=tuned.dispatch, combine=tuned.combine,
                      source=tuned.source, previous_num_sms=previous_num_sms, recorder=mode, warnings=tuple(notes))
    state = _State(applied=applied, buffer_cls=buffer_cls, originals=originals, previous_num_sms=previous_num_sms)
    for op, args in (("dispatch", tuned.dispatch), ("combine", tuned.combine)):
        name = f"get_{op}_config"
        setattr(buffer_cls, name, staticmethod(_tuned_getter(name, _build_config(args, pin=True), tuned.ep_size,
                                                             originals[name], state)))
    _state = state
    return applied


def unapply() -> bool:
    """Restore DeepEP's own getters and Buffer.num_sms (and whatever a V2 or HybridEP apply changed). Returns
    whether anything was applied."""
    global _state
    undone = False
    for name in ("deepep_tune.runtime.elastic", "deepep_tune.runtime.hybrid"):
        if name in sys.modules:
            undone = sys.modules[name].unapply() or undone
    if _state is None:
        return undone
    _uninstall(_state)
    _state = None
    return True


def apply_from_env(**shapes: Optional[int]) -> Optional[Applied]:
    """apply($DEEPEP_TUNE_APPLY) when that variable names a results file; None when it is unset or empty."""
    path = os.environ.get(APPLY_ENV, "").strip()
    return apply(path, **shapes) if path else None


def _unwrap(raw: Any) -> Any:
    """DeepEP's own class attribute, even if a tuned getter (from an earlier apply) is installed."""
    while getattr(getattr(raw, "__func__", raw), MARK, False):
        raw = getattr(raw.__func__, ORIGINAL)
    return raw


def _tuned_getter(name: str, tuned_config: Any, ep_size: int, original: Any, state: _State) -> Callable[[int], Any]:
    deepep_getter = original.__func__ if isinstance(original, staticmethod) else original

    def getter(num_ranks: int) -> Any:
        if num_ranks == ep_size:
            return tuned_config
        if num_ranks not in state.warned_ranks:
            state.warned_ranks.add(num_ranks)
            warnings.warn(f"deepep-tune: Buffer.{name}({num_ranks}) asked for {num_ranks} ranks but the tuned "
                          f"configs are for {ep_size}; using DeepEP's default for {num_ranks} ranks",
                          TunedConfigWarning, stacklevel=2)
        return deepep_getter(num_ranks)

    getter.__name__ = getter.__qualname__ = name
    getter.__doc__ = f"deepep-tune: the tuned Config for {ep_size} ranks, DeepEP's default otherwise."
    setattr(getter, MARK, True)
    setattr(getter, ORIGINAL, original)
    getter.__wrapped__ = deepep_getter  # type: ignore[attr-defined]
    return getter


def _uninstall(state: _State) -> None:
    cls = state.buffer_cls
    for name, raw in state.originals.items():
        if getattr(getattr(cls.__dict__.get(name), "__func__", None), MARK, False):
            setattr(cls, name, raw)
    cls.num_sms = state.previous_num_sms
    release_recorder()


def _live_buffers(buffer_cls: type) -> bool:
    """Whether a Buffer with a live runtime exists (one gc scan, only when deep_ep was imported before apply)."""
    # type(o), not isinstance: some objects (torch's deprecated aliases) warn when their __class__ is read.
    return any(issubclass(type(o), buffer_cls) and getattr(o, "runtime", None) is not None for o in gc.get_objects())


def _fit_warnings(tuned: TunedResults, *, hidden: Optional[int], num_topk: Optional[int],
                  num_experts: Optional[int]) -> list[str]:
    """One line per reason the results may not fit this process."""
    notes = []
    here = _device_name()
    if here is not None and tuned.device_name and here != tuned.device_name:
        notes.append(f"deepep-tune: results were measured on {tuned.device_name!r} but this process runs on "
                     f"{here!r}; re-tune on this hardware")
    world = _world_size()
    if world is not None and world != tuned.ep_size:
        notes.append(f"deepep-tune: results are for {tuned.ep_size} ranks but this job has {world}; the tuned "
                     f"configs serve only {tuned.ep_size}-rank EP groups")
    given = {"hidden": hidden, "num_topk": num_topk, "num_experts": num_experts}
    differ = [(k, tuned.workload.get(k), v) for k, v in given.items()
              if v is not None and tuned.workload.get(k) is not None and tuned.workload.get(k) != v]
    if differ:
        was = ", ".join(f"{k}={w}" for k, w, _ in differ)
        now = ", ".join(f"{k}={v}" for k, _, v in differ)
        notes.append(f"deepep-tune: results were tuned for {was} but this model has {now}; re-tune for these shapes")
    if tuned.backend not in (None, "deepep"):
        notes.append(f"deepep-tune: results come from the {tuned.backend!r} backend, not a DeepEP measurement; "
                     f"use them to test the plumbing, not for speed")
    elif tuned.colocated:
        notes.append("deepep-tune: results were measured with several ranks sharing one GPU (colocated, no NVLink); "
                     "they are functional, not configs for a real node")
    return notes


def _device_name() -> Optional[str]:
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        # Before the framework sets its device, LOCAL_RANK's GPU is the one this rank will use.
        index = (torch.cuda.current_device() if torch.cuda.is_initialized()
                 else int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1))
        return torch.cuda.get_device_name(index)
    except Exception:
        return None


def _world_size() -> Optional[int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    value = os.environ.get("WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() else None
