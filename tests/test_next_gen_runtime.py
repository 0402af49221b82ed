"""deepep_tune.runtime.elastic / .hybrid (apply + audit) and deepep_tune.report.paste_next, through the consumer
transcriptions in tests/consumers/ (torchtitan main V2 and HybridEP, SGLang deepep_v2, vLLM deepep_v2, Megatron
HybridEP) on the CPU fakes in tests/fake_next_runtime/. Each fake records the SM count (and for HybridEP the chunk
and stages) every simulated kernel launched with: that is the ground truth. Expected values are written out by
hand from DeepEP's and the consumers' code, never taken from the modules under test."""

from __future__ import annotations

import collections
import importlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_V2 = os.path.join(ROOT, "tests", "fake_next_runtime", "v2")
FAKE_HYBRID = os.path.join(ROOT, "tests", "fake_next_runtime", "hybrid")

from consumers._tensors import routed  # noqa: E402

from deepep_tune.report.paste_next import deepep_v2_outputs, hybridep_outputs  # noqa: E402
from deepep_tune.runtime import elastic, hybrid  # noqa: E402

EP, T, H, K, E = 8, 64, 256, 8, 256
# The fake's get_theoretical_num_sms (elastic.py L729-834 arithmetic, H200 NVLink) at E=256, K=8, 8 ranks:
THEORETICAL_OVERLAP = 12  # prefer_overlap_with_compute=True (torchtitan)
THEORETICAL_NO_OVERLAP = 64  # False (SGLang, vLLM by default): the 64-SM floor
ENV_VARS = ("SGLANG_DEEPEP_V2_NUM_SMS", "VLLM_DEEPEP_V2_PREFER_OVERLAP", "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API",
            "NUM_OF_STAGES_DISPATCH_API", "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", "NUM_OF_STAGES_G2S_COMBINE_API",
            "NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN", "WORLD_SIZE", "RANK", "DEEPEP_TUNE_APPLY")
V2_CONSUMERS = ("torchtitan_deepep_v2", "sglang_deepep_v2", "vllm_deepep_v2")
HYBRID_CONSUMERS = ("torchtitan_hybridep", "megatron_hybridep")


class Group:
    def __init__(self, n: int = EP) -> None:
        self.n = n

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return self.n


def v2_results(dispatch: int, combine: int, ep: int = EP) -> dict:
    return {"library": "deepep-v2", "ep_size": ep, "backend": "deepep",
            "best": {"num_sms": max(dispatch, combine), "dispatch": {"num_sms": dispatch, "time_us": 100.0},
                     "combine": {"num_sms": combine, "time_us": 90.0}},
            "space": {"knobs": {"dispatch": ["num_sms"], "combine": ["num_sms"]}, "shared": []}}


def hybrid_results(d=(32, 128, 8), c=(20, 64, 6), ep: int = EP) -> dict:
    return {"library": "hybridep", "ep_size": ep, "backend": "deepep",
            "best": {"dispatch": dict(zip(("num_sms", "tokens_per_chunk", "stages"), d), time_us=1.0),
                     "combine": dict(zip(("num_sms", "tokens_per_chunk", "g2s_stages"), c), time_us=1.0)},
            "space": {"knobs": {"dispatch": ["num_sms", "tokens_per_chunk", "stages"],
                                "combine": ["num_sms", "tokens_per_chunk", "g2s_stages"]}, "shared": []}}


def write(tmp_path, results: dict, name: str) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def _purge() -> None:
    for name in list(sys.modules):
        top = name.split(".")[0]
        if top in ("deep_ep", "hybrid_ep_cpp") or name in {f"consumers.{c}" for c in V2_CONSUMERS + HYBRID_CONSUMERS}:
            del sys.modules[name]


def _fake(monkeypatch, path: str):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    _purge()
    monkeypatch.syspath_prepend(path)
    import deep_ep
    assert deep_ep.__file__.startswith(path)
    return deep_ep


@pytest.fixture
def v2(monkeypatch):
    deep_ep = _fake(monkeypatch, FAKE_V2)
    cls = deep_ep.ElasticBuffer
    raw = {n: cls.__dict__[n] for n in ("dispatch", "combine", "get_theoretical_num_sms")}
    yield deep_ep
    elastic.unapply()
    for a in list(elastic._active):
        a.stop()
    for n, r in raw.items():
        assert cls.__dict__[n] is r, f"ElasticBuffer.{n} left wrapped"
    _purge()


@pytest.fixture
def hy(monkeypatch):
    deep_ep = _fake(monkeypatch, FAKE_HYBRID)
    cls = deep_ep.HybridEPBuffer
    names = ("__init__", "dispatch", "combine", "dispatch_with_permute", "combine_with_unpermute")
    raw = {n: cls.__dict__[n] for n in names}
    yield deep_ep
    hybrid.unapply()
    for a in list(hybrid._active):
        a.stop()
    for n, r in raw.items():
        assert cls.__dict__[n] is r, f"HybridEPBuffer.{n} left wrapped"
    _purge()


def consumer(name: str):
    """A fresh import of the transcription, so that `from deep_ep import ...` binds the fake of this test."""
    sys.modules.pop(f"consumers.{name}", None)
    return importlib.import_module(f"consumers.{name}")


def inputs():
    return routed(T, H, K, E)


def launched(buffer) -> list[tuple[str, int]]:
    """Ground truth: (op, SMs) of every simulated kernel launch."""
    calls = buffer.runtime.calls
    return [(op.split("_")[0], sms) for op, sms, *_ in calls]


def audited(a) -> collections.Counter:
    c = collections.Counter()
    for r, n in a.records:
        if not r.failed:
            c[(r.op, r.num_sms)] += n
    return c


def code_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_python(lines: list[str]) -> dict:
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec("\n".join(lines), ns)  # noqa: S102 - the printed paste text is what is under test
    return ns


def export(text: str, monkeypatch) -> list[str]:
    """Put the text's `export NAME=VALUE` lines into the environment; return the other code lines."""
    rest = []
    for line in code_lines(text):
        m = re.fullmatch(r"export (\w+)=(\S+)", line.strip())
        if m:
            monkeypatch.setenv(m.group(1), m.group(2))
        else:
            rest.append(line)
    return rest


# ----------------------------------------------------------------------------------------------------------
# The fakes model what the runtime relies on


def test_fake_v2_resolves_num_sms_like_deepep(v2):
    buf = v2.ElasticBuffer(Group(), num_max_tokens_per_rank=T, hidden=H, num_topk=K)
    x, idx, w = inputs()
    _, _, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)  # num_sms=0 -> theoretical
    buf.combine(x, handle)                               # 0 -> handle.num_sms
    buf.combine(x, handle, num_sms=30)                   # explicit
    assert launched(buf) == [("dispatch", THEORETICAL_OVERLAP), ("combine", THEORETICAL_OVERLAP), ("combine", 30)]


# ----------------------------------------------------------------------------------------------------------
# DeepEP V2: torchtitan main


def test_torchtitan_v2_without_apply_runs_the_theoretical_count_and_audit_says_not_in_effect(v2):
    tt = consumer("torchtitan_deepep_v2")
    x, idx, w = inputs()
    with elastic.audit(v2_results(40, 24), quiet=True) as a:
        tt.train_step(Group(), x, idx, w, E)
    assert launched(tt._buffer) == [("dispatch", 12), ("combine", 12), ("dispatch", 12), ("combine", 12)]
    assert audited(a) == collections.Counter(launched(tt._buffer))
    v = a.verdict()
    assert v.status == elastic.NOT_IN_EFFECT
    assert v.line == ("deepep-tune audit: deepep-v2 tuned answer NOT in effect for ep8: dispatch used 12 SMs instead "
                      "of 40 in x2 (1 non-cached, 1 cached) (num_sms= passed by the caller); combine used 12 SMs "
                      "instead of 24 in x2 (handle.num_sms of its dispatch)")


def test_torchtitan_v2_apply_reaches_all_four_calls_with_separate_counts(v2):
    tt = consumer("torchtitan_deepep_v2")
    x, idx, w = inputs()
    applied = elastic.apply(v2_results(40, 24))
    assert (applied.dispatch_sms, applied.combine_sms) == (40, 24)
    with elastic.audit(quiet=True) as a:  # compares with what apply installed
        tt.train_step(Group(), x, idx, w, E)
    assert launched(tt._buffer) == [("dispatch", 40), ("combine", 24), ("dispatch", 40), ("combine", 24)]
    assert audited(a) == collections.Counter(launched(tt._buffer))
    v = a.verdict()
    assert v.in_effect, v.line
    assert v.line == ("deepep-tune audit: deepep-v2 tuned answer IN EFFECT for ep8: dispatch 40 SMs x2 (1 non-cached, "
                      "1 cached), combine 24 SMs x2")


def test_only_combine_differs_is_not_in_effect(v2):
    """The dispatch count equals the framework's own choice; only the combine count differs."""
    tt = consumer("torchtitan_deepep_v2")
    x, idx, w = inputs()
    with elastic.audit(v2_results(THEORETICAL_OVERLAP, 24), quiet=True) as a:
        tt.train_step(Group(), x, idx, w, E)
    v = a.verdict()
    assert v.status == elastic.NOT_IN_EFFECT
    assert set(v.parts) == {"combine_sms"}
    assert v.parts["combine_sms"] == "combine used 12 SMs instead of 24 in x2 (handle.num_sms of its dispatch)"


def test_apply_after_the_buffer_exists_still_reaches_it(v2):
    tt = consumer("torchtitan_deepep_v2")
    x, idx, w = inputs()
    tt.get_buffer(Group(), hidden=H, num_max_tokens_per_rank=4096, num_topk=K)
    tt._buffer.get_theoretical_num_sms(E, K)  # DeepEP's weak_lru has cached 12 for this buffer
    elastic.apply(v2_results(40, 24))
    tt.train_step(Group(), x, idx, w, E)
    assert [s for _, s in launched(tt._buffer)] == [40, 24, 40, 24]


def test_apply_is_idempotent_replaces_and_unapply_restores(v2):
    cls = v2.ElasticBuffer
    raw = {n: cls.__dict__[n] for n in ("dispatch", "combine", "get_theoretical_num_sms")}
    elastic.apply(v2_results(40, 24))
    first = {n: cls.__dict__[n] for n in raw}
    elastic.apply(v2_results(40, 24))
    elastic.apply(v2_results(30, 28))  # replaces, never stacks
    for n in raw:
        assert getattr(cls.__dict__[n], elastic.ORIGINAL) is raw[n]
    assert cls.__dict__["dispatch"] is first["dispatch"]  # call wrappers stay installed once
    tt = consumer("torchtitan_deepep_v2")
    x, idx, w = inputs()
    tt.train_step(Group(), x, idx, w, E)
    assert [s for _, s in launched(tt._buffer)] == [30, 28, 30, 28]
    assert elastic.unapply() and not elastic.unapply()
    assert all(cls.__dict__[n] is raw[n] for n in raw)
    tt.reset()
    tt.train_step(Group(), x, idx, w, E)
    assert [s for _, s in launched(tt._buffer)] == [12, 12, 12, 12]


def test_reloaded_module_unwraps_instead_of_stacking(v2):
    cls = v2.ElasticBuffer
    raw = {n: cls.__dict__[n] for n in ("dispatch", "combine", "get_theoretical_num_sms")}
    elastic.apply(v2_results(40, 24))
    # A reloaded copy has lost its state but must find the marked wrappers and unwrap them.
    spec = importlib.util.find_spec("deepep_tune.runtime.elastic")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    copy.apply(v2_results(30, 28))
    for n in raw:
        assert getattr(cls.__dict__[n], elastic.ORIGINAL) is raw[n]
    copy.unapply()
    assert all(cls.__dict__[n] is raw[n] for n in raw)
    elastic.unapply()  # the first copy's state is stale; its unapply must leave DeepEP's methods alone
    assert all(cls.__dict__[n] is raw[n] for n in raw)


def test_other_rank_counts_keep_deepeps_choice(v2):
    tt = consumer("torchtitan_deepep_v2")
    x, idx, w = inputs()
    elastic.apply(v2_results(40, 24, ep=4))
    with elastic.audit(quiet=True) as a:
        tt.train_step(Group(8), x, idx, w, E)
    assert [s for _, s in launched(tt._buffer)] == [12, 12, 12, 12]
    v = a.verdict()
    assert v.status == elastic.NO_CALLS
    assert v.line.endswith("(+4 calls on 8-rank buffers, not ep4)")


@pytest.mark.parametrize("audit_first", [True, False])
def test_audit_records_what_runs_whichever_starts_first(v2, audit_first):
    """The ordering pitfall of the research smoke test: an audit outside a num_sms-injecting wrapper misreports."""
    vl = consumer("vllm_deepep_v2")
    x, idx, w = inputs()
    a = elastic.audit(quiet=True)
    if audit_first:
        a.start()
    elastic.apply(v2_results(40, 24))
    if not audit_first:
        a.start()
    pf = vl.build(vl.DeepEPV2All2AllManager(Group()), 4096, H, K, E)
    vl.forward_step(pf, x, idx, w)
    a.stop()
    assert launched(pf.buffer) == [("dispatch", 40), ("combine", 24)]
    assert audited(a) == collections.Counter({("dispatch", 40): 1, ("combine", 24): 1})


def test_failed_call_is_reported(v2):
    buf = v2.ElasticBuffer(Group(), num_max_tokens_per_rank=T, hidden=H, num_topk=K)
    x, idx, w = inputs()
    with elastic.audit(v2_results(200, 200), quiet=True) as a:
        with pytest.raises(AssertionError):
            buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E, num_sms=200)  # > 132 device SMs
    v = a.verdict()
    assert v.status == elastic.NOT_IN_EFFECT and "dispatch x1 (1 non-cached, 0 cached) raised" in v.line


# ----------------------------------------------------------------------------------------------------------
# DeepEP V2: SGLang deepep_v2


def sglang_step(sg):
    x, idx, w = inputs()
    impl = sg.DeepEPv2Impl(Group(), K, E, H)
    sg.forward_step(impl, x, idx, w)
    return sg.DeepEPv2Buffer._buffer


def test_sglang_default_is_the_64_sm_floor(v2):
    sg = consumer("sglang_deepep_v2")
    assert launched(sglang_step(sg)) == [("dispatch", THEORETICAL_NO_OVERLAP), ("combine", THEORETICAL_NO_OVERLAP)]


def test_sglang_apply_without_force_cannot_reach_a_separate_combine_count(v2):
    sg = consumer("sglang_deepep_v2")
    elastic.apply(v2_results(40, 24))
    with elastic.audit(quiet=True) as a:
        buf = sglang_step(sg)
    assert launched(buf) == [("dispatch", 40), ("combine", 40)]  # SGLang passes num_sms= explicitly to combine
    v = a.verdict()
    assert set(v.parts) == {"combine_sms"}
    assert v.parts["combine_sms"] == "combine used 40 SMs instead of 24 in x1 (num_sms= passed by the caller)"


def test_sglang_force_reaches_both_counts_and_rederives_qps(v2):
    sg = consumer("sglang_deepep_v2")
    elastic.apply(v2_results(8, 6), force=True)
    buf = sglang_step(sg)
    # SGLang passes num_qps=get_theoretical_num_qps(8) = min(8, 9) to both calls (no hybrid mode); the forced
    # combine must not keep it: DeepEP re-derives min(6, 9).
    assert buf.runtime.calls == [("dispatch", 8, 8), ("combine", 6, 6)]


def test_apply_outlives_an_audit_that_ends(v2):
    tt = consumer("torchtitan_deepep_v2")
    elastic.apply(v2_results(40, 24))
    with elastic.audit(quiet=True):
        pass
    x, idx, w = inputs()
    tt.train_step(Group(), x, idx, w, E)
    assert [s for _, s in launched(tt._buffer)] == [40, 24, 40, 24]


def test_sglang_env_set_warns_that_apply_does_not_reach(v2, monkeypatch):
    monkeypatch.setenv("SGLANG_DEEPEP_V2_NUM_SMS", "50")
    with pytest.warns(elastic.TunedConfigWarning, match="SGLANG_DEEPEP_V2_NUM_SMS=50 is set"):
        elastic.apply(v2_results(40, 24))


# ----------------------------------------------------------------------------------------------------------
# DeepEP V2: vLLM deepep_v2


def test_vllm_default_and_apply(v2):
    vl = consumer("vllm_deepep_v2")
    x, idx, w = inputs()
    mgr = vl.DeepEPV2All2AllManager(Group())
    pf = vl.build(mgr, 4096, H, K, E)
    vl.forward_step(pf, x, idx, w)
    assert launched(pf.buffer) == [("dispatch", 64), ("combine", 64)] and mgr.max_sms_used() == 64
    elastic.apply(v2_results(40, 24))
    mgr2 = vl.DeepEPV2All2AllManager(Group())
    pf2 = vl.build(mgr2, 4096, H, K, E)
    vl.forward_step(pf2, x, idx, w)
    assert launched(pf2.buffer) == [("dispatch", 40), ("combine", 24)] and mgr2.max_sms_used() == 40


# ----------------------------------------------------------------------------------------------------------
# V2 paste targets, fed through their consumers


def v2_paste(tmp_path, n, m):
    path = write(tmp_path, v2_results(n, m), "RESULTS_EP8_deepep-v2.json")
    from deepep_tune.knobs import Knobs
    out = deepep_v2_outputs(Knobs.of(("num_sms",), (n,)), Knobs.of(("num_sms",), (m,)), EP, None, path)
    return path, out["paste"]


def test_v2_paste_ids_and_commits(tmp_path):
    _, paste = v2_paste(tmp_path, 40, 24)
    assert set(paste) == {"torchtitan_v2", "sglang_v2", "vllm_v2"}
    assert "pytorch/torchtitan@b5bcd76c66d0acb1a08b176d9639425bc55e0b2a" in paste["torchtitan_v2"]
    assert "sgl-project/sglang@0134da0b075f75274c6af785a9bdf543239ba37c" in paste["sglang_v2"]
    assert "vllm-project/vllm@001430048e8175c8dff1bc57e1a81a1fa75460f9" in paste["vllm_v2"]


def test_v2_paste_torchtitan_runs_the_tuned_counts(v2, tmp_path):
    _, paste = v2_paste(tmp_path, 40, 24)
    tt = consumer("torchtitan_deepep_v2")
    run_python(code_lines(paste["torchtitan_v2"]))
    x, idx, w = inputs()
    tt.train_step(Group(), x, idx, w, E)
    assert launched(tt._buffer) == [("dispatch", 40), ("combine", 24), ("dispatch", 40), ("combine", 24)]
    assert "forward dispatch 40 SMs and backward (cached) dispatch 40 SMs; forward combine and backward combine " \
           "24 SMs" in paste["torchtitan_v2"]


def test_v2_paste_sglang_env_var_is_one_count_for_both(v2, tmp_path, monkeypatch):
    _, paste = v2_paste(tmp_path, 40, 24)
    text = paste["sglang_v2"]
    assert not export(text, monkeypatch)  # only the variable is code
    assert os.environ["SGLANG_DEEPEP_V2_NUM_SMS"] == "40"
    sg = consumer("sglang_deepep_v2")
    assert launched(sglang_step(sg)) == [("dispatch", 40), ("combine", 40)]
    assert "# Takes effect: dispatch 40 SMs, combine 40 SMs: NOT the tuned combine count 24." in text
    # The commented force lines give the tuned combine count.
    force = [line[len("#   "):] for line in text.splitlines() if line.startswith("#   ")]
    run_python(force)
    sg.DeepEPv2Buffer.destroy()
    assert launched(sglang_step(sg)) == [("dispatch", 40), ("combine", 24)]
    assert "# With it: dispatch 40 SMs, combine 24 SMs." in text


def test_v2_paste_sglang_equal_counts_is_the_tuned_answer(v2, tmp_path, monkeypatch):
    _, paste = v2_paste(tmp_path, 40, 40)
    export(paste["sglang_v2"], monkeypatch)
    assert launched(sglang_step(consumer("sglang_deepep_v2"))) == [("dispatch", 40), ("combine", 40)]
    assert "force" not in paste["sglang_v2"] and "the tuned answer" in paste["sglang_v2"]


def test_v2_paste_vllm_plugin_runs_the_tuned_counts(v2, tmp_path):
    _, paste = v2_paste(tmp_path, 40, 24)
    ns = run_python(code_lines(paste["vllm_v2"]))
    vl = consumer("vllm_deepep_v2")
    ns["register"]()  # what vLLM's plugin loader calls in every process
    x, idx, w = inputs()
    mgr = vl.DeepEPV2All2AllManager(Group())
    pf = vl.build(mgr, 4096, H, K, E)
    vl.forward_step(pf, x, idx, w)
    assert launched(pf.buffer) == [("dispatch", 40), ("combine", 24)] and mgr.max_sms_used() == 40
    assert "every dispatch 40 SMs, every combine 24 SMs, max_sms_used() 40" in paste["vllm_v2"]


def test_paste_refuses_non_positive_counts(tmp_path):
    with pytest.raises(ValueError, match="refusing to print a combine config deepep-v2 rejects: num_sms=0"):
        deepep_v2_outputs({"num_sms": 8}, {"num_sms": 0}, EP, None, "R.json")
    with pytest.raises(ValueError, match="refusing to print a dispatch config hybridep rejects: dispatch stages=0"):
        hybridep_outputs({"num_sms": 8, "tokens_per_chunk": 64, "stages": 0},
                         {"num_sms": 8, "tokens_per_chunk": 64, "g2s_stages": 2}, EP, None, "R.json")


def test_shapes_other_than_the_tuned_ones_warn(v2):
    r = v2_results(40, 24)
    r["workload"] = {"hidden": 7168, "num_topk": 8, "num_experts": 256}
    with pytest.warns(elastic.TunedConfigWarning, match="tuned for hidden=7168 but this model has hidden=4096"):
        elastic.apply(r, hidden=4096, num_topk=8)


def test_results_of_another_library_are_refused(v2):
    with pytest.raises(ValueError, match="results of hybridep, not deepep-v2"):
        elastic.apply(hybrid_results())
    with pytest.raises(ValueError, match="results of deepep-v2, not hybridep"):
        hybrid.apply(v2_results(8, 8))


# ----------------------------------------------------------------------------------------------------------
# HybridEP: torchtitan main


def hybrid_launches(buffer) -> list[tuple[str, int, int, int]]:
    """Ground truth: (op, SMs, tokens per chunk, stages) of every simulated launch (combine: G2S stages)."""
    return [(op.split("_")[0], *rest) for op, *rest in buffer.runtime.launches]


def titan_step(tt, group=None):
    x, idx, w = inputs()
    tt.train_step(group or Group(), x, idx, w, E)
    return tt._buffer


def test_torchtitan_hybridep_without_apply_runs_its_hard_coded_16(hy):
    tt = consumer("torchtitan_hybridep")
    with hybrid.audit(hybrid_results(), quiet=True) as a:
        buf = titan_step(tt)
    assert hybrid_launches(buf) == [("dispatch", 16, 64, 10), ("combine", 16, 64, 10)] * 2
    assert audited(a) == collections.Counter((op, s) for op, s, *_ in hybrid_launches(buf))
    v = a.verdict()
    assert v.status == hybrid.NOT_IN_EFFECT
    assert v.line == (
        "deepep-tune audit: hybridep tuned answer NOT in effect for ep8: dispatch used 16 SMs instead of 32 in x2 "
        "(1 non-cached, 1 cached) (buffer built with num_sms_dispatch_api=16, num_sms_combine_api=16); combine used "
        "16 SMs instead of 20 in x2 (buffer built with num_sms_dispatch_api=16, num_sms_combine_api=16); dispatch "
        "tokens_per_chunk 64 (x2) instead of 128; dispatch stages 10 (x2) instead of 8; combine g2s_stages 10 (x2) "
        "instead of 6")


def test_torchtitan_hybridep_apply_before_init_buffer(hy, tmp_path):
    tt = consumer("torchtitan_hybridep")
    hybrid.apply(hybrid_results())
    with hybrid.audit(quiet=True) as a:
        buf = titan_step(tt)
    assert hybrid_launches(buf) == [("dispatch", 32, 128, 8), ("combine", 20, 64, 6)] * 2
    v = a.verdict()
    assert v.in_effect, v.line
    assert v.line == ("deepep-tune audit: hybridep tuned answer IN EFFECT for ep8: dispatch 32 SMs x2 (1 non-cached, "
                      "1 cached), combine 20 SMs x2, dispatch tokens_per_chunk 128, stages 8; combine "
                      "tokens_per_chunk 64, g2s_stages 6")
    assert [(b.asked_dispatch, b.asked_combine, b.built_dispatch, b.built_combine, b.applied)
            for b in a.buffers.values()] == [(16, 16, 32, 20, True)]


def test_torchtitan_hybridep_apply_after_init_buffer_updates_the_live_buffer(hy):
    tt = consumer("torchtitan_hybridep")
    group = Group()
    tt.get_buffer(group, H, 4096, E // EP)  # init_buffer at model parallelization: built with 16/16
    built = tt._buffer
    with pytest.warns(elastic.TunedConfigWarning, match="existed before apply and were updated"):
        applied = hybrid.apply(hybrid_results())
    assert applied.live_buffers == 1
    buf = titan_step(tt, group)
    assert buf is built  # not re-created: the live buffer itself now runs the tuned values
    assert hybrid_launches(buf) == [("dispatch", 32, 128, 8), ("combine", 20, 64, 6)] * 2
    hybrid.unapply()
    bc = buf.configurer.buffer_config
    assert (bc.num_of_blocks_dispatch_api, bc.num_of_blocks_combine_api) == (16, 16)


def test_hybrid_unapply_restores_the_environment(hy, monkeypatch):
    monkeypatch.setenv("NUM_OF_STAGES_DISPATCH_API", "3")
    with pytest.warns(elastic.TunedConfigWarning, match="NUM_OF_STAGES_DISPATCH_API was 3"):
        hybrid.apply(hybrid_results())
    assert os.environ["NUM_OF_STAGES_DISPATCH_API"] == "8" and os.environ["NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API"] == "128"
    with pytest.warns(elastic.TunedConfigWarning, match="NUM_OF_STAGES_DISPATCH_API was 3"):
        hybrid.apply(hybrid_results(d=(32, 128, 4)))  # re-apply: replaces, and still remembers the 3
    assert os.environ["NUM_OF_STAGES_DISPATCH_API"] == "4"
    hybrid.unapply()
    assert os.environ["NUM_OF_STAGES_DISPATCH_API"] == "3"
    assert "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API" not in os.environ


def test_only_combine_chunk_differs_is_not_in_effect(hy, monkeypatch):
    tt = consumer("torchtitan_hybridep")
    hybrid.apply(hybrid_results())
    monkeypatch.setenv("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", "128")  # changed behind apply's back
    with hybrid.audit(quiet=True) as a:
        titan_step(tt)
    v = a.verdict()
    assert v.status == hybrid.NOT_IN_EFFECT and set(v.parts) == {"combine_tokens_per_chunk"}
    assert v.parts["combine_tokens_per_chunk"] == "combine tokens_per_chunk 128 (x2) instead of 64"


def test_only_combine_sms_differs_is_not_in_effect(hy):
    mg = consumer("megatron_hybridep")
    hybrid.apply(hybrid_results(d=(32, 64, 10), c=(32, 64, 10)))
    hybrid.unapply()  # the variables stay at HybridEP's defaults, which equal the tuned chunk and stages
    with hybrid.audit(hybrid_results(d=(32, 64, 10), c=(24, 64, 10)), quiet=True) as a:
        megatron_step(mg, moe_flex_dispatcher_num_sms=32)
    v = a.verdict()
    assert set(v.parts) == {"combine_sms"}, v.line
    assert v.parts["combine_sms"] == ("combine used 32 SMs instead of 24 in x2 (buffer built with "
                                      "num_sms_dispatch_api=32, num_sms_combine_api=32)")


def test_stages_lowered_by_hybridep_are_not_a_mismatch_when_the_tuned_value_was_asked(hy, monkeypatch):
    import hybrid_ep_cpp
    monkeypatch.setattr(hybrid_ep_cpp.Configurer, "FAKE_MAX_STAGES", 6)  # shared memory fits only 6 stages
    tt = consumer("torchtitan_hybridep")
    hybrid.apply(hybrid_results(d=(32, 128, 8), c=(20, 64, 6)))
    with hybrid.audit(quiet=True) as a:
        buf = titan_step(tt)
    assert hybrid_launches(buf)[0] == ("dispatch", 32, 128, 6)
    v = a.verdict()
    assert v.in_effect, v.line
    assert "(dispatch stages 8 lowered by HybridEP to 6 to fit shared memory)" in v.line
    # Without apply HybridEP asks its default 10 (lowered to 6): not the tuned 8.
    hybrid.unapply()
    tt.reset()
    with hybrid.audit(hybrid_results(d=(16, 64, 8), c=(16, 64, 6)), quiet=True) as b:
        titan_step(tt)
    assert set(b.verdict().parts) == {"dispatch_stages"}


def test_hybrid_apply_outlives_an_audit_that_ends(hy):
    hybrid.apply(hybrid_results())
    with hybrid.audit(quiet=True):
        pass
    buf = titan_step(consumer("torchtitan_hybridep"))
    assert hybrid_launches(buf) == [("dispatch", 32, 128, 8), ("combine", 20, 64, 6)] * 2


def test_hybrid_apply_is_idempotent_and_reload_safe(hy):
    cls = hy.HybridEPBuffer
    raw = cls.__dict__["__init__"]
    hybrid.apply(hybrid_results())
    hybrid.apply(hybrid_results(d=(24, 64, 8)))
    assert getattr(cls.__dict__["__init__"], elastic.ORIGINAL) is raw
    spec = importlib.util.find_spec("deepep_tune.runtime.hybrid")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    copy.apply(hybrid_results(d=(28, 64, 8)))
    assert getattr(cls.__dict__["__init__"], elastic.ORIGINAL) is raw
    buf = titan_step(consumer("torchtitan_hybridep"))
    assert hybrid_launches(buf)[0][1] == 28
    copy.unapply()
    hybrid.unapply()
    assert cls.__dict__["__init__"] is raw


# ----------------------------------------------------------------------------------------------------------
# HybridEP: Megatron (class bound at import, buffer built lazily at the first forward)


def megatron_step(mg, **config):
    x, idx, w = inputs()
    from deep_ep.hybrid_ep_buffer import indices_to_map
    routing_map, probs = indices_to_map(idx, w, T, E)
    mg.reset_hybrid_ep_buffer()
    mg.train_step(Group(), mg.TransformerConfig(**config), x, routing_map, probs, E // EP)
    return mg._hybrid_ep_buffer


def test_megatron_default_is_24_24_and_apply_beats_its_single_knob(hy):
    mg = consumer("megatron_hybridep")  # `from deep_ep import HybridEPBuffer` bound here, before apply
    buf = megatron_step(mg)
    assert [(op, s) for op, s, *_ in hybrid_launches(buf)] == [("dispatch", 24), ("combine", 24)] * 2
    del buf
    mg.reset_hybrid_ep_buffer()
    hybrid.apply(hybrid_results())
    buf = megatron_step(mg, moe_flex_dispatcher_num_sms=16)
    assert hybrid_launches(buf) == [("dispatch", 32, 128, 8), ("combine", 20, 64, 6)] * 2


def hybrid_paste(tmp_path, d, c):
    path = write(tmp_path, hybrid_results(d, c), "RESULTS_EP8_hybridep.json")
    keys = {"dispatch": ("num_sms", "tokens_per_chunk", "stages"), "combine": ("num_sms", "tokens_per_chunk", "g2s_stages")}
    out = hybridep_outputs(dict(zip(keys["dispatch"], d)), dict(zip(keys["combine"], c)), EP, None, path)
    return out["paste"]


def megatron_flag(lines: list[str]) -> tuple[dict, list[str]]:
    config, rest = {}, []
    for line in lines:
        m = re.fullmatch(r"--moe-flex-dispatcher-num-sms (\d+)", line.strip())
        if m:
            config["moe_flex_dispatcher_num_sms"] = int(m.group(1))
        else:
            rest.append(line)
    return config, rest


def test_hybrid_paste_ids_and_commits(tmp_path):
    paste = hybrid_paste(tmp_path, (32, 128, 8), (20, 64, 6))
    assert set(paste) == {"megatron_hybridep", "torchtitan_hybridep"}
    assert "NVIDIA/Megatron-LM@d98e8a64ddf34856e74b24714e3bedb2f5a39553" in paste["megatron_hybridep"]
    assert "pytorch/torchtitan@b5bcd76c66d0acb1a08b176d9639425bc55e0b2a" in paste["torchtitan_hybridep"]


def test_hybrid_paste_megatron_equal_counts_flag_and_env(hy, tmp_path, monkeypatch):
    paste = hybrid_paste(tmp_path, (32, 128, 8), (32, 64, 6))
    config, rest = megatron_flag(export(paste["megatron_hybridep"], monkeypatch))
    assert rest == [] and config == {"moe_flex_dispatcher_num_sms": 32}
    buf = megatron_step(consumer("megatron_hybridep"), **config)
    assert hybrid_launches(buf) == [("dispatch", 32, 128, 8), ("combine", 32, 64, 6)] * 2
    assert "Fused permute" in paste["megatron_hybridep"]  # the chunks differ


def test_hybrid_paste_megatron_different_counts_needs_apply(hy, tmp_path, monkeypatch):
    paste = hybrid_paste(tmp_path, (32, 64, 8), (20, 64, 6))
    text = paste["megatron_hybridep"]
    config, rest = megatron_flag(export(text, monkeypatch))
    assert config == {}  # no flag line: it cannot express two counts
    mg = consumer("megatron_hybridep")
    flag_only = megatron_step(mg, moe_flex_dispatcher_num_sms=32)  # what the text says the flag alone does
    assert [(op, s) for op, s, *_ in hybrid_launches(flag_only)] == [("dispatch", 32), ("combine", 32)] * 2
    assert "combine runs 32 SMs, NOT the tuned 20" in text
    run_python(rest)
    buf = megatron_step(mg, moe_flex_dispatcher_num_sms=32)
    assert hybrid_launches(buf) == [("dispatch", 32, 64, 8), ("combine", 20, 64, 6)] * 2
    assert "Fused permute" not in text


def test_hybrid_paste_torchtitan_apply_runs_the_tuned_answer(hy, tmp_path):
    paste = hybrid_paste(tmp_path, (32, 128, 8), (20, 64, 6))
    run_python(code_lines(paste["torchtitan_hybridep"]))
    buf = titan_step(consumer("torchtitan_hybridep"))
    assert hybrid_launches(buf) == [("dispatch", 32, 128, 8), ("combine", 20, 64, 6)] * 2
    assert ("dispatch 32 SMs, 128 tokens per chunk, 8 stages; combine 20 SMs, 64 tokens per chunk, 6 G2S stages"
            in paste["torchtitan_hybridep"])


def test_hybrid_paste_torchtitan_exports_alone_leave_the_hard_coded_sms(hy, tmp_path, monkeypatch):
    paste = hybrid_paste(tmp_path, (32, 128, 8), (20, 64, 6))
    for line in paste["torchtitan_hybridep"].splitlines():
        m = re.fullmatch(r"# export (\w+)=(\S+)", line)
        if m:
            monkeypatch.setenv(m.group(1), m.group(2))
    buf = titan_step(consumer("torchtitan_hybridep"))
    assert hybrid_launches(buf) == [("dispatch", 16, 128, 8), ("combine", 16, 64, 6)] * 2


# ----------------------------------------------------------------------------------------------------------
# Import discipline


def test_runtime_modules_import_neither_the_tuner_nor_report_nor_torch():
    code = ("import sys; import deepep_tune.runtime.elastic, deepep_tune.runtime.hybrid; "
            "bad = [m for m in sys.modules if m.startswith(('deepep_tune.tune', 'deepep_tune.report')) or m == 'torch']; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("backend", ["v2", "hybrid"])
def test_gpu_audit_next_smoke_on_the_fakes(backend):
    """benchmarks/next_gen/gpu_audit_next.py --fake: every scenario whose outcome is known comes out that way."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "next_gen", "gpu_audit_next.py"),
                        "--backend", backend, "--fake"], cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ENV_VARS})
    assert r.returncode == 0, r.stdout + r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert summary == f"summary: {7 if backend == 'v2' else 5} scenarios, {7 if backend == 'v2' else 5} as expected"
    assert "torchtitan (apply): in effect" in r.stdout
