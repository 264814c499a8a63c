"""The bounded reducer: select's outputs, byte for byte, with memory that does not grow with
the number of score rows (issue #14). Used by :func:`pipeline.stages.select.select` for
every rule but ``chain``, unless the rule is stratified (``chain`` and ``stratify_by`` stay
on the in-memory path).

Orders as integer keys (:mod:`.keys`)
    The keep order is one unique 320-bit key per row: six unsigned columns compared left to
    right — a *segment*, then the rule's order (score descending — ``-0.0`` equal to ``0.0``
    — or the seeded uid hash, then uid, file number, index). A plain rule has one segment;
    each segment keeps its first rows, so it has its own cut. Score order for the quantiles
    is a 64-bit key; ``drop_fill``'s drop order (the drop column descending, then uid, file,
    index) a 256-bit one.

Pass 1: scan (one task per score file, in waves)
    Each task reads its file with the in-memory path's own reader and checks, keeps its
    eligible rows in a part (uid, score, index: 28 bytes a row, what later passes read;
    ``drop_fill`` adds its drop column and cluster ids), and returns its counts and a
    histogram of the first digit of the score key and of the first searched order (a plain
    rule's keep order after its segment; ``drop_fill``'s drop order when a rank decides the
    drop), rows at or above a threshold, rows ``drop_share_from`` scores below 0. The driver
    merges them, applies ``failed: drop|error`` and the shard checks.

Pass 2: find the cuts and the quantiles
    A plain rule keeps the first K rows of its one segment. The K-th row (the last kept) and
    the order statistics numpy's linear quantile needs are each searched digit by digit: the
    bin (rows sharing a key prefix) holding the position is known from the merged
    histograms; while it holds more rows than ``select.max_rows_in_memory`` a pass
    histograms its next 16 bits, then a pass gathers its rows and sorts them exactly. A
    segment's cut decides its rows: kept iff key <= cut — ties on the score go by uid,
    file, index exactly as in ``rule_order``.

``drop_fill`` (the decision of :func:`pipeline.stages.keep_rule.decide`, made with cuts)
    The drop: ``drop_below`` is a threshold; ``drop_fraction`` / ``drop_share_from`` keep
    the first n − dropped rows of the drop order, whose last row is searched (with the
    quantiles) — its key is the survivors' cut, its drop value the summary's threshold.
    Then the keep order: survivors in segment 0 by the fill's key (score descending, or the
    seeded uid hash), dropped rows in the last segment by the drop column descending;
    ``fill: cluster`` gives each cluster's survivors a segment of their own (a pass counts
    eligible and surviving rows per cluster id, the quotas come from
    :func:`~pipeline.stages.keep_rule.cluster_table`). Each segment keeps its first
    ``quota`` (fill: min(budget, survivors); the dropped: the short rest) rows, searched
    from the segment's known count. The ranks follow the fill's order across clusters, then
    the refilled rows (:func:`.keys.rank_columns`), as the in-memory path's positions do.

Pass 3: parts
    Each task writes its file's kept rows twice: keys in the order of the ranks (``rule-``)
    and the rows in uid order (``kept-``: uid, index, score, key, place in that order); it
    returns its last row in rank order (whose score is ``threshold_applied``) and, for fill
    cluster, its kept rows per cluster.

Ranks
    The driver merges the ``rule-`` runs (k-way, :mod:`.merge`) and numbers the rows in the
    rule's order; each file's ranks go to one place of ``ranks.i64``; a task per file
    attaches them (``final-`` parts, uid order).

Outputs
    The driver merges the ``final-`` runs by (uid, file, index) into ``kept.parquet`` (row
    groups of 1M rows, as the in-memory path writes them) and ``kept_uids.npy`` (header
    first: K is known), counting repeated uids; ``manifest.parquet`` reads each file's kept
    keys from its part; ``summary.json`` uses the same builders as the in-memory path
    (``drop_fill``'s entry: :func:`~pipeline.stages.keep_rule.drop_fill_details`).

Exactness. Every output file equals the in-memory path's byte for byte
(``tests/stages/test_reducer.py``, ``tests/stages/test_reducer_drop_fill.py``), with one
theoretical exception: when the scores hold both ``-0.0`` and ``+0.0`` and a quantile's
neighbour falls among them, numpy's partition may return either zero where this path takes
``-0.0`` first — the summary's quantile can then differ in the sign of a zero.

Memory. Driver: the per-file counts, up to three 65,536-bin histograms, a gathered bin (at
most ``max_rows_in_memory`` rows), the merges' buffers (1.5 batches per file, a batch being
``max_rows_in_memory`` / (4 × files) rows, 16 to 65,536), one row group of ``kept.parquet``
(1M rows, fixed by the output format) and, for fill cluster, a few counts per cluster id.
A worker: one score file's rows. Scan and search results come back in waves of
``max_rows_in_memory`` / 16,384 files (at least 8). Parts go to a scratch directory beside
the output directory, removed at the end (on a multi-node cluster it must be on a shared
filesystem; about 28 bytes per eligible row — 44 at most with drop_fill — plus ~100 per
kept row); with a remote output directory the tasks run in the driver's process.
"""

from pipeline.stages.select.bounded.driver import select_bounded

__all__ = ["select_bounded"]
