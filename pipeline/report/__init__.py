"""The run report: one self-contained HTML page with plots and example grids (``diffin report``).

``pipeline.report.build.write_report`` writes it; this package module stays light (no
matplotlib) so that the command line can read the defaults cheaply.
"""

DEFAULT_EXAMPLES = 16      # pairs in each of the kept / pruned grids
DEFAULT_MAX_POINTS = 20_000  # rows sampled for the scatter plot and the histogram ranges
