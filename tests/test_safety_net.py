"""Safety net: each test here pins one behaviour that an earlier suite let break silently (the search's neighbour
walk, the noise guard in the pipeline, the rotated re-timing, a faster baseline becoming the pick, the objective in
the results file, the installed console script). Landscapes are purpose-built so that only the behaviour under
test can produce the asserted answer."""

import json
import os
import shutil
import subprocess

import pytest
from _helpers import (
    SUBPROCESS_TIMEOUT,
    brute_force_optimum,
    grid_points,
    run_launch,
    subprocess_env,
    write_landscape,
)

from deepep_tune.deepep.config import V1, TuneConfig
from deepep_tune.tune.backends.replay import ReplayBackend
from deepep_tune.tune.measure import Measurer, MeasureSettings
from deepep_tune.tune.search import (
    per_sms_table,
    pick,
    quick_search,
    retime,
    search_and_baselines,
)


def _oracle(path, prior=None):
    backend = ReplayBackend(str(path), V1, objective="train")
    return backend, Measurer(backend, MeasureSettings(warmup=0, iters=1), rank=0, log=None, prior=prior)


def _key(op, cfg):
    return (op, cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer)


def _assert_is_optimum(best, opt):
    s, dkey, ckey, total = opt
    assert (best.num_sms, _key("dispatch", best.dispatch), _key("combine", best.combine)) == (s, dkey, ckey)
    assert best.total_us == pytest.approx(total)


def _probe_totals(backend, truth):
    """Each num_sms's probe total (what quick ranks num_sms by), from the landscape's true times."""
    space = backend.space()
    return {s: sum(truth[_key(op, V1.probe_config(op, space.grid(op, s)))] for op in ("dispatch", "combine"))
            for s in space.sms_values()}


# --- 1. quick reaches a num_sms that only the neighbour walk can find -----------------------------------------

WALK_SMS, WALK_DCH, WALK_CCH, WALK_BUF = (4, 8, 12, 16, 20, 24), (2, 4, 6, 8), (1, 2, 3, 4), (128, 256)
WALK_OFF = {4: 30.0, 8: 20.0, 12: 10.0, 16: 0.0, 20: 15.0, 24: 25.0}
# quick's probe at each num_sms: chunk sorted(chunks)[len // 3] at buffer 256
WALK_PROBE = {"dispatch": (4, 256), "combine": (2, 256)}


def _walk_landscape(op, s, c, b):
    """Bowl in (chunk, buffer) with its bottom at the largest chunk and buffer 128, the same at every num_sms; 16 SMs
    is the best num_sms, but from 16 SMs up the probe config is 100 us slower, so 16 ranks 4th by probe."""
    chunks = WALK_DCH if op == "dispatch" else WALK_CCH
    t = (50.0 if op == "dispatch" else 30.0) + WALK_OFF[s] + 2.0 * (len(chunks) - 1 - chunks.index(c)) ** 2 \
        + 5.0 * (b == 256)
    if s >= 16 and (c, b) == WALK_PROBE[op]:
        t += 100.0
    return t


def test_quick_walks_to_a_neighbouring_num_sms_outside_the_finalists(tmp_path):
    path = tmp_path / "walk.jsonl"
    truth = write_landscape(path, _walk_landscape, list(grid_points(WALK_SMS, WALK_DCH, WALK_CCH, WALK_BUF)))
    backend, meas = _oracle(path)
    space = backend.space()
    opt = brute_force_optimum(truth)
    assert opt[0] == 16
    probes = _probe_totals(backend, truth)
    finalists = sorted(probes, key=lambda s: (probes[s], s))[:3]
    assert 16 not in finalists and 12 in finalists  # only the walk from the best finalist (12) reaches 16
    quick_search(meas, space)
    best = pick(per_sms_table(meas.observed(), space))
    _assert_is_optimum(best, opt)


# --- 2. the pipeline runs the noise guard ----------------------------------------------------------------------

def _glitch_landscape(op, s, c, b):
    """At 16 SMs dispatch (8, 256) is the true best (100 us), (4, 256) a near tie (101 us); everything else is far."""
    table = {("dispatch", 16, 8, 256): 100.0, ("dispatch", 16, 4, 256): 101.0, ("combine", 16, 2, 128): 50.0}
    return table.get((op, s, c, b), 200.0 if s == 8 else 150.0)


def test_search_and_baselines_runs_the_noise_guard_and_it_corrects_a_lucky_sample(tmp_path):
    """The first observation of the near tie (16, 4, 256) was a lucky 99.5 us (its true time is 101): picked on
    one sample it wins; the noise guard re-measures the configs near the winner and the true optimum wins."""
    path = tmp_path / "glitch.jsonl"
    truth = write_landscape(path, _glitch_landscape, list(grid_points((8, 16), (4, 8), (2, 4), (128, 256))))
    lucky = {"op": "dispatch", "num_sms": 16, "nvl_chunk": 4, "nvl_buffer": 256, "time_us": 99.5, "status": "ok",
             "role": "search", "seq": 1}
    backend, meas = _oracle(path, prior=[lucky])
    best, _, _ = search_and_baselines(meas, backend.space(), "full", 2, None, None)
    remeasured = [r for r in meas.records if r["role"] == "remeasure"]
    assert remeasured, "search_and_baselines made no re-measurement: the noise guard did not run"
    assert ("dispatch", 16, 4, 256) in {_key(r["op"], TuneConfig(r["num_sms"], r["nvl_chunk"], r["nvl_buffer"]))
                                        for r in remeasured}
    assert best.dispatch == TuneConfig(16, 8, 256), f"picked {best.dispatch} on a lucky sample"
    _assert_is_optimum(best, brute_force_optimum(truth))


# --- 3. the final re-timing rotates its order by one per round --------------------------------------------------

def test_retime_rotates_the_order_by_one_per_round(tmp_path):
    path = tmp_path / "r.jsonl"
    write_landscape(path, lambda op, s, c, b: 10.0 + s + c, list(grid_points((8,), (2, 4, 6), (1, 2, 3), (256,))))
    backend, meas = _oracle(path)
    cands = {name: (TuneConfig(8, 2 * (i + 1), 256), TuneConfig(8, i + 1, 256))
             for i, name in enumerate(("pick", "a", "b"))}
    out = retime(meas, cands, rounds=4, reference="pick")
    by_dispatch = {d: name for name, (d, _) in cands.items()}
    rec = [r for r in meas.records if r["role"] == "retime"]
    assert [r["op"] for r in rec] == ["dispatch", "combine"] * 12  # each candidate: its dispatch, then its combine
    order = [by_dispatch[TuneConfig(r["num_sms"], r["nvl_chunk"], r["nvl_buffer"])] for r in rec[::2]]
    assert order == ["pick", "a", "b", "a", "b", "pick", "b", "pick", "a", "pick", "a", "b"]
    assert all(out[n]["rounds"] == 4 and out[n]["failed_rounds"] == 0 for n in cands)


# --- 4. a baseline faster than the search's pick becomes the pick -------------------------------------------------

BASE_SMS, BASE_DCH, BASE_CCH, BASE_BUF = (8, 16, 24, 32), (4, 6, 8, 12), (2, 4, 8), (128, 256)


def _baseline_landscape(op, s, c, b):
    """Config(24, 8, 256) (the community baseline, both ops) is the global best by far, but 24 SMs probes worst
    and is never searched: the best finalist is 8, whose neighbour 16 is slower, so the walk stops there."""
    if s == 24 and (c, b) == (8, 256):
        return 20.0
    chunks = BASE_DCH if op == "dispatch" else BASE_CCH
    t = 50.0 + {8: 0.0, 16: 10.0, 24: 5.0, 32: 20.0}[s] + 3.0 * chunks.index(c) + 2.0 * (b == 256)
    if s == 24:
        t += 100.0
    return t


def test_a_faster_baseline_becomes_the_pick(tmp_path):
    path = tmp_path / "base.jsonl"
    truth = write_landscape(path, _baseline_landscape, list(grid_points(BASE_SMS, BASE_DCH, BASE_CCH, BASE_BUF)))
    backend, meas = _oracle(path)
    space = backend.space()
    # quick alone does not find it
    quick_search(meas, space)
    found = pick(per_sms_table(meas.observed(), space))
    assert found.num_sms == 8
    backend, meas = _oracle(path)
    best, rows, bases = search_and_baselines(meas, space, "quick", 2, None, None)
    community = {b.name: b for b in bases}["community_24_8_256"]
    assert community.skipped is None and community.total_us == 40.0
    assert (best.num_sms, best.dispatch, best.combine) == (24, TuneConfig(24, 8, 256), TuneConfig(24, 8, 256)), \
        f"the pick stayed at {best.num_sms} SMs ({best.total_us} us) though the baseline takes {community.total_us} us"
    assert best.total_us == community.total_us
    _assert_is_optimum(best, brute_force_optimum(truth))
    # "DeepEP's default at the tuned num_sms" follows the new pick
    assert {b.name: b for b in bases}["deepep_default"].dispatch.num_sms == 24


# --- 5. the results file names the objective the run optimised --------------------------------------------------

def _small_landscape(path):
    return write_landscape(path, lambda op, s, c, b: 40.0 + abs(s - 8) + c + (b == 256) * 2,
                           list(grid_points((4, 8), (4, 8), (2, 4), (128, 256))))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["train", "forward"])
def test_results_file_records_the_objective(tmp_path, objective):
    land = tmp_path / "land.jsonl"
    _small_landscape(land)
    out = tmp_path / "out"
    p = run_launch(["2", "quick", "--backend", "replay", "--replay", str(land), "--objective", objective,
                    "--out-dir", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "RESULTS_EP2_replay.json").read_text())
    assert res["objective"] == objective


# --- 12. the installed console script, run from outside the repository -------------------------------------------

def _console_env():
    """The installed `deepep-tune` script imports deepep_tune: make that this checkout's package (the install may
    be an editable one of another checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = subprocess_env()
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepep-tune") is None, reason="the deepep-tune console script is not installed "
                                                                 "(pip install -e . puts it on PATH)")
def test_installed_console_script_runs_outside_the_repository(tmp_path):
    exe = shutil.which("deepep-tune")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    h = subprocess.run([exe, "--help"], cwd=cwd, env=_console_env(), capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert h.returncode == 0, h.stderr[-3000:]
    assert "usage" in h.stdout.lower() and "--max-sms" in h.stdout
    land = cwd / "land.jsonl"
    truth = _small_landscape(land)
    p = subprocess.run([exe, "2", "quick", "--backend", "replay", "--replay", "land.jsonl", "--out-dir", "out"],
                       cwd=cwd, env=_console_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((cwd / "out" / "RESULTS_EP2_replay.json").read_text())
    s, dkey, ckey, total = brute_force_optimum(truth)
    assert (res["best"]["num_sms"], res["best"]["dispatch"]["nvl_chunk"], res["best"]["dispatch"]["nvl_buffer"]) == \
        (s, *dkey[2:])
    assert res["best"]["total_us"] == pytest.approx(total, abs=0.02)
    assert os.path.isdir(cwd / "out" / "logs")
