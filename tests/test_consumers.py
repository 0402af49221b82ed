"""Paste targets: DeepEP's Config constructor rules, the torchtitan/Primus tuple text, and SGLang's JSON."""

import ast
import itertools

import pytest

from _helpers import ROOT  # noqa: F401
from deepep_tune.consumers import config_ctor_error, sglang_config, torchtitan_turbo_text, turbo_tuple
from deepep_tune.space import COMMUNITY_CONFIG, TuneConfig, config_error

CONFIG_KWARGS = ("num_sms", "num_max_nvl_chunked_send_tokens", "num_max_nvl_chunked_recv_tokens",
                 "num_max_rdma_chunked_send_tokens", "num_max_rdma_chunked_recv_tokens")


def deepep_config_ok(num_sms=20, nvl_send=6, nvl_recv=256, rdma_send=6, rdma_recv=256):
    """Independent transcription of deep_ep.Config's host asserts (csrc/config.hpp) plus the kernels'
    even-num_sms assert."""
    if num_sms < 0 or num_sms % 2:
        return False
    if not (nvl_send > 0 and nvl_recv > 0 and nvl_send < nvl_recv):
        return False
    if not (rdma_send > 0 and rdma_recv > 0):
        return False
    rounded = -(-rdma_recv // rdma_send) * rdma_send
    return rdma_send < rounded and rdma_send <= rounded // 2


# --- config_ctor_error -------------------------------------------------------------------------------

@pytest.mark.parametrize("args,ok", [
    ((), True),                                   # DeepEP's defaults: Config(20, 6, 256, 6, 256)
    ((24, 8, 256), True),                         # Config(24, 8, 256): num_sms=24, nvl 8/256
    ((24, 8, 256, 6, 128), True),
    ((23, 8, 256, 6, 128), False),                # odd num_sms
    ((-2, 8, 256, 6, 128), False),
    ((24, 0, 256, 6, 128), False),                # nvl_send must be > 0
    ((24, 256, 256, 6, 128), False),              # nvl_send < nvl_recv
    ((24, 300, 256, 6, 128), False),
    ((24, 8, 256, 0, 128), False),                # rdma sizes positive
    ((24, 8, 256, 6, 0), False),
    ((24, 8, 256, 6, 6), False),                  # rdma_send > 6 / 2
    ((24, 8, 256, 6, 7), True),                   # 7 rounds up to 12: 6 <= 6
    ((24, 8, 256, 5, 5), False),
    ((24, 8, 256, 8, 9), True),                   # 9 -> 16: 8 <= 8
    ((24, 8, 256, 3, 4), True),                   # 4 -> 6: 3 <= 3
    ((24, 8, 256, 16, 16), False),
    ((24, 8, 256, 6, 128, 1), False),             # too many arguments
])
def test_config_ctor_error_cases(args, ok):
    err = config_ctor_error(*args)
    assert (err is None) == ok, err
    if not ok:
        assert isinstance(err, str) and err


def test_config_ctor_error_matches_deepep_rules_exhaustively():
    for args in itertools.product((-2, 0, 1, 2, 3, 20, 24), (0, 1, 4, 8, 24), (1, 4, 8, 24, 256),
                                  (1, 2, 3, 6), (1, 2, 5, 6, 7, 12, 128)):
        assert (config_ctor_error(*args) is None) == deepep_config_ok(*args), args


def test_widely_circulated_triple_is_rejected_when_expanded_after_num_cus():
    """(24, 8, 256) means Config(num_sms=24, nvl_send=8, nvl_recv=256). Consumers that build
    Config(num_cus, *tuple) turn it into nvl_send=24, nvl_recv=8, which DeepEP rejects."""
    assert config_ctor_error(*COMMUNITY_CONFIG) is None
    for num_cus in (20, 24, 32, 64):
        err = config_ctor_error(num_cus, *COMMUNITY_CONFIG)
        assert err is not None
        assert not deepep_config_ok(num_cus, *COMMUNITY_CONFIG)


def _parse_turbo(text):
    values = {}
    for line in text.splitlines():
        if line.startswith("#") or "=" not in line:
            continue
        name, _, rhs = line.partition("=")
        values[name.strip()] = ast.literal_eval(rhs.strip())
    return values


VALID = [
    (TuneConfig(24, 8, 256), TuneConfig(24, 4, 256)),
    (TuneConfig(20, 6, 256), TuneConfig(20, 9, 256)),
    (TuneConfig(132, 32, 512), TuneConfig(132, 1, 128)),
    (TuneConfig(4, 2, 128), TuneConfig(4, 16, 192)),
]


@pytest.mark.parametrize("d,c", VALID)
def test_torchtitan_turbo_text_tuples_are_accepted_by_config(d, c):
    text = torchtitan_turbo_text(d, c, 123456)
    v = _parse_turbo(text)
    assert set(v) == {"turbo_deepep_num_cus", "turbo_deepep_dispatch_tuned_config", "turbo_deepep_combine_tuned_config"}
    num_cus = v["turbo_deepep_num_cus"]
    assert num_cus == d.num_sms == c.num_sms
    for name, cfg in (("turbo_deepep_dispatch_tuned_config", d), ("turbo_deepep_combine_tuned_config", c)):
        t = v[name]
        assert isinstance(t, tuple) and len(t) == 4
        # Config(turbo_deepep_num_cus, *tuple)
        assert config_ctor_error(num_cus, *t) is None
        assert deepep_config_ok(num_cus, *t)
        assert t[:2] == (cfg.nvl_chunk, cfg.nvl_buffer)
        assert t == turbo_tuple(cfg)
    assert "123456" in text


@pytest.mark.parametrize("d,c", [
    (TuneConfig(23, 8, 256), TuneConfig(23, 4, 256)),     # odd num_sms
    (TuneConfig(24, 256, 256), TuneConfig(24, 4, 256)),   # dispatch chunk == buffer
    (TuneConfig(24, 8, 256), TuneConfig(24, 300, 256)),   # combine chunk > buffer
    (TuneConfig(24, 0, 256), TuneConfig(24, 4, 256)),
])
def test_torchtitan_turbo_text_refuses_invalid(d, c):
    with pytest.raises(ValueError):
        torchtitan_turbo_text(d, c, 1)


@pytest.mark.parametrize("d,c", VALID)
def test_sglang_config_uses_deepep_keyword_names(d, c):
    out = sglang_config(d, c)
    assert set(out) == {"normal_dispatch", "normal_combine"}
    for key, cfg in (("normal_dispatch", d), ("normal_combine", c)):
        kw = out[key]
        assert tuple(kw) == CONFIG_KWARGS or set(kw) == set(CONFIG_KWARGS)
        assert kw["num_sms"] == cfg.num_sms
        assert kw["num_max_nvl_chunked_send_tokens"] == cfg.nvl_chunk
        assert kw["num_max_nvl_chunked_recv_tokens"] == cfg.nvl_buffer
        # what Config(**kw) would do
        assert config_ctor_error(*(kw[k] for k in CONFIG_KWARGS)) is None
        assert all(isinstance(v, int) for v in kw.values())
    assert out["normal_dispatch"]["num_sms"] == out["normal_combine"]["num_sms"]


def test_space_configs_pass_config_ctor():
    """Every config the space admits is one DeepEP's Config accepts with the tool's rdma values."""
    for s, ch, b in itertools.product((2, 4, 20, 24, 132), (1, 2, 8, 32), (128, 256, 512)):
        cfg = TuneConfig(s, ch, b)
        if config_error(cfg) is None:
            kw = cfg.config_kwargs()
            assert config_ctor_error(*(kw[k] for k in CONFIG_KWARGS)) is None


# --- buffer size hint and the Python patch -------------------------------------------------------------------

def _deepep_nvl_hint(num_sms, nvl_recv, hidden_bytes, num_ranks, source_meta_bytes=8):
    """Config::get_nvl_buffer_size_hint (csrc/config.hpp) for an NVSHMEM build, intranode (<= 8 ranks)."""
    k_topk, k_scales = 128, 128
    rdma, nvl, ch = max(num_ranks // 8, 1), min(num_ranks, 8), num_sms // 2
    n = 0
    n += ch * nvl * (2 * rdma + 3) * 4
    n += ch * nvl * nvl_recv * hidden_bytes
    n += ch * nvl * nvl_recv * source_meta_bytes
    n += ch * nvl * nvl_recv * k_topk * 8
    n += ch * nvl * nvl_recv * k_topk * 4
    n += ch * nvl * nvl_recv * k_scales * 4
    return (n + 127) // 128 * 128


@pytest.mark.parametrize("cfg,hidden,ranks", [
    (TuneConfig(24, 8, 256), 7168, 8), (TuneConfig(20, 6, 256), 4096, 4), (TuneConfig(2, 1, 128), 256, 2),
    (TuneConfig(132, 32, 512), 8176, 8),
])
def test_nvl_size_hint_matches_deepep(cfg, hidden, ranks):
    from deepep_tune.consumers import nvl_size_hint
    from deepep_tune.space import combine_nvl_bytes, dispatch_nvl_bytes
    hb = hidden * 2
    hint = nvl_size_hint(cfg, hb, ranks)
    assert hint == _deepep_nvl_hint(cfg.num_sms, cfg.nvl_buffer, hb, ranks)
    # it is an upper bound of what intranode dispatch and combine need (top-k <= 128)
    for topk in (1, 8, 32):
        assert dispatch_nvl_bytes(cfg, ranks, hb, topk, 0) <= hint
        assert dispatch_nvl_bytes(cfg, ranks, hidden, topk, hidden // 128) <= hint
        assert combine_nvl_bytes(cfg, ranks, hidden, topk) <= hint


def test_python_patch_text():
    from deepep_tune.consumers import python_patch_text
    d, c = TuneConfig(24, 8, 256), TuneConfig(24, 4, 384)
    text = python_patch_text(d, c, 8)
    compile(text, "<patch>", "exec")  # valid Python
    assert "set_num_sms(24)" in text
    calls = [ast.literal_eval(line.split("deep_ep.Config", 1)[1].split(" if ")[0])
             for line in text.splitlines() if "deep_ep.Config(" in line]
    assert calls == [tuple(d.config_kwargs().values()), tuple(c.config_kwargs().values())]
    for args in calls:
        assert config_ctor_error(*args) is None
    assert "n == 8" in text
    with pytest.raises(ValueError):
        python_patch_text(TuneConfig(24, 256, 256), c, 8)
