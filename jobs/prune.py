"""``diffin run`` / ``python -m jobs.prune``: every stage of a run, in order, into one run dir.

Each stage is resumable from its completion markers: a rerun recomputes only what is missing.
"""

from __future__ import annotations

import sys

from jobs._stagejob import StageJob
from pipeline.stages.pipeline import STAGES

JOB = StageJob("run", STAGES, "Run every stage of a pruning run: trajectory, prepare, score, select, "
               "reshard (embedded local Ray, or the cluster in RAY_ADDRESS).")
register = JOB.register
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())
