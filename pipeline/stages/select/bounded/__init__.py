"""The bounded reducer: select's outputs, byte for byte, with memory that does not grow with
the number of score rows (issue #14). Used by :func:`pipeline.stages.select.select` unless
the rule is stratified (``stratify_by`` stays on the in-memory path).

Orders as integer keys (:mod:`.keys`)
    The keep rule's order (score descending — ``-0.0`` equal to ``0.0`` — or the seeded uid
    hash, then uid, file number, index) is one unique 256-bit key per row: five unsigned
    columns compared left to right. Score order for the quantiles is a 64-bit key.

Pass 1: scan (one task per score file, in waves)
    Each task reads its file with the in-memory path's own reader and checks, keeps its
    eligible rows in a part (uid, score, index: 28 bytes a row, what later passes read),
    and returns its counts and a histogram of the top 16 bits of both keys. The driver merges them,
    applies ``failed: drop|error`` and the shard checks, and computes the kept count K.

Pass 2: find the cut and the quantiles
    The K-th row of the rule order (the last kept) and the order statistics numpy's linear
    quantile needs are each searched digit by digit: the bin (rows sharing a key prefix)
    holding the position is known from the merged histograms; while it holds more rows than
    ``select.max_rows_in_memory`` a pass histograms its next 16 bits, then a pass gathers
    its rows and sorts them exactly. The cut's key decides every row: kept iff key <= cut —
    ties on the score go by uid, file, index exactly as in ``rule_order``.

Pass 3: parts
    Each task writes its file's kept rows twice: keys in the rule's order (``rule-``) and
    the rows in uid order (``kept-``: uid, index, score, key, place in the rule order).

Ranks
    The driver merges the ``rule-`` runs (k-way, :mod:`.merge`) and numbers the rows in the
    rule's order; each file's ranks go to one place of ``ranks.i64``; a task per file
    attaches them (``final-`` parts, uid order).

Outputs
    The driver merges the ``final-`` runs by (uid, file, index) into ``kept.parquet`` (row
    groups of 1M rows, as the in-memory path writes them) and ``kept_uids.npy`` (header
    first: K is known), counting repeated uids; ``manifest.parquet`` reads each file's kept
    keys from its part; ``summary.json`` uses the same builder as the in-memory path.

Exactness. Every output file equals the in-memory path's byte for byte
(``tests/stages/test_reducer.py``), with one theoretical exception: when the scores hold
both ``-0.0`` and ``+0.0`` and a quantile's neighbour falls among them, numpy's partition
may return either zero where this path takes ``-0.0`` first — the summary's quantile can
then differ in the sign of a zero.

Memory. Driver: the per-file counts, two 65,536-bin histograms, a gathered bin (at most
``max_rows_in_memory`` rows), the merges' buffers (1.5 batches per file, a batch being
``max_rows_in_memory`` / (4 × files) rows, 16 to 65,536) and one row group of ``kept.parquet``
(1M rows, fixed by the output format). A worker: one score file's rows. Scan and search
results come back in waves of ``max_rows_in_memory`` / 16,384 files (at least 8). Parts go to a
scratch directory beside the output directory, removed at the end (on a multi-node cluster
it must be on a shared filesystem; about 28 bytes per eligible row plus ~100 per kept row);
with a remote output directory the tasks run in the driver's process.
"""

from pipeline.stages.select.bounded.driver import select_bounded

__all__ = ["select_bounded"]
