"""The padding-free forward (policies.packed) against the transformers padded forward: same
hidden states on every real token and same gradients, with LoRA adapters, under bf16 autocast,
with activation checkpointing, for Llama and Qwen2; and the fall-back for other models."""

from __future__ import annotations

import copy

import pytest
import torch

from policies.models import apply_lora, autocast, enable_activation_checkpointing, unwrap_causal_lm
from policies.packed import PackedEngine
from policies.packed import can_pack, packed_hidden_states
from rlhf.config import LoraConfig
from rlhf.core import position_ids


def _tiny(kind: str, attn: str = "eager", **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    extra = {"hidden_size": 32, **extra}
    common = dict(vocab_size=97, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **extra)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))  # q/k/v carry biases
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.config._attn_implementation = attn
    return model.eval()


def _batch(B: int = 4, T: int = 12):
    """Ragged rows: left padding (prompts) and right padding (finished completions), one row full."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, -3:] = 0
    mask[2, :2] = 0
    mask[2, -1:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _padded_hidden(model, ids, mask):
    return unwrap_causal_lm(model).model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).last_hidden_state


def _with_lora(model, stacked: bool = False):
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking adapter (B = 0 would hide the adapter path)
    if stacked:  # the frozen q/k/v and gate/up weights side by side: passes run factored layers
        from policies.packed import _parts, factored_layers, stack_frozen_projections

        assert stack_frozen_projections(peft) == 2 * len(_parts(peft)[1])
        assert factored_layers(_parts(peft)[1]) is not None
    return peft


@pytest.mark.parametrize("multiple", [1, 64])
@pytest.mark.parametrize("kind, attn, stacked", [("llama", "eager", False), ("llama", "sdpa", False), ("qwen2", "eager", False), ("llama", "eager", True), ("qwen2", "eager", True)])
def test_packed_hidden_states_match_the_padded_forward(kind, attn, stacked, multiple, monkeypatch):
    """multiple 1: real tokens only; 64: topped up with padding positions (all of them here).
    stacked: the factored layers (stacked frozen weights, adapters as stacked factors)."""
    import policies.packed

    monkeypatch.setattr(policies.packed, "PACK_MULTIPLE", multiple)
    model = _with_lora(_tiny(kind, attn), stacked)
    ids, mask = _batch()
    assert can_pack(model, ids.shape[1])
    with torch.no_grad():
        packed, padded = packed_hidden_states(model, ids, mask), _padded_hidden(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    assert (packed[~real] == 0).all()  # padding positions hold zeros, never leftovers


@pytest.mark.parametrize("hidden", [32, 64])  # head_dim 8: scale 8^-½; head_dim 16: scale ¼, folded into q
def test_packed_forward_under_bf16_autocast_is_the_padded_one_bit_for_bit(hidden):
    model = _with_lora(_tiny("llama", hidden_size=hidden))
    ids, mask = _batch()
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        packed, padded = packed_hidden_states(model, ids, mask), _padded_hidden(model, ids, mask)
    real = mask.bool()
    assert torch.equal(packed[real], padded[real])
    # peft's input casting is switched off only for the duration of the packed pass
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


@pytest.mark.parametrize("kind, stacked", [("llama", False), ("llama", True), ("qwen2", True)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_match_the_padded_forward(checkpointing, kind, stacked):
    base = _tiny(kind)
    if checkpointing:
        enable_activation_checkpointing(base)
    model = _with_lora(base, stacked)
    ids, mask = _batch()
    real = mask.bool()
    w = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(2))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn(model, ids, mask)[real] * w[real]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    g_packed, g_padded = grads(packed_hidden_states), grads(_padded_hidden)
    assert g_packed.keys() == g_padded.keys() and len(g_packed) > 0
    for n in g_packed:
        torch.testing.assert_close(g_packed[n], g_padded[n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(g.abs().sum() > 0 for n, g in g_packed.items() if "lora_A" in n)


@pytest.mark.parametrize("stacked", [False, True])
def test_reading_some_positions_gives_their_states_and_gradients_and_zeros_elsewhere(monkeypatch, stacked):
    """`read`: the last layer's output projection and MLP run on the read positions only (its
    row counts, observed), their hidden states are those of the full pass, the others are
    zeros, and a loss on the read positions has the full pass's gradients."""
    import policies.packed

    model = _with_lora(_tiny("llama"), stacked)
    ids, mask = _batch()
    read = torch.zeros_like(mask, dtype=torch.bool)
    read[:, 6:-1] = True  # completion-like columns, padding included
    read[0, 3] = True  # and a padding position (row 0 starts at 5)
    w = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(policies.packed, "PACK_MULTIPLE", 1)  # the real tokens only: row counts as stated
    rows_seen = []
    real_output = policies.packed._output_and_mlp

    def output(layer, x, attended, dense=None):
        rows_seen.append(x.shape[0])
        return real_output(layer, x, attended, dense)

    monkeypatch.setattr(policies.packed, "_output_and_mlp", output)

    def run(r):
        model.zero_grad(set_to_none=True)
        out = packed_hidden_states(model, ids, mask, read=r)
        (out[read] * w[read]).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, g_full = run(None)
    part, g_part = run(read)
    n_real = int(mask.sum())
    assert rows_seen == [n_real] * 2 + [n_real, int((read & mask.bool()).sum())]
    assert torch.equal(part[read], full[read])
    assert not part[~read].any() and full[~read & mask.bool()].abs().sum() > 0
    assert g_part.keys() == g_full.keys()
    for n in g_full:
        torch.testing.assert_close(g_part[n], g_full[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        rows_seen.clear()
        one = torch.zeros_like(read)
        one[torch.arange(4), torch.tensor([11, 8, 10, 11])] = True  # each row's last real token
        assert torch.equal(packed_hidden_states(model, ids, mask, read=one)[one], full[one])
        assert rows_seen[-1] == 4
        monkeypatch.setattr(policies.packed, "PACK_MULTIPLE", 64)  # padding positions among the rows
        assert torch.equal(packed_hidden_states(model, ids, mask, read=read), part)
        assert rows_seen[-1] == int(read.sum())


@pytest.mark.parametrize("stacked", [False, True])
def test_packed_gradients_under_bf16_autocast_match_the_padded_forward(stacked):
    """Under autocast the attention scores stay bf16 (the mask is built in bf16), and autograd
    keeps only the bf16 probabilities for the softmax backward, no fp32 (B, H, T, T) tensor: the
    gradients stay the fp32 ones to bf16's precision, as close as transformers' own bf16 forward
    gets (about 1.2% here), and a wrong softmax backward would be far off. Stacked: the factored
    layers, whose MLP recomputes act(gate) ⊙ up in its backward (`_GatedDown`)."""
    model = _with_lora(_tiny("llama", hidden_size=64), stacked)
    ids, mask = _batch()
    real = mask.bool()
    w = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(2))
    B, T = ids.shape
    heads = model.config.num_attention_heads
    scores_like = []

    def keep(t):
        if t.shape == (B, heads, T, T):
            scores_like.append(t.dtype)
        return t

    def grads(fn, dtype=torch.bfloat16, hook=False):
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), dtype), torch.autograd.graph.saved_tensors_hooks(keep if hook else (lambda t: t), lambda t: t):
            out = fn(model, ids, mask)
        (out.float()[real] * w[real]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    g_packed = grads(packed_hidden_states, hook=True)
    g_padded, g_exact = grads(_padded_hidden), grads(_padded_hidden, None)
    assert scores_like == [torch.bfloat16] * 2  # the probabilities, one per layer

    def rel(g, n):
        return float((g[n] - g_exact[n]).norm() / g_exact[n].norm())

    # each gradient is the fp32 one to bf16's precision, as transformers' own bf16 forward is
    for n in g_packed:
        assert g_packed[n].abs().sum() > 0, n
        assert rel(g_packed, n) < 0.04, (n, rel(g_packed, n), rel(g_padded, n))
    mean_packed, mean_padded = (sum(rel(g, n) for n in g_packed) / len(g_packed) for g in (g_packed, g_padded))
    assert mean_packed < 1.5 * mean_padded, (mean_packed, mean_padded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_rotation_of_queries_and_keys_equals_the_models_rotary_embedding(dtype):
    """`_rotate` turns queries and keys side by side (the factored and merged layers' q/k/v
    output), cast up once: the same bits as transformers' apply_rotary_pos_emb on each, which
    multiplies a bf16 projection output by fp32 cos and sin."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from policies.packed import _rotary, _rotate

    g = torch.Generator().manual_seed(0)
    n, H, Hk, d = 11, 6, 2, 16
    qk = torch.randn(n, H + Hk, d, generator=g).to(dtype)
    angles = torch.rand(n, d // 2, generator=g) * 40
    rope_angles = (torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1))
    # and any cos and sin, halves unequal: the roll with a signed sin is rotate_half's own arithmetic
    any_angles = (torch.randn(n, d, generator=g), torch.randn(n, d, generator=g))
    for cos, sin in (rope_angles, any_angles):
        q, k = apply_rotary_pos_emb(qk[:, :H], qk[:, H:], cos, sin, unsqueeze_dim=1)
        joint = _rotate(qk, _rotary(cos, sin))
        assert joint.dtype == q.dtype == torch.float32
        assert torch.equal(joint[:, :H], q) and torch.equal(joint[:, H:], k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_softmax_equals_the_fp32_softmax_cast_down(dtype):
    """`grouped_eager_attention` adds the mask in the scores' low precision and takes the
    softmax there; transformers promotes to fp32 (an fp32 mask), takes the softmax and casts
    down. Same bits: torch's low-precision softmax computes in fp32 and rounds once, and a
    masked score gets probability exactly 0 either way."""
    g = torch.Generator().manual_seed(0)
    for L in (1, 7, 37, 129, 160):
        scores = (torch.randn(3, 4, 5, L, generator=g) * 6).to(dtype)
        allowed = torch.rand(3, 1, 5, L, generator=g) < 0.7
        allowed[..., 0] = True
        low = torch.where(allowed, torch.zeros((), dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
        high = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        ours = torch.softmax(scores + low, dim=-1)
        theirs = torch.softmax(scores + high, dim=-1, dtype=torch.float32).to(dtype)
        assert ours.dtype == dtype and torch.equal(ours, theirs), L
        assert (ours[~allowed.expand_as(ours)] == 0).all()


def test_completion_logits_packed_equal_the_transformers_logits():
    model = _with_lora(_tiny("llama"))
    ids, mask = _batch()
    P = 6
    with torch.no_grad():
        logits = PackedEngine("cpu").completion_logits(model, ids, mask, P)  # (B, C, V)
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, P - 1 : -1]
    scored = mask[:, P:].bool()  # the completion tokens that are real
    assert logits.shape == full.shape
    torch.testing.assert_close(logits[scored], full[scored], atol=1e-5, rtol=1e-5)


def test_other_models_and_kernels_fall_back_to_the_transformers_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2)).eval()
    assert not can_pack(gpt2)
    flash = _tiny("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert not can_pack(flash)
    windowed = _tiny("llama")
    windowed.config.sliding_window = 8
    assert not can_pack(windowed, 12) and can_pack(windowed, 8)
    # the packed engine still answers for a model that can't pack
    ids, mask = _batch()
    with torch.no_grad():
        got = PackedEngine("cpu").completion_logits(gpt2, ids, mask, 6)
    assert got.shape == (4, 6, 97) and torch.isfinite(got).all()


def test_packed_index_tops_up_real_tokens_with_padding_to_the_multiple(monkeypatch):
    import policies.packed
    from policies.packed import _packed_index

    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, :] = 1
    mask[2, 7:] = 1  # 19 real tokens
    monkeypatch.setattr(policies.packed, "PACK_MULTIPLE", 8)
    index = _packed_index(mask)
    assert len(index) == 24 and bool(mask.reshape(-1)[index].sum() == 19)  # all real ones, 5 padding
    assert torch.equal(index, index.sort().values)  # row-major: each row's tokens stay in order
    monkeypatch.setattr(policies.packed, "PACK_MULTIPLE", 64)
    assert len(_packed_index(mask)) == 30  # never more than B·T


def test_packing_leaves_the_model_untouched():
    model = _with_lora(_tiny("llama"))
    before = copy.deepcopy(model.state_dict())
    ids, mask = _batch()
    with torch.no_grad():
        packed_hidden_states(model, ids, mask)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- the padding-free sampler ----------------------------------------------------------------


def _prompts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind, attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_packed_greedy_generation_is_transformers_generate(kind, attn):
    from policies.packed import packed_generate

    model = _with_lora(_tiny(kind, attn))
    ids, mask = _prompts()
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=96, pad_token_id=0)
        ours = packed_generate(model, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=96, pad_token_id=0)
    assert torch.equal(ours, hf)
    # Now make a token each row emits early the EOS: rows end there, are padded after it, and
    # generation stops once every row has ended, as transformers' generate does.
    eos = int(hf[1, 7 + 2])
    with torch.no_grad():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
        ours = packed_generate(model, ids, mask, max_new_tokens=10, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, hf)
    row = ours[1, 7:].tolist()
    assert eos in row and all(t == 0 for t in row[row.index(eos) + 1 :])


def test_packed_greedy_generation_under_bf16_autocast_matches_transformers():
    from policies.packed import packed_generate

    model = _with_lora(_tiny("llama"))
    ids, mask = _prompts()
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=96, pad_token_id=0)
        # the adapters as modules: bit for bit what transformers computes
        ours = packed_generate(model, ids, mask, max_new_tokens=8, temperature=0.0, eos_token_id=96, pad_token_id=0, merge_weights=False)
    assert torch.equal(ours, hf)


def test_prepacked_projections_give_f_linears_numbers_and_sampling_uses_them(monkeypatch):
    """Sampling prepacks the merged weights and the LM head (`Projection.prepack`). In bf16 each
    matmul gives F.linear's bits, for the rows it was packed for and others, so the sampled
    tokens are the same as from the plain weights, draw for draw; in fp32 it rounds as F.linear
    does, in another order, and fp32 models sample from prepacked weights too."""
    import policies.packed
    from policies.models import store_frozen_linears_in
    from policies.packed import Projection, packed_generate

    assert torch.backends.mkldnn.is_available()  # x86 CPU builds of torch (CI's machine) have oneDNN
    g = torch.Generator().manual_seed(4)
    w, bias = torch.randn(96, 64, generator=g).bfloat16(), torch.randn(96, generator=g).bfloat16()
    proj = Projection(w, bias)
    proj.prepack(8)
    assert proj.prepacked is not None and proj.weight is None
    for rows in (8, 37):
        x = torch.randn(rows, 64, generator=g).bfloat16()
        assert torch.equal(proj(x), torch.nn.functional.linear(x, w, bias))
    fp32 = Projection(w.float(), bias.float())
    fp32.prepack(8)
    assert fp32.prepacked is not None and fp32.weight is None
    for rows in (8, 37):
        x = torch.randn(rows, 64, generator=g)
        ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
        # oneDNN sums in its own order: fp32 rounding, as close to the exact product as F.linear is
        err, err_plain = (fp32(x) - ref).abs().max(), (torch.nn.functional.linear(x, w.float(), bias.float()) - ref).abs().max()
        assert err <= 4 * err_plain + 1e-6 and err < 1e-5

    model = _with_lora(_tiny("llama", hidden_size=64))
    store_frozen_linears_in(model, torch.bfloat16)  # the LM head gets its own bf16 copy
    ids, mask = _prompts()
    packed = []
    real = Projection.prepack

    def counting(self, rows):
        real(self, rows)
        packed.append(self.prepacked is not None)

    monkeypatch.setattr(Projection, "prepack", counting)

    def sample():
        torch.manual_seed(5)
        with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
            return packed_generate(model, ids, mask, max_new_tokens=8, temperature=1.0, eos_token_id=96, pad_token_id=0)

    with_prepack = sample()
    assert packed == [True] * (4 * 2 + 1)  # four projections per layer, two layers, the head
    # The frozen head's packed copy is kept for the next call (the layers' merged weights are
    # made afresh: the adapters change between calls), and remade once the head changes.
    owner = unwrap_causal_lm(model)
    kept = owner._rlhf_kept_head[1]
    packed.clear()
    assert torch.equal(sample(), with_prepack) and owner._rlhf_kept_head[1] is kept
    assert packed == [True] * (4 * 2)
    head = owner.get_output_embeddings().weight
    saved = head.detach().clone()
    with torch.no_grad():
        head.mul_(-1)
    packed.clear()
    assert not torch.equal(sample(), with_prepack) and owner._rlhf_kept_head[1] is not kept
    assert packed == [True] * (4 * 2 + 1)
    with torch.no_grad():
        head.copy_(saved)
    fp32_model = _with_lora(_tiny("llama", hidden_size=64))
    packed.clear()
    with torch.no_grad():
        packed_generate(fp32_model, ids, mask, max_new_tokens=4, temperature=1.0, eos_token_id=96, pad_token_id=0)
    assert packed == [True] * (4 * 2 + 1)
    monkeypatch.setattr(policies.packed, "_can_prepack", lambda *a: False)
    assert torch.equal(with_prepack, sample())


def test_kept_prepacked_base_gives_the_same_forward_and_gradients_and_drops_a_stale_copy(monkeypatch):
    """`prepack_frozen_projections` keeps the frozen base prepacked beside the weights. Under bf16
    autocast a factored pass then runs its base matmuls from the copies (every group of every
    layer, counted), with the same hidden states and the same adapter gradients, bit for bit,
    as from the plain weights; a weight changed in place after packing (its version moves on)
    is read as it stands again."""
    import policies.packed
    from policies.models import store_frozen_linears_in
    from policies.packed import _parts, prepack_frozen_projections, stack_frozen_projections

    model = _with_lora(_tiny("llama", hidden_size=64))
    store_frozen_linears_in(model, torch.bfloat16)  # as ActorCritic.store_frozen_in does
    stack_frozen_projections(model)
    ids, mask = _batch()
    real = mask.bool()
    w = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(2))
    layers = _parts(model)[1]
    packed_calls = []
    real_apply = policies.packed._PrepackedLinear.apply

    def counting(*args):
        packed_calls.append(args[0].shape)
        return real_apply(*args)

    monkeypatch.setattr(policies.packed._PrepackedLinear, "apply", counting)

    def run():
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), torch.bfloat16):
            out = packed_hidden_states(model, ids, mask)
        (out.float()[real] * w[real]).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_out, plain_grads = run()
    assert packed_calls == []
    assert prepack_frozen_projections(model) == 4 * len(layers)
    kept_out, kept_grads = run()
    # with gradients: q/k/v, o and gate/up of each layer but the first layer's q/k/v (its input,
    # the embeddings' norm, needs none); `_GatedDown` reads the down projection's copy itself
    assert len(packed_calls) == 3 * len(layers) - 1
    assert torch.equal(kept_out, plain_out)
    assert kept_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        assert torch.equal(kept_grads[n], plain_grads[n]), n
    with torch.no_grad():
        layers[1].self_attn.q_proj.get_base_layer().weight.mul_(2)  # layer 1's q/k/v copy is stale
    calls = len(packed_calls)
    changed = run()[0]
    assert len(packed_calls) - calls == 3 * len(layers) - 2  # all but that one
    for layer in layers:
        layer._rlhf_prepacked = {}
    assert torch.equal(changed, run()[0]) and not torch.equal(changed, plain_out)


def test_a_kept_merged_copy_scores_as_a_fresh_merge_and_follows_the_adapters():
    """Reward scoring merges a frozen LoRA model's weights once and keeps them prepacked
    (`merge_weights="keep"`): the same hidden states as a merge made for the pass (bf16), the
    same kept copy on the next call, and a new one when an adapter changes or another is active."""
    model = _with_lora(_tiny("llama", hidden_size=64))
    ids, mask = _batch()
    owner = unwrap_causal_lm(model)

    def hidden(merge):
        with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
            return packed_hidden_states(model, ids, mask, merge)

    fresh = hidden(True)
    assert "_rlhf_kept_dense" not in owner.__dict__
    assert torch.equal(hidden("keep"), fresh)
    first = owner._rlhf_kept_dense[1]
    assert all(p.prepacked is not None and p.weight is None for dl in first for p in (dl.qkv, dl.o, dl.gate_up, dl.down))
    assert torch.equal(hidden("keep"), fresh) and owner._rlhf_kept_dense[1] is first
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).mul_(3)
    changed = hidden(True)
    assert not torch.equal(changed, fresh)
    assert torch.equal(hidden("keep"), changed) and owner._rlhf_kept_dense[1] is not first
    with model.disable_adapter():
        assert torch.equal(hidden("keep"), hidden(True))
    with torch.no_grad():
        assert torch.equal(hidden("keep"), changed)


def test_stacking_keeps_the_weights_and_lays_each_group_out_in_one_storage():
    from policies.packed import _parts, factored_layers, stack_frozen_projections

    model = _with_lora(_tiny("qwen2"))
    layers = _parts(model)[1]
    assert factored_layers(layers) is None  # separate weights: the modules run
    ids, mask = _batch()
    with torch.no_grad():
        before_out = _padded_hidden(model, ids, mask)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert stack_frozen_projections(model) == 2 * len(layers)
    assert stack_frozen_projections(model) == 0  # already laid out
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for n in before:
        assert torch.equal(before[n], after[n]), n
        assert after[n].requires_grad == ("lora_" in n), n
    for layer in layers:
        for group in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), (layer.mlp.gate_proj, layer.mlp.up_proj)):
            ptrs = {p.get_base_layer().weight.untyped_storage().data_ptr() for p in group}
            assert len(ptrs) == 1
    with torch.no_grad():
        assert torch.equal(_padded_hidden(model, ids, mask), before_out)


def test_trainable_base_weights_are_not_stacked_and_run_as_modules():
    from policies.packed import _parts, factored_layers, stack_frozen_projections

    model = _tiny("llama")  # full fine-tuning: every weight trains
    assert stack_frozen_projections(model) == 0
    assert factored_layers(_parts(model)[1]) is None


def _saved_bytes(model, ids, mask):
    """Bytes of the distinct storages autograd keeps for the backward of one packed forward under
    bf16 autocast, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), torch.bfloat16):
        packed_hidden_states(model, ids, mask)
    return sum(seen.values())


def test_factored_layers_keep_less_for_the_backward(monkeypatch):
    """Under autocast the module pass keeps act(gate) and act(gate) ⊙ up (bf16, each N × I) in
    every layer; the factored pass recomputes them in the backward (`_GatedDown`) and keeps bf16
    copies of its stacked factors A and B instead, which on this tiny model are not small."""
    import policies.packed

    model = _with_lora(_tiny("llama"), stacked=True)
    ids = torch.randint(1, 97, (8, 32), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    layers = policies.packed._parts(model)[1]
    factors = sum(2 * (p.a.numel() + p.b.numel()) for dl in policies.packed.factored_layers(layers) for p in (dl.qkv, dl.o, dl.gate_up, dl.down))
    factored = _saved_bytes(model, ids, mask)
    monkeypatch.setattr(policies.packed, "factored_layers", lambda layers: None)
    modules = _saved_bytes(model, ids, mask)
    N, I = ids.numel(), unwrap_causal_lm(model).config.intermediate_size
    assert modules - factored >= len(layers) * 2 * (2 * N * I) - factors, (modules, factored, factors)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_norm_for_matmul_is_the_model_norm_and_keeps_no_fp32_input(amp):
    """`_normed` with gradients: the model's RMSNorm output bit for bit (cast as the projections
    read it), the input gradient of the module's own autograd to the output's precision, and
    nothing of the input's size in fp32 kept for the backward."""
    from policies.packed import _normed

    norm = _tiny("llama").model.layers[0].input_layernorm.requires_grad_(False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
    g = torch.randn(10, 32, generator=torch.Generator().manual_seed(7))
    kept = []
    with autocast(torch.device("cpu"), amp), torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        ours = _normed(norm, x)
    expected = norm(x).to(amp or torch.float32)
    assert torch.equal(ours, expected)
    assert kept and not any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in kept)
    (dx,) = torch.autograd.grad(ours, x, g.to(ours.dtype))
    (dx_ref,) = torch.autograd.grad(expected, x, g.to(ours.dtype))
    tol = 1e-6 if amp is None else 1e-2
    assert (dx - dx_ref).norm() / dx_ref.norm() < tol


def test_scatter_into_padding_keeps_only_the_index():
    """`_Scatter` computes index_copy and its gradient, and keeps only the index for the backward
    (index_copy's autograd keeps the source too)."""
    from policies.packed import _Scatter

    t = torch.randn(5, 3, 2, requires_grad=True)
    index = torch.tensor([0, 2, 3, 6, 7])
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: kept.append(x) or x, lambda x: x):
        out = _Scatter.apply(t, index, 8)
    expected = torch.zeros(8, 3, 2).index_copy(0, index, t)
    assert torch.equal(out, expected)
    assert len(kept) == 1 and kept[0] is index
    g = torch.randn(8, 3, 2)
    (grad,) = torch.autograd.grad(out, t, g)
    assert torch.equal(grad, torch.autograd.grad(expected, t, g)[0])


def test_gathering_distinct_rows_gives_indexings_values_and_gradient(monkeypatch):
    """`_Gather` is t[index] forward and backward for distinct indices, and the packed forward
    uses it (counted) once per layer, plus once for the last layer's read rows."""
    import policies.packed as pk

    t = torch.randn(8, 3, 2, requires_grad=True)
    index = torch.tensor([6, 0, 2, 3, 7])
    out = pk._Gather.apply(t, index)
    assert torch.equal(out, t[index])
    g = torch.randn(5, 3, 2)
    assert torch.equal(torch.autograd.grad(out, t, g)[0], torch.autograd.grad(t[index], t, g)[0])
    calls = []
    real = pk._Gather.apply
    monkeypatch.setattr(pk._Gather, "apply", lambda *a: calls.append(1) or real(*a))
    model = _with_lora(_tiny("llama"))
    ids, mask = _batch()
    packed_hidden_states(model, ids, mask, read=mask.bool()).sum().backward()
    assert len(calls) == len(pk._parts(model)[1]) + 1
    with torch.no_grad():
        packed_hidden_states(model, ids, mask)
    assert len(calls) == len(pk._parts(model)[1]) + 1  # without gradients: index_select alone


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_merged_dense_layers_compute_what_the_adapted_modules_compute(kind):
    from policies.packed import _output_and_mlp, _parts, _rotary, _rotated_qkv, dense_layers

    model = _with_lora(_tiny(kind))
    decoder, layers, _, rope = _parts(model)
    x = torch.randn(6, 32)
    pos = torch.arange(6)[None]
    cos, sin = decoder.rotary_emb(x[None], pos)
    attended = torch.randn(6, 32)
    with torch.no_grad():
        dense = dense_layers(layers, torch.float32)
        assert dense is not None and dense[0].qkv.weight.shape == (32 + 16 + 16, 32) and dense[0].gate_up.weight.shape == (128, 32)
        assert (dense[0].qkv.bias is not None) == (kind == "qwen2") and dense[0].qkv.a is None
        for layer, dl in zip(layers, dense):
            rot = _rotary(cos[0], sin[0])
            for ours, ref in zip(_rotated_qkv(layer, x, rot, rope, dl), _rotated_qkv(layer, x, rot, rope)):
                torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(_output_and_mlp(layer, x, attended, dl), _output_and_mlp(layer, x, attended), atol=1e-5, rtol=1e-5)
        # the adapters matter here (B ≠ 0), so the merged weight is not the base weight ...
        base_q = layers[0].self_attn.q_proj.get_base_layer().weight
        assert not torch.allclose(dense[0].qkv.weight[:32], base_q)
        # ... and with the adapters off it is exactly the base weight
        with model.disable_adapter():
            plain = dense_layers(layers, torch.float32)
        assert torch.equal(plain[0].qkv.weight[:32], base_q)


def test_sampling_runs_modules_where_no_merged_weight_exists():
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    from policies.packed import dense_layers, packed_generate

    model = get_peft_model(_tiny("llama"), PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    ids, mask = _prompts()
    layers = unwrap_causal_lm(model).model.layers
    with torch.no_grad():
        assert dense_layers(layers, torch.float32) is None  # DoRA has no W + s·B·A form
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=96, pad_token_id=0)
        ours = packed_generate(model, ids, mask, max_new_tokens=6, temperature=0.0, eos_token_id=96, pad_token_id=0)
    assert torch.equal(ours, hf)


def test_gumbel_sampler_draws_from_the_tempered_softmax():
    from policies.packed import _sample

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -8.0]]).expand(20000, 5)
    for tau in (1.0, 0.5):
        draws = _sample(logits, tau, 0, 1.0)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        expected = torch.softmax(logits[0] / tau, -1)
        assert (freq - expected).abs().max() < 0.012, (tau, freq, expected)  # ~4 standard errors
    assert set(_sample(logits, 1.0, 2, 1.0).tolist()) == {0, 1}  # top-k 2
    p = torch.softmax(logits[0], -1)
    assert p[0] < 0.7 < p[0] + p[1]
    assert set(_sample(logits, 1.0, 0, 0.7).tolist()) == {0, 1}  # top-p 0.7 keeps the two largest
    assert torch.equal(_sample(logits[:3], 0.0, 0, 1.0), torch.zeros(3, dtype=torch.long))  # greedy


def test_packed_generation_refuses_right_padded_prompts():
    from policies.packed import packed_generate

    model = _tiny("llama")
    ids, mask = _batch()  # row 1 is right-padded
    with pytest.raises(ValueError, match="left-padded"):
        packed_generate(model, ids, mask, max_new_tokens=2, temperature=1.0, eos_token_id=96, pad_token_id=0)


def test_both_engines_sample_the_same_greedy_tokens():
    """The packed engine's sampler and transformers' `generate` (the hf engine) agree."""
    from policies.engine import HFEngine
    from rlhf.config import SamplingConfig

    model = _tiny("llama")
    ids, mask = _prompts()
    sampling = SamplingConfig(max_new_tokens=4, temperature=0.0)
    with torch.no_grad():
        packed = PackedEngine("cpu").sample(model, ids, mask, sampling, eos_token_id=96, pad_token_id=0)
        hf = HFEngine().sample(model, ids, mask, sampling, eos_token_id=96, pad_token_id=0)
    assert torch.equal(packed, hf)


def _prompt_and_completions(B: int = 4, P: int = 7, C: int = 5):
    """Left-padded prompts, then completions of which two ended early (right padding)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (B, P + C), generator=g)
    mask = torch.ones(B, P + C, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    mask[2, :1] = 0
    mask[3, -4:] = 0
    return ids.masked_fill(mask == 0, 0), mask, P


@pytest.mark.parametrize("kind, attn, stacked, amp, last_layers", [
    ("llama", "eager", False, None, None), ("llama", "sdpa", False, None, None), ("llama", "eager", True, None, None),
    ("qwen2", "eager", True, None, None), ("llama", "eager", True, torch.bfloat16, None), ("llama", "sdpa", True, torch.bfloat16, None),
    ("llama", "eager", True, None, 1)])
def test_prompt_pass_continued_over_the_completions_is_the_whole_forward(kind, attn, stacked, amp, last_layers):
    """A pass over the prompts (`prompt_pass`), continued over the completions in another row
    order (`PromptPass.rows`, `continued_hidden_states`), gives the states that predict the
    completion tokens, and the gradients, of one pass over the whole rows, to rounding; zeros
    at completion padding. With adapters on the top layer only, the layer below keeps no graph."""
    from policies.engine import completion_positions
    from policies.packed import continued_hidden_states, prompt_pass

    model = _tiny(kind, attn)
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, last_layers=last_layers))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    if stacked:
        from policies.packed import stack_frozen_projections

        assert stack_frozen_projections(peft) == 4
    ids, mask, P = _prompt_and_completions()
    reads = mask[:, P - 1 : -1].bool()
    params = [p for p in peft.parameters() if p.requires_grad]
    w = torch.randn(*reads.shape, 32, generator=torch.Generator().manual_seed(2))

    def grads(out):
        return torch.autograd.grad((out.float() * w)[reads].sum(), params)

    with autocast(torch.device("cpu"), amp):
        whole = packed_hidden_states(peft, ids, mask, read=completion_positions(ids.shape, P))[:, P - 1 : -1]
        kept = prompt_pass(peft, ids[:, :P], mask[:, :P])
        assert [k.requires_grad for k in kept.keys] == ([False, True] if last_layers else [True, True])
        order = [2, 0, 3, 1]
        continued = continued_hidden_states(peft, kept.rows(order), ids[order], mask[order])
    continued = continued[torch.argsort(torch.tensor(order))]
    tol = dict(atol=1e-5, rtol=1e-5) if amp is None else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(continued[reads], whole[reads], **tol)
    assert (continued[~reads] == 0).all()
    for a, b in zip(grads(continued), grads(whole)):
        scale = b.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b / scale, **tol)


def test_a_prompt_pass_serves_only_its_rows_and_parameters():
    from policies.packed import continued_hidden_states, prompt_pass

    model = _with_lora(_tiny("llama"))
    ids, mask, P = _prompt_and_completions()
    kept = prompt_pass(model, ids[:, :P], mask[:, :P])
    assert kept.rows([0, 1, 2, 3]) is kept  # rows in their own order: no copy
    with pytest.raises(ValueError, match="not those of the prompt pass"):
        continued_hidden_states(model, kept, ids[[1, 0, 2, 3]], mask[[1, 0, 2, 3]])
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)  # an optimizer step
    with pytest.raises(ValueError, match="parameters changed"):
        continued_hidden_states(model, kept, ids, mask)


@pytest.mark.parametrize("merge_weights", [False, True])
def test_sampling_from_a_prompt_pass_is_sampling_with_its_own_prefill(merge_weights):
    """The sampler started from a kept prompt pass (its keys, values and last states, detached)
    draws what it draws after a prefill of its own, with the same random numbers."""
    from policies.packed import packed_generate, prompt_pass

    model = _with_lora(_tiny("llama"), stacked=True)
    ids, mask = _prompts()
    kept = prompt_pass(model, ids, mask)
    assert kept.last.requires_grad
    outs = []
    for prompt in (None, kept):
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(packed_generate(model, ids, mask, max_new_tokens=8, temperature=1.0, eos_token_id=96, pad_token_id=0, merge_weights=merge_weights, prompt=prompt))
    assert torch.equal(outs[0], outs[1])
    assert kept.last.grad_fn is not None  # the pass's graph is still there for the training forward
    with pytest.raises(ValueError, match="not over these prompts"):
        packed_generate(model, ids[:2], mask[:2], max_new_tokens=2, temperature=1.0, eos_token_id=96, pad_token_id=0, prompt=kept)
