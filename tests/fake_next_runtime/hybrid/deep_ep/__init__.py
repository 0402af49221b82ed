"""Test-only CPU fake (tests/test_next_gen_runtime.py) of deep_ep on the hybrid-ep branch (@94a9f8f6): deep_ep/__init__.py exports Buffer (legacy, omitted
here), HybridEPBuffer, Config and HybridEpConfigInstance. No ElasticBuffer on this branch."""
from .hybrid_ep_buffer import HybridEPBuffer  # noqa: F401
from hybrid_ep_cpp import HybridEpConfigInstance  # noqa: F401
