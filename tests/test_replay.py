"""The replay backend: a recorded landscape (or a log of this tool) answers every measurement."""

import json
import math
import re

import pytest
from _helpers import bowl, grid_points, write_landscape

from deepep_tune.deepep.config import V1, TuneConfig
from deepep_tune.record.log import LogError, LogWriter, read_log
from deepep_tune.tune.backends.replay import ReplayBackend
from deepep_tune.tune.measure import Measurer, MeasureSettings


def _samples(res):
    """Per iteration, the time of all parts of the measurement (one part for forward, two for train)."""
    return [sum(x) for x in zip(*res.parts.values())]


def _t(res):
    return _samples(res)[0]

POINTS = list(grid_points(sms=(4, 8, 16), dchunks=(2, 4, 6), cchunks=(1, 3), buffers=(128, 256)))
FN = bowl(1.0, (1.0, 1.0), (0.0, 0.0), sms=(4, 8, 16), dchunks=(2, 4, 6), cchunks=(1, 3), buffers=(128, 256))


@pytest.fixture
def landscape(tmp_path):
    path = tmp_path / "land.jsonl"
    truth = write_landscape(path, FN, POINTS)
    return path, truth


def test_space_is_exactly_the_configs_in_the_file(landscape):
    path, truth = landscape
    b = ReplayBackend(str(path), V1)
    sp = b.space()
    assert {("dispatch", c.num_sms, c.nvl_chunk, c.nvl_buffer) for c in sp.dispatch} == \
        {k for k in truth if k[0] == "dispatch"}
    assert {("combine", c.num_sms, c.nvl_chunk, c.nvl_buffer) for c in sp.combine} == \
        {k for k in truth if k[0] == "combine"}
    assert sp.size() == len(truth)
    for (op, s, c, bb) in truth:
        assert b.can_measure(op, TuneConfig(s, c, bb))
    assert not b.can_measure("dispatch", TuneConfig(24, 8, 256))
    assert not b.can_measure("combine", TuneConfig(4, 2, 128))  # a dispatch chunk, not a combine one


def test_space_of_partial_landscape(tmp_path):
    """A landscape need not be a full grid; only what is recorded is searched."""
    path = tmp_path / "partial.jsonl"
    pts = [("dispatch", 8, 4, 128), ("dispatch", 8, 6, 256), ("combine", 8, 1, 128), ("combine", 16, 3, 256)]
    write_landscape(path, lambda *k: 10.0, pts)
    sp = ReplayBackend(str(path), V1).space()
    assert set(sp.dispatch) == {TuneConfig(8, 4, 128), TuneConfig(8, 6, 256)}
    assert set(sp.combine) == {TuneConfig(8, 1, 128), TuneConfig(16, 3, 256)}
    assert sp.sms_values() == [8]


def test_missing_config_raises_keyerror(landscape):
    path, _ = landscape
    b = ReplayBackend(str(path), V1)
    with pytest.raises(KeyError):
        b.measure("dispatch", TuneConfig(24, 8, 256), 0, 1)


def test_missing_config_is_a_failed_measurement(landscape):
    path, _ = landscape
    b = ReplayBackend(str(path), V1)
    m = Measurer(b, MeasureSettings(warmup=0, iters=1), rank=0, log=None)
    assert m.time("dispatch", TuneConfig(24, 8, 256)) == math.inf
    rec = m.records[-1]
    assert rec["status"] == "error" and rec["time_us"] is None and "KeyError" in rec["error"]


@pytest.mark.parametrize("iters", [1, 3, 10])
def test_zero_noise_returns_exact_time(landscape, iters):
    path, truth = landscape
    b = ReplayBackend(str(path), V1)
    m = Measurer(b, MeasureSettings(warmup=0, iters=iters), rank=0, log=None)
    for (op, s, c, bb), t in truth.items():
        cfg = TuneConfig(s, c, bb)
        res = b.measure(op, cfg, 0, iters)
        assert res.error is None and _samples(res) and all(x == t for x in _samples(res))
        assert m.time(op, cfg) == t
        assert m.remeasure(op, cfg) == t
    assert all(r["time_us"] in truth.values() for r in m.records)


def _sequence(b, n=5):
    cfgs = [("dispatch", TuneConfig(4, 2, 128)), ("combine", TuneConfig(16, 3, 256)), ("dispatch", TuneConfig(8, 6, 256))]
    return [_t(b.measure(op, cfg, 0, 1)) for _ in range(n) for op, cfg in cfgs]


def test_noise_is_deterministic_per_seed_and_varies_per_repeat(landscape):
    path, truth = landscape
    a = _sequence(ReplayBackend(str(path), V1, noise=0.05, seed=3))
    b = _sequence(ReplayBackend(str(path), V1, noise=0.05, seed=3))
    c = _sequence(ReplayBackend(str(path), V1, noise=0.05, seed=4))
    assert a == b  # every rank replays the same numbers
    assert a != c  # another seed, other numbers
    first_cfg = a[0::3]  # repeats of the same config differ
    assert len(set(first_cfg)) == len(first_cfg)
    t0 = truth[("dispatch", 4, 2, 128)]
    assert all(x != t0 for x in first_cfg)
    assert all(abs(x / t0 - 1) < 0.5 for x in first_cfg)  # 10 sigma at 5 % noise
    mean = sum(first_cfg) / len(first_cfg)
    assert abs(mean / t0 - 1) < 0.1


def test_noise_stays_deterministic_through_measurer(landscape):
    path, _ = landscape
    runs = []
    for _ in range(2):
        b = ReplayBackend(str(path), V1, noise=0.02, seed=11)
        m = Measurer(b, MeasureSettings(warmup=0, iters=4), rank=0, log=None)
        cfg = TuneConfig(8, 4, 256)
        runs.append([m.time("dispatch", cfg), m.remeasure("dispatch", cfg), m.remeasure("dispatch", cfg)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3  # each re-measurement adds a new observation to the mean


def _write_tool_log(log_path, landscape_path, extra_missing):
    """A log produced by this tool's own writer and Measurer (header as the tuner writes it)."""
    w = LogWriter(str(log_path), create=True)
    w.write({"event": "header", "tool_version": "test", "ep_size": 2, "mode": "full", "backend": "replay",
             "workload": {}, "options": {}, "hardware": {}, "started": "2026-01-01T00:00:00"})
    b = ReplayBackend(str(landscape_path), V1)
    m = Measurer(b, MeasureSettings(warmup=0, iters=2), rank=0, log=w)
    sp = b.space()
    for op in ("dispatch", "combine"):
        for cfg in sp.configs(op):
            m.time(op, cfg)
    m.remeasure("dispatch", sp.dispatch[0])
    m.time(*extra_missing)  # not in the landscape: recorded as an error
    w.write({"event": "done", "results": "x", "t": 0})
    w.close()
    return m


def test_tool_log_can_be_replayed(tmp_path, landscape):
    path, truth = landscape
    log = tmp_path / "logs" / "tune_ep2_x.jsonl"
    missing = ("dispatch", TuneConfig(32, 2, 128))
    _write_tool_log(log, path, missing)
    contents = read_log(str(log))
    assert contents.finished and not contents.dangling

    b = ReplayBackend(str(log), V1)
    sp = b.space()
    # every recorded config, including the failed one, is in the replayed space
    assert sp.size() == len(truth) + 1
    assert b.can_measure(*missing)
    for (op, s, c, bb), t in truth.items():
        assert _t(b.measure(op, TuneConfig(s, c, bb), 0, 1)) == t
    with pytest.raises(RuntimeError, match=r"^dispatch at \(32, 2, 128\) failed when the landscape was recorded$"):
        b.measure(*missing, 0, 1)
    with pytest.raises(KeyError, match="has no combine measurement at"):
        b.measure("combine", TuneConfig(32, 2, 128), 0, 1)  # not in the log at all
    m = Measurer(b, MeasureSettings(warmup=0, iters=1), rank=0, log=None)
    assert m.time(*missing) == math.inf
    assert m.records[-1]["status"] != "ok"


def test_status_not_ok_in_log_is_a_failure(tmp_path):
    log = tmp_path / "l.jsonl"
    recs = [
        {"event": "header", "ep_size": 2},
        {"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 12.0, "status": "ok"},
        {"op": "dispatch", "num_sms": 8, "nvl_chunk": 6, "nvl_buffer": 128, "time_us": 11.0, "status": "wrong"},
        {"op": "combine", "num_sms": 8, "nvl_chunk": 1, "nvl_buffer": 128, "time_us": None, "status": "crashed"},
        {"op": "combine", "num_sms": 8, "nvl_chunk": 3, "nvl_buffer": 128, "time_us": 7.0, "status": "ok"},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    b = ReplayBackend(str(log), V1, objective="forward")
    assert _t(b.measure("dispatch", TuneConfig(8, 4, 128), 0, 1)) == 12.0
    assert _t(b.measure("combine", TuneConfig(8, 3, 128), 0, 1)) == 7.0
    for op, cfg in (("dispatch", TuneConfig(8, 6, 128)), ("combine", TuneConfig(8, 1, 128))):
        with pytest.raises(RuntimeError, match=f"^{op} at {re.escape(str(cfg))} failed when the landscape was recorded$"):
            b.measure(op, cfg, 0, 1)
    m = Measurer(b, MeasureSettings(warmup=0, iters=1), rank=0, log=None)
    assert m.time("dispatch", TuneConfig(8, 6, 128)) == math.inf  # a wrong result is never fast


def test_replay_of_bad_file_is_logerror(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("not json\n")
    with pytest.raises(LogError):
        ReplayBackend(str(p), V1)


def test_records_per_token_count(tmp_path):
    """Records naming num_tokens answer only for that token count; untagged ones for every count."""
    from deepep_tune.deepep.workload import Workload
    p = tmp_path / "multi.jsonl"
    recs = [{"num_tokens": 64, "op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 10.0},
            {"num_tokens": 128, "op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 20.0},
            {"num_tokens": 128, "op": "dispatch", "num_sms": 8, "nvl_chunk": 6, "nvl_buffer": 128, "time_us": 21.0},
            {"op": "combine", "num_sms": 8, "nvl_chunk": 1, "nvl_buffer": 128, "time_us": 5.0}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    b = ReplayBackend(str(p), V1, objective="forward")
    cfg = TuneConfig(8, 4, 128)
    b.use(Workload(num_tokens=64))
    assert _t(b.measure("dispatch", cfg, 0, 1)) == 10.0
    assert not b.can_measure("dispatch", TuneConfig(8, 6, 128))
    assert _t(b.measure("combine", TuneConfig(8, 1, 128), 0, 1)) == 5.0
    b.use(Workload(num_tokens=128))
    assert _t(b.measure("dispatch", cfg, 0, 1)) == 20.0
    assert b.can_measure("dispatch", TuneConfig(8, 6, 128)) and b.can_measure("combine", TuneConfig(8, 1, 128))
    b.use(Workload(num_tokens=4096))
    assert b.space().dispatch == () and b.space().combine == (TuneConfig(8, 1, 128),)


def test_objectives_replay_their_parts(tmp_path):
    p = tmp_path / "parts.jsonl"
    recs = [{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 30.0,
             "parts_us": {"dispatch": 20.0, "cached_dispatch": 10.0}},
            {"op": "combine", "num_sms": 8, "nvl_chunk": 1, "nvl_buffer": 128, "time_us": 14.0,
             "parts_us": {"combine": 7.0, "combine_bwd": 7.0}}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    train, fwd = ReplayBackend(str(p), V1, objective="train"), ReplayBackend(str(p), V1, objective="forward")
    assert train.measure("dispatch", TuneConfig(8, 4, 128), 0, 2).parts == {"dispatch": [20.0] * 2,
                                                                           "cached_dispatch": [10.0] * 2}
    assert fwd.measure("dispatch", TuneConfig(8, 4, 128), 0, 2).parts == {"dispatch": [20.0] * 2}
    m = Measurer(train, MeasureSettings(warmup=0, iters=3), rank=0, log=None)
    assert m.time("dispatch", TuneConfig(8, 4, 128)) == 30.0
    assert m.records[-1]["parts_us"] == {"dispatch": 20.0, "cached_dispatch": 10.0}
    assert Measurer(fwd, MeasureSettings(0, 3), rank=0, log=None).time("combine", TuneConfig(8, 1, 128)) == 7.0


def test_train_replay_of_a_forward_landscape_is_a_one_line_error(tmp_path):
    p = tmp_path / "fwd.jsonl"
    p.write_text(json.dumps({"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 3.0}) + "\n")
    with pytest.raises(LogError, match="--objective forward"):
        ReplayBackend(str(p), V1, objective="train")
    assert ReplayBackend(str(p), V1, objective="forward").time_of("dispatch", TuneConfig(8, 4, 128)) == 3.0
