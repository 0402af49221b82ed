"""CPU stand-in of `deep_ep` as the DeepEP branch hybrid-ep @94a9f8f installs it (HybridEPBuffer, and the
config class; the legacy v1-style Buffer of that branch is left out). Put tests/fake_hybrid on sys.path: the
real package also imports a top-level `hybrid_ep_cpp` extension, which hybrid_ep_cpp.py here stands in for."""

from hybrid_ep_cpp import HybridEpConfigInstance  # noqa: F401

from .hybrid_ep_buffer import HybridEPBuffer  # noqa: F401

FAKE = True  # lets a test assert that it runs the stand-in, not a real install
