"""OPTIMAL_CONFIGS.md from results files: real one-rank-per-GPU runs first, every library labelled, SGLang's
JSON only where SGLang can read the answer (DeepEP v1); the command line refuses what is not a results file."""

import json
import os
import subprocess
import sys

from _helpers import ROOT

from deepep_tune.report.render import optimal_configs_markdown

V1 = "results/h200-nvlink/ep2_deepseekv3_full_norace/RESULTS_EP2.json"
V2 = "results/h200-nvlink/v2_deepseekv3_quick_layer/RESULTS_EP2_deepep-v2.json"
COLOCATED = "results/h100-colocated/ep2_deepseekv3_full/RESULTS_EP2_colocated.json"


def _load(path):
    with open(os.path.join(ROOT, path)) as f:
        return path, json.load(f)


def _section(md, path):
    start = md.index(f"source: `{path}`")
    end = md.find("\n### ", start)
    return md[start:end if end >= 0 else len(md)]


def test_real_runs_first_and_each_library_labelled():
    md = optimal_configs_markdown([_load(COLOCATED), _load(V2), _load(V1)])
    assert md.index("## Real nodes") < md.index(V1) < md.index("## Co-located") < md.index(COLOCATED)
    assert md.index(V2) < md.index("## Co-located")  # a V2 run on the GPUs is a real node too
    assert "### EP2 on NVIDIA H200 x2 (one rank per GPU): deepep-v2" in md
    v1, v2 = _section(md, V1), _section(md, V2)
    assert "SGLang `--deepep-config`" in v1 and "normal_dispatch" in v1
    assert "SGLang `--deepep-config`" not in v2 and "dispatch (chunk, buffer)" not in v2
    pick = _load(V2)[1]["best"]["dispatch"]["num_sms"]  # V2's configs are an SM count alone
    assert f"| (num_sms={pick})" in v2 and "dispatch (chunk, buffer)" in v1


def test_command_line_refuses_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    p = subprocess.run([sys.executable, "-m", "deepep_tune.optimal", "--out", str(tmp_path / "o.md"), str(bad)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: cannot use") and not (tmp_path / "o.md").exists()
    p = subprocess.run([sys.executable, "-m", "deepep_tune.optimal", "--out", str(tmp_path / "o.md"), V1], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and (tmp_path / "o.md").read_text().startswith("# Optimal DeepEP intranode configs")
