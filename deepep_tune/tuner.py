"""One rank of a tuning run (launched by torchrun). `tune()` reads top to bottom: open the run (resume
state, backend, space, log), tune each token count (search + baselines), pick one config for all sizes,
re-time the pick against the baselines interleaved, optionally time a MoE layer, then write the outputs."""

from __future__ import annotations

import datetime
import glob
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from . import __version__, interrupts
from .backends.base import Backend
from .faults import extra_configs
from .logio import LogError, LogWriter, drop_partial_line, log_path, new_run_id, newest_unfinished, read_log
from .measure import ContextLost, MeasureSettings, Measurer, crashed_record
from .models import list_models
from .paste import sglang_of
from .options import Options, OptionsError, check_options, layer_shape, parse_options, rerun_command, resume_error
from .render import summary
from .results import SizeOutcome, build_results, results_name, write_json_atomic
from .routing import traffic
from .search import (Baseline, SearchError, SmsRow, baseline_configs, choose_overall, make_baselines,
                     measure_baselines, retime, search_and_baselines, sm_advice)
from .space import OPS, Space, TuneConfig, align, build_space, int32_overflow, mode_axes, nvl_bytes, space_from_points
from .workload import Workload

EXIT_BAD_INPUT = 2
EXIT_CONTEXT_LOST = 3
CRASHED = "a rank died or hung during this measurement (device trap, abort, or the hang watchdog)"
T = TypeVar("T")


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int
    argv: tuple[str, ...]  # this run's flags, for the commands it prints


@dataclass
class Opened:
    """A run ready to measure: its backend, space and log, and what a resumed log already holds."""

    backend: Backend
    space: Space
    pruned: int
    log: LogWriter | None
    log_path: str
    prior: list[dict[str, Any]]

    def close(self) -> None:
        try:
            self.backend.close()
        finally:
            if self.log is not None:
                self.log.close()


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def on_all_ranks(step: Callable[[], T], what: str, rank: int) -> T:
    """Run a set-up step on every rank; if it fails on any rank, every rank raises the same one-line error
    (so they exit together instead of hanging in the next collective)."""
    result, err = None, None
    try:
        result = step()
    except (UsageError, LogError, OSError) as e:
        err = str(e)
    except ImportError as e:
        err = f"cannot import deep_ep ({e}): install DeepEP for this torch, or use --backend reference"
    except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory allocating the Buffer: one line, all ranks
        err = f"{what} failed on rank {rank}: {type(e).__name__}: {e}"
        if "busy or unavailable" in str(e):
            # Seen right after a run was killed with kernels in flight under MPS: it passes in seconds.
            interrupts.mark_gpu_busy()
    errs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errs, err)
    first = next((e for e in errs if e), None)
    if first:
        raise UsageError(first)
    return result  # type: ignore[return-value]


# --- opening the run ---------------------------------------------------------------------------
def resume_state(o: Options, ranks: Ranks) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(log path, prior measurements, dangling starts) of this run; decided on rank 0, shared with all."""
    state: list[Any] = [None]
    if ranks.rank == 0:
        try:
            state[0] = _resume_state(o, ranks.world)
        except (LogError, UsageError) as e:
            state[0] = str(e)
    dist.broadcast_object_list(state, src=0)
    if isinstance(state[0], str):
        raise UsageError(state[0])
    interrupts.set_log(state[0][0])
    return state[0]


def _resume_state(o: Options, world: int) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    if o.resume is None:
        return log_path(o.out_dir, world, o.run_id or new_run_id()), [], []
    path = o.resume or newest_unfinished(o.out_dir, world)
    if not path:
        raise UsageError(f"--resume: no unfinished EP{world} run under {os.path.join(o.out_dir, 'logs')}; "
                         "start a new run without --resume")
    log = read_log(path)
    err = resume_error(log.header, log.finished, path, o, world)
    if err:
        raise UsageError(err)
    if log.truncated_line:
        drop_partial_line(path)
        _say(0, f"[resume] {path}: line {log.truncated_line} was cut off (killed mid-write); dropped it")
    return path, log.measurements, log.dangling


def sweep_space(o: Options, world: int, sms_cap: int) -> tuple[Space, int]:
    """The configs this run may measure: the mode's grid up to sms_cap, without configs whose NVL buffer
    exceeds --max-buffer-gb or whose views overflow DeepEP's 32-bit byte counts; plus the test hook's extras
    (deliberately unvalidated)."""
    limit = o.max_buffer_gb * 2**30
    w = o.workload

    def fits(op: str, c: TuneConfig) -> bool:
        return nvl_bytes(op, c, world, w) <= limit and int32_overflow(op, c, world, w) is None

    space, pruned = build_space(mode_axes(o.mode, sms_cap), fits)
    extra = extra_configs()
    if extra:
        space = space_from_points([(op, c) for op in OPS for c in space.configs(op)] + extra)
    return space, pruned


def buffer_bytes(space: Space, world: int, w: Workload, sms_cap: int) -> int:
    """One deep_ep.Buffer serves the whole run: sized for the largest config of the space or the baselines
    (DeepEP asserts the NVL bytes of every dispatch/combine against it). The test hook's extra configs are
    not counted, so they show DeepEP's own buffer-size rejection."""
    extra = set(extra_configs())
    configs = [(op, c) for op in OPS for c in space.configs(op) if (op, c) not in extra]
    configs += [(op, c) for op, c in baseline_configs(world, space.sms_values()) if c.num_sms <= sms_cap]
    return align(max([nvl_bytes(op, c, world, w) for op, c in configs] + [0]))


def create_backend(o: Options, ranks: Ranks) -> tuple[Backend, Space, int]:
    if o.backend == "replay":
        from .backends.replay import ReplayBackend

        b = ReplayBackend(o.replay or "", o.replay_noise, o.workload.seed, o.objective)
        b.prepare(o.workload)
        return b, b.space().restrict(o.max_sms), 0
    if o.backend == "reference":
        from .backends.reference import REFERENCE_SMS_CAP, ReferenceBackend

        cap = min(o.max_sms or REFERENCE_SMS_CAP, REFERENCE_SMS_CAP)
        space, pruned = sweep_space(o, ranks.world, cap)
        nbytes = buffer_bytes(space, ranks.world, o.workload, cap)
        return ReferenceBackend(o.workload, ranks.rank, ranks.world, nbytes, o.objective), space, pruned
    from .backends.deepep import DeepEPBackend, sms_cap_here
    from .gpus import gpu_error

    err = gpu_error(ranks.world, torch.cuda.device_count(), o.colocate)
    if err:
        raise UsageError(err)
    cap, _ = sms_cap_here(ranks.world, ranks.local_rank)
    cap = min(cap, o.max_sms or cap)
    space, pruned = sweep_space(o, ranks.world, cap)
    nbytes = buffer_bytes(space, ranks.world, o.workload, cap)
    b = DeepEPBackend(o.workload, ranks.rank, ranks.world, ranks.local_rank, dist.group.WORLD, nbytes, o.objective)
    b.sms_cap = cap
    return b, space, pruned


def open_log(o: Options, ranks: Ranks, path: str, prior: list[dict[str, Any]], dangling: list[dict[str, Any]],
             hw: dict[str, Any]) -> LogWriter | None:
    """Rank 0 writes the log: a header for a new run; for a resumed one, a crashed record per dangling start."""
    if ranks.rank != 0:
        return None
    log = LogWriter(path, create=o.resume is None)
    if o.resume is None:
        log.write({"event": "header", "tool_version": __version__, "ep_size": ranks.world, "mode": o.mode,
                   "backend": o.backend, "workload": o.workload.as_dict(), "token_counts": list(o.token_counts),
                   "options": {k: v for k, v in o.as_dict().items() if k != "workload"}, "hardware": hw,
                   "started": _now()})
        return log
    for d in dangling:
        log.write(crashed_record(d["measure"], d["seq"], f"{CRASHED}; watchdog {o.timeout_s} s"))
    log.write({"event": "resume", "t": time.time(), "kept_measurements": len(prior), "crashed": len(dangling)})
    _say(0, f"[resume] {path}: {len(prior)} measurements kept, {len(dangling)} crashed config(s) recorded as failed")
    return log


def open_run(o: Options, ranks: Ranks) -> Opened:
    path, prior, dangling = resume_state(o, ranks)
    backend, space, pruned = on_all_ranks(lambda: create_backend(o, ranks), f"setting up the {o.backend} backend",
                                          ranks.rank)
    try:
        if not space.size():
            raise UsageError("the search space is empty: raise --max-sms or --max-buffer-gb")
        log = on_all_ranks(lambda: open_log(o, ranks, path, prior, dangling, backend.describe()), "opening the log",
                           ranks.rank)
    except BaseException:
        backend.close()
        raise
    # every rank knows the crashed configs: they are results too
    prior = sorted(prior + [crashed_record(d["measure"], d["seq"], CRASHED) for d in dangling],
                   key=lambda r: r.get("seq", 0))
    return Opened(backend, space, pruned, log, path, prior)


# --- measuring ---------------------------------------------------------------------------------
def tune_size(meas: Measurer, run: Opened, o: Options, w: Workload, world: int) -> SizeOutcome:
    """Search and baselines at one token count."""
    run.backend.prepare(w)
    try:
        best, rows, baselines = search_and_baselines(meas, run.space, o.mode, world, o.max_sms, run.backend.sms_cap)
    except SearchError as e:
        raise UsageError(str(e)) from None
    a2a = run.backend.all_to_all(w, o.warmup, o.iters) if wants_all_to_all(o, run.backend) else None
    return SizeOutcome(w, best, rows, baselines, traffic(w, world), spread(meas, best), a2a,
                       parts={op: meas.parts_of(op, cfg) for op, cfg in (("dispatch", best.dispatch),
                                                                          ("combine", best.combine))})


def wants_all_to_all(o: Options, backend: Backend) -> bool:
    """Asked for, or free on a real node where it gives NCCL's bandwidth for the same bytes."""
    return o.baseline_a2a or (backend.name == "deepep" and not backend.colocated)


def spread(meas: Measurer, best: SmsRow) -> dict[str, Any]:
    out = {}
    for op, cfg in (("dispatch", best.dispatch), ("combine", best.combine)):
        obs = [x for x in meas.observed()[(op, cfg)] if math.isfinite(x)]
        out[op] = {"observations": len(obs), "spread_pct": round((max(obs) / min(obs) - 1) * 100, 2) if obs else None}
    return out


@dataclass
class Overall:
    """One config for several token counts, its times at each, and the baselines at the first count."""

    dispatch: TuneConfig
    combine: TuneConfig
    by_size: dict[int, dict[str, float]]
    baselines: list[Baseline]

    def answer_at(self, n: int) -> SmsRow:
        t = self.by_size[n]
        return SmsRow(self.dispatch.num_sms, self.dispatch, t["dispatch_us"], self.combine, t["combine_us"])


def pick_overall(outcomes: list[SizeOutcome], measurers: dict[int, Measurer], backend: Backend, world: int) -> Overall:
    """Measure every size's winner at every other size, then pick one config for all sizes."""
    cands = list(dict.fromkeys((oc.best.dispatch, oc.best.combine) for oc in outcomes))
    parts: dict[tuple[TuneConfig, TuneConfig], dict[int, tuple[float, float]]] = {c: {} for c in cands}
    for oc in outcomes:
        n = oc.workload.num_tokens
        backend.prepare(oc.workload)
        for d, c in cands:
            parts[(d, c)][n] = (measurers[n].time("dispatch", d), measurers[n].time("combine", c))
    totals = {k: {n: sum(v) for n, v in by_n.items()} for k, by_n in parts.items()}
    best_at = {oc.workload.num_tokens: oc.best.total_us for oc in outcomes}
    (d, c), losses = choose_overall(totals, best_at)
    # The top level describes the recommended config at the first token count: baselines there again,
    # at the recommended num_sms ("DeepEP's default at the tuned num_sms").
    first = outcomes[0].workload
    backend.prepare(first)
    bases = measure_baselines(measurers[first.num_tokens], make_baselines(world, d.num_sms), backend.sms_cap)
    by_size = {n: {"dispatch_us": round(parts[(d, c)][n][0], 2), "combine_us": round(parts[(d, c)][n][1], 2),
                   "total_us": round(totals[(d, c)][n], 2), "loss_pct": round(100 * losses[n], 2)} for n in best_at}
    return Overall(d, c, by_size, bases)


def compared_picks(o: Options, world: int, path_out: str) -> dict[str, tuple[TuneConfig, TuneConfig, str]]:
    """Picks of other results files for the same node and workload (--compare, or an earlier run's results in
    --out-dir, e.g. quick's beside full's): they join the final re-timing, which gives their real regret."""
    from .apply import load_results

    paths = list(o.compare) or sorted(p for p in glob.glob(os.path.join(o.out_dir, f"RESULTS_EP{world}*.json"))
                                      if not p.endswith("_sglang.json") and os.path.abspath(p) != os.path.abspath(path_out))
    out = {}
    for p in paths:
        try:
            r = load_results(p)
        except (OSError, ValueError) as e:
            if o.compare:
                raise UsageError(f"--compare {p}: not a results file of this tool ({e})") from None
            continue
        with open(p) as f:
            meta = json.load(f)
        same = (r.ep_size == world and {**r.workload, "num_tokens": 0} == {**o.workload.as_dict(), "num_tokens": 0}
                and meta.get("objective", "forward") == o.objective)
        if same or o.compare:
            d, c = TuneConfig(*r.dispatch.knobs()), TuneConfig(*r.combine.knobs())
            out[f"{meta.get('mode', 'other')}_pick:{os.path.basename(os.path.dirname(os.path.abspath(p)))}"] = (d, c, p)
    return out


def final_comparison(meas: Measurer, answer: SmsRow, baselines: list[Baseline], compare: dict[str, Any],
                     rounds: int) -> dict[str, Any]:
    """The pick against every measured baseline and compared pick, interleaved round by round."""
    cands = {"pick": (answer.dispatch, answer.combine)}
    cands.update({b.name: (b.dispatch, b.combine) for b in baselines if b.skipped is None and b.total_us is not None})
    cands.update({name: (d, c) for name, (d, c, _) in compare.items()})
    out = retime(meas, cands, rounds, reference="pick")
    for name, (d, c, path) in compare.items():
        out[name].update(source=path, dispatch=d.as_dict(), combine=c.as_dict())
    return {"rounds": rounds, "what": "interleaved re-timing at the first token count; speedup_of_pick = "
                                      "candidate / pick per round (median, p10, p90)", "candidates": out}


def layer_candidates(answer: SmsRow, rows: list[SmsRow], baselines: list[Baseline]) -> dict[str, tuple[TuneConfig, TuneConfig]]:
    cands = {"pick": (answer.dispatch, answer.combine)}
    for s in (24, 32, 48, 64):
        row = next((r for r in rows if r.num_sms == s), None)
        if row is not None and s != answer.num_sms:
            cands[f"best_at_{s}_sms"] = (row.dispatch, row.combine)
    for b in baselines:
        if b.name in ("deepep_default_20sms", "community_24_8_256") and b.skipped is None:
            cands[b.name] = (b.dispatch, b.combine)
    return cands


def run_layer_check(o: Options, backend: Backend, answer: SmsRow, outcome: SizeOutcome) -> dict[str, Any]:
    from .layer import LayerShape

    moe, shared, shared_size = layer_shape(o) or (0, 0, 0)
    w = outcome.workload
    shape = LayerShape(w.num_tokens, w.hidden, w.num_topk, w.num_experts, moe, shared, shared_size)
    backend.prepare(w)
    layer = backend.layer_check(shape, layer_candidates(answer, outcome.rows, outcome.baselines), o.layer_rounds,
                                o.warmup)
    for sched, table in layer.get("schedules", {}).items():
        timed = {n: v["median_ms"] for n, v in table.items() if v.get("median_ms") is not None}
        if timed:
            fastest = min(timed, key=timed.__getitem__)
            s = layer["num_sms"][fastest]
            layer.setdefault("fastest", {})[sched] = {
                "candidate": fastest, "num_sms": s,
                "verdict": (f"{sched}: the layer is fastest with {fastest} at {s} SMs, the communication-only pick "
                            f"uses {answer.num_sms}" + ("" if s == answer.num_sms else
                                                         " (SMs given to DeepEP are taken from the GEMMs)"))}
    return layer


def advice(o: Options, ranks: Ranks, rows: list[SmsRow], answer: SmsRow, layer: dict[str, Any] | None) -> dict[str, Any] | None:
    """The smallest num_sms within --sm-tolerance of the answer: by the MoE layer's forward + backward time
    when it was checked (SMs given to DeepEP are taken from the GEMMs), else by communication time."""
    from .space import nvl_bytes_needed

    row = sm_advice(rows, o.sm_tolerance, o.max_sms, answer)
    by_layer = layer_advice(layer, o.sm_tolerance) if layer else None
    if by_layer is not None:
        row = next((r for r in rows if r.num_sms == by_layer[0]), row)
    if row is None or row.dispatch is None or row.combine is None:
        return None
    out = {
        "tolerance": o.sm_tolerance,
        "basis": "MoE layer forward + backward" if by_layer else "communication",
        "num_sms": row.num_sms, "dispatch": row.dispatch.as_dict(), "combine": row.combine.as_dict(),
        "total_us": round(row.total_us, 2),
        "slower_than_best_pct": round(100 * (row.total_us / answer.total_us - 1), 2),
        "sms_saved": answer.num_sms - row.num_sms,
        "num_nvl_bytes": nvl_bytes_needed(row.dispatch, row.combine, o.workload, ranks.world)["num_nvl_bytes"],
        "command": rerun_command(ranks.world, o.mode, list(ranks.argv), max_sms=row.num_sms),
    }
    if by_layer:
        out["layer_slower_than_fastest_pct"] = by_layer[1]
    return out


def layer_advice(layer: dict[str, Any], tolerance: float) -> tuple[int, float] | None:
    """(num_sms, % slower than the fastest) of the fewest-SM tuned candidate (the pick or the best config at a
    smaller num_sms) whose layer forward + backward (sequential schedule) is within tolerance of the fastest."""
    table = layer.get("schedules", {}).get("sequential", {})
    tuned = {n: v["median_ms"] for n, v in table.items()
             if (n == "pick" or n.startswith("best_at_")) and v.get("median_ms") is not None}
    if not tuned:
        return None
    fastest = min(tuned.values())
    within = [(layer["num_sms"][n], round(100 * (t / fastest - 1), 2)) for n, t in tuned.items()
              if t <= fastest * (1 + tolerance)]
    return min(within)


# --- one rank's run --------------------------------------------------------------------------------
def tune(o: Options, ranks: Ranks) -> dict[str, Any]:
    t0 = time.time()
    run = open_run(o, ranks)
    try:
        return tune_opened(o, ranks, run, t0)
    finally:
        run.close()


def tune_opened(o: Options, ranks: Ranks, run: Opened, t0: float) -> dict[str, Any]:
    t_setup = time.time()
    bar = progress_bar(o, ranks, run.space)
    settings = MeasureSettings(o.warmup, o.iters, timeout_s=o.timeout_s)
    seq = iter(range(max((r.get("seq", 0) for r in run.prior), default=0) + 1, sys.maxsize))
    first = o.token_counts[0]
    measurers = {n: Measurer(run.backend, settings, ranks.rank, run.log,
                             [r for r in run.prior if r.get("num_tokens", first) == n], on_record=bar,
                             tag={"num_tokens": n}, seq=seq) for n in o.token_counts}
    outcomes = [tune_size(measurers[n], run, o, replace(o.workload, num_tokens=n), ranks.world) for n in o.token_counts]
    overall = pick_overall(outcomes, measurers, run.backend, ranks.world) if len(outcomes) > 1 else None
    answer = overall.answer_at(first) if overall else outcomes[0].best
    baselines = overall.baselines if overall else outcomes[0].baselines
    run.backend.prepare(outcomes[0].workload)
    out_path = os.path.join(o.out_dir, results_name(ranks.world, o.backend, run.backend.colocated))
    compare = compared_picks(o, ranks.world, out_path)
    comparison = final_comparison(measurers[first], answer, baselines, compare, o.retime_rounds)
    layer = run_layer_check(o, run.backend, answer, outcomes[0]) if o.layer_check else None
    t_measured = time.time()
    if bar is not None:
        bar.close()  # type: ignore[attr-defined]
    records = [r for m in measurers.values() for r in m.records]
    measured_now = len(records) - sum(m.reused for m in measurers.values())
    hw = run.backend.describe()
    meta = {
        "tool_version": __version__, "mode": o.mode, "backend": o.backend, "objective": o.objective, "model": o.model,
        "hardware": hw, "colocated": bool(hw.get("colocated")),
        "software": {"torch": torch.__version__, "python": platform.python_version(),
                     "deep_ep": hw.pop("deep_ep", None), "cuda": hw.pop("cuda", None)},
        "started": datetime.datetime.fromtimestamp(t0).isoformat(timespec="seconds"), "finished": _now(),
        "wall_s": round(time.time() - t0, 2),
        "phases_s": phases(t0, t_setup, t_measured, measured_now),
        "num_measurements": len(records),
        "num_measured_this_launch": measured_now,
        "resumed": o.resume is not None,
        "space": {"num_configs": run.space.size(), "sms_values": run.space.sms_values(), "pruned": run.pruned},
        "log": run.log_path,
    }
    res = build_results(meta=meta, ep_size=ranks.world, sizes=outcomes,
                        overall=(overall.dispatch, overall.combine, overall.by_size) if overall else None,
                        advice=advice(o, ranks, outcomes[0].rows, answer, layer),
                        overall_baselines=overall.baselines if overall else None,
                        answer_parts={op: measurers[first].parts_of(op, cfg) for op, cfg in
                                      (("dispatch", answer.dispatch), ("combine", answer.combine))},
                        comparison=comparison, layer=layer, results_path=out_path)
    if ranks.rank == 0:
        write_outputs(o, run, res, outcomes, measurers, out_path)
    return res


def write_outputs(o: Options, run: Opened, res: dict[str, Any], outcomes: list[SizeOutcome],
                  measurers: dict[int, Measurer], out: str) -> None:
    stem = out[:-len(".json")]
    sglang = f"{stem}_sglang.json"
    res["results_path"] = out
    res["paste"]["sglang_file"] = sglang
    if o.plot:
        from .plots import write_plots

        res["plots"] = write_plots(stem, res, {oc.workload.num_tokens: measurers[oc.workload.num_tokens].observed()
                                               for oc in outcomes})
    write_json_atomic(sglang, sglang_of(res))
    write_json_atomic(out, res)
    assert run.log is not None
    run.log.write({"event": "done", "results": out, "t": time.time()})
    print(summary(res, emit=o.emit), flush=True)


def progress_bar(o: Options, ranks: Ranks, space: Space) -> Callable[[dict[str, Any]], None] | None:
    if ranks.rank != 0:
        return None
    from tqdm import tqdm

    bar = tqdm(total=space.size() if o.mode == "full" else None, desc=f"[tune] EP{ranks.world} {o.mode}", unit="meas",
               file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def on_record(rec: dict[str, Any]) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{rec['op']} {rec['num_sms']},{rec['nvl_chunk']},{rec['nvl_buffer']} "
                            f"{rec['time_us'] and round(rec['time_us'], 1)}", refresh=False)

    on_record.close = bar.close  # type: ignore[attr-defined]
    return on_record


def phases(t0: float, t_setup: float, t_measured: float, measured: int) -> dict[str, float | None]:
    """Where a run's time goes (rank 0's clock); torchrun's own start-up and teardown come on top."""
    started = _process_start()
    return {
        "interpreter_start_to_tuner": round(t0 - started, 2) if started else None,
        "setup": round(t_setup - t0, 2),  # process group, resume, backend (deep_ep import, Buffer, inputs)
        "measuring": round(t_measured - t_setup, 2),
        "per_measurement_ms": round(1e3 * (t_measured - t_setup) / measured, 1) if measured else None,
    }


def _process_start() -> float | None:
    """When this process started (Linux), to account for interpreter and import time."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    if "--list-models" in argv:
        if rank == 0:
            print(list_models())
        return 0
    try:
        o = parse_options(argv)
    except OptionsError as e:
        _say(rank, f"error: {e}")
        return EXIT_BAD_INPUT
    if isinstance(o, int):
        return o
    world = int(os.environ.get("WORLD_SIZE", "1"))
    err = check_options(o, world, None)  # the GPU checks run in create_backend, with torch's view of the GPUs
    if err:
        _say(rank, f"error: {err}")
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
        _say(rank, f"error: {e}")
        note("failed", error=str(e))
        code = EXIT_BAD_INPUT
    except ContextLost as e:
        print(f"[tune] rank {rank}: {e}", file=sys.stderr, flush=True)
        note("restart", why=str(e))
        code = EXIT_CONTEXT_LOST
    except KeyboardInterrupt:
        path = interrupts.current_log()
        resume = rerun_command(world, o.mode, argv, resume=path) if path else ""
        _say(rank, f"[tune] interrupted; measurements so far are in the log. Continue with: {resume}".rstrip())
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
