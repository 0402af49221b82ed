"""Tuner options: one dataclass whose fields carry their defaults, flags and help. The command line is
generated from it, and one validation serves the launcher (before any rank starts) and every rank."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shlex
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .gpus import gpu_error
from .models import find_preset
from .space import SUPPORTED_RANKS
from .workload import Workload, workload_error

MODES = ("quick", "full")
BACKENDS = ("deepep", "reference", "replay")
OBJECTIVES = ("train", "forward")
# DeepEP's own timeouts are ~100 s; a measurement takes well under a second, so 30 s means a hang.
DEFAULT_TIMEOUT_S = 30.0
_W = Workload()


def _opt(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A field with its command-line flag: --name-with-dashes, typed like the default unless told."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class Options:
    mode: str = _opt("quick", "quick (sparse search, minutes) or full (every config of the grid)", choices=MODES)
    backend: str = _opt("deepep", "deepep (real kernels), reference (CPU, gloo) or replay", choices=BACKENDS)
    objective: str = _opt("train", "train: minimise what a training step runs per MoE layer (forward dispatch + "
                                   "combine, backward combine + cached dispatch); forward: dispatch + combine "
                                   "(inference, e.g. SGLang prefill)", choices=OBJECTIVES)
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
    max_sms: int | None = _opt(None, "largest num_sms the answer may use (SMs spent on communication are taken "
                                     "from compute)", type=int)
    colocate: bool = _opt(False, "allow more ranks than GPUs (needs CUDA MPS); results are labelled co-located")
    out_dir: str = _opt(".", "where logs/ and the results go (created if missing)")
    run_id: str | None = _opt(None, "names the log: logs/tune_ep<N>_<run-id>.jsonl")
    resume: str | None = _opt(None, "continue the newest unfinished run in --out-dir, or the given log",
                              nargs="?", const="", metavar="LOG")
    replay: str | None = _opt(None, "landscape or log answering --backend replay", metavar="FILE")
    replay_noise: float = _opt(0.0, "relative spread of replayed times")
    warmup: int = _opt(2, "untimed runs before each measurement")
    iters: int = _opt(10, "timed runs per measurement (x3 when re-measuring)")
    timeout_s: float = _opt(DEFAULT_TIMEOUT_S, "a measurement running longer is recorded as a hang and the ranks "
                                               "restart")
    max_buffer_gb: float = _opt(4.0, "largest NVL buffer per rank to sweep")
    sm_tolerance: float = _opt(0.05, "advise the smallest num_sms within this fraction of the fastest")
    retime_rounds: int = _opt(20, "rounds of the final interleaved re-timing of the pick and the baselines")
    compare: tuple[str, ...] = _opt((), "results files whose picks join the final re-timing (e.g. a quick run's "
                                        "against this full run)", nargs="+", metavar="RESULTS")
    layer_check: bool = _opt(False, "after the search, time a MoE layer forward + backward with the pick and the "
                                    "baselines (real kernels)")
    moe_intermediate: int | None = _opt(None, "routed expert FFN size for --layer-check (default: the --model's)",
                                        type=int)
    num_shared_experts: int | None = _opt(None, "shared experts for --layer-check (default: the --model's)", type=int)
    shared_intermediate: int | None = _opt(None, "shared expert FFN size for --layer-check (default: the --model's)",
                                           type=int)
    layer_rounds: int = _opt(20, "interleaved rounds of --layer-check")
    emit: bool = _opt(False, "print every paste target")
    plot: bool = _opt(False, "write PNG plots next to the results")
    baseline_a2a: bool = _opt(False, "also time torch.distributed.all_to_all_single moving the same tokens")

    @property
    def token_counts(self) -> tuple[int, ...]:
        return self.num_tokens

    @property
    def workload(self) -> Workload:
        """The workload at the first token count: explicit flags, else the model preset, else defaults."""
        preset = find_preset(self.model) if self.model else None
        pick = lambda mine, name: mine if mine is not None else getattr(preset or _W, name)  # noqa: E731
        return Workload(self.num_tokens[0], pick(self.hidden, "hidden"), pick(self.num_topk, "num_topk"),
                        pick(self.num_experts, "num_experts"), self.dispatch_dtype, self.seed,
                        self.expert_alignment)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_counts"] = list(d.pop("num_tokens"))
        return d


# Options that change what is measured or how: a resumed run must match the log on these.
RESUME_OPTIONS = ("max_sms", "colocate", "replay", "replay_noise", "warmup", "iters", "max_buffer_gb", "objective")


class OptionsError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tune_singlenode.py",
                description="Find the fastest DeepEP intranode dispatch/combine config. Launch one process per GPU "
                            "with torchrun (or ./run.sh N quick|full).")
    p.add_argument("--list-models", action="store_true", help="print the model presets and exit")
    for f in fields(Options):
        meta = dict(f.metadata)
        kw: dict[str, Any] = {"help": meta.pop("help"), "default": None if f.default is MISSING else f.default}
        if f.default is False:
            kw["action"] = "store_true"
        else:
            kw.update(meta)
            kw.setdefault("type", type(f.default) if f.default is not None and "nargs" not in meta else str)
        if kw["default"] is not None and not isinstance(kw["default"], bool):
            kw["help"] += f" (default {kw['default'] if not isinstance(kw['default'], tuple) else ','.join(map(str, kw['default']))})"
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
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
    values = {f.name: getattr(a, f.name) for f in fields(Options)}
    values["num_tokens"] = _token_counts(values["num_tokens"])
    values["compare"] = tuple(values["compare"] or ())
    if values["model"]:
        preset = find_preset(values["model"])
        if preset is None:
            raise OptionsError(f"unknown --model {values['model']!r}: see --list-models")
        values["model"] = preset.name
    return Options(**values)


def options_error(o: Options, num_ranks: int) -> str | None:
    """Everything that can be checked without a GPU, as one line saying what to do."""
    if num_ranks not in SUPPORTED_RANKS:
        return f"DeepEP intranode kernels run on 2, 4 or 8 ranks, not {num_ranks}: launch 2, 4 or 8 processes"
    for n in o.token_counts:
        err = workload_error(replace(o.workload, num_tokens=n), num_ranks)
        if err:
            return err
    checks = [
        (0 <= o.sm_tolerance < 1, f"--sm-tolerance must be in [0, 1), got {o.sm_tolerance}"),
        (o.max_sms is None or (o.max_sms >= 2 and o.max_sms % 2 == 0),
         f"--max-sms must be an even number >= 2, got {o.max_sms}"),
        (o.warmup >= 0 and o.iters >= 1, f"--warmup must be >= 0 and --iters >= 1, got {o.warmup} and {o.iters}"),
        (o.timeout_s > 0 and math.isfinite(o.timeout_s), f"--timeout-s must be positive, got {o.timeout_s}"),
        (o.max_buffer_gb > 0, f"--max-buffer-gb must be positive, got {o.max_buffer_gb}"),
        (0 <= o.replay_noise < 1, f"--replay-noise must be in [0, 1), got {o.replay_noise}"),
        (o.retime_rounds >= 1 and o.layer_rounds >= 1,
         f"--retime-rounds and --layer-rounds must be >= 1, got {o.retime_rounds} and {o.layer_rounds}"),
        (o.backend != "replay" or bool(o.replay),
         "--backend replay needs --replay FILE (a landscape or a log written by this tool)"),
        (not o.replay or o.backend == "replay", "--replay FILE is only used with --backend replay"),
        (not o.replay or os.path.isfile(o.replay), f"--replay {o.replay}: no such file"),
        (not o.resume or os.path.isfile(o.resume), f"--resume {o.resume}: no such file"),
        (o.run_id is None or (bool(o.run_id) and "/" not in o.run_id),
         f"--run-id {o.run_id!r} must be a non-empty name without '/'"),
        (not os.path.exists(o.out_dir) or os.path.isdir(o.out_dir), f"--out-dir {o.out_dir} is a file; pass a directory"),
    ]
    for path in o.compare:
        checks.append((os.path.isfile(path), f"--compare {path}: no such file"))
    for ok, why in checks:
        if not ok:
            return why
    if o.layer_check:
        err = layer_shape_error(o)
        if err:
            return err
    if o.backend == "deepep" and importlib.util.find_spec("deep_ep") is None:
        return ("deep_ep is not importable: install DeepEP (github.com/deepseek-ai/DeepEP) for this torch, "
                "or use --backend reference for a CPU dry run")
    return None


def layer_shape(o: Options) -> tuple[int, int, int] | None:
    """(routed expert FFN size, shared experts, shared FFN size) for --layer-check: flags, else the --model's."""
    preset = find_preset(o.model) if o.model else None
    get = lambda mine, name: mine if mine is not None else getattr(preset, name, None)  # noqa: E731
    moe, shared, shared_size = (get(o.moe_intermediate, "moe_intermediate"), get(o.num_shared_experts, "num_shared_experts"),
                                get(o.shared_intermediate, "shared_intermediate"))
    if moe is None:
        return None
    return moe, shared or 0, shared_size or 0


def layer_shape_error(o: Options) -> str | None:
    shape = layer_shape(o)
    if shape is None:
        return "--layer-check needs the expert FFN size: pass --model NAME or --moe-intermediate N"
    if shape[0] <= 0 or shape[1] < 0 or (shape[1] and shape[2] <= 0):
        return f"--layer-check: expert sizes must be positive, got {shape}"
    return None


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
    if not err and o.backend == "deepep" and num_gpus is not None:
        err = gpu_error(num_ranks, num_gpus, o.colocate)
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


def resume_error(header: dict[str, Any] | None, finished: bool, path: str, o: Options, ep_size: int) -> str | None:
    """Why this run may not continue that log: it finished, or it measured something else."""
    h = header or {}
    mine = {"ep_size": ep_size, "backend": o.backend, "mode": o.mode, "workload": o.workload.as_dict(),
            "token_counts": list(o.token_counts)}
    theirs = {k: h.get(k) for k in mine}
    # a log written before an option existed measured with its default
    defaults = {f.name: f.default for f in fields(Options)}
    for k in RESUME_OPTIONS:
        mine[k], theirs[k] = getattr(o, k), (h.get("options") or {}).get(k, defaults[k])
    if isinstance(theirs["workload"], dict):
        theirs["workload"] = {**Workload().as_dict(), **theirs["workload"]}
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        return (f"--resume {path}: this run's {', '.join(diff)} differ from the log's "
                f"({', '.join(f'{k}={theirs[k]}' for k in diff)}); rerun with the log's settings")
    if finished:
        return f"--resume {path}: that run already finished"
    return None
