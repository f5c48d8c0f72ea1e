"""The optimizer-step loop behind `DPOTrainer.train()`: accumulation, clipping, logs, eval, saves.

Resume is exact: the epoch plan is a pure function of (seed, epoch), a checkpoint stores the
number of micro-batches of the current epoch already consumed, and the optimizer, scheduler and
RNG states are restored, so 4 steps equal 2 steps + resume + 2 steps bit for bit on CPU.
Count-based micro-batches are averaged as TRL does (each micro-batch mean over its pairs, the
step the mean of those); token-budget micro-batches are weighted by their pair count, so every
pair counts once however the planner groups them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from csd_fast import checkpoint as ckpt
from csd_fast import resume
from csd_fast.optim import build_optimizer, build_scheduler


def _due(step: int, every: float | int | None, total: int) -> bool:
    if not every:
        return False
    every = math.ceil(total * every) if every < 1 else int(every)
    return every > 0 and step % every == 0


def _resolve_resume(trainer, resume) -> Path | None:
    if not resume:
        return None
    if resume is True:
        path = ckpt.latest_checkpoint(Path(trainer.args.output_dir))
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {trainer.args.output_dir}")
        return path
    return Path(resume)


def run_training(trainer, resume_from_checkpoint=None):
    args = trainer.args
    model = trainer.model
    ga = args.gradient_accumulation_steps
    max_steps, num_epochs = _schedule_length(trainer)
    if trainer.optimizer is None:
        trainer.optimizer = build_optimizer(model, args)
    if trainer.lr_scheduler is None:
        trainer.lr_scheduler = build_scheduler(trainer.optimizer, args, max_steps)
    opt, sched = trainer.optimizer, trainer.lr_scheduler
    progress = ckpt.TrainProgress()
    writer = trainer._writer()
    resume_path = _resolve_resume(trainer, resume_from_checkpoint)
    if resume_path is not None:
        fresh = resume.hyperparameters(opt)  # this run's settings, before the saved ones load
        ckpt.load_weights(model, resume_path)
        progress = ckpt.load_training_state(resume_path, optimizer=opt, scheduler=sched)
        if getattr(trainer, "resume_changes", None):  # accepted with resume_with_changes
            resume.apply_new_hyperparameters(opt, sched, fresh)
        trainer._metrics.add_tokens("train", progress.total_tokens)  # TRL's cumulative count
        writer.restore(progress.log_history)  # exactly what was written at that checkpoint
    trainer.progress = progress
    state = trainer.state
    state.global_step, state.max_steps = progress.global_step, max_steps
    state.num_train_epochs = num_epochs or math.ceil(max_steps / _steps_in_epoch(trainer, 0))
    state.log_history = list(progress.log_history)
    state.best_metric, state.best_model_checkpoint = (
        progress.best_metric,
        progress.best_model_checkpoint,
    )
    resumed_plan = trainer._plan(trainer.train_pairs, "train", progress.epoch)
    state.epoch = progress.epoch + progress.micro_in_epoch / max(1, len(resumed_plan))
    trainer._policy_is_initial = False
    progress_start, pairs_seen = state.global_step, 0
    trainer._fire("on_train_begin")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    by_tokens = bool(args.max_tokens_per_batch)
    train_start = time.perf_counter()
    bar = tqdm(
        total=max_steps, initial=progress.global_step, disable=args.disable_tqdm, desc="train"
    )
    window = {"loss": 0.0, "steps": 0, "tokens": 0, "pairs": 0, "t0": time.perf_counter()}
    grad_norm = None
    epoch = progress.epoch
    while (num_epochs is None or epoch < num_epochs) and state.global_step < max_steps:
        plan = trainer._plan(trainer.train_pairs, "train", epoch)
        if not plan:
            raise ValueError("the training set yields no micro-batch (empty, or all dropped)")
        micro = progress.micro_in_epoch if epoch == progress.epoch else 0
        trainer._fire("on_epoch_begin")
        while micro < len(plan) and state.global_step < max_steps:
            group = plan[micro : micro + ga]
            step_pairs = sum(len(idx) for idx in group)
            step_loss = 0.0
            for idx in group:
                batch = trainer._collate(trainer.train_pairs, idx, "train")
                loss = trainer.compute_loss(batch, "train")
                # count-based batches: TRL's mean of micro-batch means; token budgets: per pair
                weight = batch.num_pairs / step_pairs if by_tokens else 1.0 / len(group)
                (loss * weight).backward()
                value = float(loss.detach())
                if args.logging_nan_inf_filter and not math.isfinite(value):
                    # HF's filter: a non-finite loss is logged as the window's running mean
                    value = window["loss"] / max(window["steps"], 1)
                step_loss += value * weight
                window["tokens"] += batch.num_real_tokens
                window["pairs"] += batch.num_pairs
                pairs_seen += batch.num_pairs
            micro += len(group)
            # TRL logs the pre-clip norm, computed even when clipping is off
            max_norm = args.max_grad_norm if args.max_grad_norm else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr_used = sched.get_last_lr()[0]  # TRL logs the rate of this update, not the next
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.global_step += 1
            state.epoch = epoch + micro / len(plan)
            progress.global_step, progress.epoch, progress.micro_in_epoch = (
                state.global_step,
                epoch,
                micro,
            )
            window["loss"] += step_loss
            progress.train_loss_sum += step_loss  # saved in checkpoints: train_loss spans resumes
            window["steps"] += 1
            bar.update(1)
            # transformers' order: the default flags first, then callbacks may add or cancel them
            _set_step_flags(trainer, max_steps)
            trainer._fire("on_step_end")
            _act_on_flags(trainer, window, grad_norm, lr_used, bar)
            if trainer.control.should_training_stop:
                break
        if micro >= len(plan):  # advance first, so a checkpoint saved below resumes after it
            epoch += 1
            progress.epoch, progress.micro_in_epoch = epoch, 0
        # also when stopped mid-epoch (max_steps, a callback), as transformers does
        trainer.control.should_evaluate |= args.eval_strategy == "epoch"
        trainer.control.should_save |= args.save_strategy == "epoch"
        trainer._fire("on_epoch_end")
        _evaluate_and_save(trainer)
        if trainer.control.should_training_stop:
            break
    bar.close()
    runtime = time.perf_counter() - train_start
    steps_run = max(state.global_step - progress_start, 1)
    trainer.log(
        {
            "train_runtime": runtime,
            "train_samples_per_second": pairs_seen / max(runtime, 1e-9),
            "train_steps_per_second": steps_run / max(runtime, 1e-9),
            "train_loss": progress.train_loss_sum / max(state.global_step, 1),
        }
    )
    if args.load_best_model_at_end and state.best_model_checkpoint:
        ckpt.load_weights(model, Path(state.best_model_checkpoint))
    trainer._fire("on_train_end")
    trainer.close_writer()
    return state


def _steps_in_epoch(trainer, epoch: int) -> int:
    n_micro = len(trainer._plan(trainer.train_pairs, "train", epoch))
    ga = trainer.args.gradient_accumulation_steps
    return max(-(-n_micro // ga), 1)


def _schedule_length(trainer) -> tuple[int, int | None]:
    """(optimizer steps of the run, epochs or None when max_steps decides).

    Token-budget and CLO-grouped plans can differ in length from epoch to epoch, so the total
    is the sum of each epoch's own steps (equal to transformers' epochs x steps otherwise).
    """
    args = trainer.args
    if args.max_steps and args.max_steps > 0:
        return args.max_steps, None
    whole = math.floor(args.num_train_epochs)
    total = sum(_steps_in_epoch(trainer, e) for e in range(whole))
    if args.num_train_epochs > whole:
        total += math.ceil((args.num_train_epochs - whole) * _steps_in_epoch(trainer, whole))
    return max(total, 1), math.ceil(args.num_train_epochs)


def _set_step_flags(trainer, max_steps: int) -> None:
    """transformers' DefaultFlowCallback.on_step_end: when to log, evaluate and save."""
    args, step, control = trainer.args, trainer.state.global_step, trainer.control
    if args.logging_strategy == "steps" and (
        _due(step, args.logging_steps, max_steps) or (args.logging_first_step and step == 1)
    ):
        control.should_log = True
    eval_every = args.eval_steps or args.logging_steps
    if args.eval_strategy == "steps" and (_due(step, eval_every, max_steps) or step >= max_steps):
        control.should_evaluate = True  # like HF, the last step is evaluated too
    if args.save_strategy == "steps" and (
        _due(step, args.save_steps, max_steps) or step >= max_steps
    ):
        control.should_save = True


def _act_on_flags(trainer, window, grad_norm, lr_used, bar) -> None:
    """Log, evaluate and save as the control flags (defaults + callbacks) say."""
    args, state, control = trainer.args, trainer.state, trainer.control
    step = state.global_step
    if control.should_log and window["steps"]:
        control.should_log = False
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        logs = {"loss": window["loss"] / window["steps"]}
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs["learning_rate"] = lr_used
        logs.update(trainer._metrics.pop("train"))
        logs["tokens_per_second"] = window["tokens"] / elapsed
        logs["pairs_per_second"] = window["pairs"] / elapsed
        trainer.log(logs)
        bar.set_postfix(
            loss=f"{logs['loss']:.4f}",
            acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}",
            tok_s=f"{logs['tokens_per_second']:.0f}",
        )
        window.update(loss=0.0, steps=0, tokens=0, pairs=0, t0=time.perf_counter())
    _evaluate_and_save(trainer)
    every = args.torch_empty_cache_steps
    if every and step % every == 0 and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate_and_save(trainer) -> None:
    """Run the evaluation and the save the control flags ask for; track the best checkpoint."""
    args, control = trainer.args, trainer.control
    improved = False
    if control.should_evaluate:
        control.should_evaluate = False
        if trainer.eval_pairs is not None:
            improved = _track_best(trainer, trainer.evaluate())
    if control.should_save or (args.save_strategy == "best" and improved):
        control.should_save = False
        _save(trainer, best=improved)


def _track_best(trainer, metrics: dict) -> bool:
    """Update the best metric (eval loss unless metric_for_best_model says otherwise)."""
    args, state = trainer.args, trainer.state
    key = args.metric_for_best_model
    if key is None and (args.load_best_model_at_end or args.save_strategy == "best"):
        key = "loss"  # transformers' default for these two
    if key is None:
        return False
    key = key if key.startswith("eval_") else f"eval_{key}"
    value = metrics.get(key)
    if value is None:
        return False
    greater = args.greater_is_better if args.greater_is_better is not None else "loss" not in key
    better = state.best_metric is None or (
        value > state.best_metric if greater else value < state.best_metric
    )
    if better:
        state.best_metric = trainer.progress.best_metric = value
    return better


def _save(trainer, best: bool = False) -> Path:
    args, state = trainer.args, trainer.state
    out = Path(args.output_dir)
    path = out / f"checkpoint-{state.global_step}"
    if best:  # recorded before writing, so the checkpoint's own state names it
        state.best_model_checkpoint = trainer.progress.best_model_checkpoint = str(path)
    trainer.progress.log_history = list(state.log_history)
    model = trainer.model
    ckpt.save_checkpoint(
        path,
        model=model,
        optimizer=trainer.optimizer,
        scheduler=trainer.lr_scheduler,
        progress=trainer.progress,
        tokenizer=trainer.processing_class,
        config=resume.run_record(trainer),
    )
    ckpt.rotate_checkpoints(out, args.save_total_limit, keep=state.best_model_checkpoint)
    trainer._fire("on_save")
    return path
