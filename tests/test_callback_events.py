"""Callbacks see the events TRL's DPOTrainer (HF Trainer) sends, in the same order.

    python -m pytest -q tests/test_callback_events.py

A callback records every event of a 2-step run with 2 micro-batches per step, once under TRL
1.16 and once under csd-fast, on the same tiny model and data (tests/trl_helpers.py).
"""

from __future__ import annotations

from transformers import TrainerCallback
from trl_helpers import rows, run

STEP_EVENTS = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step",
               "on_optimizer_step", "on_step_end")  # fmt: skip


class Record(TrainerCallback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name in STEP_EVENTS or name in ("on_train_begin", "on_train_end", "on_epoch_begin"):
            events = object.__getattribute__(self, "events")

            def hook(args, state, control, **kw):
                events.append((name, state.global_step))

            return hook
        return object.__getattribute__(self, name)


def test_step_events_match_trl(tmp_path):
    events = {}
    for impl in ("trl", "csd"):
        record = Record()
        run(impl, "llama", tmp_path / "m", tmp_path / impl, rows("standard", 8), max_steps=2,
            per_device_train_batch_size=2, gradient_accumulation_steps=2,
            trainer_kwargs={"callbacks": [record]})  # fmt: skip
        events[impl] = record.events
    assert events["csd"] == events["trl"]
    per_step = [e for e in events["csd"] if e[0] in STEP_EVENTS]
    assert per_step == [
        ("on_step_begin", 0),
        ("on_substep_end", 0),
        ("on_pre_optimizer_step", 0),
        ("on_optimizer_step", 0),
        ("on_step_end", 1),
        ("on_step_begin", 1),
        ("on_substep_end", 1),
        ("on_pre_optimizer_step", 1),
        ("on_optimizer_step", 1),
        ("on_step_end", 2),
    ]  # fmt: skip (HF's order with 2 micro-batches per step)
