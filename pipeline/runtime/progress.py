"""Driver-side progress for shard stages: shards and pairs done, pairs/s, ETA (tqdm)."""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm


class ShardProgress:
    """A progress bar over shards that also counts pairs; use as ``on_result`` callback."""

    def __init__(self, shards: int, pairs: int | None, enabled: bool = True, label: str = "score") -> None:
        self.shards, self.pairs_expected = shards, pairs
        self.pairs = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=shards, desc=label, unit="shard", disable=not enabled or shards == 0,
                        file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def update(self, task: Any, result: Any) -> None:
        """Record one finished shard (``result.rows`` pairs)."""
        self.pairs += int(getattr(result, "rows", 0))
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.pairs / elapsed
        postfix = {"pairs": self.pairs, "pairs/s": f"{rate:.1f}"}
        if self.pairs_expected and rate > 0:
            postfix["eta"] = f"{max(self.pairs_expected - self.pairs, 0) / rate:.0f}s"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def __enter__(self) -> "ShardProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
