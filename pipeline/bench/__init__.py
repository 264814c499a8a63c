"""The benchmarks behind ``diffin bench``: fidelity, speed, quality and scale.

``fidelity``, ``speed``, ``quality`` and ``scale`` each expose ``add_arguments(parser)`` and
``run(args) -> int`` (wired in :mod:`jobs.bench`); ``digits``, ``openmoji_clip``,
``protocol`` and ``metrics`` are their parts. Results and the commands that reproduce them
are in ``benchmarks/results/`` and ``docs/``.
"""
