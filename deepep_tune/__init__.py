"""deepep-tune: find the fastest DeepEP intranode dispatch/combine configs for this node, and put them into
effect in a training process (`deepep_tune.apply(results)` before the framework creates its deep_ep.Buffer)."""

__version__ = "0.2.0"

from .runtime.apply import apply  # noqa: E402,F401
