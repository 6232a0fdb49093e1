"""Prompts and completions ↔ token tensors, and batched sampling.

Conventions used by every loop:
- a prompt is plain text or chat messages; with a chat template, messages are rendered with
  the generation prompt appended, and plain text is treated as one user message;
- sequences are left-padded: (B, P + C) with the prompt's last token at column P − 1 in every row;
- `completion_mask` (B, C) marks real completion tokens up to and including the first EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from policies.engine import Engine
from rlhf.config import SamplingConfig
from rlhf.core import masked_sum, token_logprobs, truncate_after_eos
from rlhf.data import Prompt


def render_prompt(tok: Any, prompt: Prompt, *, chat: bool = True) -> str:
    """The exact text the model is conditioned on."""
    if chat and getattr(tok, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if isinstance(prompt, str):
        return prompt
    # No template: a plain transcript in the HH style the data came in.
    turns = [f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in prompt]
    return "".join(turns) + "\n\nAssistant:"


def completion_suffix(tok: Any) -> str:
    """What closes a finished completion: the tokenizer's EOS, which for ChatML models such as
    SmolLM2 is the end-of-turn token `<|im_end|>`."""
    return tok.eos_token or ""


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (B, P + C) left-padded prompt + right-padded completion
    attention_mask: torch.Tensor  # (B, P + C) 1 on real tokens
    completion_mask: torch.Tensor  # (B, P + C) 1 on completion tokens (the ones that are scored)
    prompt_width: int  # P: completions start at this column in every row


def encode_completions(
    tok: Any,
    prompt_texts: Sequence[str],
    completions: Sequence[str],
    *,
    max_prompt_tokens: int = 512,
    max_completion_tokens: int = 256,
    add_eos: bool = True,
) -> Encoded:
    """Tokenize (prompt, completion) pairs for scoring. Prompts keep their last
    `max_prompt_tokens` tokens (the end is what the completion answers); completions keep their
    first `max_completion_tokens`. Each row is [pad… prompt completion pad…]."""
    if len(prompt_texts) != len(completions):
        raise ValueError(f"{len(prompt_texts)} prompts but {len(completions)} completions")
    suffix = completion_suffix(tok) if add_eos else ""
    rows = []
    for p, c in zip(prompt_texts, completions):
        p_ids = tok(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        c_ids = tok(c + suffix, add_special_tokens=False)["input_ids"][:max_completion_tokens]
        rows.append((p_ids, c_ids))
    p_len = max(len(p) for p, _ in rows)
    c_len = max(max(len(c) for _, c in rows), 1)
    B, pad = len(rows), tok.pad_token_id
    input_ids = torch.full((B, p_len + c_len), pad, dtype=torch.long)
    attention = torch.zeros((B, p_len + c_len), dtype=torch.long)
    comp = torch.zeros((B, p_len + c_len), dtype=torch.long)
    for i, (p_ids, c_ids) in enumerate(rows):
        start = p_len - len(p_ids)
        input_ids[i, start:p_len] = torch.tensor(p_ids, dtype=torch.long)
        input_ids[i, p_len : p_len + len(c_ids)] = torch.tensor(c_ids, dtype=torch.long)
        attention[i, start : p_len + len(c_ids)] = 1
        comp[i, p_len : p_len + len(c_ids)] = 1
    return Encoded(input_ids, attention, comp, p_len)


@torch.no_grad()
def sequence_logprob(engine: Engine, model: Any, enc: Encoded, temperature: float = 1.0) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over completion tokens. Returns (B,) float32."""
    device = next(model.parameters()).device
    ids, attn = enc.input_ids.to(device), enc.attention_mask.to(device)
    width = ids.shape[1] - enc.prompt_width
    logits = engine.completion_logits(model, ids, attn, enc.prompt_width)  # (B, C, V)
    targets = ids[:, -width:]  # (B, C)
    lp = token_logprobs(logits, targets, temperature)  # (B, C)
    return masked_sum(lp, enc.completion_mask[:, -width:].to(device))


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    completion_ids: torch.Tensor  # (B, C) pad after the first EOS
    completion_mask: torch.Tensor  # (B, C) 1 up to and including the first EOS
    finished: torch.Tensor  # (B,) bool: the completion ended with EOS within the budget
    texts: list[str]  # decoded completions, special tokens removed


def generate(engine: Engine, model: Any, tok: Any, prompt_texts: Sequence[str], cfg: SamplingConfig, *, max_prompt_tokens: int | None = None) -> Generation:
    """Sample one completion per prompt (each cut to its last `max_prompt_tokens` tokens when
    given). top_k=0 and top_p=1 leave the distribution untouched, so PPO's log-probs (computed
    with the same temperature) are those of the sampling policy."""
    device = next(model.parameters()).device
    batch = tok(list(prompt_texts), return_tensors="pt", padding=True, add_special_tokens=False)
    if tok.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer (policies.tokenizers.load_tokenizer)")
    ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if max_prompt_tokens is not None:
        ids, attn = ids[:, -max_prompt_tokens:], attn[:, -max_prompt_tokens:]
    out = engine.sample(model, ids, attn, cfg, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    completion = out[:, ids.shape[1] :]
    completion, mask, finished = truncate_after_eos(completion, tok.eos_token_id, tok.pad_token_id)
    texts = tok.batch_decode(completion, skip_special_tokens=True)
    return Generation(ids.cpu(), attn.cpu(), completion.cpu(), mask.cpu(), finished.cpu(), texts)
