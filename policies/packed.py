"""A padding-free forward pass for Llama-family decoders (Llama, Mistral, Qwen2).

RLHF batches are ragged: prompts are left-padded to the longest one and completions
right-padded to the longest one, so a padded (B, T) batch runs every matmul on padding too.
On the benchmark's HH batches (prompts cut to their last 128 tokens, 93 on average, and 32
sampled tokens) a fifth of each row is padding. This forward runs the per-token work (the
projections, LoRA adapters, norms and MLPs: nearly all the FLOPs and nearly all the saved
activations) on the N real tokens only, as one (N, D) matrix, and scatters queries, keys and
values into the padded (B, H, T, d) layout just for the attention product, which is small.

Its projections run as the model's own modules (so LoRA adapters, 4-bit layers and the active
adapter all apply as usual), or, where every projection has a plain matrix form, on the same
matrices read from those modules: merged (W + s·B·A) for sampling and reward scoring, factored
(frozen stacked W, adapters as stacked A and block-diagonal B) for the other passes; see
`DenseLayer`. It uses the model's own rotary embedding, and its sdpa attention or an eager
attention with the same arithmetic (`grouped_eager_attention`), so on the real tokens it
computes what the model's padded forward computes (bit for bit through the modules, to
rounding through the merged or factored matrices).
`tests/test_packed.py` checks this against the transformers forward, with adapters, under
autocast and with activation checkpointing. Other architectures, and other attention kernels,
fall back to the transformers forward (`can_pack`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from policies.engine import HFEngine, completion_positions
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
    return _encoded_mask(allowed, kind, dtype)


def _encoded_mask(allowed: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the attention kind reads it: as it is for sdpa, else additive (0 where
    allowed, the dtype's lowest value elsewhere)."""
    if kind == "sdpa":
        return allowed
    zero, low = torch.zeros((), dtype=dtype, device=allowed.device), torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, low)


PACK_MULTIPLE = 64


def _packed_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Row-major positions of the real tokens, topped up with padding positions to a multiple of
    PACK_MULTIPLE (at most B·T). The count of real tokens changes from batch to batch; matmuls
    of ever-new sizes made the process's resident memory creep up from update to update
    (allocator and oneDNN caches keyed by size; docs/performance.md). The extra positions are
    padding: no real token attends to them, and their outputs are dropped."""
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
    exactly, on a tensor H/H_kv·T/L times smaller than the scores). The same softmax (fp32
    inside) and the same forward bits; under autocast the scores and the mask stay in bf16.
    query (B, H, T, d); key, value (B, H_kv, L, d); returns (B, T, H, d)."""
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
    if scores.dtype in (torch.bfloat16, torch.float16):
        # Low-precision scores (autocast's matmul), with the mask built in their dtype: torch's
        # softmax computes in fp32 and rounds once, the same bits as softmax in fp32 cast down
        # (test), without the fp32 copies; autograd keeps only these probabilities, which the
        # product with the values keeps anyway.
        probs = torch.softmax(scores, dim=-1)
    else:
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
    out = _Scatter.apply(t, index, B * T) if t.requires_grad and torch.is_grad_enabled() else t.new_zeros(B * T, *t.shape[1:]).index_copy(0, index, t)
    return out.view(B, T, *t.shape[1:]).transpose(1, 2)


class _Scatter(torch.autograd.Function):
    """Rows t (N, …) into rows `index` of a zero (M, …) tensor; the backward gathers them back.
    `index_copy` does the same, but its autograd formula keeps the whole source tensor alive
    for the backward (it uses it only for its shape): the queries and keys in fp32 after RoPE
    and the q/k/v projection's output, in every layer (docs/performance.md)."""

    @staticmethod
    def forward(ctx, t, index, rows):
        ctx.save_for_backward(index)
        return t.new_zeros(rows, *t.shape[1:]).index_copy_(0, index, t)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index] for distinct row indices, through `_Gather` where gradients flow."""
    return _Gather.apply(t, index) if t.requires_grad and torch.is_grad_enabled() else t.index_select(0, index)


class _Gather(torch.autograd.Function):
    """Rows `index` (distinct) of t. Autograd's backward of t[index] accumulates into zeros with
    index_put (it allows repeated indices), several times slower than the index_copy that
    distinct indices allow (docs/performance.md); once per layer and pass."""

    @staticmethod
    def forward(ctx, t, index):
        ctx.save_for_backward(index)
        ctx.rows = t.shape[0]
        return t.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, *grad.shape[1:]).index_copy_(0, index, grad), None


def _layer_forward(layer: Any, x: torch.Tensor, rot: Rotary, index: torch.Tensor, B: int, T: int, mask: torch.Tensor, attn_fn: Any, rope: Any, kv: list | None = None, dense: DenseLayer | None = None, rows: torch.Tensor | None = None, past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One decoder layer on the packed residual stream x (N, D); mirrors the transformers
    LlamaDecoderLayer / LlamaAttention forward, token for token. With `kv` (generation), the
    layer's keys (after RoPE) and values, padded (B, H_kv, T, d), are appended to it. With
    `dense` (merged or factored, see `DenseLayer`), the projections use its matrices instead of
    the modules. With `rows` (indices into x), the output projection and the MLP run on those
    rows only, and only they are returned (the last layer, where only some outputs are read).
    With `past` (keys and values (B, H_kv, P, d) of P earlier columns, `continued_hidden_states`),
    the T columns follow those: attention runs over the P + T keys, and `mask` is (B, 1, T, P + T)."""
    attn = layer.self_attn
    q, k, v = _rotated_qkv(layer, x, rot, rope, dense)
    K, V = _to_padded(k, index, B, T), _to_padded(v, index, B, T)
    if kv is not None:
        kv.append((K, V))
    if past is not None:
        K, V = torch.cat([past[0], K.to(past[0].dtype)], dim=2), torch.cat([past[1], V.to(past[1].dtype)], dim=2)
    out, _ = attn_fn(attn, _to_padded(q, index, B, T), K, V, mask, dropout=0.0, scaling=attn.scaling)
    if rows is not None:
        x, index = _gather_rows(x, rows), index[rows]
    return _output_and_mlp(layer, x, _gather_rows(out.reshape(B * T, -1), index), dense)  # out: (B, T, H, d)


def _rotated_qkv(layer: Any, x: torch.Tensor, rot: Rotary, rope: Any, dense: DenseLayer | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries and keys (after RoPE) and values, (n, H, d), of the residual-stream rows x (n, D)."""
    attn = layer.self_attn
    n, d = x.shape[0], attn.head_dim
    h = _normed(layer.input_layernorm, x)
    if dense is None:
        q, k, v = (proj(h).view(n, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = rope(q, k, rot.cos, rot.sin, unsqueeze_dim=1)
        return q, k, v
    nq, nk, nv = dense.qkv_sizes
    qk, v = dense.qkv(h).split((nq + nk, nv), dim=-1)
    q, k = _rotate(qk.view(n, -1, d), rot).split((nq // d, nk // d), dim=1)
    return q, k, v.view(n, -1, d)


class Rotary(NamedTuple):
    """The rotary angles of n positions: cos and sin (n, d) as the model's rotary embedding
    gives them (for its `apply_rotary_pos_emb`), and, made once per pass for every layer,
    cos broadcast over heads (n, 1, d) and sin likewise with its first half negated, so that
    the Llama family's rotate_half(x)·sin = cat(−x₂, x₁)·sin is roll(x, d/2)·signed_sin, with the
    same bits (−x₂·s = x₂·(−s) exactly)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos_h: torch.Tensor
    signed_sin_h: torch.Tensor


def _rotary(cos: torch.Tensor, sin: torch.Tensor) -> Rotary:
    h = sin.shape[-1] // 2
    return Rotary(cos, sin, cos[:, None], torch.cat([-sin[:, :h], sin[:, h:]], dim=-1)[:, None])


def _rotate(x: torch.Tensor, rot: Rotary) -> torch.Tensor:
    """The Llama-family rotary embedding, x·cos + rotate_half(x)·sin (`apply_rotary_pos_emb`),
    on the queries and keys side by side, x (n, H + H_kv, d), in cos's dtype: the same numbers,
    elementwise, as rotating each (a low-precision x is cast up first, exactly, as the mixed-dtype
    products would), in 5 operator calls instead of 14 per layer, and without mixed-dtype ones.
    rotate_half's two slices, negation and concatenation are one roll (`Rotary`), faster
    forward and backward (docs/performance.md)."""
    x = x.to(torch.promote_types(x.dtype, rot.cos.dtype))
    return x * rot.cos_h + x.roll(x.shape[-1] // 2, -1) * rot.signed_sin_h


def _output_and_mlp(layer: Any, x: torch.Tensor, attended: torch.Tensor, dense: DenseLayer | None = None) -> torch.Tensor:
    """The rest of the layer: output projection of the attention result (n, H·d) and residual,
    then the MLP block and residual."""
    if dense is None:
        x = x + layer.self_attn.o_proj(attended)
        h = _normed(layer.post_attention_layernorm, x)
        return x + layer.mlp(h)
    x = x + dense.o(attended)
    h = _normed(layer.post_attention_layernorm, x)
    gate_up = dense.gate_up(h)
    if gate_up.requires_grad and torch.is_grad_enabled():
        return x + _gated_down(layer.mlp.act_fn, gate_up, dense.down)
    gate, up = gate_up.chunk(2, dim=-1)
    return x + dense.down(layer.mlp.act_fn(gate) * up)


def _gated_down(act: Any, gate_up: torch.Tensor, down: Projection) -> torch.Tensor:
    """down(act(gate) ⊙ up) with gradients, keeping only gate_up for the backward (`_GatedDown`).
    The adapter factors enter in gate_up's dtype, as autocast would cast them."""
    a, b = (None, None) if down.a is None else (down.a.to(gate_up.dtype), down.b.to(gate_up.dtype))
    prepacked = down.prepacked if down.packed_dtype == gate_up.dtype else None
    return _GatedDown.apply(gate_up, down.weight.to(gate_up.dtype), None if down.bias is None else down.bias.to(gate_up.dtype), a, b, act, prepacked)


class _GatedDown(torch.autograd.Function):
    """The MLP's second half, y = p·Wᵀ + bias + (p·Aᵀ)·Bᵀ with p = act(gate) ⊙ up, for a frozen
    W. Autograd would keep act(gate) and p (each n × intermediate) besides gate_up; here the
    backward recomputes them from gate_up (two elementwise ops), so the MLP keeps half the
    memory (docs/performance.md).
    The forward's numbers are those of the plain ops, and the backward differentiates the same
    ops (by autograd, on the recomputed p)."""

    @staticmethod
    def forward(ctx, gate_up, weight, bias, a, b, act, prepacked=None):
        gate, up = gate_up.chunk(2, dim=-1)
        p = act(gate) * up
        if prepacked is None:
            y = F.linear(p, weight, bias)
        else:  # W kept prepacked (`prepack_frozen_projections`): F.linear's bits in bf16
            y = torch.ops.mkldnn._linear_pointwise(p, prepacked, bias, "none", [], "")
        xa = None
        if a is not None:
            y, xa = _plus_low_rank(y, p, a, b)
        ctx.save_for_backward(gate_up, weight, a, b, xa)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, grad):
        gate_up, weight, a, b, xa = ctx.saved_tensors
        grad = grad.to(gate_up.dtype)
        dp = grad @ weight
        da = db = None
        with torch.enable_grad():
            g_up = gate_up.detach().requires_grad_()
            gate, up = g_up.chunk(2, dim=-1)
            p = ctx.act(gate) * up
        if a is not None:
            dxa = grad @ b
            db = grad.t() @ xa
            da = dxa.t() @ p.detach()
            dp = dp.addmm_(dxa, a)
        (d_gate_up,) = torch.autograd.grad(p, g_up, dp)
        return d_gate_up, None, None, da, db, None, None


def _plus_low_rank(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y + (x·Aᵀ)·Bᵀ, x·Aᵀ) for rows x (n, in) and y (n, out), the sum made by the matmul that
    multiplies by B."""
    xa = F.linear(x, a)
    return torch.addmm(y, xa, b.t()), xa


@dataclass
class Projection:
    """x ↦ x·Wᵀ + b + (x·Aᵀ)·Bᵀ for rows x (n, in): a frozen weight W (out, in), possibly the
    stacked weights of several projections, its bias, and optionally LoRA factors A (R, in) and
    B (out, R), whose scales are folded into B. The low-rank term is added by the same `addmm`
    that multiplies by B, so the adapters of a projection cost two matmuls and no elementwise
    pass over the (n, out) output; peft's LoRA layer adds a scale, a sum and casts."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    prepacked: Any = None  # W in oneDNN's blocked layout: `prepack`, or kept (`prepack_frozen_projections`)
    packed_dtype: torch.dtype | None = None  # the dtype W was packed in; inputs of another dtype use `weight`

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.a is None:
            return y
        return _plus_low_rank(y, x, self.a, self.b)[0]

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ + b: from the prepacked W where there is one for x's dtype (with gradients for x
        through `_PrepackedLinear`, which needs `weight` too), else by F.linear."""
        if self.prepacked is None or (x.dtype != self.packed_dtype and self.weight is not None):
            return F.linear(x, self.weight, self.bias)
        if self.weight is not None and x.requires_grad and torch.is_grad_enabled():
            return _PrepackedLinear.apply(x, self.prepacked, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.prepacked, self.bias, "none", [], "")

    def prepack(self, rows: int) -> None:
        """Reorder a bf16 or fp32 CPU weight without adapter factors, once, into oneDNN's blocked
        layout for matmuls of about `rows` rows (then any number of rows may follow). F.linear
        reorders a bf16 weight on every call, and runs fp32 through MKL, whose kernels on this
        project's CPU (AMD EPYC) are slower than oneDNN's; prepacked, a decoding step's
        matmuls and its LM head take less time, in bf16 and more so in fp32
        (docs/performance.md). The reorder has a cost of its own, so it pays where one packing
        serves many calls: sampling (a prefill and a step per token). bf16 gives F.linear's bits
        (test); fp32 sums in another order, so results differ from F.linear by rounding (about
        1e-7 relative): the sampler's choices only, never a log-prob that PPO uses."""
        if _can_prepack(self.weight, self.bias) and self.a is None:
            self.prepacked, self.packed_dtype = _packed(self.weight, rows), self.weight.dtype
            self.weight = None


class _PrepackedLinear(torch.autograd.Function):
    """x·Wᵀ + b for a frozen W, forward from W prepacked (oneDNN's blocked layout, the same bits
    as F.linear in bf16), backward dx = dy·W from W as stored, as F.linear's own backward."""

    @staticmethod
    def forward(ctx, x, prepacked, weight, bias):
        ctx.save_for_backward(weight)
        return torch.ops.mkldnn._linear_pointwise(x, prepacked, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad.to(weight.dtype) @ weight, None, None, None


def _packed(w: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)


def _can_prepack(w: torch.Tensor | None, bias: torch.Tensor | None = None) -> bool:
    return (w is not None and w.device.type == "cpu" and w.dtype in (torch.bfloat16, torch.float32) and w.dim() == 2
            and (bias is None or bias.dtype == w.dtype)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@dataclass
class DenseLayer:
    """One decoder layer's projections as `Projection`s: q/k/v stacked into one, o, gate/up
    stacked into one, and down. Two kinds are built:
    - merged (`dense_layers`, passes without gradients: sampling, reward scoring): each active
      LoRA adapter merged into its base weight (W + s·B·A) in the compute dtype, made for the
      call. A decoding step runs 4 matmuls per layer instead of 7 base matmuls plus 7 adapters
      (two small matmuls, a scale and an add each): about 30 fewer operator calls per adapted
      layer and token.
    - factored (`factored_layers`, every other pass, training included): the frozen base
      weights as they are stored, stacked in place (`stack_frozen_projections`), and the active
      adapters' A matrices stacked and B matrices set block-diagonally, so each group of
      projections costs one base matmul and two small ones."""

    qkv: Projection
    qkv_sizes: tuple[int, int, int]
    o: Projection
    gate_up: Projection
    down: Projection

    def prepack(self, rows: int) -> None:
        """`Projection.prepack` each of the layer's four projections."""
        for proj in (self.qkv, self.o, self.gate_up, self.down):
            proj.prepack(rows)


def _dense_parts(proj: Any) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor, float]]] | None:
    """What `proj` applies as it stands, as a base weight (out, in), a bias, and the LoRA terms
    (B, A, scale) of its active adapters: the weight `proj` computes with is W + Σ s·B·A. None
    where no such matrix is at hand: a quantized or otherwise non-Linear base layer, a LoRA
    variant (DoRA, ...), a LoRA bias, LoRA dropout in training mode, transposed (fan-in-fan-out)
    weights, or adapters merged into the base while disabled."""
    from peft.tuners.lora import LoraLayer

    if type(proj) is torch.nn.Linear:
        return proj.weight, proj.bias, []
    if not isinstance(proj, LoraLayer) or getattr(proj, "fan_in_fan_out", False):
        return None
    base = proj.get_base_layer()
    if type(base) is not torch.nn.Linear:
        return None
    if proj.merged:
        return None if proj.disable_adapters else (base.weight, base.bias, [])
    if proj.disable_adapters:
        return base.weight, base.bias, []
    terms = []
    for name in proj.active_adapters:
        if name not in proj.lora_A:
            continue
        if name in getattr(proj, "lora_variant", {}) or getattr(proj, "lora_bias", {}).get(name, False):
            return None
        dropout = proj.lora_dropout[name]
        if dropout.training and getattr(dropout, "p", 0.0) > 0:  # a random mask on x: no fixed matrix
            return None
        terms.append((proj.lora_B[name].weight, proj.lora_A[name].weight, float(proj.scaling[name])))
    return base.weight, base.bias, terms


def _stacked(parts: list, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parts' merged weights stacked by rows into one (Σ out, in) matrix in `dtype`, each
    written in place as W + s·B·A by one matmul-add (no full-size temporaries), and their biases
    (zeros for a part without one), or None when no part has a bias."""
    rows = [w.shape[0] for w, _, _ in parts]
    out = torch.empty(sum(rows), parts[0][0].shape[1], dtype=dtype, device=parts[0][0].device)
    for dst, (w, _, terms) in zip(out.split(rows), parts):
        if not terms:
            dst.copy_(w)
            continue
        (b, a, scale), *rest = terms
        torch.addmm(w.to(dtype), b.to(dtype), a.to(dtype), alpha=scale, out=dst)
        for b, a, scale in rest:
            dst.addmm_(b.to(dtype), a.to(dtype), alpha=scale)
    bias = _stacked_bias(parts)
    return out, None if bias is None else bias.to(dtype)


_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def _groups(layer: Any) -> list[list[Any]]:
    """The layer's projections in `DenseLayer` order: [q, k, v], [o], [gate, up], [down]."""
    attn, mlp = layer.self_attn, layer.mlp
    return [[getattr(attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else mlp, name) for name in g] for g in _GROUPS]


@torch.no_grad()
def dense_layers(layers: Any, dtype: torch.dtype) -> list[DenseLayer] | None:
    """Merged `DenseLayer`s for every layer in `dtype`, or None when some projection has no dense
    form (`_dense_parts`); the sampler then runs the modules themselves."""
    out = []
    for layer in layers:
        found = [[_dense_parts(p) for p in g] for g in _groups(layer)]
        if any(f is None for g in found for f in g):
            return None
        qkv, o, gate_up, down = (Projection(*_stacked(g, dtype)) for g in found)
        out.append(DenseLayer(qkv, tuple(w.shape[0] for w, _, _ in found[0]), o, gate_up, down))
    return out


def factored_layers(layers: Any) -> list[DenseLayer] | None:
    """Factored `DenseLayer`s (see there) for a pass with or without gradients, or None where
    the modules must run instead: a projection with no W + Σ s·B·A form (`_dense_parts`), a
    trainable base weight (full fine-tuning), or a group whose frozen weights are not stacked in
    memory (`stack_frozen_projections` has not run). The A and B stacks are built from the
    adapters' own parameters on each call (a few small ops), so gradients reach them."""
    out = []
    for layer in layers:
        groups = _frozen_groups(layer)
        if groups is None:
            return None
        kept = getattr(layer, "_rlhf_prepacked", None) or {}
        projections = []
        for i, (w, parts) in enumerate(groups):
            factors = _stacked_factors(parts)
            if factors is None:
                return None
            bias = _stacked_bias(parts)
            projections.append(Projection(w, bias, *factors, *_kept_pack(kept.get(i), w, bias)))
        qkv, o, gate_up, down = projections
        out.append(DenseLayer(qkv, tuple(w.shape[0] for w, _, _ in groups[0][1]), o, gate_up, down))
    return out


def _frozen_groups(layer: Any) -> list[tuple[torch.Tensor, list]] | None:
    """The layer's projection groups (`_groups`) as (frozen base weight of the group, one stacked
    (Σ out, in) view; each projection's `_dense_parts`), or None where a projection has no dense
    form, a base weight trains, or a group's weights are not stacked in memory."""
    found = [[_dense_parts(p) for p in g] for g in _groups(layer)]
    if any(f is None or f[0].requires_grad for g in found for f in g):
        return None
    weights = [_stacked_view([w for w, _, _ in g]) for g in found]
    return None if any(w is None for w in weights) else list(zip(weights, found))


def _weight_key(w: torch.Tensor) -> tuple:
    """What identifies a weight's current values: its memory, shape, dtype and version (which
    every in-place change bumps)."""
    return (w.data_ptr(), tuple(w.shape), w.dtype, w._version)


def _kept_pack(kept: tuple | None, w: torch.Tensor, bias: torch.Tensor | None) -> tuple[Any, torch.dtype | None]:
    """A kept prepacked copy of the frozen group weight w (`prepack_frozen_projections`) while
    it still holds w's values, else (None, None)."""
    if kept is None or kept[0] != _weight_key(w) or (bias is not None and bias.dtype != w.dtype):
        return None, None
    return kept[1], w.dtype


PASS_ROWS = 1024  # the row count passes over a batch are prepacked for (any count may follow)


@torch.no_grad()
def prepack_frozen_projections(model: Any) -> int:
    """Keep a copy of each layer's frozen base weights (the groups `factored_layers` runs: q/k/v
    stacked, o, gate/up stacked, down) reordered once into oneDNN's blocked layout, beside the
    weights themselves (the backward still reads those): every factored pass, with or without
    gradients, then runs its base matmuls from the copies. On this project's CPU a bf16 matmul
    of about 1,000 rows takes less time prepacked (F.linear reorders the weight on every call),
    with the same bits, and there are four such passes per PPO update (reference, policy and
    critic forwards). The cost is one more copy of the base's matmul weights (figures:
    docs/performance.md). A copy is used only while its weight is unchanged (same memory, same
    version). Returns the number of weights packed."""
    if not can_pack(model):
        return 0
    count = 0
    for layer in _parts(model)[1]:
        kept = {}
        for i, (w, g) in enumerate(_frozen_groups(layer) or []):
            if _can_prepack(w, _stacked_bias(g)):
                kept[i] = (_weight_key(w), _packed(w, PASS_ROWS))
                count += 1
        layer._rlhf_prepacked = kept
    return count


def _stacked_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The (Σ out, in) matrix that the row-contiguous weights make up where each starts right
    after the previous one in one storage (as `stack_frozen_projections` lays them out), as a
    view; None otherwise."""
    w0 = weights[0].detach()
    if len(weights) == 1:
        return w0
    ptr, rows = w0.data_ptr(), 0
    for w in weights:
        if w.dtype != w0.dtype or w.dim() != 2 or w.shape[1] != w0.shape[1] or not w.is_contiguous() or w.data_ptr() != ptr:
            return None
        if w.untyped_storage().data_ptr() != w0.untyped_storage().data_ptr():
            return None
        ptr += w.numel() * w.element_size()
        rows += w.shape[0]
    return w0.as_strided((rows, w0.shape[1]), (w0.shape[1], 1), w0.storage_offset())


def _stacked_bias(parts: list) -> torch.Tensor | None:
    """The parts' biases end to end (zeros for a part without one), or None when none has one."""
    if all(bias is None for _, bias, _ in parts):
        return None
    return torch.cat([bias if bias is not None else w.new_zeros(w.shape[0]) for w, bias, _ in parts])


def _stacked_factors(parts: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The LoRA terms of a group of projections as one A (R, in), every term's A stacked, and one
    block-diagonal B (Σ out, R) with each scale folded in: x·Aᵀ·Bᵀ is then each projection's
    Σ s·(x·Aᵀ)·Bᵀ side by side. (None, None) where no adapter is active."""
    if not any(terms for _, _, terms in parts):
        return None, None
    a = torch.cat([a for _, _, terms in parts for _, a, _ in terms])
    blocks = [torch.cat([b * s for b, _, s in terms], dim=1) if terms else w.new_zeros(w.shape[0], 0, dtype=a.dtype) for w, _, terms in parts]
    return a, torch.block_diag(*blocks)


@torch.no_grad()
def stack_frozen_projections(model: Any) -> int:
    """Lay out the frozen base weights of each layer's q/k/v projections, and of its gate/up
    projections, one after the other in one new storage each, the modules' weights becoming
    views into it: the same values and memory, and `factored_layers` can then run each group as
    one matmul without copying. Plain frozen Linear base layers of one dtype only (quantized or
    trainable ones stay as they are). Returns the number of groups stacked."""
    if not can_pack(model):
        return 0
    stacked = 0
    for layer in _parts(model)[1]:
        qkv, _, gate_up, _ = _groups(layer)
        for g in (qkv, gate_up):
            bases = [p.get_base_layer() if hasattr(p, "get_base_layer") else p for p in g]
            if any(type(b) is not torch.nn.Linear or b.weight.requires_grad or b.weight.dtype != bases[0].weight.dtype for b in bases):
                continue
            if _stacked_view([b.weight for b in bases]) is not None:
                continue
            storage = torch.cat([b.weight.detach() for b in bases])
            for b, w in zip(bases, storage.split([b.weight.shape[0] for b in bases])):
                b.weight = torch.nn.Parameter(w, requires_grad=False)
            stacked += 1
    return stacked


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm of fp32 rows x. Llama, Mistral and Qwen2 norms compute
    w · (x · rsqrt(mean(x²) + ε)); torch's fused rms_norm gives the same bits for fp32 x and w
    (tests) with one operator call instead of seven (`mean` alone is a sum, a scalar copy and a
    division)."""
    eps, w = getattr(norm, "variance_epsilon", None), getattr(norm, "weight", None)
    if eps is None or w is None or x.dtype != torch.float32 or w.dtype != torch.float32 or type(norm).__name__ not in _RMS_NORMS:
        return norm(x)
    return F.rms_norm(x, w.shape, w, eps)


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _normed(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The norm's output as the projections read it: `_rms_norm` then `_amp_input`. With
    gradients, for a frozen fp32 RMSNorm weight without zeros, through `_RMSNormForMatmul`."""
    w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if (torch.is_grad_enabled() and x.requires_grad and w is not None and eps is not None and not w.requires_grad
            and x.dtype == torch.float32 and w.dtype == torch.float32 and type(norm).__name__ in _RMS_NORMS and _no_zeros(norm)):
        return _RMSNormForMatmul.apply(x, w, eps, _compute_dtype(x))
    return _amp_input(_rms_norm(norm, x))


def _no_zeros(norm: Any) -> bool:
    """Whether the norm's frozen weight has no zeros, checked once per weight value (a check per
    call would be a host synchronisation per norm on a GPU)."""
    w = norm.weight
    key = _weight_key(w)
    kept = norm.__dict__.get("_rlhf_no_zeros")
    if kept is None or kept[0] != key:
        kept = norm._rlhf_no_zeros = (key, bool((w != 0).all()))
    return kept[1]


class _RMSNormForMatmul(torch.autograd.Function):
    """h = (w ⊙ x·r).to(dtype), r = rsqrt(mean(x²) + ε): the Llama-family RMSNorm, op for op (same
    bits), cast to the dtype its projections compute in. Autograd would keep the fp32 input x
    for the backward, one fp32 row per token, twice per layer (docs/performance.md). This keeps
    h instead (the projections keep it anyway) and
    r, and recovers x·r = h / w in the backward, to h's precision: dx = r·(w⊙g − x̂·mean(x̂⊙w⊙g)).
    For a frozen w with no zeros."""

    @staticmethod
    def forward(ctx, x, w, eps, dtype):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        h = (w * (x * r)).to(dtype)
        ctx.save_for_backward(h, w, r)
        return h

    @staticmethod
    def backward(ctx, grad):
        h, w, r = ctx.saved_tensors
        x_hat = h.float() / w
        wg = grad.float() * w
        return r * (wg - x_hat * (x_hat * wg).mean(-1, keepdim=True)), None, None, None


def _amp_input(h: torch.Tensor) -> torch.Tensor:
    """The norm's fp32 output in the autocast dtype, cast once for the projections that read it
    (autocast would cast it again for each matmul: the same numbers, one copy per call)."""
    if h.dtype == torch.float32 and torch.is_autocast_enabled(h.device.type):
        return h.to(torch.get_autocast_dtype(h.device.type))
    return h


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on the residual stream x compute in, and so that of the attention
    scores: autocast's, else x's. The norms' outputs are cast to it, and the additive mask is
    built in it, so that adding it keeps the scores in that dtype (an fp32 mask would promote
    bf16 scores to an fp32 copy): 0 leaves a score unchanged, and the dtype's lowest value
    still sends a masked score's probability to exactly 0."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _parts(model: Any) -> tuple[Any, Any, Any, Any]:
    """The decoder, its layers, the attention function and the rotary helper of a packable model."""
    lm = unwrap_causal_lm(model)
    decoder = lm.model
    first = decoder.layers[0].self_attn
    attn_fn = _attention_function(lm.config._attn_implementation, first)
    rope = sys.modules[type(first).__module__].apply_rotary_pos_emb
    return decoder, decoder.layers[: lm.config.num_hidden_layers], attn_fn, rope


def _packed_inputs(decoder: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, ...]:
    """The packed positions (`_packed_index`) of columns `start`… of (B, T) rows, their
    embeddings (N, D), rotary angles (N, d), and the (B, 1, T - start, T) attention mask of those
    columns over all T (the earlier columns: a kept prompt pass, `continued_hidden_states`)."""
    run = attention_mask[:, start:]
    index = _packed_index(run)
    x = decoder.embed_tokens(input_ids[:, start:].reshape(-1)[index])
    pos = positions_of(attention_mask)[:, start:].reshape(-1)[index]
    cos, sin = decoder.rotary_emb(x[None], pos[None])
    mask = _attention_mask(attention_mask, decoder.config._attn_implementation, _compute_dtype(x))[:, :, start:]
    return index, x, _rotary(cos[0], sin[0]), mask


def packed_hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, merge_weights: bool | str = False, read: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (B, T, D) of a packable decoder (`can_pack`), computed on the real
    tokens only; padding positions hold zeros. Positions restart at each row's first real token.
    With `read` (B, T) bool, only those positions are computed through the last layer's output
    projection and MLP (every position's keys and values still are), and the others hold zeros:
    PPO reads the C completion positions of about 120 per row, a reward model one, so the last
    layer skips most of its matmul work (docs/performance.md).
    With `merge_weights`, a pass without gradients runs on merged dense weights
    (`dense_layers`, made for this call): the same function up to rounding, without the
    adapters' extra operators. Made for one pass of about 1,000 rows they are not prepacked:
    the reorders cost what the faster matmuls save, in bf16 and in fp32 (docs/performance.md).
    With `merge_weights="keep"` (a frozen reward model scoring batch after batch) they are made
    once, prepacked, and kept on the model for the next passes while every weight they were
    made from is unchanged (`_kept_dense`). Any other pass runs on the factored layers where
    they exist (`factored_layers`: frozen stacked base weights, adapters as stacked low-rank
    factors), else on the modules."""
    decoder, layers, attn_fn, rope = _parts(model)
    B, T = input_ids.shape
    if merge_weights and not torch.is_grad_enabled():
        dense = _kept_dense(model, layers, input_ids.device) if merge_weights == "keep" else _dense_for(layers, input_ids.device)
    else:
        dense = factored_layers(layers)
    index, x, rot, mask = _packed_inputs(decoder, input_ids, attention_mask)
    topped_up = index.numel() > int(attention_mask.sum())  # padding positions among the rows (`_packed_index`)
    rows = None if read is None else read.reshape(-1).to(index.device)[index].nonzero().squeeze(-1)
    with _lora_inputs_as_given(model) if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext():
        for i, (layer, dl) in enumerate(zip(layers, dense or [None] * len(layers))):
            args = (x, rot, index, B, T, mask, attn_fn, rope, None, dl, rows if i == len(layers) - 1 else None)
            if getattr(layer, "_rlhf_checkpointed", False) and torch.is_grad_enabled():
                x = run_checkpointed(layer, functools.partial(_layer_forward, layer), *args)
            else:
                x = _layer_forward(layer, *args)
    if rows is not None:
        index = index[rows]
    return _unpacked(_rms_norm(decoder.norm, x), index, attention_mask, topped_up)


def _unpacked(x: torch.Tensor, index: torch.Tensor, attention_mask: torch.Tensor, topped_up: bool) -> torch.Tensor:
    """Packed rows x (n, D) at positions `index` of a (B, T) batch, as (B, T, D) with zeros at
    the other positions; `topped_up`: padding positions were packed too (`_packed_index`), and
    their rows are zeroed by the mask."""
    B, T = attention_mask.shape
    out = x.new_zeros(B * T, x.shape[-1]).index_copy(0, index, x).view(B, T, -1)
    return out * attention_mask[..., None].to(out.dtype) if topped_up else out


@dataclass
class PromptPass:
    """A forward pass over a batch of left-padded prompts (B, P), kept with its autograd graph
    (`prompt_pass`): each layer's keys (after RoPE) and values (B, H_kv, P, d), and the final
    hidden state (after the final norm) of each row's last prompt token (B, D), which predicts
    the first completion token. The sampler starts from it instead of a prefill of its own
    (`packed_generate`), and the PPO step continues it over the completions
    (`continued_hidden_states`): the prompts' share of the policy's training forward, computed
    once instead of twice. Valid while the parameters it was computed with are unchanged
    (`versions`)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last: torch.Tensor
    attention_mask: torch.Tensor
    versions: tuple[int, ...]

    def rows(self, idx: list[int] | torch.Tensor) -> PromptPass:
        """The pass for rows `idx` (distinct), in that order; gradients flow back to those rows."""
        idx = torch.as_tensor(idx, device=self.last.device)
        if torch.equal(idx, torch.arange(self.last.shape[0], device=idx.device)):
            return self
        pick = functools.partial(_gather_rows, index=idx)
        return PromptPass([pick(k) for k in self.keys], [pick(v) for v in self.values], pick(self.last),
                          self.attention_mask[idx.to(self.attention_mask.device)], self.versions)


def _versions(model: Any) -> tuple[int, ...]:
    """The version counters of the model's parameters, which an in-place update (an optimizer
    step) bumps."""
    return tuple(p._version for p in model.parameters())


def prompt_pass(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptPass:
    """The `PromptPass` of a packable model (`can_pack`) over left-padded prompts (B, P), on the
    projections a training pass uses (factored where they exist, else the modules), with
    gradients where they are enabled. The last layer runs its output projection and MLP on the
    last tokens only."""
    if attention_mask[:, -1].min() < 1:
        raise ValueError("prompts must be left-padded: every row's last column must be a real token")
    with _lora_inputs_as_given(model) if torch.is_autocast_enabled(input_ids.device.type) else contextlib.nullcontext():
        kv, last = _prefill(model, input_ids, attention_mask, factored_layers(_parts(model)[1]))
    # Kept in the dtype attention reads them in (autocast's): the same numbers, cast once.
    dtype = _compute_dtype(last)
    return PromptPass([k.to(dtype) for k, _ in kv], [v.to(dtype) for _, v in kv], last, attention_mask, _versions(model))


def _prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, dense: list[DenseLayer] | None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Each layer's keys (after RoPE) and values (B, H_kv, P, d) over left-padded prompts (B, P),
    and the final hidden state (after the final norm) of each row's last token (B, D); the last
    layer runs its output projection and MLP on those tokens only."""
    decoder, layers, attn_fn, rope = _parts(model)
    B, P = input_ids.shape
    index, x, rot, mask = _packed_inputs(decoder, input_ids, attention_mask)
    last = torch.searchsorted(index, torch.arange(B, device=index.device) * P + P - 1)  # each row's last prompt token
    kv: list = []
    for i, (layer, dl) in enumerate(zip(layers, dense or [None] * len(layers))):
        x = _layer_forward(layer, x, rot, index, B, P, mask, attn_fn, rope, kv, dl, last if i == len(layers) - 1 else None)
    return kv, _rms_norm(decoder.norm, x)


def continued_hidden_states(model: Any, prompt: PromptPass, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states (B, C, D) at positions P-1 … P+C-2 of (B, P + C) rows whose first
    P columns are the prompts of `prompt` (the same rows in the same order): the states that
    predict the C completion tokens, which `packed_hidden_states` with `read` at those positions
    gives, up to rounding. Only the completion columns run through the layers, attending to the
    prompt pass's keys and values, and gradients flow on into that pass's graph. The last column
    predicts nothing and does not run; completion padding positions hold zeros."""
    decoder, layers, attn_fn, rope = _parts(model)
    B, P = prompt.attention_mask.shape
    if input_ids.shape[0] != B or input_ids.shape[1] <= P or not torch.equal(attention_mask[:, :P], prompt.attention_mask.to(attention_mask.device)):
        raise ValueError("continued_hidden_states: the rows' prompt columns are not those of the prompt pass")
    if _versions(model) != prompt.versions:
        raise ValueError("continued_hidden_states: the parameters changed since the prompt pass ran (an optimizer step?)")
    first = prompt.last[:, None]
    full = attention_mask[:, :-1]  # (B, P + C - 1)
    C1 = full.shape[1] - P
    if C1 == 0:
        return first
    dense = factored_layers(layers)
    index, x, rot, mask = _packed_inputs(decoder, input_ids[:, :-1], full, P)  # mask (B, 1, C - 1, P + C - 1)
    cm = full[:, P:]
    with _lora_inputs_as_given(model) if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext():
        for i, (layer, dl) in enumerate(zip(layers, dense or [None] * len(layers))):
            x = _layer_forward(layer, x, rot, index, B, C1, mask, attn_fn, rope, None, dl, None, (prompt.keys[i], prompt.values[i]))
    out = _unpacked(_rms_norm(decoder.norm, x), index, cm, index.numel() > int(cm.sum()))
    return torch.cat([first.to(out.dtype), out], dim=1)


def _dense_for(layers: Any, device: torch.device) -> list[DenseLayer] | None:
    """`dense_layers` in the dtype the matmuls run in: the autocast dtype, else the weights'."""
    return dense_layers(layers, _dense_dtype(layers, device))


def _dense_dtype(layers: Any, device: torch.device) -> torch.dtype:
    amp = torch.is_autocast_enabled(device.type)
    return torch.get_autocast_dtype(device.type) if amp else layers[0].self_attn.o_proj.weight.dtype


def _kept_dense(model: Any, layers: Any, device: torch.device) -> list[DenseLayer] | None:
    """Merged `DenseLayer`s kept on the model between passes, prepacked: remade only when a
    weight or adapter they come from has changed (memory or version), another set of adapters
    is active, or the compute dtype differs. For a frozen LoRA reward model on the policy's base
    this saves the merge and runs every matmul prepacked (less time in bf16, the same bits) in
    each scoring pass, for one kept copy of the merged weights (docs/performance.md)."""
    dtype = _dense_dtype(layers, device)
    key = [dtype]
    for layer in layers:
        for g in _groups(layer):
            for p in g:
                parts = _dense_parts(p)
                if parts is None:
                    return None
                w, bias, terms = parts
                key.append((_weight_key(w), None if bias is None else _weight_key(bias), [(_weight_key(b), _weight_key(a), s) for b, a, s in terms]))
    owner = unwrap_causal_lm(model)
    kept = owner.__dict__.get("_rlhf_kept_dense")
    if kept is not None and kept[0] == key:
        return kept[1]
    owner._rlhf_kept_dense = None  # free the old copy before making the new one
    dense = dense_layers(layers, dtype)
    for dl in dense or []:
        dl.prepack(PASS_ROWS)
    owner._rlhf_kept_dense = (key, dense)
    return dense


def _decode_layer(layer: Any, x: torch.Tensor, rot: Rotary, K: torch.Tensor, V: torch.Tensor, col: int, mask: torch.Tensor, attn_fn: Any, rope: Any, dense: DenseLayer | None = None) -> torch.Tensor:
    """One decoder layer for one new token per row: x (B, D); K, V (B, H_kv, L, d) buffers whose
    column `col` receives this token's key and value. Attention runs over the whole buffers, and
    `mask` (B, 1, 1, L) hides the columns not yet written (`packed_generate` opens each column at
    its step): a slice of the first col + 1 columns
    is a strided matrix that the matmul copies first, slower than the whole buffer
    (docs/performance.md). Same result up to rounding: the masked columns add exact
    zeros, in another summation order."""
    q, k, v = _rotated_qkv(layer, x, rot, rope, dense)
    K[:, :, col] = k
    V[:, :, col] = v
    out, _ = attn_fn(layer.self_attn, q[:, :, None], K, V, mask, dropout=0.0, scaling=layer.self_attn.scaling)
    return _output_and_mlp(layer, x, out.reshape(x.shape[0], -1), dense)


def _head_for(lm: Any, rows: int, prepack: bool) -> Any:
    """The LM head for sampling: prepacked (`Projection.prepack`) where it is a plain bf16 or
    fp32 Linear whose weight is in the dtype its matmul runs in (the autocast dtype, else its
    own), fed its input in that dtype; else the module itself. A frozen head's packed copy is
    kept on the model for the next call while its weight and bias are unchanged (same memory,
    same version): SmolLM2-135M's head is 54 MiB in bf16, above glibc's 32 MiB mmap ceiling, so
    each fresh copy came back as new pages, and packing into them cost every PPO update's
    rollout far more than packing into warm memory (docs/performance.md). A trained head (full
    fine-tuning) is packed afresh per call."""
    head = lm.get_output_embeddings()
    if not prepack or type(head) is not torch.nn.Linear or not _can_prepack(head.weight):
        return head
    dev = head.weight.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != head.weight.dtype:
        return head
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        proj = Projection(head.weight, head.bias)
        proj.prepack(rows)
    else:
        key = (_weight_key(head.weight), None if head.bias is None else _weight_key(head.bias))
        kept = lm.__dict__.get("_rlhf_kept_head")
        if kept is not None and kept[0] == key:
            proj = kept[1]
        else:
            lm._rlhf_kept_head = None  # free the old copy before making the new one
            proj = Projection(head.weight, head.bias)
            proj.prepack(rows)
            lm._rlhf_kept_head = (key, proj)
    return lambda h: proj(_amp_input(h))


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / τ), after top-k / top-p filtering (transformers'
    own warpers), by the Gumbel-max trick: argmax(z + G), G = −log(−log U), U ~ Uniform(0, 1),
    is an exact sample of softmax(z). torch.multinomial draws an exponential per vocabulary
    entry, several times slower per step than drawing the uniforms (docs/performance.md)."""
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
def packed_generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int, temperature: float, top_k: int = 0, top_p: float = 1.0, eos_token_id: int, pad_token_id: int, merge_weights: bool = True, prompt: PromptPass | None = None) -> torch.Tensor:
    """Sample up to `max_new_tokens` per left-padded prompt row; returns (B, P + C) like
    transformers' `generate`: prompt, then the sampled tokens, `pad_token_id` after a row's EOS,
    stopping once every row has ended. For packable models (`can_pack`) only.

    The prompt is prefilled padding-free, and each step runs the model's own modules on one
    token per row against preallocated key/value buffers. transformers' `generate` adds a
    sizeable share to each step on this project's CPU (attention-mask rebuilding, cache
    concatenation, stopping-criteria checks and multinomial sampling; docs/performance.md).

    With `merge_weights` (and projections that have a dense form, `dense_layers`), it samples
    from one merged copy of the layers' matmul weights in the compute dtype, prepacked
    (`Projection.prepack`, as is the LM head), made at the start and freed at the end (its size:
    docs/performance.md). The numbers differ from the adapters' by rounding only
    (W + s·B·A rounded once against W·x + s·B·(A·x)); PPO recomputes every log-prob it uses
    with the modules themselves.

    With `prompt` (a `PromptPass` over these prompts), sampling starts from its keys, values and
    last hidden states instead of a prefill of its own."""
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
    amp = torch.is_autocast_enabled(dev.type)
    dense = _dense_for(layers, dev) if merge_weights else None
    for dl in dense or []:
        dl.prepack(B)
    dense_or_none = dense if dense is not None else [None] * len(layers)
    kv_dtype = torch.get_autocast_dtype(dev.type) if amp else None
    with _lora_inputs_as_given(model) if amp else contextlib.nullcontext():
        # prefill: the prompts' real tokens, keys and values kept per layer
        if prompt is None:
            prefilled, h_last = _prefill(model, input_ids, attention_mask, dense)
        else:
            if tuple(prompt.attention_mask.shape) != (B, P) or not torch.equal(prompt.attention_mask.to(dev), attention_mask):
                raise ValueError("packed_generate: the prompt pass is not over these prompts")
            prefilled = [(K.detach(), V.detach()) for K, V in zip(prompt.keys, prompt.values)]
            h_last = prompt.last.detach()
        caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        for K, V in prefilled:
            # Kept in the autocast dtype: attention casts keys and values to it on every read,
            # so storing them cast gives the same numbers without re-casting the whole cache.
            Kb = K.new_zeros(B, K.shape[1], L, K.shape[3], dtype=kv_dtype or K.dtype)
            Vb = V.new_zeros(B, V.shape[1], L, V.shape[3], dtype=kv_dtype or V.dtype)
            Kb[:, :, :P], Vb[:, :, :P] = K, V
            caches.append((Kb, Vb))
        del prefilled
        head = _head_for(lm, B, merge_weights)
        logits = head(h_last).float()
        # The new token's row of the mask: the real prompt keys, then each sampled key from its step on.
        seen = torch.cat([attention_mask.bool(), attention_mask.new_zeros(B, max_new_tokens, dtype=torch.bool)], dim=1)
        dmask = _encoded_mask(seen[:, None, None, :], kind, _compute_dtype(h_last)).clone()  # (B, 1, 1, L), written below
        visible = _encoded_mask(seen.new_ones(()), kind, dmask.dtype)
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
            dmask[..., P + t] = visible
            x = decoder.embed_tokens(tok)
            cos, sin = decoder.rotary_emb(x[None], (next_pos + t)[None])
            rot = _rotary(cos[0], sin[0])
            for layer, (Kb, Vb), dl in zip(layers, caches, dense_or_none):
                x = _decode_layer(layer, x, rot, Kb, Vb, P + t, dmask, attn_fn, rope, dl)
            logits = head(_rms_norm(decoder.norm, x)).float()
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)


# ----------------------------------------------------------------------------------------------
# The engine (policies.engine): the padding-free path where it applies, transformers' elsewhere
# ----------------------------------------------------------------------------------------------


class PackedEngine(HFEngine):
    """The `packed` engine: Llama-family models run padding-free (`packed_hidden_states`,
    `packed_generate`), on merged or factored matrices, prepacked for oneDNN on the CPU; any
    other model, or a sequence longer than a sliding window, runs as `HFEngine` does. It can
    also keep the policy's pass over the prompts from sampling for the first training forward
    (`prompt_pass`, `continued_hidden_states`). Settings: `rlhf.config.EngineConfig`; the
    measurements behind them: docs/performance.md."""

    name = "packed"

    def __init__(self, device: torch.device, merge_weights: bool = True, prepack_frozen: bool = True) -> None:
        self.device = torch.device(device)
        self.merge_weights = merge_weights
        self.prepack_frozen = prepack_frozen

    def hidden_states(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, read: torch.Tensor | None = None, frozen: bool = False) -> torch.Tensor:
        if not can_pack(model, input_ids.shape[1]):
            return super().hidden_states(model, input_ids, attention_mask, read=read, frozen=frozen)
        # A frozen LoRA model's merged weights are a copy anyway: keep them (prepacked) for the
        # next call; a frozen full model's are merged for the pass only.
        merge: bool | str = False
        if frozen and self.merge_weights:
            merge = "keep" if hasattr(model, "disable_adapter") else True
        return packed_hidden_states(model, input_ids, attention_mask, merge, read)

    def completion_logits(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        if not can_pack(model, input_ids.shape[1]):
            return super().completion_logits(model, input_ids, attention_mask, prompt_width)
        hidden = packed_hidden_states(model, input_ids, attention_mask, read=completion_positions(input_ids.shape, prompt_width, input_ids.device))
        return unwrap_causal_lm(model).get_output_embeddings()(hidden[:, prompt_width - 1 : -1])

    @torch.no_grad()
    def sample(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Any, *, eos_token_id: int, pad_token_id: int, prompt: PromptPass | None = None) -> torch.Tensor:
        """`Engine.sample`; with `prompt` (`prompt_pass` of these prompts), sampling starts from
        it instead of a prefill of its own."""
        if not can_pack(model, input_ids.shape[1] + sampling.max_new_tokens):
            if prompt is not None:
                raise ValueError("a kept prompt pass needs the padding-free sampler (can_keep_prompt_pass)")
            return super().sample(model, input_ids, attention_mask, sampling, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        return packed_generate(model, input_ids, attention_mask, max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_k=sampling.top_k, top_p=sampling.top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                               merge_weights=self.merge_weights, prompt=prompt)

    def prepare_frozen(self, model: Any) -> None:
        """Stack each layer's frozen q/k/v and gate/up weights in memory (one matmul per group),
        and on the CPU with `prepack_frozen` keep them prepacked too."""
        stack_frozen_projections(model)
        if self.prepack_frozen and self.device.type == "cpu":
            prepack_frozen_projections(model)

    def can_keep_prompt_pass(self, model: Any, prompt_width: int, sampling: Any) -> bool:
        """The padding-free sampler runs here, without activation checkpointing (whose point is
        not to keep a pass's activations)."""
        if not can_pack(model, prompt_width + sampling.max_new_tokens):
            return False
        return not any(getattr(layer, "_rlhf_checkpointed", False) for layer in _parts(model)[1])

    def prompt_pass(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PromptPass:
        return prompt_pass(model, input_ids, attention_mask)

    def continued_logits(self, model: Any, prompt: PromptPass, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`completion_logits` of rows whose prompts `prompt` ran (`continued_hidden_states`)."""
        hidden = continued_hidden_states(model, prompt, input_ids, attention_mask)
        return unwrap_causal_lm(model).get_output_embeddings()(hidden)

    def metrics(self) -> dict[str, float]:
        return heap_metrics() if self.device.type == "cpu" else {}


# ----------------------------------------------------------------------------------------------
# The CPU process: allocator and oneDNN settings, heap metrics (glibc on Linux only)
# ----------------------------------------------------------------------------------------------


def configure_cpu_process() -> None:
    """Settings for a process that runs the packed engine on the CPU; called once, when the
    engine is built (never at import).

    - oneDNN keeps every matmul primitive it has made, keyed by shapes, up to 1,024, each with
      its own buffers; RLHF passes change length from batch to batch, so the cache (and the
      heap) kept growing. Capped at 64 (docs/performance.md). It takes effect only where it is
      set before torch's first CPU matmul; a value the user set wins.
    - glibc keeps freed blocks in the heap (`keep_freed_memory`)."""
    import os

    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed blocks (up to its 32 MiB mmap ceiling) in the heap
    instead of returning them to the OS: a training step frees and re-allocates the same
    activation buffers every step, and with the default thresholds each comes back as fresh
    pages that fault in and get zeroed again (docs/performance.md). No-op where libc isn't glibc."""
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


@functools.lru_cache(maxsize=1)
def _mallinfo2() -> Any:
    try:
        fn = _libc().mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def heap_metrics() -> dict[str, float]:
    """The process's heap as glibc's allocator sees it, in MiB: `memory/heap_in_use_mib`, the
    bytes in live allocations (large mmapped blocks included), and `memory/heap_free_mib`, the
    freed bytes it keeps (`keep_freed_memory`). A live heap that grows from update to update is
    a leak or an unbounded cache; the free part is what fragmentation costs on top. Empty where
    libc isn't glibc 2.33 or newer."""
    fn = _mallinfo2()
    if fn is None:
        return {}
    info = fn()
    return {"memory/heap_in_use_mib": (info.uordblks + info.hblkhd) / 2**20, "memory/heap_free_mib": info.fordblks / 2**20}
