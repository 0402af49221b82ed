"""Coupling rule, selection under an SM budget, and the search strategies against replayed landscapes
with a known optimum (the ReplayBackend behind a Measurer is the oracle; no torch.distributed)."""

import math
import random

import pytest
from _helpers import (
    bowl,
    brute_force_optimum,
    grid_points,
    write_landscape,
)

from deepep_tune.deepep.config import V1, TuneConfig
from deepep_tune.knobs import Space
from deepep_tune.tune.backends.replay import ReplayBackend
from deepep_tune.tune.measure import Measurer, MeasureSettings
from deepep_tune.tune.search import (
    SmsRow,
    full_search,
    per_sms_table,
    pick,
    quick_search,
    refine,
    search_and_baselines,
)


def _oracle(path, noise=0.0, seed=0):
    backend = ReplayBackend(str(path), V1, noise, seed)
    return backend, Measurer(backend, MeasureSettings(warmup=0, iters=1), rank=0, log=None)


def _key(op, cfg):
    return (op, cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer)


def _assert_is_optimum(best, opt):
    s, dkey, ckey, total = opt
    assert best.num_sms == s
    assert _key("dispatch", best.dispatch) == dkey
    assert _key("combine", best.combine) == ckey
    assert best.total_us == pytest.approx(total)


# --- per_sms_table / pick (the coupling rule) ------------------------------------------------------

def _obs_from(table):
    return {(op, TuneConfig(*k)): [t] for (op, *k), t in table.items()}


COUPLED = {
    # num_sms 8 has the globally fastest dispatch, but its combines are slow
    ("dispatch", 8, 4, 128): 10.0, ("dispatch", 8, 6, 256): 12.0,
    ("combine", 8, 2, 128): 100.0, ("combine", 8, 4, 256): 90.0,
    # num_sms 16: neither op is globally fastest, the sum is
    ("dispatch", 16, 4, 128): 25.0, ("dispatch", 16, 6, 256): 20.0,
    ("combine", 16, 2, 128): 30.0, ("combine", 16, 4, 256): 31.0,
    # num_sms 24: fastest combine, slower dispatch
    ("dispatch", 24, 4, 128): 40.0, ("dispatch", 24, 6, 256): 45.0,
    ("combine", 24, 2, 128): 14.0, ("combine", 24, 4, 256): 16.0,
}


def _coupled_space():
    return Space(V1, tuple(TuneConfig(*k[1:]) for k in COUPLED if k[0] == "dispatch"),
                 tuple(TuneConfig(*k[1:]) for k in COUPLED if k[0] == "combine"))


def test_per_sms_table_best_of_each_op_at_each_num_sms():
    rows = per_sms_table(_obs_from(COUPLED), _coupled_space())
    assert [r.num_sms for r in rows] == [8, 16, 24]
    by = {r.num_sms: r for r in rows}
    assert (by[8].dispatch, by[8].dispatch_us, by[8].combine, by[8].combine_us) == (
        TuneConfig(8, 4, 128), 10.0, TuneConfig(8, 4, 256), 90.0)
    assert (by[16].dispatch, by[16].combine, by[16].total_us) == (TuneConfig(16, 6, 256), TuneConfig(16, 2, 128), 50.0)
    assert (by[24].dispatch, by[24].combine, by[24].total_us) == (TuneConfig(24, 4, 128), TuneConfig(24, 2, 128), 54.0)
    for r in rows:
        assert r.dispatch.num_sms == r.combine.num_sms == r.num_sms


def test_pick_couples_num_sms_even_when_fastest_dispatch_is_elsewhere():
    rows = per_sms_table(_obs_from(COUPLED), _coupled_space())
    best = pick(rows)
    fastest_dispatch = min((t, k) for k, t in COUPLED.items() if k[0] == "dispatch")[1]
    fastest_combine = min((t, k) for k, t in COUPLED.items() if k[0] == "combine")[1]
    assert fastest_dispatch[1] == 8 and fastest_combine[1] == 24  # neither is where the answer is
    assert best.num_sms == 16
    assert best.dispatch == TuneConfig(16, 6, 256) and best.combine == TuneConfig(16, 2, 128)
    assert best.total_us == 50.0


@pytest.mark.parametrize("max_sms,expect", [(None, 16), (100, 16), (16, 16), (15, 8), (8, 8), (30, 16), (4, None)])
def test_pick_respects_sm_budget(max_sms, expect):
    rows = per_sms_table(_obs_from(COUPLED), _coupled_space())
    best = pick(rows, max_sms)
    if expect is None:
        assert best is None
    else:
        assert best.num_sms == expect
        assert best.num_sms <= (max_sms or 10**9)


def test_pick_tie_prefers_fewer_sms():
    rows = [SmsRow(24, TuneConfig(24, 2, 128), 10.0, TuneConfig(24, 1, 128), 10.0),
            SmsRow(16, TuneConfig(16, 2, 128), 12.0, TuneConfig(16, 1, 128), 8.0)]
    assert pick(rows).num_sms == 16


def test_per_sms_table_ignores_failed_out_of_space_and_one_sided():
    table = dict(COUPLED)
    obs = _obs_from(table)
    # the fastest dispatch at 16 fails on a repeat: it must not be picked any more
    obs[("dispatch", TuneConfig(16, 6, 256))].append(math.inf)
    # a measurement outside the space (e.g. a baseline) is not a candidate
    obs[("dispatch", TuneConfig(16, 8, 128))] = [1.0]
    # a num_sms with only dispatch measured has no row
    obs[("dispatch", TuneConfig(32, 4, 128))] = [1.0]
    space = Space(V1, _coupled_space().dispatch + (TuneConfig(32, 4, 128),), _coupled_space().combine)
    rows = per_sms_table(obs, space)
    by = {r.num_sms: r for r in rows}
    assert 32 not in by
    assert by[16].dispatch == TuneConfig(16, 4, 128) and by[16].dispatch_us == 25.0
    assert pick(rows).num_sms == 24  # 16 now costs 55


def test_per_sms_table_uses_mean_of_observations():
    obs = _obs_from(COUPLED)
    obs[("dispatch", TuneConfig(8, 4, 128))] += [14.0]  # mean 12 -> ties with (8, 6, 256); smaller config wins
    rows = {r.num_sms: r for r in per_sms_table(obs, _coupled_space())}
    assert rows[8].dispatch_us == pytest.approx(12.0)
    assert rows[8].dispatch == TuneConfig(8, 4, 128)


# --- full and quick search on landscapes ------------------------------------------------------------

# dispatch is fastest at 8 SMs, combine at 16; together 16 wins.
D_OFF = {4: 40, 8: 0, 12: 30, 16: 10, 20: 25, 24: 35, 28: 45, 32: 60}
C_OFF = {4: 80, 8: 100, 12: 30, 16: 0, 20: 10, 24: 20, 28: 30, 32: 40}


def _coupled_landscape(op, s, c, b):
    base = bowl(3.0, (5.0, 2.0), (9.0, 1.0))(op, 16, c, b)  # same (chunk, buffer) bowl at every num_sms
    return base + (D_OFF if op == "dispatch" else C_OFF)[s]


@pytest.fixture(scope="module")
def coupled_landscape(tmp_path_factory):
    path = tmp_path_factory.mktemp("land") / "coupled.jsonl"
    truth = write_landscape(path, _coupled_landscape)
    return path, truth


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_search_finds_coupled_optimum(coupled_landscape, mode):
    path, truth = coupled_landscape
    backend, meas = _oracle(path)
    space = backend.space()
    best, rows, _ = search_and_baselines(meas, space, mode, 4, None, None)
    opt = brute_force_optimum(truth)
    assert opt[0] == 16
    _assert_is_optimum(best, opt)
    fastest_dispatch = min((t, k) for k, t in truth.items() if k[0] == "dispatch")[1]
    assert fastest_dispatch[1] == 8 and best.num_sms != fastest_dispatch[1]
    assert best.dispatch.num_sms == best.combine.num_sms == best.num_sms
    assert best in rows


@pytest.mark.parametrize("max_sms", [4, 12, 14, 20, 32])
def test_full_search_respects_max_sms(coupled_landscape, max_sms):
    path, truth = coupled_landscape
    backend, meas = _oracle(path)
    best, rows, _ = search_and_baselines(meas, backend.space(), "full", 4, max_sms, None)
    assert best.num_sms <= max_sms
    _assert_is_optimum(best, brute_force_optimum(truth, max_sms))


@pytest.mark.parametrize("max_sms", [12, 20])
def test_quick_search_respects_max_sms(coupled_landscape, max_sms):
    path, truth = coupled_landscape
    backend, meas = _oracle(path)
    # unrestricted space: the pick still obeys the budget
    best, _, _ = search_and_baselines(meas, backend.space(), "quick", 4, max_sms, None)
    assert best.num_sms <= max_sms
    # restricted like the tuner does: the constrained optimum is found
    backend, meas = _oracle(path)
    best, _, _ = search_and_baselines(meas, backend.space().restrict(max_sms), "quick", 4, max_sms, None)
    _assert_is_optimum(best, brute_force_optimum(truth, max_sms))


BOWLS = [
    (0.0, (0.0, 0.0), (0.0, 0.0)),        # corner optimum
    (7.0, (15.0, 4.0), (15.0, 4.0)),      # opposite corner
    (3.4, (5.2, 2.1), (9.7, 0.3)),
    (5.6, (11.3, 3.2), (2.2, 1.9)),
    (1.8, (7.7, 0.8), (13.1, 3.6)),
]


@pytest.mark.parametrize("i", range(len(BOWLS)))
def test_full_and_quick_find_bowl_optimum(tmp_path, i):
    s0, d_opt, c_opt = BOWLS[i]
    path = tmp_path / "bowl.jsonl"
    truth = write_landscape(path, bowl(s0, d_opt, c_opt, jitter_seed=i))
    opt = brute_force_optimum(truth)
    counts = {}
    for mode in ("full", "quick"):
        backend, meas = _oracle(path)
        best, _, _ = search_and_baselines(meas, backend.space(), mode, 8, None, None)
        _assert_is_optimum(best, opt)
        counts[mode] = len(meas.records)
    space_size = len(truth)
    assert counts["full"] >= space_size
    assert counts["quick"] * 3 < counts["full"], counts


def test_full_search_finds_optimum_of_rugged_landscape(tmp_path):
    rnd = random.Random(1234)
    path = tmp_path / "rugged.jsonl"
    truth = write_landscape(path, lambda op, s, c, b: rnd.uniform(50.0, 500.0))
    backend, meas = _oracle(path)
    best, _, _ = search_and_baselines(meas, backend.space(), "full", 2, None, None)
    _assert_is_optimum(best, brute_force_optimum(truth))


def test_full_search_measures_every_config_once(coupled_landscape):
    path, truth = coupled_landscape
    backend, meas = _oracle(path)
    space = backend.space()
    full_search(meas, space)
    assert len(meas.records) == space.size() == len(truth)
    assert {_key(r["op"], TuneConfig(r["num_sms"], r["nvl_chunk"], r["nvl_buffer"])) for r in meas.records} == set(truth)
    for r in meas.records:
        assert r["time_us"] == truth[(r["op"], r["num_sms"], r["nvl_chunk"], r["nvl_buffer"])]
        assert r["status"] == "ok" and r["role"] == "search"


def test_quick_search_single_num_sms(tmp_path):
    path = tmp_path / "one.jsonl"
    truth = write_landscape(path, bowl(0.0, (6.0, 3.0), (2.0, 1.0), sms=(24,)),
                            points=list(grid_points(sms=(24,))))
    backend, meas = _oracle(path)
    quick_search(meas, backend.space())
    best = pick(per_sms_table(meas.observed(), backend.space()))
    _assert_is_optimum(best, brute_force_optimum(truth))


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_search_never_picks_a_failing_config(tmp_path, monkeypatch, mode):
    """A config that raises (here through the fault-injection hook) is recorded as an error and not chosen."""
    path = tmp_path / "bowl.jsonl"
    truth = write_landscape(path, bowl(3.0, (5.0, 2.0), (9.0, 1.0)))
    s, dkey, ckey, _ = brute_force_optimum(truth)
    monkeypatch.setenv("DEEPEP_TUNE_INJECT", f"raise@dispatch:{s},{dkey[2]},{dkey[3]}")
    backend, meas = _oracle(path)
    best, _, _ = search_and_baselines(meas, backend.space(), mode, 2, None, None)
    failed = [r for r in meas.records if r["status"] != "ok"]
    assert failed and all((r["op"], r["num_sms"], r["nvl_chunk"], r["nvl_buffer"]) == dkey for r in failed)
    assert all(r["status"] == "error" and r["time_us"] is None and "injected" in r["error"] for r in failed)
    assert _key("dispatch", best.dispatch) != dkey
    assert math.isfinite(best.total_us)
    if mode == "full":
        del truth[dkey]
        _assert_is_optimum(best, brute_force_optimum(truth))


# --- refine (noise guard) ------------------------------------------------------------------------------

def _near_tie_landscape(op, s, c, b):
    table = {
        # at 16 SMs two dispatch configs are within 1 %, the rest are >= 20 % slower
        ("dispatch", 16, 8, 256): 100.0, ("dispatch", 16, 10, 256): 101.0,
        ("combine", 16, 2, 128): 50.0, ("combine", 16, 4, 128): 50.5,
    }
    if (op, s, c, b) in table:
        return table[(op, s, c, b)]
    return (130.0 if op == "dispatch" else 80.0) + s + c + b / 128


NEAR_POINTS = list(grid_points(sms=(8, 16, 24), dchunks=(4, 8, 10), cchunks=(2, 4, 6), buffers=(128, 256)))


def test_refine_remeasures_near_ties_only(tmp_path):
    path = tmp_path / "near.jsonl"
    truth = write_landscape(path, _near_tie_landscape, NEAR_POINTS)
    backend, meas = _oracle(path)
    space = backend.space()
    full_search(meas, space)
    n_search = len(meas.records)
    refine(meas, space, None)
    re = [r for r in meas.records[n_search:]]
    assert re and all(r["role"] == "remeasure" for r in re)
    remeasured = {(r["op"], r["num_sms"], r["nvl_chunk"], r["nvl_buffer"]) for r in re}
    assert remeasured == {("dispatch", 16, 8, 256), ("dispatch", 16, 10, 256),
                          ("combine", 16, 2, 128), ("combine", 16, 4, 128)}
    for r in re:  # re-measurements use more iterations
        assert r["iters"] > 1
        assert r["time_us"] == truth[(r["op"], r["num_sms"], r["nvl_chunk"], r["nvl_buffer"])]
    best = pick(per_sms_table(meas.observed(), space))
    assert (best.num_sms, best.dispatch, best.combine) == (16, TuneConfig(16, 8, 256), TuneConfig(16, 2, 128))


def test_refine_respects_max_sms(tmp_path):
    path = tmp_path / "near.jsonl"
    write_landscape(path, _near_tie_landscape, NEAR_POINTS)
    backend, meas = _oracle(path)
    space = backend.space()
    full_search(meas, space)
    n_search = len(meas.records)
    refine(meas, space, 8)
    re = meas.records[n_search:]
    assert re and all(r["num_sms"] <= 8 and r["role"] == "remeasure" for r in re)


def test_refine_with_noise_decides_on_several_observations(tmp_path):
    """With noisy replay, the winner at the best num_sms is decided on more than one sample."""
    path = tmp_path / "near.jsonl"
    write_landscape(path, _near_tie_landscape, NEAR_POINTS)
    backend, meas = _oracle(path, noise=0.02, seed=7)
    space = backend.space()
    full_search(meas, space)
    refine(meas, space, None)
    obs = meas.observed()
    best = pick(per_sms_table(obs, space))
    assert best.num_sms == 16
    assert len(obs[("dispatch", best.dispatch)]) >= 2 and len(obs[("combine", best.combine)]) >= 2
    assert any(r["role"] == "remeasure" for r in meas.records)


# --- baselines ---------------------------------------------------------------------------------------------

def test_baselines_measured_from_landscape(coupled_landscape):
    path, truth = coupled_landscape
    backend, meas = _oracle(path)
    best, _, bases = search_and_baselines(meas, backend.space(), "full", 4, None, None)
    by = {b.name: b for b in bases}
    assert {"deepep_default", "community_24_8_256"} <= set(by)
    d = by["deepep_default"]
    # DeepEP's 4-rank table: dispatch (6, 256), combine (9, 256), at the tuned num_sms
    assert (d.dispatch, d.combine) == (TuneConfig(best.num_sms, 6, 256), TuneConfig(best.num_sms, 9, 256))
    assert d.dispatch_us == truth[("dispatch", best.num_sms, 6, 256)]
    assert d.combine_us == truth[("combine", best.num_sms, 9, 256)]
    c = by["community_24_8_256"]
    assert (c.dispatch, c.combine) == (TuneConfig(24, 8, 256), TuneConfig(24, 8, 256))
    assert c.dispatch_us == truth[("dispatch", 24, 8, 256)] and c.combine_us == truth[("combine", 24, 8, 256)]
    for b in bases:
        assert b.skipped is None
        assert b.total_us >= best.total_us - 1e-9  # nothing in the landscape beats the optimum


def test_baselines_skipped_when_not_measurable(tmp_path):
    path = tmp_path / "small.jsonl"
    pts = list(grid_points(sms=(4, 8, 16), dchunks=(2, 4, 8), cchunks=(1, 2), buffers=(128, 256)))
    write_landscape(path, bowl(1.0, (1.0, 1.0), (1.0, 0.0), sms=(4, 8, 16), dchunks=(2, 4, 8), cchunks=(1, 2),
                               buffers=(128, 256)), pts)
    backend, meas = _oracle(path)
    best, _, bases = search_and_baselines(meas, backend.space(), "full", 4, None, None)
    by = {b.name: b for b in bases}
    assert by["community_24_8_256"].skipped and by["community_24_8_256"].dispatch_us is None
    assert by["deepep_default"].skipped  # (6, 256) / (9, 256) are not in this landscape
    # nothing outside the landscape was asked for
    assert all(r["status"] == "ok" for r in meas.records)


def test_baselines_skipped_beyond_sms_cap(coupled_landscape):
    path, _ = coupled_landscape
    backend, meas = _oracle(path)
    best, _, bases = search_and_baselines(meas, backend.space().restrict(16), "full", 4, 16, 16)
    by = {b.name: b for b in bases}
    assert by["community_24_8_256"].skipped and "16" in by["community_24_8_256"].skipped
    assert not any(r["num_sms"] > 16 for r in meas.records)


# --- SM-budget advice and one config for several token counts ---------------------------------------------------

def _rows(totals):
    return [SmsRow(s, TuneConfig(s, 2, 128), t / 2, TuneConfig(s, 1, 128), t / 2) for s, t in totals.items()]


@pytest.mark.parametrize("tol,max_sms,expect", [
    (0.05, None, 16),   # 16 is within 5 % of the fastest (24), 8 is not
    (0.0, None, 24),
    (0.5, None, 8),
    (0.05, 16, 16),     # budget 16: fastest allowed is 16 itself
    (0.3, 12, 8),       # budget 12: fastest allowed is 8
])
def test_sm_advice(tol, max_sms, expect):
    from deepep_tune.tune.search import sm_advice
    rows = _rows({8: 130.0, 16: 104.0, 24: 100.0, 32: 101.0})
    adv = sm_advice(rows, tol, max_sms)
    assert adv.num_sms == expect
    best = pick(rows, max_sms)
    assert adv.num_sms <= best.num_sms and adv.total_us <= best.total_us * (1 + tol)


def test_sm_advice_never_suggests_more_sms():
    from deepep_tune.tune.search import sm_advice
    rows = _rows({8: 100.0, 16: 100.5, 24: 99.0})
    assert sm_advice(rows, 0.05).num_sms == 8
    assert sm_advice([], 0.05) is None


def test_choose_overall_minimises_mean_relative_loss():
    from deepep_tune.tune.search import choose_overall
    a = (TuneConfig(8, 2, 128), TuneConfig(8, 1, 128))
    b = (TuneConfig(20, 4, 256), TuneConfig(20, 2, 256))
    c = (TuneConfig(16, 4, 256), TuneConfig(16, 2, 256))
    best_at = {64: 128.0, 128: 256.0, 256: 512.0}
    totals = {a: {64: 128.0, 128: 384.0, 256: 768.0},   # losses 0, .5, .5
              b: {64: 192.0, 128: 256.0, 256: 512.0},   # .5, 0, 0
              c: {64: 160.0, 128: 288.0, 256: 512.0}}   # .25, .125, 0  <- smallest mean
    cand, losses = choose_overall(totals, best_at)
    assert cand == c
    assert losses == {64: 0.25, 128: 0.125, 256: 0.0}
    # a tie goes to fewer SMs
    totals[a] = {64: 128.0, 128: 320.0, 256: 576.0}     # 0, .25, .125: same mean as c
    cand, _ = choose_overall(totals, best_at)
    assert cand == a
