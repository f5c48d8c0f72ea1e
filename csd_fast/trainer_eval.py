"""Evaluation for `DPOTrainer`: `evaluate()` over one or named eval sets, TRL's eval metrics.

    metrics = trainer.evaluate()                 # {"eval_loss": ..., "eval_rewards/...": ...}
    trainer.evaluate({"a": ds_a, "b": ds_b})     # eval_a_*, eval_b_* (named sets)

A mixin of csd_fast.trainer.DPOTrainer (it reads the trainer's plans, batches, reference
tables and compute_loss); kept apart so the trainer module holds the step and the loop wiring.
Tests: tests/test_trl_parity.py (eval metrics), tests/test_trl_compat.py (named sets).
"""

from __future__ import annotations

import time

import torch

from csd_fast.batching import stand_in
from csd_fast.streaming import StreamPairs


class EvalMixin:
    """evaluate() and the evaluation of one tokenized set."""

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict:
        """Loss and TRL's metrics over the eval set(s), logged with the `eval_` prefix.

        Named sets (a dict or DatasetDict, given here or at construction) are evaluated one by
        one, each under `eval_<name>_`; a str names one of the sets given at construction.
        """
        from csd_fast.trl_compat import check_new_eval_reference

        if eval_dataset is not None and not isinstance(eval_dataset, str):
            check_new_eval_reference(self)  # before tokenizing, as TRL: fail fast
        sets = self._eval_sets(eval_dataset)
        if not sets:
            raise ValueError("evaluate() needs an eval_dataset")
        source = self.eval_pairs if eval_dataset is None else eval_dataset
        named = isinstance(eval_dataset, str) or isinstance(source, dict)
        metrics: dict = {}
        for name, pairs in sets.items():
            prefix = f"{metric_key_prefix}_{name}" if named else metric_key_prefix
            metrics.update(self._evaluate_set(pairs, name, prefix, log=True))
        return metrics

    def _stream_eval_items(self, pairs):
        """(batch, is_real) over one pass of an eval stream; a rank without pairs in an entry
        collates a stand-in from another rank's (zero weight: it only joins the collectives)."""
        everyone = self._rank_plans(pairs, "eval", 0)
        for k, idx in enumerate(everyone[self.dist.rank]):
            yield self._collate(pairs, idx or stand_in(everyone, k), "eval"), bool(idx)

    def _evaluate_set(self, pairs, name: str, prefix: str, log: bool) -> dict:
        from csd_fast.trl_compat import eval_predictions_metrics

        a = self.args
        if (a.precompute_ref_log_probs or a.ref_cache_dir) and isinstance(pairs, StreamPairs):
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please "
                "use a map-style Dataset or set `precompute_ref_log_probs=False`."
            )
        if (a.precompute_ref_log_probs or a.ref_cache_dir) and id(pairs) not in self._ref_tables:
            # a set first seen here: score it with the reference as __init__ does (before any
            # training the untrained policy is the reference; check_new_eval_reference refused
            # the case where no reference is left)
            initial, self._policy_is_initial = self._policy_is_initial, self.state.global_step == 0
            try:
                self._ref_tables[id(pairs)] = (pairs, self._precompute(pairs, name))
            finally:
                self._policy_is_initial = initial
        if not self._in_train and (a.bf16_full_eval or a.fp16_full_eval):
            # transformers: outside train() the model is cast (in place, and it stays so)
            self.model.to(torch.bfloat16 if a.bf16_full_eval else torch.float16)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        if isinstance(pairs, StreamPairs):  # read once, batch by batch, on every rank
            items = self._stream_eval_items(pairs)
        else:
            plan = self._plan(pairs, "eval", 0)
            real = [bool(idx) for idx in plan]
            if not all(real):  # a rank without pairs here joins the collectives with a stand-in
                everyone = self._rank_plans(pairs, "eval", 0)
                stand_in = next(idx[:1] for p in everyone for idx in p if idx)
                plan = [idx or stand_in for idx in plan]
            items = zip(self.micro_batches(pairs, plan, "eval"), real, strict=False)
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch, is_real in items:
                loss = self.compute_loss(batch, "eval", dummy=not is_real)
                if is_real:  # one read per batch on one process, as before
                    sums += torch.tensor([float(loss) * batch.num_pairs, batch.num_pairs])
        self.model.train(was_training)
        total, n = self.dist.all_reduce_sum(sums).tolist()
        metrics = {f"{prefix}_loss": total / max(n, 1)}
        # MetricsLog names eval metrics eval_<key>; a named set or predict() has its own prefix
        metrics.update({f"{prefix}_{k[5:]}": v for k, v in self._metrics.pop("eval").items()})
        if self.compute_metrics is not None:
            metrics.update(eval_predictions_metrics(self, pairs, prefix))
        if self.dist.distributed:
            metrics[f"{prefix}_num_tokens"] = float(self.global_train_tokens())
        runtime = time.perf_counter() - start
        metrics[f"{prefix}_runtime"] = runtime
        metrics[f"{prefix}_samples_per_second"] = n / max(runtime, 1e-9)
        if log:
            self.log(metrics)
            self._fire("on_evaluate", metrics=metrics)
        return metrics
