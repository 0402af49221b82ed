"""Fake deep_ep.utils: EventOverlap and check_nvlink_connections as in the real wheel's deep_ep/utils.py."""

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

# noinspection PyUnresolvedReferences
from deep_ep_cpp import EventHandle


class EventOverlap:
    """utils.py L10-60: a CUDA event plus tensors kept alive; on CPU the waits are no-ops."""

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Tuple[torch.Tensor]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None
        self.event.current_stream_wait()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


def check_nvlink_connections(group: dist.ProcessGroup) -> None:
    """utils.py L63-: only PCIe GPUs are checked. Without CUDA there is nothing to check."""
    if torch.cuda.is_available() and 'PCIE' in torch.cuda.get_device_name():
        assert group.size() <= 2, 'PCIe GPUs only have pairwise NVLink connections'
