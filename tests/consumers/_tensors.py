"""Small routed inputs for driving the transcriptions on CPU (not part of any consumer)."""

from __future__ import annotations

import torch


def routed(num_tokens: int, hidden: int, num_topk: int, num_experts: int, dtype=torch.bfloat16):
    x = torch.ones(num_tokens, hidden, dtype=dtype)
    topk_idx = (torch.arange(num_tokens).unsqueeze(1) * num_topk + torch.arange(num_topk).unsqueeze(0)) % num_experts
    topk_weights = torch.full((num_tokens, num_topk), 1.0 / num_topk, dtype=torch.float32)
    return x, topk_idx.to(torch.int64), topk_weights
