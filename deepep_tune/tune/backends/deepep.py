"""Real DeepEP intranode kernels (legacy deep_ep.Buffer API: all of v1, buffers/legacy.py in v2)."""

from __future__ import annotations

import importlib.metadata
import math
import re
import subprocess
from typing import Any

import torch
import torch.distributed as dist

from ...deepep.buffer import nvl_size_hint
from ...deepep.config import (
    DEEPEP_DEFAULTS,
    RDMA_BUFFER,
    RDMA_CHUNK,
    SUPPORTED_RANKS,
    ConfigArgs,
    TuneConfig,
)
from ...deepep.gpus import gpu_error, mps_running, sms_cap
from ...deepep.workload import Workload
from ...knobs import Knobs, KnobSpace, Space
from ..setup import UsageError, sweep_space
from ..timing import CudaEventTimer
from .base import TokenBackend, buffer_bytes

L2_FLUSH_BYTES = 256 << 20  # DeepEP's bench flushes L2 with a 256 MB memset


def l2_flush_bytes(device: torch.device) -> int:
    """Bytes a memset needs to evict the whole L2: twice its size (50 MB on H100/H200), never more than DeepEP's
    256 MB. The flush runs before every timed call, outside the timing but inside the run's wall time."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return min(L2_FLUSH_BYTES, 2 * l2) if l2 > 0 else L2_FLUSH_BYTES


KNOWN_DISTRIBUTIONS = ("deep_ep", "deep-ep", "tokenspeed-deepep")  # names DeepEP wheels are published under


def deep_ep_version() -> str | None:
    """The installed distribution that provides deep_ep. Known names first: the scan of every installed package
    took 1.5 s on the GPU machine, holding the interpreter lock beside the search."""
    for name in KNOWN_DISTRIBUTIONS:
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
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


def sms_cap_here(num_ranks: int, local_rank: int) -> tuple[int, int]:
    """(largest num_sms a rank may use here, ranks per GPU)."""
    ranks_per_gpu = math.ceil(num_ranks / torch.cuda.device_count())
    device_sms = torch.cuda.get_device_properties(local_device(local_rank)).multi_processor_count
    return sms_cap(device_sms, ranks_per_gpu), ranks_per_gpu


def installed_mismatch(deep_ep: Any) -> str | None:
    """Where the installed DeepEP disagrees with this project's copy of its default tables (space.py) or of
    Config.get_nvl_buffer_size_hint, or None. Config's fields are not readable from Python, so the getters
    are called with their module's Config swapped for a recorder of the constructor arguments."""
    getters = {"dispatch": deep_ep.Buffer.get_dispatch_config, "combine": deep_ep.Buffer.get_combine_config}
    tables = {}
    for op, get in getters.items():
        scope = get.__globals__
        real_config = scope["Config"]
        try:
            scope["Config"] = lambda *args: args
            tables[op] = {r: get(r) for r in SUPPORTED_RANKS}
        finally:
            scope["Config"] = real_config
    num_sms = deep_ep.Buffer.num_sms
    for op, by_ranks in tables.items():
        for r, args in by_ranks.items():
            ours = (num_sms, *DEEPEP_DEFAULTS[op][r], RDMA_CHUNK, RDMA_BUFFER)
            if tuple(args) != ours:
                return f"installed deep_ep's get_{op}_config({r}) is Config{tuple(args)}, this tool assumes Config{ours}"
    for cfg in (TuneConfig(24, 8, 256), TuneConfig(64, 6, 512)):
        for hidden_bytes, ranks in ((14336, 8), (4096, 2)):
            real = deep_ep.Config(*ConfigArgs.of(cfg).as_tuple()).get_nvl_buffer_size_hint(hidden_bytes, ranks)
            ours = nvl_size_hint(cfg, hidden_bytes, ranks)
            if real != ours:
                return (f"installed deep_ep's Config{cfg}.get_nvl_buffer_size_hint({hidden_bytes}, {ranks}) is {real}, "
                        f"this tool computes {ours}")
    return None


class DeepEPBackend(TokenBackend):
    name = "deepep"

    def __init__(self, workload: Workload, rank: int, num_ranks: int, local_rank: int, group: dist.ProcessGroup,
                 num_nvl_bytes: int, objective: str) -> None:
        import deep_ep  # imported here so that the package works without deep_ep installed

        mismatch = installed_mismatch(deep_ep)
        if mismatch:
            raise RuntimeError(f"{mismatch}: update deepep_tune/deepep/ (config.py: DEEPEP_DEFAULTS; buffer.py: nvl_size_hint) for this "
                               "DeepEP before tuning, or the baselines and paste targets would be wrong")
        self.deep_ep = deep_ep
        torch.cuda.set_device(local_device(local_rank))
        device = torch.device("cuda", torch.cuda.current_device())
        self.hardware_sms_cap, ranks_per_gpu = sms_cap_here(num_ranks, local_rank)
        self.colocated = ranks_per_gpu > 1
        self.num_nvl_bytes = num_nvl_bytes
        buffer = deep_ep.Buffer(group, num_nvl_bytes, 0, low_latency_mode=False, num_qps_per_rank=1,
                                explicitly_destroy=True)
        self.l2 = torch.empty(l2_flush_bytes(device) // 4, dtype=torch.int32, device=device)
        # NCCL refuses two ranks on one GPU; one rank per GPU gets NCCL for the all-to-all comparison.
        a2a_group = None if self.colocated else dist.new_group(backend="nccl")
        super().__init__(buffer, self._config, CudaEventTimer(), device, rank, num_ranks, objective,
                         flush=self.l2.zero_, a2a_group=a2a_group)
        self.prepare(workload)

    def buffer_module(self) -> Any:
        return self.deep_ep

    def prepare(self, workload: Workload) -> None:
        super().prepare(workload)
        torch.cuda.synchronize()

    def _config(self, cfg: Knobs) -> Any:
        return self.deep_ep.Config(*ConfigArgs.of(cfg).as_tuple())

    def identity(self) -> dict[str, Any]:
        return {"device_name": torch.cuda.get_device_name(self.device), "num_devices": torch.cuda.device_count(),
                "colocated": self.colocated}

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
            "sms_cap": self.sms_cap,
            "l2_flush_bytes": self.l2.numel() * 4,
            "hardware_sms_cap": self.hardware_sms_cap,
            "ranks_per_gpu": -(-self.num_ranks // torch.cuda.device_count()),
            "topology": nvidia_topology(),
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


def nvidia_topology() -> str | None:
    """`nvidia-smi topo -m` (the link matrix between GPUs: NV18 is 18 NVLinks), for the results' hardware."""
    try:
        out = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
        # the matrix only (the legend is nvidia-smi's), without its terminal underline codes
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout).split("\nLegend:")[0].strip()
        return text or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware_sms_cap(o: Any, ranks: Any) -> int:
    err = gpu_error(ranks.world, torch.cuda.device_count(), o.measurement.colocate)
    if err:
        raise UsageError(err)
    return sms_cap_here(ranks.world, ranks.local_rank)[0]


def create(o: Any, ranks: Any, decl: KnobSpace, sms_cap: int) -> tuple[TokenBackend, Space, int]:
    space, pruned = sweep_space(o, decl, ranks.world, sms_cap)
    b = DeepEPBackend(o.shape, ranks.rank, ranks.world, ranks.local_rank, dist.group.WORLD,
                      buffer_bytes(space, ranks.world, o.shape, sms_cap), o.search.objective)
    return b, space, pruned
