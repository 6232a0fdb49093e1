"""Sequence bookkeeping on token tensors: padding, positions, EOS. Pure torch."""

from __future__ import annotations

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token, so left padding does not
    shift the rotary positions (the same sequence gets the same log-probs however padded)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token. attention_mask: (B, T) → (B,) long.
    Works for left, right or both-sided padding (a row with no real token gets 0)."""
    T = attention_mask.shape[1]
    return (T - 1 - attention_mask.long().flip(-1).argmax(-1)).where(attention_mask.any(-1), torch.zeros((), dtype=torch.long))


def truncate_after_eos(ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep tokens up to and including the first EOS of each row; pad the rest.
    ids: (B, C). Returns (ids, mask, finished) with mask (B, C) long and finished (B,) bool.
    Does not modify `ids`."""
    is_eos = ids == eos_id
    finished = is_eos.any(-1)
    # Index of the first EOS (C where there is none); tokens after it are padding.
    first = torch.where(finished, is_eos.float().argmax(-1), torch.full_like(finished, ids.shape[1], dtype=torch.long))
    cols = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    mask = (cols <= first.unsqueeze(1)).long()
    return ids.masked_fill(mask == 0, pad_id), mask, finished
