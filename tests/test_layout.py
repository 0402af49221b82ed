"""The package's layers: modules import only downward, and a trainer that imports the runtime side does not
load the tuner. Read from the source, so a new upward import fails here before anyone notices."""

import ast
import os
import subprocess
import sys

import pytest
from _helpers import ROOT

PKG = os.path.join(ROOT, "deepep_tune")
# What each room may import from the package (besides itself). Bottom: the knob declaration and statistics.
ALLOWED = {
    "knobs": set(),
    "stats": set(),
    "deepep": {"knobs", "stats"},
    "record": {"knobs", "stats", "deepep"},
    "report": {"knobs", "stats", "deepep", "record"},
    "runtime": {"knobs", "stats", "deepep", "record", "report"},
    "tune": {"knobs", "stats", "deepep", "record", "report", "tune"},
}
# the package's front door: version, and the documented entry points that re-export a room
FRONT = {"__init__": {"runtime"}, "__main__": {"tune"}, "apply": {"runtime"}, "audit": {"runtime"},
         "optimal": {"report"}}


def _room(path: str) -> str:
    rel = os.path.relpath(path, PKG)
    return rel.split(os.sep)[0].removesuffix(".py")


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, top-level room) of every deepep_tune import in the file, relative or absolute."""
    tree = ast.parse(open(path).read(), path)
    pkg_parts = ["deepep_tune"] + os.path.relpath(os.path.dirname(path), PKG).split(os.sep)
    pkg_parts = [p for p in pkg_parts if p != "."]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - (node.level - 1)]
                full = base + (node.module.split(".") if node.module else [])
                names = [full] if node.module else [full + [a.name] for a in node.names]
            else:
                names = [node.module.split(".")] if node.module else []
            for n in names:
                if n[:1] == ["deepep_tune"] and len(n) > 1 and n[1] != "__version__":
                    out.append((node.lineno, n[1]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                n = a.name.split(".")
                if n[:1] == ["deepep_tune"] and len(n) > 1:
                    out.append((node.lineno, n[1]))
    return out


def _sources():
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def test_modules_import_only_downward():
    bad = []
    for path in _sources():
        room = _room(path)
        allowed = FRONT.get(room, ALLOWED.get(room))
        assert allowed is not None, f"{path}: a module outside the rooms; give it one (see ALLOWED)"
        for line, target in _imports(path):
            if target != room and target not in allowed:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports deepep_tune.{target}")
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above can fail: a deepep/ module importing tune/ is reported."""
    fake = os.path.join(PKG, "deepep", "_layout_probe.py")
    try:
        with open(fake, "w") as f:
            f.write("from ..tune import run  # noqa\n")
        with pytest.raises(AssertionError, match="_layout_probe.py:1 imports deepep_tune.tune"):
            test_modules_import_only_downward()
    finally:
        os.unlink(fake)


@pytest.mark.parametrize("entry", ["import deepep_tune.apply", "from deepep_tune import apply",
                                   "import deepep_tune.audit"])
def test_runtime_side_does_not_load_the_tuner(entry):
    code = (f"import sys; {entry}; "
            "bad = sorted(m for m in sys.modules if m.startswith(('deepep_tune.tune', 'deepep_tune.report')) "
            "or m == 'tqdm' or m == 'matplotlib'); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{entry} loaded the tuner: {r.stdout} {r.stderr}"
