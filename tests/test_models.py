"""Model loading: tiny random Llama with SmolLM2's tokenizer (shipped in tests/assets), on the
GPU when there is one, else the CPU; 4-bit/8-bit + LoRA; the real SmolLM2 (marked slow)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SMOLLM2_TOKENIZER
from policies.engine_choice import build_engine
from policies.hub import ModelNotFoundError, resolve_model_path
from policies.models import count_parameters, load_model
from policies.text import encode_completions, generate, render_prompt, sequence_logprob
from policies.tokenizers import ensure_pad_token, load_tokenizer
from rlhf.config import LoraConfig, ModelConfig, SamplingConfig


def test_shipped_tokenizer_is_smollm2s_with_distinct_left_pad():
    """tests/assets holds SmolLM2's tokenizer alone; `load_tokenizer` gives it a pad token that
    is not EOS and pads on the left. The ids are pinned: they are the real model's."""
    tok = load_tokenizer(SMOLLM2_TOKENIZER)
    assert len(tok) == 49152
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.bos_token_id, tok.eos_token, tok.eos_token_id) == (1, "<|im_end|>", 2)
    assert tok.padding_side == "left"
    assert tok("Hello world! Name a colour.", add_special_tokens=False)["input_ids"] == [19556, 905, 17, 10181, 253, 7302, 30]
    prompt = render_prompt(tok, "Hi")
    assert prompt == "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    batch = tok(["a", "a longer one"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[0, 0, 81], [81, 2848, 582]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1]]
    assert {p.name for p in SMOLLM2_TOKENIZER.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"}


@pytest.mark.slow
def test_shipped_tokenizer_matches_the_converted_model(smollm2_dir):
    from transformers import AutoTokenizer

    shipped, real = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER), AutoTokenizer.from_pretrained(smollm2_dir)
    assert shipped.get_vocab() == real.get_vocab()
    assert shipped.all_special_tokens == real.all_special_tokens and shipped.chat_template == real.chat_template
    texts = ["Hello world!", "  leading spaces\n\n\tand tabs", "héllo wörld 日本語 🙂", "<|im_start|>user\nHi<|im_end|>\n"]
    assert [shipped(t)["input_ids"] for t in texts] == [real(t)["input_ids"] for t in texts]


def test_tiny_model_loads_with_distinct_left_pad(tiny_llama_dir, device):
    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), device=str(device)))
    tok, model = loaded.tokenizer, loaded.model
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.config.pad_token_id == tok.pad_token_id
    assert not model.training  # eval mode: dropout off
    assert loaded.device.type == device.type and next(model.parameters()).device.type == device.type
    out = model(input_ids=torch.tensor([[1, 2, 3]], device=device))
    assert out.logits.shape == (1, 3, len(tok))


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_dtype(tiny_llama_dir, device, dtype, expected):
    model = load_model(ModelConfig(name=str(tiny_llama_dir), dtype=dtype, device=str(device))).model
    assert {p.dtype for p in model.parameters()} == {expected}
    logits = model(input_ids=torch.tensor([[5, 6, 7]], device=device)).logits
    assert logits.dtype == expected and torch.isfinite(logits).all()


def test_left_padding_does_not_change_logprobs(tiny_llama_dir, device):
    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), device=str(device)))
    tok, model = loaded.tokenizer, loaded.model
    prompts = [render_prompt(tok, "Hi"), render_prompt(tok, "A much longer prompt that forces padding on the other row")]
    comps = ["Hello there", "Sure"]
    engine = build_engine("auto", model, loaded.device)
    batched = sequence_logprob(engine, model, encode_completions(tok, prompts, comps))
    alone = torch.cat([sequence_logprob(engine, model, encode_completions(tok, [p], [c])) for p, c in zip(prompts, comps)])
    assert torch.allclose(batched, alone, atol=1e-4)


def test_sequence_logprob_equals_naive_full_logits_sum(tiny_llama_dir, device):
    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), device=str(device)))
    tok, model = loaded.tokenizer, loaded.model
    p, c = render_prompt(tok, "Name a colour."), "Blue, like the sky."
    enc = encode_completions(tok, [p], [c])
    ids = enc.input_ids.to(device)  # one row: no padding at all
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)  # (L-1, V)
    targets = ids[0, 1:]
    scored = enc.completion_mask[0, 1:].bool().to(device)
    expected = logp[torch.arange(len(targets)), targets][scored].sum()
    assert scored.sum() == len(tok(c + tok.eos_token, add_special_tokens=False)["input_ids"])
    assert torch.allclose(sequence_logprob(build_engine("auto", model, loaded.device), model, enc), expected.unsqueeze(0), atol=1e-4)


def test_encode_marks_completion_tokens_only(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    enc = encode_completions(tok, ["prompt one", "p"], ["yes", "a longer answer"])
    for i, comp in enumerate(["yes", "a longer answer"]):
        ids = enc.input_ids[i][enc.completion_mask[i].bool()].tolist()
        assert tok.decode(ids) == comp + tok.eos_token
        assert enc.attention_mask[i][enc.completion_mask[i].bool()].all()
    assert (enc.input_ids[enc.attention_mask == 0] == tok.pad_token_id).all()


def test_generate_truncates_after_eos(tiny_llama_dir, device):
    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), device=str(device)))
    tok = loaded.tokenizer
    torch.manual_seed(0)
    engine = build_engine("auto", loaded.model, loaded.device)
    gen = generate(engine, loaded.model, tok, [render_prompt(tok, "Hello"), render_prompt(tok, "Tell me a story")], SamplingConfig(max_new_tokens=8, temperature=1.0))
    assert gen.completion_ids.shape[0] == 2 and gen.completion_ids.shape[1] <= 8
    for row, mask, done in zip(gen.completion_ids, gen.completion_mask, gen.finished):
        n = int(mask.sum())
        assert (row[n:] == tok.pad_token_id).all()
        assert bool(done) == bool((row[:n] == tok.eos_token_id).any())
        if done:
            assert row[n - 1] == tok.eos_token_id


def test_4bit_lora_forward_backward(tiny_llama_dir, device):
    import bitsandbytes as bnb

    cfg = ModelConfig(name=str(tiny_llama_dir), quantization="4bit", lora=LoraConfig(enabled=True, r=4, alpha=8), device=str(device))
    model = load_model(cfg).model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    ids = torch.randint(3, 1000, (2, 12), device=device)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    # LoRA B starts at zero and gets a nonzero gradient on the first step: every B must move.
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert {n for n in before if "lora_B" in n} <= set(changed)


def test_frozen_linears_in_bf16_give_the_same_autocast_forward(tiny_llama_dir, device):
    """Storing the frozen base's matmul weights in bf16 changes nothing under bf16 autocast
    (autocast would cast them on every call), keeps LoRA and embeddings fp32, and gradients
    still reach the adapter."""
    from policies.models import store_frozen_linears_in

    torch.manual_seed(0)
    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4), device=str(device)))
    model = loaded.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    enc = encode_completions(loaded.tokenizer, ["Hello there", "Hi"], ["General Kenobi", "you"])
    ids, attn = enc.input_ids.to(device), enc.attention_mask.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        before = model(input_ids=ids, attention_mask=attn).logits
    cast = store_frozen_linears_in(model, torch.bfloat16)
    # Every frozen matmul weight (the base's projections and the tied head) and nothing else.
    frozen_matmul_weights = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    assert frozen_matmul_weights and all(w.dtype == torch.bfloat16 for w in frozen_matmul_weights)
    assert cast == sum(w.numel() for w in frozen_matmul_weights)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "embed" in n or "norm" in n)
    # The tied LM head gets its own bf16 copy; the input embeddings stay fp32.
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.dtype == torch.bfloat16 and emb.dtype == torch.float32 and not head.requires_grad
    assert torch.equal(head, emb.to(torch.bfloat16))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        after = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(before, after)
    after.float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_untied_lm_head_is_cast_like_any_frozen_linear():
    """Without tied embeddings the LM head is an ordinary frozen Linear: cast in place, while the
    input embeddings keep full precision."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from policies.models import store_frozen_linears_in

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).requires_grad_(False)
    assert store_frozen_linears_in(model, torch.bfloat16) == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.float32


def test_8bit_loads_and_runs(tiny_llama_dir, device):
    import bitsandbytes as bnb

    model = load_model(ModelConfig(name=str(tiny_llama_dir), quantization="8bit", device=str(device))).model
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]], device=device)).logits).all()


def test_lora_adapter_saved_and_loaded_from_disk(tiny_llama_dir, tmp_path, device):
    cfg = ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4, target_modules="q_proj,v_proj"), device=str(device))
    model = load_model(cfg).model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter matter
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[5, 6, 7, 8]], device=device)
    expected = model(input_ids=ids).logits
    with model.disable_adapter():
        base = model(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changes the output
    reloaded = load_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, path=str(tmp_path / "adapter")), device=str(device))).model
    assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-5)
    assert any(p.requires_grad for p in reloaded.parameters())  # loaded as trainable


def test_adapter_without_safetensors_is_refused(tiny_llama_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, path=str(tmp_path))))


def test_pickle_only_checkpoint_is_refused(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    load_tokenizer(tiny_llama_dir).save_pretrained(tmp_path)
    with pytest.raises(OSError, match="safetensors"):
        load_model(ModelConfig(name=str(tmp_path)))


def test_unreachable_hub_id_says_how_to_use_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("nobody/no-such-model-xyz")
    msg = str(err.value)
    assert "nobody/no-such-model-xyz" in msg and "local directory" in msg and "model.name=DIR" in msg
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        resolve_model_path("./no/such/dir")


def test_pad_token_added_when_no_spare_special_token():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "</s>": 2}, unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", pad_token="</s>")
    assert tok.pad_token_id == tok.eos_token_id
    assert ensure_pad_token(tok) is True
    assert tok.pad_token_id not in (None, tok.eos_token_id) and tok.pad_token_id == 3


@pytest.mark.slow
def test_real_smollm2_converts_loads_and_answers(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg  # plain safetensors, no gguf on later loads
    assert cfg["num_hidden_layers"] == 30 and cfg["vocab_size"] == 49152
    loaded = load_model(ModelConfig())  # the default alias resolves to the converted cache
    assert loaded.path == smollm2_dir
    tok = loaded.tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    engine = build_engine("auto", loaded.model, loaded.device)
    gen = generate(engine, loaded.model, tok, [render_prompt(tok, "What is the capital of France?")], SamplingConfig(max_new_tokens=20, temperature=0.0))
    assert "Paris" in gen.texts[0]
    assert gen.finished[0]  # the instruct model ends its turn


def test_activation_checkpointing_gives_the_same_gradients_across_adapter_switches(tiny_llama_dir, device):
    """Checkpointed layers recompute with the adapter active in their forward: a policy +
    critic loss on one shared base gets exactly the gradients of the uncheckpointed run, and a
    deep copy (the 'separate' layout's reference) runs its own weights."""
    import copy

    from policies.actor_critic import ActorCritic

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4), gradient_checkpointing=ckpt, device=str(device))
        ac = ActorCritic.build(cfg, "shared_lora")
        with torch.no_grad():
            for n, p in ac.policy.named_parameters():
                if "lora_B" in n:
                    p.normal_()
            ac.value_head.linear.weight.normal_()  # a new value head is zero: no gradient would reach the critic
        enc = encode_completions(ac.tokenizer, ["Hello there", "Hi"], ["General Kenobi", "you"])
        out = ac(enc.input_ids, enc.attention_mask, enc.prompt_width)
        (out.logprobs.sum() + out.values.pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in ac.trainable_named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)
    assert any(".critic." in n and grads[1][n].abs().sum() > 0 for n in grads[1])

    loaded = load_model(ModelConfig(name=str(tiny_llama_dir), gradient_checkpointing=True, device=str(device)))
    twin = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1)
    ids = enc.input_ids.to(device)
    with torch.no_grad():
        a = loaded.model(input_ids=ids).logits
        b = twin(input_ids=ids).logits
    assert not torch.allclose(a, b)
