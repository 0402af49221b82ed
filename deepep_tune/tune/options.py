"""Tuner options in sections (workload, search, measurement, layer check, outputs), each a dataclass whose
fields carry their defaults, flags and help. The command line is generated from them, and one validation
serves the launcher (before any rank starts) and every rank. Torch-free: the launcher imports it."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shlex
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterator

from ..deepep.config import SUPPORTED_RANKS, V1
from ..deepep.gpus import gpu_error
from ..deepep.models import find_preset, list_models, preset_of
from ..deepep.workload import LayerShape, Workload, layer_shape_error, workload_error
from ..knobs import KnobSpace, load_library
from ..record.log import landscape_library

MODES = ("quick", "full")
BACKENDS = ("deepep", "reference", "replay", "deepep-v2", "hybridep")
# The knob declaration each backend tunes (a replay's comes from --library or its landscape).
BACKEND_LIBRARY = {"deepep": "deepep-v1", "reference": "deepep-v1", "deepep-v2": "deepep-v2", "hybridep": "hybridep"}
GPU_BACKENDS = ("deepep", "deepep-v2", "hybridep")
OBJECTIVES = ("train", "forward")
# DeepEP's own timeouts are ~100 s; a measurement takes well under a second, so 30 s means a hang.
DEFAULT_TIMEOUT_S = 30.0
_W = Workload()


def _opt(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A field with its command-line flag: --name-with-dashes (or `flag`), typed like the default unless told."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class WorkloadOptions:
    model: str | None = _opt(None, "fill the workload shape from a model preset (see --list-models)")
    num_tokens: tuple[int, ...] = _opt((_W.num_tokens,), "tokens per rank; several comma-separated sizes give a "
                                       "best config per size and overall", type=str)
    hidden: int | None = _opt(None, f"hidden size (default {_W.hidden}, or the --model's)", type=int)
    num_topk: int | None = _opt(None, f"experts per token (default {_W.num_topk}, or the --model's)", type=int)
    num_experts: int | None = _opt(None, f"routed experts (default {_W.num_experts}, or the --model's)", type=int)
    dispatch_dtype: str = _opt(_W.dispatch_dtype, "bf16 or fp8")
    expert_alignment: int = _opt(_W.expert_alignment, "DeepEP dispatch's expert_alignment (SGLang with DeepGEMM "
                                                      "dispatches fp8 with 128)")
    seed: int = _opt(_W.seed, "routing seed (each rank adds its rank)")

    def at(self, num_tokens: int | None = None) -> Workload:
        """The workload at a token count (the first by default): explicit flags, else the model preset, else
        DeepEP's test defaults (DeepSeek-V3's shape)."""
        preset = find_preset(self.model) if self.model else None
        pick = lambda mine, name: mine if mine is not None else getattr(preset or _W, name)  # noqa: E731
        return Workload(self.num_tokens[0] if num_tokens is None else num_tokens, pick(self.hidden, "hidden"),
                        pick(self.num_topk, "num_topk"), pick(self.num_experts, "num_experts"), self.dispatch_dtype,
                        self.seed, self.expert_alignment)


@dataclass
class SearchOptions:
    mode: str = _opt("quick", "quick (sparse search, minutes) or full (every config of the grid)", choices=MODES)
    backend: str = _opt("deepep", "deepep (DeepEP v1's Buffer, real kernels), deepep-v2 (DeepEP V2's ElasticBuffer), "
                                  "hybridep (NVIDIA's HybridEPBuffer), reference (CPU, gloo) or replay",
                        choices=BACKENDS)
    library: str | None = _opt(None, "knob declaration of the library a replayed landscape was measured with "
                                     "(default: the landscape's own, else deepep-v1; or module:ATTRIBUTE)")
    objective: str = _opt("train", "train: minimise what a training step runs per MoE layer (forward dispatch + "
                                   "combine, backward combine + cached dispatch); forward: dispatch + combine "
                                   "(inference, e.g. SGLang prefill)", choices=OBJECTIVES)
    max_sms: int | None = _opt(None, "largest num_sms the answer may use (SMs spent on communication are taken "
                                     "from compute)", type=int)
    sm_tolerance: float = _opt(0.05, "advise the smallest num_sms within this fraction of the fastest")
    max_buffer_gb: float = _opt(4.0, "largest NVL buffer per rank to sweep")
    retime_rounds: int = _opt(20, "rounds of the final interleaved re-timing of the pick and the baselines")
    compare: tuple[str, ...] = _opt((), "results files whose picks join the final re-timing (e.g. a quick run's "
                                        "against this full run)", nargs="+", metavar="RESULTS")


@dataclass
class MeasurementOptions:
    warmup: int = _opt(2, "untimed runs before each measurement")
    iters: int = _opt(10, "timed runs per measurement (x3 when re-measuring)")
    race_iters: int | None = _opt(None, "timed runs of each config's short first pass; only configs within "
                                        "--race-margin of their op's fastest get the full --iters (default 3 in "
                                        "full mode, 0 in quick; 0, or not below --iters: no racing)", type=int)
    race_margin: float = _opt(0.10, "a short pass within this fraction of its op's fastest config earns the full count")
    timeout_s: float = _opt(DEFAULT_TIMEOUT_S, "a measurement running longer is recorded as a hang and the ranks "
                                               "restart")
    colocate: bool = _opt(False, "allow more ranks than GPUs (needs CUDA MPS); results are labelled co-located")
    replay: str | None = _opt(None, "landscape or log answering --backend replay", metavar="FILE")
    replay_noise: float = _opt(0.0, "relative spread of replayed times")
    baseline_a2a: bool = _opt(False, "also time torch.distributed.all_to_all_single moving the same tokens")


@dataclass
class LayerCheckOptions:
    enabled: bool = _opt(False, "after the search, time a MoE layer forward + backward with the pick and the "
                                "baselines (real kernels)", flag="--layer-check")
    moe_intermediate: int | None = _opt(None, "routed expert FFN size for --layer-check (default: the --model's, "
                                              "or DeepSeek-V3's for its default shapes)", type=int)
    num_shared_experts: int | None = _opt(None, "shared experts for --layer-check (default: as --moe-intermediate)",
                                          type=int)
    shared_intermediate: int | None = _opt(None, "shared expert FFN size for --layer-check (default: as "
                                                 "--moe-intermediate)", type=int)
    layer_rounds: int = _opt(20, "interleaved rounds of --layer-check")


@dataclass
class OutputOptions:
    out_dir: str = _opt(".", "where logs/ and the results go (created if missing)")
    run_id: str | None = _opt(None, "names the log: logs/tune_ep<N>_<run-id>.jsonl")
    resume: str | None = _opt(None, "continue the newest unfinished run in --out-dir, or the given log",
                              nargs="?", const="", metavar="LOG")
    emit: bool = _opt(False, "print every paste target")
    plot: bool = _opt(False, "write PNG plots next to the results")


SECTIONS = {"workload": WorkloadOptions, "search": SearchOptions, "measurement": MeasurementOptions,
            "layer_check": LayerCheckOptions, "outputs": OutputOptions}


@dataclass
class Options:
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    measurement: MeasurementOptions = field(default_factory=MeasurementOptions)
    layer_check: LayerCheckOptions = field(default_factory=LayerCheckOptions)
    outputs: OutputOptions = field(default_factory=OutputOptions)

    @classmethod
    def of(cls, **flat: Any) -> "Options":
        """Options from flat names, as on the command line (layer_check=True is --layer-check)."""
        values: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
        names = {dest_of(sec, f): (sec, f.name) for sec, _, f in option_fields()}
        for k, v in flat.items():
            if k not in names:
                raise TypeError(f"no option {k!r}")
            sec, name = names[k]
            values[sec][name] = v
        return cls(**{sec: c(**values[sec]) for sec, c in SECTIONS.items()})

    @property
    def shape(self) -> Workload:
        """The workload at the first token count."""
        return self.workload.at()

    def as_dict(self) -> dict[str, Any]:
        """Flat, by flag name (the log header and the results file keep this layout)."""
        d: dict[str, Any] = {}
        for section, _, f in option_fields():
            value = getattr(getattr(self, section), f.name)
            d[dest_of(section, f)] = list(value) if isinstance(value, tuple) else value
        d["token_counts"] = d.pop("num_tokens")
        return d


def option_fields() -> Iterator[tuple[str, type, Any]]:
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield section, cls, f


def dest_of(section: str, f: Any) -> str:
    """The flat name of a field: its flag without dashes (layer_check.enabled is --layer-check)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))[2:].replace("-", "_")


# Racing pays where most configs cannot win (full mode: -36 % search time on two H200s); quick measures
# mostly contenders, which a short pass only delays (README 'Racing').
RACE_ITERS = {"full": 3, "quick": 0}


def race_iters(mode: str, iters: int, asked: int | None) -> int:
    """The short pass's timed runs: asked or the mode's default; 0 (no racing) unless shorter than --iters."""
    n = RACE_ITERS[mode] if asked is None else asked
    return n if n < iters else 0


# Options that change what is measured or how: a resumed run must match the log on these.
RESUME_OPTIONS = ("max_sms", "colocate", "replay", "replay_noise", "warmup", "iters", "max_buffer_gb", "objective",
                  "race_iters", "race_margin")
# What a log written before an option existed measured with, where that differs from today's default.
LEGACY_DEFAULTS = {"race_iters": 0}


class OptionsError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see --help)\n")


class _ListModels(argparse.Action):
    """--list-models, for the launcher and the ranks alike: print the presets (once, from rank 0) and exit."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        if os.environ.get("RANK", "0") == "0":
            print(list_models())
        parser.exit(0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tune_singlenode.py",
                description="Find the fastest DeepEP intranode dispatch/combine config. Launch one process per GPU "
                            "with torchrun (or ./run.sh N quick|full).")
    p.add_argument("--list-models", action=_ListModels, help="print the model presets and exit")
    for section, _, f in option_fields():
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        kw: dict[str, Any] = {"help": meta.pop("help"), "default": None if f.default is MISSING else f.default}
        if f.default is False:
            kw["action"] = "store_true"
        else:
            kw.update(meta)
            kw.setdefault("type", type(f.default) if f.default is not None and "nargs" not in meta else str)
        if kw["default"] is not None and not isinstance(kw["default"], bool):
            d = kw["default"]
            kw["help"] += f" (default {d if not isinstance(d, tuple) else ','.join(map(str, d))})"
        p.add_argument(flag, dest=f"{section}.{f.name}", **kw)
    return p


def _token_counts(text: Any) -> tuple[int, ...]:
    if isinstance(text, tuple):
        return text
    try:
        counts = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise OptionsError(f"--num-tokens takes integers separated by commas, got {text!r}") from None
    if not counts or len(set(counts)) != len(counts):
        raise OptionsError(f"--num-tokens needs one or more distinct sizes, got {text!r}")
    return counts


def options_from_args(a: argparse.Namespace) -> Options:
    """Raises OptionsError (one line) for values that cannot even be parsed: an unknown model, bad sizes."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, _, f in option_fields():
        values[section][f.name] = getattr(a, f"{section}.{f.name}")
    w = values["workload"]
    w["num_tokens"] = _token_counts(w["num_tokens"])
    values["search"]["compare"] = tuple(values["search"]["compare"] or ())
    if w["model"]:
        preset = find_preset(w["model"])
        if preset is None:
            raise OptionsError(f"unknown --model {w['model']!r}: see --list-models")
        w["model"] = preset.name
    return Options(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})


def _checks(o: Options) -> Iterator[tuple[bool, str]]:
    s, m, out = o.search, o.measurement, o.outputs
    yield 0 <= s.sm_tolerance < 1, f"--sm-tolerance must be in [0, 1), got {s.sm_tolerance}"
    yield (s.max_sms is None or (s.max_sms >= 2 and s.max_sms % 2 == 0),
           f"--max-sms must be an even number >= 2, got {s.max_sms}")
    yield m.warmup >= 0 and m.iters >= 1, f"--warmup must be >= 0 and --iters >= 1, got {m.warmup} and {m.iters}"
    yield m.race_iters is None or m.race_iters >= 0, f"--race-iters must be >= 0, got {m.race_iters}"
    yield m.race_margin > 0, f"--race-margin must be positive, got {m.race_margin}"
    yield m.timeout_s > 0 and math.isfinite(m.timeout_s), f"--timeout-s must be positive, got {m.timeout_s}"
    yield s.max_buffer_gb > 0, f"--max-buffer-gb must be positive, got {s.max_buffer_gb}"
    yield 0 <= m.replay_noise < 1, f"--replay-noise must be in [0, 1), got {m.replay_noise}"
    yield (s.retime_rounds >= 1 and o.layer_check.layer_rounds >= 1,
           f"--retime-rounds and --layer-rounds must be >= 1, got {s.retime_rounds} and {o.layer_check.layer_rounds}")
    yield (s.backend != "replay" or bool(m.replay),
           "--backend replay needs --replay FILE (a landscape or a log written by this tool)")
    yield not m.replay or s.backend == "replay", "--replay FILE is only used with --backend replay"
    yield not s.library or s.backend == "replay", "--library is only used with --backend replay"
    yield not m.replay or os.path.isfile(m.replay), f"--replay {m.replay}: no such file"
    yield not out.resume or os.path.isfile(out.resume), f"--resume {out.resume}: no such file"
    yield (out.run_id is None or (bool(out.run_id) and "/" not in out.run_id),
           f"--run-id {out.run_id!r} must be a non-empty name without '/'")
    yield (not os.path.exists(out.out_dir) or os.path.isdir(out.out_dir),
           f"--out-dir {out.out_dir} is a file; pass a directory")
    for path in s.compare:
        yield os.path.isfile(path), f"--compare {path}: no such file"


def options_error(o: Options, num_ranks: int) -> str | None:
    """Everything that can be checked without a GPU, as one line saying what to do."""
    if num_ranks not in SUPPORTED_RANKS:
        return f"DeepEP intranode kernels run on 2, 4 or 8 ranks, not {num_ranks}: launch 2, 4 or 8 processes"
    for n in o.workload.num_tokens:
        err = workload_error(o.workload.at(n), num_ranks)
        if err:
            return err
    for ok, why in _checks(o):
        if not ok:
            return why
    if o.layer_check.enabled:
        shape = layer_shape(o)
        err = layer_shape_error(shape, num_ranks) if shape else (
            "--layer-check needs the expert FFN size: pass --model NAME or --moe-intermediate N")
        if err:
            return f"--layer-check: {err}"
    if o.search.backend in GPU_BACKENDS and importlib.util.find_spec("deep_ep") is None:
        which = "" if o.search.backend == "deepep" else "; benchmarks/next_gen/README.md says what V2 and HybridEP need"
        return ("deep_ep is not importable: install DeepEP (github.com/deepseek-ai/DeepEP) for this torch, "
                "or use --backend reference for a CPU dry run" + which)
    return None


def layer_shape(o: Options, num_tokens: int | None = None) -> LayerShape | None:
    """The MoE layer --layer-check times: expert sizes from the flags, else the --model's, else the preset whose
    shape the workload has (DeepSeek-V3's for the default shape); None when no size is known."""
    w = o.workload.at(num_tokens)
    lc = o.layer_check
    preset = find_preset(o.workload.model) if o.workload.model else preset_of(w)
    get = lambda mine, name: mine if mine is not None else getattr(preset, name, None)  # noqa: E731
    moe = get(lc.moe_intermediate, "moe_intermediate")
    if moe is None:
        return None
    return LayerShape(w.num_tokens, w.hidden, w.num_topk, w.num_experts, moe,
                      get(lc.num_shared_experts, "num_shared_experts") or 0,
                      get(lc.shared_intermediate, "shared_intermediate") or 0)


def layer_sizes_source(o: Options) -> str:
    """Where --layer-check's expert sizes come from, for the results and the console."""
    lc = o.layer_check
    if lc.moe_intermediate is not None:
        return "flags"
    if o.workload.model:
        return f"--model {o.workload.model}"
    preset = preset_of(o.shape)
    return f"the {preset.name} preset (the workload has its shape)" if preset else "flags"


def library_of(o: Options) -> KnobSpace:
    """The knob declaration of this run: DeepEP v1 for the real and reference backends; for a replay, --library,
    else the landscape's own, else v1. Raises ValueError (one line)."""
    if o.search.backend != "replay":
        return load_library(BACKEND_LIBRARY[o.search.backend])
    return load_library(o.search.library or landscape_library(o.measurement.replay or "") or V1.library)


def parse_options(argv: list[str]) -> Options | int:
    """The options of argv, or an exit code (argparse printed --help or its one-line error). Raises
    OptionsError for values that parse but mean nothing (an unknown model, bad sizes)."""
    try:
        return options_from_args(build_parser().parse_args(argv))
    except SystemExit as e:
        return int(e.code or 0)


def check_options(o: Options, num_ranks: int, num_gpus: int | None) -> str | None:
    """The one validation of launcher and ranks; num_gpus=None skips the GPU checks."""
    err = options_error(o, num_ranks)
    if not err and o.search.backend in GPU_BACKENDS and num_gpus is not None:
        err = gpu_error(num_ranks, num_gpus, o.measurement.colocate)
    return err


def drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the named options and their values (--resume's value is optional)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in names:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            skip = nxt is not None and not (a == "--resume" and nxt.startswith("-"))
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


def rerun_command(ranks: int, mode: str, argv: list[str], **set_flags: Any) -> str:
    """The ./run.sh line that repeats this run with some flags replaced (--resume LOG, --max-sms N): the one
    definition behind the resume hint of the launcher and the ranks and the SM-budget advice."""
    names = ("--mode", "--run-id", "--resume", *(("--" + k.replace("_", "-")) for k in set_flags))
    rest = drop_options(list(argv), names)
    extra = [x for k, v in set_flags.items() for x in ("--" + k.replace("_", "-"), str(v))]
    return " ".join(["./run.sh", str(ranks), mode, *map(shlex.quote, rest), *extra])


def resume_error(header: dict[str, Any] | None, finished: bool, path: str, o: Options, ep_size: int,
                 library: str) -> str | None:
    """Why this run may not continue that log: it finished, or it measured something else."""
    h = header or {}
    mine = {"ep_size": ep_size, "backend": o.search.backend, "mode": o.search.mode, "workload": o.shape.as_dict(),
            "token_counts": list(o.workload.num_tokens), "library": library}
    theirs = {k: h.get(k) for k in mine}
    theirs["library"] = h.get("library", "deepep-v1")  # logs written before other libraries were v1's
    # a log written before an option existed measured with its default
    flat, logged = Options().as_dict(), h.get("options") or {}
    for k in RESUME_OPTIONS:
        mine[k], theirs[k] = o.as_dict()[k], logged.get(k, LEGACY_DEFAULTS.get(k, flat[k]))
    # what racing really did, not how it was asked for
    mine["race_iters"] = race_iters(o.search.mode, o.measurement.iters, o.measurement.race_iters)
    theirs["race_iters"] = race_iters(h.get("mode", o.search.mode), logged.get("iters", flat["iters"]),
                                      theirs["race_iters"])
    if isinstance(theirs["workload"], dict):
        theirs["workload"] = {**Workload().as_dict(), **theirs["workload"]}
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        return (f"--resume {path}: this run's {', '.join(diff)} differ from the log's "
                f"({', '.join(f'{k}={theirs[k]}' for k in diff)}); rerun with the log's settings")
    if finished:
        return f"--resume {path}: that run already finished"
    return None
