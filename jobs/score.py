"""``diffin score`` / ``python -m jobs.score``: the score stage alone (earlier stages' outputs must exist)."""

from __future__ import annotations

import sys

from jobs._stagejob import StageJob

JOB = StageJob("score", ("score",), "Score every input shard with an actor pool: one Parquet file per shard (resumable).")
register = JOB.register
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())
