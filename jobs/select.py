"""``diffin select`` / ``python -m jobs.select``: the select stage alone (earlier stages' outputs must exist)."""

from __future__ import annotations

import sys

from jobs._stagejob import StageJob

JOB = StageJob("select", ("select",), "Select the pairs to keep from the score files: kept.parquet, kept_uids.npy, "
               "manifest, summary, into selection/ (the select: section) and selections/NAME/ (each selections: "
               "entry, or --selection NAME:key=value,...); scores are never recomputed.", named="select")
register = JOB.register
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())
