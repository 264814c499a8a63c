"""``python -m jobs.openclip_train ARGS``: open_clip's trainer (``open_clip_train.main ARGS``)
with its WebDataset reader fixed for the pinned webdataset (:mod:`pipeline.model.openclip_wds`).

Takes exactly open_clip_train.main's arguments, e.g. a pruned run's output shards::

    python -m jobs.openclip_train --dataset-type webdataset \\
        --train-data 'runs/demo/shards/{00000..00002}.tar' --train-num-samples 2064 ...
"""

from __future__ import annotations

import sys
from typing import Sequence

from jobs import _common  # noqa: F401  (applies environment defaults first)


def main(argv: Sequence[str] | None = None) -> int | None:
    """Fix the reader, then run ``open_clip_train.main`` with ``argv`` (default: sys.argv[1:]);
    return its exit status (None: success)."""
    from open_clip_train import main as open_clip_main

    from pipeline.model.openclip_wds import fix_open_clip_wds_reader

    fix_open_clip_wds_reader()
    return open_clip_main.main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
