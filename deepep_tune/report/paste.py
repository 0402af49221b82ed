"""Paste targets: for each consumer of a tuned DeepEP config (and each code layout of it), the text to paste and
exactly what of it takes effect there. One definition per format.

Every claim below was checked against the consumer's code at the commit named in CHECKED; tests/consumers/ holds
CPU transcriptions of those code paths and tests/test_paste.py feeds these texts through them. Where a consumer
calls deep_ep.Buffer.dispatch/combine without `config=`, chunk and buffer values reach DeepEP only through the
runtime hook deepep_tune.apply (it replaces Buffer.get_dispatch_config/get_combine_config and sets
Buffer.set_num_sms before the consumer creates its Buffer).
"""

from __future__ import annotations

from typing import Any

from ..deepep.buffer import nvl_bytes, nvl_bytes_needed, nvl_size_hint
from ..deepep.config import SUPPORTED_RANKS, ConfigArgs, TuneConfig, deepep_default
from ..deepep.workload import Workload
from ..knobs import Knobs
from .paste_next import deepep_v2_outputs, hybridep_outputs

# The consumer code each target was checked against: (repository, commit, file[:lines]).
CHECKED = {
    "deep_ep": ("deepseek-ai/DeepEP", "v1.2.1 (9af0e0d)", "deep_ep/buffer.py L373, L435 (config=None -> get_*_config)"),
    "torchtitan_fork_class_attrs": (
        "NousResearch/torchtitan", "8b4b03d3b2e3f0c9b71f9c97e65a85cc477ce7c0",
        "torchtitan/distributed/deepep/utils.py (PrimusTurboDeepepManager, DeepEPTokenDispatcher); fused_a2a.py as "
        "in pytorch/torchtitan@0c9c4c035fbeb950797565a32880723fd2236b87"),
    "torchtitan_fork_deepep_section": (
        "NousResearch/torchtitan", "1f8691ac44a495010ca3c5bd18839f4d4c4ba329",
        "torchtitan/distributed/deepep/deepep.py (run_deepep_autotune_if_enabled, setup_deepep); [deepep] fields "
        "in torchtitan/config/job_config.py@760344338ab781c11705494570fd80e96ee0d556"),
    "sglang": ("sgl-project/sglang", "003a81bf2870c07b110de13641ad4f0ba63b1fa1",
               "python/sglang/srt/layers/moe/token_dispatcher/deepep.py (DeepEPConfig, DeepEPBuffer, "
               "_DeepEPDispatcherImplNormal)"),
    "primus": ("AMD-AGI/Primus", "fd1eeabbad15135e3702094087e96142b4b4eacb",
               "primus/backends/megatron/core/extensions/primus_turbo.py L2356-2367"),
}

# The NousResearch fork's hard-coded intranode chunks when autotune = false (deepep.py@1f8691ac,
# run_deepep_autotune_if_enabled: default_dispatch = (6, nvl_buffer), default_combine = (4, nvl_buffer)).
FORK_SECTION_CHUNKS = {"dispatch": 6, "combine": 4}
# PrimusTurboDeepepManager.__init__(deep_num_cus=32): DeepEPTokenDispatcher does not pass it.
FORK_MANAGER_NUM_CUS = 32
# vLLM's VLLM_DEEPEP_BUFFER_SIZE_MB default (MiB per rank for the NVL buffer).
VLLM_DEFAULT_MB = 1024
MIB = 2**20


def _check(dispatch: Knobs, combine: Knobs, ep_size: int | None = None) -> None:
    """Refuse to print configs DeepEP rejects (space.config_error is the only validity rule)."""
    for op, cfg in (("dispatch", dispatch), ("combine", combine)):
        err = ConfigArgs.of(cfg).error()
        if err:
            raise ValueError(f"refusing to print a {op} config DeepEP rejects: {err}")
    if dispatch.num_sms != combine.num_sms:
        raise ValueError(f"dispatch num_sms {dispatch.num_sms} != combine num_sms {combine.num_sms}: one dispatch "
                         "handle fixes num_sms for its combine, and SGLang asserts they are equal")
    if ep_size is not None and ep_size not in SUPPORTED_RANKS:
        raise ValueError(f"ep_size {ep_size} is not an intranode rank count this tool tunes ({SUPPORTED_RANKS})")


def _cfg(cfg: Knobs) -> str:
    """How DeepEP would be called: the five Config arguments."""
    return f"Config{ConfigArgs.of(cfg).as_tuple()}"


def _knobs(cfg: Knobs) -> str:
    return f"(num_sms {cfg.num_sms}, nvl_chunk {cfg.nvl_chunk}, nvl_buffer {cfg.nvl_buffer})"


def _where(key: str) -> str:
    repo, commit, path = CHECKED[key]
    return f"{repo}@{commit}: {path}"


def sglang_config(dispatch: Knobs, combine: Knobs) -> dict[str, dict[str, int]]:
    """What SGLang's --deepep-config reads: Config(**normal_dispatch) and Config(**normal_combine)."""
    _check(dispatch, combine)
    return {"normal_dispatch": ConfigArgs.of(dispatch).kwargs(), "normal_combine": ConfigArgs.of(combine).kwargs()}


def sglang_of(results: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The part of a results file SGLang reads (the _sglang.json file, the printed JSON)."""
    return {k: results[k] for k in ("normal_dispatch", "normal_combine")}


def fork_section_values(dispatch: Knobs, combine: Knobs) -> dict[str, int]:
    """The [deepep] values printed for the fork's section layout. It has one nvl_buffer_size for both ops; the
    larger tuned one is printed (never a buffer smaller than either op was tuned with)."""
    return {"num_sms": dispatch.num_sms, "nvl_buffer_size": max(dispatch.nvl_buffer, combine.nvl_buffer)}


def fork_section_runs(dispatch: Knobs, combine: Knobs) -> dict[str, Knobs]:
    """The configs the fork's [deepep] layout runs with the printed values (its chunks are hard-coded)."""
    v = fork_section_values(dispatch, combine)
    return {op: TuneConfig(v["num_sms"], FORK_SECTION_CHUNKS[op], v["nvl_buffer_size"]) for op in ("dispatch", "combine")}


def paste_targets(dispatch: Knobs, combine: Knobs, ep_size: int, w: Workload,
                  results_path: str) -> dict[str, str]:
    """One text per consumer and code layout, keyed by a stable id."""
    _check(dispatch, combine, ep_size)
    # A dict display evaluates in order: the fork-section check below raises before the SGLang text is built.
    return {
        "deep_ep_buffer": _deep_ep_buffer_text(dispatch, combine, ep_size, results_path),
        "torchtitan_fork_class_attrs": _fork_class_attrs_text(dispatch, combine, ep_size, results_path),
        "torchtitan_fork_deepep_section": _fork_section_text(dispatch, combine, results_path),
        "sglang": _sglang_text(dispatch, combine, w, results_path),
        "primus": _primus_text(),
    }


# --- lines shared by the targets that rely on deepep_tune.apply ---------------------------------------------------
def _apply_lines(results_path: str) -> list[str]:
    return ["from deepep_tune.apply import apply",
            f"apply({results_path!r})  # before the consumer creates its deep_ep.Buffer"]


def _audit_line(results_path: str) -> str:
    return (f"# Check it: DEEPEP_TUNE_AUDIT={results_path} (site hook: PYTHONPATH=$(python -m deepep_tune.audit "
            f"--pythonpath)) or `with deepep_tune.audit.audit({results_path!r}):` prints whether the tuned "
            "config is in effect.")


def _tuned_runs_line(dispatch: Knobs, combine: Knobs, ep_size: int) -> str:
    return (f"# With it, ep{ep_size} dispatch runs {_cfg(dispatch)} and combine runs {_cfg(combine)} "
            "(forward and backward), and a Buffer sized from the getters is sized for them.")


# --- one text per target --------------------------------------------------------------------------------------
def _deep_ep_buffer_text(dispatch: Knobs, combine: Knobs, ep_size: int, results_path: str) -> str:
    return "\n".join([
        "# Code calling deep_ep.Buffer.dispatch/combine WITHOUT config= (torchtitan v1-era upstream "
        "torchtitan/distributed/deepep/deepep.py, Megatron-Core fused_a2a, vLLM, the NousResearch fork's "
        "class-attribute layout).",
        f"# Checked against {_where('deep_ep')}: such calls run Buffer.get_dispatch_config/get_combine_config"
        "(group size), and these frameworks also size their Buffer from those getters.",
        *_apply_lines(results_path),
        _tuned_runs_line(dispatch, combine, ep_size),
        "# Calls that pass config= explicitly bypass the getters: there only Buffer.num_sms changes.",
        _audit_line(results_path),
    ])


def _fork_class_attrs_text(dispatch: Knobs, combine: Knobs, ep_size: int, results_path: str) -> str:
    sms = dispatch.num_sms
    # Only num_cus takes effect here, so without apply the chunks and buffers are DeepEP's defaults at that num_sms.
    default_d, default_c = deepep_default("dispatch", ep_size, sms), deepep_default("combine", ep_size, sms)
    return "\n".join([
        "# NousResearch torchtitan fork, class-attribute layout (DeepEPTokenDispatcher.turbo_deepep_* in "
        "torchtitan/distributed/deepep/utils.py).",
        f"# Checked against {_where('torchtitan_fork_class_attrs')}.",
        "# Only turbo_deepep_num_cus takes effect: DeepEPTokenDispatcher.__init__ calls set_deepep_num_sms() -> "
        "Buffer.set_num_sms().",
        f"turbo_deepep_num_cus = {sms}",
        "# turbo_deepep_dispatch_tuned_config / turbo_deepep_combine_tuned_config are IGNORED: PrimusTurboDeepepManager "
        f"builds Config(deep_num_cus={FORK_MANAGER_NUM_CUS}, *tuple) from them but calls fused_dispatch/fused_combine "
        "without it, so DeepEP picks its default table.",
        "# Leave them as they are (they are still built, so they must pass Config's checks).",
        f"# With only the line above, ep{ep_size} dispatch runs {_cfg(default_d)} and combine runs "
        f"{_cfg(default_c)}: DeepEP's default chunk and buffer, not the tuned ones.",
        "# For the tuned chunk and buffer values, add before the first MoE forward (fused_a2a.get_buffer creates "
        "the Buffer lazily):",
        *_apply_lines(results_path),
        _tuned_runs_line(dispatch, combine, ep_size),
        _audit_line(results_path),
    ])


def _fork_section_text(dispatch: Knobs, combine: Knobs, results_path: str) -> str:
    section = fork_section_values(dispatch, combine)
    runs = fork_section_runs(dispatch, combine)
    # The fork builds its own configs from the printed values (hard-coded chunks): refuse values it would reject.
    for op, cfg in runs.items():
        err = ConfigArgs.of(cfg).error()
        if err:
            raise ValueError(f"refusing to print [deepep] values the fork would turn into a rejected {op} config: {err}")
    differ = dispatch.nvl_buffer != combine.nvl_buffer
    return "\n".join([
        "# NousResearch torchtitan fork, [deepep] job-config layout (torchtitan/distributed/deepep/deepep.py).",
        f"# Checked against {_where('torchtitan_fork_deepep_section')}.",
        "# With autotune = false, run_deepep_autotune_if_enabled() calls Buffer.set_num_sms(num_sms) and "
        f"set_tuned_configs(Config(num_sms, {FORK_SECTION_CHUNKS['dispatch']}, nvl_buffer_size), "
        f"Config(num_sms, {FORK_SECTION_CHUNKS['combine']}, nvl_buffer_size)); those are passed as config= to every "
        "dispatch and combine, forward and backward.",
        "# The section has no chunk fields (the chunks are hard-coded) and one nvl_buffer_size for both ops.",
        "[deepep]",
        "autotune = false",
        f"num_sms = {section['num_sms']}",
        f"nvl_buffer_size = {section['nvl_buffer_size']}"
        + (f"  # dispatch was tuned at {dispatch.nvl_buffer}, combine at {combine.nvl_buffer}; one value serves both"
           if differ else ""),
        f"# What runs: dispatch {_cfg(runs['dispatch'])}, combine {_cfg(runs['combine'])}; "
        f"NOT the tuned dispatch {_knobs(dispatch)} / combine {_knobs(combine)}.",
        "# deepep_tune.apply alone does not change these calls (they pass config=); it only changes how get_buffer "
        "sizes the Buffer.",
        "# To run the tuned chunks this layout needs a code change, after setup_deepep() has run:",
        "#   import deep_ep; from torchtitan.distributed.deepep import deepep as tt_deepep",
        f"#   tt_deepep.set_tuned_configs(deep_ep.{_cfg(dispatch)}, deep_ep.{_cfg(combine)})",
        f"#   together with apply({results_path!r}) before the Buffer is created, so that get_buffer sizes it for them.",
    ])


def _sglang_text(dispatch: Knobs, combine: Knobs, w: Workload, results_path: str) -> str:
    sg = sglang_config(dispatch, combine)
    inline = ('{"normal_dispatch": ' + _json(sg["normal_dispatch"]) + ', "normal_combine": '
              + _json(sg["normal_combine"]) + "}")
    return "\n".join([
        "# SGLang --deepep-config (a JSON string or a file path; it reads only normal_dispatch and normal_combine).",
        f"# Checked against {_where('sglang')}.",
        "# DeepEPConfig builds deep_ep.Config(**normal_dispatch) and Config(**normal_combine), asserts equal num_sms, "
        "passes them as config= to every normal-mode dispatch/combine, sizes its Buffer from their "
        "get_nvl_buffer_size_hint, and uses num_sms as num_qps_per_rank. Low-latency (decode) kernels do not use them.",
        f"--deepep-config {results_path}",
        f"# or inline: --deepep-config '{inline}'",
        f"# Takes effect: dispatch {_cfg(dispatch)}, combine {_cfg(combine)}.",
        "# DeepGEMM: when SGLang's DeepGEMM JIT is enabled, normal dispatch uses expert_alignment=128, and the tokens "
        "are FP8 unless the MoE runner is cutlass or the DeepEP output dtype is BF16.",
        _sglang_deepgemm_line(w),
    ])


def _sglang_deepgemm_line(w: Workload) -> str:
    """SGLang's dispatch workload depends on whether DeepGEMM is on: say which one these results fit."""
    if w.dispatch_dtype == "fp8" and w.expert_alignment == 128:
        return ("# These results were tuned with FP8 dispatch and expert_alignment 128, i.e. for SGLang's DeepGEMM "
                "path. With DeepGEMM off, SGLang dispatches BF16 with expert_alignment 1: re-tune with "
                "--dispatch-dtype bf16 --expert-alignment 1.")
    return (f"# These results were tuned with {w.dispatch_dtype.upper()} dispatch and expert_alignment "
            f"{w.expert_alignment}. With DeepGEMM on, SGLang dispatches FP8 (128-wide scales) with "
            "expert_alignment=128: re-tune with --dispatch-dtype fp8 --expert-alignment 128 for that workload.")


def _primus_text() -> str:
    return "\n".join([
        "# AMD Primus: only a CU count is consumed.",
        f"# Checked against {_where('primus')}: --turbo_deepep_num_cu is passed as deepep_num_use_cu to "
        "primus_turbo's DeepEPTokenDispatcher; no chunk or buffer value is read.",
        "# Its DeepEP is primus_turbo's ROCm port on AMD GPUs: configs tuned on NVIDIA GPUs (H100 and others) do not "
        "transfer. Nothing from these results applies; tune turbo_deepep_num_cu on the AMD hardware itself.",
    ])


def _json(d: dict[str, int]) -> str:
    return "{" + ", ".join(f'"{k}": {v}' for k, v in d.items()) + "}"


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def _fits(have: int, need: int, who: str, fix: str) -> str:
    if have >= need:
        return f"{who}: allocates {_mib(have)} ({have} B) >= {_mib(need)} needed: fits"
    return f"WARNING {who}: allocates {_mib(have)} ({have} B) < {_mib(need)} needed: too small; {fix}"


def _hint(a: Knobs, b: Knobs, hidden_bytes: int, ep_size: int) -> int:
    """max over the two configs' get_nvl_buffer_size_hint: how torchtitan, Megatron and SGLang size the Buffer."""
    return max(nvl_size_hint(a, hidden_bytes, ep_size), nvl_size_hint(b, hidden_bytes, ep_size))


def buffer_notes(dispatch: Knobs, combine: Knobs, ep_size: int, w: Workload) -> list[str]:
    """What each consumer allocates for the NVL buffer (bytes per rank) against what the tuned configs need,
    with a WARNING line for every allocation that is too small."""
    _check(dispatch, combine, ep_size)
    need = nvl_bytes_needed(dispatch, combine, w, ep_size)
    needed = max(need["dispatch"], need["combine"])
    hb = w.hidden * max(w.elem_size, 2)  # get_hidden_bytes() in torchtitan / Megatron: x.size(1) * max(elem, 2)
    notes = [f"tuned configs need num_nvl_bytes >= {needed} ({_mib(needed)}) per rank for ep{ep_size} "
             f"(dispatch {need['dispatch']} B, combine {need['combine']} B)"]

    default20 = _hint(deepep_default("dispatch", ep_size), deepep_default("combine", ep_size), hb, ep_size)
    notes.append(_fits(default20, needed, "a Buffer sized for DeepEP's default configs (Buffer.num_sms 20: "
                       "torchtitan v1-era upstream, Megatron-Core, without apply)",
                       "call deepep_tune.apply before the Buffer is created"))
    notes.append(_fits(_hint(dispatch, combine, hb, ep_size), needed,
                       "with deepep_tune.apply (the getters return the tuned configs)", "re-tune or enlarge the buffer"))

    sgl_hb = w.hidden * (1 if w.dispatch_dtype == "fp8" else 2)  # DeepEPBuffer: hidden_size * params_bytes
    notes.append(_fits(_hint(dispatch, combine, sgl_hb, ep_size), needed,
                       f"SGLang (hint of the --deepep-config configs, hidden_bytes = hidden * "
                       f"{1 if w.dispatch_dtype == 'fp8' else 2} for {w.dispatch_dtype} dispatch)",
                       "SGLang sizes its Buffer from these configs' hint: pick a config with a smaller nvl_buffer or fewer SMs"))

    vllm = VLLM_DEFAULT_MB * MIB
    notes.append(_fits(vllm, needed, f"vLLM default VLLM_DEEPEP_BUFFER_SIZE_MB={VLLM_DEFAULT_MB}",
                       f"set VLLM_DEEPEP_BUFFER_SIZE_MB >= {-(-needed // MIB)}"))

    runs = fork_section_runs(dispatch, combine)
    sec_need = max(nvl_bytes("dispatch", runs["dispatch"], ep_size, w), nvl_bytes("combine", runs["combine"], ep_size, w))
    sec_have = _hint(deepep_default("dispatch", ep_size, dispatch.num_sms),
                     deepep_default("combine", ep_size, dispatch.num_sms), w.hidden * 2, ep_size)
    notes.append(_fits(sec_have, sec_need,
                       f"the fork's [deepep] layout (get_buffer sizes from DeepEP's default table at num_sms "
                       f"{dispatch.num_sms}; it runs dispatch {_knobs(runs['dispatch'])}, combine "
                       f"{_knobs(runs['combine'])})",
                       "lower nvl_buffer_size"))
    return notes


def deepep_v1_outputs(dispatch: Knobs, combine: Knobs, ep_size: int, w: Workload, results_path: str) -> dict[str, Any]:
    """What a DeepEP v1 results file adds for its consumers: the NVL bytes the answer needs, every paste target,
    and SGLang's normal_dispatch/normal_combine at the top level (the file loads with --deepep-config as is)."""
    nvl = nvl_bytes_needed(dispatch, combine, w, ep_size)
    hb = w.hidden * max(w.elem_size, 2)
    nvl["size_hint"] = max(nvl_size_hint(dispatch, hb, ep_size), nvl_size_hint(combine, hb, ep_size))
    stem = results_path[:-len(".json")] if results_path.endswith(".json") else results_path
    return {"nvl_buffer_bytes": nvl,
            "paste": {**paste_targets(dispatch, combine, ep_size, w, results_path),
                      "buffer_notes": buffer_notes(dispatch, combine, ep_size, w), "sglang_file": f"{stem}_sglang.json"},
            **sglang_config(dispatch, combine)}


# Per library: the consumers' paste targets. A library without an entry has none yet (its results still hold the
# answer, the tables and the comparison).
LIBRARY_OUTPUTS = {"deepep-v1": deepep_v1_outputs, "deepep-v2": deepep_v2_outputs, "hybridep": hybridep_outputs}


def library_outputs(library: str, dispatch: Knobs, combine: Knobs, ep_size: int, w: Workload,
                    results_path: str) -> dict[str, Any]:
    make = LIBRARY_OUTPUTS.get(library)
    if make is None:
        return {"paste": {"note": f"no paste targets for {library} yet: the answer is in best.dispatch/best.combine"}}
    return make(dispatch, combine, ep_size, w, results_path)
