"""The results file: one module writes it and reads it back (for --compare, the OPTIMAL_CONFIGS.md renderer,
apply and the audit). Written atomically; top-level normal_dispatch/normal_combine make a DeepEP v1 results
file loadable by SGLang as-is."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

from ..deepep.config import CONFIG_KEYS, ConfigArgs

Results = Union[str, "os.PathLike[str]", Mapping[str, Any]]
SCHEMA_VERSION = 2


def results_name(ep_size: int, backend: str, colocated: bool) -> str:
    """RESULTS_EP<N>.json only for real kernels with one rank per GPU; anything else says what it is."""
    suffix = "" if backend == "deepep" and not colocated else (f"_{backend}" if backend != "deepep" else "_colocated")
    return f"RESULTS_EP{ep_size}{suffix}.json"


def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class TunedResults:
    """What apply and the audit need from a results file."""

    ep_size: int
    dispatch: ConfigArgs
    combine: ConfigArgs
    source: str
    device_name: Optional[str] = None
    colocated: bool = False
    backend: Optional[str] = None
    workload: Mapping[str, Any] = field(default_factory=dict)
    mode: Optional[str] = None
    objective: str = "forward"  # results written before --objective existed timed dispatch + combine

    @property
    def num_sms(self) -> int:
        return self.dispatch.num_sms


def _read(results: Results) -> tuple[Mapping[str, Any], str]:
    if isinstance(results, Mapping):
        return results, "<results dict>"
    source = os.fspath(results)
    with open(source) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source}: not a JSON results file ({e})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: not a deepep-tune results file (top level is not an object)")
    return data, source


def load_results(results: Results) -> TunedResults:
    """Read and validate a results file (path) or an already loaded dict. Raises ValueError with one line."""
    data, source = _read(results)

    def need(obj: Mapping[str, Any], key: str, where: str) -> Any:
        if key not in obj:
            raise ValueError(f"{source}: missing {where}{key}; is this a deepep-tune results file?")
        return obj[key]

    ep_size = need(data, "ep_size", "")
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ValueError(f"{source}: ep_size must be a positive integer, got {ep_size!r}")
    ops = {}
    for op in ("dispatch", "combine"):
        section = need(data, f"normal_{op}", "")
        if not isinstance(section, Mapping):
            raise ValueError(f"{source}: normal_{op} must be an object of deep_ep.Config keyword arguments")
        values = [need(section, k, f"normal_{op}.") for k in CONFIG_KEYS]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{source}: normal_{op} values must be integers, got {dict(section)}")
        args = ConfigArgs(*values)
        problem = args.error()
        if problem:
            raise ValueError(f"{source}: normal_{op} {problem}")
        ops[op] = args
    if ops["dispatch"].num_sms != ops["combine"].num_sms:
        raise ValueError(f"{source}: normal_dispatch.num_sms={ops['dispatch'].num_sms} but normal_combine.num_sms="
                         f"{ops['combine'].num_sms}; DeepEP needs one num_sms for both (the handle ties them)")
    hw = data.get("hardware") if isinstance(data.get("hardware"), Mapping) else {}
    workload = data.get("workload") if isinstance(data.get("workload"), Mapping) else {}
    return TunedResults(ep_size=ep_size, dispatch=ops["dispatch"], combine=ops["combine"], source=source,
                        device_name=hw.get("device_name"), colocated=bool(data.get("colocated", False)),
                        backend=data.get("backend"), workload=dict(workload), mode=data.get("mode"),
                        objective=str(data.get("objective", "forward")))




@dataclass(frozen=True)
class TunedKnobs:
    """The answer of a results file of any library: its declaration's knobs per op (the runtime side of DeepEP V2
    and HybridEP reads these; DeepEP v1's consumers read normal_dispatch/normal_combine via load_results)."""

    library: str
    ep_size: int
    dispatch: Mapping[str, Any]
    combine: Mapping[str, Any]
    source: str
    device_name: Optional[str] = None
    workload: Mapping[str, Any] = field(default_factory=dict)
    objective: str = "forward"
    colocated: bool = False
    backend: Optional[str] = None


def read_results(path: str) -> dict[str, Any]:
    """A whole results file as written; ValueError (one line) for a file that is not one."""
    data, source = _read(path)
    if not all(k in data for k in ("best", "ep_size", "hardware", "per_num_sms")):
        raise ValueError(f"{source}: not a deepep-tune results file (no best/ep_size/hardware/per_num_sms)")
    return dict(data)


def library_of(results: Results) -> str:
    """The library a results file (or its dict) was tuned for; files written before other libraries are v1's."""
    data, _ = _read(results)
    return str(data.get("library", "deepep-v1"))


def load_tuned(results: Results, library: Optional[str] = None) -> TunedKnobs:
    """Read the answer of a results file: best.dispatch and best.combine, by the library's knob names (times and
    statistics dropped). With `library`, refuse a file of another library. Raises ValueError with one line."""
    data, source = _read(results)
    lib = str(data.get("library", "deepep-v1"))
    if library is not None and lib != library:
        raise ValueError(f"{source}: results of {lib}, not {library}; tune with --backend for {library}")
    best, knobs = data.get("best"), (data.get("space") or {}).get("knobs") or {}
    if not isinstance(best, Mapping) or not isinstance(data.get("ep_size"), int):
        raise ValueError(f"{source}: missing best or ep_size; is this a deepep-tune results file?")
    ops = {}
    for op in ("dispatch", "combine"):
        names = knobs.get(op) or ["num_sms", "nvl_chunk", "nvl_buffer"]
        section = best.get(op)
        if not isinstance(section, Mapping) or any(k not in section for k in names):
            raise ValueError(f"{source}: best.{op} lacks the knobs {names}")
        ops[op] = {k: section[k] for k in names}
    hw = data.get("hardware") if isinstance(data.get("hardware"), Mapping) else {}
    return TunedKnobs(lib, data["ep_size"], ops["dispatch"], ops["combine"], source, hw.get("device_name"),
                      dict(data.get("workload") or {}), str(data.get("objective", "forward")),
                      bool(data.get("colocated", False)), data.get("backend"))
