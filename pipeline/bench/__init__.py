"""Benchmarks that prove the method (DESIGN §6): fidelity, speed (and later quality, scale).

``fidelity`` and ``speed`` expose ``add_arguments(parser)`` and ``run(args) -> int`` for
``diffin bench``; the other modules are their parts.
"""
