"""A k-way merge of sorted runs of record batches, vectorised (pure: no files, no Ray).

Each run yields record batches whose rows are sorted by the key columns (unsigned integers,
most significant first). A run's buffer is topped up with its next batch whenever fewer
than half a batch of its rows is left. Every round, the bound is the smallest last buffered
key among the runs that have more batches to come: no later batch holds a smaller key, so
every buffered row at or below the bound is emitted — sorted together, as one batch.

Memory: at most 1.5 batches per run (and a round emits at most what is buffered).
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pipeline.stages.select.bounded.keys import count_le, lex_le, lex_order


class _Buffers:
    """Every run's unemitted rows, with their first and last keys as arrays (one slot a run)."""

    def __init__(self, runs: Iterable[Iterable[pa.RecordBatch]], key_columns: Sequence[str]) -> None:
        self.iters = [iter(r) for r in runs]
        self.key_columns = list(key_columns)
        n = len(self.iters)
        self.batches: list[pa.RecordBatch | None] = [None] * n
        self.keys: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.position = np.zeros(n, np.int64)
        self.size = np.zeros(n, np.int64)        # rows in the buffer, emitted ones included
        self.batch_rows = np.ones(n, np.int64)   # rows of the run's latest batch
        self.final = np.zeros(n, bool)           # no batch left to read
        self.firsts = np.zeros((len(self.key_columns), n), np.uint64)
        self.lasts = np.zeros((len(self.key_columns), n), np.uint64)

    @property
    def live(self) -> np.ndarray:
        return self.position < self.size

    def top_up(self) -> None:
        """Read the next batch of every run with less than half a batch left."""
        for run in np.flatnonzero(~self.final & (2 * (self.size - self.position) < self.batch_rows)):
            self._read(int(run))

    def _read(self, run: int) -> None:
        for batch in self.iters[run]:
            if batch.num_rows:
                break
        else:
            self.final[run] = True
            return
        start = int(self.position[run])
        if start < self.size[run]:  # keep the rows not emitted yet in front
            batch = pa.concat_batches([self.batches[run].slice(start), batch])
        self.batches[run] = batch
        self.keys[run] = [batch.column(c).to_numpy().astype(np.uint64, copy=False) for c in self.key_columns]
        self.position[run], self.size[run] = 0, batch.num_rows
        self.batch_rows[run] = batch.num_rows
        self._mark(run)

    def _mark(self, run: int) -> None:
        keys, position = self.keys[run], int(self.position[run])
        if position < self.size[run]:
            self.firsts[:, run] = [k[position] for k in keys]
            self.lasts[:, run] = [k[-1] for k in keys]

    def take_up_to(self, run: int, bound: Sequence[int] | None) -> pa.RecordBatch:
        """The run's unemitted rows with key <= bound (all when bound is None); advance."""
        keys, start = self.keys[run], int(self.position[run])
        count = int(self.size[run]) - start if bound is None else count_le(keys, start, bound)
        self.position[run] = start + count
        self._mark(run)
        return self.batches[run].slice(start, count)


def merge_sorted(runs: Iterable[Iterable[pa.RecordBatch]], key_columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Merge runs of sorted record batches (same schema) into batches in key order.

    Rows with equal keys come out in an unspecified order: give every row a distinct key
    (e.g. end it with the run number and the row's position in its run)."""
    buffers = _Buffers(runs, key_columns)
    while True:
        buffers.top_up()
        live = buffers.live
        if not live.any():
            return
        bounding = np.flatnonzero(live & ~buffers.final)
        bound = None
        taking = np.flatnonzero(live)
        if len(bounding):
            lasts = buffers.lasts[:, bounding]
            bound = [int(v) for v in lasts[:, lex_order(list(lasts))[0]]]
            taking = taking[lex_le(list(buffers.firsts[:, taking]), bound)]
        pieces = [buffers.take_up_to(int(run), bound) for run in taking]
        yield _sorted_batch(pieces, key_columns)


def _sorted_batch(pieces: list[pa.RecordBatch], key_columns: Sequence[str]) -> pa.RecordBatch:
    """The pieces' rows together, sorted by key."""
    if len(pieces) == 1:
        return pieces[0]
    batch = pa.concat_batches(pieces)
    keys = [batch.column(c).to_numpy().astype(np.uint64, copy=False) for c in key_columns]
    return batch.take(pa.array(lex_order(keys)))
