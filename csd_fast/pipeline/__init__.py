"""Orchestration of the method: `csd eval` (eval.py) and `csd loop` (loop.py, stages.py).

Nothing in the training engine imports this package; it calls each part's public function.
"""
