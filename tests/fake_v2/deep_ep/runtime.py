"""The stand-in's 'kernels': row exchange over gloo, the JIT emulation and the test hooks."""

import math
import os
import time

import torch
import torch.distributed as dist

FAULTS: dict = {"dispatch_row": 0, "duplicate_row": 0, "cached_row": 0, "combine_row": 0}
CALLS: list = []  # (kind, num_sms) of every dispatch/cached_dispatch/combine, in call order
_COMPILED: set = set()  # like V2's on-disk JIT cache: shared by every buffer of the process


def device_sms() -> int:
    return int(os.environ.get("FAKE_V2_DEVICE_SMS", 132))  # H200


def launch(kind: str, num_sms: int) -> None:
    """What V2 does before a kernel: host-check num_sms (buffer.hpp:728/979/1198), JIT-compile a new variant."""
    if num_sms <= 0:
        raise RuntimeError(f"Assertion exception (buffer.hpp:728): num_sms > 0, got {num_sms}")
    if num_sms > device_sms():
        raise RuntimeError(f"Assertion exception (buffer.hpp:979): num_sms <= {device_sms()}, got {num_sms}")
    CALLS.append((kind, num_sms))
    if (kind, num_sms) not in _COMPILED:
        time.sleep(float(os.environ.get("FAKE_V2_JIT_S", 0)))
        _COMPILED.add((kind, num_sms))


def take_fault(name: str) -> bool:
    if FAULTS.get(name, 0) > 0:
        FAULTS[name] -= 1
        return True
    return False


def move_rows(group, rows: torch.Tensor, send_counts, recv_counts) -> torch.Tensor:
    """all_to_all of whole rows grouped by destination, as bytes (gloo has no bf16/fp8 types)."""
    tail = tuple(rows.shape[1:])
    row_bytes = rows.element_size() * math.prod(tail)
    flat = rows.contiguous().reshape(rows.shape[0], math.prod(tail)).view(torch.uint8)
    out = torch.empty(sum(recv_counts) * row_bytes, dtype=torch.uint8)
    dist.all_to_all_single(out, flat.reshape(-1), [c * row_bytes for c in recv_counts],
                           [c * row_bytes for c in send_counts], group=group)
    return out.view(sum(recv_counts), row_bytes).view(rows.dtype).reshape(sum(recv_counts), *tail)


def exchange_counts(group, send_counts) -> list:
    send = torch.tensor(send_counts, dtype=torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.tolist()
