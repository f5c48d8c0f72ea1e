"""`csd eval`: language fidelity, code-switching, reward, win rate, length, and the written outputs.

Hand-made responses in known languages with known scores give exact expected numbers; a tiny
local reward model checks the scoring path against a plain transformers forward.
Run: python -m pytest tests/pipeline/test_eval.py -q
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from csd_fast.pipeline.eval import EvalSettings, evaluate, format_table, main
from csd_fast.pipeline.responses import read_responses, write_shard

EN = "The weather is lovely today and we are going to the park with the children."
DA = "Vejret er dejligt i dag, og vi skal i parken med børnene og hunden bagefter."
MIXED = EN + " " + DA
DE = "Das Wetter ist heute schön und wir gehen mit den Kindern in den Park."


def row(pid, lang, response, score, tokens=10, finish="stop", k=0):
    return {
        "prompt_id": pid, "sample_index": k, "prompt": f"prompt {pid}", "lang": lang,
        "group": pid, "response": response, "num_tokens": tokens, "finish_reason": finish,
        "score": score,
    }  # fmt: skip


BASE = [
    row("1", "da", EN, 0.0),
    row("2", "da", DA, 1.0),
    row("3", "en", EN, 2.0, tokens=20, finish="length"),
    row("4", "en", EN, 0.5),
]
TUNED = [
    row("1", "da", DA, 1.0, tokens=6),  # win
    row("2", "da", MIXED, 1.0, tokens=30, finish="length"),  # tie
    row("3", "en", EN, 1.0),  # loss
    row("4", "en", DA, 3.0),  # win
]


def test_metrics_by_hand(tmp_path):
    result = evaluate({"base": BASE, "tuned": TUNED}, tmp_path, EvalSettings(baseline="base"))
    base, tuned = result.table["base"], result.table["tuned"]
    assert base["da"]["fidelity"] == 0.5 and base["en"]["fidelity"] == 1.0
    # MIXED is identified as one language or the other, but it is a code switch
    assert tuned["da"]["code_switch"] == 0.5 and base["da"]["code_switch"] == 0.0
    assert tuned["en"]["fidelity"] == 0.5
    assert tuned["da"]["win_rate"] == 0.5 and tuned["da"]["tie_rate"] == 0.5
    assert tuned["en"]["win_rate"] == 0.5 and tuned["en"]["tie_rate"] == 0.0
    assert tuned["all"]["win_rate"] == 0.5 and tuned["all"]["tie_rate"] == 0.25
    assert "win_rate" not in base["da"]  # the baseline is not compared with itself
    assert base["en"]["reward"] == 1.25 and tuned["all"]["reward"] == 1.5
    assert tuned["da"]["mean_tokens"] == 18 and tuned["da"]["truncation"] == 0.5
    assert base["en"]["truncation"] == 0.5 and base["all"]["n"] == 4
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result.table))
    with open(tmp_path / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"system": "tuned", "lang": "da", "metric": "tie_rate", "value": "0.5"} in rows
    for metric in ("fidelity", "code_switch", "reward", "win_rate", "truncation"):
        assert (tmp_path / f"eval_{metric}.png").stat().st_size > 0
    table = format_table(result)
    assert table.splitlines()[0].split()[-2:] == ["base", "tuned"]  # one column per system


def test_other_language_is_not_faithful(tmp_path):
    rows = [row("1", "da", DE, 0.0), row("2", "da", DA, 0.0)]
    got = evaluate({"m": rows}, tmp_path, EvalSettings(extra_languages=("en", "de"), plots=False))
    assert got.table["m"]["da"]["fidelity"] == 0.5


def _tiny_rm(path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from csd_fast.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    tok.chat_template = None  # plain prompt + response
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, num_labels=1,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_reward_model_scores_are_raw_logits_and_cached(tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from csd_fast.pipeline.judges import RewardScorer

    tok = _tiny_rm(tmp_path / "rm")
    rows = [
        {k: v for k, v in r.items() if k != "score"}
        | {"prompt": "Clara likes soup. What does Clara like?", "response": resp}
        for r, resp in zip(BASE, [" Clara likes soup.", " Clara kan lide suppe.", " tea", " a"],
                           strict=True)
    ]  # fmt: skip
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    want = []
    for r in rows:  # one unpadded sequence at a time: no batching, no padding logic involved
        ids = tok(r["prompt"] + r["response"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want.append(float(rm(input_ids=ids).logits[0, 0]))
    got = RewardScorer(str(tmp_path / "rm"), batch_size=3).score(
        [r["prompt"] for r in rows], [r["response"] for r in rows]
    )
    assert got == pytest.approx(want, abs=1e-5)
    settings = EvalSettings(reward_model=str(tmp_path / "rm"), plots=False)
    first = evaluate({"m": rows}, tmp_path / "out", settings)
    assert first.table["m"]["all"]["reward"] == pytest.approx(sum(want) / 4, abs=1e-5)

    def no_scoring(*a, **k):
        raise AssertionError("scores should come from the cache")

    monkeypatch.setattr(RewardScorer, "score", no_scoring)
    again = evaluate({"m": rows}, tmp_path / "out", settings)
    assert again.table == first.table


def test_cli_generates_with_a_model_and_reports_bad_files(tmp_path, capsys):
    from csd_fast.demo import build_demo

    assets = build_demo(tmp_path / "demo")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt_id": "a", "prompt": "Clara likes soup. What does Clara like?",
                    "lang": "en"}) + "\n"
        + json.dumps({"prompt_id": "b", "prompt": "Clara kan lide suppe. Hvad kan Clara lide?",
                      "lang": "da"}) + "\n"
    )  # fmt: skip
    out = tmp_path / "eval"
    flags = ["--model", f"demo={assets.model_dir}", "--prompts", str(prompts), "--num_samples"]
    flags += ["3", "--max_new_tokens", "6", "--output_dir", str(out), "--no_plots"]
    assert main(flags) == 0
    generated = read_responses(out / "responses-demo")
    assert len(generated) == 6 and {r["sample_index"] for r in generated} == {0, 1, 2}
    assert all(r["finish_reason"] in ("stop", "length") and r["num_tokens"] <= 6 for r in generated)
    assert "demo" in capsys.readouterr().out
    shard = next((out / "responses-demo").glob("shard-*.parquet"))
    stamp = shard.stat().st_mtime_ns
    assert main(flags) == 0 and shard.stat().st_mtime_ns == stamp  # resumed: not regenerated

    write_shard(tmp_path / "bad" / "shard-00000.parquet", [{"prompt_id": "1", "prompt": "p"}])
    assert main(["--responses", f"x={tmp_path / 'bad'}", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "shard-00000.parquet" in err and "'lang'" in err
