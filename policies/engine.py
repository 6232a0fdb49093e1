"""How a causal LM runs: the one interface the loops and reward providers use (DESIGN.md, "Engines").

They need three things from a model: hidden states at chosen positions (values, a reward
model's last token, a judge's verdict token), the logits that predict a completion's tokens
(log-probs), and sampling. An `Engine` provides them for any causal LM, peft-wrapped or not;
which one runs is picked once, by `model.engine` (`policies.engine_choice.build_engine`):

- `HFEngine` (`hf`): transformers' own forward and `generate` (sdpa or flash attention on a GPU).
- `PackedEngine` (`packed`, in `policies.packed`): a padding-free forward and sampler for
  Llama-family models with prepacked CPU matmuls; it falls back to `HFEngine` for anything it
  can't run. Its CPU tuning lives there and nowhere else.

An engine computes the same function whichever is chosen (up to rounding); what changes is
speed and memory. Loops, providers and judges never branch on the engine.
"""

from __future__ import annotations

from typing import Any

import torch

from policies.models import unwrap_causal_lm
from rlhf.core import position_ids


class Engine:
    """What the loops need from a causal LM. Shapes: B rows, T = P + C columns (P left-padded
    prompt columns, C right-padded completion columns), D hidden size, V vocabulary."""

    name = "engine"

    def hidden_states(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, read: torch.Tensor | None = None, frozen: bool = False) -> torch.Tensor:
        """Last-layer hidden states (B, T, D), after the final norm; positions restart at each
        row's first real token (left padding). `read` (B, T) bool: only those positions are
        needed (an engine may leave others as zeros). `frozen`: a pass without gradients over
        weights that stay unchanged from call to call (a frozen reward model), which an engine
        may cache work for."""
        raise NotImplementedError

    def completion_logits(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """Logits (B, C, V) at positions P-1 … P+C-2, the ones that predict the completion
        tokens; only those go through the LM head (a (B, P, V) projection of the prompts would
        be the largest tensor of the pass)."""
        raise NotImplementedError

    def sample(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Any, *, eos_token_id: int, pad_token_id: int, prompt: Any = None) -> torch.Tensor:
        """(B, P + C): the left-padded prompts, then tokens sampled from softmax(logits / τ) after
        `sampling`'s top-k / top-p (argmax at τ = 0), `pad_token_id` after each row's EOS. With
        `prompt` (this engine's `prompt_pass` over these prompts), sampling starts from it."""
        raise NotImplementedError

    def prepare_frozen(self, model: Any) -> None:
        """Called once the model's frozen weights are final (before training): an engine may lay
        them out for its passes. Nothing by default."""

    def metrics(self) -> dict[str, float]:
        """Engine-specific measurements to log per update (none by default)."""
        return {}

    # A pass over the prompts, kept with its graph from sampling for the next training forward,
    # which then runs the completions only (`policies.actor_critic.ActorCritic.generate`). An
    # engine that can do it says so here.
    def can_keep_prompt_pass(self, model: Any, prompt_width: int, sampling: Any) -> bool:
        return False

    def prompt_pass(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """A pass over left-padded prompts (B, P) that `sample` and `continued_logits` continue."""
        raise NotImplementedError(f"the {self.name} engine keeps no prompt pass")

    def continued_logits(self, model: Any, prompt: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`completion_logits` (B, C, V) of (B, P + C) rows whose prompts `prompt` ran."""
        raise NotImplementedError(f"the {self.name} engine keeps no prompt pass")


class HFEngine(Engine):
    """transformers' forward and `generate`: runs any causal LM, with whatever attention kernel
    it was loaded with (sdpa or flash attention on a GPU)."""

    name = "hf"

    def hidden_states(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, read: torch.Tensor | None = None, frozen: bool = False) -> torch.Tensor:
        decoder = unwrap_causal_lm(model).base_model
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def completion_logits(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        C = input_ids.shape[1] - prompt_width
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), logits_to_keep=C + 1, use_cache=False)
        return out.logits[:, :-1]

    @torch.no_grad()
    def sample(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Any, *, eos_token_id: int, pad_token_id: int, prompt: Any = None) -> torch.Tensor:
        if prompt is not None:
            raise ValueError(f"the {self.name} engine keeps no prompt pass to sample from")
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def completion_positions(shape: tuple[int, int], prompt_width: int, device: Any = None) -> torch.Tensor:
    """(B, T) bool: the positions P-1 … T-2 whose hidden states predict (or value the states
    before) the completion tokens of (B, P + C) rows."""
    read = torch.zeros(shape, dtype=torch.bool, device=device)
    read[:, prompt_width - 1 : -1] = True
    return read
