"""`from deepep_tune.apply import apply`: the runtime side lives in deepep_tune/runtime/apply.py."""

from .runtime.apply import *  # noqa: F401,F403
from .runtime.apply import apply, apply_from_env, current, unapply  # noqa: F401
