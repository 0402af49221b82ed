"""CPU reference: DeepEP's intranode dispatch/combine semantics over torch.distributed (gloo), through the
same harness as the real kernels (refbuffer.ReferenceBuffer stands in for deep_ep.Buffer). It defines what a
correct result is; its timings say nothing about a GPU node."""

from __future__ import annotations

import platform
from typing import Any

import torch
import torch.distributed as dist

from ..bench import wall_timer
from ..space import RDMA_BUFFER, RDMA_CHUNK, TuneConfig
from ..workload import Workload
from .base import TokenBackend

# The reference has no SMs; sweep the grid of a small co-located GPU.
REFERENCE_SMS_CAP = 32


class ReferenceBackend(TokenBackend):
    name = "reference"
    sms_cap = REFERENCE_SMS_CAP

    def __init__(self, workload: Workload, rank: int, num_ranks: int, num_nvl_bytes: int, objective: str) -> None:
        from ..refbuffer import ReferenceBuffer

        buffer = ReferenceBuffer(dist.group.WORLD, num_nvl_bytes)
        super().__init__(buffer, _config, wall_timer, torch.device("cpu"), rank, num_ranks, objective)
        self.prepare(workload)

    def describe(self) -> dict[str, Any]:
        return {"device_name": f"CPU ({platform.processor() or platform.machine()})", "colocated": False,
                "num_devices": 0, "device_sms": None, "sms_cap": self.sms_cap}


def _config(cfg: TuneConfig) -> Any:
    from ..refbuffer import ReferenceConfig

    return ReferenceConfig(cfg.num_sms, cfg.nvl_chunk, cfg.nvl_buffer, RDMA_CHUNK, RDMA_BUFFER)
