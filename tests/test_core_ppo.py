"""rlhf.core.ppo against values worked out by hand (rlax style) and loop vs vectorised GAE
(torchrl style)."""

import math

import pytest
import torch

from rlhf.core.ppo import (
    AdaptiveKLController,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    gae_loop,
    kl_penalty,
    masked_var,
    per_token_rewards,
    ppo_policy_loss,
    whiten,
)


def test_kl_estimators_hand_values():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    r = torch.tensor([[math.log(2.0), math.log(0.5)]])  # log π − log π_ref
    assert torch.allclose(kl_penalty(logp, ref, "k1"), r)
    assert torch.allclose(kl_penalty(logp, ref, "k2"), 0.5 * r**2)
    # k3 = π_ref/π − 1 − log(π_ref/π): (0.5 − 1 + ln 2), (2 − 1 − ln 2)
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([[-0.5 + math.log(2), 1 - math.log(2)]]))
    assert (kl_penalty(logp, ref, "k3") >= 0).all() and kl_penalty(logp, ref, "k1")[0, 1] < 0
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    torch.manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum()
    a = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[a], q.log()[a]
    for kind in ("k1", "k3"):
        assert kl_penalty(lp, lq, kind).mean().item() == pytest.approx(true_kl.item(), abs=0.01)


def test_per_token_rewards_add_score_at_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(out, torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [-0.25, -0.25, -0.25 + 2.0]]))


def test_gae_hand_values():
    # One sequence, T = 2, γ = 0.9, λ = 0.8: V = [1, 2], r = [0, 3].
    # δ_1 = 3 + 0 − 2 = 1; δ_0 = 0 + 0.9·2 − 1 = 0.8; A_1 = 1; A_0 = 0.8 + 0.72·1 = 1.52.
    r, v, m = torch.tensor([[0.0, 3.0]]), torch.tensor([[1.0, 2.0]]), torch.ones(1, 2)
    for fn in (gae, gae_loop):
        adv, ret = fn(r, v, m, 0.9, 0.8)
        assert torch.allclose(adv, torch.tensor([[1.52, 1.0]]))
        assert torch.allclose(ret, torch.tensor([[2.52, 3.0]]))


def test_gae_vectorised_equals_loop_with_padding():
    torch.manual_seed(0)
    B, T = 5, 9
    r, v = torch.randn(B, T), torch.randn(B, T)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    before = (r.clone(), v.clone())
    for gamma, lam in [(1.0, 0.95), (0.99, 1.0), (0.5, 0.0)]:
        a1, r1 = gae_loop(r, v, mask, gamma, lam)
        a2, r2 = gae(r, v, mask, gamma, lam)
        assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
        assert (a1[mask == 0] == 0).all()
    assert torch.equal(r, before[0]) and torch.equal(v, before[1])


@pytest.mark.parametrize(
    "mask",
    [
        [[1, 1, 0, 0], [1, 0, 1, 0]],  # a 0 inside the completion
        [[1, 1, 1, 1], [0, 1, 1, 0]],  # left padding
        [[1, 0, 0, 1], [1, 1, 0, 0]],  # a 1 after the padding
    ],
)
@pytest.mark.parametrize("dtype", [torch.long, torch.float32, torch.bool])
def test_gae_rejects_a_mask_with_a_hole(mask, dtype):
    m = torch.tensor(mask).to(dtype)
    r, v = torch.randn(2, 4), torch.randn(2, 4)
    for fn in (gae, gae_loop):
        with pytest.raises(ValueError, match=r"mask row \d has a hole.*1s then 0s"):
            fn(r, v, m, 0.99, 0.95)


def test_gae_accepts_right_padded_masks_of_every_length():
    torch.manual_seed(1)
    T = 5
    mask = (torch.arange(T) < torch.arange(T + 1).unsqueeze(1)).float()  # lengths 0..T, all-0 and all-1 rows too
    r, v = torch.randn(T + 1, T), torch.randn(T + 1, T)
    a1, r1 = gae_loop(r, v, mask, 0.9, 0.8)
    a2, r2 = gae(r, v, mask, 0.9, 0.8)
    assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(r1, r2, atol=1e-5)
    assert (a1[0] == 0).all() and (a1[-1] != 0).all()


def test_whiten_and_masked_var():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    assert masked_var(x, m).item() == pytest.approx(1.0)  # var of 1,2,3 (unbiased)
    w = whiten(x, m)
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(whiten(x, m, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_hand_values():
    # Token 1: A = +1, ratio e^{0.5} ≈ 1.65 > 1.2 → clipped: loss −1.2.
    # Token 2: A = −1, ratio e^{−0.5} ≈ 0.61 < 0.8 → clipped: max(0.61, 0.8) = 0.8.
    # Token 3: A = +2, ratio 1 → −2. Token 4 masked out.
    logp = torch.tensor([[0.5, -0.5, 0.0, 9.0]])
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    k3 = lambda lr: math.expm1(lr) - lr  # noqa: E731
    assert out.approx_kl.item() == pytest.approx((k3(0.5) + k3(-0.5)) / 3)


def test_policy_loss_gradient_is_zero_when_clipped_in_the_favourable_direction():
    logp = torch.tensor([[0.5, 0.0]], requires_grad=True)
    out = ppo_policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    out.loss.backward()
    assert logp.grad[0, 0] == 0  # clipped: no push beyond 1 + ε
    assert logp.grad[0, 1] == pytest.approx(-0.5)  # −A·ρ/2 tokens at ρ = 1


def test_clipped_value_loss_hand_values():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    # Token 1: V = 1 (err 1); V_clip = 0.2 (err 3.24) → 3.24. Token 2: both 1 → 1.
    loss, frac = clipped_value_loss(values, old, ret, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_explained_variance_and_entropy():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m).item() == pytest.approx(0.0)
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    # KL 12 is 100% over target: error clipped to 0.2; 100 samples → β·(1 + 0.2·100/10000).
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * 1.002)
    # KL 3 is 50% under: error −0.2.
    assert ctl.update(3.0, 100) == pytest.approx(0.1 * 1.002 * 0.998)
    # Exactly on target: unchanged.
    v = ctl.value
    assert ctl.update(6.0, 100) == pytest.approx(v)


def test_paired_change_mean_and_standard_error():
    from rlhf.ppo import paired_change

    before = [{"prompt": p, "reward": r} for p, r in zip("abcd", [0.0, 1.0, 2.0, 3.0])]
    after = [{"prompt": p, "reward": r} for p, r in zip("abcd", [1.0, 1.0, 3.0, 5.0])]
    out = paired_change(before, after)  # differences 1, 0, 1, 2: mean 1, sample std √(2/3)
    assert out["mean"] == pytest.approx(1.0) and out["prompts"] == 4
    assert out["se"] == pytest.approx((2 / 3) ** 0.5 / 2)
    with pytest.raises(ValueError):
        paired_change(before, after[::-1])


def test_paired_change_averages_each_prompts_samples_first():
    from rlhf.ppo import paired_change

    # two prompts, three samples each: per-prompt changes (1+0+2)/3 = 1 and (0+0+0)/3 = 0
    before = [{"prompt": p, "index": i, "reward": 0.0} for i, p in ((0, "a"), (0, "a"), (0, "a"), (1, "b"), (1, "b"), (1, "b"))]
    after = [dict(b, reward=r) for b, r in zip(before, [1.0, 0.0, 2.0, 0.0, 0.0, 0.0])]
    out = paired_change(before, after)
    assert out["prompts"] == 2 and out["mean"] == pytest.approx(0.5)
    assert out["se"] == pytest.approx((0.5**0.5) / 2**0.5)  # sample std of (1, 0) is √½, over √2
    with pytest.raises(ValueError):
        paired_change(before, [dict(a, index=1 - a["index"]) for a in after])
