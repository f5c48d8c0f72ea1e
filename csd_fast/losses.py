"""Preference losses, pure torch: every TRL 1.16 `loss_type` plus Cross-Lingual Optimization "clo".

The losses only see per-pair summed completion log-probs (`PairLogps`), so they are the same for
every layout (padded, packed, prefix-shared) and for cached reference log-probs. Run the tests with
`python -m pytest tests/test_losses.py -q`.

Notation (TRL's): for pair i, ρ_c = chosen_logps - ref_chosen_logps, ρ_r = rejected_logps -
ref_rejected_logps (log πθ - log πref summed over completion tokens); |c|, |r| the completion token
counts; s_c, s_r the f-divergence scores of ρ_c, ρ_r (= ρ_c, ρ_r for reverse_kl, see `_scores`);
Δ = s_c - s_r; β = beta; ε = label_smoothing; σ the logistic function.

Micro-batch and gradient-accumulation rule: `preference_loss` of one micro-batch is
Σ_k w_k · mean_over_its_pairs(loss_k), exactly TRL's value for that micro-batch. When micro-batches
hold different numbers of pairs (packing), the trainer weights each micro-batch loss by its pair
count, total = Σ_m P_m · loss_m / Σ_m P_m, so an optimizer step sees the mean over all its pairs.
With TRL's fixed per-device batch size all P_m are equal and this is TRL's uniform 1/GA average.
The token-mean terms ("sft", the NLL of "clo") are token means *within* a micro-batch, as in TRL.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "clo",
)
F_DIVERGENCE_TYPES: tuple[str, ...] = (
    "reverse_kl",
    "forward_kl",
    "js_divergence",
    "alpha_divergence",
)
# The f-DPO reparameterisation leaves a β·log Z(x) term that cancels only in s_c - s_r, so only
# losses built on Δ accept another divergence (TRL's set, plus "clo", whose contrast is DPO's).
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "clo"}
)
# Sorting losses pair the i-th smallest chosen with the i-th smallest rejected ratio, so a per-pair
# WPO weight would land on the wrong term (TRL refuses the combination too).
_SORTING_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
_PAIR_FIELDS = (
    "rejected_logps",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
)


@dataclass(frozen=True)
class LossParams:
    """The DPOConfig fields the losses read (TRL names and defaults), plus CLO's λ `clo_lambda`."""

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None  # None -> all 1.0
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    clo_lambda: float = 0.5

    def __post_init__(self) -> None:
        # frozen: normalise via object.__setattr__ (a str or a list is accepted, as in DPOConfig)
        lt = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", lt)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if not lt:
            raise ValueError("loss_type must name at least one loss")
        unknown = [t for t in lt if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"Unknown loss type(s) {unknown}; expected one of {list(LOSS_TYPES)}")
        if len(set(lt)) != len(lt):
            raise ValueError(f"loss_type lists a loss twice: {list(lt)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(lt):
            raise ValueError(
                "`loss_weights` must have the same length as `loss_type`: got "
                f"{len(self.loss_weights)} weights for {len(lt)} loss types {list(lt)}"
            )
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"Unknown f_divergence_type {self.f_divergence_type!r}; "
                f"expected one of {list(F_DIVERGENCE_TYPES)}"
            )
        if self.f_divergence_type != "reverse_kl" and not set(lt) <= F_DIVERGENCE_LOSS_TYPES:
            raise ValueError(
                f"f_divergence_type={self.f_divergence_type!r} is only supported for loss types "
                f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {list(lt)}"
            )
        if "exo_pair" in lt and self.label_smoothing == 0.0:
            raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
        if "robust" in lt and not 0.0 <= self.label_smoothing < 0.5:
            # TRL only warns here; at exactly 0.5 the loss divides by zero
            warnings.warn(
                f"label_smoothing should lie in [0.0, 0.5) for the 'robust' loss, got "
                f"{self.label_smoothing}",
                stacklevel=3,
            )
        if not 0.0 <= self.clo_lambda <= 1.0:
            raise ValueError(f"clo_lambda must lie in [0, 1], got {self.clo_lambda}")
        if self.discopop_tau <= 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_type)


@dataclass
class PairLogps:
    """Per-pair inputs of the losses, all (P,) and on one device."""

    chosen_logps: Tensor  # (P,) summed completion log-probs of the policy
    rejected_logps: Tensor  # (P,)
    ref_chosen_logps: Tensor  # (P,)
    ref_rejected_logps: Tensor  # (P,)
    chosen_lengths: Tensor  # (P,) scored completion tokens (the NLL's and WPO's counts)
    rejected_lengths: Tensor  # (P,)
    sft_mask: Tensor | None = None  # (P,) bool: pairs whose chosen feeds sft/NLL (None: all)
    group_ids: Tensor | None = None  # (P,) CLO example of each pair
    weights: Tensor | None = None  # (P,) WPO weights (use_weighting), already detached
    # (P,) unweighted chosen sums when chosen_logps carry LD-DPO weights (ld_alpha): the NLL
    # terms (sft, clo) are plain token means in TRL, whatever the length weighting
    nll_chosen_logps: Tensor | None = None
    # (2P,) chosen then rejected |c| of ipo and sigmoid_norm when it differs from the scored
    # count: TRL counts a completion's unscored first token there (`PairBatch.unscored_first`)
    norm_lengths: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.chosen_logps.numel())


def rewards(params: LossParams, logps: PairLogps) -> tuple[Tensor, Tensor]:
    """Implicit rewards β·ρ_c and β·ρ_r, detached (TRL logs these, not the f-divergence scores)."""
    chosen = params.beta * (logps.chosen_logps - logps.ref_chosen_logps).detach()
    rejected = params.beta * (logps.rejected_logps - logps.ref_rejected_logps).detach()
    return chosen, rejected


def _scores(params: LossParams, logratios: Tensor) -> Tensor:
    """f'(t) of the f-divergence at t = π/πref = exp(ρ) (f-DPO, Wang et al. 2023, arXiv 2309.16240).

    reverse_kl: ρ.  forward_kl: 1 - exp(-ρ).  js_divergence: log 2 + log σ(ρ).
    alpha_divergence (α = f_alpha_divergence_coef): (exp((α-1)ρ) - 1)/(α-1), with the exponent
    clamped at 11 (fp16) or 80 (other dtypes) so exp stays finite, and α == 1 (within 1e-6) falling
    back to ρ (the limit). TRL evaluates exp in fp32 for every dtype; fp64 inputs stay fp64 here so
    gradcheck is meaningful, and fp16/bf16/fp32 inputs follow TRL exactly.
    """
    kind = params.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    alpha = params.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    t = (alpha - 1.0) * logratios
    clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
    t_up = t.to(torch.promote_types(t.dtype, torch.float32)).clamp(max=clamp_max)
    return (torch.exp(t_up) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))


def _sft_nll(logps: PairLogps) -> Tensor:
    """Token-mean NLL of the chosen completions selected by sft_mask: -Σ logp / Σ |c| (scalar).

    Summed log-probs over summed lengths is TRL's mean over all chosen tokens of the micro-batch.
    The denominator is clamped to 1 so a micro-batch without such tokens gives 0 (TRL: NaN).
    """
    chosen = logps.chosen_logps if logps.nll_chosen_logps is None else logps.nll_chosen_logps
    lengths = logps.chosen_lengths
    if logps.sft_mask is not None:
        mask = logps.sft_mask.to(torch.bool)
        chosen, lengths = chosen[mask], lengths[mask]
    return -chosen.sum() / lengths.sum().clamp(min=1).to(chosen.dtype)


def _sigmoid_pair(beta_delta: Tensor, eps: float) -> Tensor:
    """-(1-ε) log σ(x) - ε log σ(-x): conservative DPO / the "aot" family's smoothed logistic."""
    return -(1 - eps) * F.logsigmoid(beta_delta) - eps * F.logsigmoid(-beta_delta)


def _clo(params: LossParams, logps: PairLogps, beta_delta: Tensor) -> Tensor:
    """Per-pair CLO loss whose mean over pairs is the paper's loss averaged over examples.

    Paper (Lee et al., "Cross-Lingual Optimization for Language Transfer in LLMs"), per example g
    with an English pair (x_en: chosen y_en, rejected y_t) and a target pair (x_t: chosen y_t,
    rejected y_en):  L_g = λ·L_SFT + (1-λ)·L_CL,g,  L_CL,g = -log σ(z_en) - log σ(z_t),
    z = β·(ρ of the same-language response - ρ of the other one) = βΔ of that pair.

    Per-pair form used here, with P pairs in G examples (G = distinct group_ids; each pair is its
    own example when group_ids is None):
        clo_i = λ·L_SFT + (1-λ)·(P/G)·(-log σ(βΔ_i))
    so  mean_i clo_i = λ·L_SFT + (1-λ)·(1/G)·Σ_g Σ_{i∈g} -log σ(βΔ_i)
                     = λ·L_SFT + (1-λ)·mean_g L_CL,g
    for any grouping (with complete examples P/G = 2). L_SFT is the token-mean NLL of the chosen
    responses with sft_mask True (the target-language pairs; never y_en), computed over the whole
    micro-batch like "sft", so its pair mean is itself.
    """
    P = beta_delta.numel()
    if logps.group_ids is None:
        scale = 1.0
    else:  # G counted on the device: int(torch.unique(...).numel()) would sync every micro-batch
        from csd_fast.kernels.pair_loss import count_distinct

        num_groups = count_distinct(logps.group_ids).to(beta_delta.dtype)
        scale = P / num_groups.clamp(min=1)
    contrastive = -F.logsigmoid(beta_delta) * scale
    lam = params.clo_lambda
    if lam == 0.0:  # skip the NLL so a batch without target pairs needs no sft_mask
        return (1 - lam) * contrastive
    return lam * _sft_nll(logps) + (1 - lam) * contrastive


def per_pair_losses(params: LossParams, logps: PairLogps) -> dict[str, Tensor]:
    """loss_type -> (P,) per-pair loss (WPO-weighted when `logps.weights` is set).

    The formulas (ρ, Δ, s, β, ε as in the module docstring; ρ̄ = ρ/max(|c|,1) length-normalised):

    * sigmoid (DPO, Rafailov et al. 2023, arXiv 2305.18290): -log σ(βΔ)
    * hinge (SLiC, Zhao et al. 2023, arXiv 2305.10425): relu(1 - βΔ)
    * ipo (Azar et al. 2023, arXiv 2310.12036, eq. 17): (s_c/|c| - s_r/|r| - 1/(2β))²,
      lengths clamped at 1 (TRL's length normalisation, confirmed with the IPO authors)
    * exo_pair (Ji et al. 2024, arXiv 2402.00856, eq. 16):
      σ(βΔ)(log σ(βΔ) - log(1-ε)) + σ(-βΔ)(log σ(-βΔ) - log ε), needs ε > 0
    * nca_pair (Chen et al. 2024, arXiv 2402.05369): -log σ(βρ_c) - ½ log σ(-βρ_c) - ½ log σ(-βρ_r)
    * robust (Chowdhury et al. 2024, arXiv 2403.00409):
      (-(1-ε) log σ(βΔ) + ε log σ(-βΔ)) / (1 - 2ε)
    * bco_pair (Jung et al. 2024, arXiv 2404.04656, paired, no running δ):
      -log σ(βρ_c) - log σ(-βρ_r)
    * sppo_hard (Wu et al. 2024, arXiv 2405.00675, hard labels): (ρ_c - 1/(2β))² + (ρ_r + 1/(2β))²
    * aot (D'Oosterlinck et al. 2024, arXiv 2406.05882): d = sort(π_c - π_r) - sort(πref_c - πref_r)
      over the micro-batch (π the summed logps), loss -(1-ε) log σ(βd) - ε log σ(-βd)
    * aot_unpaired: d = sort(ρ_c) - sort(ρ_r), same smoothed logistic.
      For both aot losses entry i belongs to the i-th sorted position, not to pair i.
    * apo_zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, eq. 7): 1 - σ(βρ_c) + σ(βρ_r)
    * apo_down (eq. 8): σ(βρ_c) + 1 - σ(β(ρ_c - ρ_r))
    * discopop (Chris Lu et al. 2024, arXiv 2406.08414, eq. 5), x = βΔ, m = σ(x/τ):
      (1 - m)·(-log σ(x)) + m·exp(-x)
    * sft: token-mean NLL of all chosen completions of the micro-batch, -Σ π_c / Σ|c| (pairs
      restricted by sft_mask), the same scalar for every pair. Assumes un-weighted token sums.
    * sigmoid_norm: -log σ(β(s_c/|c| - s_r/|r|)), lengths clamped at 1
    * clo: see `_clo`.

    WPO (Zhou et al. 2024, arXiv 2406.11827, eq. 2; TRL's use_weighting): every per-pair loss,
    "sft" included, is multiplied by `logps.weights` (the product of the chosen and rejected
    weights, computed and detached by the caller); refused for the sorting "aot" losses.
    """
    P = logps.num_pairs
    for name in _PAIR_FIELDS:
        if getattr(logps, name).shape != (P,):
            raise ValueError(
                f"{name} must have shape ({P},), got {tuple(getattr(logps, name).shape)}"
            )
    if logps.weights is not None and _SORTING_LOSS_TYPES & set(params.loss_type):
        raise ValueError(
            "WPO weights are not supported with the sorting losses 'aot'/'aot_unpaired'"
        )

    beta, eps = params.beta, params.label_smoothing
    rho_c = logps.chosen_logps - logps.ref_chosen_logps
    rho_r = logps.rejected_logps - logps.ref_rejected_logps
    s_c, s_r = _scores(params, rho_c), _scores(params, rho_r)
    x = beta * (s_c - s_r)  # βΔ
    dtype = logps.chosen_logps.dtype
    len_c, len_r = logps.chosen_lengths, logps.rejected_lengths
    if logps.norm_lengths is not None:
        len_c, len_r = logps.norm_lengths[:P], logps.norm_lengths[P:]
    len_c, len_r = len_c.to(dtype).clamp(min=1), len_r.to(dtype).clamp(min=1)

    out: dict[str, Tensor] = {}
    for loss_type in params.loss_type:
        if loss_type == "sigmoid":
            loss = -F.logsigmoid(x)
        elif loss_type == "hinge":
            loss = torch.relu(1 - x)
        elif loss_type == "ipo":
            loss = (s_c / len_c - s_r / len_r - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            loss = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
                F.logsigmoid(-x) - math.log(eps)
            )
        elif loss_type == "nca_pair":
            loss = (
                -F.logsigmoid(beta * rho_c)
                - 0.5 * F.logsigmoid(-beta * rho_c)
                - 0.5 * F.logsigmoid(-beta * rho_r)
            )
        elif loss_type == "robust":
            loss = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            loss = -F.logsigmoid(beta * rho_c) - F.logsigmoid(-beta * rho_r)
        elif loss_type == "sppo_hard":
            loss = (rho_c - 0.5 / beta) ** 2 + (rho_r + 0.5 / beta) ** 2
        elif loss_type == "aot":
            policy = torch.sort(logps.chosen_logps - logps.rejected_logps, dim=0).values
            ref = torch.sort(logps.ref_chosen_logps - logps.ref_rejected_logps, dim=0).values
            loss = _sigmoid_pair(beta * (policy - ref), eps)
        elif loss_type == "aot_unpaired":
            d = torch.sort(rho_c, dim=0).values - torch.sort(rho_r, dim=0).values
            loss = _sigmoid_pair(beta * d, eps)
        elif loss_type == "apo_zero":
            loss = 1 - torch.sigmoid(beta * rho_c) + torch.sigmoid(beta * rho_r)
        elif loss_type == "apo_down":
            loss = torch.sigmoid(beta * rho_c) + 1 - torch.sigmoid(beta * (rho_c - rho_r))
        elif loss_type == "discopop":
            m = torch.sigmoid(x / params.discopop_tau)
            loss = -F.logsigmoid(x) * (1 - m) + torch.exp(-x) * m
        elif loss_type == "sft":
            loss = _sft_nll(logps).expand(P)
        elif loss_type == "sigmoid_norm":
            loss = -F.logsigmoid(beta * (s_c / len_c - s_r / len_r))
        elif loss_type == "clo":
            loss = _clo(params, logps, x)
        else:  # unreachable: LossParams validates the names
            raise ValueError(f"Unknown loss type {loss_type!r}")
        if logps.weights is not None:
            loss = loss * logps.weights.to(loss.dtype)
        out[loss_type] = loss
    return out


def preference_loss(params: LossParams, logps: PairLogps) -> Tensor:
    """Σ_k w_k · mean_over_pairs(loss_k), TRL's scalar loss of a micro-batch (module docstring)."""
    per_pair = per_pair_losses(params, logps)
    total = None
    for loss_type, weight in zip(params.loss_type, params.weights, strict=True):
        term = per_pair[loss_type].mean() * weight
        total = term if total is None else total + term
    return total
