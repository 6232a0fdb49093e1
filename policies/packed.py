"""A padding-free forward pass for Llama-family decoders (Llama, Mistral, Qwen2).

RLHF batches are ragged: prompts are left-padded to the longest one and completions
right-padded to the longest one, so a padded (B, T) batch runs every matmul on padding too.
On the benchmark's HH batches (prompts cut to their last 128 tokens, 93 on average, and 32
sampled tokens) a fifth of each row is padding. This forward runs the per-token work (the
projections, LoRA adapters, norms and MLPs: nearly all the FLOPs and nearly all the saved
activations) on the N real tokens only, as one (N, D) matrix, and scatters queries, keys and
values into the padded (B, H, T, d) layout just for the attention product, which is small.

It calls the model's own modules (so LoRA adapters, 4-bit layers and the active adapter all
apply as usual), the model's own rotary embedding, and its sdpa attention or an eager attention
with the same arithmetic (`grouped_eager_attention`), so on the real tokens it computes what
the model's padded forward computes.
`tests/test_packed.py` checks this against the transformers forward, with adapters, under
autocast and with activation checkpointing. Other architectures, and other attention kernels,
fall back to the transformers forward (`can_pack`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from typing import Any, Iterator

import torch

from policies.models import run_checkpointed, unwrap_causal_lm
from rlhf.core import position_ids as positions_of

PACKABLE_MODEL_TYPES = ("llama", "mistral", "qwen2")


def can_pack(model: Any, seq_len: int | None = None) -> bool:
    """Whether `packed_hidden_states` reproduces this model's forward: a Llama-family decoder
    (pre-norm attention and gated MLP, rotary positions, no embedding scale), eager or sdpa
    attention, and full attention in every layer for sequences of this length."""
    cfg = unwrap_causal_lm(model).config
    if getattr(cfg, "model_type", None) not in PACKABLE_MODEL_TYPES:
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    if getattr(cfg, "use_sliding_window", False):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (seq_len is None or seq_len > window):
        return False
    decoder = getattr(unwrap_causal_lm(model), "model", None)
    return all(hasattr(decoder, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb"))


@contextlib.contextmanager
def _lora_inputs_as_given(model: Any) -> Iterator[None]:
    """peft casts a LoRA layer's input to the adapter's dtype (fp32) before `lora_A`; under
    autocast, `lora_A` then casts it back to bf16. The packed forward hands every projection a
    bf16 input once, so that cast would only add a copy per adapter; switch it off meanwhile."""
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    before = [m.cast_input_dtype_enabled for m in layers]
    for m in layers:
        m.cast_input_dtype_enabled = False
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.cast_input_dtype_enabled = b


def _attention_mask(attention_mask: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T): query i sees key j ≤ i when j is a real token. A padding query sees itself
    only (its output is never read), so that no row is empty: an all-masked row is NaN under
    sdpa, and a NaN in a row the loss never reads still poisons dK and dV in the backward."""
    B, T = attention_mask.shape
    dev = attention_mask.device
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=dev)
    if kind == "sdpa":
        return allowed
    zero, low = torch.zeros((), dtype=dtype, device=dev), torch.full((), torch.finfo(dtype).min, dtype=dtype, device=dev)
    return torch.where(allowed, zero, low)


PACK_MULTIPLE = 64


def _packed_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row-major positions of the real tokens, topped up with padding positions to a multiple of
    PACK_MULTIPLE (at most B·T). The count of real tokens changes from batch to batch; matmuls
    of ever-new sizes made the process's resident memory creep up by 60-80 MB per PPO update
    (allocator and oneDNN caches keyed by size). The extra positions are padding: no real token
    attends to them, and their outputs are dropped."""
    flat = attention_mask.reshape(-1).bool()
    n = int(flat.sum())
    target = min(flat.numel(), -(-n // PACK_MULTIPLE) * PACK_MULTIPLE)
    if target > n:
        flat = flat.clone()
        flat[(~flat).nonzero().squeeze(-1)[: target - n]] = True
    return flat.nonzero().squeeze(-1)


def grouped_eager_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor, scaling: float, dropout: float = 0.0, **_: Any) -> tuple[torch.Tensor, None]:
    """transformers' eager attention, softmax(q·kᵀ·s + mask)·v, with the query heads that share
    a key/value head stacked into one matrix instead of copying keys and values once per query
    head (repeat_kv), and the scale applied to q when it is a power of two (q·kᵀ·2ᵏ = (q·2ᵏ)·kᵀ
    exactly, on a tensor H/H_kv·T/L times smaller than the scores). Same softmax in fp32, same
    dtypes under autocast. query (B, H, T, d); key, value (B, H_kv, L, d); returns (B, T, H, d)."""
    B, H, T, d = query.shape
    Hk, L = key.shape[1], key.shape[2]
    g = H // Hk
    exact = math.frexp(scaling)[0] == 0.5  # a power of two
    if exact:
        query = query * scaling
    scores = torch.matmul(query.reshape(B, Hk, g * T, d), key.transpose(-1, -2))  # (B, Hk, g·T, L)
    if not exact:
        scores = scores * scaling
    scores = scores.view(B, H, T, L) + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(B, Hk, g * T, L), value)  # (B, Hk, g·T, d)
    return out.view(B, H, T, d).transpose(1, 2), None


def _attention_function(kind: str, module: Any) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if kind == "eager":
        return grouped_eager_attention
    return ALL_ATTENTION_FUNCTIONS.get_interface(kind, sys.modules[type(module).__module__].eager_attention_forward)


def _to_padded(t: torch.Tensor, index: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(N, H, d) real-token rows → (B, H, T, d) with zeros at padding."""
    out = t.new_zeros(B * T, *t.shape[1:]).index_copy(0, index, t)
    return out.view(B, T, *t.shape[1:]).transpose(1, 2)


def _layer_forward(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor, B: int, T: int, mask: torch.Tensor, attn_fn: Any, rope: Any, kv: list | None = None) -> torch.Tensor:
    """One decoder layer on the packed residual stream x (N, D); mirrors the transformers
    LlamaDecoderLayer / LlamaAttention forward, token for token. With `kv` (generation), the
    layer's keys (after RoPE) and values, padded (B, H_kv, T, d), are appended to it."""
    attn = layer.self_attn
    q, k, v = _rotated_qkv(layer, x, cos, sin, rope)
    K, V = _to_padded(k, index, B, T), _to_padded(v, index, B, T)
    if kv is not None:
        kv.append((K, V))
    out, _ = attn_fn(attn, _to_padded(q, index, B, T), K, V, mask, dropout=0.0, scaling=attn.scaling)
    return _output_and_mlp(layer, x, out.reshape(B * T, -1)[index])  # out: (B, T, H, d)


def _rotated_qkv(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys (after RoPE) and values, (n, H, d), of the residual-stream rows x (n, D)."""
    attn = layer.self_attn
    n, d = x.shape[0], attn.head_dim
    h = _amp_input(layer.input_layernorm(x))
    q, k, v = (proj(h).view(n, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    q, k = rope(q, k, cos, sin, unsqueeze_dim=1)
    return q, k, v


def _output_and_mlp(layer: Any, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of the layer: output projection of the attention result (n, H·d) and residual,
    then the MLP block and residual."""
    x = x + layer.self_attn.o_proj(attended)
    h = _amp_input(layer.post_attention_layernorm(x))
    return x + layer.mlp(h)


def _amp_input(h: torch.Tensor) -> torch.Tensor:
    """The norm's fp32 output in the autocast dtype, cast once for the projections that read it
    (autocast would cast it again for each matmul: the same numbers, one copy per call)."""
    if h.dtype == torch.float32 and torch.is_autocast_enabled(h.device.type):
        return h.to(torch.get_autocast_dtype(h.device.type))
    return h


def _parts(model: Any) -> tuple[Any, Any, Any, Any]:
    """The decoder, its layers, the attention function and the rotary helper of a packable model."""
    lm = unwrap_causal_lm(model)
    decoder = lm.model
    first = decoder.layers[0].self_attn
    attn_fn = _attention_function(lm.config._attn_implementation, first)
    rope = sys.modules[type(first).__module__].apply_rotary_pos_emb
    return decoder, decoder.layers[: lm.config.num_hidden_layers], attn_fn, rope


def _packed_inputs(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The packed positions (`_packed_index`), their embeddings (N, D), rotary cos and sin
    (N, d), and the (B, 1, T, T) attention mask."""
    index = _packed_index(attention_mask)
    x = decoder.embed_tokens(input_ids.reshape(-1)[index])
    pos = positions_of(attention_mask).reshape(-1)[index]
    cos, sin = decoder.rotary_emb(x[None], pos[None])
    mask = _attention_mask(attention_mask, decoder.config._attn_implementation, x.dtype)
    return index, x, cos[0], sin[0], mask


def packed_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states (B, T, D) of a packable decoder (`can_pack`), computed on the real
    tokens only; padding positions hold zeros. Positions restart at each row's first real token."""
    decoder, layers, attn_fn, rope = _parts(model)
    B, T = input_ids.shape
    index, x, cos, sin, mask = _packed_inputs(decoder, input_ids, attention_mask)
    with _lora_inputs_as_given(model) if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext():
        for layer in layers:
            args = (x, cos, sin, index, B, T, mask, attn_fn, rope)
            if getattr(layer, "_rlhf_checkpointed", False) and torch.is_grad_enabled():
                x = run_checkpointed(layer, functools.partial(_layer_forward, layer), *args)
            else:
                x = _layer_forward(layer, *args)
    x = decoder.norm(x)
    out = x.new_zeros(B * T, x.shape[-1]).index_copy(0, index, x).view(B, T, -1)
    return out * attention_mask[..., None].to(out.dtype) if index.numel() > int(attention_mask.sum()) else out


def _decode_layer(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, K: torch.Tensor, V: torch.Tensor, col: int, mask: torch.Tensor, attn_fn: Any, rope: Any) -> torch.Tensor:
    """One decoder layer for one new token per row: x (B, D); K, V (B, H_kv, L, d) buffers whose
    column `col` receives this token's key and value; attention over columns 0 … col."""
    q, k, v = _rotated_qkv(layer, x, cos, sin, rope)
    K[:, :, col] = k
    V[:, :, col] = v
    out, _ = attn_fn(layer.self_attn, q[:, :, None], K[:, :, : col + 1], V[:, :, : col + 1], mask[..., : col + 1], dropout=0.0, scaling=layer.self_attn.scaling)
    return _output_and_mlp(layer, x, out.reshape(x.shape[0], -1))


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / τ), after top-k / top-p filtering (transformers'
    own warpers), by the Gumbel-max trick: argmax(z + G), G = −log(−log U), U ~ Uniform(0, 1),
    is an exact sample of softmax(z). torch.multinomial draws an exponential per vocabulary
    entry, which took 8 ms per step for 8 × 49152 logits here; uniforms take under 2 ms."""
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits / temperature
    if top_k and top_k > 0:
        from transformers.generation.logits_process import TopKLogitsWarper

        z = TopKLogitsWarper(top_k)(None, z)
    if top_p < 1.0:
        from transformers.generation.logits_process import TopPLogitsWarper

        z = TopPLogitsWarper(top_p)(None, z)
    gumbel = torch.rand_like(z).log_().neg_().log_().neg_()
    return (z + gumbel).argmax(-1)


@torch.no_grad()
def packed_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Sample up to `max_new_tokens` per left-padded prompt row; returns (B, P + C) like
    transformers' `generate`: prompt, then the sampled tokens, `pad_token_id` after a row's EOS,
    stopping once every row has ended. For packable models (`can_pack`) only.

    The prompt is prefilled padding-free, and each step runs the model's own modules on one
    token per row against preallocated key/value buffers. transformers' `generate` adds about
    20 ms a step on this project's CPU (attention-mask rebuilding, cache concatenation,
    stopping-criteria checks and multinomial sampling) to a 60–80 ms step of SmolLM2-135M."""
    B, P = input_ids.shape
    L = P + max_new_tokens
    if not can_pack(model, L):
        raise ValueError("packed_generate needs a packable model (policies.packed.can_pack)")
    if attention_mask[:, -1].min() < 1:
        raise ValueError("prompts must be left-padded: every row's last column must be a real token")
    dev = input_ids.device
    lm = unwrap_causal_lm(model)
    decoder, layers, attn_fn, rope = _parts(model)
    kind = lm.config._attn_implementation
    with _lora_inputs_as_given(model) if torch.is_autocast_enabled(dev.type) else contextlib.nullcontext():
        # prefill: the prompts' real tokens, keys and values kept per layer
        index, x, cos, sin, mask = _packed_inputs(decoder, input_ids, attention_mask)
        caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for layer in layers:
            kv: list = []
            x = _layer_forward(layer, x, cos, sin, index, B, P, mask, attn_fn, rope, kv)
            K, V = kv[0]
            Kb = K.new_zeros(B, K.shape[1], L, K.shape[3])
            Vb = V.new_zeros(B, V.shape[1], L, V.shape[3])
            Kb[:, :, :P], Vb[:, :, :P] = K, V
            caches.append((Kb, Vb))
        last = torch.searchsorted(index, torch.arange(B, device=dev) * P + P - 1)  # each row's last prompt token
        head = lm.get_output_embeddings()
        logits = head(decoder.norm(x[last])).float()
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], dim=1)
        dmask = _attention_mask(full_mask, kind, x.dtype)[:, :, -1:]  # the last row sees every real key
        next_pos = positions_of(attention_mask)[:, -1] + 1
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        out = []
        for t in range(max_new_tokens):
            tok = _sample(logits, temperature, top_k, top_p)
            tok = torch.where(finished, torch.full_like(tok, pad_token_id), tok)
            out.append(tok)
            finished |= tok == eos_token_id
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            x = decoder.embed_tokens(tok)
            cos, sin = decoder.rotary_emb(x[None], (next_pos + t)[None])
            for layer, (Kb, Vb) in zip(layers, caches):
                x = _decode_layer(layer, x, cos[0], sin[0], Kb, Vb, P + t, dmask, attn_fn, rope)
            logits = head(decoder.norm(x)).float()
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)
