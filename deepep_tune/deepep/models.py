"""Model presets: the MoE shapes of public models, from each model's config.json on the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden: int
    num_topk: int
    num_experts: int
    source: str  # config.json fields the values come from
    moe_intermediate: int | None = None
    """Routed expert FFN width (config.json moe_intermediate_size; Mixtral and gpt-oss: intermediate_size)."""
    num_shared_experts: int = 0
    shared_intermediate: int = 0
    """Width of one shared expert (DeepSeek: moe_intermediate_size; they run as one FFN of n_shared x this)."""


PRESETS = {p.name.lower(): p for p in [
    ModelPreset("DeepSeek-V3", 7168, 8, 256,
                "deepseek-ai/DeepSeek-V3 config.json: hidden_size, num_experts_per_tok, n_routed_experts, "
                "moe_intermediate_size, n_shared_experts",
                moe_intermediate=2048, num_shared_experts=1, shared_intermediate=2048),
    ModelPreset("DeepSeek-V2-Lite", 2048, 6, 64,
                "deepseek-ai/DeepSeek-V2-Lite config.json: hidden_size, num_experts_per_tok, n_routed_experts, "
                "moe_intermediate_size, n_shared_experts",
                moe_intermediate=1408, num_shared_experts=2, shared_intermediate=1408),
    ModelPreset("Qwen3-30B-A3B", 2048, 8, 128,
                "Qwen/Qwen3-30B-A3B config.json: hidden_size, num_experts_per_tok, num_experts, "
                "moe_intermediate_size (no shared experts)",
                moe_intermediate=768),
    ModelPreset("Qwen3-235B-A22B", 4096, 8, 128,
                "Qwen/Qwen3-235B-A22B config.json: hidden_size, num_experts_per_tok, num_experts, "
                "moe_intermediate_size (no shared experts)",
                moe_intermediate=1536),
    ModelPreset("Mixtral-8x7B", 4096, 2, 8,
                "mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size, num_experts_per_tok, num_local_experts, "
                "intermediate_size (no shared experts)",
                moe_intermediate=14336),
    ModelPreset("gpt-oss-120b", 2880, 4, 128,
                "openai/gpt-oss-120b config.json: hidden_size, experts_per_token, num_local_experts, "
                "intermediate_size (no shared experts; its experts use a clamped SwiGLU with biases, the layer "
                "check times a plain SiLU-gated FFN of the same size)",
                moe_intermediate=2880),
]}


def find_preset(name: str) -> ModelPreset | None:
    return PRESETS.get(name.lower())


def preset_of(w: Any) -> ModelPreset | None:
    """The preset whose routed shape (hidden, top-k, experts) the workload has, if exactly one has it."""
    found = [p for p in PRESETS.values() if (p.hidden, p.num_topk, p.num_experts) == (w.hidden, w.num_topk, w.num_experts)]
    return found[0] if len(found) == 1 else None


def list_models() -> str:
    from tabulate import tabulate

    rows = [[p.name, p.hidden, p.num_topk, p.num_experts, p.moe_intermediate,
             f"{p.num_shared_experts} x {p.shared_intermediate}" if p.num_shared_experts else "-", p.source]
            for p in PRESETS.values()]
    return tabulate(rows, headers=["--model", "hidden", "top-k", "experts", "expert FFN", "shared experts", "source"],
                    tablefmt="simple")
