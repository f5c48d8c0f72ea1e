"""`optim`: every optimizer transformers knows, as TRL 1.16 builds it, on CPU.

Run: `python -m pytest tests/test_optimizers.py -q` (about 40 s on 2 cores).

AdamW is csd-fast's own (tests/test_trl_parity.py); the others come from transformers'
`Trainer.get_optimizer_cls_and_kwargs`. Each case trains 3 steps with both trainers and compares
every logged number and the final weights (tests/trl_helpers.py); a run resumed from a
checkpoint ends with the weights of one never stopped (the optimizer state round-trips, 8-bit
bitsandbytes state included); what the loop cannot run is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from trl_helpers import WEIGHT_ATOL, compare_logs, csd_trainer, max_weight_diff, rows, run

pytest.importorskip("trl")

CASES = [
    ("sgd", "momentum=0.9,nesterov=True"),  # optim_args reach the optimizer
    ("adafactor", None),
    ("rmsprop", None),
    ("adamw_bnb_8bit", None),
    ("paged_adamw_8bit", None),
    ("lion_32bit", None),
]


@pytest.mark.parametrize(("optim", "optim_args"), CASES, ids=[c[0] for c in CASES])
def test_optimizer_matches_trl(models, tmp_path, optim, optim_args):
    if "bnb" in optim or "8bit" in optim or "lion" in optim:
        pytest.importorskip("bitsandbytes")
    data = rows("standard", 8)
    kw = dict(optim=optim, optim_args=optim_args, weight_decay=0.01)
    ref_logs, ref_w = run("trl", "llama", models, tmp_path / "trl", data, **kw)
    our_logs, our_w = run("csd", "llama", models, tmp_path / "csd", data, **kw)
    problems = compare_logs(our_logs, ref_logs)
    assert not problems, "\n".join(problems)
    assert max_weight_diff(our_w, ref_w) <= WEIGHT_ATOL


def test_optim_args_change_the_run(models, tmp_path):
    """The comparison above is not vacuous: SGD with momentum trains to other weights."""
    data = rows("standard", 8)
    _, plain = run("csd", "llama", models, tmp_path / "plain", data, optim="sgd")
    _, momentum = run("csd", "llama", models, tmp_path / "momentum", data, optim="sgd",
                      optim_args="momentum=0.9")  # fmt: skip
    assert max_weight_diff(plain, momentum) > 1e-6


@pytest.mark.parametrize("optim", ["adafactor", "adamw_bnb_8bit"])
def test_resume_restores_the_optimizer_state(models, tmp_path, optim):
    if "bnb" in optim:
        pytest.importorskip("bitsandbytes")
    kw = dict(optim=optim, max_steps=4, save_strategy="steps", save_steps=2)
    whole = csd_trainer(models, tmp_path / "whole", **kw)
    whole.train()
    resumed = csd_trainer(models, tmp_path / "whole", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    ours, ref = resumed.model.state_dict(), whole.model.state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_optimizers_that_change_the_step_are_refused(models, tmp_path):
    trainer = csd_trainer(models, tmp_path / "lomo", optim="lomo")
    with pytest.raises(NotImplementedError, match="optim='lomo'"):
        trainer.train()


def test_unknown_optimizer_is_a_value_error(tmp_path):
    from csd_fast import DPOConfig

    with pytest.raises(ValueError, match="optim='adamw_nonexistent'"):
        DPOConfig(output_dir=str(tmp_path), optim="adamw_nonexistent")


def test_non_torch_optimizers_are_refused_on_sharded_parameters(tmp_path):
    """bitsandbytes' optimizers step plain tensors: on FSDP2's DTensor shards they are refused
    (a 1-rank gloo group here; tests/distributed runs torch's SGD on 2 ranks)."""
    pytest.importorskip("bitsandbytes")
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from csd_fast import DPOConfig
    from csd_fast.optim import build_optimizer

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = fully_shard(torch.nn.Sequential(torch.nn.Linear(8, 8)))
        args = DPOConfig(output_dir=str(tmp_path), optim="adamw_bnb_8bit")
        with pytest.raises(NotImplementedError, match="under FSDP2"):
            build_optimizer(model, args)
        args = DPOConfig(output_dir=str(tmp_path), optim="sgd")
        assert type(build_optimizer(model, args)).__name__ == "SGD"
    finally:
        dist.destroy_process_group()


def test_resume_under_another_optimizer_is_refused(models, tmp_path):
    """Even with resume_with_changes: AdamW's saved moments cannot be SGD's momentum."""
    from csd_fast.resume import ResumeMismatch

    kw = dict(max_steps=2, save_strategy="steps", save_steps=2)
    csd_trainer(models, tmp_path / "run", **kw).train()
    resumed = csd_trainer(models, tmp_path / "run", optim="sgd", resume_with_changes=True, **kw)
    with pytest.raises(ResumeMismatch, match="optim='adamw_torch_fused'"):
        resumed.train(resume_from_checkpoint=True)
