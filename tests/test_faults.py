"""Fault injection under torchrun on CPU: a config that raises, a rank that hangs, a rank killed with SIGKILL
mid-sweep and then resumed, and Ctrl-C. The replay backend makes every run's answer exactly predictable."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from _helpers import (
    ROOT,
    brute_force_optimum,
    grid_points,
    read_jsonl,
    run_launch,
    subprocess_env,
    write_landscape,
)

pytestmark = pytest.mark.slow

SMS, DCH, CCH, BUF = (4, 8, 12), (2, 8, 16), (1, 4, 8), (128, 256)


def _landscape(path):
    rnd = random.Random(7)
    return write_landscape(path, lambda op, s, c, b: round((40.0 if op == "dispatch" else 60.0) + 100.0 / s
                                                           + rnd.uniform(0.0, 10.0), 3),
                           list(grid_points(SMS, DCH, CCH, BUF)))


def _key(rec):
    return rec["op"], rec["num_sms"], rec["nvl_chunk"], rec["nvl_buffer"]


def _measurements(out):
    (log,) = glob.glob(str(out / "logs" / "tune_ep2_*.jsonl"))
    return log, [r for r in read_jsonl(log) if "op" in r]


def _answer(out):
    best = json.loads((out / "RESULTS_EP2_replay.json").read_text())["best"]
    return (best["num_sms"], best["dispatch"]["nvl_chunk"], best["dispatch"]["nvl_buffer"],
            best["combine"]["nvl_chunk"], best["combine"]["nvl_buffer"], best["total_us"])


def _expected(truth, without=()):
    rest = {k: v for k, v in truth.items() if k not in without}
    s, d, c, total = brute_force_optimum(rest)
    return (s, d[2], d[3], c[2], c[3], pytest.approx(total, abs=0.02))


def _args(land, out):
    return ["2", "full", "--backend", "replay", "--replay", str(land), "--out-dir", str(out)]


def test_raise_is_logged_and_skipped(tmp_path):
    land, out = tmp_path / "land.jsonl", tmp_path / "out"
    truth = _landscape(land)
    s, dkey, _, _ = brute_force_optimum(truth)
    p = run_launch(_args(land, out), {"DEEPEP_TUNE_INJECT": f"raise@dispatch:{s},{dkey[2]},{dkey[3]}"}, via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "relaunching" not in p.stderr  # a host-side failure needs no restart
    _, meas = _measurements(out)
    failed = [m for m in meas if m["status"] != "ok"]
    assert [(_key(m), m["status"]) for m in failed] == [(dkey, "error")]
    assert "InjectedError" in failed[0]["error"] and "rank 0" in failed[0]["error"] and "rank 1" in failed[0]["error"]
    assert _answer(out) == _expected(truth, without=[dkey])


def test_hang_of_one_rank_is_survived(tmp_path):
    land, out = tmp_path / "land.jsonl", tmp_path / "out"
    truth = _landscape(land)
    key = ("combine", 8, 4, 256)
    p = run_launch(_args(land, out) + ["--timeout-s", "3"], {"DEEPEP_TUNE_INJECT": "hang@combine:8,4,256@1"},
                   via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Timeout" in p.stderr and "relaunching" in p.stderr
    log, meas = _measurements(out)
    assert [_key(m) for m in meas if m["status"] == "crashed"] == [key]
    assert _answer(out) == _expected(truth, without=[key])
    _assert_each_config_measured_once(meas, truth)  # nothing measured twice across the relaunch


def _assert_each_config_measured_once(meas, truth):
    """Every config of the landscape got exactly one first pass (a short one, with racing) and at most one full
    pass: a relaunch or a resume measures nothing again."""
    first = "short" if any(m["role"] == "short" for m in meas) else "search"
    firsts = [_key(m) for m in meas if m["role"] == first]
    assert len(firsts) == len(set(firsts)) == len(truth)
    if first == "short":
        full = [_key(m) for m in meas if m["role"] == "search"]
        assert len(full) == len(set(full)) and set(full) <= set(firsts)


def _rank_pids(run_id):
    pids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if (b"tune_singlenode.py" in b" ".join(cmd) or b"deepep_tune.tune.rank" in cmd) and run_id.encode() in cmd and not any(b"torch" in c and b"run" in c for c in cmd[:3]):
            rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                pids[int(rank)] = int(d)
    return pids


def _wait_for_start(out, key, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = glob.glob(str(out / "logs" / "tune_ep2_*.jsonl"))
        if logs:
            for r in read_jsonl(logs[0]) if open(logs[0]).read().endswith("\n") else []:
                m = r.get("measure")
                if r.get("event") == "start" and m and (m["op"], m["num_sms"], m["nvl_chunk"], m["nvl_buffer"]) == key:
                    return logs[0]
        time.sleep(0.2)
    raise AssertionError(f"{key} never started")


def test_sigkill_mid_sweep_then_resume_matches_uninterrupted(tmp_path):
    land = tmp_path / "land.jsonl"
    truth = _landscape(land)
    clean = tmp_path / "clean"
    p = run_launch(_args(land, clean), via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]

    out = tmp_path / "out"
    key = ("dispatch", 8, 16, 128)  # not the optimum: the kill costs this config, not the answer
    assert _expected(truth)[:3] != key[1:]
    run_id = "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tune_singlenode.py"), "--mode", "full", "--backend", "replay", "--replay", str(land),
           "--out-dir", str(out), "--run-id", run_id]
    job = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(DEEPEP_TUNE_INJECT="hang@dispatch:8,16,128@1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_start(out, key)
        os.kill(_rank_pids(run_id)[1], signal.SIGKILL)
        assert job.wait(timeout=60) != 0
    finally:
        job.kill()
    assert not (out / "RESULTS_EP2_replay.json").exists()

    p = run_launch(_args(land, out) + ["--resume"], via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]
    log, meas = _measurements(out)
    assert [_key(m) for m in meas if m["status"] == "crashed"] == [key]
    _assert_each_config_measured_once(meas, truth)
    _, clean_meas = _measurements(clean)
    assert _answer(out) == _answer(clean)
    res = json.loads((out / "RESULTS_EP2_replay.json").read_text())
    assert res["resumed"] and res["num_measurements"] == len(meas)
    # the same measurements as the uninterrupted run, but for the killed config: its crash is final (a failed
    # short pass earns no full one)
    others = lambda ms: sorted((_key(m), m["role"]) for m in ms if _key(m) != key)  # noqa: E731
    assert others(meas) == others(clean_meas)


def test_ctrl_c_stops_all_ranks_and_resume_finishes(tmp_path):
    land, out = tmp_path / "land.jsonl", tmp_path / "out"
    truth = _landscape(land)
    key = ("combine", 12, 1, 128)
    job = subprocess.Popen([os.path.join(ROOT, "run.sh"), *_args(land, out)], cwd=ROOT, start_new_session=True,
                           env=subprocess_env(DEEPEP_TUNE_INJECT="hang@combine:12,1,128"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = _wait_for_start(out, key)
        t0 = time.time()
        os.killpg(job.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        _, err = job.communicate(timeout=60)
        assert time.time() - t0 < 20
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 130, err[-3000:]
    assert f"--resume {log}" in err
    # one line says what happened and how to continue; torchrun's signal tracebacks are not shown
    assert len([ln for ln in err.splitlines() if "--resume" in ln]) == 1, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    events = [r.get("event") for r in read_jsonl(log)]
    assert events[0] == "header" and "interrupted" in events and "done" not in events
    assert not os.path.exists(log + ".interrupted")

    p = run_launch(_args(land, out) + ["--resume", log], via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]
    _, meas = _measurements(out)
    assert all(m["status"] == "ok" for m in meas)  # the config in flight was measured again, not marked crashed
    assert _answer(out) == _expected(truth)


def test_error_a_relaunch_cannot_fix_stops_at_once(tmp_path):
    land, out = tmp_path / "land.jsonl", tmp_path / "out"
    with open(land, "w") as f:  # every config failed when this landscape was recorded
        for op, s, c, b in grid_points(SMS, DCH, CCH, BUF):
            f.write(json.dumps({"op": op, "num_sms": s, "nvl_chunk": c, "nvl_buffer": b, "time_us": 1.0,
                                "status": "error"}) + "\n")
    t0 = time.time()
    p = run_launch(["2", "quick", "--backend", "replay", "--replay", str(land), "--out-dir", str(out)], via_run_sh=True)
    assert p.returncode == 2
    assert "relaunching" not in p.stderr and "waiting" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == "error: every config failed; see the log for the errors"
    assert time.time() - t0 < 60


def test_reused_run_id_never_shares_a_log(tmp_path):
    land, out = tmp_path / "land.jsonl", tmp_path / "out"
    _landscape(land)
    args = _args(land, out) + ["--run-id", "same"]
    assert run_launch(args, via_run_sh=True).returncode == 0
    log = out / "logs" / "tune_ep2_same.jsonl"
    before = log.read_text()
    p = run_launch(args, via_run_sh=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: {log} exists (another run uses --run-id same); pick another --run-id or use --resume {log}"]
    assert log.read_text() == before


def test_resume_with_other_measurement_settings_is_refused(tmp_path):
    land, out = tmp_path / "land.jsonl", tmp_path / "out"
    _landscape(land)
    log = out / "logs" / "tune_ep2_r1.jsonl"
    os.makedirs(log.parent)
    header = {"event": "header", "ep_size": 2, "backend": "replay", "mode": "full",
              "workload": {"num_tokens": 4096, "hidden": 7168, "num_topk": 8, "num_experts": 256,
                           "dispatch_dtype": "bf16", "seed": 0}, "token_counts": [4096],
              "options": {"max_sms": None, "colocate": False, "replay": str(land), "replay_noise": 0.0,
                          "warmup": 2, "iters": 10, "max_buffer_gb": 4.0}}
    log.write_text(json.dumps(header) + "\n")
    p = run_launch(_args(land, out) + ["--iters", "7", "--resume", str(log)], via_run_sh=True)
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert "iters" in line and "iters=10" in line
    # a log written before racing existed measured every config in full: it resumes only without racing
    p = run_launch(_args(land, out) + ["--resume", str(log)], via_run_sh=True)
    assert p.returncode == 2 and "race_iters=0" in p.stderr
    p = run_launch(_args(land, out) + ["--race-iters", "0", "--resume", str(log)], via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]


def test_argparse_errors_are_one_line():
    p = run_launch(["2", "quick", "--backend", "reference", "--no-such-flag"])
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["error: unrecognized arguments: --no-such-flag (see --help)"]


def test_noisy_replay_resumed_matches_uninterrupted(tmp_path):
    land = tmp_path / "land.jsonl"
    _landscape(land)
    noisy = ["--replay-noise", "0.05", "--seed", "3"]
    clean = tmp_path / "clean"
    assert run_launch(_args(land, clean) + noisy, via_run_sh=True).returncode == 0
    out = tmp_path / "out"
    first = run_launch(_args(land, out) + noisy + ["--run-id", "cut"], via_run_sh=True)
    assert first.returncode == 0, first.stderr[-3000:]
    # cut the finished log after a third of its measurements, as if the run had been killed there
    log = out / "logs" / "tune_ep2_cut.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    ops = [i for i, line in enumerate(lines) if line.startswith('{"op"')]
    log.write_text("".join(lines[: ops[len(ops) // 3] + 1]))
    (out / "RESULTS_EP2_replay.json").unlink()
    p = run_launch(_args(land, out) + noisy + ["--resume", str(log)], via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]
    times = lambda o: [(r["op"], r["num_sms"], r["nvl_chunk"], r["nvl_buffer"], r["time_us"]) for r in _measurements(o)[1]]  # noqa: E731
    assert times(out) == times(clean)
    assert _answer(out) == _answer(clean)
