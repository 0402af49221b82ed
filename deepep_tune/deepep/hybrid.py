"""NVIDIA HybridEP's knobs (deep_ep.HybridEPBuffer, DeepEP branch hybrid-ep @94a9f8f): what one candidate sets,
HybridEP's own validity rules, the grid, and the baselines. No tuning logic and no torch (the launcher imports it).

Where each knob lives (benchmarks/next_gen/API_NOTES.md §2, csrc/hybrid_ep/config.cuh):
- num_sms: CUDA blocks of the op's comm kernel, `buffer_config.num_of_blocks_{dispatch,combine}_api` (constructor
  arguments num_sms_dispatch_api / num_sms_combine_api). Copied into every new handle at a non-cached dispatch; the
  handle's copy is what the dispatch, the cached dispatch and the combines that use the handle launch with.
- tokens_per_chunk, stages, g2s_stages: environment variables that Configurer.get_default_config() reads at every
  non-cached dispatch (the docs' "Performance Tuning Parameters"; API_NOTES: changed at run time on 2x H200):
  dispatch NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API / NUM_OF_STAGES_DISPATCH_API, combine
  NUM_OF_TOKENS_PER_CHUNK_COMBINE_API / NUM_OF_STAGES_G2S_COMBINE_API.

Left out on purpose: num_blocks_permute/unpermute (only dispatch_with_permute/combine_with_unpermute launch the
permute kernels, and the backend times plain dispatch/combine: the comm kernels these knobs tune are the same in
both, while the permute kernel is a separate grid-stride kernel after the comm kernel, default 16 x device SMs);
the preprocessing blocks/chunk (one kernel per non-cached dispatch, fixed 108 blocks, not an SM budget of the
comm kernels); NUM_OF_STAGES_S2G_COMBINE_API and the in-flight counts (clamped below the stages anyway).

Every distinct config is a JIT compile of 5-10 s per process (HybridEP caches kernels per process only), so the
grid is small on purpose."""

from __future__ import annotations

from typing import Any, Mapping

from ..knobs import SMS, Baseline, Knobs, KnobSpace

KNOBS = {"dispatch": (SMS, "tokens_per_chunk", "stages"), "combine": (SMS, "tokens_per_chunk", "g2s_stages")}

# HybridEP's defaults on one NVLink domain (config.cuh Configurer: SMs 24; get_default_config: chunks 64, stages 10).
DEFAULT_SMS = 24
DEFAULT_CHUNK = 64
DEFAULT_STAGES = 10
TORCHTITAN_SMS = 16  # torchtitan main b5bcd76 hybridep.py L390-391: _NUM_SMS_DISPATCH = _NUM_SMS_COMBINE = 16

# Knob -> the buffer_config field (SMs) or environment variable HybridEP reads it from, per op.
SMS_FIELD = {"dispatch": "num_of_blocks_dispatch_api", "combine": "num_of_blocks_combine_api"}
ENV = {
    "dispatch": {"tokens_per_chunk": "NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API", "stages": "NUM_OF_STAGES_DISPATCH_API"},
    "combine": {"tokens_per_chunk": "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", "g2s_stages": "NUM_OF_STAGES_G2S_COMBINE_API"},
}
# Knob -> the field of the handle's HybridEpConfigInstance (handle[6]) that shows what really ran.
HANDLE_FIELD = {
    "dispatch": {SMS: "num_of_blocks_dispatch_api", "tokens_per_chunk": "num_of_tokens_per_chunk_dispatch_api",
                 "stages": "num_of_stages_dispatch_api"},
    "combine": {SMS: "num_of_blocks_combine_api", "tokens_per_chunk": "num_of_tokens_per_chunk_combine_api",
                "g2s_stages": "num_of_stages_g2s_combine_api"},
}

GRID_SMS = (8, 16, 24, 32, 48, 64)
CHUNKS = (64, 128)  # the default and the README's suggestion ("try 128 when the fused path is not used")
DISPATCH_STAGES = (DEFAULT_STAGES, 14)  # the default and a deeper pipeline (6 measured slower on 2x H200)
G2S_STAGES = (DEFAULT_STAGES, 12)  # 12 is the deepest even value that fits DeepSeek-V3's hidden 7168 on Hopper

# cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200 (227 KiB); B200 has the same.
HOPPER_MAX_SMEM = 232_448
S2G_STAGES = 2  # NUM_OF_STAGES_S2G_COMBINE_API default (not a knob)


def config_error(op: str, cfg: Knobs) -> str | None:
    """Why HybridEP would refuse cfg (or run something else), or None. csrc/hybrid_ep/config.cuh and the kernels'
    static_asserts: a chunk is read as uint4 words of a bool map (chunk % 16; implies BufferConfig's
    (chunk * ranks) % 4 and combine's chunk % tokens-per-group 4); stages >= 2 (MIN_STAGES); combine stages even
    (two data pipelines per block). More SMs than the device has is excluded by the grid's sms_cap and refused by
    the backend before any call (the Configurer's C assert would abort the process)."""
    sms, chunk = getattr(cfg, SMS), cfg.tokens_per_chunk
    if sms <= 0:
        return f"num_sms={sms} must be positive"
    if chunk <= 0 or chunk % 16:
        return f"tokens_per_chunk={chunk} must be a positive multiple of 16 (read as 16-byte words)"
    stages = cfg.stages if op == "dispatch" else cfg.g2s_stages
    if stages < 2:
        return f"{op} stages={stages} must be >= 2"
    if op == "combine" and stages % 2:
        return f"g2s_stages={stages} must be even (two data pipelines per block)"
    return None


def smem_bytes(op: str, cfg: Knobs, ranks: int, hidden: int, num_experts: int) -> int:
    """Dynamic shared memory of the op's kernel, as config.cuh compute_smem_sizes() (one node, bf16, with probs:
    the timed forward dispatch carries probs and the backward combine returns them)."""
    def up(x: int, a: int) -> int:
        return -(-x // a) * a

    probs = num_experts * 4  # intranode: num_of_experts_per_rank * num_of_ranks_per_node floats per token
    if op == "dispatch":
        s = cfg.stages
        off = up(s * hidden * 2, 128)
        off = up(off, 128) + 2 * cfg.tokens_per_chunk * ranks * 4
        off = up(off, 16) + s * probs
        off = up(off, 8) + s * 16 + 16 + 8
        return up(off, 128)
    g2s, s2g = cfg.g2s_stages, S2G_STAGES
    off = up(g2s * hidden * 2, 128)
    off = up(off, 128) + s2g * hidden * 2
    off = up(off, 16) + g2s * probs
    off = up(off, 16) + s2g * probs
    off = up(off, 8) + g2s * 16
    return up(off + g2s, 128)


def fits(op: str, cfg: Knobs, ep_size: int, workload: Any, max_buffer_bytes: float) -> str | None:
    """A config whose stages do not fit Hopper's shared memory: HybridEP would silently run fewer stages
    (Configurer.adjust_template), so the measurement would be of another config."""
    need = smem_bytes(op, cfg, ep_size, workload.hidden, workload.num_experts)
    if need > HOPPER_MAX_SMEM:
        return f"{need} B of shared memory at hidden {workload.hidden}: over the {HOPPER_MAX_SMEM} B a block may use"
    return None


def grid(sms_cap: int) -> dict[str, dict[str, tuple[int, ...]]]:
    sms = tuple(s for s in GRID_SMS if s <= sms_cap)
    return {"dispatch": {SMS: sms, "tokens_per_chunk": CHUNKS, "stages": DISPATCH_STAGES},
            "combine": {SMS: sms, "tokens_per_chunk": CHUNKS, "g2s_stages": G2S_STAGES}}


def default_config(op: str, num_sms: int = DEFAULT_SMS) -> Knobs:
    """HybridEP's own chunk and stages at num_sms."""
    return Knobs.of(KNOBS[op], (num_sms, DEFAULT_CHUNK, DEFAULT_STAGES))


def probe(op: str, configs: list[Knobs]) -> Knobs:
    """Quick mode's first config at an SM count: HybridEP's defaults, or the nearest config present."""
    want = default_config(op, getattr(configs[0], SMS))
    return min(configs, key=lambda c: (tuple(abs(a - b) for a, b in zip(c.values, want.values)), c))


def baselines(ep_size: int, answer_sms: int, facts: Mapping[str, Any]) -> list[Baseline]:
    """HybridEP with no SM arguments (Megatron's default: moe_flex_dispatcher_num_sms None), and torchtitan's
    hard-coded 16/16; both at HybridEP's default chunks and stages. facts["default_sms"]: what the installed
    HybridEP chose when the backend constructed its buffer without SM arguments."""
    sms = int(facts.get("default_sms") or DEFAULT_SMS)
    return [
        Baseline("hybridep_default", f"HybridEPBuffer without SM arguments ({sms}/{sms} SMs on one node; Megatron's "
                                     f"default), chunk {DEFAULT_CHUNK}, stages {DEFAULT_STAGES}",
                 default_config("dispatch", sms), default_config("combine", sms)),
        Baseline("torchtitan_16sms", f"torchtitan's HybridEP path: {TORCHTITAN_SMS}/{TORCHTITAN_SMS} SMs hard-coded, "
                                     "HybridEP's default chunk and stages",
                 default_config("dispatch", TORCHTITAN_SMS), default_config("combine", TORCHTITAN_SMS)),
    ]


def settings_of(op: str, cfg: Knobs) -> dict[str, int]:
    """The environment variables a candidate sets (its SM count goes to buffer_config instead)."""
    return {var: int(getattr(cfg, knob)) for knob, var in ENV[op].items()}


HYBRID = KnobSpace(
    library="hybridep",
    knobs=KNOBS,
    shared=(),  # each op has its own SMs, chunk and stages (one handle carries both ops' values)
    grid=grid,
    error=config_error,
    baselines=baselines,
    layer_baselines=("hybridep_default", "torchtitan_16sms"),  # as shipped (Megatron); torchtitan's hard-coded SMs
    fits=fits,
    probe=probe,
    notes={"api": "deep_ep.HybridEPBuffer(num_sms_dispatch_api=, num_sms_combine_api=) plus environment "
                  "NUM_OF_TOKENS_PER_CHUNK_{DISPATCH,COMBINE}_API, NUM_OF_STAGES_DISPATCH_API, "
                  "NUM_OF_STAGES_G2S_COMBINE_API (DeepEP branch hybrid-ep)",
           "timed": "dispatch/combine without permute (the comm kernels); not dispatch_with_permute"},
)
