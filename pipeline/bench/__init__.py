"""Benchmarks that prove the method (DESIGN §6): fidelity, speed (and later quality, scale).

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for ``diffin bench``.
"""
