"""deepep-tune: find the fastest DeepEP intranode dispatch/combine configs for this node."""

__version__ = "0.1.0"
