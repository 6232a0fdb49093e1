"""Reward-model losses: Bradley-Terry (hard or soft labels) and the GRM text-generation regularizers. Pure torch.

Every function takes per-pair tensors of shape (B,) and returns a scalar mean over the batch
(unless noted), and never mutates its inputs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GRMRegularizer = Literal["sft", "dpo", "dpo_noref"]


def bt_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood with optional margin, soft labels and reward centering.

        z_i = r_c,i − r_r,i − m_i
        L   = mean_i [ −p_i log σ(z_i) − (1 − p_i) log σ(−z_i) ] + η · mean_i [ (r_c,i + r_r,i)² ]

    r_chosen, r_rejected: (B,) rewards r(x, y_c), r(x, y_r); margin: (B,) m_i or None (0);
    label: (B,) p_i = P(y_c ≻ y_r) ∈ [0, 1] or None (1 for every pair: the hard BT loss);
    center_coef: η.

    With p_i = 1 the second term is 0 and L is the hard BT loss exactly, bit for bit. A soft
    label makes L the cross-entropy against the preference probability p_i, which is how Lee et
    al. 2023 ("RLAIF: Scaling Reinforcement Learning from Human Feedback with AI Feedback",
    section 2.2) train a reward model on an AI labeller's P(chosen ≻ rejected); its gradient
    ∂L/∂z_i = (σ(z_i) − p_i)/B vanishes at z_i = logit(p_i), so the margin stops growing where
    it matches the label instead of growing forever. The margin form is Llama 2's (Touvron et al.
    2023, eq. 2); the centering term keeps rewards near zero so the BT loss's shift invariance
    can't let them drift (Eisenstein et al. 2023, "Helping or Herding?", section 3). −log σ(z) is
    computed as −logsigmoid(z) = max(−z, 0) + log1p(e^{−|z|}), which is exact to rounding for
    every z in float32 and float64 (softplus(−z) is not: past its threshold, −z > 20, it returns
    −z and drops log1p(e^{z})).
    """
    z = r_chosen - r_rejected
    if margin is not None:
        z = z - margin
    nll = -F.logsigmoid(z)  # (B,) −log σ(z)
    if label is not None:
        # −p log σ(z) − (1 − p) log σ(−z); at p = 1 this is nll + 0 exactly.
        nll = label * nll - (1 - label) * F.logsigmoid(-z)
    loss = nll.mean()
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).pow(2).mean()
    return loss


def grm_regularizer(
    kind: GRMRegularizer,
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor | None = None,
    ref_logp_chosen: torch.Tensor | None = None,
    ref_logp_rejected: torch.Tensor | None = None,
    beta: float = 0.1,
) -> torch.Tensor:
    """GRM's text-generation regularizer on the reward model's shared hidden states
    (Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model
    for LLMs", section 3.2). log π(y|x) are summed log-probs of response tokens only, (B,).

        sft:        −log σ(β · log π(y_c|x))
        dpo:        −log σ(β · [(log π(y_c|x) − log π(y_r|x)) − (log π_ref(y_c|x) − log π_ref(y_r|x))])
        dpo_noref:  −log σ(β · (log π(y_c|x) − log π(y_r|x)))

    Returns the batch mean. −log σ(z) is computed as −logsigmoid(z), exact for every z (see
    `bt_loss`).
    """
    if kind == "sft":
        z = beta * logp_chosen
    elif kind == "dpo_noref":
        _require(kind, logp_rejected=logp_rejected)
        z = beta * (logp_chosen - logp_rejected)
    elif kind == "dpo":
        _require(kind, logp_rejected=logp_rejected, ref_logp_chosen=ref_logp_chosen, ref_logp_rejected=ref_logp_rejected)
        z = beta * ((logp_chosen - logp_rejected) - (ref_logp_chosen - ref_logp_rejected))
    else:
        raise ValueError(f"unknown GRM regularizer {kind!r}; expected 'sft', 'dpo' or 'dpo_noref'")
    return -F.logsigmoid(z).mean()


def grm_loss(bt: torch.Tensor, regularizer: torch.Tensor, alpha: float = 0.01) -> torch.Tensor:
    """GRM's total loss (Yang et al. 2024, section 3.2): L = (1 − α) · L_BT + α · L_reg. α = 0.01 is the
    paper's default."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * bt + alpha * regularizer


def _require(kind: str, **tensors: torch.Tensor | None) -> None:
    missing = [name for name, t in tensors.items() if t is None]
    if missing:
        raise ValueError(f"GRM regularizer {kind!r} needs {', '.join(missing)}")
