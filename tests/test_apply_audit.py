"""deepep_tune.apply and deepep_tune.audit against the CPU fake of DeepEP (tests/fake_deep_ep).

The framework patterns (torchtitan's fused_a2a pair, the NousResearch fork's dispatcher) are the transcriptions
in benchmarks/gpu_audit.py, so the GPU check and these tests run the same code.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from deepep_tune.deepep.config import ConfigArgs
from deepep_tune.deepep.workload import Workload
from deepep_tune.record.results import load_results
from deepep_tune.runtime.apply import (
    MARK,
    ORIGINAL,
    TunedConfigWarning,
    apply,
    apply_from_env,
    config_args,
    current,
    recorder_mode,
    unapply,
)
from deepep_tune.runtime.audit import (
    IN_EFFECT,
    NO_CALLS,
    NOT_IN_EFFECT,
    UNCONFIRMED,
    UNKNOWN,
    audit,
    needed_nvl_bytes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_deep_ep")
APPLY_MOD = "deepep_tune.runtime.apply"

HIDDEN, TOPK, EXPERTS, TOKENS = 2048, 4, 16, 32


def make_results(ep: int = 2, num_sms: int = 24, dispatch: tuple = (8, 256), combine: tuple = (4, 256), **top) -> dict:
    def section(chunk_buffer: tuple) -> dict:
        return {"num_sms": num_sms, "num_max_nvl_chunked_send_tokens": chunk_buffer[0],
                "num_max_nvl_chunked_recv_tokens": chunk_buffer[1], "num_max_rdma_chunked_send_tokens": 6,
                "num_max_rdma_chunked_recv_tokens": 128}
    r = {"ep_size": ep, "normal_dispatch": section(dispatch), "normal_combine": section(combine),
         "hardware": {"device_name": "NVIDIA H100 80GB HBM3"}, "colocated": False, "backend": "deepep",
         "workload": {"num_tokens": TOKENS, "hidden": HIDDEN, "num_topk": TOPK, "num_experts": EXPERTS,
                      "dispatch_dtype": "bf16"}}
    r.update(top)
    return r


@pytest.fixture
def deep_ep(monkeypatch):
    """The fake deep_ep, left as found: nothing applied, no audit wrappers, Buffer.num_sms restored."""
    monkeypatch.syspath_prepend(FAKE)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    import deep_ep
    assert os.path.dirname(os.path.dirname(deep_ep.__file__)) == FAKE
    num_sms = deep_ep.Buffer.num_sms
    yield deep_ep
    unapply()
    deep_ep.Buffer.num_sms = num_sms
    for name in ("__init__", "dispatch", "combine", "get_dispatch_config", "get_combine_config"):
        raw = deep_ep.Buffer.__dict__[name]
        assert not getattr(getattr(raw, "__func__", raw), MARK, False), f"Buffer.{name} left wrapped"
    assert not getattr(deep_ep.Config, MARK, False) and not getattr(deep_ep.buffer.Config, MARK, False)
    # Later tests may check that deep_ep is not importable (find_spec consults sys.modules).
    for name in [n for n, m in sys.modules.items() if (getattr(m, "__file__", None) or "").startswith(FAKE)]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def frameworks(deep_ep):
    """benchmarks/gpu_audit.py as a module, bound to the fake deep_ep."""
    spec = importlib.util.spec_from_file_location("gpu_audit", os.path.join(ROOT, "benchmarks", "gpu_audit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.bind_deep_ep(deep_ep)
    yield module
    module.destroy_buffer()


@pytest.fixture
def group():
    from deep_ep_fake import LocalGroup
    return LocalGroup(rank=0, size=2)


def tokens(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, HIDDEN, generator=g).to(torch.bfloat16)
    top = torch.topk(torch.rand(TOKENS, EXPERTS, generator=g), TOPK, dim=-1)
    return x, top.indices.contiguous(), torch.softmax(top.values, -1).float().contiguous()


def torchtitan_verdict(frameworks, group, results):
    x, idx, w = tokens()
    with audit(results, quiet=True) as a:
        frameworks.torchtitan_step(group, x, idx, w, EXPERTS)
    return a


def fork_verdict(frameworks, group, results):
    x, idx, w = tokens()
    num_cus, d, c = frameworks.fork_tuples(results)
    with audit(results, quiet=True) as a:
        frameworks.fork_step(group, x, idx, w, EXPERTS, num_cus, d, c)
    return a


# ----------------------------------------------------------------------------------------------------------
# The fake itself: what the tests rely on it to model


def test_fake_config_fields_unreadable_and_asserts_like_deepep(deep_ep):
    c = deep_ep.Config(24, 8, 256)
    with pytest.raises(AttributeError):
        c.num_sms  # noqa: B018
    with pytest.raises(RuntimeError, match="config.hpp:35"):
        deep_ep.Config(24, 256, 256)
    # The number quoted in deepep_facts.md §1: 24 SMs, N=256, hidden 7168 bf16, 8 ranks.
    assert c.get_nvl_buffer_size_hint(7168 * 2, 8) == 402_851_712


def test_fake_enforces_buffer_size_and_handle_coupling(deep_ep, group):
    x, idx, w = tokens()
    buf = deep_ep.Buffer(group, 1 << 20)  # 1 MiB: too small for any default config at this hidden size
    layout = buf.get_dispatch_layout(idx, EXPERTS)
    with pytest.raises(RuntimeError, match="deep_ep.cpp:496"):
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx, topk_weights=w)
    big = deep_ep.Buffer(group, 256 << 20)
    _, _, _, _, handle, _ = big.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                         num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=w)
    with pytest.raises(RuntimeError, match="deep_ep.cpp:344"):  # handle made with 20 SMs, cached dispatch with 24
        big.dispatch(x, handle=handle, config=deep_ep.Config(24, 8, 256))
    with pytest.raises(RuntimeError, match="deep_ep.cpp:562"):
        big.combine(x, handle, config=deep_ep.Config(24, 8, 256))


# ----------------------------------------------------------------------------------------------------------
# torchtitan-v1 pattern: buffer sized from Buffer.get_*_config hints, dispatch/combine without config=


def test_torchtitan_without_apply_is_not_in_effect(frameworks, group):
    v = torchtitan_verdict(frameworks, group, make_results()).verdict()
    assert v.status == NOT_IN_EFFECT
    assert set(v.parts) == {"num_sms", "dispatch", "combine"}
    assert v.line == ("deepep-tune audit: tuned config NOT in effect for ep2: "
                      "num_sms 20 instead of 24 in dispatch x2 (1 non-cached, 1 cached), combine x2; "
                      "dispatch (chunk, buffer) (24, 256) instead of (8, 256) in x2 (1 non-cached, 1 cached); "
                      "combine (chunk, buffer) (10, 256) instead of (4, 256) in x2")


def test_torchtitan_with_apply_is_in_effect_for_sizing_forward_and_backward(frameworks, group, deep_ep):
    results = make_results()
    apply(results)
    a = torchtitan_verdict(frameworks, group, results)
    v = a.verdict()
    assert v.status == IN_EFFECT, v.line
    assert v.line == ("deepep-tune audit: tuned config IN EFFECT for ep2: num_sms 24, "
                      "dispatch (8, 256) x2 (1 non-cached, 1 cached), combine (4, 256) x2")
    # forward dispatch, backward combine; forward combine, backward cached dispatch: all chose by default
    ops = collections.Counter()
    for r in a.records:
        ops[(r.op, r.cached, r.source)] += r.count
    assert ops == {("combine", False, "default"): 2, ("dispatch", False, "default"): 1, ("dispatch", True, "default"): 1}
    # The buffer was sized from the tuned configs' hints, not DeepEP's defaults.
    hint = max(deep_ep.Config(24, 8, 256, 6, 128).get_nvl_buffer_size_hint(HIDDEN * 2, 2),
               deep_ep.Config(24, 4, 256, 6, 128).get_nvl_buffer_size_hint(HIDDEN * 2, 2))
    assert [b.num_nvl_bytes for b in a.buffers] == [hint]
    assert deep_ep.Buffer.num_sms == 24


def test_verdict_printed_once_at_block_end(frameworks, group, capsys):
    x, idx, w = tokens()
    with audit(make_results()):
        frameworks.torchtitan_step(group, x, idx, w, EXPERTS)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepep-tune audit: tuned config NOT in effect for ep2: ")


# ----------------------------------------------------------------------------------------------------------
# NousResearch fork: Config(num_cus, *tuned) built but not passed; only Buffer.set_num_sms(num_cus) acts


def test_fork_without_apply_runs_defaults_at_the_tuned_num_sms(frameworks, group):
    v = fork_verdict(frameworks, group, make_results(dispatch=(8, 512))).verdict()
    assert v.status == NOT_IN_EFFECT
    assert "num_sms" not in v.parts  # set_num_sms(turbo_deepep_num_cus) did reach DeepEP
    assert v.parts["dispatch"] == "dispatch (chunk, buffer) (24, 256) instead of (8, 512) in x2 (1 non-cached, 1 cached)"
    assert v.parts["combine"] == "combine (chunk, buffer) (10, 256) instead of (4, 256) in x2"
    # sized for nvl_buffer 256, the tuned 512 would not fit
    assert v.parts["buffer"].startswith("buffer too small for the tuned configs: num_nvl_bytes ")


def test_fork_with_apply_is_in_effect(frameworks, group):
    results = make_results(dispatch=(8, 512))
    apply(results)
    v = fork_verdict(frameworks, group, results).verdict()
    assert v.status == IN_EFFECT, v.line


def test_fork_with_apply_even_if_its_num_cus_differs(frameworks, group, deep_ep):
    """The fork calls set_num_sms(turbo_deepep_num_cus) after apply; the tuned getters still decide."""
    results = make_results()
    apply(results)
    x, idx, w = tokens()
    with audit(results, quiet=True) as a:
        frameworks.fork_step(group, x, idx, w, EXPERTS, 128, (18, 512, 8, 128), (16, 256, 8, 128))
    assert a.verdict().status == IN_EFFECT
    assert deep_ep.Buffer.num_sms == 128


# ----------------------------------------------------------------------------------------------------------
# Buffer too small, explicit configs, configs built before the audit


def test_explicit_tuned_config_in_a_default_sized_buffer_is_caught(deep_ep, group, frameworks):
    results = make_results(num_sms=24, dispatch=(8, 512))
    x, idx, w = tokens()
    tuned = deep_ep.Config(24, 8, 512, 6, 128)
    with audit(results, quiet=True) as a:
        buf = frameworks.get_buffer(group, HIDDEN * 2)  # sized from DeepEP's defaults (20 SMs, 256)
        layout = buf.get_dispatch_layout(idx, EXPERTS)
        with pytest.raises(RuntimeError, match="num_nvl_bytes"):
            buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                         num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=w, config=tuned)
    v = a.verdict()
    assert v.status == NOT_IN_EFFECT
    need = deepep_dispatch_nvl_bytes(24, 2, 512, HIDDEN * 2, TOPK)
    assert needed_nvl_bytes("dispatch", ConfigArgs(24, 8, 512, 6, 128), 2, Workload(1, HIDDEN, TOPK, EXPERTS)) == need
    assert need > buf.num_nvl_bytes
    assert f"< {need / 2**20:.1f} MiB needed by the tuned dispatch (1 call)" in v.parts["buffer"]
    assert v.parts["failed"] == "dispatch x1 (1 non-cached, 0 cached) raised"


def deepep_dispatch_nvl_bytes(num_sms, ranks, nvl_buffer, hidden_bytes, topk, num_scales=0):
    """deep_ep.cpp intranode_dispatch's host assert, written out: C = num_sms / 2 channels, R ranks, N slots."""
    C, R, N = num_sms // 2, ranks, nvl_buffer
    return R * R * 4 + C * R * 4 * 4 + C * R * N * (hidden_bytes + 4 + topk * 8 + topk * 4 + 4 * num_scales)


def deepep_combine_nvl_bytes(num_sms, ranks, nvl_buffer, hidden, topk):
    C, R, N = num_sms // 2, ranks, nvl_buffer
    return C * R * 8 + C * R * N * (hidden * 2 + 4 + topk * 4)


@pytest.mark.parametrize("cfg,ranks,shapes", [
    (ConfigArgs(24, 8, 512, 6, 128), 2, Workload(1, HIDDEN, TOPK, EXPERTS)),
    (ConfigArgs(20, 6, 256, 6, 128), 8, Workload(1, 7168, 8, 256)),
    (ConfigArgs(64, 16, 128, 6, 128), 4, Workload(1, 4096, 6, 128)),
])
def test_needed_nvl_bytes_is_deepeps_formula(cfg, ranks, shapes):
    """Expected values from DeepEP's host asserts (written out above), not from deepep_tune."""
    assert needed_nvl_bytes("dispatch", cfg, ranks, shapes) == deepep_dispatch_nvl_bytes(
        cfg.num_sms, ranks, cfg.nvl_buffer, shapes.hidden * 2, shapes.num_topk)
    assert needed_nvl_bytes("combine", cfg, ranks, shapes) == deepep_combine_nvl_bytes(
        cfg.num_sms, ranks, cfg.nvl_buffer, shapes.hidden, shapes.num_topk)


def test_needed_nvl_bytes_by_hand():
    """2 ranks, 24 SMs (12 channels), N = 512, hidden 2048 bf16, top-4: dispatch 12 * 2 * 512 * (4096 + 4 + 32 + 16)
    + 2 * 2 * 4 + 12 * 2 * 16 bytes; combine 12 * 2 * 8 + 12 * 2 * 512 * (4096 + 4 + 16)."""
    cfg, shapes = ConfigArgs(24, 8, 512, 6, 128), Workload(1, HIDDEN, TOPK, EXPERTS)
    assert needed_nvl_bytes("dispatch", cfg, 2, shapes) == 50_971_024
    assert needed_nvl_bytes("combine", cfg, 2, shapes) == 50_577_600


def test_explicit_configs_passed_by_the_framework_count(deep_ep, group):
    """PR #2627 style: Config objects built while auditing and passed as config=."""
    results = make_results()
    x, idx, w = tokens()
    with audit(results, quiet=True) as a:
        d, c = deep_ep.Config(24, 8, 256, 6, 128), deep_ep.Config(24, 4, 256)
        buf = deep_ep.Buffer(group, 64 << 20)
        layout = buf.get_dispatch_layout(idx, EXPERTS)
        recv, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                                num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=w, config=d)
        buf.combine(recv, handle, config=c)
    assert a.verdict().status == IN_EFFECT
    assert {r.source for r in a.records} == {"explicit"}


def test_only_num_sms_differs_is_not_in_effect(deep_ep, group):
    """The tuned chunk and buffer of both ops, in a big enough buffer, but at 20 SMs instead of the tuned 24."""
    results = make_results(num_sms=24)
    x, idx, w = tokens()
    with audit(results, quiet=True) as a:
        d, c = deep_ep.Config(20, 8, 256, 6, 128), deep_ep.Config(20, 4, 256, 6, 128)
        buf = deep_ep.Buffer(group, 64 << 20)
        layout = buf.get_dispatch_layout(idx, EXPERTS)
        recv, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                                                num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=w, config=d)
        buf.combine(recv, handle, config=c)
    v = a.verdict()
    assert v.status == NOT_IN_EFFECT, v.line
    assert v.parts == {"num_sms": "num_sms 20 instead of 24 in dispatch x1 (1 non-cached, 0 cached), combine x1"}
    assert v.line == ("deepep-tune audit: tuned config NOT in effect for ep2: "
                      "num_sms 20 instead of 24 in dispatch x1 (1 non-cached, 0 cached), combine x1")


def test_dispatch_only_is_unconfirmed(deep_ep, group):
    results = make_results()
    apply(results)
    x, idx, w = tokens()
    with audit(results, quiet=True) as a:
        buf = deep_ep.Buffer(group, 64 << 20)
        layout = buf.get_dispatch_layout(idx, EXPERTS)
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx, topk_weights=w)
    v = a.verdict()
    assert v.status == UNCONFIRMED and v.parts == {"missing": "no combine calls completed"}
    assert v.line == "deepep-tune audit: tuned config UNCONFIRMED for ep2: no combine calls completed"


def test_config_built_before_the_audit_is_unknown(deep_ep, group):
    results = make_results()
    early = deep_ep.Config(24, 8, 256)
    x, idx, w = tokens()
    with audit(results, quiet=True) as a:
        buf = deep_ep.Buffer(group, 64 << 20)
        layout = buf.get_dispatch_layout(idx, EXPERTS)
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx, topk_weights=w, config=early)
    v = a.verdict()
    assert v.status == UNCONFIRMED
    assert a.records[0].describe_config() == UNKNOWN
    assert v.parts["unknown"] == f"dispatch x1 (1 non-cached, 0 cached) ran configs {UNKNOWN}"


def test_no_calls_and_other_rank_counts(deep_ep):
    from deep_ep_fake import LocalGroup
    x, idx, w = tokens()
    with audit(make_results(ep=4), quiet=True) as a:
        buf = deep_ep.Buffer(LocalGroup(0, 2), 64 << 20)
        layout = buf.get_dispatch_layout(idx, EXPERTS)
        buf.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                     topk_idx=idx, topk_weights=w)
    v = a.verdict()
    assert v.status == NO_CALLS
    assert v.line.endswith("tuned config not exercised (+1 calls on 2-rank groups, not ep4)")


def test_recording_config_is_installed_only_while_active(deep_ep):
    real = deep_ep.Config
    with audit(make_results(), quiet=True):
        assert deep_ep.Config is deep_ep.buffer.Config and deep_ep.Config is not real
        assert issubclass(deep_ep.Config, real) and recorder_mode() == "subclass"
        assert config_args(deep_ep.Config(24, num_max_nvl_chunked_recv_tokens=512)) == ConfigArgs(24, 6, 512, 6, 256)
    assert deep_ep.Config is real and deep_ep.buffer.Config is real and recorder_mode() == ""


def test_factory_fallback_when_config_cannot_be_subclassed(frameworks, group, deep_ep, monkeypatch):
    def final(cls, **kwargs):
        raise TypeError("type 'deep_ep_cpp.Config' is not an acceptable base type")
    monkeypatch.setattr(deep_ep.Config, "__init_subclass__", classmethod(final))
    results = make_results()
    apply(results)
    assert current().recorder == "factory"
    assert type(deep_ep.Buffer.get_dispatch_config(2)) is importlib.import_module("deep_ep_cpp").Config
    assert torchtitan_verdict(frameworks, group, results).verdict().status == IN_EFFECT
    unapply()
    assert torchtitan_verdict(frameworks, group, results).verdict().status == NOT_IN_EFFECT


# ----------------------------------------------------------------------------------------------------------
# apply: idempotence, delegation, warnings, validation


def test_apply_twice_never_stacks_and_unapply_restores(deep_ep):
    originals = {n: deep_ep.Buffer.__dict__[n] for n in ("get_dispatch_config", "get_combine_config")}
    real_config = deep_ep.Config
    apply(make_results())
    apply(make_results())
    applied = apply(make_results(num_sms=32, dispatch=(12, 384)))
    assert applied.previous_num_sms == 20 and deep_ep.Buffer.num_sms == 32
    for name, raw in originals.items():
        installed = deep_ep.Buffer.__dict__[name].__func__
        assert getattr(installed, ORIGINAL) is raw  # one level: DeepEP's own
    assert config_args(deep_ep.Buffer.get_dispatch_config(2)) == ConfigArgs(32, 12, 384, 6, 128)
    assert unapply() is True and unapply() is False
    assert {n: deep_ep.Buffer.__dict__[n] for n in originals} == originals
    assert deep_ep.Buffer.num_sms == 20 and deep_ep.Config is real_config and current() is None


def test_a_second_copy_of_apply_does_not_stack(deep_ep, monkeypatch):
    """As after a module reload: the installed getters are recognised by their mark, not by module state."""
    raw = deep_ep.Buffer.__dict__["get_dispatch_config"]
    real_config = deep_ep.Config
    spec = importlib.util.spec_from_file_location("deepep_tune.runtime._apply_copy", sys.modules[APPLY_MOD].__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "deepep_tune.runtime._apply_copy", copy)  # dataclasses look their module up
    spec.loader.exec_module(copy)
    apply(make_results())
    try:
        copy.apply(make_results(num_sms=32))
        assert getattr(deep_ep.Buffer.__dict__["get_dispatch_config"].__func__, ORIGINAL) is raw
        assert issubclass(deep_ep.Config, real_config) and deep_ep.Config.__bases__ == (real_config,)
        copy.unapply()
        assert deep_ep.Buffer.__dict__["get_dispatch_config"] is raw and deep_ep.Config is real_config
    finally:
        copy.unapply()


def test_other_rank_count_delegates_to_deepep_and_warns_once(deep_ep):
    apply(make_results(ep=2))
    with pytest.warns(TunedConfigWarning, match=r"get_dispatch_config\(4\) asked for 4 ranks but the tuned configs are for 2"):
        cfg = deep_ep.Buffer.get_dispatch_config(4)
    assert config_args(cfg) == ConfigArgs(24, 6, 256, 6, 128)  # DeepEP's 4-rank row at the applied num_sms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deep_ep.Buffer.get_dispatch_config(4)
        assert config_args(deep_ep.Buffer.get_combine_config(2)) == ConfigArgs(24, 4, 256, 6, 128)


@pytest.mark.parametrize("change, match", [
    ({"env": {"WORLD_SIZE": "4"}}, "results are for 2 ranks but this job has 4"),
    ({"shapes": {"hidden": 7168}}, f"tuned for hidden={HIDDEN} but this model has hidden=7168"),
    ({"results": {"colocated": True}}, "sharing one GPU"),
    ({"results": {"backend": "reference"}}, "from the 'reference' backend, not a DeepEP measurement"),
    ({"device": "NVIDIA H200"}, "measured on 'NVIDIA H100 80GB HBM3' but this process runs on 'NVIDIA H200'"),
])
def test_apply_warns_when_results_may_not_fit(deep_ep, monkeypatch, change, match):
    for k, v in change.get("env", {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys.modules[APPLY_MOD], "_device_name", lambda: change.get("device", "NVIDIA H100 80GB HBM3"))
    with pytest.warns(TunedConfigWarning) as caught:
        applied = apply(make_results(**change.get("results", {})), **change.get("shapes", {}))
    messages = [str(w.message) for w in caught if issubclass(w.category, TunedConfigWarning)]
    assert len(messages) == 1 and match in messages[0] and "\n" not in messages[0]
    assert applied.warnings == tuple(messages)


def test_apply_is_silent_when_results_fit(deep_ep, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys.modules[APPLY_MOD], "_device_name", lambda: "NVIDIA H100 80GB HBM3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        applied = apply(make_results(), hidden=HIDDEN, num_topk=TOPK, num_experts=EXPERTS)
    assert applied.warnings == ()


def test_apply_warns_about_a_buffer_created_before_it(deep_ep, group):
    buf = deep_ep.Buffer(group, 1 << 20, explicitly_destroy=True)
    try:
        with pytest.warns(TunedConfigWarning, match="already exists"):
            apply(make_results())
    finally:
        buf.destroy()


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.pop("ep_size"), "missing ep_size"),
    (lambda r: r.pop("normal_combine"), "missing normal_combine"),
    (lambda r: r["normal_dispatch"].pop("num_max_nvl_chunked_recv_tokens"),
     "missing normal_dispatch.num_max_nvl_chunked_recv_tokens"),
    (lambda r: r["normal_combine"].update(num_sms=32), "normal_dispatch.num_sms=24 but normal_combine.num_sms=32"),
    (lambda r: r["normal_dispatch"].update(num_max_nvl_chunked_send_tokens=300), "nvl_chunk < nvl_buffer"),
    (lambda r: r["normal_dispatch"].update(num_sms=23) or r["normal_combine"].update(num_sms=23), "even"),
])
def test_bad_results_raise_one_line_value_error(deep_ep, mutate, match):
    r = make_results()
    mutate(r)
    with pytest.raises(ValueError, match=match) as e:
        apply(r)
    assert "\n" not in str(e.value)
    assert current() is None


def test_results_path_and_env(deep_ep, tmp_path, monkeypatch):
    path = tmp_path / "RESULTS_EP2.json"
    path.write_text(json.dumps(make_results()))
    assert load_results(path).source == str(path)
    monkeypatch.delenv("DEEPEP_TUNE_APPLY", raising=False)
    assert apply_from_env() is None
    monkeypatch.setenv("DEEPEP_TUNE_APPLY", str(path))
    applied = apply_from_env()
    assert applied.source == str(path) and deep_ep.Buffer.num_sms == 24


# ----------------------------------------------------------------------------------------------------------
# Activation without editing the script: PYTHONPATH from `python -m deepep_tune.audit --pythonpath`

TRAIN_SCRIPT = textwrap.dedent("""
    # A training script that knows nothing of deepep-tune: torchtitan-v1 sizing, no config= anywhere.
    import torch
    import deep_ep
    from deep_ep import Buffer
    from deep_ep_fake import LocalGroup

    group = LocalGroup(0, 2)
    hidden_bytes = 2048 * 2
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden_bytes, 2)
                        for c in (Buffer.get_dispatch_config(2), Buffer.get_combine_config(2)))
    buf = Buffer(group, num_nvl_bytes)
    x = torch.randn(32, 2048).to(torch.bfloat16)
    idx = torch.topk(torch.rand(32, 16), 4).indices
    w = torch.rand(32, 4)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 16)
    recv, _, recv_w, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                 num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    out, _, _ = buf.combine(recv, handle)
    buf.dispatch(out, handle=handle)
    print("trained")
""")


def _run_train(tmp_path, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPEP_TUNE_")}
    env.pop("PYTHONPATH", None)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    pythonpath = subprocess.run([sys.executable, "-m", "deepep_tune.audit", "--pythonpath"], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    assert pythonpath.startswith(str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([pythonpath, FAKE])
    env.update(env_extra)
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    # cwd outside the repo: deepep_tune must come from the site hook, not from the current directory
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_env_activation_in_a_subprocess(tmp_path):
    results = tmp_path / "RESULTS_EP2.json"
    results.write_text(json.dumps(make_results()))

    plain = _run_train(tmp_path, {})
    assert plain.returncode == 0 and "deepep-tune" not in plain.stderr, plain.stderr

    audited = _run_train(tmp_path, {"DEEPEP_TUNE_AUDIT": str(results)})
    assert audited.returncode == 0, audited.stderr
    lines = [ln for ln in audited.stderr.splitlines() if "deepep-tune" in ln]
    assert lines == [lines[0]] and lines[0].startswith("deepep-tune audit: tuned config NOT in effect for ep2: "
                                                       "num_sms 20 instead of 24"), audited.stderr

    both = _run_train(tmp_path, {"DEEPEP_TUNE_AUDIT": str(results), "DEEPEP_TUNE_APPLY": str(results),
                                 "RANK": "0", "WORLD_SIZE": "2"})
    assert both.returncode == 0, both.stderr
    assert ("[rank 0] deepep-tune audit: tuned config IN EFFECT for ep2: num_sms 24, dispatch (8, 256) "
            "x2 (1 non-cached, 1 cached), combine (4, 256) x1") in both.stderr, both.stderr
    assert "deepep-tune: applied" in both.stderr

    other_rank = _run_train(tmp_path, {"DEEPEP_TUNE_AUDIT": str(results), "RANK": "1"})
    assert "deepep-tune audit" not in other_rank.stderr


@pytest.mark.slow
def test_gpu_audit_script_smoke_on_cpu(tmp_path):
    results = tmp_path / "RESULTS_EP2.json"
    results.write_text(json.dumps(make_results(dispatch=(8, 512))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPEP_TUNE_")}
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node", "2", "benchmarks/gpu_audit.py", str(results),
                           "--fake", "--num-tokens", "32"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_audit: 4/4 verdicts as expected; Config recorder: subclass" in proc.stdout
    for label in ("torchtitan: ", "torchtitan + apply: ", "fork: ", "fork + apply: "):
        assert sum(ln.startswith(label + "deepep-tune audit: ") for ln in proc.stdout.splitlines()) == 1
