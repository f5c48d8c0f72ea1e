"""The reference side of `DPOTrainer`: the frozen model, live log-probs and precomputed tables.

    with trainer._reference() as ref: ...        # a separate model, adapters off, or the policy
    chosen, rejected = trainer._ref_logps(batch) # table values when cached, else a no-grad pass
    table = trainer._precompute(pairs, "train")  # ref_cache_dir store (csd_fast.refcache) or scored

A mixin of csd_fast.trainer.DPOTrainer (it reads the trainer's args, models, device and
batching); kept apart so the trainer module holds the step and the loop wiring. Tests:
tests/test_refcache.py, tests/test_refcache_trl.py, tests/test_trainer.py.
"""

from __future__ import annotations

import contextlib

import torch

from csd_fast.forward import PairScorer, reference_logps, unwrap_causal_lm


class ReferenceMixin:
    """Reference model access, live reference log-probs, and reference tables (see above)."""

    @contextlib.contextmanager
    def _reference(self):
        """The frozen reference: a separate model, or the policy with its LoRA adapters off."""
        if self.ref_scorer is None and self._ref_model_path is not None:
            from csd_fast.models import load_model, prepare_reference, to_device

            path, extra = self._ref_model_path, self._init_kwargs
            ref = prepare_reference(load_model(path, self.args, extra_kwargs=extra), self.args)
            to_device(ref, self.device)
            self.ref_model = ref
            self.ref_scorer = PairScorer(self.ref_model)
        if self.ref_scorer is not None:
            yield self.ref_scorer
        elif hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.scorer
        elif self._policy_is_initial:
            yield self.scorer
        else:
            raise RuntimeError(
                "no reference model: pass ref_model or precompute reference log-probs"
            )

    def _ref_logps(self, batch):
        """Cached table values when the batch carries them, else a live no-grad reference pass."""
        if batch.ref_chosen_logps is not None:
            return batch.ref_chosen_logps, batch.ref_rejected_logps
        if self._sft_data:  # the sft loss does not read them; the reward metrics are dropped
            zeros = torch.zeros(batch.num_pairs, device=batch.token_labels.device)
            return zeros, zeros
        with self._reference() as ref, self._autocast():
            was_training = ref.training
            ref.eval()  # the reference never sees dropout, even with disable_dropout=False
            try:
                return reference_logps(
                    ref, batch, head_impl=self.head_impl, ld_alpha=self.args.ld_alpha
                )
            finally:
                ref.train(was_training)

    def _precompute(self, pairs, name: str):
        """Reference table of a tokenized set: from the ref_cache_dir store, else scored."""
        from csd_fast.refcache import describe, reference_table

        a = self.args

        def score(positions):
            return self._score_reference(pairs, positions)

        if self.dist.distributed and not a.ref_cache_dir:  # in memory: each rank scores a share
            from csd_fast.distributed.sharded_table import compute_table_sharded

            bs = a.precompute_ref_batch_size or self._batching("eval").batch_size
            return compute_table_sharded(len(pairs), bs, score, self.dist, a.ld_alpha)
        table, report = reference_table(
            pairs,
            split=name,
            score=score,
            root=a.ref_cache_dir,
            components=lambda: self._ref_components(pairs),
            labels={"model": self._ref_label(), "data": getattr(pairs, "source", "")},
            shard_rows=a.ref_cache_shard_size,
            strict=a.ref_cache_strict,
            ld_alpha=a.ld_alpha,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            barrier=self.dist.barrier,
            # tensor parallelism: the first tensor rank of each data rank writes its shards
            writer=self.dist.mesh is None or self.dist.mesh.get_local_rank("tp") == 0,
        )
        if self.dist.is_main:
            print(f"[csd-fast] {describe(report, name, len(pairs))}")
        return table

    def _table_for(self, pairs):
        """The reference table of `pairs`: computed at init, or a complete one in the store."""
        owner, table = self._ref_tables.get(id(pairs), (None, None))
        if owner is pairs:  # ids are unique only among live objects
            return table
        if not self.args.ref_cache_dir or self._ref_fingerprint is None:
            return None
        from csd_fast.refcache import reference_table
        from csd_fast.refstore import StoreError

        try:  # score=None: the policy has moved, only a stored table can serve
            table, _ = reference_table(
                pairs, split="eval", score=None, root=self.args.ref_cache_dir,
                components=lambda: self._ref_components(pairs),
                shard_rows=self.args.ref_cache_shard_size,
            )  # fmt: skip
        except StoreError:
            if self._ref_model_path is None and self.ref_model is None:
                return None  # the live path says why there is no reference
            table = self._precompute(pairs, "eval")
        self._ref_tables[id(pairs)] = (pairs, table)
        return table

    def _ref_label(self) -> str:
        if self._ref_model_path:
            return self._ref_model_path
        lm = unwrap_causal_lm(self.ref_model if self.ref_model is not None else self.model)
        return str(getattr(lm.config, "_name_or_path", "") or type(lm).__name__)

    def _ref_components(self, pairs) -> dict:
        from csd_fast.data.tokenize import tokenizer_fingerprint
        from csd_fast.quantization import quantization_key, requested_config
        from csd_fast.refcache import (
            device_kind,
            fingerprint_components,
            model_fingerprint,
            pairs_fingerprint,
            path_fingerprint,
        )

        a = self.args
        if self._ref_fingerprint is None:  # one full-weight hash per run, not per dataset
            if self._ref_model_path is not None:
                self._ref_fingerprint = path_fingerprint(self._ref_model_path)
            else:
                with self._reference() as ref:
                    self._ref_fingerprint = model_fingerprint(getattr(ref, "model", ref))
        if self._ref_model_path is not None:  # loaded with the trainer's model_init_kwargs
            config = requested_config(a, self._init_kwargs.get("quantization_config"))
            quantization = quantization_key(None, config)
        else:
            ref = self.ref_model if self.ref_model is not None else self.model
            quantization = quantization_key(ref)
        lm = unwrap_causal_lm(self.model)
        autocast = self._autocast()
        return fingerprint_components(
            quantization=quantization,
            model=self._ref_fingerprint,
            tokenizer=tokenizer_fingerprint(self.processing_class),
            data=pairs_fingerprint(pairs),
            max_length=a.max_length,
            truncation_mode=a.truncation_mode,
            layout=self.layout,
            head_impl=self.head_impl,
            attention=getattr(lm.config, "_attn_implementation", None),
            dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
            autocast=str(getattr(autocast, "fast_dtype", "none")).removeprefix("torch."),
            device=device_kind(self.device),
        )

    @torch.no_grad()
    def _score_reference(self, pairs, positions: list[int]):
        """The reference's table columns for `positions` of `pairs`, in precompute batches."""
        from csd_fast.forward import token_logps_and_stats
        from csd_fast.refcache import concat_columns, reference_columns

        opts = self._batching("eval")
        bs = self.args.precompute_ref_batch_size or opts.batch_size
        collate = self._base_collate("eval")
        chunks = [positions[i : i + bs] for i in range(0, len(positions), bs)]
        real = len(chunks)
        if self._sharded and self.args.ref_cache_dir:
            # FSDP: every rank runs as many forwards per store shard (a short last shard or an
            # empty turn is padded with stand-in batches whose results are dropped)
            chunks += [[0]] * (-(-self.args.ref_cache_shard_size // bs) - real)
        parts = []
        with self._reference() as ref, self._autocast():
            was_training = ref.training
            ref.eval()  # the reference never sees dropout, even with disable_dropout=False
            try:
                for k, chunk in enumerate(chunks):
                    batch = collate([pairs[j] for j in chunk]).to(self.device)
                    token_logps, _ = token_logps_and_stats(
                        ref, batch, head_impl=self.head_impl, with_stats=False
                    )
                    if k < real:
                        parts.append(reference_columns(token_logps, batch, self.args.ld_alpha))
            finally:
                ref.train(was_training)
        return concat_columns(parts)
