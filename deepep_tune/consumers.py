"""Paste targets: the exact text each consumer of a tuned config needs, checked against DeepEP's
Config rules before it is shown."""

from __future__ import annotations

from .space import RDMA_BUFFER, RDMA_CHUNK, TuneConfig


def config_ctor_error(*args: int) -> str | None:
    """deep_ep.Config(num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv) host checks (csrc/config.hpp),
    plus the kernels' even-num_sms rule. None if DeepEP accepts the arguments."""
    defaults = (20, 6, 256, 6, 256)
    if len(args) > 5:
        return f"Config takes at most 5 arguments, got {len(args)}"
    num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv = tuple(args) + defaults[len(args):]
    if num_sms < 0 or num_sms % 2:
        return f"num_sms={num_sms} must be even and >= 0"
    if not 0 < nvl_send < nvl_recv:
        return f"need 0 < nvl_send ({nvl_send}) < nvl_recv ({nvl_recv})"
    if not (rdma_send > 0 and rdma_recv > 0):
        return "rdma sizes must be positive"
    rdma_recv = (rdma_recv + rdma_send - 1) // rdma_send * rdma_send
    if not rdma_send <= rdma_recv // 2:
        return f"need rdma_send ({rdma_send}) <= rdma_recv/2 ({rdma_recv // 2})"
    return None


def turbo_tuple(cfg: TuneConfig) -> tuple[int, int, int, int]:
    """The 4-tuple AMD Primus / the NousResearch torchtitan fork expand as Config(num_cus, *tuple)."""
    return (cfg.nvl_chunk, cfg.nvl_buffer, RDMA_CHUNK, RDMA_BUFFER)


def torchtitan_turbo_text(dispatch: TuneConfig, combine: TuneConfig, nvl_bytes: int) -> str:
    assert dispatch.num_sms == combine.num_sms, "a dispatch handle fixes num_sms for combine"
    for cfg in (dispatch, combine):
        err = config_ctor_error(cfg.num_sms, *turbo_tuple(cfg))
        if err:
            raise ValueError(f"refusing to print a config DeepEP rejects: {err}")
    return "\n".join([
        "# torchtitan fork (NousResearch) / AMD Primus: DeepEPTokenDispatcher class attributes.",
        "# The dispatcher builds deep_ep.Config(turbo_deepep_num_cus, *tuple), so num_sms goes in",
        "# turbo_deepep_num_cus and each tuple is (nvl_chunk, nvl_buffer, rdma_chunk, rdma_buffer);",
        "# the rdma values are ignored intranode but must pass Config's checks.",
        f"turbo_deepep_num_cus = {dispatch.num_sms}",
        f"turbo_deepep_dispatch_tuned_config = {turbo_tuple(dispatch)}",
        f"turbo_deepep_combine_tuned_config = {turbo_tuple(combine)}",
        f"# The deep_ep.Buffer must have num_nvl_bytes >= {nvl_bytes} ({nvl_bytes / 2**20:.1f} MiB) per rank.",
    ])


def sglang_config(dispatch: TuneConfig, combine: TuneConfig) -> dict[str, dict[str, int]]:
    """SGLang --deepep-config reads exactly these two objects: Config(**normal_dispatch) etc."""
    return {"normal_dispatch": dispatch.config_kwargs(), "normal_combine": combine.config_kwargs()}
