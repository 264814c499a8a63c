"""The benchmarks behind ``diffin bench``: fidelity, speed, quality and scale.

``fidelity``, ``speed``, ``quality`` and ``scale`` each expose typed settings, a
``settings_for(...)`` / ``plan_for(...)`` preset builder and ``run_benchmark(...)``, which
measures, writes the result file and returns the report; the command line (options, printing,
exit codes) is in :mod:`jobs.bench` and ``jobs/bench_<name>.py``. ``digits``,
``openmoji_clip``, ``protocol``, ``metrics`` and ``sampler`` are their parts. Results and the
commands that reproduce them are in ``benchmarks/results/`` and ``docs/``. ``gpu`` is the
one-call throughput benchmark for a lent accelerator (``benchmarks/gpu/run.sh``): synthetic data
only, writing ``speed_gpu.json`` section by section.
"""
