"""The Measurer (the oracle the searches talk to) and the cross-rank reduction, single process."""

import json
import math

import pytest
from _helpers import grid_points, write_landscape

from deepep_tune.deepep.config import V1, TuneConfig
from deepep_tune.record.log import LogWriter, read_log
from deepep_tune.tune.backends.base import Backend, LocalResult
from deepep_tune.tune.backends.replay import ReplayBackend
from deepep_tune.tune.measure import ContextLost, Measurer, MeasureSettings
from deepep_tune.tune.timing import bench_parts, reduce_samples

PTS = [("dispatch", 8, 4, 128), ("dispatch", 8, 6, 128), ("combine", 8, 1, 128), ("combine", 8, 2, 128)]


@pytest.fixture
def land(tmp_path):
    p = tmp_path / "l.jsonl"
    truth = write_landscape(p, lambda op, s, c, b: 10.0 * c + (0 if op == "dispatch" else 1), PTS)
    return p, truth


def test_reduce_samples_single_process():
    r = reduce_samples({"dispatch": [5.0, 1.0, 3.0, 2.0, 4.0]}, ("dispatch",), False, 5)
    assert r.time_us == 3.0 and r.min_us == 1.0 and r.max_us == 5.0 and r.failed_ranks == 0
    r = reduce_samples({"dispatch": [5.0, 1.0]}, ("dispatch",), True, 2)
    assert r.failed_ranks == 1 and math.isinf(r.time_us)
    r = reduce_samples({}, ("dispatch",), False, 3)
    assert r.failed_ranks == 1 and math.isinf(r.time_us)


def test_reduce_samples_sums_the_medians_of_the_parts():
    # per part: the median over iterations; the total is their sum, not the median of per-iteration sums
    r = reduce_samples({"dispatch": [10.0, 30.0, 20.0], "cached_dispatch": [3.0, 1.0, 2.0]},
                       ("dispatch", "cached_dispatch"), False, 3)
    assert r.parts_us == {"dispatch": 20.0, "cached_dispatch": 2.0}
    assert r.time_us == 22.0
    assert r.min_us == 13.0 and r.max_us == 31.0  # per-iteration sums: 13, 31, 22
    # a part missing on this rank fails the measurement
    r = reduce_samples({"dispatch": [1.0, 2.0, 3.0]}, ("dispatch", "cached_dispatch"), False, 3)
    assert r.failed_ranks == 1


def test_bench_runs_warmup_and_iters_outside_timing():
    calls, flushes = [], []
    (samples,) = bench_parts([lambda: calls.append(1)], warmup=2, iters=3, timer=lambda fn: (fn(), 7.0)[1],
                             before_each=lambda: flushes.append(1))
    assert samples == [7.0, 7.0, 7.0] and len(calls) == 5 and len(flushes) == 3


def test_time_is_cached_remeasure_adds(land):
    p, truth = land
    b = ReplayBackend(str(p), V1)
    m = Measurer(b, MeasureSettings(warmup=0, iters=2, remeasure_factor=3), rank=0, log=None)
    cfg = TuneConfig(8, 4, 128)
    assert m.time("dispatch", cfg) == 40.0
    assert m.time("dispatch", cfg) == 40.0
    assert len(m.records) == 1  # a second time() does not measure again
    m.remeasure("dispatch", cfg)
    assert len(m.records) == 2 and m.records[-1]["role"] == "remeasure" and m.records[-1]["iters"] == 6
    assert m.observed()[("dispatch", cfg)] == [40.0, 40.0]
    assert [r["seq"] for r in m.records] == [1, 2]


def test_prior_records_are_reused_in_order(land, tmp_path):
    """A resumed run answers from the log first, then measures; seq numbers continue."""
    p, truth = land
    prior = [
        {"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 41.0, "status": "ok", "seq": 7},
        {"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 43.0, "status": "ok", "seq": 9},
        {"op": "combine", "num_sms": 8, "nvl_chunk": 1, "nvl_buffer": 128, "time_us": None, "status": "crashed",
         "seq": 8},
    ]
    b = ReplayBackend(str(p), V1)
    log = tmp_path / "logs" / "x.jsonl"
    w = LogWriter(str(log), create=True)
    w.write({"event": "header"})
    m = Measurer(b, MeasureSettings(warmup=0, iters=1), rank=0, log=w, prior=prior)
    d = TuneConfig(8, 4, 128)
    assert m.time("dispatch", d) == 41.0
    assert m.remeasure("dispatch", d) == pytest.approx(42.0)  # (41 + 43) / 2, from the log
    assert m.remeasure("dispatch", d) == pytest.approx((41 + 43 + 40) / 3)  # now measured
    assert m.time("combine", TuneConfig(8, 1, 128)) == math.inf  # crashed stays failed
    assert m.reused == 3
    w.close()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    new = [x for x in lines if "op" in x]
    assert len(new) == 1 and new[0]["seq"] == 10  # only the new measurement is written, numbered after the prior


def test_failure_status_and_error_text(land):
    p, _ = land
    m = Measurer(ReplayBackend(str(p), V1), MeasureSettings(0, 1), rank=0, log=None)
    assert m.time("dispatch", TuneConfig(16, 4, 128)) == math.inf
    r = m.records[-1]
    assert r["status"] == "error" and "KeyError" in r["error"] and r["time_us"] is None


class _Wrong(Backend):
    name = "wrong"

    def measure(self, op, cfg, warmup, iters):
        return LocalResult({op: [1.0] * iters}, error="received row 3 has wrong data")


class _Broken(Backend):
    name = "broken"
    ok = True

    def healthy(self):
        return self.ok

    def measure(self, op, cfg, warmup, iters):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_wrong_result_is_never_fast():
    m = Measurer(_Wrong(), MeasureSettings(0, 2), rank=0, log=None)
    assert m.time("dispatch", TuneConfig(8, 4, 128)) == math.inf
    r = m.records[-1]
    assert r["status"] == "wrong" and "row 3" in r["error"] and r["time_us"] is None


def test_context_lost_is_raised_after_logging(tmp_path):
    log = tmp_path / "logs" / "x.jsonl"
    w = LogWriter(str(log), create=True)
    w.write({"event": "header"})
    lost = _Broken()
    lost.ok = False
    m = Measurer(lost, MeasureSettings(0, 1), rank=0, log=w)
    with pytest.raises(ContextLost):
        m.time("dispatch", TuneConfig(8, 4, 128))
    w.close()
    contents = read_log(str(log))
    assert len(contents.measurements) == 1 and contents.measurements[0]["status"] == "error"
    assert not contents.dangling
    # with a healthy device the same failure is just a failed config
    m = Measurer(_Broken(), MeasureSettings(0, 1), rank=0, log=None)
    assert m.time("dispatch", TuneConfig(8, 4, 128)) == math.inf


def test_reused_measurements_advance_the_replay_noise(tmp_path):
    """A resumed run draws past the calls its log already holds, so its next measurement deviates exactly as the
    uninterrupted run's did (the replay's draws are a stream per config)."""
    p = tmp_path / "l.jsonl"
    write_landscape(p, lambda op, s, c, b: 100.0, points=list(grid_points(sms=(8,), dchunks=(4,), cchunks=(4,),
                                                                          buffers=(128,))))
    d = TuneConfig(8, 4, 128)
    whole = Measurer(ReplayBackend(str(p), V1, noise=0.05, seed=2), MeasureSettings(warmup=0, iters=3), rank=0,
                     log=None)
    want = [whole.time("dispatch", d), whole.remeasure("dispatch", d)]
    resumed = Measurer(ReplayBackend(str(p), V1, noise=0.05, seed=2), MeasureSettings(warmup=0, iters=3), rank=0,
                       log=None, prior=whole.records[:1])
    assert resumed.time("dispatch", d) == want[0]
    assert resumed.remeasure("dispatch", d) == want[1]
