"""TRL's DPO quickstart with one line changed: the import. Runs on the built-in tiny demo model.

    python examples/trl_quickstart.py                 # TRL's defaults: 3 epochs over 640 pairs
    python examples/trl_quickstart.py --max_steps 5   # a quick smoke run

TRL's version (README "DPOTrainer") loads Qwen/Qwen2.5-0.5B-Instruct and
trl-lib/ultrafeedback_binarized from the Hub; here the model and the preference file come from
`csd_fast.demo.build_demo` (built locally, no downloads). Everything below the marked import is
the quickstart as TRL writes it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from csd_fast import DPOConfig, DPOTrainer  # was: from trl import DPOConfig, DPOTrainer
from csd_fast.demo import build_demo


def main(workdir: str | Path, **overrides) -> DPOTrainer:
    assets = build_demo(workdir)  # stands in for the Hub model and dataset

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    train_dataset = load_dataset("json", data_files=str(assets.train_file), split="train")

    training_args = DPOConfig(output_dir=str(Path(workdir) / "tiny-llama-DPO"), **overrides)
    trainer = DPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", "--max-steps", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir)")
    cli = parser.parse_args()
    extra = {} if cli.max_steps is None else {"max_steps": cli.max_steps}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = main(cli.workdir or tmp, **extra)
        steps = [h for h in trainer.state.log_history if "loss" in h]
        print(
            f"trained {trainer.state.global_step} steps; last log: {steps[-1] if steps else None}"
        )
