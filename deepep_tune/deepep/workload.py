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


@dataclass(frozen=True)
class LayerShape:
    """The MoE layer the layer check times: the routed workload plus the expert FFN sizes."""

    num_tokens: int  # per rank
    hidden: int
    num_topk: int
    num_experts: int
    moe_intermediate: int
    num_shared_experts: int = 0
    shared_intermediate: int = 0

    @property
    def shared_size(self) -> int:
        """Shared experts run as one FFN of their summed width (torchtitan: moe_hidden_dim * num_shared)."""
        return self.num_shared_experts * self.shared_intermediate

    def workload(self, seed: int = 0) -> Workload:
        return Workload(self.num_tokens, self.hidden, self.num_topk, self.num_experts, "bf16", seed)


def layer_shape_error(shape: LayerShape, num_ranks: int) -> str | None:
    """Why the layer check cannot build this layer on num_ranks, or None (checked before any rank starts)."""
    if shape.moe_intermediate <= 0 or shape.num_shared_experts < 0 or (shape.num_shared_experts
                                                                       and shape.shared_intermediate <= 0):
        return (f"expert sizes must be positive, got ({shape.moe_intermediate}, {shape.num_shared_experts}, "
                f"{shape.shared_intermediate})")
    if shape.num_experts % num_ranks:
        return f"num_experts {shape.num_experts} is not a multiple of {num_ranks} ranks"
    for name in ("hidden", "moe_intermediate"):
        if getattr(shape, name) <= 0 or getattr(shape, name) % 8:
            return f"{name} {getattr(shape, name)} must be a positive multiple of 8 (grouped GEMM 16-byte strides)"
    if shape.shared_size and shape.shared_size % 8:
        return f"shared expert width {shape.shared_size} must be a multiple of 8"
    return None
