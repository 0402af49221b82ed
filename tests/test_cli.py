"""Bad input is refused before any rank starts: one 'error:' line, non-zero exit, nothing written."""

import os

import pytest
from _helpers import run_launch

from deepep_tune.deepep.config import V1
from deepep_tune.deepep.workload import Workload
from deepep_tune.tune.backends.reference import REFERENCE_SMS_CAP
from deepep_tune.tune.launch import rank_cmd, rank_env
from deepep_tune.tune.options import (
    SECTIONS,
    Options,
    OptionsError,
    build_parser,
    drop_options,
    options_error,
    options_from_args,
    rerun_command,
)


def _assert_refused(p, out_dir, *words):
    assert p.returncode != 0, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error:"), lines[0]
    low = lines[0].lower()
    for w in words:
        assert w.lower() in low, (w, lines[0])
    assert "[run]" not in p.stderr  # torchrun was never started
    # nothing written: no results, no log
    if out_dir is not None and os.path.exists(out_dir):
        assert not any(n.startswith("RESULTS") for n in os.listdir(out_dir))
        logs = os.path.join(out_dir, "logs")
        assert not os.path.exists(logs) or os.listdir(logs) == []
    return lines[0]


BAD = [
    (["3", "quick", "--backend", "reference"], ("2", "4", "8")),
    (["6", "full", "--backend", "reference"], ("2", "4", "8")),
    (["2", "fast", "--backend", "reference"], ("mode", "fast")),
    (["4", "quick", "--backend", "reference", "--num-experts", "18"], ("num-experts", "18")),
    (["2", "quick", "--backend", "deepep"], ("deep_ep",)),
    (["2", "quick", "--backend", "replay", "--replay", "/nonexistent/landscape.jsonl"], ("/nonexistent/landscape.jsonl",)),
    (["2", "quick", "--backend", "reference", "--max-sms", "7"], ("max-sms", "7")),
    (["2", "quick", "--backend", "replay"], ("--replay",)),
    (["2", "quick", "--backend", "cuda"], ("backend",)),
    (["8", "quick", "--backend", "reference", "--hidden", "8192"], ("hidden",)),
    (["2", "quick", "--backend", "reference", "--iters", "0"], ("iters",)),
    (["2", "quick", "--backend", "reference", "--num-tokens", "abc"], ("num-tokens",)),
    (["2", "quick", "--backend", "reference", "--num-tokens", "64,64"], ("num-tokens",)),
    (["2", "quick", "--backend", "reference", "--num-tokens", "64,0"], ("num-tokens",)),
    (["2", "quick", "--backend", "reference", "--model", "NoSuchModel-1T"], ("model",)),
    (["8", "quick", "--backend", "reference", "--model", "gpt-oss-120b", "--dispatch-dtype", "fp8"], ("hidden", "2880")),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_refused(tmp_path, args, words):
    out = tmp_path / "out"
    p = run_launch([*args, "--out-dir", str(out)])
    _assert_refused(p, str(out), *words)
    assert not out.exists()  # not even the directory


def test_bad_input_through_run_sh(tmp_path):
    out = tmp_path / "out"
    p = run_launch(["3", "quick", "--backend", "reference", "--out-dir", str(out)], via_run_sh=True)
    _assert_refused(p, str(out), "2, 4 or 8")
    assert not out.exists()


def test_bad_input_leaves_existing_out_dir_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p = run_launch(["4", "quick", "--backend", "reference", "--num-experts", "18", "--out-dir", str(out)])
    _assert_refused(p, str(out), "num-experts")
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_unknown_flag_is_refused(tmp_path):
    out = tmp_path / "out"
    p = run_launch(["2", "quick", "--backend", "reference", "--no-such-flag", "--out-dir", str(out)])
    assert p.returncode == 2
    assert "no-such-flag" in p.stderr
    assert not out.exists()


def test_help():
    p = run_launch(["--help"])
    assert p.returncode == 0
    assert "usage" in p.stdout.lower() and "--max-sms" in p.stdout


def test_default_backend_without_gpu_names_the_real_problem(tmp_path):
    out = tmp_path / "out"
    p = run_launch(["quick", "--out-dir", str(out)])
    line = _assert_refused(p, str(out))
    assert "deep_ep" in line or "gpu" in line.lower()
    assert "not 0" not in line


def test_resume_with_nothing_to_resume_is_refused_up_front(tmp_path):
    out = tmp_path / "out"
    p = run_launch(["2", "quick", "--backend", "reference", "--resume", "--out-dir", str(out)])
    _assert_refused(p, str(out), "resume")
    assert p.returncode == 2


@pytest.mark.parametrize("flag,content,word", [
    ("--replay", "garbage\n", "json"),
    ("--replay", '{"op": "dispatch", "num_sms": 8}\n', "time_us"),
    ("--replay", "", "empty"),
    ("--resume", "garbage\n", "json"),
    ("--resume", '{"op": "dispatch", "num_sms": 8, "nvl_chunk": 4, "nvl_buffer": 128, "time_us": 1.0}\n', "header"),
])
def test_unusable_replay_or_resume_file_is_refused(tmp_path, flag, content, word):
    f = tmp_path / "file.jsonl"
    f.write_text(content)
    out = tmp_path / "out"
    backend = "replay" if flag == "--replay" else "reference"
    extra = [] if flag == "--replay" else ["--num-experts", "16"]
    p = run_launch(["2", "quick", "--backend", backend, flag, str(f), *extra, "--out-dir", str(out)])
    line = _assert_refused(p, str(out), str(f))
    assert word in line.lower()
    assert f.read_text() == content  # the file is not touched
    assert not out.exists()


def test_resume_of_finished_run_is_refused_up_front(tmp_path):
    import json
    flags = ["--backend", "reference", "--num-tokens", "64", "--hidden", "256", "--num-experts", "16",
             "--num-topk", "4"]
    o = options_from_args(build_parser().parse_args(["--mode", "quick", *flags]))
    out = tmp_path / "out"
    log = out / "logs" / "tune_ep2_done.jsonl"
    log.parent.mkdir(parents=True)
    header = {"event": "header", "ep_size": 2, "mode": "quick", "backend": "reference",
              "workload": o.shape.as_dict(), "token_counts": list(o.workload.num_tokens)}
    log.write_text(json.dumps(header) + "\n" + json.dumps({"event": "done", "t": 0}) + "\n")
    before = log.read_text()
    p = run_launch(["2", "quick", *flags, "--resume", str(log), "--out-dir", str(out)])
    _assert_refused(p, None, "finished")
    assert p.returncode == 2
    assert log.read_text() == before
    assert sorted(os.listdir(out)) == ["logs"] and os.listdir(out / "logs") == ["tune_ep2_done.jsonl"]


# --- options_error, in process -------------------------------------------------------------------------------

def _opts(**kw):
    base = dict(backend="reference", num_tokens=(64,), hidden=256, num_topk=4, num_experts=16)
    base.update(kw)
    return Options.of(**base)


def test_options_ok():
    assert options_error(_opts(), 4) is None
    assert options_error(_opts(mode="full", max_sms=24), 2) is None


@pytest.mark.parametrize("kw,ranks,word", [
    (dict(), 1, "2, 4 or 8"),
    (dict(), 16, "2, 4 or 8"),
    (dict(max_sms=0), 4, "max-sms"),
    (dict(max_sms=-4), 4, "max-sms"),
    (dict(max_sms=25), 4, "max-sms"),
    (dict(warmup=-1), 4, "warmup"),
    (dict(iters=0), 4, "iters"),
    (dict(timeout_s=0.0), 4, "timeout"),
    (dict(timeout_s=float("inf")), 4, "timeout"),
    (dict(max_buffer_gb=0.0), 4, "max-buffer-gb"),
    (dict(replay_noise=1.0), 4, "replay-noise"),
    (dict(replay_noise=-0.1), 4, "replay-noise"),
    (dict(backend="replay"), 4, "--replay"),
    (dict(replay="/etc/hostname"), 4, "--backend replay"),
    (dict(run_id="a/b"), 4, "run-id"),
    (dict(run_id=""), 4, "run-id"),
    (dict(resume="/nonexistent.jsonl"), 4, "resume"),
    (dict(num_experts=18), 4, "num-experts"),
    (dict(expert_alignment=0), 4, "expert-alignment"),
    (dict(retime_rounds=0), 4, "retime-rounds"),
    (dict(layer_check=True), 4, "moe-intermediate"),
    (dict(compare=("/nonexistent.json",)), 4, "compare"),
])
def test_options_errors(kw, ranks, word):
    err = options_error(_opts(**kw), ranks)
    assert err is not None and word in err


def test_options_out_dir_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "out-dir" in options_error(_opts(out_dir=str(f)), 4)


def test_options_from_args_roundtrip():
    a = build_parser().parse_args(["--mode", "full", "--backend", "replay", "--replay", "x.jsonl", "--num-tokens", "7",
                                   "--hidden", "512", "--num-topk", "2", "--num-experts", "8", "--max-sms", "20",
                                   "--iters", "4", "--warmup", "0", "--seed", "9", "--dispatch-dtype", "fp8"])
    o = options_from_args(a)
    assert (o.search.mode, o.search.backend, o.measurement.replay, o.search.max_sms, o.measurement.iters,
            o.measurement.warmup) == ("full", "replay", "x.jsonl", 20, 4, 0)
    assert o.shape == Workload(7, 512, 2, 8, "fp8", 9)
    assert o.search.objective == "train"  # what a training step runs is the default
    assert options_from_args(build_parser().parse_args([])).outputs.resume is None
    assert options_from_args(build_parser().parse_args(["--resume"])).outputs.resume == ""


# An --max-sms the options accept must leave something to search (the reference backend sweeps the grid
# of a 32-SM GPU capped at --max-sms). DeepEP accepts num_sms=2 (one channel).
@pytest.mark.parametrize("max_sms", [2, 4, 6, 8, 24, 30, 32, 64])
def test_accepted_max_sms_leaves_a_nonempty_space(max_sms):
    assert options_error(_opts(max_sms=max_sms), 2) is None
    cap = min(max_sms, REFERENCE_SMS_CAP)
    space, _ = V1.build(cap, lambda op, c: True)
    assert space.size() > 0
    assert space.sms_values() and max(space.sms_values()) <= max_sms


# --- launcher helpers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,expect", [
    (["--mode", "quick", "--resume", "a.jsonl", "--iters", "3"], ["--mode", "quick", "--iters", "3"]),
    (["--mode", "quick", "--resume", "--iters", "3"], ["--mode", "quick", "--iters", "3"]),
    (["--mode", "quick", "--resume=a.jsonl"], ["--mode", "quick"]),
    (["--mode", "quick", "--resume"], ["--mode", "quick"]),
    (["--mode", "quick"], ["--mode", "quick"]),
])
def test_drop_resume_option(args, expect):
    assert drop_options(args, ("--resume",)) == expect


def test_drop_valued_options():
    argv = ["--backend", "reference", "--max-sms", "24", "--run-id=x", "--iters", "3", "--run-id", "y"]
    assert drop_options(argv, ("--max-sms", "--run-id")) == ["--backend", "reference", "--iters", "3"]


def test_rerun_command_replaces_flags_and_drops_the_run_id():
    argv = ["--model", "qwen3-30b-a3b", "--run-id", "x", "--max-sms", "64", "--iters", "3"]
    assert rerun_command(2, "full", argv, max_sms=48) == \
        "./run.sh 2 full --model qwen3-30b-a3b --iters 3 --max-sms 48"
    assert rerun_command(4, "quick", ["--resume", "--iters", "3"], resume="logs/a b.jsonl") == \
        "./run.sh 4 quick --iters 3 --resume logs/a b.jsonl"


def test_every_option_has_one_flag_and_its_default():
    # the parser is generated from the dataclass: a new field gets its flag and default for free
    import dataclasses
    p = build_parser()
    defaults = vars(p.parse_args([]))
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert defaults[f"{section}.{f.name}"] == f.default
    assert options_from_args(p.parse_args([])) == Options()
    # every flag of the sectioned options, by the name a user types
    flags = {a.option_strings[0] for a in p._actions if a.option_strings}
    assert {"--mode", "--num-tokens", "--iters", "--layer-check", "--out-dir", "--library"} <= flags


def test_rank_launch_matches_torchrun_contract():
    """The launcher starts the rank module itself with the variables torchrun would set (tune/run.py reads them)."""
    cmd = rank_cmd(["--mode", "quick"])
    assert cmd[1:3] == ["-m", "deepep_tune.tune.rank"] and cmd[-2:] == ["--mode", "quick"]
    env = rank_env(3, 4, 29500, base={"OMP_NUM_THREADS": "7"})
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "3", "4", "4")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")
    assert env["OMP_NUM_THREADS"] == "7"  # a user's setting stands
    assert rank_env(0, 2, 1, base={})["OMP_NUM_THREADS"] == "1"


# --- model presets ----------------------------------------------------------------------------------------------

PUBLIC_SHAPES = {  # (hidden_size, experts per token, routed experts) from each model's config.json
    "DeepSeek-V3": (7168, 8, 256), "DeepSeek-V2-Lite": (2048, 6, 64), "Qwen3-30B-A3B": (2048, 8, 128),
    "Qwen3-235B-A22B": (4096, 8, 128), "Mixtral-8x7B": (4096, 2, 8), "gpt-oss-120b": (2880, 4, 128),
}


@pytest.mark.parametrize("name", list(PUBLIC_SHAPES))
def test_model_presets(name):
    o = options_from_args(build_parser().parse_args(["--backend", "reference", "--model", name.upper()]))
    w = o.shape
    assert (w.hidden, w.num_topk, w.num_experts) == PUBLIC_SHAPES[name]
    for ranks in (2, 4, 8):
        assert options_error(o, ranks) is None
    # explicit flags override the preset
    o = options_from_args(build_parser().parse_args(["--model", name, "--hidden", "1024", "--num-topk", "1"]))
    assert (o.shape.hidden, o.shape.num_topk, o.shape.num_experts) == (1024, 1, PUBLIC_SHAPES[name][2])


def test_unknown_model_is_options_error():
    with pytest.raises(OptionsError):
        options_from_args(build_parser().parse_args(["--model", "gpt-5"]))


def test_several_token_counts():
    o = options_from_args(build_parser().parse_args(["--backend", "reference", "--num-tokens", "128,64,4096"]))
    assert o.workload.num_tokens == (128, 64, 4096) and o.shape.num_tokens == 128
    assert options_error(o, 2) is None
    for bad in ("", ",", "64,64", "x", "1.5"):
        with pytest.raises(OptionsError):
            options_from_args(build_parser().parse_args(["--num-tokens", bad]))
    o = options_from_args(build_parser().parse_args(["--backend", "reference", "--num-tokens", "64,-1"]))
    assert "num-tokens" in options_error(o, 2)
