"""The optimizer-step loop behind `DPOTrainer.train()`: accumulation, clipping, logs, eval, saves.

    job = trainer.training_job()        # the explicit object the loop drives (TrainingJob)
    output = run_training(job, resume_from_checkpoint=None)  # transformers' TrainOutput

Resume is exact: the epoch plan is a pure function of (seed, epoch), a checkpoint stores the
number of micro-batches of the current epoch already consumed, and the optimizer, scheduler and
RNG states are restored, so 4 steps equal 2 steps + resume + 2 steps bit for bit on CPU.

Weighting, with g micro-batches per step and W ranks (`plan[rank][micro]`): count-based
micro-batches are averaged as TRL does on one process (each micro-batch mean over its pairs,
the step the mean of those), a micro-batch's mean taken over its pairs on all ranks; token-budget
micro-batches are weighted by their pair count over the step's pairs on all ranks, so every pair
counts once however the planner groups them. SFT rows are weighted by their loss tokens over the
step's (TRL's SFTTrainer divides the step's token sum by its token count), either way. The global
counts come from the plan, which every rank computes whole (it is deterministic), so no
collective is needed for them. FSDP averages gradients over ranks, hence the factor W: W ranks x
b pairs == 1 rank x W*b pairs.

The loop reads nothing back to the host per micro-batch: the loss accumulates on the device and
is reduced across ranks and read once per logging step; the fused head plans its chunks from the
collator's host offsets. tests/test_host_syncs.py records every sync of the micro-batch body on
CPU (and lists, as an expected failure, those left in the metrics and the HF mask code).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.trainer_utils import TrainOutput

from csd_fast import checkpoint as ckpt
from csd_fast import resume
from csd_fast.batching import stand_in
from csd_fast.distributed.env import DistEnv
from csd_fast.optim import step_on_metric, steps_on_metric


@dataclass
class TrainingJob:
    """Everything the loop needs from its trainer, passed explicitly (see `DPOTrainer`)."""

    args: Any  # DPOConfig
    model: nn.Module  # the HF / PEFT model: clipped, checkpointed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    env: DistEnv
    state: Any  # transformers.TrainerState, shared with the trainer and its callbacks
    progress: ckpt.TrainProgress
    metrics: Any  # csd_fast.metrics.MetricsLog
    writer: Any  # csd_fast.reporting.MetricsWriter
    tokenizer: Any
    plans: Callable[[int], list[list[list[int]]]]  # epoch -> plan[rank][micro] of the train set
    batches: Callable[[list[list[int]]], Iterator]  # this rank's micro-batches, on the device
    compute_loss: Callable[..., Tensor]  # (batch, mode, dummy=False) -> micro-batch mean loss
    fire: Callable[..., None]  # callback event
    control: Callable[[], Any]  # the current TrainerControl (callbacks may replace it)
    log: Callable[[dict], None]
    evaluate: Callable[[], dict] | None  # None without an eval set
    close: Callable[[], None]  # flush the metric writers
    train_tokens: Callable[[], int]  # training tokens so far over all ranks (a collective)
    train_flos: Callable[[], float] = lambda: 0.0  # total_flos so far, all ranks (a collective)
    run: dict = field(default_factory=dict)  # model names, data fingerprints (csd_fast.resume)
    loss_tokens: Any = None  # (n,) int64 per train pair: weight by loss tokens (SFT); None: pairs
    scaler: Any = None  # fp16: a torch.amp.GradScaler (dynamic loss scaling), else None
    callback_states: Callable[[], dict] | None = None  # stateful callbacks, for checkpoints
    restore_callbacks: Callable[[dict], None] | None = None  # ... and back on resume


def _due(step: int, every: float | int | None, total: int) -> bool:
    if not every:
        return False
    every = math.ceil(total * every) if every < 1 else int(every)
    return every > 0 and step % every == 0


def resolve_resume(output_dir, resume) -> Path | None:
    if not resume:
        return None
    if resume is True:
        path = ckpt.latest_checkpoint(Path(output_dir))
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {output_dir}")
        return path
    return Path(resume)


def steps_in_epoch(plans, ga: int, epoch: int) -> int:
    return max(-(-len(plans(epoch)[0]) // ga), 1)


def schedule_length(plans, args) -> tuple[int, int | None]:
    """(optimizer steps of the run, epochs or None when max_steps decides).

    Token-budget and CLO-grouped plans can differ in length from epoch to epoch, so the total
    is the sum of each epoch's own steps (equal to transformers' epochs x steps otherwise).
    """
    ga = args.gradient_accumulation_steps
    if args.max_steps and args.max_steps > 0:
        return args.max_steps, None
    whole = math.floor(args.num_train_epochs)
    total = sum(steps_in_epoch(plans, ga, e) for e in range(whole))
    if args.num_train_epochs > whole:
        total += math.ceil((args.num_train_epochs - whole) * steps_in_epoch(plans, ga, whole))
    return max(total, 1), math.ceil(args.num_train_epochs)


def micro_weights(
    group_plans: list[list[list[int]]], rank: int, by_tokens: bool, loss_tokens=None
) -> list[float]:
    """Loss weight of each of this rank's micro-batches in one step (see the module docstring).

    `group_plans[r][m]` is rank r's m-th micro-batch of the step. With `loss_tokens` (per pair,
    the tokens its loss averages over) a micro-batch weighs its share of the step's loss tokens
    on all ranks: a token mean over the whole step, as TRL's SFTTrainer takes it."""
    world = len(group_plans)
    mine = group_plans[rank]
    if loss_tokens is not None:
        step_tokens = sum(int(loss_tokens[idx].sum()) for plan in group_plans for idx in plan)
        return [int(loss_tokens[idx].sum()) / max(step_tokens, 1) * world for idx in mine]
    if by_tokens:
        step_pairs = sum(len(idx) for plan in group_plans for idx in plan)
        return [len(idx) / step_pairs * world for idx in mine]
    weights = []
    for m, idx in enumerate(mine):
        global_pairs = sum(len(plan[m]) for plan in group_plans)
        weights.append(len(idx) / global_pairs * world / len(mine))
    return weights


def _stand_ins(group_plans: list[list[list[int]]], rank: int) -> list[list[int]]:
    """This rank's micro-batches, an empty one replaced by a pair of another rank's (weight 0)."""
    out = []
    for m, idx in enumerate(group_plans[rank]):
        out.append(idx or stand_in(group_plans, m))
    return out


class _TokenCount:
    """The summed step losses since step 0 (the summary `train_loss`, whole-run after a resume)
    and TRL's `num_tokens` over all ranks; both reduced only when read (collectives)."""

    def __init__(self, job: TrainingJob):
        self.job = job
        # one rank of the data group holds it (data rank 0: under tensor parallelism each tensor
        # rank's group sums its own copy)
        start = job.progress.train_loss_sum if job.env.rank == 0 else 0.0
        self.loss = torch.tensor(start, dtype=torch.float64, device=job.env.device)

    def loss_sum(self) -> float:
        """All ranks' summed step losses (a collective when distributed)."""
        return float(self.job.env.all_reduce_sum(self.loss.detach().cpu().clone()))

    def sync(self) -> int:
        total = self.job.train_tokens()  # each rank counts its own; the resumed total on rank 0
        self.job.progress.total_tokens = total
        return total


def run_training(job: TrainingJob, resume_from_checkpoint=None):
    args, env, state, model = job.args, job.env, job.state, job.model
    ga = args.gradient_accumulation_steps
    max_steps, num_epochs = schedule_length(job.plans, args)
    opt, sched = job.optimizer, job.scheduler
    progress = job.progress
    resume_path = resolve_resume(args.output_dir, resume_from_checkpoint)
    if resume_path is not None and resume.read_record(resume_path).get("training", {}).get(
        "save_only_model"
    ):
        raise resume.CheckpointError(
            f"{resume_path} was saved with save_only_model=True: it holds the weights but no "
            "optimizer, schedule or RNG state, so training cannot resume from it exactly. Start "
            f"a new run from its weights (model='{resume_path}')."
        )
    if resume_path is not None:
        fresh = resume.hyperparameters(opt)  # this run's settings, before the saved ones load
        loaded = ckpt.load_checkpoint(
            resume_path, model=model, optimizer=opt, scheduler=sched, env=env
        )
        for f in fields(loaded):
            setattr(progress, f.name, getattr(loaded, f.name))
        if args.ignore_data_skip:  # transformers: no fast-forward, the epoch starts over
            progress.micro_in_epoch = 0
        if getattr(args, "resume_with_changes", False):  # changes accepted (and logged) up front
            resume.apply_new_hyperparameters(opt, sched, fresh)
        # TRL's cumulative count; each rank counts its own, so the saved total lives on rank 0
        # (the running total only: no window value, so the next log row is as if never stopped)
        job.metrics.total_train_tokens += progress.total_tokens if env.rank == 0 else 0
        job.metrics.total_flos += progress.total_flos if env.rank == 0 else 0.0
        if job.scaler is not None and progress.grad_scaler is not None:
            job.scaler.load_state_dict(progress.grad_scaler)
        if args.restore_callback_states_from_checkpoint and job.restore_callbacks is not None:
            job.restore_callbacks(progress.stateful_callbacks)
        if env.is_main:
            job.writer.restore(progress.log_history)  # exactly what was written at that point
    tokens = _TokenCount(job)
    state.global_step, state.max_steps = progress.global_step, max_steps
    state.num_train_epochs = num_epochs or math.ceil(max_steps / steps_in_epoch(job.plans, ga, 0))
    state.log_history = list(progress.log_history)
    state.best_metric, state.best_model_checkpoint = (
        progress.best_metric,
        progress.best_model_checkpoint,
    )
    resumed_plan = job.plans(progress.epoch)[env.rank]
    state.epoch = progress.epoch + progress.micro_in_epoch / max(1, len(resumed_plan))
    progress_start, pairs_seen = state.global_step, 0
    job.fire("on_train_begin")
    if args.eval_on_start:  # transformers: an evaluation before the first step, on resume too
        if job.evaluate is None:
            raise ValueError("eval_on_start=True needs an eval_dataset")
        job.evaluate()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    by_tokens = bool(args.max_tokens_per_batch)
    train_start = time.perf_counter()
    bar = tqdm(
        total=max_steps,
        initial=progress.global_step,
        disable=args.disable_tqdm or not env.is_main,
        desc="train",
    )
    window = _Window(job.env)
    grad_norm = lr_used = None
    on_metric = steps_on_metric(sched)
    epoch = progress.epoch
    while (num_epochs is None or epoch < num_epochs) and state.global_step < max_steps:
        plans = job.plans(epoch)
        plan = plans[env.rank]
        if not plan:
            raise ValueError("the training set yields no micro-batch (empty, or all dropped)")
        micro = progress.micro_in_epoch if epoch == progress.epoch else 0
        job.fire("on_epoch_begin")
        while micro < len(plan) and state.global_step < max_steps:
            group_plans = [p[micro : micro + ga] for p in plans]
            weights = micro_weights(group_plans, env.rank, by_tokens, job.loss_tokens)
            real = [bool(idx) for idx in group_plans[env.rank]]
            step_loss = torch.zeros((), dtype=torch.float64, device=env.device)
            batches = job.batches(_stand_ins(group_plans, env.rank))
            job.fire("on_step_begin")
            for m, (batch, weight, is_real) in enumerate(zip(batches, weights, real, strict=True)):
                if m:
                    job.fire("on_substep_end")  # HF's order: after each micro-batch but the last
                loss = job.compute_loss(batch, "train", dummy=not is_real)
                scaled = loss * weight
                (scaled if job.scaler is None else job.scaler.scale(scaled)).backward()
                # fp64 on the device: the same sum a float() per micro-batch gave, without the sync
                value = loss.detach().double()
                if args.logging_nan_inf_filter:
                    # HF's filter: a non-finite loss is logged as the window's running mean
                    value = torch.where(value.isfinite(), value, window.mean_loss())
                step_loss += value * (weight / env.world_size)
                if is_real:
                    window.tokens += batch.num_real_tokens
                    window.pairs += batch.num_pairs
                    pairs_seen += batch.num_pairs
            micro += len(group_plans[env.rank])
            if job.scaler is not None:  # clip (and log) the true gradients
                job.scaler.unscale_(opt)
            grad_norm = clip_grad_norm(params, args.max_grad_norm)
            # TRL logs the rate of this update, not the next
            lr_used = opt.param_groups[0]["lr"] if on_metric else sched.get_last_lr()[0]
            job.fire("on_pre_optimizer_step")  # after clipping, as in HF: gradients are final
            stepped = _optimizer_step(opt, job.scaler)
            job.fire("on_optimizer_step")
            # a step the GradScaler skipped leaves the schedule where it was; a metric
            # schedule steps after evaluations instead (_evaluate_and_save)
            if stepped and not on_metric:
                sched.step()
            opt.zero_grad(set_to_none=True)
            state.global_step += 1
            state.epoch = epoch + micro / len(plan)
            progress.global_step, progress.epoch, progress.micro_in_epoch = (
                state.global_step,
                epoch,
                micro,
            )
            window.add_step(step_loss)
            tokens.loss += step_loss  # since step 0: saved in checkpoints, train_loss spans resumes
            bar.update(1)
            # transformers' order: the default flags first, then callbacks may add or cancel them
            _set_step_flags(job, max_steps)
            job.fire("on_step_end")
            _act_on_flags(job, window, tokens, grad_norm, lr_used, bar)
            if job.control().should_training_stop:
                break
        if micro >= len(plan):  # advance first, so a checkpoint saved below resumes after it
            epoch += 1
            progress.epoch, progress.micro_in_epoch = epoch, 0
        # also when stopped mid-epoch (max_steps, a callback), as transformers does
        control = job.control()
        control.should_evaluate |= args.eval_strategy == "epoch" and args.eval_delay <= state.epoch
        control.should_save |= args.save_strategy == "epoch"
        control.should_log |= args.logging_strategy == "epoch"
        job.fire("on_epoch_end")
        _act_on_flags(job, window, tokens, grad_norm, lr_used, bar)
        if job.control().should_training_stop:
            break
    bar.close()
    if env.distributed:
        from csd_fast.distributed.checkpoint import wait_for_saves

        wait_for_saves()  # an async checkpoint in flight becomes visible before train() returns
        if env.is_main:
            ckpt.rotate_checkpoints(
                Path(args.output_dir), args.save_total_limit, keep=state.best_model_checkpoint
            )
    runtime = time.perf_counter() - train_start
    steps_run = max(state.global_step - progress_start, 1)
    pairs_all = int(env.all_reduce_sum(torch.tensor([pairs_seen])).item())
    state.total_flos = job.train_flos()
    summary = {
        "train_runtime": runtime,
        "train_samples_per_second": pairs_all / max(runtime, 1e-9),
        "train_steps_per_second": steps_run / max(runtime, 1e-9),
        "total_flos": state.total_flos,
        "train_loss": tokens.loss_sum() / max(state.global_step, 1),
    }
    job.log(summary)
    if args.load_best_model_at_end and state.best_model_checkpoint:
        ckpt.load_checkpoint_weights(model, Path(state.best_model_checkpoint))
    job.fire("on_train_end")
    job.close()
    # transformers' return value: the summary without total_flos (kept in state), with epoch
    metrics = {k: v for k, v in summary.items() if k != "total_flos"}
    metrics["epoch"] = state.epoch
    return TrainOutput(state.global_step, summary["train_loss"], metrics)


def _optimizer_step(opt, scaler) -> bool:
    """opt.step(), through the GradScaler under fp16; False when it skipped the step (inf/nan
    gradients: the scale went down). As accelerate, a skipped step leaves the schedule alone."""
    if scaler is None:
        opt.step()
        return True
    before = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() >= before


def clip_grad_norm(params: list[Tensor], max_grad_norm: float | None) -> Tensor:
    """Pre-clip global gradient norm (TRL logs it even when clipping is off), kept on device.

    Sharded gradients (DTensors) give a partial norm: its full value is the global norm. Under
    tensor parallelism they live on two meshes ((dp, tp) for the sharded layers, dp for the
    replicated weights): one norm per mesh, then combined."""
    max_norm = max_grad_norm if max_grad_norm else float("inf")
    by_mesh: dict = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if len(by_mesh) <= 1:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    norm = torch.linalg.vector_norm(torch.stack(norms))
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm


class _Window:
    """The logging window: loss summed per step on the device, tokens and pairs on the host."""

    def __init__(self, env: DistEnv):
        self.env = env
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        self.steps, self.tokens, self.pairs, self.t0 = 0, 0, 0, time.perf_counter()

    def add_step(self, step_loss: Tensor) -> None:
        self.loss = self.loss + step_loss
        self.steps += 1

    def mean_loss(self) -> Tensor:
        return self.loss / max(self.steps, 1)


def _set_step_flags(job: TrainingJob, max_steps: int) -> None:
    """transformers' DefaultFlowCallback.on_step_end: when to log, evaluate and save."""
    args, step, control = job.args, job.state.global_step, job.control()
    if (args.logging_strategy == "steps" and _due(step, args.logging_steps, max_steps)) or (
        args.logging_first_step and step == 1  # whatever the strategy, as transformers
    ):
        control.should_log = True
    eval_every = args.eval_steps or args.logging_steps
    if (
        args.eval_strategy == "steps"
        and (_due(step, eval_every, max_steps) or step >= max_steps)
        and args.eval_delay <= step
    ):
        control.should_evaluate = True  # like HF, the last step is evaluated too
    if args.save_strategy == "steps" and (
        _due(step, args.save_steps, max_steps) or step >= max_steps
    ):
        control.should_save = True


def _act_on_flags(job: TrainingJob, window: _Window, tokens, grad_norm, lr_used, bar) -> None:
    """Log, evaluate and save as the control flags (defaults + callbacks) say."""
    args, env, control = job.args, job.env, job.control()
    step = job.state.global_step
    if control.should_log and window.steps:
        control.should_log = False
        elapsed = max(time.perf_counter() - window.t0, 1e-9)
        # one host read per log: the loss over all ranks, the norm, the token/pair counts
        counts = torch.tensor([window.tokens, window.pairs], dtype=torch.float64)
        env.all_reduce_sum(counts)
        loss = env.all_reduce_sum(window.loss.cpu().clone())
        logs = {"loss": float(loss) / window.steps}
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        logs["learning_rate"] = lr_used
        logs.update(job.metrics.pop("train"))
        if env.distributed:
            logs["num_tokens"] = float(job.train_tokens())
        job.state.total_flos = job.train_flos()  # transformers stores it at every log
        logs["tokens_per_second"] = float(counts[0]) / elapsed
        logs["pairs_per_second"] = float(counts[1]) / elapsed
        job.log(logs)
        bar.set_postfix(
            loss=f"{logs['loss']:.4f}",
            acc=f"{logs.get('rewards/accuracies', float('nan')):.2f}",
            tok_s=f"{logs['tokens_per_second']:.0f}",
        )
        window.reset()
    _evaluate_and_save(job, tokens)
    every = args.torch_empty_cache_steps
    if every and step % every == 0 and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _evaluate_and_save(job: TrainingJob, tokens: _TokenCount) -> None:
    """Run the evaluation and the save the control flags ask for; track the best checkpoint."""
    args, control = job.args, job.control()
    improved = False
    if control.should_evaluate:
        control.should_evaluate = False
        if job.evaluate is not None:
            metrics = job.evaluate()
            step_on_metric(job.scheduler, args, metrics)  # ReduceLROnPlateau, GreedyLR
            improved = _track_best(job, metrics)
    control = job.control()
    if control.should_save or (args.save_strategy == "best" and improved):
        control.should_save = False
        _save(job, tokens, best=improved)


def _track_best(job: TrainingJob, metrics: dict) -> bool:
    """Update the best metric (eval loss unless metric_for_best_model says otherwise)."""
    args, state = job.args, job.state
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
        state.best_metric = job.progress.best_metric = value
    return better


def _save(job: TrainingJob, tokens: _TokenCount, best: bool = False) -> Path:
    args, state, env = job.args, job.state, job.env
    out = Path(args.output_dir)
    path = out / f"checkpoint-{state.global_step}"
    if best:  # recorded before writing, so the checkpoint's own state names it
        state.best_model_checkpoint = job.progress.best_model_checkpoint = str(path)
    job.progress.log_history = list(state.log_history)
    if env.distributed:
        tokens.sync()  # the saved count is the all-rank total
    job.progress.train_loss_sum = tokens.loss_sum()
    job.progress.total_flos = state.total_flos = job.train_flos()
    job.progress.grad_scaler = None if job.scaler is None else job.scaler.state_dict()
    if job.callback_states is not None:
        job.progress.stateful_callbacks = job.callback_states()
    ckpt.save_checkpoint(
        path,
        model=job.model,
        # save_only_model: weights, tokenizer and progress only (transformers' option)
        optimizer=None if args.save_only_model else job.optimizer,
        scheduler=None if args.save_only_model else job.scheduler,
        progress=job.progress,
        tokenizer=job.tokenizer,
        config=resume.run_record(args, job.run),
        env=env,
        async_save=bool((args.fsdp_config or {}).get("async_checkpoint")),
    )
    if env.is_main:
        ckpt.rotate_checkpoints(out, args.save_total_limit, keep=state.best_model_checkpoint)
    job.fire("on_save")
    return path
