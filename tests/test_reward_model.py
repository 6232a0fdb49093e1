"""BT/GRM reward model: head, shared forward, reference log-probs, save/load, provider."""

from __future__ import annotations

import pytest
import torch

from policies.text import sequence_logprob
from rewards.reward_model import (
    RewardHead,
    RewardModelProvider,
    RewardModelProviderConfig,
    load_reward_model,
    load_reward_model_provider,
    new_reward_model,
)
from rlhf.config import LoraConfig, ModelConfig

PROMPTS = ["How do I bake bread?", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."}]]
COMPLETIONS = ["Mix flour, water, yeast and salt, knead, proof, then bake.", "Apple."]


def _lora_rm(tiny_llama_dir, device, head="linear"):
    """A LoRA reward model whose head has random output weights, as a trained one would (a new
    head's output layer is zero, so every reward would be 0)."""
    torch.manual_seed(0)
    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4), device=str(device)), head)
    assert rm.device.type == device.type
    torch.nn.init.normal_(rm.head.net[-1].weight)
    return rm


@pytest.mark.parametrize("kind, n_linear", [("linear", 1), ("mlp", 2)])
def test_heads(kind, n_linear):
    head = RewardHead(16, kind)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == n_linear and head.bias.item() == 0.0
    if kind == "mlp":
        assert linears[0].out_features == 1024 and any(isinstance(m, torch.nn.Dropout) for m in head.modules())
    out = head(torch.randn(3, 16))
    assert out.shape == (3,) and torch.equal(out, torch.zeros(3))  # a new head scores everything 0: BT starts at log 2
    with pytest.raises(ValueError):
        RewardHead(16, "deep")  # type: ignore[arg-type]


def test_reward_reads_last_real_token_and_ignores_padding(tiny_llama_dir, device):
    rm = _lora_rm(tiny_llama_dir, device).eval()
    with torch.no_grad():
        batched = rm(rm.encode(PROMPTS, COMPLETIONS))
        alone = torch.cat([rm(rm.encode([p], [c])) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert batched.shape == (2,) and batched.dtype == torch.float32
    assert torch.allclose(batched, alone, atol=1e-4)
    # The reward is a function of the last token's state: changing the completion changes it.
    with torch.no_grad():
        other = rm(rm.encode(PROMPTS[:1], ["Something else entirely."]))
    assert not torch.allclose(other, batched[:1])


def test_grm_logps_share_the_forward_and_match_the_policy_logprob(tiny_llama_dir, device):
    rm = _lora_rm(tiny_llama_dir, device).eval()
    enc = rm.encode(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        hidden = rm.hidden_states(enc)
        logps = rm.completion_logps_from_hidden(hidden, enc)
    # The same numbers as scoring the completions with the LM itself.
    assert torch.allclose(logps, sequence_logprob(rm.engine, rm.lm, enc), atol=1e-4)
    assert (logps < 0).all()


def test_reference_is_the_base_with_adapters_disabled(tiny_llama_dir, device):
    rm = _lora_rm(tiny_llama_dir, device).eval()
    enc = rm.encode(PROMPTS, COMPLETIONS)
    with torch.no_grad():
        for n, p in rm.lm.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter change the policy
        adapted = rm.completion_logps_from_hidden(rm.hidden_states(enc), enc)
        ref = rm.reference_completion_logps(enc)
        with rm.lm.disable_adapter():
            base = sequence_logprob(rm.engine, rm.lm, enc)
    assert torch.allclose(ref, base, atol=1e-4)
    assert not torch.allclose(ref, adapted, atol=1e-3)


def test_full_finetune_reference_is_a_frozen_copy(tiny_llama_dir, device):
    torch.manual_seed(0)
    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), device=str(device)), "linear")
    enc = rm.encode(PROMPTS, COMPLETIONS)
    with pytest.raises(RuntimeError, match="freeze_reference"):
        rm.reference_completion_logps(enc)
    rm.freeze_reference()
    before = rm.reference_completion_logps(enc)
    with torch.no_grad():
        for p in rm.causal_lm.base_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.allclose(rm.reference_completion_logps(enc), before)  # the reference did not move
    assert not torch.allclose(rm.completion_logps_from_hidden(rm.hidden_states(enc), enc).detach(), before, atol=1e-3)


def test_lm_head_is_frozen_and_lora_plus_head_train(tiny_llama_dir, device):
    rm = _lora_rm(tiny_llama_dir, device, "mlp")
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert not any(p.requires_grad for p in rm.lm_head.parameters())


@pytest.mark.parametrize("lora", [True, False])
def test_save_and_load_round_trip(tiny_llama_dir, tmp_path, device, lora):
    torch.manual_seed(0)
    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=lora, r=4), device=str(device)), "mlp").eval()
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        rm.head.bias.fill_(0.25)
        expected = rm(rm.encode(PROMPTS, COMPLETIONS))
    rm.save(tmp_path / "rm")
    files = {p.name for p in (tmp_path / "rm").iterdir()}
    assert {"reward_model.json", "head.safetensors", "adapter" if lora else "backbone"} <= files
    assert not list((tmp_path / "rm").rglob("*.bin"))  # safetensors only
    loaded = load_reward_model(tmp_path / "rm", device=str(device))
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.allclose(loaded(loaded.encode(PROMPTS, COMPLETIONS)), expected, atol=1e-5)


def test_load_rejects_non_reward_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="rlhf train-rm"):
        load_reward_model(tmp_path)


def test_provider_scores_in_input_order(tiny_llama_dir, tmp_path, device):
    rm = _lora_rm(tiny_llama_dir, device)
    rm.save(tmp_path / "rm")
    provider = load_reward_model_provider(RewardModelProviderConfig(path=str(tmp_path / "rm"), batch_size=1, autocast="none", device=str(device)))
    assert provider.name == "bt"
    prompts = PROMPTS + ["Short?"]
    comps = COMPLETIONS + ["A very long answer " * 5]
    result = provider.score(prompts, comps)
    assert result.valid.all() and result.rewards.shape == (3,)
    singles = torch.cat([provider.score([p], [c]).rewards for p, c in zip(prompts, comps)])
    assert torch.allclose(result.rewards, singles, atol=1e-5)
    # The TRL reward_funcs form returns plain floats in the same order.
    assert provider(prompts=prompts, completions=comps) == pytest.approx(result.rewards.tolist(), abs=1e-6)
    # A provider around the model in memory scores what the one loaded from its directory does.
    in_memory = RewardModelProvider(rm, batch_size=2, autocast_mode="none").score(prompts, comps).rewards
    torch.testing.assert_close(in_memory, result.rewards, atol=1e-5, rtol=1e-5)


def test_provider_scores_on_merged_weights_what_the_adapter_modules_score(tiny_llama_dir, device):
    """The provider scores a frozen LoRA reward model as its engine prefers (the packed engine
    on the CPU: on merged weights, kept between calls): the rewards of the adapter modules, the
    model's own weights untouched, and new rewards as soon as a weight changes (nothing stale is
    reused)."""
    rm = _lora_rm(tiny_llama_dir, device).eval()
    enc = rm.encode(PROMPTS, COMPLETIONS)

    @torch.no_grad()
    def perturb_and_score_with_modules(names):
        for n, p in rm.lm.named_parameters():
            if any(k in n for k in names):
                p.add_(0.05 * torch.randn_like(p))  # a trained adapter: the merge changes the weights
        return rm(enc).cpu()  # adapters run as modules

    provider = RewardModelProvider(rm, batch_size=2, autocast_mode="none")  # one batch
    modules = perturb_and_score_with_modules(["lora_"])
    assert modules.abs().min() > 1e-3 and abs(modules[0] - modules[1]) > 1e-3  # rewards are not trivial
    merged = provider.score(PROMPTS, COMPLETIONS).rewards
    torch.testing.assert_close(merged, modules, atol=1e-4, rtol=1e-4)
    assert torch.equal(provider.score(PROMPTS, COMPLETIONS).rewards, merged)  # the kept weights: same bits
    with torch.no_grad():
        assert torch.equal(rm(enc).cpu(), modules)  # scoring changed nothing in the model
    # Another adapter, then another base: each time the provider scores the model as it is now.
    for names in (["lora_"], ["q_proj.base_layer", "down_proj.base_layer"]):
        changed = perturb_and_score_with_modules(names)
        assert not torch.allclose(changed, modules, atol=1e-3)
        torch.testing.assert_close(provider.score(PROMPTS, COMPLETIONS).rewards, changed, atol=1e-4, rtol=1e-4)
        modules = changed
