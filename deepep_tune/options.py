"""Tuner options: one dataclass, parsed from the command line, validated before any rank starts."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from dataclasses import asdict, dataclass, replace

from .logio import LogContents
from .models import find_preset
from .space import SUPPORTED_RANKS
from .workload import Workload, workload_error

MODES = ("quick", "full")
BACKENDS = ("deepep", "reference", "replay")
# DeepEP's own timeouts are ~100 s; a measurement takes well under a second, so 30 s means a hang.
DEFAULT_TIMEOUT_S = 30.0


@dataclass
class Options:
    mode: str = "quick"
    backend: str = "deepep"
    workload: Workload = Workload()
    """The workload; num_tokens is the first of token_counts."""
    token_counts: tuple[int, ...] = (4096,)
    model: str | None = None
    max_sms: int | None = None
    """Largest num_sms the answer may use (SMs spent on communication are taken from compute)."""
    colocate: bool = False
    """Several ranks per GPU (CUDA MPS): a functional check, not NVLink numbers."""
    out_dir: str = "."
    run_id: str | None = None
    resume: str | None = None
    """'' = the newest unfinished run in out_dir; otherwise a log path."""
    replay: str | None = None
    replay_noise: float = 0.0
    warmup: int = 2
    iters: int = 10
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_buffer_gb: float = 4.0
    """Configs whose NVL buffer needs more than this (per rank) are not swept."""
    sm_tolerance: float = 0.05
    """Advice: the smallest num_sms whose dispatch + combine is within this fraction of the fastest."""
    emit: bool = False
    plot: bool = False
    baseline_a2a: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tune_singlenode.py",
        description="Find the fastest DeepEP intranode dispatch/combine config. Launch one process per GPU with "
                    "torchrun (or ./run.sh N quick|full).")
    p.add_argument("--mode", default="quick", help="quick (sparse search, minutes) or full (every config of the grid)")
    p.add_argument("--backend", default="deepep", help="deepep (real kernels), reference (CPU, gloo) or replay")
    w = Workload()
    p.add_argument("--model", default=None, help="fill hidden/top-k/experts from a model preset (see --list-models)")
    p.add_argument("--list-models", action="store_true", help="print the model presets and exit")
    p.add_argument("--num-tokens", default=str(w.num_tokens),
                   help="tokens per rank; several comma-separated sizes give a best config per size and overall")
    p.add_argument("--hidden", type=int, default=None, help=f"hidden size (default {w.hidden}, or the --model's)")
    p.add_argument("--num-topk", type=int, default=None, help=f"experts per token (default {w.num_topk})")
    p.add_argument("--num-experts", type=int, default=None, help=f"routed experts (default {w.num_experts})")
    p.add_argument("--dispatch-dtype", default=w.dispatch_dtype, help="bf16 or fp8")
    p.add_argument("--seed", type=int, default=0, help="routing seed (each rank adds its rank)")
    p.add_argument("--max-sms", type=int, default=None, help="largest num_sms the answer may use")
    p.add_argument("--colocate", action="store_true",
                   help="allow more ranks than GPUs (needs CUDA MPS); results are labelled co-located")
    p.add_argument("--out-dir", default=".", help="where logs/ and the results go (created if missing)")
    p.add_argument("--run-id", default=None, help="names the log: logs/tune_ep<N>_<run-id>.jsonl")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="LOG",
                   help="continue the newest unfinished run in --out-dir, or the given log")
    p.add_argument("--replay", default=None, metavar="FILE", help="landscape or log answering --backend replay")
    p.add_argument("--replay-noise", type=float, default=0.0, help="relative spread of replayed times")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    p.add_argument("--iters", type=int, default=10, help="timed runs per measurement (x3 when re-measuring)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="a measurement running longer is recorded as a hang and the ranks restart")
    p.add_argument("--max-buffer-gb", type=float, default=4.0, help="largest NVL buffer per rank to sweep")
    p.add_argument("--sm-tolerance", type=float, default=0.05,
                   help="advise the smallest num_sms within this fraction of the fastest (default 0.05)")
    p.add_argument("--emit", action="store_true", help="print every paste target (torchtitan, SGLang, Python patch)")
    p.add_argument("--plot", action="store_true", help="write PNG plots next to the results")
    p.add_argument("--baseline-a2a", action="store_true",
                   help="also time torch.distributed.all_to_all_single moving the same tokens")
    return p


class OptionsError(ValueError):
    pass


def _token_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise OptionsError(f"--num-tokens takes integers separated by commas, got {text!r}") from None
    if not counts or len(set(counts)) != len(counts):
        raise OptionsError(f"--num-tokens needs one or more distinct sizes, got {text!r}")
    return counts


def options_from_args(a: argparse.Namespace) -> Options:
    """Raises OptionsError (one line) for values that cannot even be parsed: an unknown model, bad sizes."""
    base = Workload()
    hidden, topk, experts = base.hidden, base.num_topk, base.num_experts
    if a.model:
        preset = find_preset(a.model)
        if preset is None:
            raise OptionsError(f"unknown --model {a.model!r}: see --list-models")
        hidden, topk, experts = preset.hidden, preset.num_topk, preset.num_experts
    counts = _token_counts(a.num_tokens)
    return Options(
        mode=a.mode, backend=a.backend,
        workload=Workload(counts[0], a.hidden if a.hidden is not None else hidden,
                          a.num_topk if a.num_topk is not None else topk,
                          a.num_experts if a.num_experts is not None else experts, a.dispatch_dtype, a.seed),
        token_counts=counts, model=preset.name if a.model else None,
        sm_tolerance=a.sm_tolerance, emit=a.emit, plot=a.plot, baseline_a2a=a.baseline_a2a,
        max_sms=a.max_sms, colocate=a.colocate, out_dir=a.out_dir, run_id=a.run_id, resume=a.resume,
        replay=a.replay, replay_noise=a.replay_noise, warmup=a.warmup, iters=a.iters, timeout_s=a.timeout_s,
        max_buffer_gb=a.max_buffer_gb,
    )


def options_error(o: Options, num_ranks: int) -> str | None:
    """Everything that can be checked without a GPU, as one line saying what to do."""
    if o.mode not in MODES:
        return f"unknown mode {o.mode!r}: use quick or full"
    if o.backend not in BACKENDS:
        return f"unknown --backend {o.backend!r}: use deepep, reference or replay"
    if num_ranks not in SUPPORTED_RANKS:
        return f"DeepEP intranode kernels run on 2, 4 or 8 ranks, not {num_ranks}: launch 2, 4 or 8 processes"
    for n in o.token_counts:
        err = workload_error(replace(o.workload, num_tokens=n), num_ranks)
        if err:
            return err
    if not 0 <= o.sm_tolerance < 1:
        return f"--sm-tolerance must be in [0, 1), got {o.sm_tolerance}"
    if o.max_sms is not None and (o.max_sms < 2 or o.max_sms % 2):
        return f"--max-sms must be an even number >= 2, got {o.max_sms}"
    if o.warmup < 0 or o.iters < 1:
        return f"--warmup must be >= 0 and --iters >= 1, got {o.warmup} and {o.iters}"
    if not (o.timeout_s > 0 and math.isfinite(o.timeout_s)):
        return f"--timeout-s must be positive, got {o.timeout_s}"
    if not o.max_buffer_gb > 0:
        return f"--max-buffer-gb must be positive, got {o.max_buffer_gb}"
    if not 0 <= o.replay_noise < 1:
        return f"--replay-noise must be in [0, 1), got {o.replay_noise}"
    if o.backend == "replay" and not o.replay:
        return "--backend replay needs --replay FILE (a landscape or a log written by this tool)"
    if o.replay and o.backend != "replay":
        return "--replay FILE is only used with --backend replay"
    if o.replay and not os.path.isfile(o.replay):
        return f"--replay {o.replay}: no such file"
    if o.resume and not os.path.isfile(o.resume):
        return f"--resume {o.resume}: no such file"
    if o.run_id is not None and (not o.run_id or "/" in o.run_id):
        return f"--run-id {o.run_id!r} must be a non-empty name without '/'"
    if os.path.exists(o.out_dir) and not os.path.isdir(o.out_dir):
        return f"--out-dir {o.out_dir} is a file; pass a directory"
    if o.backend == "deepep":
        if importlib.util.find_spec("deep_ep") is None:
            return ("deep_ep is not importable: install DeepEP (github.com/deepseek-ai/DeepEP) for this torch, "
                    "or use --backend reference for a CPU dry run")
    return None


def gpu_error(o: Options, num_ranks: int, num_gpus: int) -> str | None:
    """Checks that need to know the GPUs (deepep backend only)."""
    if num_gpus == 0:
        return "no CUDA GPU is visible: run on a GPU node, or use --backend reference for a CPU dry run"
    if num_ranks > num_gpus and not o.colocate:
        return (f"{num_ranks} ranks but only {num_gpus} GPU(s) visible: use ./run.sh {num_gpus if num_gpus in SUPPORTED_RANKS else 2} ..., "
                "or --colocate for a functional check with several ranks per GPU (not NVLink numbers)")
    if num_ranks > num_gpus and not mps_running():
        return ("--colocate needs CUDA MPS so that co-located ranks run concurrently (time-slicing gives meaningless "
                "numbers and can deadlock): start it with 'nvidia-cuda-mps-control -d'")
    return None


def mps_running() -> bool:
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


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


RESUME_OPTIONS = ("max_sms", "colocate", "replay", "replay_noise", "warmup", "iters", "max_buffer_gb")


def resume_error(log: LogContents, o: Options, ep_size: int) -> str | None:
    """Why this run may not continue that log: it finished, or it measured something else."""
    h = log.header or {}
    mine = {"ep_size": ep_size, "backend": o.backend, "mode": o.mode, "workload": o.workload.as_dict(),
            "token_counts": list(o.token_counts)}
    theirs = {k: h.get(k) for k in mine}
    # options that change what is measured or how (not --timeout-s, --out-dir, --plot, ...)
    for k in RESUME_OPTIONS:
        mine[k], theirs[k] = getattr(o, k), (h.get("options") or {}).get(k)
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        return (f"--resume {log.path}: this run's {', '.join(diff)} differ from the log's "
                f"({', '.join(f'{k}={theirs[k]}' for k in diff)}); rerun with the log's settings")
    if log.finished:
        return f"--resume {log.path}: that run already finished"
    return None
