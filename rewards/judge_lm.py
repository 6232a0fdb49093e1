"""A causal LM used as a judge: its next-token distributions after a prompt, and its samples.

Both generative judges (`rewards.genrm`, `rewards.drlaif`) read a verdict from the judge's
next-token probabilities at a known position: prefill only, one forward per row, through the
same engine call (`Engine.hidden_states` with `read` and `frozen`) that reward-model scoring
uses, so on the CPU it runs on merged, prepacked weights and reads the LM head at the few
positions asked for. Chain-of-thought rationales are sampled with the engine's sampler.

Where the judge's weights live (DESIGN.md, "Single-GPU layout"):
- `JudgeLM.load(...)`: a model of its own (a base model by name, or a trained judge directory:
  base + LoRA adapter);
- `JudgeLM.on_host(host, adapter_dir=None)`: on the PPO policy's shared base, either with the
  host's adapters off (the starting model as judge) or as a frozen LoRA judge adapter hosted
  like the BT reward adapter. No second copy of the base is loaded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from policies.engine import Engine
from policies.engine_choice import build_engine
from policies.models import autocast, autocast_dtype, load_model, unwrap_causal_lm
from policies.text import render_prompt
from rlhf.config import LoraConfig, ModelConfig, SamplingConfig
from rlhf.core import truncate_after_eos
from rlhf.data import Message

JUDGE_ADAPTER = "judge"


class JudgeLM:
    """A model, its tokenizer and engine, and the context it must run in (an adapter switch)."""

    def __init__(self, model: Any, tokenizer: Any, engine: Engine, *, amp: torch.dtype | None, context: Callable[[], ContextManager[Any]] | None = None, shared_adapter: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.amp = amp
        self._context = context or contextlib.nullcontext
        self.shared_adapter = shared_adapter  # the host adapter it runs as (None: its own model, or the host with adapters off)
        self.device = next(model.parameters()).device

    # --- building ---------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | None = None, *, path: str | None = None, dtype: str = "float32", quantization: str = "none",
             device: str = "auto", autocast_mode: str = "auto", engine: str = "auto", trust_remote_code: bool = False, revision: str | None = None) -> JudgeLM:
        """A judge model of its own: `model` (alias, directory or hub id) as it is, or a base
        with the LoRA adapter in `path`/adapter (a directory written by `rlhf train-judge`)."""
        if (model is None) == (path is None):
            raise ValueError("a judge needs exactly one of `model` (a base model) or `path` (a trained judge directory)")
        lora = LoraConfig()
        if path is not None:
            from rewards.judge_format import read_judge_meta

            meta = read_judge_meta(path)
            model, dtype, quantization = meta.base_model, meta.dtype, meta.quantization
            trust_remote_code, revision = meta.trust_remote_code, meta.revision
            lora = LoraConfig(enabled=True, path=str(Path(path) / "adapter"))
        cfg = ModelConfig(name=model, dtype=dtype, quantization=quantization, device=device, lora=lora,  # type: ignore[arg-type]
                          trust_remote_code=trust_remote_code, revision=revision, engine=engine)  # type: ignore[arg-type]
        loaded = load_model(cfg)
        loaded.model.requires_grad_(False)
        eng = build_engine(cfg.engine, loaded.model, loaded.device)
        eng.prepare_frozen(loaded.model)
        return cls(loaded.model, loaded.tokenizer, eng, amp=autocast_dtype(autocast_mode, loaded.device))

    @classmethod
    def on_host(cls, host: Any, adapter_dir: str | Path | None = None) -> JudgeLM:
        """A judge on the host's (`policies.actor_critic.ActorCritic`) shared base: with its
        adapters off, or as the frozen LoRA adapter in `adapter_dir`, hosted as `judge`."""
        if adapter_dir is None:
            if host.layout != "shared_lora":  # separate full models: the frozen starting copy
                return cls(host.reference, host.tokenizer, host.engine, amp=host.amp)
            return cls(host.policy, host.tokenizer, host.engine, amp=host.amp, context=host.adapters_off)
        host.host_frozen_adapter(adapter_dir, JUDGE_ADAPTER)
        return cls(host.policy, host.tokenizer, host.engine, amp=host.amp, context=lambda: host.adapter(JUDGE_ADAPTER), shared_adapter=JUDGE_ADAPTER)

    # --- text -> ids ------------------------------------------------------------------------
    def clip(self, text: str, max_tokens: int, *, keep: str = "first") -> str:
        """`text` cut to its first (or last) `max_tokens` tokens, so a long answer can't push
        the judge's instructions out of its context."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        kept = ids[:max_tokens] if keep == "first" else ids[-max_tokens:]
        return self.tokenizer.decode(kept, skip_special_tokens=False)

    def render(self, messages: Sequence[Message], assistant_prefix: str = "", *, chat: bool = True) -> str:
        """The conversation through the chat template with the assistant's turn opened, then
        `assistant_prefix` (what the judge has "already written": "[[", "Rating: ", a rationale)."""
        return render_prompt(self.tokenizer, list(messages), chat=chat) + assistant_prefix

    def token_id(self, text: str) -> int:
        """The id of `text`, which must be one token of this tokenizer."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"judge verdict {text!r} is {len(ids)} tokens for this tokenizer ({ids}); choose verdict tokens that are single tokens")
        return ids[0]

    def encode(self, texts: Sequence[str], append: Sequence[Sequence[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (B, T) ids and attention mask of `texts`, each followed by the token ids in
        `append` (all rows the same number), so that the last columns line up across rows."""
        rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + list(append[i] if append else []) for i, t in enumerate(texts)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attn[i, width - len(r):] = 1
        return ids, attn

    # --- passes ---------------------------------------------------------------------------------
    @torch.no_grad()
    def last_logprobs(self, ids: torch.Tensor, attn: torch.Tensor, k: int = 1) -> torch.Tensor:
        """log p(· | row[:t+1]) at the last `k` columns t = T−k … T−1: (B, k, V) float32. One
        prefill forward; only those k columns go through the last layer's MLP and the LM head.

        The LM head runs in float32 even under bf16 autocast (it is k columns: negligible cost).
        bf16 logits keep 8 significant bits, so a verdict's log-odds log p_A − log p_B moves in
        steps of 1/16 to 1/4 at typical logit sizes: the two presentation orders of a
        position-biased judge then often read the very same log-odds, their average is exactly
        ½, and the comparison is a tie, however the answers differ (about half of the pairs
        for SmolLM2-135M as GenRM)."""
        ids, attn = ids.to(self.device), attn.to(self.device)
        read = torch.zeros(ids.shape, dtype=torch.bool, device=self.device)
        read[:, -k:] = True
        with self._context():
            with autocast(self.device, self.amp):
                hidden = self.engine.hidden_states(self.model, ids, attn, read=read, frozen=True)
            head = unwrap_causal_lm(self.model).get_output_embeddings()
            logits = torch.nn.functional.linear(hidden[:, -k:].float(), head.weight.float(), None if head.bias is None else head.bias.float())
        return torch.log_softmax(logits, dim=-1).cpu()

    @torch.no_grad()
    def sample(self, texts: Sequence[str], sampling: SamplingConfig) -> list[str]:
        """One sampled continuation per text (decoded, special tokens removed, cut at EOS)."""
        tok = self.tokenizer
        ids, attn = self.encode(texts)
        with self._context(), autocast(self.device, self.amp):
            out = self.engine.sample(self.model, ids.to(self.device), attn.to(self.device), sampling, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        completion, _, _ = truncate_after_eos(out[:, ids.shape[1]:].cpu(), tok.eos_token_id, tok.pad_token_id)
        return tok.batch_decode(completion, skip_special_tokens=True)


def batched(n: int, size: int, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices in batches of `size`, longest first where `lengths` are given (less padding;
    a batch that runs out of memory does so at once)."""
    order = sorted(range(n), key=lambda i: -lengths[i]) if lengths is not None else list(range(n))
    return [order[s:s + size] for s in range(0, n, size)]
