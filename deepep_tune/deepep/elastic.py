"""DeepEP V2's ElasticBuffer (deepseek-ai/DeepEP main @dd758ca, package 2.1.0): the knob declaration the tuner
searches. Rules only; the measuring lives in deepep_tune/tune/backends/elastic.py. Facts and file:line references
are from benchmarks/next_gen/API_NOTES.md (read from the V2 sources and measured on 2x H200).

Intranode, V2 has one knob per call: `num_sms`, passed to every dispatch and every combine. A combine may use a
different count than the dispatch whose handle it consumes (intranode nothing in the handle depends on num_sms,
buffer.hpp:868-880; a combine at 24 SMs on a 22-SM handle was checked on GPU), so each op has its own count and
nothing is shared.

`prefer_overlap_with_compute` (an ElasticBuffer constructor argument) is not a searched knob: intranode the C++
side only uses it for channels when num_scaleout_ranks > 1 (csrc/elastic/buffer.hpp:847-866), so on one node it
only changes what get_theoretical_num_sms (elastic.py:728-834) answers. It enters the tuner through the
baselines: the model's SM count at both settings, which the backend computes on the node (facts)."""

from __future__ import annotations

from typing import Any, Mapping

from ..knobs import Baseline, Knobs, KnobSpace

LIBRARY = "deepep-v2"
KNOBS = ("num_sms",)
# Each new num_sms costs three JIT compiles (non-cached dispatch, cached dispatch, combine: ~13 s together on
# H200), so the grid is small: dense where the model's answers and the measured optimum lie, sparse above.
GRID_SMS = (8, 16, 24, 32, 48, 64, 96, 128)
# get_theoretical_num_sms on 2x H200 (NVLink 18 x 26.562 GB/s, x0.9 = 430.3 GB/s) for DeepSeek-V3's routing
# (256 experts, top-8, EP2), measured by benchmarks/next_gen/probe.py. Only used when the backend supplies no
# facts (a replayed landscape): then the baselines say so.
DOCUMENTED_MODEL_SMS = {True: 22, False: 64}
# torchtitan's fallback when V2's model cannot be evaluated (and DeepEP v1's Buffer.num_sms default).
FALLBACK_SMS = 20


def config(num_sms: int) -> Knobs:
    return Knobs.of(KNOBS, (num_sms,))


def grid(sms_cap: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """GRID_SMS up to the cap, plus the cap itself (the whole GPU). V2 accepts odd counts (cluster dim 1 instead of
    2, dispatch.hpp:226) but its own model returns even ones and odd ones are untested on GPU: the grid is even."""
    sms = tuple(sorted({s for s in GRID_SMS if s <= sms_cap} | ({sms_cap} if sms_cap >= 1 else set())))
    return {"dispatch": {"num_sms": sms}, "combine": {"num_sms": sms}}


def error(op: str, cfg: Knobs) -> str | None:
    """V2's host check: num_sms > 0 (buffer.hpp:728 dispatch, :1198 combine). num_sms <= the device's SMs
    (:979) depends on the GPU: the backend's SM cap enforces it. kNumMaxSMs=160 is only asserted in multi-node
    hybrid mode (:853). There is no evenness rule."""
    del op
    n = cfg.num_sms
    if type(n) is not int or n <= 0:
        return f"num_sms={n!r} must be a positive integer (V2 asserts num_sms > 0)"
    return None


def model_sms(facts: Mapping[str, Any]) -> tuple[dict[bool, int], str]:
    """get_theoretical_num_sms at prefer_overlap_with_compute True and False: from the backend's facts (computed
    on this node for this workload), else the documented H200 values, with where they came from."""
    got = facts.get("theoretical_num_sms") or {}
    if all(str(ov) in got for ov in (True, False)):
        return {ov: int(got[str(ov)]) for ov in (True, False)}, "get_theoretical_num_sms on this node"
    return dict(DOCUMENTED_MODEL_SMS), ("not computed here (no facts, e.g. a replay): the value documented for "
                                        "2x H200, 256 experts, top-8 (API_NOTES.md)")


def baselines(ep_size: int, answer_sms: int, facts: Mapping[str, Any] | None = None) -> list[Baseline]:
    del ep_size, answer_sms  # V2's choices depend on the routing shape and the node, which the facts carry
    sms, source = model_sms(facts or {})
    return [
        Baseline("v2_model_overlap",
                 f"V2's model, prefer_overlap_with_compute=True: {sms[True]} SMs for both ops ({source}); what "
                 "dispatch(num_sms=0) and torchtitan use, and combine(num_sms=0) reuses the handle's",
                 config(sms[True]), config(sms[True])),
        Baseline("v2_model_no_overlap",
                 f"V2's model, prefer_overlap_with_compute=False: {sms[False]} SMs for both ops ({source}); what "
                 "SGLang's deepep_v2 and vLLM's V2 path use",
                 config(sms[False]), config(sms[False])),
        Baseline("v2_20sms", f"{FALLBACK_SMS} SMs for both ops: torchtitan's fallback when the model fails",
                 config(FALLBACK_SMS), config(FALLBACK_SMS)),
    ]


V2 = KnobSpace(
    library=LIBRARY,
    knobs={"dispatch": KNOBS, "combine": KNOBS},
    shared=(),  # each call takes its own num_sms; a combine need not match its dispatch's handle
    grid=grid,
    error=error,
    baselines=baselines,
    layer_baselines=("v2_model_overlap", "v2_model_no_overlap"),  # torchtitan main; SGLang and vLLM
    notes={"api": "deep_ep.ElasticBuffer.dispatch(..., num_sms=N) / combine(..., num_sms=M) (DeepEP V2, 2.1.0)",
           "prefer_overlap_with_compute": "not searched: intranode it only changes get_theoretical_num_sms; "
                                          "the baselines show the model's answer at both settings"},
)
