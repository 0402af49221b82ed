import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: end-to-end runs through torchrun on CPU (seconds each); part of the default suite, "
                   "deselect with -m 'not slow'")


@pytest.fixture(autouse=True)
def _no_fault_injection(monkeypatch):
    """A DEEPEP_TUNE_INJECT left in the environment would make measurements fail at random."""
    monkeypatch.delenv("DEEPEP_TUNE_INJECT", raising=False)
