"""CPU stand-in for DeepEP V2's `deep_ep` package (deepseek-ai/DeepEP main @dd758ca, version 2.1.0), intranode,
non-expand mode: `ElasticBuffer.dispatch/combine/get_theoretical_num_sms` move real tokens between CPU ranks over
torch.distributed (gloo), so tests/test_elastic_backend.py can drive the real tuner backend without a GPU.

Kept from V2 (benchmarks/next_gen/API_NOTES.md §1, deep_ep/buffers/elastic.py):
- signatures of ElasticBuffer.__init__/dispatch/combine/get_theoretical_num_sms and the num_sms resolution
  (dispatch: 0 -> get_theoretical_num_sms, elastic.py:926-929; combine: 0 -> handle.num_sms, :1086);
- host checks: 0 < num_sms <= device SMs (RuntimeError "Assertion exception"), num_experts % num_ranks == 0,
  T <= num_max_tokens_per_rank, bf16 x or (fp8, float32 sf [T, H/128]) tuple, combine x bf16 with one row per
  received token, a cached dispatch takes no topk_idx;
- output: one row per (token, destination rank); row i is the token handle.recv_src_metadata[i, 0] =
  src_rank * num_max_tokens_per_rank + src_token. The order is NOT (source rank, token): rows come channel by
  channel (token % (num_sms // 2)), as a kernel's channels would interleave them, so a caller must use the
  metadata. recv_topk_idx holds the local expert or -1; recv_topk_weights are passed through unmasked (V2 leaves
  the slots of other ranks' experts unspecified);
- combine sums the copies of each token in float32 and rounds once to bf16; weights come back from the rank
  that owns each slot's expert. Only a combine with async_with_compute_stream=True returns an event that can be
  waited on (torchtitan's forward combine and sync_combine).

Test hooks (not in V2): FAULTS counts wrong results to produce ("dispatch_row", "duplicate_row" (a token twice,
row and metadata agreeing), "cached_row", "combine_row";
also set from FAKE_V2_FAULTS="dispatch_row=1,..."), CALLS logs (kind, num_sms) of every call, FAKE_V2_JIT_S
sleeps on the first call of each (kind, num_sms) like a JIT compile, FAKE_V2_DEVICE_SMS sets the SM count.
CPU_STAND_IN tells the tuner's backend to run on CPU.
"""

import os

import torch

from . import runtime
from .buffers import ElasticBuffer, EPHandle, EventOverlap  # noqa: F401
from .runtime import CALLS, FAULTS  # noqa: F401

CPU_STAND_IN = True
topk_idx_t = torch.int64
__version__ = "2.1.0"


def _faults_from_env() -> None:
    for item in filter(None, os.environ.get("FAKE_V2_FAULTS", "").split(",")):
        name, _, count = item.partition("=")
        FAULTS[name.strip()] = int(count or 1)


_faults_from_env()


def stand_in_device_sms() -> int:
    """The SM count the stand-in's device has (FAKE_V2_DEVICE_SMS, default 132 like H200)."""
    return runtime.device_sms()
