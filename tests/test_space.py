"""The config space: DeepEP's constraints, the grid each mode sweeps, and the NVL buffer sizes."""

import itertools

import pytest

from _helpers import ROOT  # noqa: F401  (puts the repository on sys.path)
from deepep_tune.space import (COMMUNITY_CONFIG, Axes, Space, TuneConfig, build_space, combine_nvl_bytes,
                               config_error, dispatch_nvl_bytes, mode_axes, space_from_points)


# --- config_error ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    TuneConfig(0, 4, 128),     # zero SMs
    TuneConfig(-2, 4, 128),    # negative
    TuneConfig(3, 4, 128),     # odd: a channel is two SMs
    TuneConfig(23, 8, 256),
    TuneConfig(24, 256, 256),  # chunk == buffer
    TuneConfig(24, 300, 256),  # chunk > buffer
    TuneConfig(24, 0, 256),    # empty chunk
])
def test_config_error_rejects(cfg):
    err = config_error(cfg)
    assert isinstance(err, str) and err


def test_config_error_names_the_offending_field():
    assert "num_sms" in config_error(TuneConfig(7, 4, 128))
    assert "nvl_chunk" in config_error(TuneConfig(8, 128, 128))


@pytest.mark.parametrize("cfg", [TuneConfig(2, 1, 2), TuneConfig(20, 6, 256), TuneConfig(*COMMUNITY_CONFIG),
                                 TuneConfig(132, 32, 512)])
def test_config_error_accepts_valid(cfg):
    assert config_error(cfg) is None


# --- mode_axes / build_space ----------------------------------------------------------------------

def _budget_fits(limit_bytes, num_ranks=8, hidden=7168, topk=8):
    def fits(op, c):
        if op == "dispatch":
            return dispatch_nvl_bytes(c, num_ranks, hidden * 2, topk, 0) <= limit_bytes
        return combine_nvl_bytes(c, num_ranks, hidden, topk) <= limit_bytes
    return fits


FITS = {
    "all": lambda op, c: True,
    "1GiB": _budget_fits(1 << 30),
    "256MiB": _budget_fits(256 << 20),
    "no512_combine": lambda op, c: not (op == "combine" and c.nvl_buffer == 512),
    "none": lambda op, c: False,
}


@pytest.mark.parametrize("mode", ["quick", "full"])
@pytest.mark.parametrize("cap", [4, 6, 20, 24, 32, 33, 78, 114, 132])
@pytest.mark.parametrize("fits_name", list(FITS))
def test_build_space_keeps_exactly_the_valid_fitting_configs(mode, cap, fits_name):
    fits = FITS[fits_name]
    axes = mode_axes(mode, cap)
    space, pruned = build_space(axes, fits)

    product = {("dispatch", TuneConfig(s, c, b)) for s, c, b in itertools.product(axes.sms, axes.dispatch_chunks, axes.buffers)}
    product |= {("combine", TuneConfig(s, c, b)) for s, c, b in itertools.product(axes.sms, axes.combine_chunks, axes.buffers)}
    expected = {(op, c) for op, c in product if config_error(c) is None and fits(op, c)}
    got = {("dispatch", c) for c in space.dispatch} | {("combine", c) for c in space.combine}

    assert got == expected
    assert len(space.dispatch) == len(set(space.dispatch)) and len(space.combine) == len(set(space.combine))
    assert pruned == len(product) - len(expected)
    assert space.size() + pruned == len(product)
    for op in ("dispatch", "combine"):
        for c in space.configs(op):
            assert config_error(c) is None
            assert fits(op, c)
            assert c.num_sms <= cap


def test_build_space_prunes_invalid_axis_values():
    axes = Axes(sms=(0, 3, 4), dispatch_chunks=(2, 128, 300), combine_chunks=(1,), buffers=(128, 256))
    space, pruned = build_space(axes, lambda op, c: True)
    assert set(space.dispatch) == {TuneConfig(4, 2, 128), TuneConfig(4, 2, 256), TuneConfig(4, 128, 256)}
    assert set(space.combine) == {TuneConfig(4, 1, 128), TuneConfig(4, 1, 256)}
    assert pruned == 3 * 3 * 2 + 3 * 1 * 2 - 5


def test_byte_budget_prunes_the_large_configs():
    space_all, pruned_all = build_space(mode_axes("full", 132), FITS["all"])
    space, pruned = build_space(mode_axes("full", 132), FITS["256MiB"])
    assert pruned_all == 0
    assert 0 < space.size() < space_all.size()
    assert pruned == space_all.size() - space.size()
    # the biggest dispatch config of the grid needs 66*8*512*14436 bytes ~ 3.6 GiB: it must be gone
    assert TuneConfig(132, 2, 512) not in space.dispatch
    assert TuneConfig(4, 2, 128) in space.dispatch


@pytest.mark.parametrize("cap", [4, 6, 8, 24, 32, 33, 40, 78, 114, 132])
def test_mode_axes_sms(cap):
    for mode in ("quick", "full"):
        sms = mode_axes(mode, cap).sms
        assert list(sms) == sorted(set(sms))
        assert all(s <= cap for s in sms)
        assert cap in sms  # the cap itself is always tried
        assert {s for s in (4, 8, 16, 24, 32) if s <= cap} <= set(sms)
    assert mode_axes("quick", cap) == mode_axes("full", cap)


# --- NVL buffer sizes ------------------------------------------------------------------------------

def _dispatch_formula(S, R, N, hidden_bytes, topk, scales):
    C = S // 2
    return R * R * 4 + C * R * 16 + C * R * N * (hidden_bytes + 4 + topk * 12 + 4 * scales)


def _combine_formula(S, R, N, hidden, topk):
    C = S // 2
    return C * R * 8 + C * R * N * (hidden * 2 + 4 + topk * 4)


def test_dispatch_nvl_bytes_published_example():
    # BF16 hidden 7168, top-8: 14336 + 4 + 8*8 + 8*4 = 14436 bytes per slot.
    cfg = TuneConfig(24, 8, 256)
    got = dispatch_nvl_bytes(cfg, 8, 7168 * 2, 8, 0)
    assert got == 8 * 8 * 4 + 12 * 8 * 16 + 12 * 8 * 256 * 14436
    # one more buffer slot costs exactly one slot per channel per rank
    assert dispatch_nvl_bytes(TuneConfig(24, 8, 257), 8, 7168 * 2, 8, 0) - got == 12 * 8 * 14436


@pytest.mark.parametrize("S,R,N,hidden,topk,dtype", [
    (24, 8, 256, 7168, 8, "bf16"), (20, 4, 128, 4096, 6, "fp8"), (2, 2, 2, 16, 1, "bf16"),
    (132, 8, 512, 8176, 32, "bf16"), (78, 2, 384, 2048, 4, "fp8"), (30, 8, 192, 7168, 8, "fp8"),
])
def test_nvl_bytes_formulas(S, R, N, hidden, topk, dtype):
    hidden_bytes = hidden * (1 if dtype == "fp8" else 2)
    scales = hidden // 128 if dtype == "fp8" else 0
    cfg = TuneConfig(S, 1, N)
    assert dispatch_nvl_bytes(cfg, R, hidden_bytes, topk, scales) == _dispatch_formula(S, R, N, hidden_bytes, topk, scales)
    assert combine_nvl_bytes(cfg, R, hidden, topk) == _combine_formula(S, R, N, hidden, topk)


def test_nvl_bytes_do_not_depend_on_chunk():
    a, b = TuneConfig(24, 2, 256), TuneConfig(24, 30, 256)
    assert dispatch_nvl_bytes(a, 8, 14336, 8, 0) == dispatch_nvl_bytes(b, 8, 14336, 8, 0)
    assert combine_nvl_bytes(a, 8, 7168, 8) == combine_nvl_bytes(b, 8, 7168, 8)


# --- Space ------------------------------------------------------------------------------------------

def _space():
    d = [TuneConfig(s, c, b) for s in (4, 8, 16, 24) for c in (2, 6) for b in (128, 256)]
    c = [TuneConfig(s, ch, b) for s in (8, 16, 24, 32) for ch in (1, 9) for b in (128, 256)]
    return Space(tuple(d), tuple(c))


def test_space_sms_values_are_shared_by_both_ops():
    assert _space().sms_values() == [8, 16, 24]


def test_space_grid_and_size():
    sp = _space()
    assert sp.size() == 16 + 16
    assert sp.grid("dispatch", 8) == sorted(TuneConfig(8, c, b) for c in (2, 6) for b in (128, 256))
    assert sp.grid("combine", 4) == []


@pytest.mark.parametrize("max_sms", [4, 8, 15, 16, 24, 100])
def test_space_restrict(max_sms):
    sp = _space()
    r = sp.restrict(max_sms)
    assert set(r.dispatch) == {c for c in sp.dispatch if c.num_sms <= max_sms}
    assert set(r.combine) == {c for c in sp.combine if c.num_sms <= max_sms}
    assert all(s <= max_sms for s in r.sms_values())


def test_space_restrict_none_is_identity():
    sp = _space()
    assert sp.restrict(None) == sp


def test_space_from_points_dedups():
    pts = [("dispatch", TuneConfig(8, 2, 128)), ("dispatch", TuneConfig(8, 2, 128)), ("combine", TuneConfig(8, 1, 128))]
    sp = space_from_points(pts)
    assert sp.dispatch == (TuneConfig(8, 2, 128),) and sp.combine == (TuneConfig(8, 1, 128),)
