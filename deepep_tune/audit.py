"""`deepep_tune.audit` and `python -m deepep_tune.audit --pythonpath`: the audit lives in
deepep_tune/runtime/audit.py."""

import sys

from .runtime.audit import *  # noqa: F401,F403
from .runtime.audit import Audit, audit, main, pythonpath, start_from_env, verdict  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
