"""CPU reference: DeepEP's intranode dispatch/combine semantics over torch.distributed (gloo), through the
same harness as the real kernels (refbuffer.ReferenceBuffer stands in for deep_ep.Buffer). It defines what a
correct result is; its timings say nothing about a GPU node."""

from __future__ import annotations

import platform
from typing import Any

import torch
import torch.distributed as dist

from ...deepep.config import ConfigArgs
from ...deepep.workload import Workload
from ...knobs import Knobs, KnobSpace, Space
from ..setup import sweep_space
from ..timing import wall_timer
from .base import TokenBackend, buffer_bytes

# The reference has no SMs; sweep the grid of a small co-located GPU.
REFERENCE_SMS_CAP = 32


class ReferenceBackend(TokenBackend):
    name = "reference"

    def __init__(self, workload: Workload, rank: int, num_ranks: int, num_nvl_bytes: int, objective: str) -> None:
        from ...deepep.refbuffer import ReferenceBuffer

        buffer = ReferenceBuffer(dist.group.WORLD, num_nvl_bytes)
        super().__init__(buffer, _config, wall_timer, torch.device("cpu"), rank, num_ranks, objective)
        self.prepare(workload)

    def describe(self) -> dict[str, Any]:
        return {"device_name": f"CPU ({platform.processor() or platform.machine()})", "colocated": False,
                "num_devices": 0, "device_sms": None, "sms_cap": self.sms_cap}


def _config(cfg: Knobs) -> Any:
    from ...deepep.refbuffer import ReferenceConfig

    return ReferenceConfig(*ConfigArgs.of(cfg).as_tuple())


def hardware_sms_cap(o: Any, ranks: Any) -> int:
    return REFERENCE_SMS_CAP


def create(o: Any, ranks: Any, decl: KnobSpace, sms_cap: int) -> tuple[TokenBackend, Space, int]:
    space, pruned = sweep_space(o, decl, ranks.world, sms_cap)
    b = ReferenceBackend(o.shape, ranks.rank, ranks.world, buffer_bytes(space, ranks.world, o.shape, sms_cap),
                         o.search.objective)
    return b, space, pruned
