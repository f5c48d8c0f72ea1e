"""The `transformers.Trainer` / TRL members that scripts and callbacks use, on our own loop.

    trainer = DPOTrainer(...)                  # csd_fast.trainer.DPOTrainer inherits TrainerAPI
    trainer.train_dataset, trainer.eval_dataset        # the tokenized sets (dict: named sets)
    trainer.accelerator.print("done")                  # accelerate's own Accelerator
    trainer.predict(test_ds).metrics                   # {"test_loss": ..., "test_rewards/...": ...}
    trainer.save_state(); trainer.create_model_card(dataset_name="my/data")
    trainer.push_to_hub(dataset_name="my/data"); trainer.hub_model_id; trainer.end()

What TRL's own `trl/scripts/dpo.py` and common callbacks use, with the same names, arguments
and return types as transformers 5 / TRL 1.16. The engine's numerics stay in trainer.py and
loop.py; this module holds only the surface. Tests: tests/test_trainer_api.py.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import torch

# what TRL's DPOTrainer declares: model tags, the trainer's name and the paper the card cites
TAG_NAMES = ["trl", "dpo", "csd-fast"]
DPO_PAPER = {
    "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    "id": "2305.18290",
    "citation": textwrap.dedent("""\
        @inproceedings{rafailov2023direct,
            title        = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
            author       = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
            year         = 2023,
            booktitle    = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023)},
            url          = {https://arxiv.org/abs/2305.18290},
        }"""),  # noqa: E501
}
# checkpoints and private files never go to the Hub (transformers' ignore patterns)
_PUSH_IGNORE = ["_*", "checkpoint-*"]


class _CallbackView:
    """`trainer.callback_handler`: the callback list, add/pop/remove, and `on_*` event calls."""

    def __init__(self, trainer):
        self._trainer = trainer

    @property
    def callbacks(self) -> list:
        return self._trainer.callbacks

    @property
    def callback_list(self) -> str:
        return "\n".join(type(cb).__name__ for cb in self.callbacks)

    def add_callback(self, callback) -> None:
        self._trainer.add_callback(callback)

    def pop_callback(self, callback):
        return self._trainer.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self._trainer.pop_callback(callback)

    def __getattr__(self, event: str):
        if not event.startswith("on_"):
            raise AttributeError(event)

        def call(args=None, state=None, control=None, **kwargs):
            self._trainer._fire(event, **kwargs)
            return self._trainer.control

        return call


class _StreamBatches(torch.utils.data.IterableDataset):
    """One pass of a stream's micro-batches, collated (get_*_dataloader on an IterableDataset)."""

    def __init__(self, trainer, pairs, mode: str):
        self.trainer, self.pairs, self.mode = trainer, pairs, mode

    def __iter__(self):
        from csd_fast.streaming import StreamPlan

        t = self.trainer
        plan = StreamPlan(self.pairs, 0, t._batching(self.mode), None, t.args.stream_buffer_size,
                          t.dist.world_size)  # fmt: skip
        for idx in plan.view(t.dist.rank):
            if idx:  # (a rank may have no pairs in a stream's last global batch)
                yield t._collate(self.pairs, idx, self.mode)


class TrainerAPI:
    """Mixin: the Trainer surface (datasets, accelerator, predict, cards, Hub) over our loop."""

    _tag_names = TAG_NAMES
    _name = "DPO"
    _paper = DPO_PAPER
    hub_model_id: str | None = None

    # ------------------------------------------------------------------------- datasets
    @property
    def train_dataset(self):
        """The tokenized training set (rows of prompt_ids / chosen_ids / rejected_ids)."""
        return self.train_pairs

    @train_dataset.setter
    def train_dataset(self, dataset) -> None:
        self.train_pairs = None if dataset is None else self._tokenize(dataset, "train")

    @property
    def eval_dataset(self):
        """The tokenized eval set, or a dict name -> set for named eval sets."""
        return self.eval_pairs

    @eval_dataset.setter
    def eval_dataset(self, dataset) -> None:
        self.eval_pairs = None if dataset is None else self._tokenize_eval(dataset)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """One epoch of training micro-batches (`PairBatch`es, in the trainer's layout)."""
        if self.train_pairs is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._loader(self.train_pairs, "train")

    def get_eval_dataloader(self, eval_dataset=None) -> torch.utils.data.DataLoader:
        """The evaluation micro-batches of `eval_dataset` (a name of a named set, or a dataset)."""
        pairs = self._eval_sets(eval_dataset)
        if len(pairs) != 1:
            raise ValueError("get_eval_dataloader takes one set; name one of the named eval sets")
        return self._loader(next(iter(pairs.values())), "eval")

    def get_test_dataloader(self, test_dataset) -> torch.utils.data.DataLoader:
        """The micro-batches `predict(test_dataset)` runs on (evaluation batching)."""
        if test_dataset is None:
            raise ValueError("get_test_dataloader needs a test_dataset")
        return self.get_eval_dataloader(test_dataset)

    def _loader(self, pairs, mode: str) -> torch.utils.data.DataLoader:
        from csd_fast.streaming import StreamPairs

        if isinstance(pairs, StreamPairs):  # no length, no sampler: batches as the stream goes
            return torch.utils.data.DataLoader(_StreamBatches(self, pairs, mode), batch_size=None)
        plan = self._plan(pairs, mode, 0)
        return torch.utils.data.DataLoader(
            range(len(pairs)),
            batch_sampler=plan,
            collate_fn=lambda idx: self._collate(pairs, list(idx), mode),
        )

    # --------------------------------------------------------------------- processes
    @property
    def accelerator(self):
        """accelerate's `Accelerator` (print, main-process checks, gather, end_training)."""
        if getattr(self, "_accelerator", None) is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=self.device.type == "cpu")
        return self._accelerator

    def is_world_process_zero(self) -> bool:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank() == 0
        return int(os.environ.get("RANK", "0")) == 0

    def is_local_process_zero(self) -> bool:
        return int(os.environ.get("LOCAL_RANK", "0")) == 0

    @property
    def callback_handler(self) -> _CallbackView:
        return _CallbackView(self)

    def end(self) -> None:
        """Finish the trackers and the process group (transformers >= 5.18's `Trainer.end`)."""
        self.close_writer()
        if getattr(self, "_accelerator", None) is not None:
            self._accelerator.end_training()
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ----------------------------------------------------------------------- predict
    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`PredictionOutput(predictions, label_ids, metrics)` as transformers' `predict`.

        predictions / label_ids are TRL's: the logits and input ids of the padded
        [chosen..., rejected...] rows, concatenated over batches (padded with -100), unless
        `prediction_loss_only`.
        """
        from transformers.trainer_utils import PredictionOutput

        from csd_fast.trl_compat import check_new_eval_reference

        check_new_eval_reference(self)
        sets = self._eval_sets(test_dataset)
        if len(sets) != 1:
            raise ValueError("predict() takes one dataset, not named sets")
        ((name, pairs),) = sets.items()
        metrics = self._evaluate_set(pairs, name, metric_key_prefix, log=False)
        self._fire("on_predict", metrics=metrics)
        if self.args.prediction_loss_only:
            return PredictionOutput(None, None, metrics)
        logits, labels = self._eval_logits(pairs)
        return PredictionOutput(logits, labels, metrics)

    def _eval_logits(self, pairs) -> tuple[np.ndarray, np.ndarray]:
        """Full-vocabulary logits of each eval batch in TRL's padded layout (for compute_metrics).

        TRL recomputes them with a second forward (its fused head never builds logits); so do we,
        whatever the training layout, so the shapes are TRL's.
        """
        import dataclasses

        from csd_fast.batching import make_collate, stand_in

        opts = dataclasses.replace(self._batching("eval"), layout="padded")
        collate = make_collate(opts, self._pad_id)
        was_training = self.model.training
        self.model.eval()
        everyone = self._rank_plans(pairs, "eval", 0)
        mine: list[tuple[np.ndarray, np.ndarray] | None] = []  # per batch; None: a stand-in
        if self._sharded:  # the scorer root holds the embeddings and final norm: gather them
            self.scorer.unshard()
        with torch.no_grad():
            for k, idx in enumerate(everyone[self.dist.rank]):
                # a rank without pairs in this batch runs a stand-in (FSDP's forward is
                # collective) and keeps nothing of it
                run = idx or stand_in(everyone, k)
                batch = collate([dict(pairs[i]) for i in run]).to(self.device)
                inputs = {n: batch.model_kwargs[n] for n in ("input_ids", "attention_mask")}
                with self._autocast():
                    out = self.model(**inputs, use_cache=False)
                kept = (out.logits.float().cpu().numpy(), inputs["input_ids"].cpu().numpy())
                mine.append(kept if idx else None)
        if self._sharded:
            self.scorer.reshard()
        self.model.train(was_training)
        # every rank's rows, batch by batch in rank order (as accelerate's gather): each rank
        # then computes the same metrics (for a plateau schedule, the best checkpoint)
        shares = self.dist.all_gather_objects(mine) if self.dist.distributed else [mine]
        pieces = [rank[k] for k in range(len(mine)) for rank in shares if rank[k] is not None]
        logits, labels = [p[0] for p in pieces], [p[1] for p in pieces]
        return _concat_padded(logits), _concat_padded(labels)

    # ------------------------------------------------------------------------ saving
    def save_state(self) -> None:
        """`output_dir/trainer_state.json`: the TrainerState (log history, best metric, ...)."""
        if not self.is_world_process_zero():
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.state.save_to_json(os.path.join(self.args.output_dir, "trainer_state.json"))

    def create_model_card(self, model_name=None, dataset_name=None, tags=None) -> None:
        """`output_dir/README.md`: base model, TRL-style tags, how it was trained, citations."""
        if not self.is_world_process_zero():
            return
        from huggingface_hub import ModelCard, ModelCardData

        from csd_fast.forward import unwrap_causal_lm

        config = unwrap_causal_lm(self.model).config
        base = getattr(config, "_name_or_path", None) or None
        base = None if base is None or os.path.isdir(base) else base  # local dirs are no hub id
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags.update(self._tag_names)
        tags.update(getattr(self.model, "model_tags", None) or ())
        name = model_name or Path(self.args.output_dir).name
        data = ModelCardData(
            base_model=base,
            model_name=name,
            library_name="transformers",
            tags=sorted(tags),
            datasets=dataset_name,
        )
        card = ModelCard(
            f"---\n{data.to_yaml()}\n---\n\n{self._card_body(name, base, dataset_name)}"
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _card_body(self, name: str, base: str | None, dataset_name: str | None) -> str:
        import importlib.metadata as md

        def version(pkg: str) -> str:
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return "not installed"

        a = self.args
        source = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
        on = f" on [{dataset_name}](https://huggingface.co/datasets/{dataset_name})"
        repo = self.hub_model_id or a.hub_model_id or name
        losses = ", ".join(a.loss_type)
        return (
            f"# {name}\n\n{source} fine-tuned{on if dataset_name else ''} with {self._name} "
            f"([{self._paper['title']}](https://huggingface.co/papers/{self._paper['id']})), "
            "trained with csd-fast's TRL-compatible `DPOTrainer`.\n\n"
            "## Use\n\n```python\nfrom transformers import pipeline\n\n"
            f'chat = pipeline("text-generation", model="{repo}")\n'
            'print(chat([{"role": "user", "content": "Hello!"}], max_new_tokens=64))\n```\n\n'
            f"## Training\n\n- loss: {losses} (beta {a.beta}); learning rate {a.learning_rate}; "
            f"max_length {a.max_length}\n- steps: {self.state.global_step}\n\n"
            "### Versions\n\n"
            + "".join(
                f"- {p}: {version(p)}\n"
                for p in ("csd-fast", "trl", "transformers", "torch", "datasets", "tokenizers")
            )
            + f"\n## Citations\n\nCite {self._name} as:\n\n```bibtex\n{self._paper['citation']}\n"
            "```\n\nCite TRL, whose DPOTrainer this follows, as:\n\n```bibtex\n"
            "@software{vonwerra2020trl,\n"
            "  title   = {{TRL: Transformers Reinforcement Learning}},\n"
            "  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching,"
            " Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif"
            " and Gallou\u00e9dec, Quentin},\n"
            "  url     = {https://github.com/huggingface/trl},\n  year    = {2020}\n}\n```\n"
        )

    # ------------------------------------------------------------------------ the Hub
    def init_hf_repo(self, token: str | None = None) -> None:
        """Create (or reuse) the Hub repo `hub_model_id` (default: output_dir's name)."""
        if not self.is_world_process_zero():
            return
        from huggingface_hub import HfApi

        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        token = token if token is not None else self.args.hub_token
        url = HfApi().create_repo(
            name, token=token, private=self.args.hub_private_repo, exist_ok=True
        )
        self.hub_model_id = url.repo_id

    def push_to_hub(
        self, commit_message: str | None = "End of training", blocking: bool = True,
        token: str | None = None, revision: str | None = None, **kwargs,
    ):  # fmt: skip
        """Save the model and a model card to output_dir, then upload it (no checkpoints).

        kwargs go to `create_model_card` (`dataset_name`, `tags`, `model_name`), as transformers
        does. Returns huggingface_hub's CommitInfo (a Future when `blocking=False`).
        """
        self._fire("on_push_begin")
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token)
        self.save_model()
        if not self.is_world_process_zero():
            return None
        kwargs.setdefault("model_name", (self.hub_model_id or "").split("/")[-1] or None)
        self.create_model_card(**kwargs)
        from huggingface_hub import HfApi

        return HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            token=token,
            run_as_future=not blocking,
            ignore_patterns=_PUSH_IGNORE,
            revision=revision if revision is not None else self.args.hub_revision,
        )


def _concat_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate (B, T, ...) arrays along B, padding T with -100 (transformers' nested_concat)."""
    T = max(a.shape[1] for a in arrays)
    out = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[1] = (0, T - a.shape[1])
        out.append(np.pad(a, pad, constant_values=-100))
    return np.concatenate(out, axis=0)
