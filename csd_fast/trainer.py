"""`DPOTrainer`: TRL 1.16's constructor and metrics over csd-fast's own lean training loop.

    from csd_fast import DPOTrainer, DPOConfig       # instead of `from trl import ...`
    trainer = DPOTrainer(model="path/or/model", args=DPOConfig(output_dir="out"),
                         train_dataset=ds, processing_class=tokenizer)
    trainer.train()

One core serves both faces: `csd-train` builds a `DPOConfig` and calls this class, so the CLI
and the Python API share batching (`batching`), forward (`forward`), losses (`losses`) and
metrics (`metrics`). Per optimizer step:

    for each of gradient_accumulation_steps micro-batches (a PairBatch in any layout):
        policy forward -> chosen/rejected logps; reference logps (cached table or live no-grad)
        loss = preference_loss(...) * pairs_in_micro / pairs_in_step  -> backward
    clip, AdamW step, schedule step; log / evaluate / checkpoint when due

Under torchrun (WORLD_SIZE > 1) the same trainer joins the process group, shards the policy and
a live reference with FSDP2 (`csd_fast.distributed.fsdp`), gives each rank its share of every
global batch, and writes sharded checkpoints; rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from transformers import TrainerControl

from csd_fast import checkpoint as ckpt
from csd_fast.batching import (
    layout_for,
)
from csd_fast.config import DPOConfig
from csd_fast.data.vision import is_vision_dataset, text_tokenizer
from csd_fast.distributed.env import init_distributed
from csd_fast.distributed.tensor_parallel import tensor_parallel_env, tensor_parallel_size
from csd_fast.forward import (
    PairScorer,
    head_impl_for,
    sequence_forward,
    unwrap_causal_lm,
)
from csd_fast.optim import select_trainable
from csd_fast.reporting import MetricsWriter, integration_callbacks, plot_curves
from csd_fast.streaming import StreamPairs
from csd_fast.trainer_api import TrainerAPI
from csd_fast.trainer_data import DataMixin
from csd_fast.trainer_eval import EvalMixin
from csd_fast.trainer_hooks import TrainerHooks
from csd_fast.trainer_reference import ReferenceMixin


class DPOTrainer(DataMixin, EvalMixin, ReferenceMixin, TrainerAPI, TrainerHooks):
    """Drop-in for `trl.DPOTrainer` (1.16): same arguments, same logged metrics."""

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        from csd_fast.models import (
            ensure_pad_token,
            is_on_meta,
            load_model,
            load_tokenizer,
            loads_on_meta,
            prepare_models,
            to_device,
        )
        from csd_fast.trl_compat import check_trl_arguments, model_setup

        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = DPOConfig(output_dir=f"{Path(name).name}-DPO")
        if data_collator is not None and (
            args.padding_free or args.prefix_sharing or args.max_tokens_per_batch
        ):
            raise NotImplementedError(
                "a custom data_collator returns TRL's padded layout: it cannot be combined with "
                "padding_free, prefix_sharing or max_tokens_per_batch (csd-fast's packed layouts)"
            )
        self.data_collator = data_collator  # TRL-format output (csd_fast.trl_collate)
        from csd_fast.quantization import (
            check_distributed,
            check_trainable_patterns,
            quantized_init_kwargs,
            requested_config,
        )

        # QLoRA (csd_fast.quantization): the trainer argument or model_init_kwargs', as TRL
        init_kwargs = quantized_init_kwargs(model, args, quantization_config)
        check_trl_arguments(args, model, ref_model, train_dataset, peft_config, eval_dataset)
        _check_inputs(args, model, ref_model, train_dataset, eval_dataset)  # before any loading
        if args.padding_free and is_vision_dataset(train_dataset):  # TRL 1.16 falls back too
            warnings.warn("the train dataset has images: padding_free is off (the padded "
                          "layout, as TRL's vision collator)", UserWarning,
                          stacklevel=2)  # fmt: skip
            args.padding_free = False
        self.compute_metrics = compute_metrics
        self._in_train = False  # inside train() (evaluations there never cast: *_full_eval)
        if args.tf32 is not None and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        self.args = args
        torch.manual_seed(args.seed)
        if args.full_determinism:  # as HF's Trainer, plus flash-attn's deterministic backward
            from transformers.trainer_utils import enable_full_determinism

            from csd_fast.attention import set_deterministic

            enable_full_determinism(args.seed)
            set_deterministic(True)
        self.dist = init_distributed(use_cpu=getattr(args, "use_cpu", False))
        if tensor_parallel_size(args) > 1:  # the data-parallel view: tensor ranks share batches
            self.dist = tensor_parallel_env(self.dist, tensor_parallel_size(args))
        quantized = False  # QLoRA: every rank loads (and quantizes) the base itself
        for m in (model, ref_model):
            config = requested_config(args, quantization_config, m)
            check_distributed(m, config, self.dist, args)
            quantized = quantized or config is not None
        if quantized and tensor_parallel_size(args) > 1:
            raise NotImplementedError("quantization_config (QLoRA) with parallelism_config.tp_size")
        self.device = self.dist.device
        model_path = model if isinstance(model, str) else None
        self.source_names = {
            "model": model_path,
            "ref_model": ref_model if isinstance(ref_model, str) else None,
        }
        # FSDP: only rank 0 reads weights given by path; the others build the structure on
        # meta and get their shards from rank 0 once sharded (no full copy per rank in memory)
        meta = self.dist.distributed and not self.dist.is_main and loads_on_meta(args)
        meta = meta and not quantized  # bnb quantizes weights as it reads them: never on meta
        self.model = (
            load_model(model, args, on_meta=meta, extra_kwargs=init_kwargs) if model_path else model
        )
        if meta and model_path:
            print(f"[csd] rank {self.dist.rank}: {model_path} built on the meta device, its "
                  "weights sent by rank 0 once sharded", flush=True)  # fmt: skip
        self.processing_class = processing_class or load_tokenizer(self.model, model_path, args)
        ensure_pad_token(text_tokenizer(self.processing_class), args)
        # a reference given by path is loaded only if a table must be computed (or a live
        # reference is needed): with a complete ref_cache_dir store it never enters memory
        self._ref_model_path = None
        self._init_kwargs = init_kwargs  # a reference loaded lazily by path is quantized alike
        if isinstance(ref_model, str):
            if args.ref_cache_dir and Path(ref_model).is_dir() and not self.dist.distributed:
                self._ref_model_path, ref_model = ref_model, None
            else:
                ref_model = load_model(ref_model, args, on_meta=meta, extra_kwargs=init_kwargs)
        self.model, self.ref_model = prepare_models(self.model, ref_model, peft_config, args)
        # transformers' order: its reporting integrations, then the user's callbacks
        self.callbacks = integration_callbacks(args.report_to) + list(callbacks or [])
        # MoE aux loss, model tags, pad id on the config, TR-DPO, Liger, torch.compile
        self.router_aux_loss_coef, self.aux_loss_enabled = model_setup(self, args)
        self.layout = layout_for(args.padding_free, args.prefix_sharing, args.max_tokens_per_batch)
        self._per_rank_batch_size(True)  # split_batches: refuse an uneven split up front
        if eval_dataset is not None:
            self._per_rank_batch_size(False)
        check_trainable_patterns(self.model, args.trainable_params)  # no 4-bit weight trains
        self.trainable = select_trainable(self.model, args.trainable_params)
        check_adapter_reference(self.model, self.ref_model, self.trainable, args)
        to_device(self.model, self.device)
        to_device(self.ref_model, self.device)
        # backbone + head as one module each: what FSDP2 shards (the models stay HF modules)
        self.scorer = PairScorer(self.model)
        self.ref_scorer = PairScorer(self.ref_model) if self.ref_model is not None else None
        # counted before sharding: transformers counts a 4-bit weight whole only as Params4bit
        self._flos_per_input_id()
        self._sharded = False
        if self.dist.distributed:
            from csd_fast.distributed.fsdp import (
                FsdpOptions,
                broadcast_from_rank0,
                rank0_source,
                shard_model,
            )

            if optimizers[0] is not None:
                raise ValueError("optimizers=(...) under FSDP: build it after sharding (omit it)")
            opts = FsdpOptions.from_args(args, self.dist)
            # a frozen reference copy over the policy's quantized base shares those weights:
            # the policy shards them, the reference keeps its references whole
            policy_params = set(self.scorer.parameters())
            for scorer in (self.scorer, self.ref_scorer):
                if scorer is None:
                    continue
                shared = policy_params if scorer is self.ref_scorer else frozenset()
                on_meta = any(self.dist.all_gather_objects(is_on_meta(scorer)))
                # sync_module_states: rank 0's weights everywhere, however each rank built them
                send = on_meta or opts.sync_module_states
                source = rank0_source(scorer, self.dist) if send else None
                shard_model(scorer, self.dist, opts, keep_whole=shared)
                if send:
                    broadcast_from_rank0(scorer, source, self.dist)
                    del source
            self._sharded = True
        from csd_fast.trl_compat import fp16_scaler

        self.grad_scaler = fp16_scaler(args, self.device, self._sharded)
        self.loss_params = args.loss_params()
        self._sft_only = self.loss_params.loss_type == ("sft",)  # what SFT rows train with
        self.head_impl = head_impl_for(args.fused)
        self._fused_loss_type = _fused_loss_type(args, self.loss_params)
        self._length_normalised = bool({"ipo", "sigmoid_norm"} & set(self.loss_params.loss_type))
        self.optimizer, self.lr_scheduler = optimizers
        self._own_optimizer, self._own_scheduler = optimizers[0] is None, optimizers[1] is None
        self.state = self._new_state()
        self.control = TrainerControl()
        self.progress = ckpt.TrainProgress()
        from csd_fast.metrics import MetricsLog

        self._metrics = MetricsLog()
        self.train_pairs = (
            self._tokenize(train_dataset, "train") if train_dataset is not None else None
        )
        self.eval_pairs = self._tokenize_eval(eval_dataset) if eval_dataset is not None else None
        self._sft_data = getattr(self.train_pairs, "is_sft", False)
        if self._sft_data:  # SFT rows never read a reference (preference rows with the sft
            self.ref_model = self.ref_scorer = None  # loss keep one: TRL logs their rewards)
        # every language of the data, so each rank logs the same per-language keys
        self._languages = tuple(
            sorted({str(x) for p in (self.train_pairs, self.eval_pairs) if p is not None
                    and getattr(p, "lang", None) is not None for x in p.lang})
        )  # fmt: skip
        # reference tables by the identity of the tokenized set they score: an evaluate() on a
        # new dataset must never read another set's rows
        self._ref_tables: dict[int, object] = {}
        self._plans: dict[str, tuple] = {}  # mode -> (tokenized set, epoch, plan)
        self._ref_fingerprint: str | None = None
        self._policy_is_initial = True  # until training starts the policy is its own reference
        if (args.precompute_ref_log_probs or args.ref_cache_dir) and not self._sft_data:
            for name, pairs in (("train", self.train_pairs), *self._eval_sets().items()):
                if pairs is not None:
                    self._ref_tables[id(pairs)] = (pairs, self._precompute(pairs, name))
            if self._ref_model_path is not None:  # reloaded from its path only if needed again
                self.ref_model = self.ref_scorer = None
        self._policy_is_initial = False  # from here on the policy no longer equals the reference

    # ----------------------------------------------------------------------------- step
    def _autocast(self):
        if self.device.type == "cuda" and not self._sharded:
            # (sharded: FSDP's mixed-precision policy casts the gathered weights instead)
            if self.args.fp16:
                return torch.autocast("cuda", dtype=torch.float16)
            if self.args.bf16:
                return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_loss(self, batch, mode: str = "train", dummy: bool = False) -> torch.Tensor:
        """Loss of one micro-batch (mean over its pairs); records TRL's metrics under `mode`.

        Metrics are the micro-batch's over all ranks (sums all-reduced before dividing, as TRL
        gathers); `dummy` marks a zero-weight stand-in batch that only joins the collectives."""
        from csd_fast.losses import PairLogps, preference_loss
        from csd_fast.metrics import pair_metric_sums
        from csd_fast.trl_compat import activation_offload

        ref_c, ref_r = self._ref_logps(batch)
        fused_loss = None
        with self._autocast(), activation_offload(self.args, mode == "train", self.device):
            # head + loss in one (3 GEMMs, kernels/) where nothing else needs the head's
            # outputs: MoE router loss, WPO weights and SFT rows take the log-prob path
            fuse = (
                self._fused_loss_type is not None
                and not self.aux_loss_enabled
                and not self.args.use_weighting
                and not self._sft_data
                # the kernels normalise by the scored count: TRL's differs for these batches
                and not (batch.unscored_first is not None and self._length_normalised)
            )
            if fuse:
                from csd_fast.forward import fused_sequence_loss

                lp = self.loss_params
                fused_loss, fwd = fused_sequence_loss(
                    self.scorer, batch, ref_c.float(), ref_r.float(),
                    loss_type=self._fused_loss_type, beta=lp.beta,
                    label_smoothing=lp.label_smoothing, clo_lambda=lp.clo_lambda,
                )  # fmt: skip
            else:
                fwd = sequence_forward(
                    self.scorer, batch, head_impl=self.head_impl, ld_alpha=self.args.ld_alpha,
                    aux_loss=self.aux_loss_enabled, with_sq_probs=self.args.use_weighting,
                )  # fmt: skip
        lengths = batch.sequence_lengths()
        P = batch.num_pairs
        logps = PairLogps(
            chosen_logps=fwd.chosen_logps.float(),
            rejected_logps=fwd.rejected_logps.float(),
            ref_chosen_logps=ref_c.float(),
            ref_rejected_logps=ref_r.float(),
            chosen_lengths=lengths[:P],
            rejected_lengths=lengths[P:],
            sft_mask=batch.sft_mask,
            group_ids=batch.group_ids,
            nll_chosen_logps=fwd.plain_chosen_logps,
            weights=wpo_weights(fwd, batch, lengths) if self.args.use_weighting else None,
            norm_lengths=None if batch.unscored_first is None else batch.completion_lengths(),
        )
        if fused_loss is not None:
            loss = fused_loss
        else:
            loss = preference_loss(self.loss_params, logps)
        sums = pair_metric_sums(
            self.loss_params,
            logps,
            token_entropy=fwd.entropy,
            token_mean_logit=fwd.mean_logit,
            token_is_top1=fwd.is_top1,
            token_seq_ids=batch.sequence_ids(),
            num_pairs=P,
            langs=batch.langs,
            lang_names=self._languages,
        )
        if self._sft_data:  # TRL SFTTrainer's metrics: no rejected side, no reference
            sums = {k: v for k, v in sums.items() if k in _SFT_METRICS}
        f64 = dict(dtype=torch.float64, device=loss.device)
        if fwd.aux_loss is not None:  # MoE: TRL adds coef * aux and logs the raw aux_loss
            loss = loss + self.router_aux_loss_coef * fwd.aux_loss.to(loss.dtype)
            sums["aux_loss"] = torch.stack([fwd.aux_loss.detach().double(), torch.ones((), **f64)])

        if batch.capacity:
            sums["padding_efficiency"] = _sum_count(
                batch.num_real_tokens, batch.capacity, loss.device
            )
        if self.layout == "prefix":
            # a sum over the data ranks: only data rank 0 counts the denominator
            saved, one = batch.num_tokens - batch.num_real_tokens, float(self.dist.rank == 0)
            sums["prefix_tokens_saved"] = _sum_count(saved, one, loss.device)
        self._metrics.add(mode, self._reduce_metrics(sums, dummy))
        if mode == "train" and not dummy:
            self._metrics.add_tokens(mode, batch.num_tokens)
            self._metrics.total_flos += self._flos_per_input_id() * batch.padded_numel()
            if not self.dist.distributed:  # (distributed: the loop saves the all-rank total)
                self.progress.total_tokens += batch.num_tokens
        return loss

    def global_train_tokens(self) -> int:
        """TRL's `num_tokens` over all ranks (each rank counts its own batches)."""
        local = torch.tensor([self._metrics.total_train_tokens], dtype=torch.int64)
        return int(self.dist.all_reduce_sum(local).item())

    def _reduce_metrics(self, sums: dict, dummy: bool) -> dict:
        """[sum, count] per metric -> sum / count over all ranks, as device scalars (no sync)."""
        table = torch.stack([v.to(torch.float64) for v in sums.values()])  # (K, 2)
        if self.dist.distributed:
            table = table * (0.0 if dummy else 1.0)
            if self.dist.backend == "gloo":
                table = table.cpu()
            self.dist.all_reduce_sum(table)
        total, count = table.unbind(1)
        values = torch.where(count > 0, total / count, torch.zeros_like(total))
        if self._languages:  # a language no rank held in this micro-batch: NaN, skipped later
            from csd_fast.metrics import is_language_metric

            per_lang = torch.tensor([is_language_metric(k) for k in sums], device=values.device)
            values = torch.where(per_lang & (count == 0), torch.nan, values)
        return dict(zip(sums, values.unbind(), strict=True))

    # ---------------------------------------------------------------------------- train
    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Train; `resume_from_checkpoint=True` continues from output_dir's latest checkpoint."""
        from csd_fast.loop import run_training
        from csd_fast.resume import guarded_training

        if self.train_pairs is None:
            raise ValueError("train() needs a train_dataset")
        if isinstance(self.train_pairs, StreamPairs) and self.args.max_steps <= 0:
            raise ValueError(  # transformers' message for a dataloader without a length
                "args.max_steps must be set to a positive value if dataloader does not have a "
                f"length, was {self.args.max_steps}"
            )
        # one writer per output_dir; a used one needs resume or overwrite_output_dir; the
        # checkpoint is verified and its configuration compared before anything loads
        from csd_fast.trl_compat import (
            batch_size_search,
            jit_checkpoint,
            neftune,
            resumed_batch_size,
            watch_underflow_overflow,
        )

        watch_underflow_overflow(self)
        self.oom_restart = False
        if self.args.auto_find_batch_size and self.dist.distributed:
            from csd_fast.distributed.batch_size import resume_after_restart

            # a torchrun restart after an out-of-memory: the smaller size, from step 0
            self.oom_restart = resume_after_restart(self)
        resumed_batch_size(self, resume_from_checkpoint)  # auto_find_batch_size: the found one
        self._in_train = True
        try:
            with (
                guarded_training(self, resume_from_checkpoint) as checkpoint,
                neftune(self),
                jit_checkpoint(self),
            ):
                self.resumed_from = checkpoint  # the checkpoint loaded, if any
                return batch_size_search(
                    self, lambda: run_training(self.training_job(), checkpoint)
                )
        finally:
            self._in_train = False

    def restart_with_batch_size(self, batch_size: int) -> None:
        """Forget a failed start (auto_find_batch_size): new train batch size, plans, schedule,
        optimizer (unless the caller gave one), state and metrics."""
        from csd_fast.metrics import MetricsLog

        self.args.per_device_train_batch_size = batch_size
        self._plans.pop("train", None)
        if self._own_optimizer:
            self.optimizer = None
        if self._own_scheduler:
            self.lr_scheduler = None
        self.state, self.control = self._new_state(), TrainerControl()
        self.progress, self._metrics = ckpt.TrainProgress(), MetricsLog()

    def training_job(self):
        """The explicit object `csd_fast.loop.run_training` drives (builds optimizer/schedule)."""
        from csd_fast.loop import TrainingJob, schedule_length
        from csd_fast.resume import run_identity
        from csd_fast.trl_compat import callback_states, restore_callback_states

        def plans(epoch: int):
            return self._rank_plans(self.train_pairs, "train", epoch)

        # transformers' hooks, so a subclass's create_optimizer / create_scheduler are used
        self.create_optimizer()
        if self.lr_scheduler is None:
            max_steps, _ = schedule_length(plans, self.args)
            self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        self._policy_is_initial = False
        return TrainingJob(
            args=self.args,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.lr_scheduler,
            env=self.dist,
            state=self.state,
            progress=self.progress,
            metrics=self._metrics,
            writer=self._writer(),
            tokenizer=self.processing_class,
            plans=plans,
            batches=lambda plan: self.micro_batches(self.train_pairs, plan, "train"),
            compute_loss=self.compute_loss,
            fire=self._fire,
            control=lambda: self.control,
            log=self.log,
            evaluate=self.evaluate if self.eval_pairs is not None else None,
            close=self.close_writer,
            train_tokens=self.global_train_tokens,
            train_flos=self.global_train_flos,
            run=run_identity(self),
            loss_tokens=self._sft_loss_tokens(),
            scaler=self.grad_scaler,
            callback_states=lambda: callback_states(self),
            restore_callbacks=lambda saved: restore_callback_states(self, saved),
        )

    def _sft_loss_tokens(self):
        """Per SFT row, the completion tokens its loss averages over (after truncation): the
        loop weights micro-batches by them, as TRL's SFTTrainer does. None for preference data
        and streams (a stream's micro-batches keep the per-micro-batch mean)."""
        from csd_fast.packing import truncated_lengths

        if not self._sft_data or not hasattr(self.train_pairs, "lengths"):
            return None
        prompt, chosen, rejected = self.train_pairs.lengths()
        a = self.args
        kept_prompt, kept, _, _ = truncated_lengths(
            prompt, chosen, rejected, a.max_length, a.truncation_mode
        )
        # a completion that starts its row (no prompt kept) has no prediction for its first token
        return kept - (kept_prompt == 0)

    # -------------------------------------------------------------------------- logging
    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "train_runtime" in logs:
            # TRL's log() adds the metrics of the steps since the last logging step to whatever
            # is logged, so the end-of-training summary carries that window (aux_loss, ...)
            logs = {**logs, **self._metrics.pop("train")}
        if self.state.epoch is not None:  # in place, as transformers: evaluate()'s metrics
            logs["epoch"] = self.state.epoch  # carry the epoch too
        entry = {**logs, "step": self.state.global_step}
        self.state.log_history.append(entry)
        if self.dist.is_main:  # every rank keeps the (all-rank) history; rank 0 writes it
            self._writer().write(self.state.global_step, logs)
        self._fire("on_log", logs=logs)

    def _writer(self) -> MetricsWriter:
        if getattr(self, "_metrics_writer", None) is None:
            # results this trainer writes itself (an evaluate() before train()) are its own run,
            # not an earlier one that train() must refuse to mix with (csd_fast.resume)
            used = (Path(self.args.output_dir) / "metrics.jsonl").exists()
            self.owns_output_dir = not used
            self._metrics_writer = MetricsWriter(
                self.args.output_dir,
                # TensorBoard / W&B run once per job, on the process that writes the metrics
                self.args.report_to if self.dist.is_main else [],
                getattr(self.args, "run_name", None),
                logging_dir=getattr(self.args, "logging_dir", None),
            )
        return self._metrics_writer

    def close_writer(self) -> None:
        """Flush and close TensorBoard / W&B; a later log() opens a new writer."""
        if getattr(self, "_metrics_writer", None) is not None:
            self._metrics_writer.close()
            self._metrics_writer = None

    # ------------------------------------------------------------------------ callbacks
    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    remove_callback = pop_callback

    def _fire(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            result = fn(
                self.args,
                self.state,
                self.control,
                model=self.model,
                processing_class=self.processing_class,
                optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler,
                **kwargs,
            )
            if result is not None:
                self.control = result

    # -------------------------------------------------------------------------- saving
    def save_model(self, output_dir: str | None = None) -> Path:
        """Weights (safetensors, HF layout) and tokenizer, written atomically."""
        out = Path(output_dir or self.args.output_dir)
        if self._sharded:  # gather the shards; rank 0 writes the consolidated HF layout
            from csd_fast.distributed.checkpoint import export_hf

            return export_hf(self.model, out, env=self.dist, tokenizer=self.processing_class)
        model = (
            unwrap_causal_lm(self.model) if not hasattr(self.model, "peft_config") else self.model
        )

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp, safe_serialization=True)
            self.processing_class.save_pretrained(tmp)

        if out.exists() and any(out.iterdir()):
            # a folder that holds other files (output_dir: checkpoints, logs; TRL's script saves
            # there by name) is never replaced as a whole: write the files in place, each atomic
            model.save_pretrained(out, safe_serialization=True)
            self.processing_class.save_pretrained(out)
            return out
        return ckpt.write_dir_atomically(out, write)

    def plot(self) -> Path | None:
        return plot_curves(self.args.output_dir)


def _sum_count(total, count, device) -> torch.Tensor:
    """A [sum, count] metric from host numbers, as two fills: no host-to-device copy."""
    f64 = dict(dtype=torch.float64, device=device)
    return torch.stack([torch.full((), float(total), **f64), torch.full((), float(count), **f64)])


_SFT_METRICS = ("mean_token_accuracy", "entropy", "logps/chosen")


def _fused_loss_type(args, params) -> str | None:
    """The loss the fused pair-loss kernel can take over, or None (torch reference losses).

    The kernel covers one loss type at a time with the plain reverse-KL log-ratio on unweighted
    sums; combinations, f-divergences, LD-DPO and WPO stay on `csd_fast.losses`.
    """
    if not args.fused or len(params.loss_type) != 1 or tensor_parallel_size(args) > 1:
        return None  # (a vocabulary-sharded head has its own log-prob path)
    from csd_fast.kernels.pair_loss import SUPPORTED as PAIR_LOSS_TYPES

    plain = (
        params.f_divergence_type == "reverse_kl"
        and args.ld_alpha is None
        and not args.use_weighting
        and (params.loss_weights is None or params.loss_weights == (1.0,))
    )
    return params.loss_type[0] if plain and params.loss_type[0] in PAIR_LOSS_TYPES else None


def check_adapter_reference(model, ref_model, trainable: list[str], args) -> None:
    """A PEFT policy whose live reference is itself with the adapters disabled may train only
    adapter weights: a base weight switched on by trainable_params would move the reference."""
    adapters = getattr(model, "peft_config", None)
    if not (args.trainable_params and adapters) or ref_model is not None:
        return
    if args.precompute_ref_log_probs or args.ref_cache_dir:  # a table from before training
        return
    base = [n for n in trainable if not any(f".{a}." in n or n.endswith(f".{a}") for a in adapters)]
    if base:
        raise ValueError(
            f"trainable_params {args.trainable_params} train {len(base)} base weight(s) of a "
            f"PEFT model (e.g. {base[0]}); its reference is the same model with the adapters "
            "disabled, which would move with them. Match only adapter weights, or give a "
            "ref_model, or precompute_ref_log_probs=True."
        )


def _check_inputs(args, model, ref_model, train_dataset, eval_dataset) -> None:
    """Configuration and model names checked before anything loads (csd_fast.validation)."""
    from csd_fast.validation import check_model_source, check_training_args

    check_training_args(
        args, has_train=train_dataset is not None, has_eval=eval_dataset is not None
    )
    for value, field in ((model, "model"), (ref_model, "ref_model")):
        if isinstance(value, str):
            check_model_source(value, field)


def wpo_weights(fwd, batch, lengths: torch.Tensor) -> torch.Tensor:
    """(P,) WPO weights (TRL's use_weighting): w(chosen) * w(rejected), no grad.

    w(y) = exp(mean over y's tokens of [log p(y_t) - log sum_v p_v^2]) (WPO eq. 2).
    """
    from csd_fast.batch import segment_sum

    with torch.no_grad():
        aligned = fwd.token_logps.detach().float() - fwd.log_sum_sq_probs.float()
        w = torch.exp(segment_sum(aligned, batch.seq_offsets) / lengths.clamp(min=1))
        P = batch.num_pairs
        return w[:P] * w[P:]
