"""The config space: DeepEP's constraints, the grid each mode sweeps, the NVL buffer sizes, DeepEP's 32-bit
view limit, and the run's space and buffer sizing. Expected values are written out from DeepEP's source
(v1.2.1: csrc/config.hpp, csrc/deep_ep.cpp, csrc/kernels/intranode.cu, csrc/kernels/buffer.cuh) or worked
by hand, never computed by the function under test."""

import dataclasses
import itertools

import pytest
from _helpers import ROOT  # noqa: F401  (puts the repository on sys.path)

from deepep_tune.deepep.buffer import (
    INT32_MAX,
    int32_overflow,
    nvl_bytes,
    nvl_size_hint,
)
from deepep_tune.deepep.config import (
    COMMUNITY_CONFIG,
    V1,
    ConfigArgs,
    TuneConfig,
    config_error,
    grid,
)
from deepep_tune.deepep.gpus import sms_cap
from deepep_tune.deepep.workload import Workload
from deepep_tune.knobs import Space
from deepep_tune.tune.options import Options, SearchOptions
from deepep_tune.tune.backends.base import buffer_bytes
from deepep_tune.tune.setup import sweep_space

V3 = Workload(4096, 7168, 8, 256)  # DeepSeek-V3 shapes, bf16


def dispatch_nvl_bytes(cfg, num_ranks, hidden_bytes, topk, scales):
    return nvl_bytes("dispatch", cfg, num_ranks, Workload(1, hidden_bytes // 2 if not scales else hidden_bytes, topk,
                                                           256, "fp8" if scales else "bf16"))


def combine_nvl_bytes(cfg, num_ranks, hidden, topk):
    return nvl_bytes("combine", cfg, num_ranks, Workload(1, hidden, topk, 256))


# --- config_error: csrc/config.hpp L23-50 (ctor asserts) + the kernels' even/positive num_sms ---------

@pytest.mark.parametrize("args", [
    (0, 4, 128),     # zero SMs: the ctor allows it, an empty cooperative launch fails
    (-2, 4, 128),    # negative
    (3, 4, 128),     # odd: a channel is two SMs
    (24, 256, 256),  # chunk == buffer
    (24, 300, 256),  # chunk > buffer
    (24, 0, 256),    # empty chunk
    (24, 8, 256, 0, 128),    # rdma sizes must be positive
])
def test_config_error_rejects(args):
    assert config_error(*args)


def test_config_error_rdma_rule_hand_worked():
    # csrc/config.hpp: rdma_recv is aligned up to a multiple of rdma_send, then rdma_send <= rdma_recv / 2
    assert config_error(24, 8, 256, 100, 128) is None   # align(128, 100) = 200; 100 <= 100
    assert config_error(24, 8, 256, 130, 128) is not None  # align(128, 130) = 130; 130 > 65
    assert config_error(24, 8, 256, 6, 128) is None    # DeepEP's own tables


def test_config_error_names_the_offending_field():
    assert "num_sms" in config_error(7, 4, 128)
    assert "nvl_chunk" in config_error(8, 128, 128)


@pytest.mark.parametrize("args", [(2, 1, 2), (20, 6, 256), COMMUNITY_CONFIG, (132, 32, 512), (20, 6, 256, 6, 256)])
def test_config_error_accepts_valid(args):
    assert config_error(*args) is None


def test_turbo_tuple_pasted_as_three_values_is_rejected():
    # Config(num_cus, 24, 8, 256): nvl_send=24 >= nvl_recv=8 trips `nvl_send < nvl_recv`
    assert config_error(64, *COMMUNITY_CONFIG) is not None


# --- the v1 grid / KnobSpace.build ----------------------------------------------------------------

def build_space(axes, fits):
    """V1's declaration over the given axes values (dispatch_chunks, combine_chunks, sms, buffers)."""
    g = {"dispatch": {"num_sms": axes["sms"], "nvl_chunk": axes["dispatch_chunks"], "nvl_buffer": axes["buffers"]},
         "combine": {"num_sms": axes["sms"], "nvl_chunk": axes["combine_chunks"], "nvl_buffer": axes["buffers"]}}
    return dataclasses.replace(V1, grid=lambda cap: g).build(0, fits)


def mode_axes(cap):
    g = grid(cap)
    return {"sms": g["dispatch"]["num_sms"], "dispatch_chunks": g["dispatch"]["nvl_chunk"],
            "combine_chunks": g["combine"]["nvl_chunk"], "buffers": g["dispatch"]["nvl_buffer"]}

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


@pytest.mark.parametrize("cap", [4, 6, 20, 24, 32, 33, 78, 114, 132])
@pytest.mark.parametrize("fits_name", list(FITS))
def test_build_space_keeps_exactly_the_valid_fitting_configs(cap, fits_name):
    fits = FITS[fits_name]
    axes = mode_axes(cap)
    space, pruned = V1.build(cap, fits)

    product = {("dispatch", TuneConfig(s, c, b)) for s, c, b in itertools.product(axes["sms"], axes["dispatch_chunks"], axes["buffers"])}
    product |= {("combine", TuneConfig(s, c, b)) for s, c, b in itertools.product(axes["sms"], axes["combine_chunks"], axes["buffers"])}
    valid = lambda c: c.num_sms > 0 and c.num_sms % 2 == 0 and 0 < c.nvl_chunk < c.nvl_buffer  # noqa: E731
    expected = {(op, c) for op, c in product if valid(c) and fits(op, c)}
    got = {("dispatch", c) for c in space.dispatch} | {("combine", c) for c in space.combine}

    assert got == expected
    assert len(space.dispatch) == len(set(space.dispatch)) and len(space.combine) == len(set(space.combine))
    assert pruned == len(product) - len(expected)
    assert space.size() + pruned == len(product)
    for op in ("dispatch", "combine"):
        for c in space.configs(op):
            assert ConfigArgs.of(c).error() is None
            assert fits(op, c)
            assert c.num_sms <= cap


def test_build_space_prunes_invalid_axis_values():
    axes = dict(sms=(0, 3, 4), dispatch_chunks=(2, 128, 300), combine_chunks=(1,), buffers=(128, 256))
    space, pruned = build_space(axes, lambda op, c: True)
    assert set(space.dispatch) == {TuneConfig(4, 2, 128), TuneConfig(4, 2, 256), TuneConfig(4, 128, 256)}
    assert set(space.combine) == {TuneConfig(4, 1, 128), TuneConfig(4, 1, 256)}
    assert pruned == 3 * 3 * 2 + 3 * 1 * 2 - 5


def test_byte_budget_prunes_the_large_configs():
    space_all, pruned_all = V1.build(132, FITS["all"])
    space, pruned = V1.build(132, FITS["256MiB"])
    assert pruned_all == 0
    assert 0 < space.size() < space_all.size()
    assert pruned == space_all.size() - space.size()
    # the biggest dispatch config of the grid needs 66*8*512*14436 bytes ~ 3.6 GiB: it must be gone
    assert TuneConfig(132, 2, 512) not in space.dispatch
    assert TuneConfig(4, 2, 128) in space.dispatch


@pytest.mark.parametrize("cap", [4, 6, 8, 24, 32, 33, 40, 78, 114, 132])
def test_grid_sms(cap):
    sms = mode_axes(cap)["sms"]
    assert list(sms) == sorted(set(sms))
    assert all(s <= cap for s in sms)
    assert cap in sms  # the cap itself is always tried
    assert {s for s in (4, 8, 16, 24, 32) if s <= cap} <= set(sms)
    assert grid(cap)["dispatch"]["num_sms"] == grid(cap)["combine"]["num_sms"]


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
    return Space(V1, tuple(d), tuple(c))


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
    sp = V1.space_of(pts)
    assert sp.dispatch == (TuneConfig(8, 2, 128),) and sp.combine == (TuneConfig(8, 1, 128),)


# --- Config.get_nvl_buffer_size_hint: csrc/config.hpp L52-74 ------------------------------------------

def test_size_hint_published_example():
    # deepep_facts.md: 24 SMs, N=256, hidden 7168 bf16 (hidden_bytes 14336), 8 ranks -> 402,851,712 B
    assert nvl_size_hint(TuneConfig(24, 8, 256), 14336, 8) == 402_851_712


# --- the 32-bit view limit: buffer.cuh L14-22, intranode.cu L206-221 (dispatch), L620-634 (combine) ----

def test_int32_overflow_hand_worked_example():
    # 8 ranks, hidden 7168 bf16, top-8, 128 SMs (64 channels), nvl_buffer 512:
    # x view = 64 * 8 * 512 * 14336 = 3,758,096,384 bytes > 2^31 - 1 (both ops)
    cfg = TuneConfig(128, 8, 512)
    assert 64 * 8 * 512 * 14336 == 3_758_096_384 > INT32_MAX
    for op in ("dispatch", "combine"):
        err = int32_overflow(op, cfg, 8, V3)
        assert err and "3758096384" in err
    # largest safe buffer at 128 SMs: floor(INT32_MAX / (64 * 8 * 14336)) = 292
    assert int32_overflow("dispatch", TuneConfig(128, 8, 292), 8, V3) is None
    assert int32_overflow("combine", TuneConfig(128, 8, 293), 8, V3) is not None
    # fp8 dispatch halves the x view: 585 fits, 586 does not (floor(INT32_MAX / (64 * 8 * 7168)) = 585)
    fp8 = Workload(4096, 7168, 8, 256, "fp8")
    assert int32_overflow("dispatch", TuneConfig(128, 8, 585), 8, fp8) is None
    assert int32_overflow("dispatch", TuneConfig(128, 8, 586), 8, fp8) is not None
    # two ranks stay far below the limit at the same config
    assert int32_overflow("dispatch", cfg, 2, V3) is None


def test_sweep_excludes_int32_overflows_and_respects_max_buffer_gb():
    o = Options(search=SearchOptions(mode="full", max_buffer_gb=1e6))  # no byte budget: only the 32-bit rule prunes
    space, pruned = sweep_space(o, V1, 8, 132)
    assert TuneConfig(128, 8, 512) not in space.dispatch and TuneConfig(128, 8, 512) not in space.combine
    assert TuneConfig(128, 8, 256) in space.dispatch  # 64*8*256*14336 = 1.88e9 < 2^31
    assert pruned > 0
    # --max-buffer-gb 0.5: dispatch at 24 SMs, N=256, 8 ranks needs 12*8*256*14436 + ... = 354.8 MB (fits);
    # at 48 SMs it needs ~709.6 MB (does not)
    small, _ = sweep_space(Options(search=SearchOptions(mode="full", max_buffer_gb=0.5)), V1, 8, 132)
    assert TuneConfig(24, 8, 256) in small.dispatch
    assert TuneConfig(48, 8, 256) not in small.dispatch
    assert all(dispatch_nvl_bytes(c, 8, 14336, 8, 0) <= 0.5 * 2**30 for c in small.dispatch)


def test_buffer_is_sized_for_the_largest_config_and_the_baselines():
    # 8 ranks, DeepSeek-V3 bf16: a dispatch slot is 14336 + 4 + 8*8 + 8*4 = 14436 bytes; dispatch needs
    # R*R*4 + C*R*16 + C*R*N*14436 (deep_ep.cpp L680-690), C = num_sms / 2.
    # The space alone: dispatch (24, 8, 256) -> 256 + 1,536 + 354,779,136 = 354,780,928 (a multiple of 128)
    space = Space(V1, (TuneConfig(24, 8, 256),), (TuneConfig(24, 9, 256),))
    assert buffer_bytes(space, 8, V3, 132) == 354_780_928
    # A space of small configs: the baselines decide. (24, 8, 256) needs 354,780,928 as above; with a 20-SM cap
    # it is not run, and DeepEP as shipped (20, 6, 256) needs 256 + 10*8*16 + 10*8*256*14436 = 295,650,816.
    small = Space(V1, (TuneConfig(8, 4, 128),), (TuneConfig(8, 1, 128),))
    assert buffer_bytes(small, 8, V3, 132) == 354_780_928
    assert buffer_bytes(small, 8, V3, 20) == 295_650_816


@pytest.mark.parametrize("device_sms,ranks_per_gpu,cap", [
    (132, 1, 132),  # one rank per H100: every SM
    (133, 1, 132),  # even
    (132, 2, 64),   # co-located: (132 - 1) // 2 = 65 -> even 64, so 2 x 64 = 128 < 132 resident at once
    (132, 4, 32),   # 131 // 4 = 32: 4 x 32 = 128 < 132
    (132, 8, 16),
])
def test_sms_cap(device_sms, ranks_per_gpu, cap):
    assert sms_cap(device_sms, ranks_per_gpu) == cap


# --- the installed DeepEP against this project's copy of its tables --------------------------------------

def test_installed_deepep_tables_are_compared(monkeypatch):
    """The CPU stand-in transcribes deep_ep/buffer.py's tables: they match; a changed row is named."""
    import os

    from deepep_tune.tune.backends.deepep import installed_mismatch
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests", "fake_deep_ep"))
    import deep_ep
    assert installed_mismatch(deep_ep) is None
    # an upstream retune of the 4-rank combine row, written as buffer.py writes its tables
    scope = {"Config": deep_ep.buffer.Config, "Buffer": deep_ep.Buffer}
    exec("def get_combine_config(num_ranks):\n"
         "    return {2: Config(Buffer.num_sms, 10, 256, 6, 128), 4: Config(Buffer.num_sms, 12, 256, 6, 128),\n"
         "            8: Config(Buffer.num_sms, 4, 256, 6, 128)}[num_ranks]\n", scope)
    monkeypatch.setattr(deep_ep.Buffer, "get_combine_config", staticmethod(scope["get_combine_config"]))
    err = installed_mismatch(deep_ep)
    assert err and "get_combine_config(4)" in err and "(20, 12, 256, 6, 128)" in err
