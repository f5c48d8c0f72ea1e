"""Orchestration over the engine's public entry points: sweeps (sweep.py), `csd eval` (eval.py),
`csd loop` (loop.py, stages.py). No numerics live here; nothing in the engine imports it.
"""
