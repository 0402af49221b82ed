"""The MoE workload being tuned for, and whether DeepEP can run it. Torch-free, so the launcher can
validate flags without importing torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FP8_BLOCK = 128  # DeepEP's per-token FP8 scales cover 128-wide blocks of the hidden dimension


@dataclass(frozen=True)
class Workload:
    num_tokens: int = 4096
    """Tokens per rank."""
    hidden: int = 7168
    num_topk: int = 8
    num_experts: int = 256
    dispatch_dtype: str = "bf16"
    """bf16 or fp8 (e4m3 with per-128 float scales); combine is always bf16."""
    seed: int = 0
    expert_alignment: int = 1
    """DeepEP dispatch's expert_alignment: per-expert receive counts are padded to a multiple of it."""

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def elem_size(self) -> int:
        return 1 if self.dispatch_dtype == "fp8" else 2

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * self.elem_size

    @property
    def num_scales(self) -> int:
        return self.hidden // FP8_BLOCK if self.dispatch_dtype == "fp8" else 0


def workload_error(w: Workload, num_ranks: int) -> str | None:
    """Why DeepEP's intranode kernels cannot run this workload on num_ranks, or None."""
    if w.num_tokens <= 0:
        return f"--num-tokens must be positive, got {w.num_tokens}"
    if w.dispatch_dtype not in ("bf16", "fp8"):
        return f"--dispatch-dtype must be bf16 or fp8, got {w.dispatch_dtype!r}"
    if w.num_experts <= 0 or w.num_experts % num_ranks:
        return f"--num-experts {w.num_experts} must be a positive multiple of the rank count {num_ranks}"
    if w.num_experts // num_ranks > 128:
        return f"--num-experts {w.num_experts} gives {w.num_experts // num_ranks} experts per rank; DeepEP allows at most 128"
    if not 1 <= w.num_topk <= min(32, w.num_experts):
        return f"--num-topk must be between 1 and min(32, num_experts), got {w.num_topk}"
    if w.expert_alignment < 1:
        return f"--expert-alignment must be >= 1, got {w.expert_alignment}"
    if w.hidden <= 0:
        return f"--hidden must be positive, got {w.hidden}"
    if w.dispatch_dtype == "fp8" and w.hidden % FP8_BLOCK:
        return f"--hidden {w.hidden} must be a multiple of {FP8_BLOCK} for fp8 dispatch (per-block scales)"
    # bf16 rows are used by dispatch (bf16 mode) and by combine: DeepEP's SM90 TMA path moves a row as
    # an even number of 16-byte units and stages half a row plus 8 bytes in 8 KiB of shared memory.
    if (w.hidden * 2) % 32:
        return f"--hidden {w.hidden} must be a multiple of 16 (DeepEP moves bf16 rows in pairs of 16-byte units)"
    if w.hidden * 2 // 2 + 8 > 8192:
        return f"--hidden {w.hidden} is too large for DeepEP's SM90 TMA path (bf16 rows up to hidden 8184)"
    return None
