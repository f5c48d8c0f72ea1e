"""FSDP2 on CPU with gloo under torchrun: 2 ranks x b == 1 rank x 2b, resume, kill -9, export.

    python -m pytest tests/distributed/test_fsdp.py -q     (two torchrun launches, ~1 min)

One torchrun launch (`worker.py parity`) runs every scenario of `scenarios.py` on two ranks; each
test runs the same scenario on one process with twice the per-device batch and compares the
whole logged history (loss, grad norm, every TRL metric, eval metrics) and the final weights.
The second launch kills rank 1 with SIGKILL as a checkpoint starts: the job must fail, within
the timeout, with the previous checkpoint intact, and a resume on one process must continue
exactly as the uninterrupted run did.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scenarios
import torch

from csd_fast import checkpoint as ckpt

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("worker.py")
# what depends on how the rows were padded (padding differs with the batch's composition)
# what depends on each rank's own padding (total_flos counts TRL's padded rows, per rank)
PADDING_KEYS = {"num_tokens", "padding_efficiency", "tokens_per_second", "pairs_per_second",
                "total_flos"}  # fmt: skip
# a resumed run's summary averages the loss over the steps it ran itself (as transformers does)
RESUMED_SKIP = PADDING_KEYS - {"num_tokens"} | {"train_loss"}


def torchrun(out: Path, mode: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "CSD_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), mode]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    # a single-process checkpoint at step 3, for the workers to resume on two ranks
    scenarios.build_trainer("packed", 1, out / "one_rank", [scenarios.StopAt(3)]).train()
    for name in scenarios.BY_PATH:
        scenarios.by_path_models(out, name)
    proc = torchrun(out, "parity")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    (out / "torchrun.log").write_text(proc.stdout)
    return out


def single(name: str, out: Path, **kw):
    trainer = scenarios.build_trainer(name, 1, out, **kw)
    trainer.train()
    return trainer


# attention key biases get no gradient in exact arithmetic (a softmax is unchanged by a shift
# common to all keys), so AdamW turns round-off in them into whole steps of lr: looser there
LOOSE_WEIGHTS = {"self_attn.k_proj.bias": 1e-5}


def assert_same_run(got: dict, want_history, want_weights, skip=frozenset(), rtol=1e-5):
    hist = got["history"]
    assert len(hist) == len(want_history)
    for step, (a, b) in enumerate(zip(hist, want_history, strict=True)):
        keys = set(b) - skip
        assert set(a) - skip == keys, (step, set(a) ^ set(b))
        for k in sorted(keys):
            if isinstance(b[k], float) and not math.isnan(b[k]):
                assert a[k] == pytest.approx(b[k], rel=rtol, abs=1e-6), (step, k, a[k], b[k])
            else:
                assert a[k] == b[k], (step, k)
    assert got["weights"].keys() == want_weights.keys()
    for k, w in want_weights.items():
        atol = next((a for part, a in LOOSE_WEIGHTS.items() if part in k), 1e-6)
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-5, atol=atol, msg=k)


@pytest.mark.parametrize("name", sorted(set(scenarios.SCENARIOS)))
def test_two_ranks_match_one_rank_with_twice_the_batch(two_ranks, tmp_path, name):
    trainer = single(name, tmp_path)
    padded = ("padded", "prefix_fused", "vision")
    skip = PADDING_KEYS if name in padded else PADDING_KEYS - {"num_tokens"}
    got = torch.load(two_ranks / f"{name}.pt", weights_only=False)
    assert len(got["history"]) >= 4  # >= 3 steps plus the summary
    assert_same_run(got, scenarios.history(trainer), scenarios.weights(trainer), skip)
    if name == "packed":  # eval ran on both sides; rank 1 had no pair in the last eval batch
        assert any("eval_loss" in h for h in got["history"])
    if name == "fp16_overflow":  # step 2 overflowed and was skipped (on both ranks: equal)
        assert trainer.grad_scaler.get_scale() == 2.0**9
        assert trainer.lr_scheduler.last_epoch == 2
    if name in scenarios.BY_PATH:  # equal, though rank 1 never read the weights itself
        path = scenarios.by_path_models(two_ranks, name)[0]
        assert (
            f"rank 1: {path} built on the meta device" in (two_ranks / "torchrun.log").read_text()
        )


def test_trainer_state_knows_process_zero(two_ranks):
    assert torch.load(two_ranks / "process_zero.pt") == [(True, True), (False, False)]


def test_a_stream_split_by_node_is_refused(two_ranks):
    assert "split_dataset_by_node" in (two_ranks / "split_stream.txt").read_text()


def test_resume_on_two_ranks_continues_the_run(two_ranks):
    want = torch.load(two_ranks / "packed.pt", weights_only=False)
    got = torch.load(two_ranks / "resume2.pt", weights_only=False)
    assert_same_run(got, want["history"], want["weights"], RESUMED_SKIP)


def test_single_process_checkpoint_resumes_on_two_ranks(two_ranks):
    want = torch.load(two_ranks / "packed.pt", weights_only=False)
    got = torch.load(two_ranks / "from_one.pt", weights_only=False)
    assert_same_run(got, want["history"], want["weights"], RESUMED_SKIP)


def test_async_checkpoints_publish_complete_and_resume(two_ranks, tmp_path):
    """Checkpoints written in the background: the run is unchanged, both become visible (the
    last one before train() returns), and the step-3 one resumes exactly on one process."""
    want = torch.load(two_ranks / "packed.pt", weights_only=False)
    got = torch.load(two_ranks / "async.pt", weights_only=False)
    assert_same_run(got, want["history"], want["weights"], PADDING_KEYS - {"num_tokens"})
    assert [p.name for p in ckpt.list_checkpoints(two_ranks / "async")] == [
        "checkpoint-3", "checkpoint-6"]  # fmt: skip
    assert not list((two_ranks / "async").glob(".checkpoint-*"))
    resumed = scenarios.build_trainer("packed", 1, tmp_path)
    resumed.train(resume_from_checkpoint=str(two_ranks / "async" / "checkpoint-3"))
    got = {"history": scenarios.history(resumed), "weights": scenarios.weights(resumed)}
    assert_same_run(got, want["history"], want["weights"], RESUMED_SKIP)


def test_export_reloads_with_from_pretrained_and_scores_the_same(two_ranks, tmp_path):
    from transformers import AutoModelForCausalLM

    from csd_fast.batch import collate_padded
    from csd_fast.forward import sequence_forward

    trainer = single("packed", tmp_path)  # the same run on one process
    exported = AutoModelForCausalLM.from_pretrained(two_ranks / "export", dtype=torch.float32)
    assert not any("lora" in k for k in exported.state_dict())
    examples = [dict(trainer.train_pairs[i]) for i in range(6)]
    batch = collate_padded(examples, trainer.processing_class.pad_token_id)
    with torch.no_grad():
        want = sequence_forward(trainer.model.eval(), batch, with_stats=False)
        got = sequence_forward(exported.eval(), batch, with_stats=False)
    torch.testing.assert_close(got.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected_logps, want.rejected_logps, rtol=1e-5, atol=1e-5)


def read_columns(table_dir: Path) -> dict:
    from csd_fast.refstore import RefStore, read_manifest

    m = read_manifest(table_dir)
    store = RefStore(table_dir.parent, m["components"], m["num_rows"], labels=m.get("labels"),
                     shard_rows=m["shard_rows"])  # fmt: skip
    return store.load_columns()


def test_reference_store_written_by_two_ranks_is_complete_and_reused(two_ranks, tmp_path):
    """The store the two ranks wrote (each its share of the shards) verifies, equals the one a
    single process writes, and a second two-rank run trains from it with the same result."""
    import numpy as np

    from csd_fast.refstore import list_tables, verify_table

    single("ref_store", tmp_path)  # one process writes all the shards itself
    mine = {p.name: p for p, _ in list_tables(tmp_path / "refstore")}
    theirs = {p.name: p for p, _ in list_tables(two_ranks / "ref_store" / "refstore")}
    assert mine and mine.keys() == theirs.keys()  # the same tables (world size is no part)
    for name, table in theirs.items():
        assert verify_table(table) == {}  # every shard present, every checksum right
        assert len(list(table.glob("shard-*.safetensors"))) == 5
        a, b = (read_columns(t) for t in (table, mine[name]))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    log = (two_ranks / "torchrun.log").read_text()  # rank 0's reports: it built 3 of the 5
    assert "0/5 shards reused; 3 built)" in log and "5/5 shards reused)" in log  # then all read
    want = torch.load(two_ranks / "ref_store.pt", weights_only=False)
    got = torch.load(two_ranks / "ref_store_hit.pt", weights_only=False)
    assert_same_run(got, want["history"], want["weights"], PADDING_KEYS - {"num_tokens"})


def test_export_merges_lora_checkpoints_sharded_and_single_process(two_ranks, tmp_path):
    """`csd export` of a LoRA run's checkpoint (2-rank DCP, and the 1-process adapter
    directory with --base_model): a full model whose log-probs are the trained PEFT model's."""
    from transformers import AutoModelForCausalLM

    from csd_fast.__main__ import main
    from csd_fast.batch import collate_padded
    from csd_fast.forward import sequence_forward

    for scenario in ("lora", "by_path_lora_tied"):  # the tied one: its head's adapter unties it
        trainer = single(scenario, tmp_path / scenario)  # 3 steps: checkpoint-3 is its final state
        tok = trainer.processing_class
        base = tmp_path / "base"  # the scenario's base weights, as the 1-process adapter needs
        scenarios.tiny_model(tok, tied=scenario in scenarios.TIED).save_pretrained(base)
        examples = [dict(trainer.train_pairs[i]) for i in range(6)]
        batch = collate_padded(examples, tok.pad_token_id)
        with torch.no_grad():
            want = sequence_forward(trainer.model.eval(), batch, with_stats=False)
        sources = {
            "dcp": [str(two_ranks / scenario / "checkpoint-3")],
            "adapter": [str(tmp_path / scenario / "checkpoint-3"), "--base_model", str(base)],
        }
        for name, (ckpt_dir, *extra) in sources.items():
            out = tmp_path / f"{scenario}-{name}"
            assert main(["export", ckpt_dir, str(out), *extra]) == 0, (scenario, name)
            exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            assert not any("lora" in k for k in exported.state_dict()), name  # merged
            with torch.no_grad():
                got = sequence_forward(exported.eval(), batch, with_stats=False)
            for side in ("chosen_logps", "rejected_logps"):
                torch.testing.assert_close(
                    getattr(got, side), getattr(want, side), rtol=1e-5, atol=1e-5,
                    msg=f"{scenario} {name} {side}",
                )  # fmt: skip
    # the in-memory model's adapter records no base model: it cannot be merged alone (exit 2)
    assert main(["export", str(tmp_path / "lora" / "checkpoint-3"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_export_command_writes_the_same_model_from_a_sharded_checkpoint(two_ranks, tmp_path):
    from safetensors.torch import load_file

    from csd_fast.__main__ import main

    assert main(["export", str(two_ranks / "packed" / "checkpoint-6"), str(tmp_path / "m")]) == 0
    got = load_file(tmp_path / "m" / "model.safetensors")
    want = load_file(two_ranks / "export" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_sharded_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    """Saved by two ranks at step 3, resumed on one process with the global batch."""
    want = torch.load(two_ranks / "packed.pt", weights_only=False)
    resumed = scenarios.build_trainer("packed", 1, two_ranks / "packed_copy")
    resumed.train(resume_from_checkpoint=str(two_ranks / "packed" / "checkpoint-3"))
    got = {"history": scenarios.history(resumed), "weights": scenarios.weights(resumed)}
    assert_same_run(got, want["history"], want["weights"], RESUMED_SKIP)


def test_kill_9_of_one_rank_fails_cleanly_and_resume_works(two_ranks, tmp_path):
    start = time.monotonic()
    proc = torchrun(tmp_path, "kill", timeout=180)  # a hang would raise TimeoutExpired
    assert proc.returncode != 0
    assert time.monotonic() - start < 180
    run = tmp_path / "killed"
    # the step-6 checkpoint never became visible; step 3's is complete and is what resume picks
    assert ckpt.latest_checkpoint(run).name == "checkpoint-3"
    assert not (run / "checkpoint-6").exists()
    want = torch.load(two_ranks / "packed.pt", weights_only=False)
    resumed = scenarios.build_trainer("packed", 1, run)
    resumed.train(resume_from_checkpoint=True)
    got = {"history": scenarios.history(resumed), "weights": scenarios.weights(resumed)}
    assert_same_run(got, want["history"], want["weights"], RESUMED_SKIP)


def test_model_fingerprint_is_rank_independent_and_equals_the_unsharded_one(two_ranks, tmp_path):
    from csd_fast.refcache import model_fingerprint

    prints = torch.load(two_ranks / "fingerprints.pt")
    unsharded = model_fingerprint(scenarios.build_trainer("padded", 1, tmp_path).model)
    assert prints == [unsharded, unsharded]
