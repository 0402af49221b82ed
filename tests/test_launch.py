"""The relaunch decision (launch.decide) is a pure function of torchrun's exit status, the log the ranks left,
the GPU-busy marker, the launcher's own interrupt flag and the relaunch history: one test per branch."""

import os
import sys

import pytest

from deepep_tune.record.log import LogContents
from deepep_tune.tune.launch import STARTUP_WAITS, History, decide

HINT = "./run.sh 2 full --resume logs/x.jsonl"


def log(measurements=0, dangling=0, **flags) -> LogContents:
    return LogContents("logs/x.jsonl", {"event": "header"}, [{"op": "dispatch"}] * measurements,
                       [{"event": "start"}] * dangling, **flags)


def test_success_is_done():
    d = decide(0, log(3), False, False, History(), 10, HINT)
    assert (d.action, d.code) == ("done", 0)


def test_finished_log_is_done_with_torchruns_code():
    # e.g. teardown failed after the results were written
    d = decide(1, log(3, finished=True), False, False, History(), 10, HINT)
    assert (d.action, d.code) == ("done", 1)


@pytest.mark.parametrize("interrupted,flag", [(True, False), (False, True)])
def test_interrupt_stops_with_130_and_the_resume_command(interrupted, flag):
    d = decide(130, log(3, dangling=1, interrupted=flag), False, interrupted, History(), 10, HINT)
    assert (d.action, d.code) == ("stop", 130)
    assert HINT in d.message


def test_gpu_busy_waits_then_gives_up_on_it():
    d = decide(1, None, True, False, History(), 10, HINT)
    assert d.action == "wait" and d.history.startup_waits == 1
    d = decide(1, None, True, False, History(startup_waits=STARTUP_WAITS), 10, HINT)
    assert d.action == "stop"  # no log: fails before writing it


def test_no_log_stops():
    d = decide(1, None, False, False, History(), 10, HINT)
    assert (d.action, d.code) == ("stop", 1) and "before writing its log" in d.message


def test_failed_event_stops_with_its_error():
    d = decide(2, log(3, dangling=1, failed="every config failed"), False, False, History(), 10, HINT)
    assert (d.action, d.code) == ("stop", 2) and "every config failed" in d.message


def test_failure_outside_a_measurement_is_not_relaunched():
    d = decide(1, log(3), False, False, History(), 10, HINT)
    assert d.action == "stop" and "outside a measurement" in d.message and HINT in d.message


@pytest.mark.parametrize("flags", [dict(dangling=1), dict(restart=True)])
def test_crash_in_a_measurement_relaunches(flags):
    d = decide(1, log(3, **flags), False, False, History(), 10, HINT)
    assert d.action == "relaunch"
    assert d.history == History(relaunches=1, progress=3 + flags.get("dangling", 0), startup_waits=0)


def test_no_progress_waits_for_the_gpu_then_stops():
    h = History(relaunches=1, progress=4)
    d = decide(1, log(3, dangling=1), False, False, h, 10, HINT)
    assert d.action == "wait" and d.history.startup_waits == 1 and d.history.relaunches == 1
    d = decide(1, log(3, dangling=1), False, False, History(1, 4, STARTUP_WAITS), 10, HINT)
    assert d.action == "stop" and "no progress" in d.message


def test_relaunches_are_bounded():
    d = decide(1, log(9, dangling=1), False, False, History(relaunches=10, progress=5), 10, HINT)
    assert d.action == "stop" and "gave up after 10" in d.message
    d = decide(1, log(9, dangling=1), False, False, History(relaunches=9, progress=5), 10, HINT)
    assert d.action == "relaunch" and d.history.relaunches == 10


def test_local_ranks_stop_the_peers_of_a_failed_rank(monkeypatch):
    """As torchrun: one rank's failure ends the others (a peer would wait in its next collective forever), and the
    exit code is the failed rank's. Each rank gets torchrun's variables."""
    import signal as _signal
    import time as _time

    from deepep_tune.tune import launch

    script = ("import os, sys, time\n"
              "assert os.environ['WORLD_SIZE'] == '3' and os.environ['MASTER_ADDR'] == '127.0.0.1'\n"
              "sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(120)\n")
    monkeypatch.setattr(launch, "rank_cmd", lambda args: [sys.executable, "-c", script])
    monkeypatch.setattr(launch.LocalRanks, "GRACE_S", 2.0)
    ranks = launch.LocalRanks()
    try:
        t0 = _time.time()
        assert ranks.run(3, []) == 3
        assert _time.time() - t0 < 30
        assert all(p.returncode is not None for p in ranks.procs)
        assert sorted(p.returncode for p in ranks.procs) == [-_signal.SIGTERM, -_signal.SIGTERM, 3]
    finally:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)


def test_local_ranks_all_succeed(monkeypatch):
    from deepep_tune.tune import launch

    monkeypatch.setattr(launch, "rank_cmd", lambda args: [sys.executable, "-c", "import os; assert os.environ['LOCAL_RANK']"])
    ranks = launch.LocalRanks()
    try:
        assert ranks.run(2, []) == 0
    finally:
        import signal as _signal

        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)


def test_ranks_get_a_bytecode_cache_only_where_torch_holds_none(monkeypatch, tmp_path):
    """A read-only torch install without __pycache__ recompiles its modules in every rank at every start: only
    there do the ranks get PYTHONPYCACHEPREFIX."""
    import importlib.util
    import signal as _signal
    import types

    from deepep_tune.tune import launch

    pkg = tmp_path / "torch"
    pkg.mkdir()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(submodule_search_locations=[str(pkg)]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    assert launch.bytecode_cache() is None  # writable: torch's own caches serve
    writable = {str(pkg): False}
    monkeypatch.setattr(os, "access", lambda path, mode: writable.get(str(path), True))  # as for a read-only venv
    want = str(tmp_path / "cache" / "deepep-tune" / "pycache")
    assert launch.bytecode_cache() == want
    script = f"import os, sys; sys.exit(0 if os.environ.get('PYTHONPYCACHEPREFIX') == {want!r} else 5)"
    monkeypatch.setattr(launch, "rank_cmd", lambda args: [sys.executable, "-c", script])
    ranks = launch.LocalRanks()
    try:
        assert ranks.run(2, []) == 0
    finally:
        _signal.signal(_signal.SIGINT, _signal.default_int_handler)
        _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    (pkg / "__pycache__").mkdir()
    assert launch.bytecode_cache() is None  # compiled bytecode is there
