"""Racing (tune/race.py): a short first pass for every config, the full count only for configs that can still
win their op, every row of the per-num_sms table on full measurements, and resume reusing both passes."""

import json

import pytest
from _helpers import bowl, brute_force_optimum, grid_points, write_landscape

from deepep_tune.deepep.config import V1, TuneConfig
from deepep_tune.tune.backends.replay import ReplayBackend
from deepep_tune.tune.measure import MeasureSettings, Measurer
from deepep_tune.tune.options import Options, resume_error
from deepep_tune.tune.race import RaceSettings
from deepep_tune.tune.search import full_search, per_sms_table, search_and_baselines, settle_rows

RACE = RaceSettings(iters=3, warmup=1, margin=0.10)


def _measurer(path, race=RACE, prior=None):
    backend = ReplayBackend(str(path), V1, objective="train")
    return backend, Measurer(backend, MeasureSettings(warmup=2, iters=10, race=race), rank=0, log=None, prior=prior)


def _roles(meas, op, cfg):
    return [r["role"] for r in meas.records if V1.key_of(r) == (op, cfg)]


@pytest.fixture
def landscape(tmp_path):
    path = tmp_path / "bowl.jsonl"
    truth = write_landscape(path, bowl(3.0, (4.0, 2.0), (6.0, 1.0)))
    return path, truth


def test_a_config_that_cannot_win_keeps_its_short_pass_only(landscape):
    path, truth = landscape
    _, meas = _measurer(path)
    fast, slow = TuneConfig(16, 10, 256), TuneConfig(4, 32, 128)
    t_fast = meas.time("dispatch", fast)
    assert _roles(meas, "dispatch", fast) == ["short", "search"]  # nothing to beat yet: the full count
    t_slow = meas.time("dispatch", slow)
    assert truth[("dispatch", 4, 32, 128)] > 1.1 * truth[("dispatch", 16, 10, 256)]
    assert _roles(meas, "dispatch", slow) == ["short"]
    assert meas.is_short("dispatch", slow) and not meas.is_short("dispatch", fast)
    assert t_slow == pytest.approx(truth[("dispatch", 4, 32, 128)]) and t_fast == pytest.approx(truth[("dispatch", 16, 10, 256)])
    short = [r for r in meas.records if r["role"] == "short"]
    assert all(r["iters"] == 3 for r in short)


def test_a_contender_within_the_margin_gets_the_full_count(landscape):
    path, truth = landscape
    _, meas = _measurer(path)
    best = TuneConfig(16, 10, 256)
    meas.time("dispatch", best)
    near = min((k for k in truth if k[0] == "dispatch" and k[1:] != (16, 10, 256)
                and truth[k] <= 1.05 * truth[("dispatch", 16, 10, 256)]), key=lambda k: truth[k])
    meas.time("dispatch", TuneConfig(*near[1:]))
    assert _roles(meas, "dispatch", TuneConfig(*near[1:])) == ["short", "search"]
    # promote gives a short-only config the full count and drops its short observation
    slow = TuneConfig(4, 32, 128)
    meas.time("dispatch", slow)
    meas.promote("dispatch", slow)
    assert _roles(meas, "dispatch", slow) == ["short", "search"] and not meas.is_short("dispatch", slow)
    assert len(meas.observed()[("dispatch", slow)]) == 1


def test_every_row_of_the_table_rests_on_full_measurements(landscape):
    path, truth = landscape
    backend, meas = _measurer(path)
    space = backend.space()
    full_search(meas, space)
    rows_before = per_sms_table(meas.observed(), space)
    assert any(meas.is_short(op, c) for r in rows_before for op, c in (("dispatch", r.dispatch), ("combine", r.combine)))
    settle_rows(meas, space)
    rows = per_sms_table(meas.observed(), space)
    assert [r.num_sms for r in rows] == [r.num_sms for r in rows_before]
    for r in rows:
        for op, c in (("dispatch", r.dispatch), ("combine", r.combine)):
            assert not meas.is_short(op, c) and "search" in _roles(meas, op, c)
    # and racing saved most full passes: the slow num_sms were raced out
    full = sum(1 for r in meas.records if r["role"] == "search")
    assert full < 0.6 * space.size()


def test_racing_keeps_the_exact_optimum_and_costs_less(landscape):
    path, truth = landscape
    opt = brute_force_optimum(truth)
    costs = {}
    for race in (RaceSettings(iters=0), RACE):
        backend, meas = _measurer(path, race)
        best, rows, _ = search_and_baselines(meas, backend.space(), "full", 2, None, None)
        assert (best.num_sms, best.dispatch, best.combine) == (opt[0], TuneConfig(*opt[1][1:]), TuneConfig(*opt[2][1:]))
        # the pipeline settles every row of the table on full measurements
        assert not any(meas.is_short(op, c) for r in rows for op, c in (("dispatch", r.dispatch), ("combine", r.combine)))
        costs[race.iters] = backend.modelled_us
    assert costs[3] < 0.7 * costs[0]


def test_resume_reuses_both_passes(landscape):
    path, _ = landscape
    backend, meas = _measurer(path)
    search_and_baselines(meas, backend.space(), "full", 2, None, None)
    assert any(r["role"] == "short" for r in meas.records)
    # a fresh run given the first run's records measures nothing again and decides the same
    backend2, meas2 = _measurer(path, prior=meas.records)
    best2, _, _ = search_and_baselines(meas2, backend2.space(), "full", 2, None, None)
    # every record came from the log (the replay counts reused answers too, to keep its noise draws in step)
    assert meas2.reused == len(meas2.records) == len(meas.records)
    assert [r["seq"] for r in meas2.records] == [r["seq"] for r in meas.records]


def test_a_log_written_before_racing_resumes_only_without_it(tmp_path):
    header = {"event": "header", "ep_size": 2, "mode": "full", "backend": "replay", "library": "deepep-v1",
              "workload": Options().shape.as_dict(), "token_counts": [4096],
              "options": {"replay": None, "objective": "train"}}
    err = resume_error(header, False, "old.jsonl", Options.of(mode="full", backend="replay"), 2, "deepep-v1")
    assert err and "race_iters" in err and "race_iters=0" in err
    assert resume_error(header, False, "old.jsonl", Options.of(mode="full", backend="replay", race_iters=0), 2,
                        "deepep-v1") is None


def test_call_noise_replays_every_call_and_models_gpu_time(tmp_path):
    path = tmp_path / "l.jsonl"
    write_landscape(path, lambda op, s, c, b: 100.0, points=list(grid_points(sms=(8,), dchunks=(4,), cchunks=(2,),
                                                                              buffers=(128,))))
    backend = ReplayBackend(str(path), V1, seed=1, objective="train", call_noise=[-0.5, 0.0, 0.5])
    res = backend.measure("dispatch", TuneConfig(8, 4, 128), warmup=1, iters=5)
    samples = res.parts["dispatch"]
    assert len(samples) == 5 and set(samples) <= {25.0, 50.0, 75.0}  # half the time per part, each call drawn
    assert backend.modelled_us == (1 + 5) * 100.0
    json.dumps(res.parts)


def test_racing_is_on_in_full_and_off_in_quick_by_default():
    from deepep_tune.tune.options import race_iters

    assert race_iters("full", 10, None) == 3 and race_iters("quick", 10, None) == 0
    assert race_iters("quick", 10, 3) == 3  # asked for
    assert race_iters("full", 3, None) == 0 and race_iters("full", 2, 5) == 0  # never as long as the full pass


def _noisy(path, race, prior=None, seed=5):
    backend = ReplayBackend(str(path), V1, noise=0.03, seed=seed, objective="train")
    return backend, Measurer(backend, MeasureSettings(warmup=2, iters=10, race=race), rank=0, log=None, prior=prior)


def test_the_full_count_continues_the_short_pass(landscape):
    """A contender's full measurement is its short pass plus the rest of the count: the same iterations, the same
    time (replay draws common random numbers per config) as a run without racing, at fewer calls."""
    path, _ = landscape
    cfg = TuneConfig(16, 10, 256)
    _, plain = _noisy(path, RaceSettings(iters=0))
    b, raced = _noisy(path, RACE)
    # (the log keeps the short pass's iterations to the nanosecond)
    assert raced.time("dispatch", cfg) == pytest.approx(plain.time("dispatch", cfg), rel=1e-6)
    short, full = [r for r in raced.records if V1.key_of(r) == ("dispatch", cfg)]
    assert full["extends"] == {"seq": short["seq"], "iters": 3} and full["iters"] == 10
    assert len(short["samples_us"]["dispatch"]) == 3
    assert b.modelled_us == pytest.approx((1 + 3 + 0 + 7) * plain.backend.time_of("dispatch", cfg))
    # a promoted config continues its short pass too, after a fresh warm-up
    slow = TuneConfig(4, 32, 128)
    raced.time("dispatch", slow)
    assert raced.is_short("dispatch", slow)
    assert raced.promote("dispatch", slow) == pytest.approx(plain.time("dispatch", slow), rel=1e-6)


def test_a_resume_between_the_two_passes_continues_from_the_log(landscape):
    path, _ = landscape
    cfg = TuneConfig(16, 10, 256)
    _, whole = _noisy(path, RACE)
    want = whole.time("dispatch", cfg)
    _, resumed = _noisy(path, RACE, prior=whole.records[:1])  # the run stopped after the short pass
    assert resumed.time("dispatch", cfg) == pytest.approx(want, rel=1e-6)
    assert resumed.reused == 1 and resumed.records[1]["extends"]["iters"] == 3


def test_racing_with_noise_never_picks_worse_than_without(landscape):
    """On common random numbers racing only drops configs; with 3 % noise per call none that could win is dropped,
    so the pick is the no-racing pick on every seed."""
    path, _ = landscape
    for seed in range(4):
        picks = []
        for race in (RaceSettings(iters=0), RACE):
            backend, meas = _noisy(path, race, seed=seed)
            best, _, _ = search_and_baselines(meas, backend.space(), "full", 2, None, None)
            picks.append((best.num_sms, best.dispatch, best.combine))
        assert picks[0] == picks[1]
