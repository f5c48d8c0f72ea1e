"""Options (- and _, --config), inputs (formats, stable ids, chat templates), profiles.

python -m pytest -q tests/sampling/test_options.py
"""

from __future__ import annotations

import json

import pytest

from csd_fast.sampling import profiles
from csd_fast.sampling.inputs import load_prompts, render_prompt, stable_id
from csd_fast.sampling.options import Option, UsageError, parse_options
from csd_fast.sampling.sample import OPTIONS, prompt_seed, strip_dp_flags

OPTS = [
    Option("num_samples", int, 8, "k"),
    Option("stop", list, [], "stops"),
    Option("drop_truncated", bool, False, "drop"),
    Option("engine_arg", dict, {}, "args"),
]


def test_flags_spelt_both_ways_and_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-samples: 3\nstop: ['</s>']\nengine_arg: {max_num_seqs: 512}\n")
    v = parse_options("t", "", OPTS, ["--config", str(cfg), "--drop_truncated"])
    assert (v["num_samples"], v["stop"], v["drop_truncated"]) == (3, ["</s>"], True)
    assert v["engine_arg"] == {"max_num_seqs": 512}
    v = parse_options(
        "t",
        "",
        OPTS,
        [
            "--config",
            str(cfg),
            "--num_samples",
            "5",
            "--stop",
            "a,b",
            "--engine-arg",
            "max-num-seqs=64",
            "--no-drop-truncated",
        ],
    )
    assert (v["num_samples"], v["stop"], v["drop_truncated"]) == (5, ["a", "b"], False)
    assert v["engine_arg"] == {"max_num_seqs": 64}
    assert parse_options("t", "", OPTS, [])["drop_truncated"] is False
    cfg.write_text("num_sample: 3\n")
    with pytest.raises(UsageError):
        parse_options("t", "", OPTS, ["--config", str(cfg)])


def test_prompt_formats_and_stable_ids(tmp_path):
    rows = [
        {"prompt": "Hi there", "lang": "en"},
        {"messages": [{"role": "user", "content": "Q?"}]},
        {"prompt": "Hi there", "lang": "de", "id": 7, "group": 1},
        {"prompt": "Hi there", "lang": "en"},
    ]  # an exact repeat without id: dropped
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompts(jsonl)
    assert [r.id for r in got] == [
        stable_id("en", "Hi there", None),
        stable_id(None, "Q?", (("user", "Q?"),)),
        "7",
    ]
    assert got[1].messages == (("user", "Q?"),) and got[2].group == "1"
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "A", "lang": "en"}, {"prompt": "B", "lang": "en"}])
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    ids = [r.id for r in load_prompts(tmp_path / "p.parquet")]
    assert (
        ids
        == [r.id for r in load_prompts(tmp_path / "saved")]
        == [stable_id("en", "A", None), stable_id("en", "B", None)]
    )


def test_repeated_prompt_ids_are_not_ids(tmp_path):
    """K samples of a prompt share its prompt_id: read back (e.g. to translate responses) each
    row keeps a content id of its own, as before prompt_id counted as an id."""
    rows = [{"prompt_id": "p1", "prompt": "Q?", "lang": "en", "response": f"A{k}"} for k in (0, 1)]
    f = tmp_path / "samples.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_prompts(f, keep=("response",))
    assert len({r.id for r in got}) == 2 and "p1" not in {r.id for r in got}
    # unique per language (a csd output read back as prompts): they are the ids
    rows = [{"prompt_id": "3", "prompt": "Q?", "lang": lang} for lang in ("en", "da")]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r.id, r.lang) for r in load_prompts(f)] == [("3", "en"), ("3", "da")]


def test_bad_rows_are_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "a", "id": 1}) + "\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl.*row 1 \(line 2\)"):
        load_prompts(f)
    f.write_text(json.dumps({"prompt": "a", "id": 1}) + "\n" + json.dumps({"prompt": "b", "id": 1}))
    with pytest.raises(ValueError, match="already used by row 0"):
        load_prompts(f)


def test_chat_template_rendering():
    from csd_fast.demo.assets import build_demo_tokenizer
    from csd_fast.sampling.inputs import PromptRow

    tok = build_demo_tokenizer()
    row = PromptRow("x", "en", None, "The car is red.", None, 0)
    ids = render_prompt(tok, row)
    expect = tok.apply_chat_template(
        [{"role": "user", "content": "The car is red."}], add_generation_prompt=True, tokenize=True
    )
    expect = expect["input_ids"] if hasattr(expect, "keys") else expect
    assert ids == list(expect) and ids.count(tok.bos_token_id) == 1
    plain = render_prompt(tok, row, chat_template="none")
    assert plain == tok("The car is red.")["input_ids"]


def test_profiles_set_and_override(monkeypatch):
    mi = profiles.resolve_profile("rocm-mi250x", {"max_num_seqs": 2048}, {"FOO": "1"})
    assert mi.engine["max_num_seqs"] == 2048 and mi.sources["max_num_seqs"] == "override"
    assert mi.engine["max_num_batched_tokens"] > 8192 and mi.engine["dtype"] == "bfloat16"
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "4,5,6")
    mi = profiles.resolve_profile("rocm-mi250x")
    assert mi.devices == ["4", "5", "6"]
    env = mi.device_env("5")
    assert env["HIP_VISIBLE_DEVICES"] == "5" and env["ROCR_VISIBLE_DEVICES"] is None
    assert env["CUDA_VISIBLE_DEVICES"] is None and env["VLLM_ROCM_USE_AITER"] == "0"
    cuda = profiles.resolve_profile("cuda")
    assert cuda.engine["enforce_eager"] is False and cuda.engine["enable_chunked_prefill"]
    assert (
        "engine max_num_seqs = 2048 (override)"
        in profiles.resolve_profile("cpu", {"max_num_seqs": 2048}).describe()
    )
    assert profiles.resolve_profile("auto").name == "cpu"  # no accelerator here or in CI


def test_seeds_and_child_command_line():
    assert prompt_seed(0, "a", "en") == prompt_seed(0, "a", "en") != prompt_seed(1, "a", "en")
    assert prompt_seed(0, "a", "en") != prompt_seed(0, "a", "de")
    argv = ["--model", "m", "--overwrite", "--data-parallel", "2", "--output=o", "--overwrite=1"]
    assert strip_dp_flags(argv) == ["--model", "m", "--output=o"]
    assert {o.name for o in OPTIONS if o.output} >= {"temperature", "seed", "num_samples"}


@pytest.mark.parametrize("name", ["sample", "score", "translate", "pairs"])
def test_every_subcommand_has_help(name, capsys):
    from csd_fast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_translate_rows_with_one_prompt_and_two_responses_stay_apart(tmp_path):
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps({"prompt": "Q", "response": r}) + "\n" for r in ("A", "B")))
    rows = load_prompts(f, keep=("response",))
    assert [dict(r.extra)["response"] for r in rows] == ["A", "B"] and rows[0].id != rows[1].id
    assert len(load_prompts(f)) == 1  # as sampling prompts they are one prompt


def test_sample_rows_drop_truncated_and_duplicates():
    from csd_fast.sampling.engines import Completion
    from csd_fast.sampling.inputs import PromptRow
    from csd_fast.sampling.sample import sample_rows

    row = PromptRow("p1", "en", "g", "Q", None, 0)
    comps = [
        Completion([5, 2], "a", "stop", -1.0),
        Completion([5, 6, 7], "b c", "length", -2.0),
        Completion([5, 2], "a", "stop", -1.0),
        Completion([8, 2], "d", "stop", -0.5),
    ]
    rows, dropped = sample_rows([row], [comps], [11], drop_truncated=True, drop_duplicates=True)
    assert [(r["sample_index"], r["response"]) for r in rows] == [(0, "a"), (3, "d")]
    assert dropped == {"truncated": 1, "duplicate": 1}
    assert rows[0]["seed"] == 11 and rows[0]["num_tokens"] == 2 and rows[0]["group"] == "g"
    kept, _ = sample_rows([row], [comps], [11], drop_truncated=False, drop_duplicates=False)
    assert [r["sample_index"] for r in kept] == [0, 1, 2, 3]
