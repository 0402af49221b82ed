"""Fake deep_ep for CPU tests: same layout as the real wheel's deep_ep/__init__.py (DeepEP v1.2.1)."""
import torch  # noqa: F401  (the real __init__ imports torch first)

from .utils import EventOverlap
from .buffer import Buffer

# noinspection PyUnresolvedReferences
from deep_ep_cpp import Config, topk_idx_t
