"""DPOTrainer's data side: tokenized sets, eval sets, batching options, per-rank plans, collation.

    pairs = trainer._tokenize(dataset, "train")        # a TokenizedPairs, StreamPairs or vision set
    plans = trainer._rank_plans(pairs, "train", epoch)  # plan[rank][micro] -> pair indices
    batch = trainer._collate(pairs, plans[rank][0], "train")   # a PairBatch on the device

Map-style sets are tokenized once (TRL 1.16's rules, csd_fast.data) and planned per epoch
(cached: csd_fast.plancache); streams are read as the loop asks (csd_fast.streaming); vision
rows stay raw and go through the processor per batch (csd_fast.data.vision). Under torchrun
every rank plans every rank's share (the loop needs all of them for stand-ins) and collates
its own. A mixin of `csd_fast.trainer.DPOTrainer`; tests: tests/test_trainer.py and the
layout, streaming and distributed tests.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from csd_fast.batching import BatchingOptions, PlanBatches, make_collate, pair_costs
from csd_fast.data.vision import VisionPairs, is_vision_dataset, text_tokenizer
from csd_fast.plancache import cached_rank_plans
from csd_fast.streaming import StreamPairs, StreamPlan, check_same_rows_on_every_rank, is_stream


class DataMixin:
    """Mixin of DPOTrainer: what turns datasets into the micro-batches the loop runs."""

    def _tokenize(self, dataset, name: str):
        from csd_fast.data import load_rows, tokenize_pairs

        a = self.args
        out = Path(a.output_dir)
        rejects = out / f"rejected_rows_{name}.jsonl"
        if is_vision_dataset(dataset):  # raw rows; each batch goes through the processor
            return self._vision_set(dataset, name)
        if is_stream(dataset):  # tokenized chunk by chunk as the loop reads it
            if getattr(dataset, "_distributed", None) is not None and self.dist.distributed:
                raise ValueError(
                    f"{name} dataset: a stream split with split_dataset_by_node; csd-fast "
                    "deals each global batch over the ranks itself, so every rank needs the "
                    "whole stream: pass it unsplit"
                )
            if self.dist.distributed:
                check_same_rows_on_every_rank(dataset, self.dist, name)
            # every rank reads the whole stream: one of them writes its rejects
            rejects = rejects if self.dist.is_main else None
            return StreamPairs(dataset, self._stream_tokenizer(), name, rejects)
        pairs = tokenize_pairs(
            load_rows(dataset, split="train" if name == "train" else "test"),
            text_tokenizer(self.processing_class),
            max_length=a.max_length,
            truncation_mode=a.truncation_mode,
            on_bad_row=a.on_bad_row,
            rejects_path=rejects,
            cache_dir=a.dataset_cache_dir,
            drop_fully_truncated=a.on_fully_truncated != "error",
        )
        if pairs.is_sft and not self._sft_only:
            raise ValueError(
                f"{pairs.source}: SFT rows ({pairs.format}) have no rejected response: train "
                f"them with loss_type ['sft'], not {list(self.loss_params.loss_type)}"
            )
        train = getattr(self, "train_pairs", None)
        if train is not None and pairs.is_sft != train.is_sft:
            raise ValueError(
                f"{pairs.source} is {pairs.format} but the training set is {train.format}"
            )
        dropped = pairs.skipped.get("prompt_too_long", 0)
        if dropped:
            warnings.warn(
                f"{name} dataset: dropped {dropped} example(s) whose prompt alone fills "
                f"max_length={a.max_length} (keep_start truncation leaves no completion token, "
                f"as TRL drops them); they are listed in {rejects}",
                UserWarning,
                stacklevel=3,
            )
        return pairs

    def _stream_tokenizer(self):
        from csd_fast.data import tokenize_pairs

        a = self.args
        return lambda rows: tokenize_pairs(
            rows, text_tokenizer(self.processing_class), max_length=a.max_length,
            truncation_mode=a.truncation_mode, on_bad_row=a.on_bad_row, cache_dir=None,
            drop_fully_truncated=a.on_fully_truncated != "error",
        )  # fmt: skip

    def _tokenize_eval(self, dataset):
        """One eval set, or named sets (a dict or a DatasetDict) tokenized one by one."""
        import datasets

        if isinstance(dataset, dict | datasets.DatasetDict | datasets.IterableDatasetDict):
            return {name: self._tokenize(ds, f"eval_{name}") for name, ds in dataset.items()}
        return self._tokenize(dataset, "eval")

    def _eval_sets(self, eval_dataset=None) -> dict:
        """name -> tokenized set; a single set is named "eval" (its metrics keep `eval_`)."""
        if isinstance(eval_dataset, str):  # the name of one of the named sets, as transformers
            if not isinstance(self.eval_pairs, dict) or eval_dataset not in self.eval_pairs:
                raise ValueError(f"no eval set named {eval_dataset!r}")
            return {eval_dataset: self.eval_pairs[eval_dataset]}
        if eval_dataset is not None:
            pairs = self._tokenize_eval(eval_dataset)
        else:
            pairs = self.eval_pairs
        if pairs is None:
            return {}
        return pairs if isinstance(pairs, dict) else {"eval": pairs}

    def _batching(self, mode: str) -> BatchingOptions:
        a = self.args
        train = mode == "train"
        strategy = getattr(a, "train_sampling_strategy", "random")
        return BatchingOptions(
            batch_size=self._per_rank_batch_size(train),
            max_tokens_per_batch=a.max_tokens_per_batch,
            layout=self.layout,
            shuffle=train and strategy != "sequential",
            seed=a.data_seed if a.data_seed is not None else a.seed,
            drop_last=train and a.dataloader_drop_last,
            max_length=a.max_length,
            truncation_mode=a.truncation_mode,
            pad_to_multiple_of=a.pad_to_multiple_of
            if isinstance(a.pad_to_multiple_of, int)
            else None,
        )

    def _per_rank_batch_size(self, train: bool) -> int:
        """per_device_*_batch_size, or its share of the ranks with accelerate's split_batches
        (where it names the global batch)."""
        a = self.args
        size = a.per_device_train_batch_size if train else a.per_device_eval_batch_size
        if not (a.accelerator_config or {}).get("split_batches"):
            return size
        world = self.dist.world_size
        if size % world:
            kind = "train" if train else "eval"
            raise ValueError(
                f"accelerator_config.split_batches: per_device_{kind}_batch_size={size} does "
                f"not split evenly over {world} ranks"
            )
        return size // world

    def _plan(self, pairs, mode: str, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of one epoch."""
        return self._rank_plans(pairs, mode, epoch)[self.dist.rank]

    def _rank_plans(self, pairs, mode: str, epoch: int) -> list[list[list[int]]]:
        """plan[rank][micro] of one epoch; planned once per (set, mode, epoch) and kept."""
        cached = self._plans.get(mode)
        # one entry per mode, holding the set itself: an id() is unique only while it lives
        if isinstance(pairs, StreamPairs) and (
            mode != "train" or cached is None or cached[0] is not pairs or cached[1] != epoch
        ):
            # a stream is read as the plan is consumed: a training pass is kept (the loop asks
            # for it several times), an evaluation pass is new each time
            a = self.args
            nominal = a.max_steps * a.gradient_accumulation_steps if mode == "train" else None
            world = self.dist.world_size
            plan = StreamPlan(
                pairs, epoch, self._batching(mode), nominal, a.stream_buffer_size, world
            )
            views = [plan.view(rank) for rank in range(world)]
            if mode == "train":
                self._plans[mode] = (pairs, epoch, views)
            return views
        if cached is None or cached[0] is not pairs or cached[1] != epoch:
            opts = self._batching(mode)
            costs = None
            groups = pairs.groups()  # CLO examples stay in one micro-batch (None: no groups)
            if opts.max_tokens_per_batch:
                costs = pair_costs(pairs.lengths(), opts)
            plans = cached_rank_plans(
                self.args.plan_cache_dir, len(pairs), epoch, opts, self.dist.world_size, costs,
                groups,
            )  # fmt: skip
            cached = (pairs, epoch, plans)
            self._plans[mode] = cached
        return cached[2]

    @property
    def _pad_id(self) -> int:
        return text_tokenizer(self.processing_class).pad_token_id

    def _vision_set(self, dataset, name: str):
        """Vision rows (TRL's checks first); they train in the padded layout, as in TRL."""
        from csd_fast.data.vision import prepare_vision_set

        if is_stream(dataset):
            raise NotImplementedError(f"{name} dataset: a stream of vision rows (load it "
                                      "map-style)")  # fmt: skip
        return prepare_vision_set(dataset, name, self.args, self.processing_class,
                                  self.dist.world_size)  # fmt: skip

    def _examples(self, pairs):
        """idx -> the example dicts of a micro-batch, with cached reference values if any."""
        table = self._table_for(pairs)
        ld_alpha = self.args.ld_alpha

        def examples(idx: list[int]) -> list[dict]:
            out = [dict(pairs[i]) for i in idx]
            if table is not None and out:
                chosen, rejected = table.lookup([ex["row"] for ex in out], ld_alpha)
                for ex, c, r in zip(out, chosen.tolist(), rejected.tolist(), strict=True):
                    ex["ref_chosen_logps"], ex["ref_rejected_logps"] = c, r
            return out

        return examples

    def _collate_fn(self, pairs, mode: str):
        """The layout's collate; with a reference table, each batch's token counts are checked
        against the table's (on the host, before the device copy: no sync)."""
        if isinstance(pairs, VisionPairs):
            return self._vision_collate()
        collate = self._base_collate(mode)
        table = self._table_for(pairs)
        if table is None:
            return collate

        def checked(examples):
            batch = collate(examples)
            table.check_lengths(batch.pair_ids.tolist(), batch.sequence_lengths())
            return batch

        return checked

    def _vision_collate(self):
        from csd_fast.data.vision import VisionCollator

        if self.data_collator is not None:  # TRL's vision collator or the user's own
            from csd_fast.trl_collate import custom_collate

            return custom_collate(self.data_collator, vision=True)
        return VisionCollator(self.processing_class, self.args.max_length)

    def _base_collate(self, mode: str):
        """examples -> PairBatch: the user's data_collator if given, else the layout's own."""
        if self.data_collator is not None:
            from csd_fast.trl_collate import custom_collate

            return custom_collate(self.data_collator)
        return make_collate(self._batching(mode), self._pad_id)

    def _collate(self, pairs, idx: list[int], mode: str):
        return self._collate_fn(pairs, mode)(self._examples(pairs)(idx)).to(self.device)

    def micro_batches(self, pairs, plan: list[list[int]], mode: str):
        """The collated micro-batches of `plan` on the device (DataLoader workers if asked)."""
        a = self.args
        source = PlanBatches(plan, self._examples(pairs), self._collate_fn(pairs, mode))
        return source.iterate(
            self.device,
            workers=a.dataloader_num_workers,
            pin_memory=a.dataloader_pin_memory,
            prefetch_factor=a.dataloader_prefetch_factor,
        )
