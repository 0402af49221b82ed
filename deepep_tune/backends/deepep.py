"""Real DeepEP intranode kernels (legacy deep_ep.Buffer API: all of v1, buffers/legacy.py in v2)."""

from __future__ import annotations

import importlib.metadata
import subprocess
from typing import Any

import torch
import torch.distributed as dist

from ..bench import CudaEventTimer
from ..options import mps_running
from ..space import RDMA_BUFFER, RDMA_CHUNK, TuneConfig
from ..workload import FP8_BLOCK, Workload
from .base import CombineOut, DispatchOut, TokenBackend

L2_FLUSH_BYTES = 256 << 20  # DeepEP's bench flushes L2 with a 256 MB memset


def deep_ep_version() -> str | None:
    names = importlib.metadata.packages_distributions().get("deep_ep", [])
    for name in names:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def local_device(local_rank: int) -> int:
    return local_rank % torch.cuda.device_count()


class DeepEPBackend(TokenBackend):
    name = "deepep"

    def __init__(self, workload: Workload, rank: int, num_ranks: int, local_rank: int,
                 group: dist.ProcessGroup, num_nvl_bytes: int, colocated: bool) -> None:
        import deep_ep  # imported here so that the package works without deep_ep installed

        super().__init__(rank, num_ranks)
        self.deep_ep = deep_ep
        torch.cuda.set_device(local_device(local_rank))
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.colocated = colocated
        self.num_nvl_bytes = num_nvl_bytes
        self.buffer = deep_ep.Buffer(group, num_nvl_bytes, 0, low_latency_mode=False, num_qps_per_rank=1,
                                     explicitly_destroy=True)
        self.timer = CudaEventTimer()
        self.l2 = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=self.device)
        self.prepare(workload)

    def prepare(self, workload: Workload) -> None:
        super().prepare(workload)
        deep_ep, dev = self.deep_ep, self.device
        values = self.own_values.to(dev)
        x = values[:, None].expand(workload.num_tokens, workload.hidden)
        if workload.dispatch_dtype == "fp8":
            # Column-major scales, as DeepEP's test and FP8 training recipes pass them.
            scales = (values / 448.0)[:, None].expand(-1, workload.hidden // FP8_BLOCK).T.contiguous().T
            self.x: Any = ((x / scales[:, :1]).to(torch.float8_e4m3fn), scales)
        else:
            self.x = x.to(torch.bfloat16).contiguous()
        # topk_idx_t appeared with DeepEP #422; older builds take int64
        self.topk_idx = self.routing.topk_idx.to(dev, getattr(deep_ep, "topk_idx_t", torch.int64))
        self.topk_weights = self.routing.topk_weights.to(dev)
        per_rank, _, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(self.topk_idx, workload.num_experts)
        if not (torch.equal(per_rank.cpu(), self.routing.num_tokens_per_rank)
                and torch.equal(per_expert.cpu(), self.routing.num_tokens_per_expert)
                and torch.equal(in_rank.cpu(), self.routing.is_token_in_rank)):
            raise RuntimeError("deep_ep.get_dispatch_layout disagrees with the reference layout")
        self.layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        self.combine_in = self.expected.recv_values.to(dev, torch.bfloat16)[:, None].expand(-1, workload.hidden).contiguous()
        self.combine_w = self.expected.recv_topk_weights.to(dev)
        torch.cuda.synchronize()

    def _config(self, cfg: TuneConfig) -> Any:
        return self.deep_ep.Config(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer, RDMA_CHUNK, RDMA_BUFFER)

    def flush(self) -> None:
        self.l2.zero_()

    def _dispatch(self, cfg: TuneConfig) -> DispatchOut:
        recv_x, recv_idx, recv_w, per_expert, handle, _ = self.buffer.dispatch(
            self.x, topk_idx=self.topk_idx, topk_weights=self.topk_weights, config=self._config(cfg), **self.layout)
        xs, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        return DispatchOut(xs, scales, recv_idx, recv_w, per_expert, handle)

    def _combine(self, cfg: TuneConfig, handle: Any) -> CombineOut:
        combined, combined_w, _ = self.buffer.combine(self.combine_in, handle, topk_weights=self.combine_w,
                                                      config=self._config(cfg))
        return CombineOut(combined, combined_w)

    def describe(self) -> dict[str, Any]:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "device_name": torch.cuda.get_device_name(self.device),
            "num_devices": torch.cuda.device_count(),
            "device_sms": props.multi_processor_count,
            "colocated": self.colocated,
            "driver": driver_version(),
            "cuda": torch.version.cuda,
            "deep_ep": deep_ep_version(),
            "mps": mps_running(),
        }

    def close(self) -> None:
        torch.cuda.synchronize()
        self.buffer.destroy()

    def healthy(self) -> bool:
        """False once a failure has left a sticky CUDA error (the context must be recreated)."""
        try:
            torch.cuda.synchronize()
            return True
        except RuntimeError:
            return False
