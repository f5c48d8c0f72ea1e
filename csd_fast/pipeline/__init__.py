"""Orchestration over the engine's public entry points (sweeps); no numerics live here."""
