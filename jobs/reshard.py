"""``diffin reshard`` / ``python -m jobs.reshard``: the reshard stage alone (earlier stages' outputs must exist)."""

from __future__ import annotations

import sys

from jobs._stagejob import StageJob

JOB = StageJob("reshard", ("reshard",), "Copy the kept pairs, bytes unchanged, into new WebDataset shards (one Ray "
               "task per output shard): shards/, and selections/NAME/shards/ of the selections: entries with "
               "reshard: true (or of --selection NAME alone).", named="reshard")
register = JOB.register
main = JOB.main

if __name__ == "__main__":
    sys.exit(main())
