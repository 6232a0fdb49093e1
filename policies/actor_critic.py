"""The policy, its reference and the critic, in the two layouts the PPO loop runs with.

`shared_lora` (DESIGN.md, "Single-GPU layout"): one base model, optionally 4-bit, carries two
LoRA adapters, `policy` (trained) and `critic` (trained, plus a value head); the reference
policy is the base with adapters disabled. One copy of the base weights serves all three.

`separate`: a full policy, a frozen full copy as the reference, and a full critic backbone with
a value head. The same loop runs on either through `ActorCritic`'s methods.

`forward` computes the policy's log-probs and the critic's values in one call, so that under
DDP (Accelerate) a training step is one forward and one backward of one wrapped module.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from policies.models import LoadedModel, apply_lora, completion_logits, completion_positions, final_hidden_states, load_model, store_frozen_linears_in, unwrap_causal_lm
from policies.packed import PromptPass, can_pack, can_run_jointly, continued_hidden_states, packed_hidden_states, prepack_frozen_projections, prompt_pass, stack_frozen_projections
from policies.text import Encoded
from rlhf.config import ModelConfig
from rlhf.core import token_logprobs_and_entropy

POLICY, CRITIC, REFERENCE, REWARD = "policy", "critic", "reference", "reward"


@dataclass
class ActorCriticOutput:
    logprobs: torch.Tensor  # (B, C) log π(y_t | x, y_<t) at the sampling temperature
    entropy: torch.Tensor  # (B, C) entropy of π(·| x, y_<t)
    values: torch.Tensor  # (B, C) V(x, y_<t): the state before token t


class ValueHead(nn.Module):
    """h (…, D) → V (…); initialisable from a trained reward head (same shapes)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # V ≡ 0 at the start (centred rewards average 0). A std-1/√(D+1) head on SmolLM2's final
        # hidden states (norm ≈ 47) gives values of std ≈ 2 that swing from token to token, and
        # GAE sums those swings into the advantages; the critic then learns V from the returns.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class ActorCritic(nn.Module):
    """Policy + reference + critic behind one interface (see module docstring)."""

    def __init__(self, policy: Any, critic_backbone: Any | None, reference: Any | None, value_head: ValueHead, tokenizer: Any, layout: str) -> None:
        super().__init__()
        self.policy = policy  # peft model with both adapters (shared_lora) or a causal LM (separate)
        self.critic_backbone = critic_backbone  # None in shared_lora: the critic adapter lives in `policy`
        self.reference = reference  # None in shared_lora: adapters disabled instead
        self.value_head = value_head
        self.tokenizer = tokenizer
        self.layout = layout
        self.temperature = 1.0
        self.has_reference_adapter = False
        self.base_path: Any = None  # shared_lora: the base model's directory (resolved)
        self.quantization = "none"

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: ModelConfig, layout: str) -> ActorCritic:
        if layout == "shared_lora":
            if not cfg.lora.enabled:
                raise ValueError("layout 'shared_lora' needs model.lora.enabled: true (or use layout 'separate')")
            loaded = load_model(dataclass_replace_lora(cfg, enabled=False))
            model = apply_lora(loaded.model, cfg.lora, quantized=cfg.quantization != "none", adapter_name=POLICY)
            # The critic adapter has the policy adapter's shape and starts fresh (B = 0).
            model.add_adapter(CRITIC, copy.deepcopy(model.peft_config[POLICY]))
            if cfg.lora.path is not None:
                # Training continues from a trained adapter: π_ref is that adapter, frozen.
                model.load_adapter(cfg.lora.path, adapter_name=REFERENCE, is_trainable=False)
            hidden = loaded.model.config.get_text_config().hidden_size
            ac = cls(model, None, None, ValueHead(hidden).to(loaded.device), loaded.tokenizer, layout)
            ac.has_reference_adapter = cfg.lora.path is not None
            ac.base_path, ac.quantization = loaded.path.resolve(), cfg.quantization
            ac._set_adapter(POLICY)
            return ac
        if layout == "separate":
            if cfg.quantization != "none":
                raise ValueError("layout 'separate' trains full models; 4-bit/8-bit weights need layout 'shared_lora'")
            policy: LoadedModel = load_model(cfg)
            reference = copy.deepcopy(policy.model).eval().requires_grad_(False)
            critic = load_model(cfg, tokenizer=policy.tokenizer).model
            critic.get_output_embeddings().requires_grad_(False)  # the critic uses hidden states only
            hidden = policy.model.config.get_text_config().hidden_size
            return cls(policy.model, critic, reference, ValueHead(hidden).to(policy.device), policy.tokenizer, layout)
        raise ValueError(f"unknown layout {layout!r}; expected 'shared_lora' or 'separate'")

    def attach_reward_model(self, path: str) -> Any | None:
        """Load a LoRA reward model trained on this same base as a frozen `reward` adapter on the
        shared base, and return it as a `RewardModel` (None where it can't share: another
        layout, another base or quantization, or a fully fine-tuned reward model)."""
        from policies.hub import resolve_model_path
        from rewards.reward_model import AdapterRewardModel, load_reward_head, read_reward_model_meta

        meta = read_reward_model_meta(path)
        if self.layout != "shared_lora" or not meta.lora or meta.quantization != self.quantization:
            return None
        if resolve_model_path(meta.base_model, meta.revision).resolve() != self.base_path:
            return None
        self.policy.load_adapter(f"{path}/adapter", adapter_name=REWARD, is_trainable=False)
        head = load_reward_head(path, meta).to(self.device).requires_grad_(False)
        return AdapterRewardModel(self.policy, head, self.tokenizer, meta, REWARD, self.adapter).eval()

    def init_critic_adapter_from_reward(self) -> int:
        """Start the critic adapter as the attached reward adapter (same rank and scaling where
        both exist; the critic's other modules keep B = 0), so that with the value head copied
        from the reward head, V starts as the reward model itself, as OpenRLHF and TRL start
        their critic from the reward model. Returns the number of tensors copied."""
        params = dict(self.policy.named_parameters())
        copied = 0
        with torch.no_grad():
            for name, p in params.items():
                if f".{REWARD}." not in name:
                    continue
                target = params.get(name.replace(f".{REWARD}.", f".{CRITIC}."))
                if target is None or target.shape != p.shape:
                    raise ValueError(f"the reward adapter does not fit the critic adapter at {name} (rank or shape differs)")
                target.copy_(p)
                copied += 1
        if not copied:
            raise ValueError("no reward adapter attached to copy into the critic")
        reward_cfg, critic_cfg = self.policy.peft_config[REWARD], self.policy.peft_config[CRITIC]
        if (reward_cfg.r, reward_cfg.lora_alpha) != (critic_cfg.r, critic_cfg.lora_alpha):
            raise ValueError("the critic adapter can start from the reward adapter only with the same r and alpha")
        return copied

    def store_frozen_in(self, dtype: torch.dtype | None, prepack: bool = False) -> None:
        """shared_lora, unquantized: keep the frozen base's matmul weights in the autocast dtype
        every forward runs under (same numbers, half the memory, no per-call cast), and stack
        each layer's q/k/v and gate/up weights in memory (`stack_frozen_projections`). With
        `prepack` (CPU), also keep them prepacked for the forward passes
        (`prepack_frozen_projections`)."""
        if self.layout != "shared_lora" or self.quantization != "none":
            return
        if dtype is not None:
            store_frozen_linears_in(self.policy, dtype)
            # The remaining frozen tensors (embeddings, norms) still view the memory-mapped
            # safetensors file, which keeps every page of the fp32 original resident; own copies
            # let the mapping close (about 300 MB less resident for SmolLM2-135M).
            for p in self.policy.parameters():
                if not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.clone()
        # q/k/v and gate/up weights side by side in memory: one matmul per group (policies.packed)
        stack_frozen_projections(self.policy)
        if prepack:
            prepack_frozen_projections(self.policy)

    @property
    def device(self) -> torch.device:
        return self.value_head.linear.weight.device

    # --- adapters -----------------------------------------------------------------------------
    def _set_adapter(self, name: str) -> None:
        self.policy.set_adapter(name)
        self._keep_both_trainable()

    def _keep_both_trainable(self) -> None:
        # peft's set_adapter (and re-enabling adapters after disable_adapter) flips requires_grad
        # so only the active adapter looks trainable; the optimizer holds both adapters' tensors
        # regardless, and the joint pass trains both at once, so restore both.
        for n, p in self.policy.named_parameters():
            if f".{POLICY}." in n or f".{CRITIC}." in n:
                p.requires_grad_(True)

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Run with one adapter active; the previous one is restored even if an exception escapes."""
        if self.layout != "shared_lora":
            yield
            return
        previous = self.policy.active_adapter
        self._set_adapter(name)
        try:
            yield
        finally:
            self._set_adapter(previous)

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[Any]:
        """Yields the model to run as π_ref."""
        if self.layout != "shared_lora":
            yield self.reference
        elif self.has_reference_adapter:
            with self.adapter(REFERENCE):
                yield self.policy
        else:
            try:
                with self.policy.disable_adapter():
                    yield self.policy
            finally:
                self._keep_both_trainable()

    # --- forward pieces -----------------------------------------------------------------------
    def _logits(self, model: Any, enc: Encoded) -> torch.Tensor:
        """Logits at the positions that predict completion tokens, (B, C, V)."""
        return completion_logits(model, enc.input_ids.to(self.device), enc.attention_mask.to(self.device), enc.prompt_width)

    def _logprobs(self, model: Any, enc: Encoded, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._logprobs_of(self._logits(model, enc), enc.input_ids, enc.prompt_width, with_entropy)

    def _logprobs_of(self, logits: torch.Tensor, input_ids: torch.Tensor, prompt_width: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        targets = input_ids[:, prompt_width:].to(self.device)
        # the entropy is a metric only (no entropy bonus): no graph, no backward through it
        return token_logprobs_and_entropy(logits, targets, self.temperature, with_entropy)

    def _values(self, enc: Encoded) -> torch.Tensor:
        ids, attn = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        backbone = self.critic_backbone if self.layout == "separate" else self.policy
        P = enc.prompt_width
        hidden = final_hidden_states(backbone, ids, attn, read=completion_positions(ids.shape, P, ids.device))
        return self.value_head(hidden[:, P - 1 : -1]).float()  # (B, C): state before each token

    def policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, prompt: PromptPass | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs (with gradients) and entropy (a metric, no graph), each (B, C).
        With `prompt` (`generate_keeping_prompt_pass`, for these rows: `PromptPass.rows`), only
        the completions run, continuing that pass."""
        if prompt is not None:
            with self.adapter(POLICY):
                hidden = continued_hidden_states(self.policy, prompt, input_ids.to(self.device), attention_mask.to(self.device))
                logits = unwrap_causal_lm(self.policy).get_output_embeddings()(hidden)
            return self._logprobs_of(logits, input_ids, prompt_width, with_entropy=True)  # type: ignore[return-value]
        enc = Encoded(input_ids, attention_mask, torch.zeros_like(input_ids), prompt_width)
        with self.adapter(POLICY):
            logp, ent = self._logprobs(self.policy, enc, with_entropy=True)
        return logp, ent  # type: ignore[return-value]

    def critic_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The critic's values V(x, y_<t) (B, C), with gradients."""
        enc = Encoded(input_ids, attention_mask, torch.zeros_like(input_ids), prompt_width)
        with self.adapter(CRITIC):
            return self._values(enc)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, joint: bool = False, prompt: PromptPass | None = None) -> ActorCriticOutput:
        """Policy log-probs and entropy (policy adapter) and values (critic), with gradients. With
        `joint` (where `can_run_jointly`), as one pass over the shared base for both; with
        `prompt`, the policy continues that prompt pass (`policy_forward`)."""
        if joint:
            if prompt is not None:
                raise ValueError("the joint pass runs the prompts itself; it can't continue a prompt pass")
            return self._joint_forward(input_ids.to(self.device), attention_mask.to(self.device), prompt_width)
        logp, ent = self.policy_forward(input_ids, attention_mask, prompt_width, prompt)
        return ActorCriticOutput(logp, ent, self.critic_forward(input_ids, attention_mask, prompt_width))

    def can_run_jointly(self, seq_len: int) -> bool:
        """Whether the policy and the critic can run as one batched pass over their shared base
        (`policies.packed.packed_hidden_states` with two adapter sets): shared_lora on a packable,
        unquantized base whose adapters have the same shapes."""
        return self.layout == "shared_lora" and can_run_jointly(self.policy, [[POLICY], [CRITIC]], seq_len)

    def _joint_forward(self, ids: torch.Tensor, attn: torch.Tensor, P: int) -> ActorCriticOutput:
        """`forward` as one pass of 2B rows: the batch under the policy adapter and under the
        critic adapter, the same log-probs, entropy and values up to rounding."""
        read = completion_positions(ids.shape, P, ids.device)
        for_policy, for_critic = packed_hidden_states(self.policy, ids, attn, read=read, adapter_sets=[[POLICY], [CRITIC]])
        logits = unwrap_causal_lm(self.policy).get_output_embeddings()(for_policy[:, P - 1 : -1])
        logp, ent = self._logprobs_of(logits, ids, P, with_entropy=True)
        return ActorCriticOutput(logp, ent, self.value_head(for_critic[:, P - 1 : -1]).float())  # type: ignore[arg-type]

    @torch.no_grad()
    def reference_logprobs(self, enc: Encoded, split: bool = False) -> torch.Tensor:
        """log π_ref of the completion tokens (B, C). With `split`, computed as the policy's
        training forward is when it continues a kept prompt pass: a pass over the prompts, then
        the completions (`prompt_pass`, `continued_hidden_states`). The same function; what
        changes is which rows each matmul sees, and in bf16 that changes the rounding. Taking
        both in one shape keeps a fresh policy's log-probs equal to the reference's, bit for
        bit, so the first update's KL is exactly 0 and later ones carry no rounding offset."""
        with self.as_reference() as ref:
            if not split:
                return self._logprobs(ref, enc, with_entropy=False)[0]
            ids, attn, P = enc.input_ids.to(self.device), enc.attention_mask.to(self.device), enc.prompt_width
            hidden = continued_hidden_states(ref, prompt_pass(ref, ids[:, :P], attn[:, :P]), ids, attn)
            logits = unwrap_causal_lm(ref).get_output_embeddings()(hidden)
            return self._logprobs_of(logits, ids, P, with_entropy=False)[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Any, *, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
        """(B, P + C) prompts and the policy's sampled completions (policies.text.sample_tokens)."""
        from policies.text import sample_tokens

        with self.adapter(POLICY):
            return sample_tokens(self.policy, input_ids.to(self.device), attention_mask.to(self.device), sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def can_keep_prompt_pass(self, prompt_width: int, sampling: Any) -> bool:
        """Whether `generate_keeping_prompt_pass` can run: the padding-free sampler on the policy,
        without activation checkpointing (whose point is not to keep a pass's activations)."""
        from policies.text import can_sample_from_prompt_pass

        layers = unwrap_causal_lm(self.policy).model.layers if can_pack(self.policy) else []
        return can_sample_from_prompt_pass(self.policy, prompt_width, sampling) and not any(getattr(layer, "_rlhf_checkpointed", False) for layer in layers)

    def generate_keeping_prompt_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Any, *, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, PromptPass]:
        """`generate`, from a pass of the policy over the prompts that keeps its graph
        (`policies.packed.prompt_pass`), returned with the samples: a training forward of the
        policy with the same parameters continues it (`policy_forward(..., prompt=...)`)
        instead of running the prompts again."""
        from policies.text import sample_tokens

        ids, attn = input_ids.to(self.device), attention_mask.to(self.device)
        with self.adapter(POLICY):
            with torch.enable_grad():
                prompt = prompt_pass(self.policy, ids, attn)
            out = sample_tokens(self.policy, ids, attn, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id, prompt=prompt)
        return out, prompt

    # --- state --------------------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What the optimizer trains: both adapters + value head (shared_lora), or the policy,
        critic backbone and value head (separate). The reference never trains."""
        if self.layout == "shared_lora":
            names = [(n, p) for n, p in self.policy.named_parameters() if f".{POLICY}." in n or f".{CRITIC}." in n]
            names = [(f"policy.{n}", p) for n, p in names]
        else:
            names = [(f"policy.{n}", p) for n, p in self.policy.named_parameters() if p.requires_grad]
            names += [(f"critic_backbone.{n}", p) for n, p in self.critic_backbone.named_parameters() if p.requires_grad]
        return names + [(f"value_head.{n}", p) for n, p in self.value_head.named_parameters()]

    def init_value_head_from_reward_model(self, path: str) -> None:
        """Copy a trained linear BT/GRM head into the value head (Ouyang et al. 2022 init the
        value function from the reward model)."""
        from safetensors.torch import load_file

        state = load_file(f"{path}/head.safetensors")
        if set(state) != {"net.0.weight", "net.0.bias"}:
            raise ValueError(f"{path}: only a linear reward head can initialise the value head (found {sorted(state)})")
        self.value_head.linear.weight.data.copy_(state["net.0.weight"])
        self.value_head.linear.bias.data.copy_(state["net.0.bias"])


def dataclass_replace_lora(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, **changes))
