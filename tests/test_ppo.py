"""The PPO loop on a tiny model: it trains what it should, leaves the reference alone, and the
adapter switch restores state even when an exception escapes."""

from __future__ import annotations

import json

import pytest
import torch

from policies.actor_critic import CRITIC, POLICY, ActorCritic
from rlhf.config import LoraConfig, ModelConfig, load_config
from rlhf.ppo import PPOConfig, run

from conftest import HH_TEST


def tiny_ppo_cfg(tiny_llama_dir, tmp_path, *extra, device="cpu"):
    return load_config(PPOConfig, None, [
        f"model.name={tiny_llama_dir}", "model.lora.r=4", f"model.device={device}",
        "reward={type: function, path: 'reward_fns:length_reward'}",
        f"prompts.path={HH_TEST}", f"eval_prompts.path={HH_TEST}", "eval_prompts.max_items=2",
        "updates=2", "batch_size=4", "sampling.max_new_tokens=6", f"output_dir={tmp_path / 'run'}",
        "autocast=none", "sample_every=1", "lr=1e-2", *extra,
    ])


def test_adapter_switch_restores_on_exception(tiny_llama_dir):
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    assert ac.policy.active_adapter == POLICY
    with pytest.raises(RuntimeError):
        with ac.adapter(CRITIC):
            assert ac.policy.active_adapter == CRITIC
            raise RuntimeError("boom")
    assert ac.policy.active_adapter == POLICY
    # Both adapters stay trainable whichever is active (peft's set_adapter would freeze one).
    names = [n for n, p in ac.trainable_named_parameters()]
    assert any(f".{POLICY}." in n for n in names) and any(f".{CRITIC}." in n for n in names)
    assert all(p.requires_grad for _, p in ac.trainable_named_parameters())


def test_reference_logprobs_are_the_base_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from policies.engine import HFEngine
    from policies.text import encode_completions, sequence_logprob

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    with torch.no_grad():
        for n, p in ac.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    enc = encode_completions(ac.tokenizer, ["Hello there"], ["General Kenobi"], add_eos=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expected = sequence_logprob(HFEngine(), base, enc)
    assert torch.allclose(ac.reference_logprobs(enc).sum(-1), expected, atol=1e-4)
    out = ac(enc.input_ids, enc.attention_mask, enc.prompt_width)
    assert not torch.allclose(out.logprobs.sum(-1), expected, atol=1e-3)  # the policy adapter matters
    assert out.values.shape == out.logprobs.shape


def _sampled_rows(ac, prompts, *, for_training, max_new_tokens=6):
    """Sample from `ac` as the rollout does; the (B, P + C) rows as an `Encoded` and the mask."""
    from policies.text import Encoded, render_prompt
    from rlhf.config import SamplingConfig
    from rlhf.core import truncate_after_eos

    tok = ac.tokenizer
    batch = tok([render_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    with ac.autocast():
        out = ac.generate(ids, attn, SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, for_training=for_training).cpu()
    completion, mask, _ = truncate_after_eos(out[:, ids.shape[1] :], tok.eos_token_id, tok.pad_token_id)
    return Encoded(torch.cat([ids, completion], 1), torch.cat([attn, mask], 1), torch.cat([torch.zeros_like(attn), mask], 1), ids.shape[1]), mask


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_fresh_policy_equals_the_reference_bit_for_bit(tiny_llama_dir, autocast, kept):
    """With fresh adapters (B = 0) the policy is the reference, so the first update's KL must be
    exactly 0 in every token: the factored layers add the adapters' zero product exactly. Also
    when the policy's training forward continues the prompt pass kept from sampling (the
    reference then taken in the same split shape)."""
    # the packed CPU engine's factored layers and kept prompt pass
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4), device="cpu"), "shared_lora", autocast=autocast)
    ac.prepare_frozen()
    torch.manual_seed(0)
    enc, mask = _sampled_rows(ac, ["Hello there", "Hi", "A longer prompt than the others"], for_training=kept)
    with ac.autocast():
        ref = ac.reference_logprobs(enc)
        logp, _ = ac.policy_forward(enc.input_ids, enc.attention_mask, enc.prompt_width)
    assert ac.metrics()["engine/prompt_pass_reused"] == float(kept)
    m = mask.bool()
    assert logp.requires_grad  # the training forward's log-probs, graph and all
    assert torch.equal(logp.detach()[m], ref[m])


def test_engine_choice():
    """'auto' runs Llama-family models padding-free on the CPU; 'hf' runs transformers' forward;
    'packed' refuses a model it can't run."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from policies.engine import HFEngine
    from policies.engine_choice import build_engine
    from policies.packed import PackedEngine

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    llama.config._attn_implementation = "eager"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    cpu = torch.device("cpu")
    assert isinstance(build_engine("auto", llama, cpu), PackedEngine)
    assert type(build_engine("hf", llama, cpu)) is HFEngine
    assert type(build_engine("auto", gpt2, cpu)) is HFEngine
    with pytest.raises(ValueError, match="packed"):
        build_engine("packed", gpt2, cpu)


@pytest.mark.parametrize("layout", ["shared_lora", "shared_lora+hf", "separate"])
def test_ppo_run_trains_policy_and_critic_and_logs(tiny_llama_dir, tmp_path, layout, monkeypatch, device):
    extra = {"separate": ["layout=separate", "model.lora.enabled=false"], "shared_lora+hf": ["model.engine=hf"]}.get(layout, [])
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "eval_samples_per_prompt=2", "eval_batch_size=3", *extra, device=device)
    torch.manual_seed(0)
    before = ActorCritic.build(cfg.model, cfg.layout)
    init = {n: p.detach().clone() for n, p in before.trainable_named_parameters()}
    captured = {}
    import rlhf.ppo as ppo_mod

    real_update = ppo_mod.ppo_update

    def spy(model, ac, *args):
        out = real_update(model, ac, *args)
        captured["model"] = ac
        return out

    monkeypatch.setattr(ppo_mod, "ppo_update", spy)
    torch.manual_seed(0)
    summary = run(cfg)
    trained = dict(captured["model"].trainable_named_parameters())
    packed = layout != "shared_lora+hf" and device.type == "cpu"  # `auto`: the packed engine on the CPU, hf on a GPU
    assert captured["model"].engine.name == ("packed" if packed else "hf")
    assert init.keys() == trained.keys()
    unchanged = [n for n in init if torch.equal(init[n], trained[n].detach())]
    assert not unchanged, (len(unchanged), len(init), unchanged[:5])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward/raw_mean", "kl/k1", "kl/k3", "policy/entropy", "policy/clip_fraction", "loss/value",
                "value/explained_variance", "policy/approx_kl", "response/length", "response/no_eos_fraction",
                "tokens_per_s", "reward/invalid_fraction", "kl_coef", "grad_norm"):
        assert key in metrics[-1], key
    assert metrics[0]["kl/k1"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    kept = layout == "shared_lora" and packed  # on by default for shared_lora, on the packed engine
    assert [m["engine/prompt_pass_reused"] for m in metrics] == [float(kept)] * 2
    if packed:  # the packed CPU engine reports glibc's heap: at least the models' weights live in it
        weights_mib = sum(p.numel() * p.element_size() for p in captured["model"].parameters()) / 2**20
        assert metrics[-1]["memory/heap_in_use_mib"] >= weights_mib and metrics[-1]["memory/heap_free_mib"] >= 0
    else:
        assert "memory/heap_in_use_mib" not in metrics[-1]
    assert metrics[-1]["kl/k3"] >= 0
    assert summary["eval_before"]["prompts"] == 2 and "reward_mean" in summary["eval_after"]
    assert summary["eval_change"]["prompts"] == 2
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "run" / "reward_kl.png").read_bytes()[:4] == b"\x89PNG"
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "eval_samples_after.jsonl").read_text().splitlines()]
    assert [(e["index"], e["sample"]) for e in evaluated] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # 2 prompts × 2 samples


class _OneForward:
    """The accelerator, but the loop takes its multi-process path: one forward of the wrapped
    module and one backward per step (as under DDP), on this one process."""

    num_processes = 2

    def __init__(self, accelerator):
        self._acc = accelerator

    def __getattr__(self, name):
        return getattr(self._acc, name)


def _one_update(cfg, *, for_training=False, random_value_head=False, one_forward=False):
    """One rollout of 4 fixed prompts and one ppo_update, seeded: (experience, stats, parameters
    after, parameters before, prompt passes reused)."""
    from accelerate import Accelerator

    from policies.text import render_prompt
    from rewards.registry import build_provider
    from rlhf.ppo import RunningMoments, collect_rollout, ppo_update

    provider = build_provider(cfg.reward)
    torch.manual_seed(0)
    ac = ActorCritic.build(cfg.model, cfg.layout, cfg.engine, cfg.autocast)
    if random_value_head:  # a critic that is not V ≡ 0, so value gradients and clipping matter
        with torch.no_grad():
            ac.value_head.linear.weight.normal_(0, 0.3)
    ac.temperature = cfg.sampling.temperature
    if cfg.model.quantization != "none":
        # bitsandbytes repacks 4-bit weights for its CPU kernel on the first call without
        # gradients, and the repacked kernel rounds differently (about 1e-4 relative here): one
        # such call first, so that every pass compared runs on the same kernel.
        with torch.no_grad():
            ac.policy(input_ids=torch.tensor([[1, 2]]))
    prompts = [(p, render_prompt(ac.tokenizer, p)) for p in ["Hi there", "How are you?", "Tell me a joke", "What is 2+2?"]]
    torch.manual_seed(1)
    ro = collect_rollout(ac, provider, prompts, cfg, 0.1, RunningMoments(), for_training=for_training)
    init = {n: p.detach().clone() for n, p in ac.trainable_named_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in ac.trainable_named_parameters()], lr=cfg.lr)
    accelerator = Accelerator(cpu=cfg.model.device == "cpu")
    torch.manual_seed(2)
    b_exp, stats = ppo_update(ac, ac, optimizer, _OneForward(accelerator) if one_forward else accelerator, ro, cfg)
    reused = ac.metrics()["engine/prompt_pass_reused"]
    return (ro, b_exp), stats, {n: p.detach().clone() for n, p in ac.trainable_named_parameters()}, init, reused


def _assert_same_update(a, b, *, atol):
    ((ro_a, exp_a), stats_a, params_a, *_), ((ro_b, exp_b), stats_b, params_b, *_) = a, b
    assert torch.equal(ro_a.enc.input_ids, ro_b.enc.input_ids)  # the same samples
    for field in ("logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(exp_b, field), getattr(exp_a, field), atol=atol, rtol=1e-5)
    assert stats_a.keys() == stats_b.keys()
    for k in stats_a:
        assert stats_b[k] == pytest.approx(stats_a[k], rel=1e-4, abs=atol), k
    for n in params_a:
        torch.testing.assert_close(params_b[n], params_a[n], atol=atol, rtol=1e-4)


def test_fused_old_forward_matches_a_separate_no_grad_pass(tiny_llama_dir, tmp_path, monkeypatch, device):
    """With one minibatch, π_old and V_old taken from the first training forward give the same
    advantages, the same statistics and the same trained parameters as a separate no-grad pass."""
    import rlhf.ppo as ppo_mod

    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "ppo_epochs=2", device=device)
    assert ppo_mod.fuse_old_forward(cfg) and not ppo_mod.fuse_old_forward(tiny_ppo_cfg(tiny_llama_dir, tmp_path, "num_minibatches=2"))
    fused = _one_update(cfg)
    monkeypatch.setattr(ppo_mod, "fuse_old_forward", lambda c: False)
    separate = _one_update(cfg)
    _assert_same_update(separate, fused, atol=1e-5)
    params, init = separate[2], separate[3]
    assert any(not torch.equal(params[n], init[n]) for n in init)  # the update did train


@pytest.mark.parametrize("overrides", [("ppo_epochs=2",), ("num_minibatches=2", "ppo_epochs=2"), ("layout=separate", "model.lora.enabled=false")])
def test_split_backward_gives_the_one_forward_update(tiny_llama_dir, tmp_path, overrides, device):
    """One process backpropagates the critic in row chunks and the policy apart (never both
    graphs in full); it trains exactly as one forward and one backward of the whole loss (the
    DDP path), on a fused first step and on steps with known advantages."""
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, *overrides, "engine.critic_chunks=3", device=device)
    one, split = (_one_update(cfg, random_value_head=True, one_forward=flag) for flag in (True, False))
    _assert_same_update(one, split, atol=1e-5 if "layout=separate" in overrides else 1e-6)
    params, init = one[2], one[3]
    moved = [n for n in init if not torch.equal(params[n], init[n])]
    assert any(n.startswith("policy.") for n in moved) and "value_head.linear.weight" in moved
    if "layout=separate" not in overrides:
        assert any(".policy." in n for n in moved) and any(".critic." in n for n in moved)


@pytest.mark.parametrize("overrides, atol", [((), 1e-5), (("model.quantization=4bit",), 1e-5),
                                             (("layout=separate", "model.lora.enabled=false", "engine.keep_prompt_pass=true"), 1e-4)])
def test_kept_prompt_pass_gives_the_same_update(tiny_llama_dir, tmp_path, overrides, atol):
    """The policy's pass over the prompts kept from sampling and continued by the first training
    forward (the reference then taken in the same split shape) samples the same completions and
    trains as a training forward over the whole rows, to rounding (full models: Adam's first
    steps, at lr 1e-2, turn gradient rounding on a near-zero gradient into differences up to
    4e-5 in a parameter); the continuation really runs, once."""
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "ppo_epochs=2", *overrides)
    whole = _one_update(cfg, random_value_head=True)
    kept = _one_update(cfg, for_training=True, random_value_head=True)
    assert whole[4] == 0 and kept[4] == 1
    _assert_same_update(whole, kept, atol=atol)
    params, init = kept[2], kept[3]
    assert any(not torch.equal(params[n], init[n]) for n in init)


def test_engine_settings_defaults_follow_the_layout(tiny_llama_dir):
    """The critic runs in one chunk and the prompt pass is kept for shared_lora; full models run
    the critic in 4 chunks and keep no pass unless asked; the settings override both."""
    from rlhf.config import ConfigError, EngineConfig

    lora, full = ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), ModelConfig(name=str(tiny_llama_dir))
    shared = ActorCritic.build(lora, "shared_lora")
    assert (shared.critic_chunks, shared.keep_prompt_pass) == (1, True)
    assert [len(c) for c in shared.critic_row_chunks(4)] == [4]
    separate = ActorCritic.build(full, "separate")
    assert (separate.critic_chunks, separate.keep_prompt_pass) == (4, False)
    assert [len(c) for c in separate.critic_row_chunks(3)] == [1, 1, 1]
    tuned = ActorCritic.build(full, "separate", EngineConfig(critic_chunks=2, keep_prompt_pass=True))
    assert (tuned.critic_chunks, tuned.keep_prompt_pass) == (2, True)
    with pytest.raises(ConfigError, match="engine: critic_chunks must be at least 1"):
        load_config(PPOConfig, None, ["reward={type: bt, path: rm}", "engine.critic_chunks=0"])


def _trained_looking_reward_model(tiny_llama_dir, path, lora):
    from rewards.reward_model import new_reward_model

    torch.manual_seed(0)
    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=lora), "linear")
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n or n == "head.net.0.weight":  # as trained: adapter and head not at their zero init
                p.normal_()
    rm.save(path)


@pytest.mark.parametrize("autocast", ["none", "bfloat16"])
def test_reward_adapter_on_the_shared_base_scores_like_the_standalone_model(tiny_llama_dir, tmp_path, autocast):
    """A LoRA reward model trained on the policy's base runs as a frozen adapter on that base:
    same scores as the model loaded on its own, the policy is untouched, nothing new trains."""
    from rewards.registry import build_provider

    _trained_looking_reward_model(tiny_llama_dir, tmp_path / "rm", LoraConfig(enabled=True, r=4, last_layers=1))
    spec = {"type": "bt", "path": str(tmp_path / "rm"), "autocast": autocast}
    prompts, completions = ["Hi there", "What is 2+2?", "Tell me a joke"], ["Hello!", "4", "No."]
    alone_provider = build_provider(spec)
    assert alone_provider.shared_adapter() is None
    alone = alone_provider.score(prompts, completions).rewards

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora", autocast=autocast)
    with torch.no_grad():
        for n, p in ac.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    trainable = [n for n, _ in ac.trainable_named_parameters()]
    enc = alone_provider.model.encode(prompts, completions)
    ac.engine.prepare_frozen(ac.policy)  # as prepare_frozen below will: the same (factored) pass before and after
    with ac.autocast():
        policy_before = ac(enc.input_ids, enc.attention_mask, enc.prompt_width).logprobs
    provider = build_provider(spec, host=ac)
    assert provider.shared_adapter() == "reward"
    ac.prepare_frozen()
    shared = provider.score(prompts, completions).rewards
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared, torch.zeros_like(shared))
    assert ac.policy.active_adapter == POLICY
    assert [n for n, _ in ac.trainable_named_parameters()] == trainable  # the reward adapter stays frozen
    assert all(p.requires_grad for _, p in ac.trainable_named_parameters())
    with ac.autocast():
        policy_after = ac(enc.input_ids, enc.attention_mask, enc.prompt_width).logprobs
    torch.testing.assert_close(policy_after, policy_before, atol=1e-5, rtol=1e-5)


def test_critic_can_start_as_the_reward_model(tiny_llama_dir, tmp_path):
    """With the reward adapter copied into the critic adapter and the reward head into the value
    head, V(s_t) is the reward model's head on the reward model's own hidden states."""
    from policies.text import encode_completions
    from rewards.registry import build_provider

    lora = LoraConfig(enabled=True, r=4)
    _trained_looking_reward_model(tiny_llama_dir, tmp_path / "rm", lora)
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=lora), "shared_lora")
    provider = build_provider({"type": "bt", "path": str(tmp_path / "rm")}, host=ac)
    ac.init_value_head_from_reward_model(str(tmp_path / "rm"))
    assert ac.init_critic_adapter_from(provider.shared_adapter()) > 0
    enc = encode_completions(ac.tokenizer, ["Hi there", "What is 2+2?"], ["Hello!", "4"])
    with torch.no_grad():
        values = ac(enc.input_ids, enc.attention_mask, enc.prompt_width).values  # V(s_t), t = 0 … C-1
        hidden = provider.model.hidden_states(enc)
    P = enc.prompt_width
    from_rm = provider.model.head(hidden[:, P - 1 : -1])  # the reward head on the reward adapter's hidden states
    torch.testing.assert_close(values, from_rm.float(), atol=1e-5, rtol=1e-5)
    assert [n for n, _ in ac.trainable_named_parameters()] == [n for n, _ in ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=lora), "shared_lora").trainable_named_parameters()]


def test_reward_model_on_another_base_is_not_shared(tiny_llama_dir, tmp_path):
    from rewards.registry import build_provider
    from rewards.reward_model import new_reward_model

    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=False)), "linear")
    rm.save(tmp_path / "rm_full")  # fully fine-tuned: its own backbone, nothing to share
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    provider = build_provider({"type": "bt", "path": str(tmp_path / "rm_full")}, host=ac)
    assert provider.shared_adapter() is None
    assert "reward" not in ac.policy.peft_config


def test_ppo_update_moves_log_probs_in_the_direction_of_the_reward(tiny_llama_dir, tmp_path, device):
    """End-to-end direction check: completions the reward likes become more likely, the ones it
    dislikes less likely, after a few PPO epochs on one rollout (sign and plumbing of rewards,
    GAE, whitening, the clipped loss and the optimizer together)."""
    from accelerate import Accelerator

    from policies.text import render_prompt
    from rewards.registry import build_provider
    from rlhf.ppo import RunningMoments, collect_rollout, ppo_update

    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "reward={type: function, path: 'reward_fns:prompt_sign'}",
                       "kl.coef=0.0", "ppo_epochs=4", "lr=3e-3", device=device)
    provider = build_provider(cfg.reward)
    torch.manual_seed(0)
    ac = ActorCritic.build(cfg.model, cfg.layout, autocast=cfg.autocast)
    ac.temperature = cfg.sampling.temperature
    prompts = [(p, render_prompt(ac.tokenizer, p)) for p in ["a good question", "a bad question", "another good one", "another bad one"]]
    ro = collect_rollout(ac, provider, prompts, cfg, 0.0, RunningMoments())
    assert ro.raw_scores.tolist() == [1.0, -1.0, 1.0, -1.0]
    optimizer = torch.optim.AdamW([p for _, p in ac.trainable_named_parameters()], lr=cfg.lr)
    b_exp, _ = ppo_update(ac, ac, optimizer, Accelerator(cpu=True), ro, cfg)
    with torch.no_grad():
        after = ac(ro.enc.input_ids, ro.enc.attention_mask, ro.enc.prompt_width).logprobs
    change = ((after.cpu() - b_exp.logprobs) * ro.mask).sum(-1)  # Δ log π(y|x) per sample
    assert change[0] > 0 and change[2] > 0, change
    assert change[1] < 0 and change[3] < 0, change


def test_unjudged_samples_are_masked_out_of_the_losses(tiny_llama_dir, tmp_path, monkeypatch):
    """A sample the provider could not judge trains as nothing, not as reward 0: its advantages
    and returns are 0, and whatever score it carries leaves the update unchanged; treating it as
    a judged sample with reward 0 (the old behaviour) gives a different update."""
    import rlhf.ppo as ppo_mod

    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "reward={type: function, path: 'reward_fns:none_for_jokes'}", "ppo_epochs=2")
    masked = _one_update(cfg, random_value_head=True)
    (ro, exp) = masked[0]
    assert ro.valid.tolist() == [True, True, False, True]  # "Tell me a joke" is the third prompt
    assert ro.mask[2].sum() > 0 and ro.loss_mask[2].sum() == 0
    assert torch.all(exp.advantages[2] == 0) and torch.all(exp.returns[2] == 0)
    assert torch.all(exp.logprobs[2] != 0)  # kept for the KL metrics

    real_shaped = ppo_mod.shaped_scores
    monkeypatch.setattr(ppo_mod, "shaped_scores", lambda result, *a: torch.where(result.valid, real_shaped(result, *a), torch.full_like(result.rewards, 100.0)))
    other_score = _one_update(cfg, random_value_head=True)
    _assert_same_update(masked, other_score, atol=1e-6)

    monkeypatch.setattr(ppo_mod, "shaped_scores", real_shaped)
    from rewards.base import RewardResult
    from rewards.registry import build_provider

    provider = build_provider(cfg.reward)
    real_score = type(provider).score
    monkeypatch.setattr(type(provider), "score", lambda self, p, c: (lambda r: RewardResult(r.rewards, torch.ones_like(r.valid), r.extras))(real_score(self, p, c)))
    as_zero = _one_update(cfg, random_value_head=True)
    params, params_zero = masked[2], as_zero[2]
    assert any(not torch.allclose(params[n], params_zero[n], atol=1e-6) for n in params)


def test_run_stops_when_too_many_samples_are_unjudged(tiny_llama_dir, tmp_path):
    from rlhf.ppo import TooManyInvalidError, check_invalid

    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "reward={type: function, path: 'reward_fns:never'}", "eval_prompts=null", "max_invalid_fraction=0.5")
    with pytest.raises(TooManyInvalidError, match=r"update 1: the reward provider 'never' could not judge 4 of 4 samples"):
        run(cfg)
    check_invalid(2, 4, cfg, 1, "judge")  # exactly at the threshold: goes on
    with pytest.raises(TooManyInvalidError):
        check_invalid(3, 4, cfg, 1, "judge")
