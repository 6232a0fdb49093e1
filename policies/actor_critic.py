"""The policy, its reference and the critic, in the two layouts the PPO loop runs with.

`shared_lora` (DESIGN.md, "Single-GPU layout"): one base model, optionally 4-bit, carries two
LoRA adapters, `policy` (trained) and `critic` (trained, plus a value head); the reference
policy is the base with adapters disabled. One copy of the base weights serves all three, and
a LoRA reward model trained on the same base can join them as a frozen adapter
(`host_frozen_adapter`).

`separate`: a full policy, a frozen full copy as the reference, and a full critic backbone with
a value head. The same loop runs on either through `ActorCritic`'s methods.

Every pass runs through the model's engine (`policies.engine`, chosen by `model.engine`);
`forward` computes the policy's log-probs and the critic's values in one call, so that under
DDP (Accelerate) a training step is one forward and one backward of one wrapped module.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from policies.engine import completion_positions
from policies.engine_choice import build_engine
from policies.models import LoadedModel, apply_lora, autocast_dtype, load_model, store_frozen_linears_in
from policies.text import Encoded
from rlhf.config import EngineConfig, ModelConfig
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

    def __init__(self, policy: Any, critic_backbone: Any | None, reference: Any | None, value_head: ValueHead, tokenizer: Any, layout: str, engine: Any, settings: EngineConfig = EngineConfig(), amp: torch.dtype | None = None) -> None:
        super().__init__()
        self.policy = policy  # peft model with both adapters (shared_lora) or a causal LM (separate)
        self.critic_backbone = critic_backbone  # None in shared_lora: the critic adapter lives in `policy`
        self.reference = reference  # None in shared_lora: adapters disabled instead
        self.value_head = value_head
        self.tokenizer = tokenizer
        self.layout = layout
        self.engine = engine  # policies.engine.Engine: how every pass runs
        self.amp = amp  # the autocast dtype every pass runs under (None: off)
        self.temperature = 1.0
        self.has_reference_adapter = False
        self.base_path: Any = None  # shared_lora: the base model's directory (resolved)
        self.quantization = "none"
        shared = layout == "shared_lora"
        self.critic_chunks = settings.critic_chunks or (1 if shared else 4)
        self.keep_prompt_pass = settings.keep_prompt_pass if settings.keep_prompt_pass is not None else shared
        self._kept: tuple[torch.Tensor, Any] | None = None  # (prompt ids, the engine's kept prompt pass): `generate`
        self._kept_count = 0

    # --- building -----------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: ModelConfig, layout: str, settings: EngineConfig = EngineConfig(), autocast: str = "auto") -> ActorCritic:
        if layout == "shared_lora":
            if not cfg.lora.enabled:
                raise ValueError("layout 'shared_lora' needs model.lora.enabled: true (or use layout 'separate')")
            loaded = load_model(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=False)))
            model = apply_lora(loaded.model, cfg.lora, quantized=cfg.quantization != "none", adapter_name=POLICY)
            # The critic adapter has the policy adapter's shape and starts fresh (B = 0).
            model.add_adapter(CRITIC, copy.deepcopy(model.peft_config[POLICY]))
            if cfg.lora.path is not None:
                # Training continues from a trained adapter: π_ref is that adapter, frozen.
                model.load_adapter(cfg.lora.path, adapter_name=REFERENCE, is_trainable=False)
            hidden = loaded.model.config.get_text_config().hidden_size
            engine = build_engine(cfg.engine, model, loaded.device, settings)
            ac = cls(model, None, None, ValueHead(hidden).to(loaded.device), loaded.tokenizer, layout, engine, settings, autocast_dtype(autocast, loaded.device))
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
            engine = build_engine(cfg.engine, policy.model, policy.device, settings)
            return cls(policy.model, critic, reference, ValueHead(hidden).to(policy.device), policy.tokenizer, layout, engine, settings, autocast_dtype(autocast, policy.device))
        raise ValueError(f"unknown layout {layout!r}; expected 'shared_lora' or 'separate'")

    def can_host_adapter(self, base_path: Path, quantization: str, amp: torch.dtype | None) -> bool:
        """Whether a LoRA adapter trained on the base at `base_path` (with this quantization, run
        under this autocast dtype) can run as a frozen adapter on this model's shared base."""
        return self.layout == "shared_lora" and quantization == self.quantization and Path(base_path).resolve() == self.base_path and amp == self.amp

    def host_frozen_adapter(self, adapter_dir: str | Path, name: str = REWARD) -> Any:
        """Load a frozen LoRA adapter (a reward model's, say) onto the shared base under `name`,
        and return the peft model that carries it; run it inside `adapter(name)`."""
        self.policy.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        return self.policy

    def init_critic_adapter_from(self, name: str = REWARD) -> int:
        """Start the critic adapter as the hosted adapter `name` (same rank and scaling where
        both exist; the critic's other modules keep B = 0), so that with the value head copied
        from the reward head, V starts as the reward model itself, as OpenRLHF and TRL start
        their critic from the reward model. Returns the number of tensors copied."""
        params = dict(self.policy.named_parameters())
        copied = 0
        with torch.no_grad():
            for key, p in params.items():
                if f".{name}." not in key:
                    continue
                target = params.get(key.replace(f".{name}.", f".{CRITIC}."))
                if target is None or target.shape != p.shape:
                    raise ValueError(f"the {name} adapter does not fit the critic adapter at {key} (rank or shape differs)")
                target.copy_(p)
                copied += 1
        if not copied:
            raise ValueError(f"no {name} adapter hosted to copy into the critic")
        source_cfg, critic_cfg = self.policy.peft_config[name], self.policy.peft_config[CRITIC]
        if (source_cfg.r, source_cfg.lora_alpha) != (critic_cfg.r, critic_cfg.lora_alpha):
            raise ValueError(f"the critic adapter can start from the {name} adapter only with the same r and alpha")
        return copied

    def prepare_frozen(self) -> None:
        """Once every adapter is in place (a hosted reward adapter loads in full precision), lay
        the frozen base out for the passes: shared_lora, unquantized, keep its matmul weights in
        the autocast dtype every forward runs under (same numbers, half the memory, no per-call
        cast), then let the engine arrange them (`Engine.prepare_frozen`)."""
        if self.layout != "shared_lora" or self.quantization != "none":
            return
        if self.amp is not None:
            store_frozen_linears_in(self.policy, self.amp)
            # The remaining frozen tensors (embeddings, norms) still view the memory-mapped
            # safetensors file, which keeps every page of the fp32 original resident; own copies
            # let the mapping close.
            for p in self.policy.parameters():
                if not p.requires_grad and p.dtype == torch.float32:
                    p.data = p.data.clone()
        self.engine.prepare_frozen(self.policy)

    @property
    def device(self) -> torch.device:
        return self.value_head.linear.weight.device

    def autocast(self) -> Any:
        """The autocast context every pass of these models runs under."""
        return torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None)

    def metrics(self) -> dict[str, float]:
        """The engine's own measurements, and how many training forwards continued a prompt pass
        kept from sampling since the last call (`generate`)."""
        kept, self._kept_count = self._kept_count, 0
        return self.engine.metrics() | {"engine/prompt_pass_reused": float(kept)}

    # --- adapters -----------------------------------------------------------------------------
    def _set_adapter(self, name: str) -> None:
        self.policy.set_adapter(name)
        self._keep_both_trainable()

    def _keep_both_trainable(self) -> None:
        # peft's set_adapter (and re-enabling adapters after disable_adapter) flips requires_grad
        # so only the active adapter looks trainable; the optimizer holds both adapters' tensors
        # regardless, so restore both.
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
    def adapters_off(self) -> Iterator[Any]:
        """Yields the base model as it was loaded: the shared base with every adapter disabled
        (shared_lora), or the frozen starting copy (separate). A judge runs here."""
        if self.layout != "shared_lora":
            yield self.reference
            return
        try:
            with self.policy.disable_adapter():
                yield self.policy
        finally:
            self._keep_both_trainable()

    @contextlib.contextmanager
    def as_reference(self) -> Iterator[Any]:
        """Yields the model to run as π_ref."""
        if self.layout != "shared_lora":
            yield self.reference
        elif self.has_reference_adapter:
            with self.adapter(REFERENCE):
                yield self.policy
        else:
            with self.adapters_off() as base:
                yield base

    # --- forward pieces -----------------------------------------------------------------------
    def _logprobs_of(self, logits: torch.Tensor, input_ids: torch.Tensor, prompt_width: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        targets = input_ids[:, prompt_width:].to(self.device)
        # the entropy is a metric only (no entropy bonus): no graph, no backward through it
        return token_logprobs_and_entropy(logits, targets, self.temperature, with_entropy)

    def _kept_for(self, input_ids: torch.Tensor, prompt_width: int) -> Any | None:
        """The prompt pass kept by `generate`, if these rows are the rows it ran (same prompts,
        same order), else None."""
        if self._kept is None or not torch.equal(self._kept[0], input_ids[:, :prompt_width].to(self._kept[0].device)):
            return None
        return self._kept[1]

    def policy_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's log-probs (with gradients) and entropy (a metric, no graph), each (B, C).
        Where `generate` kept its pass over these rows' prompts, only the completions run,
        continuing it (the same log-probs up to rounding)."""
        ids, attn = input_ids.to(self.device), attention_mask.to(self.device)
        # the kept pass serves one forward, before the parameters change: taken either way
        prompt, self._kept = self._kept_for(ids, prompt_width), None
        with self.adapter(POLICY):
            if prompt is not None:
                self._kept_count += 1
                logits = self.engine.continued_logits(self.policy, prompt, ids, attn)
            else:
                logits = self.engine.completion_logits(self.policy, ids, attn, prompt_width)
        logp, ent = self._logprobs_of(logits, ids, prompt_width, with_entropy=True)
        return logp, ent  # type: ignore[return-value]

    def critic_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The critic's values V(x, y_<t) (B, C): the state before each completion token, with gradients."""
        ids, attn = input_ids.to(self.device), attention_mask.to(self.device)
        backbone = self.critic_backbone if self.layout == "separate" else self.policy
        with self.adapter(CRITIC):
            hidden = self.engine.hidden_states(backbone, ids, attn, read=completion_positions(ids.shape, prompt_width, ids.device))
        return self.value_head(hidden[:, prompt_width - 1 : -1]).float()

    def critic_row_chunks(self, rows: int) -> list[torch.Tensor]:
        """Row indices of a micro-batch in the chunks the critic runs in when its backward may
        follow each chunk's forward (`engine.critic_chunks`): fewer activations alive at once."""
        return list(torch.arange(rows).chunk(min(self.critic_chunks, rows)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> ActorCriticOutput:
        """Policy log-probs and entropy (policy adapter) and values (critic), with gradients."""
        logp, ent = self.policy_forward(input_ids, attention_mask, prompt_width)
        return ActorCriticOutput(logp, ent, self.critic_forward(input_ids, attention_mask, prompt_width))

    @torch.no_grad()
    def reference_logprobs(self, enc: Encoded) -> torch.Tensor:
        """log π_ref of the completion tokens (B, C). Where `generate` kept a prompt pass for these
        rows, computed in the same split shape the policy's training forward will use (a pass
        over the prompts, then the completions): the same function, but which rows each matmul
        sees changes the rounding in bf16, and one shape on both sides keeps a fresh policy's
        log-probs equal to the reference's bit for bit (the first update's KL exactly 0)."""
        ids, attn, P = enc.input_ids.to(self.device), enc.attention_mask.to(self.device), enc.prompt_width
        split = self._kept_for(ids, P) is not None
        with self.as_reference() as ref:
            if split:
                logits = self.engine.continued_logits(ref, self.engine.prompt_pass(ref, ids[:, :P], attn[:, :P]), ids, attn)
            else:
                logits = self.engine.completion_logits(ref, ids, attn, P)
            return self._logprobs_of(logits, ids, P, with_entropy=False)[0]

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Any, *, eos_token_id: int, pad_token_id: int, for_training: bool = False) -> torch.Tensor:
        """(B, P + C): the prompts and the policy's sampled completions. `for_training`: the next
        training forward of the policy runs these very rows with the present parameters (the
        update's first step sees the whole batch), so where the engine can, the pass over the
        prompts that sampling starts from keeps its graph and that forward continues it instead
        of running the prompts again (`engine.keep_prompt_pass`)."""
        ids, attn = input_ids.to(self.device), attention_mask.to(self.device)
        self._kept = None
        with self.adapter(POLICY):
            if for_training and self.keep_prompt_pass and self.engine.can_keep_prompt_pass(self.policy, ids.shape[1], sampling):
                with torch.enable_grad():
                    prompt = self.engine.prompt_pass(self.policy, ids, attn)
                self._kept = (ids, prompt)
                return self.engine.sample(self.policy, ids, attn, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id, prompt=prompt)
            return self.engine.sample(self.policy, ids, attn, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

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
