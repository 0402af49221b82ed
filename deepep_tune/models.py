"""Model presets: the MoE shapes of public models, from each model's config.json on the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden: int
    num_topk: int
    num_experts: int
    source: str  # config.json fields the values come from


PRESETS = {p.name.lower(): p for p in [
    ModelPreset("DeepSeek-V3", 7168, 8, 256,
                "deepseek-ai/DeepSeek-V3 config.json: hidden_size, num_experts_per_tok, n_routed_experts"),
    ModelPreset("DeepSeek-V2-Lite", 2048, 6, 64,
                "deepseek-ai/DeepSeek-V2-Lite config.json: hidden_size, num_experts_per_tok, n_routed_experts"),
    ModelPreset("Qwen3-30B-A3B", 2048, 8, 128,
                "Qwen/Qwen3-30B-A3B config.json: hidden_size, num_experts_per_tok, num_experts"),
    ModelPreset("Qwen3-235B-A22B", 4096, 8, 128,
                "Qwen/Qwen3-235B-A22B config.json: hidden_size, num_experts_per_tok, num_experts"),
    ModelPreset("Mixtral-8x7B", 4096, 2, 8,
                "mistralai/Mixtral-8x7B-v0.1 config.json: hidden_size, num_experts_per_tok, num_local_experts"),
    ModelPreset("gpt-oss-120b", 2880, 4, 128,
                "openai/gpt-oss-120b config.json: hidden_size, experts_per_token, num_local_experts"),
]}


def find_preset(name: str) -> ModelPreset | None:
    return PRESETS.get(name.lower())


def list_models() -> str:
    from tabulate import tabulate

    rows = [[p.name, p.hidden, p.num_topk, p.num_experts, p.source] for p in PRESETS.values()]
    return tabulate(rows, headers=["--model", "hidden", "top-k", "experts", "source"], tablefmt="simple")
