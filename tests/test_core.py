"""rlhf.core math against values computed by hand."""

import math

import pytest
import torch

from rlhf.core import entropy_from_logits, masked_mean, masked_sum, pairwise_accuracy, position_ids, token_logprobs, truncate_after_eos


def test_token_logprobs_matches_hand_computed_softmax():
    # Two-token vocabulary with logits [0, ln 3]: p = [1/4, 3/4].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    out = token_logprobs(logits, labels)
    assert torch.allclose(out, torch.tensor([[math.log(0.75), math.log(0.25)]]))
    # Temperature 2 halves the logits: p1 = √3 / (1 + √3).
    out_t = token_logprobs(logits, labels, temperature=2.0)
    p1 = math.sqrt(3) / (1 + math.sqrt(3))
    assert torch.allclose(out_t, torch.tensor([[math.log(p1), math.log(1 - p1)]]))


def test_token_logprobs_agrees_with_log_softmax_and_keeps_inputs():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.randint(0, 11, (3, 5))
    before = logits.clone()
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels, 0.7), expected, atol=1e-6)
    assert torch.equal(logits, before)
    with pytest.raises(ValueError):
        token_logprobs(logits, labels, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_blockwise_logprobs_entropy_and_gradient_match_log_softmax(monkeypatch, dtype, tau):
    import rlhf.core.logprobs as lp

    monkeypatch.setattr(lp, "BLOCK_BYTES", {"cpu": 4 * 13 * 3})  # 3 rows per block: 15 rows in 5 blocks
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 13)).to(dtype).requires_grad_()
    labels = torch.randint(0, 13, (3, 5))
    weights = torch.randn(3, 5)
    logp, ent = lp.token_logprobs_and_entropy(logits, labels, tau)
    (logp * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref_logsm = torch.log_softmax(ref_logits.float() / tau, -1)
    ref = ref_logsm.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, entropy_from_logits(logits.detach().float() / tau), atol=1e-5, rtol=1e-5)
    assert not ent.requires_grad and logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)


def test_blockwise_logprobs_pass_gradcheck(monkeypatch):
    import rlhf.core.logprobs as lp

    monkeypatch.setattr(lp, "BLOCK_BYTES", {"cpu": 4 * 7 * 2})  # 2 rows per block
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda x: lp.token_logprobs_and_entropy(x, labels, 0.7, with_entropy=False)[0], (logits,))
    assert torch.autograd.gradcheck(lambda x: lp.token_logprobs_and_entropy(x, labels, 1.0)[0], (logits,))


def test_masked_sum_and_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert torch.equal(masked_sum(v, m), torch.tensor([3.0, 6.0]))
    assert torch.equal(masked_mean(v, m, dim=-1), torch.tensor([1.5, 6.0]))
    assert masked_mean(v, m).item() == pytest.approx((1 + 2 + 6) / 3)


def test_position_ids_start_at_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]


def test_truncate_after_first_eos():
    eos, pad = 2, 0
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    out, mask, finished = truncate_after_eos(ids, eos, pad)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True]
    assert ids.tolist()[0] == [5, 2, 7, 2]  # input untouched


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ValueError):
        pairwise_accuracy(torch.tensor([]))


# ---- reward-model losses (values worked out by hand in the comments)

from rlhf.core import bt_loss, grm_loss, grm_regularizer, preference_ece  # noqa: E402

LN2 = math.log(2.0)


def test_bt_loss_hand_values():
    # z = 0 → −log σ(0) = ln 2; z = ln 3 → −log(3/4).
    assert bt_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 - math.log(3)])).item() == pytest.approx(
        (LN2 - math.log(0.75)) / 2
    )
    # A margin of ln 3 turns z = ln 3 into 0.
    assert bt_loss(torch.tensor([math.log(3)]), torch.tensor([0.0]), margin=torch.tensor([math.log(3)])).item() == pytest.approx(LN2)
    # Centering adds η·mean((r_c + r_r)²) = 0.5 · ((1+1)² + (0+2)²)/2 = 0.5 · 4 = 2.
    r_c, r_r = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0])
    base = bt_loss(r_c, r_r).item()
    assert bt_loss(r_c, r_r, center_coef=0.5).item() == pytest.approx(base + 2.0)
    # Large margins stay finite (softplus form).
    assert bt_loss(torch.tensor([0.0]), torch.tensor([200.0])).item() == pytest.approx(200.0)


def test_grm_regularizers_hand_values():
    lc, lr = torch.tensor([-10.0]), torch.tensor([-20.0])
    rc, rr = torch.tensor([-12.0]), torch.tensor([-15.0])
    beta = 0.1
    # sft: −log σ(0.1 · −10) = softplus(1) = ln(1 + e).
    assert grm_regularizer("sft", lc, beta=beta).item() == pytest.approx(math.log(1 + math.e))
    # dpo_noref: z = 0.1 · (−10 + 20) = 1 → ln(1 + e^−1).
    assert grm_regularizer("dpo_noref", lc, lr, beta=beta).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # dpo: z = 0.1 · (10 − 3) = 0.7 → ln(1 + e^−0.7).
    assert grm_regularizer("dpo", lc, lr, rc, rr, beta=beta).item() == pytest.approx(math.log(1 + math.exp(-0.7)))
    with pytest.raises(ValueError, match="needs ref_logp_chosen"):
        grm_regularizer("dpo", lc, lr)
    with pytest.raises(ValueError, match="unknown GRM regularizer"):
        grm_regularizer("kl", lc)  # type: ignore[arg-type]


def test_grm_loss_mixes_with_alpha():
    assert grm_loss(torch.tensor(2.0), torch.tensor(10.0), alpha=0.01).item() == pytest.approx(0.99 * 2 + 0.01 * 10)
    assert grm_loss(torch.tensor(2.0), torch.tensor(10.0), alpha=0.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError):
        grm_loss(torch.tensor(1.0), torch.tensor(1.0), alpha=1.5)


def test_bt_loss_gradient_points_the_right_way():
    r_c = torch.tensor([0.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    bt_loss(r_c, r_r).backward()
    # d/dz softplus(−z) at 0 = −½: raising r_c lowers the loss, raising r_r raises it.
    assert r_c.grad.item() == pytest.approx(-0.5) and r_r.grad.item() == pytest.approx(0.5)


def _neg_log_sigmoid(z: float) -> float:
    """−log σ(z) = max(−z, 0) + log1p(e^{−|z|}), in Python floats (exact to rounding for every z)."""
    return max(-z, 0.0) + math.log1p(math.exp(-abs(z)))


# z = ±25 are the cases that tell: softplus(−z) returns −z past its threshold (−z > 20) and drops
# log1p(e^z) ≈ 1.4e-11 at z = −25, 5.6e-13 relative, far above float64's rounding.
LARGE_Z = [40.0, 25.0, 5.0, -5.0, -25.0, -40.0]


@pytest.mark.parametrize("z", LARGE_Z)
def test_bt_loss_is_exact_in_float64_for_large_margins(z):
    f64 = dict(dtype=torch.float64)
    exact = _neg_log_sigmoid(z)
    # z as the reward difference, and as a margin m (z = 0 − 0 − m).
    assert bt_loss(torch.tensor([z], **f64), torch.tensor([0.0], **f64)).item() == pytest.approx(exact, rel=1e-15, abs=0)
    assert bt_loss(torch.zeros(1, **f64), torch.zeros(1, **f64), margin=torch.tensor([-z], **f64)).item() == pytest.approx(exact, rel=1e-15, abs=0)


@pytest.mark.parametrize("z", LARGE_Z)
def test_grm_regularizers_are_exact_in_float64_for_large_arguments(z):
    f64 = dict(dtype=torch.float64)
    beta = 0.5
    lc = torch.tensor([z / beta], **f64)  # sft: β · log π(y_c|x) = z
    zero = torch.zeros(1, **f64)
    exact = _neg_log_sigmoid(z)
    assert grm_regularizer("sft", lc, beta=beta).item() == pytest.approx(exact, rel=1e-15, abs=0)
    assert grm_regularizer("dpo_noref", lc, zero, beta=beta).item() == pytest.approx(exact, rel=1e-15, abs=0)
    assert grm_regularizer("dpo", lc, zero, zero, zero, beta=beta).item() == pytest.approx(exact, rel=1e-15, abs=0)


def test_preference_ece_hand_values():
    # Margin ln 3 → p = 3/4, confidence 3/4, correct. Margin −ln 3 → p = 1/4, confidence 3/4, wrong.
    # One bin holds both: |accuracy ½ − confidence ¾| = ¼.
    m = torch.tensor([math.log(3), -math.log(3)])
    assert preference_ece(m).item() == pytest.approx(0.25)
    # Two correct pairs at confidence 3/4: |1 − ¾| = ¼.
    assert preference_ece(torch.tensor([math.log(3), math.log(3)])).item() == pytest.approx(0.25)
    # Perfectly calibrated in two bins: conf ¾ with 3 of 4 right, conf ½ (ties, half right each).
    m = torch.tensor([math.log(3)] * 3 + [-math.log(3)] + [0.0] * 4)
    assert preference_ece(m).item() == pytest.approx(0.0, abs=1e-6)


def test_last_token_index_any_padding():
    from rlhf.core import last_token_index

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [4, 2, 2, 0]


def test_log_prob_blocks_are_cpu_sized_on_the_cpu_only():
    """8 MiB float32 blocks on the CPU (heap reuse, cache); 256 MiB ones on a GPU."""
    import rlhf.core.logprobs as lp

    V = 49152
    assert lp._block_rows(V, torch.device("cpu")) == 8 * 2**20 // (4 * V)
    assert lp._block_rows(V, torch.device("cuda")) == 256 * 2**20 // (4 * V)
