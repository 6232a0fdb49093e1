"""Soft-label Bradley-Terry (`bt_loss(..., label=p)`): hand-computed values in float64, the hard
loss at p = 1 bit for bit, the gradient σ(z) − p that vanishes at z = logit(p), and train-rm's
use of a pair's `label`."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.core import bt_loss
from rlhf.data import PreferencePair

F64 = dict(dtype=torch.float64)


def _nls(z: float) -> float:
    """−log σ(z), exact to rounding in Python floats."""
    return max(-z, 0.0) + math.log1p(math.exp(-abs(z)))


def test_soft_bt_hand_values():
    # z = ln 3: σ(z) = 3/4, σ(−z) = 1/4. p = 1/4: L = −¼ log ¾ − ¾ log ¼.
    z = math.log(3.0)
    loss = bt_loss(torch.tensor([z], **F64), torch.zeros(1, **F64), label=torch.tensor([0.25], **F64))
    assert loss.item() == pytest.approx(-0.25 * math.log(0.75) - 0.75 * math.log(0.25), rel=1e-15)
    # Two pairs, mean: z = 0 at p = 0.9 gives ln 2 whatever p; z = −ln 3 (r_r − r_c = ln 3) at p = 0.6.
    r_c = torch.tensor([1.0, 0.0], **F64)
    r_r = torch.tensor([1.0, math.log(3.0)], **F64)
    p = torch.tensor([0.9, 0.6], **F64)
    second = -0.6 * math.log(0.25) - 0.4 * math.log(0.75)
    assert bt_loss(r_c, r_r, label=p).item() == pytest.approx((math.log(2.0) + second) / 2, rel=1e-15)
    # With a margin m = ln 3 the first case's z = ln 3 becomes 0: ln 2 for any p.
    assert bt_loss(torch.tensor([z], **F64), torch.zeros(1, **F64), margin=torch.tensor([z], **F64),
                   label=torch.tensor([0.25], **F64)).item() == pytest.approx(math.log(2.0), rel=1e-15)
    # Centering adds η·mean((r_c + r_r)²) on top, unchanged by the label: 0.5 · (4 + ln²3)/2.
    centred = bt_loss(r_c, r_r, center_coef=0.5, label=p).item() - bt_loss(r_c, r_r, label=p).item()
    assert centred == pytest.approx(0.5 * (4.0 + math.log(3.0) ** 2) / 2, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_bt_at_p_one_is_the_hard_loss_bit_for_bit(dtype):
    torch.manual_seed(0)
    r_c = torch.cat([torch.randn(64, dtype=dtype) * 5, torch.tensor([40.0, 25.0, -25.0, -40.0], dtype=dtype)])
    r_r = torch.randn(68, dtype=dtype)
    m = torch.randn(68, dtype=dtype)
    ones = torch.ones(68, dtype=dtype)
    assert torch.equal(bt_loss(r_c, r_r, label=ones), bt_loss(r_c, r_r))
    assert torch.equal(bt_loss(r_c, r_r, m, 0.1, ones), bt_loss(r_c, r_r, m, 0.1))
    # p = 0 is the hard loss with the sides swapped.
    assert bt_loss(r_c, r_r, label=torch.zeros_like(ones)).item() == pytest.approx(bt_loss(r_r, r_c).item(), rel=1e-6)


@pytest.mark.parametrize("z", [40.0, 25.0, -25.0, -40.0])
def test_soft_bt_is_exact_in_float64_for_large_margins(z):
    # p = ½ at |z| = 40: L = ½(−log σ(z) − log σ(−z)); log1p(e^{−40}) ≈ 4e-18 is kept where a
    # softplus past its threshold would drop it.
    loss = bt_loss(torch.tensor([z], **F64), torch.zeros(1, **F64), label=torch.tensor([0.5], **F64))
    assert loss.item() == pytest.approx(0.5 * (_nls(z) + _nls(-z)), rel=1e-15, abs=0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.8, 0.999])
def test_soft_bt_gradient_is_sigmoid_minus_p_and_vanishes_at_logit_p(p):
    # ∂L/∂z = σ(z) − p (one pair): zero at z = logit(p), so the margin stops where it matches p.
    r_c = torch.tensor([math.log(p / (1 - p))], requires_grad=True, **F64)
    r_r = torch.zeros(1, requires_grad=True, **F64)
    bt_loss(r_c, r_r, label=torch.tensor([p], **F64)).backward()
    assert abs(r_c.grad.item()) < 1e-15 and abs(r_r.grad.item()) < 1e-15
    # Away from it the gradient is σ(z) − p on r_c and its negative on r_r, averaged over the batch.
    z = torch.tensor([0.0, 2.0], requires_grad=True, **F64)
    labels = torch.tensor([p, p], **F64)
    bt_loss(z, torch.zeros(2, **F64), label=labels).backward()
    expected = (torch.sigmoid(z.detach()) - labels) / 2
    assert torch.allclose(z.grad, expected, rtol=1e-14, atol=1e-16)


def test_soft_bt_keeps_its_inputs():
    r_c, r_r = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    m, p = torch.tensor([0.1, 0.2]), torch.tensor([0.7, 0.2])
    before = [t.clone() for t in (r_c, r_r, m, p)]
    bt_loss(r_c, r_r, m, 0.3, p)
    assert all(torch.equal(a, b) for a, b in zip((r_c, r_r, m, p), before))


class _FixedRewards:
    """A stand-in reward model for `pair_losses`: the reward of a completion is the number in it."""

    def encode(self, prompts, completions):
        return torch.tensor([float(c) for c in completions], **F64)

    def hidden_states(self, enc):
        return enc

    def rewards_from_hidden(self, hidden, enc):
        return hidden


def test_train_rm_uses_a_pairs_soft_label_and_the_hard_label_otherwise():
    from rlhf.train_rm import TrainRMConfig, pair_losses

    cfg = TrainRMConfig()
    batch = [PreferencePair("q", "2.0", "0.5", label=0.25), PreferencePair("q", "1.0", "3.0")]
    r_c, r_r = torch.tensor([2.0, 1.0], **F64), torch.tensor([0.5, 3.0], **F64)
    out = pair_losses(_FixedRewards(), batch, cfg)  # type: ignore[arg-type]
    z = [1.5, -2.0]
    expected = (0.25 * _nls(z[0]) + 0.75 * _nls(-z[0]) + _nls(z[1])) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["loss"].item() != pytest.approx(bt_loss(r_c, r_r).item(), rel=1e-3)  # the label changed it
    # Without labels the batch gets the hard loss.
    hard = [PreferencePair("q", "2.0", "0.5"), PreferencePair("q", "1.0", "3.0")]
    assert pair_losses(_FixedRewards(), hard, cfg)["loss"].item() == pytest.approx(bt_loss(r_c, r_r).item(), rel=1e-12)  # type: ignore[arg-type]
