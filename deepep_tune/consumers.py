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


def nvl_size_hint(cfg: TuneConfig, hidden_bytes: int, num_ranks: int) -> int:
    """deep_ep.Config.get_nvl_buffer_size_hint (csrc/config.hpp), an upper bound assuming top-k <= 128, for
    an NVSHMEM build. Frameworks that size deep_ep.Buffer from get_dispatch/combine_config allocate this;
    pass hidden_bytes = hidden * max(elem_size, 2) as DeepEP's README does."""
    c, r, n = cfg.num_sms // 2, min(num_ranks, 8), cfg.nvl_buffer
    total = c * r * (2 * 1 + 3) * 4 + c * r * n * hidden_bytes + c * r * n * 8 + c * r * n * 128 * (8 + 4 + 4)
    return (total + 127) // 128 * 128


VLLM_DEFAULT_BYTES = 1024 * 2**20  # VLLM_DEEPEP_BUFFER_SIZE_MB default


def python_patch_text(dispatch: TuneConfig, combine: TuneConfig, ep_size: int) -> str:
    for cfg in (dispatch, combine):
        err = config_ctor_error(*cfg.config_kwargs().values())
        if err:
            raise ValueError(f"refusing to print a config DeepEP rejects: {err}")
    d, c = tuple(dispatch.config_kwargs().values()), tuple(combine.config_kwargs().values())
    return "\n".join([
        "# For code that calls deep_ep.Buffer without config= (torchtitan v1-era, Megatron-Core, vLLM).",
        "# Run before the first deep_ep.Buffer is created: buffer sizing calls these methods too.",
        "import deep_ep",
        "_deepep_default_dispatch = deep_ep.Buffer.get_dispatch_config",
        "_deepep_default_combine = deep_ep.Buffer.get_combine_config",
        f"deep_ep.Buffer.set_num_sms({dispatch.num_sms})",
        "deep_ep.Buffer.get_dispatch_config = staticmethod(",
        f"    lambda n: deep_ep.Config{d} if n == {ep_size} else _deepep_default_dispatch(n))",
        "deep_ep.Buffer.get_combine_config = staticmethod(",
        f"    lambda n: deep_ep.Config{c} if n == {ep_size} else _deepep_default_combine(n))",
    ])


def buffer_notes(required: int, hint: int, default_hint: int) -> list[str]:
    """What each consumer allocates against what the tuned configs need (bytes per rank)."""
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    notes = [f"tuned configs need num_nvl_bytes >= {required} ({mib(required)}) per rank"]
    notes.append(f"SGLang sizes its buffer from --deepep-config: fits ({mib(hint)} by get_nvl_buffer_size_hint)")
    notes.append(f"Python patch: torchtitan v1 / Megatron size from the patched configs: fits ({mib(hint)})")
    if required > VLLM_DEFAULT_BYTES:
        notes.append(f"WARNING vLLM allocates VLLM_DEEPEP_BUFFER_SIZE_MB=1024 by default: set it to "
                     f">= {-(-required // 2**20)}")
    if required > default_hint:
        notes.append(f"WARNING a Buffer sized for DeepEP's default configs ({mib(default_hint)}) is too small: "
                     "allocate from the tuned configs (or apply the Python patch before creating it)")
    return notes
