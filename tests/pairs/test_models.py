"""Strategies that run models: ICR log-probs through the engine == plain torch; the cm-align
encoder's mean pooling; `csd pairs` end to end with its report.

    python -m pytest -q tests/pairs/test_models.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.sampling.models import build_policy

PROMPTS = ["The car is red.", "What colour is the sky?"]
ROWS = [  # group g1: English + German samples; ICR scores all of them against the English prompt
    {
        "prompt_id": "e1",
        "lang": "en",
        "group": "g1",
        "prompt": PROMPTS[0],
        "sample_index": k,
        "response": resp,
        "messages": None,
    }
    for k, resp in enumerate([" The sky is blue.", " It is red.", " Blue."])
] + [
    {
        "prompt_id": "d1",
        "lang": "de",
        "group": "g1",
        "prompt": "Das Auto ist rot.",
        "sample_index": k,
        "response": resp,
        "messages": None,
    }
    for k, resp in enumerate([" Der Himmel ist blau.", " Rot.", " The car is red."])
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("icr")
    pol, ref = build_policy(root / "policy", seed=1), build_policy(root / "ref", seed=2)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    return load(pol), load(ref), AutoTokenizer.from_pretrained(pol)


def _plain_logp(model, tok, prompt: str, response: str) -> float:
    """TRL's tokenization (prompt ids, completion ids + EOS), one unpadded forward, fp32."""
    from csd_fast.data import tokenize_pairs

    other = " Red." if response != " Red." else " Blue."  # TRL refuses identical pairs
    ex = tokenize_pairs(
        [{"prompt": prompt, "chosen": response, "rejected": other}], tok, cache_dir=None
    )[0]
    ids = torch.tensor([ex["prompt_ids"] + ex["chosen_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    p = len(ex["prompt_ids"])
    logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[p - 1 :].sum())


def test_icr_rewards_match_plain_torch(models):
    from csd_fast.pairs import build_pairs
    from csd_fast.pairs.icr import icr_rewards

    pol, ref, tok = models
    rewards, ok = icr_rewards(ROWS, pol, ref, tok, beta=0.5, head_impl="eager", batch_pairs=2)
    assert ok.all()
    for r, got in zip(ROWS, rewards, strict=True):
        want = 0.5 * (
            _plain_logp(pol, tok, PROMPTS[0], r["response"])
            - _plain_logp(ref, tok, PROMPTS[0], r["response"])
        )
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    res = build_pairs(
        "icr", ROWS, policy=pol, reference=ref, tokenizer=tok, beta=0.5, head_impl="eager"
    )
    de = [p for p in res.pairs if p["lang"] == "de"][0]
    assert de["prompt"] == "Das Auto ist rot."  # paired under the language's own prompt
    de_rewards = rewards[3:]
    assert de["chosen"] == ROWS[3 + int(np.argmax(de_rewards))]["response"]
    assert de["rejected"] == ROWS[3 + int(np.argmin(de_rewards))]["response"]


def test_mean_pooled_encoder(models, tmp_path):
    from transformers import AutoModel

    from csd_fast.pairs.cm_align import MeanPooledEncoder

    path = build_policy(tmp_path / "enc", seed=4)
    enc = MeanPooledEncoder(str(path), batch_size=2)
    texts = ["The car is red.", "Blue.", "Der Himmel ist blau und das Auto ist rot."]
    got = enc(texts)
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    for t, e in zip(texts, got, strict=True):
        with torch.no_grad():
            h = base(**enc.tokenizer(t, return_tensors="pt")).last_hidden_state[0]
        want = torch.nn.functional.normalize(h.mean(0), dim=-1).numpy()
        np.testing.assert_allclose(e, want, rtol=1e-4, atol=1e-5)  # padding never counted


def test_csd_pairs_command_writes_pairs_and_report(tmp_path):
    from csd_fast.pairs.cli import main

    rows = []
    for pid, lang, rewards in [
        ("a", "en", [1.0, 3.0, 2.0]),
        ("b", "de", [0.5, 0.5]),
        ("c", "de", [2.0, -2.0]),
        ("d", "de", [1.0]),
    ]:
        for k, r in enumerate(rewards):
            rows.append(
                {
                    "prompt_id": pid,
                    "lang": lang,
                    "prompt": f"q {pid}",
                    "sample_index": k,
                    "response": f"{pid}{k}",
                    "reward": r,
                    "messages": None,
                }
            )
    rows.append(dict(rows[0], sample_index=9, response="  ", reward=99.0))  # empty: left out
    src = tmp_path / "scores.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pairs.parquet"
    assert main(["--scores", str(src), "--strategy", "paired", "--output", str(out)]) == 0
    import pyarrow.parquet as pq

    pairs = pq.read_table(out).to_pylist()
    assert [(p["prompt_id"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("a", "a1", "a0"),
        ("c", "c0", "c1"),
    ]
    report = json.loads((tmp_path / "pairs.parquet.report.json").read_text())
    assert report["skipped"] == {"all_tied": 1, "too_few": 1}
    assert report["languages"]["de"]["pairs"] == 1
    assert report["languages"]["de"]["skipped"] == {"all_tied": 1, "too_few": 1}
    assert report["languages"]["en"]["reward_gap"]["median"] == 2.0
    assert report["empty_responses_left_out"] == 1
    assert (tmp_path / "pairs.parquet.report.png").stat().st_size > 0
