"""rlhf.core math against values computed by hand."""

import math

import pytest
import torch

from rlhf.core import masked_mean, masked_sum, pairwise_accuracy, position_ids, token_logprobs, truncate_after_eos


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
