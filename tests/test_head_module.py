"""The LM head as a module (`LogprobHead`), LoRA on the head, and checkpoint key rules.

* a LoRA adapter on lm_head is honoured: log-probs equal PEFT's own logits' log_softmax, and
  turn back to the base model's with the adapters disabled;
* the head's class swap keeps the state dict and the plain `head(hidden)` logits;
* `load_weights`: only a tied head may be missing from a checkpoint;
* prefetching micro-batches in DataLoader workers changes nothing in a run.

Run: python -m pytest tests/test_head_module.py -q
"""

from __future__ import annotations

import pytest
import torch
from data_helpers import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from csd_fast import checkpoint as ckpt
from csd_fast.batch import collate_padded
from csd_fast.forward import install_logprob_head, sequence_forward


def model_and_batch(tied: bool = False):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                      tie_word_embeddings=tied)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    examples = [
        {k: torch.randint(3, 61, (n,), generator=g).tolist() for k, n in zip(
            ("prompt_ids", "chosen_ids", "rejected_ids"), (4 + i, 3 + i, 5 - i), strict=True)}
        for i in range(3)
    ]  # fmt: skip
    return LlamaForCausalLM(cfg), collate_padded(examples, pad_token_id=0)


def logits_truth(model, batch):
    """log_softmax of the model's own logits, gathered and summed per sequence (fp32)."""
    logits = model(**batch.model_kwargs).logits.float()
    flat = logits.flatten(0, 1).log_softmax(-1)[batch.token_index]
    token = flat.gather(1, batch.token_labels[:, None]).squeeze(1)
    seq = torch.zeros(batch.seq_offsets.numel() - 1).index_add(0, batch.sequence_ids(), token)
    P = batch.num_pairs
    return seq[:P], seq[P:]


@pytest.mark.parametrize("impl", ["eager", "chunked"])
def test_lora_on_lm_head_is_honoured(impl):
    from peft import LoraConfig, get_peft_model

    model, batch = model_and_batch()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    peft_model = get_peft_model(model, lora)
    for name, p in peft_model.named_parameters():  # B = 0 at init: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        want_c, want_r = logits_truth(peft_model, batch)
        out = sequence_forward(peft_model, batch, head_impl=impl, with_stats=False)
        torch.testing.assert_close(out.chosen_logps, want_c, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out.rejected_logps, want_r, rtol=1e-5, atol=1e-4)
        with peft_model.disable_adapter():
            base_c, _ = logits_truth(peft_model, batch)
            off = sequence_forward(peft_model, batch, head_impl=impl, with_stats=False)
        torch.testing.assert_close(off.chosen_logps, base_c, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(base_c, want_c, atol=1e-2)  # the adapter changed the head


def test_lora_head_gradients_reach_the_adapter():
    from peft import LoraConfig, get_peft_model

    model, batch = model_and_batch()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head"]))
    out = sequence_forward(peft_model, batch, with_stats=False)
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_head_module_keeps_state_dict_and_plain_logits():
    model, batch = model_and_batch()
    keys = list(model.state_dict())
    h = torch.randn(5, 32)
    want = model.lm_head(h)
    head = install_logprob_head(model)
    assert head is model.lm_head and list(model.state_dict()) == keys
    torch.testing.assert_close(head(h), want)
    assert install_logprob_head(model) is head  # idempotent


@pytest.mark.parametrize("tied", [False, True])
def test_only_a_tied_head_may_be_missing_from_a_checkpoint(tmp_path, tied):
    from safetensors.torch import save_file

    model, _ = model_and_batch(tied)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp_path.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    fresh, _ = model_and_batch(tied)
    if tied:
        ckpt.load_weights(fresh, tmp_path)
        assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    else:
        with pytest.raises(ValueError, match="lm_head.weight"):
            ckpt.load_weights(fresh, tmp_path)


def test_dataloader_workers_give_the_same_run(tmp_path):
    from test_trainer import ROWS, make_args, tiny_model

    from csd_fast import DPOTrainer

    tok = tiny_tokenizer()
    runs = []
    for workers in (0, 2):
        args = make_args(tmp_path / str(workers), max_steps=2, padding_free=True,
                         dataloader_num_workers=workers)  # fmt: skip
        t = DPOTrainer(tiny_model(tok), args=args, train_dataset=ROWS, processing_class=tok)
        t.train()
        runs.append(t)
    for (n, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b), n
