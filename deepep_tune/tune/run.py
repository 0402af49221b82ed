"""One rank of a tuning run (launched by torchrun). A Run owns its state and reads top to bottom: open (resume
state, the library's knob space, backend, log), search each token count (search + baselines), pick one config
for all sizes, re-time the pick against the baselines interleaved, optionally time a MoE layer, advise on SMs,
then write the outputs."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import __version__
from ..deepep.routing import traffic
from ..knobs import KnobSpace, Space
from ..record.log import LogWriter
from ..record.results import results_name, write_json_atomic
from ..report.paste import sglang_of
from ..report.render import summary
from . import interrupts
from .launch import LAUNCHED_AT_ENV
from .measure import ContextLost, Measurer, MeasureSettings, crashed_record
from .options import (
    Options,
    OptionsError,
    check_options,
    library_of,
    parse_options,
    race_iters,
    rerun_command,
)
from .outputs import Overall, SizeOutcome, build_results
from .race import RaceSettings
from .search import SearchError, SmsRow, search_and_baselines
from .setup import (
    CRASHED,
    Ranks,
    UsageError,
    create_backend,
    now,
    on_all_ranks,
    open_log,
    resume_state,
    say,
)
from .verdicts import (
    CompareError,
    advice,
    compared_picks,
    final_comparison,
    pick_overall,
    run_layer_check,
)

EXIT_BAD_INPUT = 2
EXIT_CONTEXT_LOST = 3


class Run:
    """A run ready to measure: its options, ranks, knob space, backend, space and log, what a resumed log already
    holds, and one Measurer per token count (each owns its workload)."""

    def __init__(self, o: Options, ranks: Ranks) -> None:
        self.o, self.ranks, self.t0 = o, ranks, time.time()
        self.decl: KnobSpace = on_all_ranks(lambda: library_of(o), "loading the library's knobs", ranks.rank)
        self.log_path, prior, dangling = resume_state(o, ranks, self.decl.library)
        self.backend, self.space, self.pruned = on_all_ranks(lambda: create_backend(o, ranks, self.decl),
                                                             f"setting up the {o.search.backend} backend", ranks.rank)
        try:
            if not self.space.size():
                raise UsageError("the search space is empty: raise --max-sms or --max-buffer-gb")
            # the full hardware description runs nvidia-smi and scans installed packages: off the search's path
            self.hardware = ThreadPoolExecutor(1).submit(self.backend.describe)
            self.log: LogWriter | None = on_all_ranks(
                lambda: open_log(o, ranks, self.log_path, prior, dangling, self.backend.identity(), self.decl),
                "opening the log", ranks.rank)
        except BaseException:
            self.backend.close()
            raise
        # every rank knows the crashed configs: they are results too
        self.prior = sorted(prior + [crashed_record(d["measure"], d["seq"], CRASHED, self.decl) for d in dangling],
                            key=lambda r: r.get("seq", 0))
        self.t_setup = time.time()
        self.bar = progress_bar(o, ranks, self.space)
        m = o.measurement
        settings = MeasureSettings(m.warmup, m.iters, timeout_s=m.timeout_s,
                                   race=RaceSettings(race_iters(o.search.mode, m.iters, m.race_iters), min(1, m.warmup),
                                                     m.race_margin))
        seq = iter(range(max((r.get("seq", 0) for r in self.prior), default=0) + 1, sys.maxsize))
        first = o.workload.num_tokens[0]
        self.measurers = {n: Measurer(self.backend, settings, ranks.rank, self.log,
                                      [r for r in self.prior if r.get("num_tokens", first) == n], on_record=self.bar,
                                      tag={"num_tokens": n}, seq=seq, workload=o.workload.at(n))
                          for n in o.workload.num_tokens}

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            if self.log is not None:
                self.log.close()

    # --- the pipeline ---------------------------------------------------------------------------
    def search(self, n: int) -> SizeOutcome:
        """Search and baselines at one token count."""
        o, meas = self.o, self.measurers[n]
        try:
            best, rows, baselines = search_and_baselines(meas, self.space, o.search.mode, self.ranks.world,
                                                         o.search.max_sms, self.backend.sms_cap, self.backend.facts())
        except SearchError as e:
            raise UsageError(str(e)) from None
        w = o.workload.at(n)
        a2a = self.backend.all_to_all(w, o.measurement.warmup, o.measurement.iters) if self.wants_all_to_all() else None
        return SizeOutcome(w, best, rows, baselines, traffic(w, self.ranks.world), spread(meas, best), a2a,
                           parts={op: meas.parts_of(op, cfg) for op, cfg in (("dispatch", best.dispatch),
                                                                              ("combine", best.combine))})

    def wants_all_to_all(self) -> bool:
        """Asked for, or free on a real node where it gives NCCL's bandwidth for the same bytes."""
        return self.o.measurement.baseline_a2a or (self.backend.name == "deepep" and not self.backend.colocated)

    def verdicts(self, outcomes: list[SizeOutcome], overall: Overall | None, out_path: str) -> dict[str, Any]:
        """The final comparison, the layer check and the SM advice, for the answer at the first token count."""
        o, first = self.o, self.o.workload.num_tokens[0]
        answer = overall.answer_at(first) if overall else outcomes[0].best
        baselines = overall.baselines if overall else outcomes[0].baselines
        try:
            compare = compared_picks(o, self.decl, self.ranks.world, out_path)
        except CompareError as e:
            raise UsageError(str(e)) from None
        comparison = final_comparison(self.measurers[first], answer, baselines, compare, o.search.retime_rounds)
        t_layer = time.time()
        layer = run_layer_check(o, self.backend, answer, outcomes[0]) if o.layer_check.enabled else None
        self.layer_s = round(time.time() - t_layer, 2) if layer is not None else None
        adv = advice(o, self.decl, self.ranks.world, list(self.ranks.argv), outcomes[0].rows, answer, layer)
        return {"comparison": comparison, "layer": layer, "advice": adv}

    def tune(self) -> dict[str, Any]:
        o = self.o
        outcomes = [self.search(n) for n in o.workload.num_tokens]
        overall = pick_overall(outcomes, self.measurers, self.backend, self.ranks.world) if len(outcomes) > 1 else None
        self.t_searched = time.time()
        out_path = os.path.join(o.outputs.out_dir, results_name(self.ranks.world, o.search.backend,
                                                                self.backend.colocated))
        verdicts = self.verdicts(outcomes, overall, out_path)
        t_measured = self.t_measured = time.time()
        if self.bar is not None:
            self.bar.close()  # type: ignore[attr-defined]
        res = build_results(self.meta(t_measured), self.ranks.world, outcomes, overall, verdicts, out_path)
        if self.ranks.rank == 0:
            self.write_outputs(res, outcomes, out_path)
        return res

    def meta(self, t_measured: float) -> dict[str, Any]:
        o, records = self.o, [r for m in self.measurers.values() for r in m.records]
        measured_now = len(records) - sum(m.reused for m in self.measurers.values())
        hw = self.hardware.result()
        return {
            "tool_version": __version__, "mode": o.search.mode, "backend": o.search.backend,
            "library": self.decl.library, "objective": o.search.objective, "model": o.workload.model,
            "hardware": hw, "colocated": bool(hw.get("colocated")),
            "software": {"torch": torch.__version__, "python": platform.python_version(),
                         "deep_ep": hw.pop("deep_ep", None), "cuda": hw.pop("cuda", None)},
            "started": datetime.datetime.fromtimestamp(self.t0).isoformat(timespec="seconds"), "finished": now(),
            "wall_s": round(time.time() - self.t0, 2),
            "phases_s": phases(self.t0, self.t_setup, self.t_searched, t_measured, measured_now),
            "num_measurements": len(records),
            "num_measured_this_launch": measured_now,
            "resumed": o.outputs.resume is not None,
            "space": {"num_configs": self.space.size(), "sms_values": self.space.sms_values(), "pruned": self.pruned,
                      "knobs": dict(self.decl.knobs), "shared": list(self.decl.shared)},
            "log": self.log_path,
        }

    def write_outputs(self, res: dict[str, Any], outcomes: list[SizeOutcome], out: str) -> None:
        if self.o.outputs.plot:
            from ..report.plots import write_plots

            res["plots"] = write_plots(out[:-len(".json")], res, {oc.workload.num_tokens:
                                                                   self.measurers[oc.workload.num_tokens].observed()
                                                                   for oc in outcomes})
        if "normal_dispatch" in res:
            write_json_atomic(res["paste"]["sglang_file"], sglang_of(res))
        # the last phase ends as the results file is written (the write itself takes milliseconds)
        ph, now = res["phases_s"], time.time()
        ph["outputs"] = round(now - self.t_measured, 2)
        ph["layer_check"] = self.layer_s  # inside verdicts and measuring
        launched = ph.pop("_launched_at", None)
        ph["launch_to_results"] = round(now - launched, 2) if launched else None
        write_json_atomic(out, res)
        assert self.log is not None
        self.log.write({"event": "done", "results": out, "t": time.time()})
        print(summary(res, emit=self.o.outputs.emit), flush=True)


def spread(meas: Measurer, best: SmsRow) -> dict[str, Any]:
    out = {}
    for op, cfg in (("dispatch", best.dispatch), ("combine", best.combine)):
        obs = [x for x in meas.observed()[(op, cfg)] if math.isfinite(x)]
        out[op] = {"observations": len(obs), "spread_pct": round((max(obs) / min(obs) - 1) * 100, 2) if obs else None}
    return out


def progress_bar(o: Options, ranks: Ranks, space: Space) -> Callable[[dict[str, Any]], None] | None:
    if ranks.rank != 0:
        return None
    from tqdm import tqdm

    bar = tqdm(total=space.size() if o.search.mode == "full" else None, desc=f"[tune] EP{ranks.world} {o.search.mode}",
               unit="meas", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    knobs = space.decl.knobs

    def on_record(rec: dict[str, Any]) -> None:
        bar.update(1)
        values = ",".join(str(rec.get(k)) for k in knobs[rec["op"]])
        bar.set_postfix_str(f"{rec['op']} {values} {rec['time_us'] and round(rec['time_us'], 1)}", refresh=False)

    on_record.close = bar.close  # type: ignore[attr-defined]
    return on_record


def phases(t0: float, t_setup: float, t_searched: float, t_measured: float, measured: int) -> dict[str, float | None]:
    """Where a run's time goes, from the user's command to the results file (rank 0's clock; the launcher's start
    comes from LAUNCHED_AT_ENV): launcher and torchrun until this rank's process started, then the interpreter
    (imports, process group), set-up (resume, backend: deep_ep import, Buffer, inputs; log), the search of every
    token count, the verdicts (final comparison, layer check, advice), and writing the outputs (added when the
    results file is written). `measuring` (search + verdicts) and `interpreter_start_to_tuner` keep their
    earlier meaning."""
    started = _process_start()
    launched = float(os.environ.get(LAUNCHED_AT_ENV, "0") or 0) or None
    return {
        "launcher_to_rank_start": round(started - launched, 2) if started and launched else None,
        "interpreter_start_to_tuner": round(t0 - started, 2) if started else None,
        "setup": round(t_setup - t0, 2),
        "search": round(t_searched - t_setup, 2),
        "verdicts": round(t_measured - t_searched, 2),
        "measuring": round(t_measured - t_setup, 2),
        "per_measurement_ms": round(1e3 * (t_measured - t_setup) / measured, 1) if measured else None,
        "_launched_at": launched,
    }


def _process_start() -> float | None:
    """When this process started (Linux), to account for interpreter and import time: its start in clock ticks
    since boot, against the uptime now (both to 10 ms; the boot time in /proc/stat has whole seconds only)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def tune(o: Options, ranks: Ranks) -> dict[str, Any]:
    run = Run(o, ranks)
    try:
        return run.tune()
    finally:
        run.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        o = parse_options(argv)
    except OptionsError as e:
        say(rank, f"error: {e}")
        return EXIT_BAD_INPUT
    if isinstance(o, int):
        return o
    world = int(os.environ.get("WORLD_SIZE", "1"))
    err = check_options(o, world, None)  # the GPU checks run in create_backend, with torch's view of the GPUs
    if err:
        say(rank, f"error: {err}")
        return EXIT_BAD_INPUT
    interrupts.install_signal_handlers(rank)
    dist.init_process_group("gloo")  # control plane only; DeepEP's Buffer needs just all_gather_object
    ranks = Ranks(rank, world, int(os.environ.get("LOCAL_RANK", "0")), tuple(argv))
    code = 0

    def note(event: str, **fields: Any) -> None:
        """Tell run.sh (which sees only torchrun's exit code) whether relaunching can help."""
        path = interrupts.current_log()
        if rank == 0 and path and os.path.exists(path):
            interrupts.append_event(path, {"event": event, **fields, "t": time.time()})

    try:
        tune(o, ranks)
    except UsageError as e:
        say(rank, f"error: {e}")
        note("failed", error=str(e))
        code = EXIT_BAD_INPUT
    except ContextLost as e:
        print(f"[tune] rank {rank}: {e}", file=sys.stderr, flush=True)
        note("restart", why=str(e))
        code = EXIT_CONTEXT_LOST
    except KeyboardInterrupt:
        path = interrupts.current_log()
        resume = rerun_command(world, o.search.mode, argv, resume=path) if path else ""
        say(rank, f"[tune] interrupted; measurements so far are in the log. Continue with: {resume}".rstrip())
        code = interrupts.EXIT_INTERRUPTED
    except Exception as e:
        note("failed", error=f"{type(e).__name__}: {e} (a bug: please report it with the traceback)")
        raise
    finally:
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    return code
