"""The padding-free forward (policies.packed) against the transformers padded forward: same
hidden states on every real token and same gradients, with LoRA adapters, under bf16 autocast,
with activation checkpointing, for Llama and Qwen2; and the fall-back for other models."""

from __future__ import annotations

import copy

import pytest
import torch

from policies.models import apply_lora, autocast, completion_logits, enable_activation_checkpointing, unwrap_causal_lm
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


def _with_lora(model):
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained-looking adapter (B = 0 would hide the adapter path)
    return peft


@pytest.mark.parametrize("multiple", [1, 64])
@pytest.mark.parametrize("kind, attn", [("llama", "eager"), ("llama", "sdpa"), ("qwen2", "eager")])
def test_packed_hidden_states_match_the_padded_forward(kind, attn, multiple, monkeypatch):
    """multiple 1: real tokens only; 64: topped up with padding positions (all of them here)."""
    import policies.packed

    monkeypatch.setattr(policies.packed, "PACK_MULTIPLE", multiple)
    model = _with_lora(_tiny(kind, attn))
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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_gradients_match_the_padded_forward(checkpointing):
    base = _tiny("llama")
    if checkpointing:
        enable_activation_checkpointing(base)
    model = _with_lora(base)
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


def test_packed_gradients_under_bf16_autocast_match_the_padded_forward():
    """Under autocast the attention keeps only the bf16 probabilities for its backward
    (`_LowPrecisionSoftmax`): the gradients stay those of the transformers forward, to bf16's
    precision, and a wrong softmax backward would be far off."""
    import policies.packed

    model = _with_lora(_tiny("llama", hidden_size=64))
    ids, mask = _batch()
    real = mask.bool()
    w = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(2))
    calls = []
    real_apply = policies.packed._LowPrecisionSoftmax.apply
    policies.packed._LowPrecisionSoftmax.apply = lambda *a: calls.append(1) or real_apply(*a)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), torch.bfloat16):
            out = fn(model, ids, mask)
        (out.float()[real] * w[real]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    try:
        g_packed = grads(packed_hidden_states)
    finally:
        policies.packed._LowPrecisionSoftmax.apply = real_apply
    g_padded = grads(_padded_hidden)
    assert len(calls) == 2  # one per layer
    for n in g_packed:
        assert g_packed[n].abs().sum() > 0, n
        rel = (g_packed[n] - g_padded[n]).norm() / g_padded[n].norm()
        assert rel < 0.02, (n, float(rel))


def test_completion_logits_packed_equal_the_transformers_logits():
    model = _with_lora(_tiny("llama"))
    ids, mask = _batch()
    P = 6
    with torch.no_grad():
        logits = completion_logits(model, ids, mask, P)  # (B, C, V)
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
    # completion_logits still answers for a model that can't pack
    ids, mask = _batch()
    with torch.no_grad():
        got = completion_logits(gpt2, ids, mask, 6)
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


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_merged_dense_layers_compute_what_the_adapted_modules_compute(kind):
    from policies.packed import _output_and_mlp, _parts, _rotated_qkv, dense_layers

    model = _with_lora(_tiny(kind))
    decoder, layers, _, rope = _parts(model)
    x = torch.randn(6, 32)
    pos = torch.arange(6)[None]
    cos, sin = decoder.rotary_emb(x[None], pos)
    attended = torch.randn(6, 32)
    with torch.no_grad():
        dense = dense_layers(layers, torch.float32)
        assert dense is not None and dense[0].qkv.shape == (32 + 16 + 16, 32) and dense[0].gate_up.shape == (128, 32)
        assert (dense[0].qkv_bias is not None) == (kind == "qwen2")
        for layer, dl in zip(layers, dense):
            for ours, ref in zip(_rotated_qkv(layer, x, cos[0], sin[0], rope, dl), _rotated_qkv(layer, x, cos[0], sin[0], rope)):
                torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(_output_and_mlp(layer, x, attended, dl), _output_and_mlp(layer, x, attended), atol=1e-5, rtol=1e-5)
        # the adapters matter here (B ≠ 0), so the merged weight is not the base weight ...
        base_q = layers[0].self_attn.q_proj.get_base_layer().weight
        assert not torch.allclose(dense[0].qkv[:32], base_q)
        # ... and with the adapters off it is exactly the base weight
        with model.disable_adapter():
            plain = dense_layers(layers, torch.float32)
        assert torch.equal(plain[0].qkv[:32], base_q)


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


def test_sampling_engine_picks_the_sampler(monkeypatch):
    import policies.text
    from policies.text import sample_tokens
    from rlhf.config import SamplingConfig

    model = _tiny("llama")
    ids, mask = _prompts()
    calls = []
    real = policies.text.packed_generate
    monkeypatch.setattr(policies.text, "packed_generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        auto = sample_tokens(model, ids, mask, SamplingConfig(max_new_tokens=4, temperature=0.0), eos_token_id=96, pad_token_id=0)
        assert calls == [1]
        hf = sample_tokens(model, ids, mask, SamplingConfig(max_new_tokens=4, temperature=0.0, engine="transformers"), eos_token_id=96, pad_token_id=0)
        assert calls == [1]  # transformers' generate, not the packed sampler
    assert torch.equal(auto, hf)
