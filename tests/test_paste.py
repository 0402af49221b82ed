"""deepep_tune.paste: every printed target is fed through a CPU transcription of its consumer (tests/consumers/)
running on the CPU stand-in of DeepEP (tests/fake_deep_ep), and the config that actually reaches
deep_ep_cpp.Buffer.intranode_dispatch/intranode_combine is compared with what DeepEP's and the consumer's code say
must run. Expected values are written out by hand from those sources, never taken from deepep_tune.paste."""

from __future__ import annotations

import json
import os
import re
import sys
import types
import warnings

import pytest
import tomllib
import torch
from consumers import (
    sglang_deepep,
    torchtitan_fork_class_attrs,
    torchtitan_fork_deepep_section,
    torchtitan_v1,
)
from consumers._tensors import routed

from deepep_tune.deepep.config import TuneConfig
from deepep_tune.deepep.workload import Workload
from deepep_tune.report.paste import buffer_notes, paste_targets, sglang_config
from deepep_tune.runtime.apply import unapply

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_deep_ep")

# The example of the brief: num_sms 64, dispatch (24, 256), combine (11, 128), EP2, hidden 7168.
D, C, EP = TuneConfig(64, 24, 256), TuneConfig(64, 11, 128), 2
W = Workload(num_tokens=4, hidden=7168, num_topk=8, num_experts=16)
# DeepEP v1.2.1 deep_ep/buffer.py L233-290, EP2 row: get_dispatch_config -> Config(Buffer.num_sms, 24, 256, 6, 128),
# get_combine_config -> Config(Buffer.num_sms, 10, 256, 6, 128).
EP2_DEFAULT_DISPATCH, EP2_DEFAULT_COMBINE = (24, 256), (10, 256)


def section(num_sms: int, chunk: int, buffer: int) -> dict:
    return {"num_sms": num_sms, "num_max_nvl_chunked_send_tokens": chunk, "num_max_nvl_chunked_recv_tokens": buffer,
            "num_max_rdma_chunked_send_tokens": 6, "num_max_rdma_chunked_recv_tokens": 128}


@pytest.fixture
def results_path(tmp_path):
    """A results file as the tuner writes it (hand-built: ep_size + the two Config kwarg objects)."""
    path = tmp_path / "RESULTS_EP2.json"
    path.write_text(json.dumps({"ep_size": EP, "normal_dispatch": section(64, 24, 256),
                                "normal_combine": section(64, 11, 128), "backend": "deepep"}))
    return str(path)


@pytest.fixture
def deep_ep(monkeypatch):
    """The fake deep_ep plus a log of the (num_sms, nvl_chunk, nvl_buffer) each runtime call received."""
    monkeypatch.syspath_prepend(FAKE)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    import deep_ep
    import deep_ep_cpp
    assert os.path.dirname(os.path.dirname(deep_ep.__file__)) == FAKE
    log: list[tuple[str, tuple[int, int, int]]] = []
    buffers: list[int] = []

    def spy(op, original):
        def call(self, *args, **kwargs):
            f = deep_ep_cpp._fields(args[12] if op == "dispatch" else args[8])
            log.append((op, (f.num_sms, f.nvl_send, f.nvl_recv)))
            return original(self, *args, **kwargs)
        return call

    monkeypatch.setattr(deep_ep_cpp.Buffer, "intranode_dispatch", spy("dispatch", deep_ep_cpp.Buffer.intranode_dispatch))
    monkeypatch.setattr(deep_ep_cpp.Buffer, "intranode_combine", spy("combine", deep_ep_cpp.Buffer.intranode_combine))
    original_init = deep_ep_cpp.Buffer.__init__

    def init(self, rank, num_ranks, num_nvl_bytes, *rest, **kw):
        buffers.append(num_nvl_bytes)
        original_init(self, rank, num_ranks, num_nvl_bytes, *rest, **kw)
    monkeypatch.setattr(deep_ep_cpp.Buffer, "__init__", init)
    num_sms = deep_ep.Buffer.num_sms
    for m in (torchtitan_v1, torchtitan_fork_class_attrs, torchtitan_fork_deepep_section):
        m.reset()
    yield types.SimpleNamespace(module=deep_ep, log=log, buffers=buffers)
    for m in (torchtitan_v1, torchtitan_fork_class_attrs, torchtitan_fork_deepep_section):
        m.reset()  # drop the consumers' module-global Buffers so later apply() calls see no live Buffer
    unapply()
    deep_ep.Buffer.num_sms = num_sms
    for name in [n for n, m in sys.modules.items() if (getattr(m, "__file__", None) or "").startswith(FAKE)]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture
def group():
    sys.path.insert(0, FAKE)
    try:
        from deep_ep_fake import LocalGroup
    finally:
        sys.path.remove(FAKE)
    return LocalGroup(rank=0, size=EP)


def ran(log) -> dict[str, set]:
    return {op: {cfg for o, cfg in log if o == op} for op in ("dispatch", "combine")}


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_python(lines: list[str]) -> dict:
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec("\n".join(lines), ns)  # noqa: S102 - the printed paste text is what is under test
    return ns


def inputs(dtype=torch.bfloat16):
    return routed(W.num_tokens, W.hidden, W.num_topk, W.num_experts, dtype)


TARGETS = lambda path: paste_targets(D, C, EP, W, path)  # noqa: E731


def test_target_ids_are_stable(results_path):
    assert set(TARGETS(results_path)) == {"deep_ep_buffer", "torchtitan_fork_class_attrs",
                                          "torchtitan_fork_deepep_section", "sglang", "primus"}


def test_deep_ep_buffer_text_makes_calls_without_config_run_the_tuned_configs(deep_ep, group, results_path):
    text = TARGETS(results_path)["deep_ep_buffer"]
    run_python(code_lines(text))
    x, idx, wts = inputs()
    torchtitan_v1.train_step(group, x, idx, wts, W.num_experts)
    assert ran(deep_ep.log) == {"dispatch": {(64, 24, 256)}, "combine": {(64, 11, 128)}}
    assert "Config(64, 24, 256, 6, 128)" in text and "Config(64, 11, 128, 6, 128)" in text


def test_fork_class_attrs_text_sets_only_num_sms_and_default_chunks_run(deep_ep, group, results_path):
    text = TARGETS(results_path)["torchtitan_fork_class_attrs"]
    assignments = [l for l in code_lines(text) if re.match(r"^\w+ = ", l)]
    values = run_python(assignments)
    assert set(values) - {"__builtins__"} == {"turbo_deepep_num_cus"}  # nothing else is consumed
    cls = type("Dispatcher", (torchtitan_fork_class_attrs.DeepEPTokenDispatcher,), {})
    cls.turbo_deepep_num_cus = values["turbo_deepep_num_cus"]
    dispatcher = cls(moe_router_topk=W.num_topk, num_moe_experts=W.num_experts)
    x, idx, wts = inputs()
    torchtitan_fork_class_attrs.train_step(dispatcher, group, x, idx, wts)
    # Without apply: num_sms from turbo_deepep_num_cus, (chunk, buffer) from DeepEP's EP2 table.
    assert ran(deep_ep.log) == {"dispatch": {(64, *EP2_DEFAULT_DISPATCH)}, "combine": {(64, *EP2_DEFAULT_COMBINE)}}
    assert "Config(64, 24, 256, 6, 128) and combine runs Config(64, 10, 256, 6, 128)" in text


def test_fork_class_attrs_text_names_deepeps_defaults_not_a_tuned_dispatch_that_differs(deep_ep, group, tmp_path):
    """Tuned dispatch (12, 512) is not DeepEP's EP2 default (24, 256): the text must say the default runs."""
    d = TuneConfig(64, 12, 512)
    path = tmp_path / "RESULTS_EP2.json"
    path.write_text(json.dumps({"ep_size": EP, "normal_dispatch": section(64, 12, 512),
                                "normal_combine": section(64, 11, 128), "backend": "deepep"}))
    text = paste_targets(d, C, EP, W, str(path))["torchtitan_fork_class_attrs"]
    values = run_python([l for l in code_lines(text) if re.match(r"^\w+ = ", l)])
    cls = type("Dispatcher", (torchtitan_fork_class_attrs.DeepEPTokenDispatcher,), {})
    cls.turbo_deepep_num_cus = values["turbo_deepep_num_cus"]
    dispatcher = cls(moe_router_topk=W.num_topk, num_moe_experts=W.num_experts)
    x, idx, wts = inputs()
    torchtitan_fork_class_attrs.train_step(dispatcher, group, x, idx, wts)
    assert ran(deep_ep.log) == {"dispatch": {(64, *EP2_DEFAULT_DISPATCH)}, "combine": {(64, *EP2_DEFAULT_COMBINE)}}
    claim = [l for l in text.splitlines() if l.startswith("# With only the line above")]
    assert claim == ["# With only the line above, ep2 dispatch runs Config(64, 24, 256, 6, 128) and combine runs "
                     "Config(64, 10, 256, 6, 128): DeepEP's default chunk and buffer, not the tuned ones."]


def test_fork_class_attrs_text_with_apply_runs_the_tuned_configs(deep_ep, group, results_path):
    text = TARGETS(results_path)["torchtitan_fork_class_attrs"]
    lines = code_lines(text)
    values = run_python([l for l in lines if re.match(r"^\w+ = ", l)])
    run_python([l for l in lines if not re.match(r"^\w+ = ", l)])  # the apply lines
    cls = type("Dispatcher", (torchtitan_fork_class_attrs.DeepEPTokenDispatcher,), {})
    cls.turbo_deepep_num_cus = values["turbo_deepep_num_cus"]
    dispatcher = cls(moe_router_topk=W.num_topk, num_moe_experts=W.num_experts)  # set_num_sms after apply
    x, idx, wts = inputs()
    torchtitan_fork_class_attrs.train_step(dispatcher, group, x, idx, wts)
    assert ran(deep_ep.log) == {"dispatch": {(64, 24, 256)}, "combine": {(64, 11, 128)}}


def _section_block(text: str) -> str:
    lines = text.splitlines()
    start = lines.index("[deepep]")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        block.append(line)
    return "\n".join(block)


def test_fork_deepep_section_runs_its_hard_coded_chunks(deep_ep, group, results_path):
    text = TARGETS(results_path)["torchtitan_fork_deepep_section"]
    values = tomllib.loads(_section_block(text))["deepep"]
    job = torchtitan_fork_deepep_section.DeepEP(**values)  # a field the job config lacks would raise here
    torchtitan_fork_deepep_section.run_deepep_autotune_if_enabled(job, group, W.num_tokens, W.hidden,
                                                                  W.num_experts, W.num_topk)
    x, idx, wts = inputs()
    torchtitan_fork_deepep_section.train_step(group, x, idx, wts, W.num_experts)
    # deepep.py@1f8691ac: intranode Config(num_sms, 6, nvl_buffer) / Config(num_sms, 4, nvl_buffer); the larger
    # tuned nvl_buffer (256) is what the section carries.
    assert ran(deep_ep.log) == {"dispatch": {(64, 6, 256)}, "combine": {(64, 4, 256)}}
    assert "What runs: dispatch Config(64, 6, 256, 6, 128), combine Config(64, 4, 256, 6, 128)" in text


def test_fork_deepep_section_code_change_runs_the_tuned_configs(deep_ep, group, results_path, monkeypatch):
    text = TARGETS(results_path)["torchtitan_fork_deepep_section"]
    values = tomllib.loads(_section_block(text))["deepep"]
    snippet = [l[4:].strip() for l in text.splitlines() if l.startswith("#   ")]
    assert snippet, "the code change is printed"
    for name in ("torchtitan", "torchtitan.distributed"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    pkg = types.ModuleType("torchtitan.distributed.deepep")
    pkg.deepep = torchtitan_fork_deepep_section
    monkeypatch.setitem(sys.modules, "torchtitan.distributed.deepep", pkg)
    monkeypatch.setitem(sys.modules, "torchtitan.distributed.deepep.deepep", torchtitan_fork_deepep_section)
    apply_call = [l for l in snippet if l.startswith("together with ")][0]
    run_python(["from deepep_tune.apply import apply", re.search(r"apply\([^)]*\)", apply_call).group(0)])
    torchtitan_fork_deepep_section.run_deepep_autotune_if_enabled(  # setup_deepep()
        torchtitan_fork_deepep_section.DeepEP(**values), group, W.num_tokens, W.hidden, W.num_experts, W.num_topk)
    run_python([l for l in snippet if not l.startswith("together with ")])
    x, idx, wts = inputs()
    torchtitan_fork_deepep_section.train_step(group, x, idx, wts, W.num_experts)
    assert ran(deep_ep.log) == {"dispatch": {(64, 24, 256)}, "combine": {(64, 11, 128)}}


def _flag_values(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = re.search(r"--deepep-config (?:'(.*)'|(\S+))$", line)
        if m:
            out.append(m.group(1) or m.group(2))
    return out


def test_sglang_reads_the_printed_file_path_and_inline_json(deep_ep, group, results_path):
    text = TARGETS(results_path)["sglang"]
    values = _flag_values(text)
    assert values[0] == results_path and len(values) == 2
    for value in values:
        deep_ep.log.clear()
        cfg = sglang_deepep.DeepEPConfig(value)
        buffer = sglang_deepep.get_deepep_buffer(cfg, group, W.hidden, param_bytes=2)
        x, idx, wts = inputs()
        sglang_deepep.forward(cfg, buffer, x, idx, wts, W.num_experts, enable_jit_deepgemm=False)
        assert ran(deep_ep.log) == {"dispatch": {(64, 24, 256)}, "combine": {(64, 11, 128)}}
    # The dict form is exactly what Config(**...) takes (DeepEP pybind names, deep_ep.cpp L1345-1349).
    assert sglang_config(D, C) == {"normal_dispatch": section(64, 24, 256), "normal_combine": section(64, 11, 128)}


def test_sglang_fp8_alignment_128_path_runs_with_the_tuned_configs(deep_ep, group, tmp_path):
    """SGLang with DeepGEMM: FP8 tokens + per-128 scales, expert_alignment=128, buffer sized with param_bytes 1."""
    w = Workload(num_tokens=4, hidden=7168, num_topk=8, num_experts=16, dispatch_dtype="fp8", expert_alignment=128)
    text = paste_targets(D, C, EP, w, str(tmp_path / "r.json"))["sglang"]
    cfg = sglang_deepep.DeepEPConfig(_flag_values(text)[1])
    buffer = sglang_deepep.get_deepep_buffer(cfg, group, W.hidden, param_bytes=1)
    x, idx, wts = inputs()
    fp8 = (x.to(torch.float8_e4m3fn), torch.ones(W.num_tokens, W.hidden // 128, dtype=torch.float32))
    counts = sglang_deepep.forward(cfg, buffer, fp8, idx, wts, W.num_experts, enable_jit_deepgemm=True)
    assert counts and all(c % 128 == 0 for c in counts)
    assert ran(deep_ep.log) == {"dispatch": {(64, 24, 256)}, "combine": {(64, 11, 128)}}


def test_sglang_text_says_when_fp8_and_alignment_matter(tmp_path):
    bf16 = paste_targets(D, C, EP, W, "r.json")["sglang"]
    fp8 = paste_targets(D, C, EP, Workload(hidden=7168, dispatch_dtype="fp8", expert_alignment=128), "r.json")["sglang"]
    assert "--dispatch-dtype fp8 --expert-alignment 128" in bf16
    assert "--dispatch-dtype fp8 --expert-alignment 128" not in fp8 and "DeepGEMM" in fp8
    assert "expert_alignment=128" in bf16


def test_primus_text_offers_only_the_cu_count_and_no_transfer(results_path):
    text = TARGETS(results_path)["primus"]
    assert code_lines(text) == []  # nothing to paste: no chunk/buffer value is consumed, H100 values do not apply
    assert "turbo_deepep_num_cu" in text and "ROCm" in text and "do not transfer" in text


# --- buffer notes --------------------------------------------------------------------------------------------------
# Hand-worked from deep_ep.cpp intranode_dispatch L680-690 and config.hpp get_nvl_buffer_size_hint L52-74, EP2,
# hidden 7168 bf16, top-k 8:
# - dispatch need = R*R*4 + C*R*16 + C*R*N*(H*2 + 4 + K*8 + K*4); at (64, 24, 256): C=32 channels,
#   16 + 1024 + 64*256*14436 = 236,520,464 B.
# - default-sized Buffer at Buffer.num_sms 20 (table (24, 256)/(10, 256)), hint with hidden_bytes 14336:
#   10*2*5*4 + 20*256*(14336 + 8 + 128*16) = 400 + 83,927,040 = 83,927,440 -> aligned 83,927,552 B.
BIG_NEED, DEFAULT20 = 236_520_464, 83_927_552
# (20, 24, 128) dispatch / (20, 11, 128) combine: dispatch need = 16 + 10*2*16 + 20*128*14436 = 36,956,496 B < DEFAULT20.
SMALL_D, SMALL_C = TuneConfig(20, 24, 128), TuneConfig(20, 11, 128)


def _default_line(notes: list[str]) -> str:
    return next(n for n in notes if "DeepEP's default configs" in n)


@pytest.mark.parametrize("dispatch,combine,too_small", [(D, C, True), (SMALL_D, SMALL_C, False)])
def test_default_sized_buffer_warning_matches_deepeps_size_assert(deep_ep, group, dispatch, combine, too_small):
    notes = buffer_notes(dispatch, combine, EP, W)
    line = _default_line(notes)
    assert line.startswith("WARNING") == too_small
    if too_small:
        assert f"{BIG_NEED}" in notes[0] and f"({DEFAULT20} B)" in line
    # Independent check: a v1-era torchtitan Buffer (sized from the untouched getters) and a call with the config.
    x, idx, wts = inputs()
    buffer = torchtitan_v1.get_buffer(group, torchtitan_v1.get_hidden_bytes(x))
    assert deep_ep.buffers == [DEFAULT20]
    layout = buffer.get_dispatch_layout(idx, W.num_experts)
    config = deep_ep.module.Config(dispatch.num_sms, dispatch.nvl_chunk, dispatch.nvl_buffer, 6, 128)
    call = lambda: buffer.dispatch(x, topk_idx=idx, topk_weights=wts, num_tokens_per_rank=layout[0],  # noqa: E731
                                   is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], config=config)
    if too_small:
        with pytest.raises(RuntimeError, match="num_nvl_bytes"):
            call()
    else:
        call()


def test_vllm_default_buffer_warning_only_when_over_1024_mib():
    # EP8, (128, 24, 512): dispatch need = 8*8*4 + 64*8*16 + 64*8*512*14436 = 3,784,319,232 B > 1 GiB.
    big = buffer_notes(TuneConfig(128, 24, 512), TuneConfig(128, 11, 512), 8, W)
    vllm_big = next(n for n in big if "VLLM_DEEPEP_BUFFER_SIZE_MB" in n)
    assert vllm_big.startswith("WARNING") and "VLLM_DEEPEP_BUFFER_SIZE_MB >= 3610" in vllm_big
    ok = next(n for n in buffer_notes(D, C, EP, W) if "VLLM_DEEPEP_BUFFER_SIZE_MB" in n)
    assert not ok.startswith("WARNING")


def test_refuses_configs_deepep_rejects(results_path):
    for bad in (TuneConfig(63, 24, 256), TuneConfig(64, 256, 256)):
        with pytest.raises(ValueError, match="refusing"):
            paste_targets(bad, C if bad.num_sms == 64 else TuneConfig(63, 11, 128), EP, W, results_path)
        with pytest.raises(ValueError, match="refusing"):
            sglang_config(bad, C)
    with pytest.raises(ValueError, match="num_sms"):
        buffer_notes(D, TuneConfig(32, 11, 128), EP, W)
