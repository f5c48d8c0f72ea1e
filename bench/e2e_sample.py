"""`csd sample`'s harness vs bare `LLM.generate` on the same prompts and engine (vLLM).

    python -m bench --only sample --quick

Both providers share one engine configuration (the cpu / cuda profile) and the same prompts,
n=K per request with per-prompt seeds. `bare` times `llm.generate` alone; `harness` times what
`csd sample` does per shard on top: chat-template rendering, the engine call, the sample rows,
an Arrow table, an atomic zstd Parquet write with fsync, the checksum record and the manifest.
The goal is <= 5% overhead (samples/s harness / bare >= 0.95). Engine start-up is outside both.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench.common import Case, Skip

NAME = "sample"
MODES = ("generate",)
PROVIDERS = ("bare", "harness")
PRESETS = {
    "smoke": [{"prompts": 8, "K": 2, "T": 8}],
    "quick": [{"prompts": 32, "K": 8, "T": 32}],
    "gpu": [{"prompts": 256, "K": 64, "T": 512}],
}


def _assets() -> tuple[Path, Path]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.sampling.models import build_policy, write_prompts

    root = Path(tempfile.mkdtemp(prefix="bench-sample-"))
    return build_policy(root / "policy"), write_prompts(root / "prompts.jsonl", 4096)


def setup(provider, mode, shape, device) -> Case:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise Skip(f"vllm not installed: {e}") from None
    from csd_fast.sampling import engines, inputs, profiles, sample, store

    profile = profiles.resolve_profile("cpu" if device == "cpu" else "auto")
    profiles.apply_env(dict(profile.env, VLLM_CPU_KVCACHE_SPACE="1"))
    model, prompt_file = _assets()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = inputs.load_prompts(prompt_file)[: shape["prompts"]]
    engine = engines.VllmEngine(str(model), profile.engine, seed=0, max_model_len=256)
    params = engines.GenParams(n=shape["K"], temperature=1.0, max_tokens=shape["T"])
    seeds = [sample.prompt_seed(0, r.id, r.lang) for r in rows]
    items = {"samples": shape["prompts"] * shape["K"]}
    if provider == "bare":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = [TokensPrompt(prompt_token_ids=inputs.render_prompt(tok, r)) for r in rows]
        sps = [SamplingParams(n=shape["K"], max_tokens=shape["T"], seed=s) for s in seeds]
        return Case(fn=lambda: engine.llm.generate(ids, sps, use_tqdm=False), items=items)

    out = Path(tempfile.mkdtemp(prefix="bench-sample-out-"))

    def harness():
        shutil.rmtree(out, ignore_errors=True)
        st = store.ShardStore(out, "samples", {}, {}, num_units=len(rows), shard_size=len(rows))
        ids = [inputs.render_prompt(tok, r) for r in rows]
        comps = engine.generate(ids, params, seeds)
        table_rows, _ = sample.sample_rows(
            rows, comps, seeds, drop_truncated=False, drop_duplicates=False
        )
        import pyarrow as pa

        st.write(0, pa.Table.from_pylist(table_rows, schema=sample.samples_schema()))

    os.environ.setdefault("TQDM_DISABLE", "1")
    return Case(fn=harness, items=items)
