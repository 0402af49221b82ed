"""Every paste target round-trips through the consumer's own expression and a stand-in for deep_ep whose
Config and Buffer transcribe DeepEP's C++/Python checks (csrc/config.hpp, deep_ep/buffer.py) independently
of deepep_tune.consumers. Also: --emit prints them, --plot writes non-empty PNGs."""

from __future__ import annotations

import json
import sys
import types

import pytest

from _helpers import run_launch
from deepep_tune.consumers import python_patch_text, torchtitan_turbo_text
from deepep_tune.results import nvl_bytes_needed
from deepep_tune.space import TuneConfig
from deepep_tune.workload import Workload


class EPException(RuntimeError):
    pass


def _assert(cond: bool, what: str) -> None:
    if not cond:
        raise EPException(f"Failed: Assertion error '{what}'")


class Config:
    """deep_ep_cpp.Config: positional or keyword, pybind defaults, host asserts of csrc/config.hpp."""

    def __init__(self, num_sms=20, num_max_nvl_chunked_send_tokens=6, num_max_nvl_chunked_recv_tokens=256,
                 num_max_rdma_chunked_send_tokens=6, num_max_rdma_chunked_recv_tokens=256):
        _assert(num_sms >= 0, "num_sms >= 0")
        _assert(num_max_nvl_chunked_send_tokens > 0 and num_max_nvl_chunked_recv_tokens > 0, "nvl > 0")
        _assert(num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, "nvl_send < nvl_recv")
        _assert(num_max_rdma_chunked_send_tokens > 0 and num_max_rdma_chunked_recv_tokens > 0, "rdma > 0")
        s = num_max_rdma_chunked_send_tokens
        recv = (num_max_rdma_chunked_recv_tokens + s - 1) // s * s
        _assert(s < recv and s <= recv // 2, "rdma_send <= rdma_recv / 2")
        self.fields = (num_sms, num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens,
                       num_max_rdma_chunked_send_tokens, recv)

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        c, r, n = self.fields[0] // 2, min(num_ranks, 8), self.fields[2]
        total = c * r * 5 * 4 + c * r * n * hidden_bytes + c * r * n * 8 + c * r * n * 128 * 8 \
            + c * r * n * 128 * 4 + c * r * n * 128 * 4
        return (total + 127) // 128 * 128


class Buffer:
    """The static part of deep_ep.Buffer that consumers touch."""

    num_sms = 20

    @staticmethod
    def set_num_sms(n: int) -> None:
        assert n % 2 == 0, "The SM count must be even"
        Buffer.num_sms = n

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        table = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128)}
        assert num_ranks in table, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, *table[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        table = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128)}
        assert num_ranks in table, f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, *table[num_ranks])


@pytest.fixture
def fake_deep_ep(monkeypatch):
    mod = types.ModuleType("deep_ep")
    Buffer.num_sms = 20
    mod.Config, mod.Buffer = Config, type("Buffer", (Buffer,), {})
    monkeypatch.setitem(sys.modules, "deep_ep", mod)
    return mod


D, C = TuneConfig(32, 10, 384), TuneConfig(32, 5, 192)
W = Workload(4096, 7168, 8, 256)


def test_torchtitan_fork_expression_builds_the_tuned_config():
    ns: dict = {}
    exec(torchtitan_turbo_text(D, C, 1 << 30), ns)  # the pasted lines are valid Python assignments
    # NousResearch torchtitan / AMD Primus: PrimusTurboDeepepManager._get_deepep_config
    disp = Config(ns["turbo_deepep_num_cus"], *ns["turbo_deepep_dispatch_tuned_config"])
    comb = Config(ns["turbo_deepep_num_cus"], *ns["turbo_deepep_combine_tuned_config"])
    assert disp.fields[:3] == (32, 10, 384) and comb.fields[:3] == (32, 5, 192)


def test_the_widely_pasted_triple_fails_the_fork_expression():
    with pytest.raises(EPException, match="nvl_send < nvl_recv"):
        Config(24, *(24, 8, 256))


def test_python_patch_redirects_configs_and_buffer_sizing(fake_deep_ep):
    ep = 4
    exec(python_patch_text(D, C, ep), {})
    deep_ep = fake_deep_ep
    assert deep_ep.Buffer.num_sms == 32
    assert deep_ep.Buffer.get_dispatch_config(ep).fields[:3] == (32, 10, 384)
    assert deep_ep.Buffer.get_combine_config(ep).fields[:3] == (32, 5, 192)
    # other rank counts keep DeepEP's own table (at the num_sms the patch set)
    assert deep_ep.Buffer.get_dispatch_config(8).fields[:3] == (32, 6, 256)
    # torchtitan v1 / Megatron size the Buffer from these configs' hints: the tuned configs must fit
    hidden_bytes = W.hidden * max(W.elem_size, 2)
    num_nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, ep)
                        for cfg in (deep_ep.Buffer.get_dispatch_config(ep), deep_ep.Buffer.get_combine_config(ep)))
    need = nvl_bytes_needed(D, C, W, ep)
    assert need["dispatch"] <= num_nvl_bytes and need["combine"] <= num_nvl_bytes
    # without the patch, a default-sized buffer would be too small for these configs
    Buffer.num_sms = 20
    default_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, ep)
                        for cfg in (Buffer.get_dispatch_config(ep), Buffer.get_combine_config(ep)))
    assert need["dispatch"] > default_bytes


def _sglang_load(value: str):
    """sglang DeepEPConfig: load_json_config (JSON text or a file path), then Config(**...) for both ops."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        with open(value) as f:
            parsed = json.load(f)
    disp, comb = Config(**parsed["normal_dispatch"]), Config(**parsed["normal_combine"])
    assert parsed["normal_dispatch"]["num_sms"] == parsed["normal_combine"]["num_sms"]
    return disp, comb


@pytest.fixture(scope="module")
def emitted(tmp_path_factory):
    out = tmp_path_factory.mktemp("paste") / "out"
    p = run_launch(["2", "quick", "--backend", "reference", "--num-tokens", "32,48", "--hidden", "256",
                    "--num-experts", "16", "--num-topk", "4", "--iters", "2", "--warmup", "0", "--emit", "--plot",
                    "--max-sms", "16", "--out-dir", str(out)], via_run_sh=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p, out


@pytest.mark.slow
def test_sglang_loads_results_and_standalone_file(emitted):
    _, out = emitted
    res = json.loads((out / "RESULTS_EP2_reference.json").read_text())
    a = _sglang_load(str(out / "RESULTS_EP2_reference.json"))
    b = _sglang_load(str(out / "RESULTS_EP2_reference_sglang.json"))
    c = _sglang_load((out / "RESULTS_EP2_reference_sglang.json").read_text())  # JSON text, as on a command line
    assert [x.fields for x in a] == [x.fields for x in b] == [x.fields for x in c]
    best = res["best"]
    assert a[0].fields[:3] == (best["num_sms"], best["dispatch"]["nvl_chunk"], best["dispatch"]["nvl_buffer"])
    assert a[1].fields[:3] == (best["num_sms"], best["combine"]["nvl_chunk"], best["combine"]["nvl_buffer"])
    assert best["num_sms"] <= 16  # --max-sms is the SM budget of the answer


@pytest.mark.slow
def test_emit_prints_every_target_and_they_match_the_results(emitted, fake_deep_ep):
    p, out = emitted
    res = json.loads((out / "RESULTS_EP2_reference.json").read_text())
    text = p.stdout
    for target in (res["paste"]["torchtitan_turbo"], res["paste"]["python_patch"]):
        assert target in text
    assert json.dumps({"normal_dispatch": res["normal_dispatch"], "normal_combine": res["normal_combine"]}) in text
    assert any("num_nvl_bytes >=" in n for n in res["paste"]["buffer_notes"])
    exec(res["paste"]["python_patch"], {})
    assert fake_deep_ep.Buffer.get_dispatch_config(2).fields == Config(**res["normal_dispatch"]).fields
    adv = res["sm_advice"]
    assert adv["num_sms"] <= res["best"]["num_sms"] and f"--max-sms {adv['num_sms']}" in adv["command"]
    ns: dict = {}
    exec(adv["torchtitan_turbo"], ns)
    assert ns["turbo_deepep_num_cus"] == adv["num_sms"]


@pytest.mark.slow
def test_plots_are_written_and_non_empty(emitted):
    _, out = emitted
    res = json.loads((out / "RESULTS_EP2_reference.json").read_text())
    names = sorted(p.rsplit("/", 1)[1] for p in res["plots"])
    assert names == sorted(f"RESULTS_EP2_reference_T{n}_{k}.png" for n in (32, 48)
                           for k in ("sms", "heatmap_dispatch", "heatmap_combine"))
    for p in res["plots"]:
        data = open(p, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
