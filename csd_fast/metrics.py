"""Training metrics with TRL 1.16 DPOTrainer's names and definitions, and their window average.

Per micro-batch (TRL `_compute_loss`), with P pairs and rewards r = β·(log πθ - log πref):

    rewards/chosen, rewards/rejected     mean over pairs of r_c, r_r
    rewards/accuracies                   mean over pairs of [r_c > r_r] (strict: ties count 0)
    rewards/margins                      mean over pairs of r_c - r_r
    logps/chosen, logps/rejected         mean over pairs of the summed policy log-probs
    logits/chosen, logits/rejected       token-weighted mean, over the chosen (rejected) completion
                                         tokens, of each token's vocab-mean logit
    mean_token_accuracy                  share of CHOSEN completion tokens whose label is the argmax
    entropy                              token-weighted mean entropy over chosen + rejected tokens
    num_tokens                           cumulative count of training attention-mask tokens (TRL
                                         counts the padded rows' mask: `PairBatch.num_tokens`)

Per language (pairs carrying a `lang`, the prompt's language), over the micro-batch's pairs of
that language only:

    rewards/accuracies/<lang>            mean over those pairs of [r_c > r_r]
    rewards/margins/<lang>               mean over those pairs of r_c - r_r

A language absent from a micro-batch adds nothing to it, so at logging time its value is the mean
over the micro-batches that held it (the same mean-of-micro-batch-means rule as the others).

Token-weighted metrics of an empty set are 0.0, as in TRL. At logging time (`DPOTrainer.log`) each
metric is the plain mean of its per-micro-batch values over the window, not re-weighted by token or
pair counts; `num_tokens` is the cumulative total; eval keys get an "eval_" prefix.

Across data-parallel ranks TRL gathers before dividing; `pair_metric_sums` returns (sum, count) per
metric so a caller can all-reduce them before `metrics_from_sums`. Test: `python -m pytest
tests/test_metrics.py -q`.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from csd_fast.losses import LossParams, PairLogps, rewards


def pair_metric_sums(
    params: LossParams,
    logps: PairLogps,
    *,
    token_entropy: Tensor | None,
    token_mean_logit: Tensor | None,
    token_is_top1: Tensor | None,
    token_seq_ids: Tensor,
    num_pairs: int,
    langs: tuple[str, ...] | None = None,
    lang_names: tuple[str, ...] | None = None,
) -> dict[str, Tensor]:
    """metric name -> fp64 tensor [sum, count]; token_* are (N,) over scored tokens whose
    token_seq_ids (N,) lie in 0..2P-1 (chosen 0..P-1, rejected P..2P-1). A None token input omits
    its metrics; `langs` (P,) adds the per-language ones, for every language of `lang_names` too
    (count 0 where absent: the same keys on every rank, for the all-reduce)."""
    if logps.num_pairs != num_pairs:
        raise ValueError(f"num_pairs={num_pairs} but the log-probs hold {logps.num_pairs} pairs")
    f64 = torch.float64
    r_c, r_r = rewards(params, logps)
    # compare in the input dtype, as TRL does, so ties are decided identically
    correct = r_c > r_r
    r_c, r_r = r_c.to(f64), r_r.to(f64)
    # fills, not torch.tensor(host value, device=): no host-to-device copy per micro-batch
    P = torch.full((), float(num_pairs), dtype=f64, device=r_c.device)

    def pair_mean(values: Tensor) -> Tensor:
        return torch.stack([values.to(f64).sum(), P])

    out = {
        "rewards/chosen": pair_mean(r_c),
        "rewards/rejected": pair_mean(r_r),
        "rewards/accuracies": pair_mean(correct),
        "rewards/margins": pair_mean(r_c - r_r),
        "logps/chosen": pair_mean(logps.chosen_logps.detach()),
        "logps/rejected": pair_mean(logps.rejected_logps.detach()),
    }

    if langs is not None:
        out.update(_language_sums(langs, correct, r_c - r_r, num_pairs, lang_names))

    is_chosen = token_seq_ids < num_pairs  # (N,)

    def token_mean(values: Tensor, mask: Tensor | None) -> Tensor:
        values = values.detach().to(f64)
        if mask is None:
            n = torch.full((), float(values.numel()), dtype=f64, device=values.device)
            return torch.stack([values.sum(), n])
        # a where, not values[mask]: a boolean index reads the mask's count back to the host
        return torch.stack([torch.where(mask, values, 0.0).sum(), mask.sum().to(f64)])

    if token_mean_logit is not None:
        out["logits/chosen"] = token_mean(token_mean_logit, is_chosen)
        out["logits/rejected"] = token_mean(token_mean_logit, ~is_chosen)
    if token_is_top1 is not None:
        out["mean_token_accuracy"] = token_mean(token_is_top1, is_chosen)
    if token_entropy is not None:
        out["entropy"] = token_mean(token_entropy, None)
    return {k: v.to(r_c.device) for k, v in out.items()}


LANGUAGE_METRICS = ("rewards/accuracies/", "rewards/margins/")


def is_language_metric(key: str) -> bool:
    """A per-language key: averaged only over the micro-batches that held the language."""
    return key.removeprefix("eval_").startswith(LANGUAGE_METRICS)


def _language_sums(
    langs: tuple[str, ...],
    correct: Tensor,
    margins: Tensor,
    num_pairs: int,
    names: tuple[str, ...] | None = None,
) -> dict[str, Tensor]:
    """rewards/accuracies/<lang> and rewards/margins/<lang> as [sum, count] over each language."""
    if len(langs) != num_pairs:
        raise ValueError(f"{len(langs)} languages for {num_pairs} pairs")
    names = sorted(set(langs) | set(names or ()))
    index = {name: k for k, name in enumerate(names)}
    lang_ids = torch.tensor([index[x] for x in langs], device=margins.device)
    f64 = torch.float64
    # one scatter per metric instead of a boolean mask per language
    counts = torch.zeros(len(names), dtype=f64, device=margins.device)
    counts.index_add_(0, lang_ids, torch.ones_like(margins, dtype=f64))
    acc = torch.zeros_like(counts).index_add_(0, lang_ids, correct.to(f64))
    margin = torch.zeros_like(counts).index_add_(0, lang_ids, margins.to(f64))
    out = {}
    for name, k in index.items():
        out[f"rewards/accuracies/{name}"] = torch.stack([acc[k], counts[k]])
        out[f"rewards/margins/{name}"] = torch.stack([margin[k], counts[k]])
    return out


def metrics_from_sums(sums: dict[str, Tensor]) -> dict[str, float]:
    """[sum, count] per metric -> sum / count as floats (0.0 for an empty count, as in TRL)."""
    if not sums:
        return {}
    # one device-to-host copy for all metrics, not one sync per metric
    table = torch.stack([pair.to(torch.float64) for pair in sums.values()]).cpu().tolist()
    return {
        key: total / count if count > 0 else 0.0
        for key, (total, count) in zip(sums, table, strict=True)
    }


def pair_metrics(
    params: LossParams,
    logps: PairLogps,
    *,
    token_entropy: Tensor | None,
    token_mean_logit: Tensor | None,
    token_is_top1: Tensor | None,
    token_seq_ids: Tensor,
    num_pairs: int,
    langs: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """TRL's per-micro-batch metrics of one process (see the module docstring for definitions)."""
    sums = pair_metric_sums(
        params,
        logps,
        token_entropy=token_entropy,
        token_mean_logit=token_mean_logit,
        token_is_top1=token_is_top1,
        token_seq_ids=token_seq_ids,
        num_pairs=num_pairs,
        langs=langs,
    )
    return metrics_from_sums(sums)


class MetricsLog:
    """Collects per-micro-batch metric dicts per mode and averages them at logging time like TRL.

    Call `add` once per micro-batch (any keys: "loss" or "aux_loss" too), `add_tokens` with the
    micro-batch's attention-mask token count, and `pop(mode)` when the trainer logs.
    """

    def __init__(self) -> None:
        self._values: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self.total_train_tokens = 0  # TRL's _total_train_tokens: only training batches count
        self.total_flos = 0.0  # transformers' estimate (6 x params x input_ids), this rank's

    def _check(self, mode: str) -> None:
        if mode not in self._values:
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")

    def add(self, mode: str, metrics: dict[str, float]) -> None:
        self._check(mode)
        for key, value in metrics.items():
            # device tensors stay where they are until pop(): no host sync per micro-batch
            value = value.detach() if isinstance(value, torch.Tensor) else float(value)
            self._values[mode][key].append(value)
        # TRL resets num_tokens to the running total in every _compute_loss, eval included
        self._values[mode]["num_tokens"] = [float(self.total_train_tokens)]

    def add_tokens(self, mode: str, n: int) -> None:
        """Count n attention-mask tokens of a micro-batch; TRL counts training batches only."""
        self._check(mode)
        if mode == "train":
            self.total_train_tokens += int(n)
        self._values[mode]["num_tokens"] = [float(self.total_train_tokens)]

    def pop(self, mode: str) -> dict[str, float]:
        """Window means (num_tokens: cumulative), "eval_"-prefixed in eval; clears the window."""
        self._check(mode)
        values = self._values[mode]
        tensors = [x for v in values.values() for x in v if isinstance(x, torch.Tensor)]
        if tensors:  # one device-to-host copy for the whole window
            host = iter(torch.stack([t.to(torch.float64) for t in tensors]).cpu().tolist())
            for v in values.values():
                v[:] = [next(host) if isinstance(x, torch.Tensor) else x for x in v]
        # a language absent from a micro-batch is NaN there (csd_fast.trainer): not a zero
        for key, v in values.items():
            if is_language_metric(key):
                v[:] = [x for x in v if x == x]
        out = {key: sum(v) / len(v) for key, v in values.items() if v}
        values.clear()
        if mode == "eval":
            out = {f"eval_{key}": v for key, v in out.items()}
        return out


def throughput(num_tokens: int, num_pairs: int, seconds: float) -> dict[str, float]:
    """tokens/s and pairs/s over a timed span (0.0 for a zero-length span)."""
    if seconds <= 0:
        return {"tokens_per_second": 0.0, "pairs_per_second": 0.0}
    return {"tokens_per_second": num_tokens / seconds, "pairs_per_second": num_pairs / seconds}
