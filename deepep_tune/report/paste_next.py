"""Paste targets for the consumers of DeepEP V2 (`deep_ep.ElasticBuffer`, library deepep-v2) and HybridEP
(`deep_ep.HybridEPBuffer`, library hybridep): for each consumer, the text to paste and exactly what of the tuned
answer takes effect there. One definition per format.

Every claim was checked against the consumer's code at the commit named in CHECKED; tests/consumers/ holds CPU
transcriptions of those code paths and tests/test_next_gen_runtime.py feeds every printed text through them. Where
no setting of the consumer reaches a value, the text uses the runtime hook (deepep_tune.runtime.elastic /
deepep_tune.runtime.hybrid `apply`) and says so.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..deepep.elastic import V2
from ..deepep.hybrid import ENV as ENV_OF
from ..deepep.hybrid import HYBRID
from ..deepep.workload import Workload
from ..knobs import Knobs, KnobSpace

# The code each target was checked against: (repository, commit, file and lines).
CHECKED = {
    "deep_ep_v2": ("deepseek-ai/DeepEP", "dd758caf451848bd150e1046af3d0a73e5fff38d",
                   "deep_ep/buffers/elastic.py L927-929 (dispatch num_sms=0 -> get_theoretical_num_sms), "
                   "L1086 (combine num_sms=0 -> handle.num_sms)"),
    "deep_ep_hybrid": ("deepseek-ai/DeepEP", "94a9f8f6b146c07d97ec58f67cd6d303296d6098 (branch hybrid-ep)",
                       "deep_ep/hybrid_ep_buffer.py L85-97, L120-166; csrc/hybrid_ep/config.cuh L365-381, L402-460"),
    "torchtitan_v2": ("pytorch/torchtitan", "b5bcd76c66d0acb1a08b176d9639425bc55e0b2a",
                      "torchtitan/distributed/deepep/deepep.py L112-126, L159-172 (forward dispatch num_sms="
                      "get_theoretical_num_sms), L229-233 and L266-271 (combines without num_sms), L298-303 (cached "
                      "dispatch num_sms=handle.num_sms), L335-381 (get_buffer, prefer_overlap_with_compute left True)"),
    "sglang_v2": ("sgl-project/sglang", "0134da0b075f75274c6af785a9bdf543239ba37c",
                  "python/sglang/srt/layers/moe/token_dispatcher/deepep_v2.py (DeepEPv2Buffer.get_buffer, "
                  "_resolve_num_sms_qps, dispatch, combine); python/sglang/srt/environ.py (SGLANG_DEEPEP_V2_NUM_SMS "
                  "= EnvInt(0))"),
    "vllm_v2": ("vllm-project/vllm", "001430048e8175c8dff1bc57e1a81a1fa75460f9 (all2all.py) and "
                "02bd2a494f5c722c044ded73cb16e766e8007f0d (prepare_finalize/deepep_v2.py)",
                "DeepEPV2All2AllManager._make_all2all_kwargs/get_handle/max_sms_used; DeepEPV2PrepareAndFinalize."
                "_do_dispatch/_finalize (no num_sms); vllm/plugins/__init__.py (vllm.general_plugins)"),
    "megatron_hybridep": ("NVIDIA/Megatron-LM", "d98e8a64ddf34856e74b24714e3bedb2f5a39553",
                          "megatron/core/transformer/moe/fused_a2a.py L271-276, L285-347, L400-414; "
                          "token_dispatcher.py _HybridEPManager.dispatch L1150-1166; transformer_config.py L964-988"),
    "torchtitan_hybridep": ("pytorch/torchtitan", "b5bcd76c66d0acb1a08b176d9639425bc55e0b2a",
                            "torchtitan/distributed/deepep/hybridep.py L390-391 (_NUM_SMS_DISPATCH = "
                            "_NUM_SMS_COMBINE = 16), L394-452 (get_buffer), L165-174, L236, L268-274, L302-306 "
                            "(calls without SM arguments); torchtitan/models/common/token_dispatcher.py L946-963"),
}


def _where(key: str) -> str:
    repo, commit, path = CHECKED[key]
    return f"{repo}@{commit}: {path}"


def _get(cfg: Any, name: str) -> int:
    value = cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"knob {name} must be an integer, got {value!r}")
    return value


def _checked(decl: KnobSpace, op: str, cfg: Any) -> dict[str, int]:
    """The op's knobs by name; refuse a config the library rejects (the declaration's error() is the only rule)."""
    names = decl.knobs[op]
    values = {name: _get(cfg, name) for name in names}
    err = decl.error(op, Knobs.of(names, values.values()))
    if err:
        raise ValueError(f"refusing to print a {op} config {decl.library} rejects: {err}")
    return values


def _audit_line(module: str, results_path: str) -> str:
    return (f"# Check it: `from deepep_tune.runtime.{module} import audit` and `with audit({results_path!r}):` "
            "around a few steps prints which SM count each dispatch and combine ran with, and whether the tuned "
            "answer is in effect.")


# ----------------------------------------------------------------------------------------------------------
# DeepEP V2


def v2_targets(dispatch: Any, combine: Any, ep_size: int, results_path: str) -> dict[str, str]:
    n = _checked(V2, "dispatch", dispatch)["num_sms"]
    m = _checked(V2, "combine", combine)["num_sms"]
    return {"torchtitan_v2": _torchtitan_v2(n, m, ep_size, results_path),
            "sglang_v2": _sglang_v2(n, m, results_path),
            "vllm_v2": _vllm_v2(n, m, results_path)}


def _apply_v2(results_path: str, force: bool = False) -> list[str]:
    return ["from deepep_tune.runtime.elastic import apply",
            f"apply({results_path!r}{', force=True' if force else ''})"]


def _torchtitan_v2(n: int, m: int, ep: int, path: str) -> str:
    return "\n".join([
        "# torchtitan main, DeepEP V2 path (torchtitan/distributed/deepep/deepep.py): no config field or "
        "environment variable sets its SM count.",
        f"# Checked against {_where('torchtitan_v2')}; DeepEP {_where('deep_ep_v2')}.",
        "# The forward dispatch passes buffer.get_theoretical_num_sms(num_experts, topk) as num_sms= (DeepEP's "
        "bandwidth model; prefer_overlap_with_compute is left True, so no 64-SM floor), both combines pass no "
        "num_sms (DeepEP uses handle.num_sms), and the backward cached dispatch passes handle.num_sms.",
        "# In the training script, on every rank, before the first MoE forward (the buffer may already exist):",
        *_apply_v2(path),
        f"# Takes effect on {ep}-rank buffers: forward dispatch {n} SMs and backward (cached) dispatch {n} SMs; "
        f"forward combine and backward combine {m} SMs (apply fills their num_sms=0).",
        _audit_line("elastic", path),
    ])


def _sglang_v2(n: int, m: int, path: str) -> str:
    lines = [
        "# SGLang --moe-a2a-backend deepep_v2.",
        f"# Checked against {_where('sglang_v2')}.",
        "# _resolve_num_sms_qps reads SGLANG_DEEPEP_V2_NUM_SMS (os.getenv) at EVERY dispatch and EVERY combine and "
        "passes it as num_sms= to both (0: DeepEP's get_theoretical_num_sms with prefer_overlap_with_compute=False, "
        "i.e. at least 64 SMs). One variable: ONE count for both ops.",
        "# In the server's environment, before launch (decode CUDA graphs keep the count they were captured with):",
        f"export SGLANG_DEEPEP_V2_NUM_SMS={n}",
    ]
    if n == m:
        lines.append(f"# Takes effect: dispatch {n} SMs, combine {m} SMs: the tuned answer.")
    else:
        lines += [
            f"# Takes effect: dispatch {n} SMs, combine {n} SMs: NOT the tuned combine count {m}.",
            "# The tuned combine count needs deepep-tune's force mode in each scheduler process before its first "
            "dispatch (e.g. in a sitecustomize on the server's PYTHONPATH); it overwrites the num_sms= SGLang passes "
            "on every call (DeepEP re-derives num_qps), with or without the variable:",
            *[f"#   {line}" for line in _apply_v2(path, force=True)],
            f"# With it: dispatch {n} SMs, combine {m} SMs.",
        ]
    lines.append(_audit_line("elastic", path))
    return "\n".join(lines)


def _vllm_v2(n: int, m: int, path: str) -> str:
    return "\n".join([
        "# vLLM --all2all-backend deepep_v2 (DeepEPV2All2AllManager + DeepEPV2PrepareAndFinalize).",
        f"# Checked against {_where('vllm_v2')}.",
        "# vLLM passes no num_sms to dispatch or combine and has no variable for it: dispatch runs DeepEP's "
        "get_theoretical_num_sms (prefer_overlap_with_compute from VLLM_DEEPEP_V2_PREFER_OVERLAP, default 0: at "
        "least 64 SMs), combine runs handle.num_sms, and max_sms_used() (the SM budget of dual-batch overlap) is "
        "get_theoretical_num_sms, read once when the manager creates its buffer.",
        "# apply must run in EVERY vLLM process (engine core and workers are separate interpreters) before the "
        "model is built: a vllm.general_plugins entry point of a package installed beside vLLM, e.g. in its "
        "pyproject.toml",
        '#   [project.entry-points."vllm.general_plugins"]',
        '#   deepep_tune = "deepep_tune_plugin:register"',
        "# and deepep_tune_plugin.py:",
        "def register():",
        *[f"    {line}" for line in _apply_v2(path)],
        f"# Takes effect: every dispatch {n} SMs, every combine {m} SMs, max_sms_used() {n}.",
        _audit_line("elastic", path),
    ])


def deepep_v2_outputs(dispatch: Any, combine: Any, ep_size: int, w: Workload, results_path: str) -> dict[str, Any]:
    """What a deepep-v2 results file adds for its consumers: the paste targets."""
    return {"paste": v2_targets(dispatch, combine, ep_size, results_path)}


# ----------------------------------------------------------------------------------------------------------
# HybridEP

def _hybrid_values(dispatch: Any, combine: Any) -> dict[str, dict[str, int]]:
    return {"dispatch": _checked(HYBRID, "dispatch", dispatch), "combine": _checked(HYBRID, "combine", combine)}


def hybrid_env_lines(values: Mapping[str, Mapping[str, int]]) -> list[str]:
    return [f"export {name}={values[op][knob]}" for op in ("dispatch", "combine") for knob, name in ENV_OF[op].items()]


def _describe(v: Mapping[str, Mapping[str, int]]) -> str:
    d, c = v["dispatch"], v["combine"]
    return (f"dispatch {d['num_sms']} SMs, {d['tokens_per_chunk']} tokens per chunk, {d['stages']} stages; combine "
            f"{c['num_sms']} SMs, {c['tokens_per_chunk']} tokens per chunk, {c['g2s_stages']} G2S stages")


_ENV_NOTE = ("# The chunk and stage values are HybridEP's own environment variables, read at every dispatch that "
             "makes a new handle (backward calls reuse the forward's handle); HybridEP lowers a stage count until "
             "shared memory fits, as it did while tuning.")


def _fused_note(v: Mapping[str, Mapping[str, int]]) -> list[str]:
    """HybridEP's fused permute needs the dispatch, combine and preprocessing chunks equal (benchmarks/next_gen/
    API_NOTES.md, read from config.cuh at 94a9f8f); the preprocessing chunk is not a tuned knob (default 64)."""
    d, c = v["dispatch"]["tokens_per_chunk"], v["combine"]["tokens_per_chunk"]
    if d != c:
        return ["# Fused permute (--moe-permute-fusion-into-hybridep) needs equal dispatch, combine and preprocessing "
                "chunks in HybridEP; these tuned chunks differ, so keep the fused permute off."]
    if d != 64:
        return ["# Fused permute (--moe-permute-fusion-into-hybridep) needs the preprocessing chunk equal to these "
                f"two (its default is 64): then also export NUM_OF_TOKENS_PER_CHUNK_PREPROCESSING_API={d}."]
    return []


def _apply_hybrid(results_path: str) -> list[str]:
    return ["from deepep_tune.runtime.hybrid import apply", f"apply({results_path!r})"]


def hybrid_targets(dispatch: Any, combine: Any, ep_size: int, results_path: str) -> dict[str, str]:
    v = _hybrid_values(dispatch, combine)
    return {"megatron_hybridep": _megatron(v, ep_size, results_path),
            "torchtitan_hybridep": _torchtitan_hybrid(v, ep_size, results_path)}


def _megatron(v: Mapping[str, Mapping[str, int]], ep: int, path: str) -> str:
    sd, sc = v["dispatch"]["num_sms"], v["combine"]["num_sms"]
    lines = [
        "# Megatron-LM --moe-token-dispatcher-type flex --moe-flex-dispatcher-backend hybridep.",
        f"# Checked against {_where('megatron_hybridep')}; HybridEP {_where('deep_ep_hybrid')}.",
        "# _HybridEPManager passes moe_flex_dispatcher_num_sms as BOTH num_sms_dispatch_api and num_sms_combine_api; "
        "they are used once, when fused_a2a builds its HybridEPBuffer at the first MoE forward (unset: HybridEP's "
        "default, 24 and 24 on one node).",
        _ENV_NOTE,
        "# In the launch environment of every rank:",
        *hybrid_env_lines(v),
    ]
    if sd == sc:
        lines += [f"--moe-flex-dispatcher-num-sms {sd}",
                  f"# Takes effect on {ep}-rank buffers: {_describe(v)}: the tuned answer."]
    else:
        lines += [
            f"# --moe-flex-dispatcher-num-sms sets ONE count for both ops: with --moe-flex-dispatcher-num-sms {sd} the "
            f"combine runs {sd} SMs, NOT the tuned {sc}. For both tuned counts, in the training script on every rank "
            "before the first MoE forward (fused_a2a bound HybridEPBuffer at import, but its constructor is looked up "
            "on the class, which apply wraps; apply also sets the variables above):",
            *_apply_hybrid(path),
            f"# Takes effect on {ep}-rank buffers: {_describe(v)}, whatever --moe-flex-dispatcher-num-sms says.",
        ]
    lines += _fused_note(v)
    lines.append(_audit_line("hybrid", path))
    return "\n".join(lines)


def _torchtitan_hybrid(v: Mapping[str, Mapping[str, int]], ep: int, path: str) -> str:
    return "\n".join([
        "# torchtitan main, HybridEP path (torchtitan/distributed/deepep/hybridep.py).",
        f"# Checked against {_where('torchtitan_hybridep')}; HybridEP {_where('deep_ep_hybrid')}.",
        "# The SM counts are the module constants _NUM_SMS_DISPATCH = _NUM_SMS_COMBINE = 16, passed to HybridEPBuffer "
        "when init_buffer builds it while the model is parallelized; no config field or environment variable changes "
        "them, so they need apply.",
        _ENV_NOTE,
        "# In the training script on every rank, before the model is parallelized (a buffer that already exists on "
        "one node is updated, and the next forward uses the tuned values):",
        *_apply_hybrid(path),
        f"# Takes effect on {ep}-rank buffers, forward and backward: {_describe(v)}.",
        "# apply sets these variables itself; exporting them instead only sets the chunks and stages:",
        *[f"# {line}" for line in hybrid_env_lines(v)],
        _audit_line("hybrid", path),
    ])


def hybridep_outputs(dispatch: Any, combine: Any, ep_size: int, w: Workload, results_path: str) -> dict[str, Any]:
    """What a hybridep results file adds for its consumers: the paste targets."""
    return {"paste": hybrid_targets(dispatch, combine, ep_size, results_path)}


# For report.paste.LIBRARY_OUTPUTS (the lead wires them there).
LIBRARY_OUTPUTS_NEXT = {"deepep-v2": deepep_v2_outputs, "hybridep": hybridep_outputs}
