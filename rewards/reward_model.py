"""BT / GRM reward models: a causal-LM backbone plus a scalar head on the final hidden state
of the last non-pad token.

The LM head stays attached (frozen): GRM regularizes the shared hidden states through it
(Yang et al. 2024), and one backbone pass yields both the reward (from the last token) and the
response log-probs (from the completion positions). A saved reward model is a directory:

    reward_model.json   what to rebuild: base model, dtype/quantization, LoRA or full, head, text settings
    head.safetensors    the reward head
    adapter/            the LoRA adapter (peft, safetensors)      — LoRA/QLoRA training
    backbone/           the whole fine-tuned backbone + tokenizer — full fine-tuning
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from policies.engine import Engine
from policies.engine_choice import build_engine
from policies.hub import resolve_model_path
from policies.models import autocast, autocast_dtype, load_model, unwrap_causal_lm
from policies.text import Encoded, encode_completions, render_prompt
from rewards.base import RewardProvider, RewardResult
from rlhf.config import LoraConfig, ModelConfig, doc
from rlhf.core import last_token_index, masked_sum, token_logprobs
from rlhf.data import Prompt
from rlhf.io import atomic_write_json

HeadType = Literal["linear", "mlp"]
FORMAT = "pluggable-rlhf/reward-model"
FORMAT_VERSION = 1


class RewardHead(nn.Module):
    """h (…, D) → r (…). `linear`: one Linear(D, 1). `mlp`: the GRM paper's head, Dropout(0.1) →
    Linear(D, 1024) → ReLU → Linear(1024, 1) (Yang et al. 2024, appendix on implementation)."""

    def __init__(self, hidden_size: int, kind: HeadType = "linear") -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Dropout(0.1), nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Linear(1024, 1))
        else:
            raise ValueError(f"unknown head {kind!r}; expected 'linear' or 'mlp'")
        out = self.net[-1]
        # Zero output layer: every reward starts at exactly 0 and BT at log 2, so the first steps
        # learn preferences instead of undoing a random head. The usual std 1/√(D+1) init
        # (OpenRLHF, TRL) assumes unit-scale features; SmolLM2-135M's final hidden state has a
        # norm of about 47 (RMS 2 per dimension), so that init starts rewards at std ≈ 2 and the
        # BT loss above log 2. On the quickstart the zero-init model also scored higher on the
        # held-out pairs (docs/results/quickstart_tuning.md).
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    @property
    def bias(self) -> torch.Tensor:
        """The final bias: shifting it shifts every reward (used to centre rewards)."""
        return self.net[-1].bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # A bf16 backbone feeds an fp32 head; under autocast the Linear layers run in bf16 anyway.
        return self.net(hidden.to(self.net[-1].weight.dtype)).squeeze(-1)


@dataclass(frozen=True)
class RewardModelMeta:
    """Everything needed to rebuild a saved reward model and score text the way it was trained."""

    base_model: str
    dtype: str = "float32"
    quantization: str = "none"
    lora: bool = True
    head: str = "linear"
    hidden_size: int = 0
    objective: str = "bt"
    chat_template: bool = True
    max_prompt_tokens: int = 256
    max_completion_tokens: int = 128
    trust_remote_code: bool = False
    revision: str | None = None


class RewardModel(nn.Module):
    """Backbone (possibly peft-wrapped) + reward head + the tokenizer that goes with them."""

    def __init__(self, lm: Any, head: RewardHead, tokenizer: Any, meta: RewardModelMeta, engine: Engine) -> None:
        super().__init__()
        self.lm = lm
        self.head = head
        self.tokenizer = tokenizer
        self.meta = meta
        self.engine = engine  # how the backbone runs (policies.engine)
        self._frozen_reference: Any = None  # full fine-tuning's DPO reference, made on demand
        # GRM regularizes the hidden states through a fixed LM head. With tied embeddings (SmolLM2)
        # this also freezes the input embeddings under full fine-tuning; LoRA never trains them.
        for p in self.lm_head.parameters():
            p.requires_grad_(False)

    # --- the backbone's parts --------------------------------------------------------------
    @property
    def is_peft(self) -> bool:
        return hasattr(self.lm, "disable_adapter")

    @property
    def causal_lm(self) -> Any:
        return unwrap_causal_lm(self.lm)

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.head.bias.device

    # --- forward pieces ----------------------------------------------------------------------
    def hidden_states(self, enc: Encoded, model: Any | None = None, read: torch.Tensor | None = None, frozen: bool = False) -> torch.Tensor:
        """Final hidden states (B, T, D) of the encoded rows (of `model`, default the backbone);
        `read` and `frozen`: see policies.engine.Engine.hidden_states."""
        ids, attn = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        return self.engine.hidden_states(self.lm if model is None else model, ids, attn, read=read, frozen=frozen)

    def rewards_from_hidden(self, hidden: torch.Tensor, enc: Encoded) -> torch.Tensor:
        """r(x, y) (B,) float32 from the hidden state of each row's last real token."""
        last = last_token_index(enc.attention_mask.to(hidden.device))  # (B,)
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, D)
        return self.head(h_last).float()

    def completion_logps_from_hidden(self, hidden: torch.Tensor, enc: Encoded, lm_head: nn.Module | None = None) -> torch.Tensor:
        """Σ_t log π(y_t | x, y_<t) over completion tokens, (B,), computed from the same hidden
        states as the reward. Only completion positions go through the LM head."""
        P = enc.prompt_width
        logits = (lm_head or self.lm_head)(hidden[:, P - 1 : -1])  # (B, C, V)
        targets = enc.input_ids[:, P:].to(hidden.device)  # (B, C)
        lp = token_logprobs(logits, targets)
        return masked_sum(lp, enc.completion_mask[:, P:].to(hidden.device))

    @torch.no_grad()
    def reference_completion_logps(self, enc: Encoded) -> torch.Tensor:
        """log π_ref(y|x), (B,): the backbone with its adapters disabled (LoRA), or a frozen copy
        of the backbone as it was before training (full fine-tuning)."""
        if self.is_peft:
            with self.lm.disable_adapter():
                return self.completion_logps_from_hidden(self.hidden_states(enc), enc)
        if self._frozen_reference is None:
            raise RuntimeError("full fine-tuning DPO needs freeze_reference() before the first update")
        ref = self._frozen_reference
        hidden = self.hidden_states(enc, model=ref)
        return self.completion_logps_from_hidden(hidden, enc, lm_head=ref.get_output_embeddings())

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current backbone as the DPO reference (full fine-tuning)."""
        if not self.is_peft and self._frozen_reference is None:
            self._frozen_reference = copy.deepcopy(self.causal_lm).eval().requires_grad_(False)

    def forward(self, enc: Encoded, frozen: bool = False) -> torch.Tensor:
        # the head reads each row's last real token: the last layer's MLP runs for those alone
        attn = enc.attention_mask.to(self.device)
        read = torch.zeros(attn.shape, dtype=torch.bool, device=self.device)
        read[torch.arange(attn.shape[0], device=self.device), last_token_index(attn)] = True
        return self.rewards_from_hidden(self.hidden_states(enc, read=read, frozen=frozen), enc)

    # --- text → tensors ------------------------------------------------------------------------
    def encode(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> Encoded:
        texts = [render_prompt(self.tokenizer, p, chat=self.meta.chat_template) for p in prompts]
        return encode_completions(
            self.tokenizer,
            texts,
            completions,
            max_prompt_tokens=self.meta.max_prompt_tokens,
            max_completion_tokens=self.meta.max_completion_tokens,
        )

    # --- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the directory described in the module docstring (safetensors only)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.is_peft:
            self.lm.save_pretrained(path / "adapter")
        else:
            self.lm.save_pretrained(path / "backbone")
            self.tokenizer.save_pretrained(path / "backbone")
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(path / "head.safetensors"))
        atomic_write_json(path / "reward_model.json", {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self.meta)})
        return path


def new_reward_model(
    model_cfg: ModelConfig,
    head: HeadType = "linear",
    *,
    objective: str = "bt",
    chat_template: bool = True,
    max_prompt_tokens: int = 256,
    max_completion_tokens: int = 128,
) -> RewardModel:
    """A fresh reward model to train: the backbone as `model_cfg` says (full, LoRA or QLoRA)
    and a newly initialised head (from the global RNG: seed it first for a reproducible run)."""
    loaded = load_model(model_cfg)
    hidden = loaded.model.config.get_text_config().hidden_size
    base_name = model_cfg.name if not Path(model_cfg.name).is_dir() else str(Path(model_cfg.name).resolve())
    meta = RewardModelMeta(
        base_model=base_name,
        dtype=model_cfg.dtype,
        quantization=model_cfg.quantization,
        lora=model_cfg.lora.enabled,
        head=head,
        hidden_size=hidden,
        objective=objective,
        chat_template=chat_template,
        max_prompt_tokens=max_prompt_tokens,
        max_completion_tokens=max_completion_tokens,
        trust_remote_code=model_cfg.trust_remote_code,
        revision=model_cfg.revision,
    )
    engine = build_engine(model_cfg.engine, loaded.model, loaded.device)
    return RewardModel(loaded.model, RewardHead(hidden, head).to(loaded.device), loaded.tokenizer, meta, engine)


def read_reward_model_meta(path: str | Path) -> RewardModelMeta:
    """The `reward_model.json` of a saved reward model, checked strictly."""
    path = Path(path)
    meta_file = path / "reward_model.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not a reward model directory (no reward_model.json); train one with `rlhf train-rm`")
    raw = json.loads(meta_file.read_text())
    if raw.pop("format", None) != FORMAT or raw.pop("version", None) != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: not a {FORMAT} v{FORMAT_VERSION} file")
    known = set(RewardModelMeta.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{meta_file}: unknown fields {sorted(unknown)}")
    return RewardModelMeta(**raw)


def load_reward_head(path: str | Path, meta: RewardModelMeta) -> RewardHead:
    from safetensors.torch import load_file

    head = RewardHead(meta.hidden_size, meta.head)  # type: ignore[arg-type]
    head.load_state_dict(load_file(str(Path(path) / "head.safetensors")))
    return head


def load_reward_model(path: str | Path, *, device: str = "auto", trainable: bool = False) -> RewardModel:
    """Rebuild a reward model saved by `RewardModel.save`."""
    path = Path(path)
    meta = read_reward_model_meta(path)
    if meta.lora:
        cfg = ModelConfig(
            name=meta.base_model, dtype=meta.dtype, quantization=meta.quantization, device=device,  # type: ignore[arg-type]
            trust_remote_code=meta.trust_remote_code, revision=meta.revision,
            lora=LoraConfig(enabled=True, path=str(path / "adapter")),
        )
    else:
        cfg = ModelConfig(
            name=str(path / "backbone"), dtype=meta.dtype, quantization=meta.quantization,  # type: ignore[arg-type]
            device=device, trust_remote_code=meta.trust_remote_code,
        )
    loaded = load_model(cfg)
    engine = build_engine(cfg.engine, loaded.model, loaded.device)
    rm = RewardModel(loaded.model, load_reward_head(path, meta).to(loaded.device), loaded.tokenizer, meta, engine)
    rm.eval()
    if not trainable:
        rm.requires_grad_(False)
    return rm


class AdapterRewardModel(RewardModel):
    """A LoRA reward model that lives as a frozen adapter on another peft model's base (the
    PPO policy's, DESIGN.md "Single-GPU layout"): one copy of the base weights serves policy,
    reference, critic and reward. `use_adapter(name)` is a context manager that activates the
    adapter and restores the previous one."""

    def __init__(self, lm: Any, head: RewardHead, tokenizer: Any, meta: RewardModelMeta, engine: Engine, adapter_name: str, use_adapter: Any) -> None:
        super().__init__(lm, head, tokenizer, meta, engine)
        self.adapter_name = adapter_name
        self._use_adapter = use_adapter

    def hidden_states(self, enc: Encoded, model: Any | None = None, read: torch.Tensor | None = None, frozen: bool = False) -> torch.Tensor:
        with self._use_adapter(self.adapter_name):
            return super().hidden_states(enc, model, read, frozen)


# --------------------------------------------------------------------------------------------
# The provider
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardModelProviderConfig:
    type: Literal["bt", "grm"] = doc("bt", "a trained BT or GRM reward model (both score with their reward head)")
    path: str = doc("", "directory written by `rlhf train-rm`")
    batch_size: int = doc(8, "(prompt, completion) rows scored per forward pass")
    device: str = doc("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', ...")
    autocast: Literal["auto", "bfloat16", "none"] = doc("auto", "bf16 autocast: 'auto' uses it where the hardware has fast bf16")
    name: str | None = doc(None, "name in logs (default: the type)")


class RewardModelProvider(RewardProvider):
    """Scores with a trained reward model's head. Rows are batched in length order (less padding)."""

    def __init__(self, model: RewardModel, *, batch_size: int = 8, autocast_mode: str = "auto", name: str = "bt") -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.amp = autocast_dtype(autocast_mode, model.device)
        self.name = name

    @torch.no_grad()
    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> RewardResult:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        n = len(prompts)
        rewards = torch.zeros(n, dtype=torch.float32)
        lengths = [len(c) + len(str(p)) for p, c in zip(prompts, completions)]
        order = sorted(range(n), key=lengths.__getitem__)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.model.encode([prompts[i] for i in idx], [completions[i] for i in idx])
            with autocast(self.model.device, self.amp):
                # a frozen model: the engine may cache work between batches and calls
                rewards[idx] = self.model(enc, frozen=True).float().cpu()
        return RewardResult(rewards, torch.ones(n, dtype=torch.bool))

    def shared_adapter(self) -> str | None:
        return getattr(self.model, "adapter_name", None)


def load_reward_model_provider(cfg: RewardModelProviderConfig, host: Any = None) -> RewardModelProvider:
    """The provider for a saved reward model. With `host` (`ActorCritic`): a LoRA reward model
    trained on the host's own base (same quantization, same autocast, same device) runs as a
    frozen `reward` adapter on that base, so no second copy of the base is loaded."""
    if not cfg.path:
        raise ValueError(f"a '{cfg.type}' reward provider needs `path`: a directory written by `rlhf train-rm`")
    if host is not None and cfg.device in ("auto", host.device.type):
        meta = read_reward_model_meta(cfg.path)
        base = resolve_model_path(meta.base_model, meta.revision)
        if meta.lora and host.can_host_adapter(base, meta.quantization, autocast_dtype(cfg.autocast, host.device)):
            lm = host.host_frozen_adapter(Path(cfg.path) / "adapter", "reward")
            head = load_reward_head(cfg.path, meta).to(host.device).requires_grad_(False)
            rm = AdapterRewardModel(lm, head, host.tokenizer, meta, host.engine, "reward", host.adapter).eval()
            return RewardModelProvider(rm, batch_size=cfg.batch_size, autocast_mode=cfg.autocast, name=cfg.name or cfg.type)
    rm = load_reward_model(cfg.path, device=cfg.device)
    return RewardModelProvider(rm, batch_size=cfg.batch_size, autocast_mode=cfg.autocast, name=cfg.name or cfg.type)
