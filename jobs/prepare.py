"""``diffin prepare`` / ``python -m jobs.prepare``: the prepare stage alone (earlier stages' outputs must exist)."""

from __future__ import annotations

import sys

from jobs._stagejob import StageJob

JOB = StageJob("prepare", ("prepare",), "Prepare the shared vectors (u, g, w) and the negative bank: one Ray task per checkpoint.")
register = JOB.register
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())
