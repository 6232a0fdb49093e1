"""Tokenizer loading with the two invariants every loop relies on.

1. The pad token is distinct from EOS. With pad == EOS, masking padding also masks the real
   EOS that ends a completion, so the model is never trained to stop and a reward model can't
   tell a finished answer from a cut one (a known pitfall; see "The N+ Implementation Details
   of RLHF with PPO", Huang et al. 2024, section on padding).
2. Padding goes on the left, so that the last position of every row is the newest token, which
   batched generation needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_PAD_FALLBACK = "<|pad|>"


def ensure_pad_token(tok: Any) -> bool:
    """Give `tok` a pad token distinct from every EOS token. Returns True if a new token was
    added to the vocabulary (then the model's embeddings must be resized)."""
    eos_ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if tok.pad_token_id is not None and tok.pad_token_id not in eos_ids:
        return False
    # Reuse an existing special token that never ends a sequence: no new embedding row needed.
    for candidate in (tok.unk_token, "<|endoftext|>", "<pad>", "[PAD]"):
        if candidate is None:
            continue
        tid = tok.convert_tokens_to_ids(candidate)
        if tid is None or tid in eos_ids:
            continue
        if candidate != tok.unk_token and tid == tok.unk_token_id:
            continue  # not in the vocabulary: it maps to <unk>
        tok.pad_token = candidate
        return False
    tok.add_special_tokens({"pad_token": _PAD_FALLBACK})
    return True


def load_tokenizer(path: str | Path, *, padding_side: str = "left", trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    ensure_pad_token(tok)
    tok.padding_side = padding_side
    return tok
