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


def tiny_ppo_cfg(tiny_llama_dir, tmp_path, *extra):
    return load_config(PPOConfig, None, [
        f"model.name={tiny_llama_dir}", "model.lora.r=4",
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

    from policies.text import encode_completions, sequence_logprob

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    with torch.no_grad():
        for n, p in ac.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    enc = encode_completions(ac.tokenizer, ["Hello there"], ["General Kenobi"], add_eos=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    expected = sequence_logprob(base, enc)
    assert torch.allclose(ac.reference_logprobs(enc).sum(-1), expected, atol=1e-4)
    out = ac(enc.input_ids, enc.attention_mask, enc.prompt_width)
    assert not torch.allclose(out.logprobs.sum(-1), expected, atol=1e-3)  # the policy adapter matters
    assert out.values.shape == out.logprobs.shape


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_fresh_policy_equals_the_reference_bit_for_bit(tiny_llama_dir, amp, kept):
    """With fresh adapters (B = 0) the policy is the reference, so the first update's KL must be
    exactly 0 in every token: the factored layers add the adapters' zero product exactly. Also
    when the policy continues a kept prompt pass (with gradients, as in the rollout) and the
    reference is taken in the same split shape."""
    from policies.packed import _parts, factored_layers, prompt_pass
    from policies.text import encode_completions

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    ac.store_frozen_in(amp, prepack=True)
    assert factored_layers(_parts(ac.policy)[1]) is not None
    enc = encode_completions(ac.tokenizer, ["Hello there", "Hi", "A longer prompt than the others"], ["General Kenobi", "How are you doing today?", "Yes"], add_eos=False)
    P = enc.prompt_width
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        with torch.no_grad():
            ref = ac.reference_logprobs(enc, split=kept)
        prompt = None
        if kept:
            with ac.adapter(POLICY):
                prompt = prompt_pass(ac.policy, enc.input_ids[:, :P], enc.attention_mask[:, :P])
        out = ac(enc.input_ids, enc.attention_mask, P, prompt=prompt)
    m = enc.completion_mask[:, P:].bool()
    assert out.logprobs.requires_grad  # the training forward's log-probs, graph and all
    assert torch.equal(out.logprobs.detach()[m], ref[m])


@pytest.mark.parametrize("layout", ["shared_lora", "shared_lora+joint_forward", "separate"])
def test_ppo_run_trains_policy_and_critic_and_logs(tiny_llama_dir, tmp_path, layout, monkeypatch):
    extra = {"separate": ["layout=separate", "model.lora.enabled=false"], "shared_lora+joint_forward": ["joint_forward=true"]}.get(layout, [])
    joint_calls = []
    real_joint = ActorCritic._joint_forward
    monkeypatch.setattr(ActorCritic, "_joint_forward", lambda self, *a: joint_calls.append(1) or real_joint(self, *a))
    import policies.actor_critic as ac_mod

    continued = []
    real_continued = ac_mod.continued_hidden_states
    monkeypatch.setattr(ac_mod, "continued_hidden_states", lambda *a: continued.append(1) or real_continued(*a))
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "eval_samples_per_prompt=2", "eval_batch_size=3", *extra)
    torch.manual_seed(0)
    before = ActorCritic.build(cfg.model, cfg.layout)
    init = {n: p.detach().clone() for n, p in before.trainable_named_parameters()}
    captured = {}
    import rlhf.ppo as ppo_mod

    real_update = ppo_mod.ppo_update

    def spy(model, optimizer, accelerator, ro, c, amp):
        out = real_update(model, optimizer, accelerator, ro, c, amp)
        captured["model"] = accelerator.unwrap_model(model)
        return out

    ppo_mod.ppo_update = spy
    try:
        torch.manual_seed(0)
        summary = run(cfg)
    finally:
        ppo_mod.ppo_update = real_update
    trained = dict(captured["model"].trainable_named_parameters())
    assert init.keys() == trained.keys()
    unchanged = [n for n in init if torch.equal(init[n], trained[n].detach())]
    assert not unchanged, (len(unchanged), len(init), unchanged[:5])
    assert len(joint_calls) == (2 if layout == "shared_lora+joint_forward" else 0)  # one step per update
    kept = layout == "shared_lora"  # on by default for shared_lora only
    assert len(continued) == (4 if kept else 0)  # per update: the policy continues its kept prompt pass, the reference its own
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward/raw_mean", "kl/k1", "kl/k3", "policy/entropy", "policy/clip_fraction", "loss/value",
                "value/explained_variance", "policy/approx_kl", "response/length", "response/no_eos_fraction",
                "tokens_per_s", "reward/invalid_fraction", "kl_coef", "memory/heap_in_use_mib", "memory/heap_free_mib"):
        assert key in metrics[-1], key
    assert metrics[0]["kl/k1"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert [m["rollout/prompt_pass_kept"] for m in metrics] == [float(kept)] * 2
    assert 10 < metrics[-1]["memory/heap_in_use_mib"] < 24 * 1024  # this process's live heap, models included
    assert metrics[-1]["kl/k3"] >= 0
    assert summary["eval_before"]["prompts"] == 2 and "reward_mean" in summary["eval_after"]
    assert summary["eval_change"]["prompts"] == 2
    assert len((tmp_path / "run" / "samples.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "run" / "reward_kl.png").read_bytes()[:4] == b"\x89PNG"
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "eval_samples_after.jsonl").read_text().splitlines()]
    assert [(e["index"], e["sample"]) for e in evaluated] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # 2 prompts × 2 samples


def _one_update(cfg, *, with_old, random_value_head=False, keep_prompt_pass=False):
    """One rollout of 4 fixed prompts and one ppo_update, seeded: (rollout, stats, parameters
    after, parameters before)."""
    from accelerate import Accelerator

    from policies.text import render_prompt
    from rewards.registry import build_provider
    from rlhf.ppo import RunningMoments, collect_rollout, ppo_update

    provider = build_provider(cfg.reward)
    torch.manual_seed(0)
    ac = ActorCritic.build(cfg.model, cfg.layout)
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
    ro = collect_rollout(ac, provider, prompts, cfg, 0.1, RunningMoments(), None, with_old=with_old, keep_prompt_pass=keep_prompt_pass)
    assert (ro.advantages is None) == (not with_old)
    assert (ro.prompt_pass is not None) == (keep_prompt_pass and not with_old)
    init = {n: p.detach().clone() for n, p in ac.trainable_named_parameters()}
    optimizer = torch.optim.AdamW([p for _, p in ac.trainable_named_parameters()], lr=cfg.lr)
    torch.manual_seed(2)
    stats = ppo_update(ac, optimizer, Accelerator(cpu=True), ro, cfg, None)
    return ro, stats, {n: p.detach().clone() for n, p in ac.trainable_named_parameters()}, init


def _assert_same_update(a, b, *, atol):
    (ro_a, stats_a, params_a, _), (ro_b, stats_b, params_b, _) = a, b
    for field in ("logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(getattr(ro_b, field), getattr(ro_a, field), atol=atol, rtol=1e-5)
    assert stats_a.keys() == stats_b.keys()
    for k in stats_a:
        assert stats_b[k] == pytest.approx(stats_a[k], rel=1e-4, abs=atol), k
    for n in params_a:
        torch.testing.assert_close(params_b[n], params_a[n], atol=atol, rtol=1e-4)


def test_fused_old_forward_matches_a_separate_no_grad_pass(tiny_llama_dir, tmp_path):
    """With one minibatch, π_old and V_old taken from the first training forward give the same
    advantages, the same statistics and the same trained parameters as a separate no-grad pass."""
    from rlhf.ppo import fuse_old_forward

    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "ppo_epochs=2")
    assert fuse_old_forward(cfg) and not fuse_old_forward(tiny_ppo_cfg(tiny_llama_dir, tmp_path, "num_minibatches=2"))
    separate, fused = _one_update(cfg, with_old=True), _one_update(cfg, with_old=False)
    _assert_same_update(separate, fused, atol=1e-5)
    params, init = separate[2], separate[3]
    assert any(not torch.equal(params[n], init[n]) for n in init)  # the update did train


@pytest.mark.parametrize("overrides, with_old", [(("ppo_epochs=2",), False), (("num_minibatches=2", "ppo_epochs=2"), True)])
def test_sequential_backward_gives_the_joint_update(tiny_llama_dir, tmp_path, overrides, with_old):
    """Policy, then critic in row chunks (never both graphs in full) trains exactly as one joint
    forward and backward, on a fused first step and on steps with known advantages."""
    joint, sequential = (
        _one_update(tiny_ppo_cfg(tiny_llama_dir, tmp_path, *overrides, f"sequential_backward={flag}", "critic_chunks=3"), with_old=with_old, random_value_head=True)
        for flag in ("false", "true")
    )
    _assert_same_update(joint, sequential, atol=1e-6)
    params, init = joint[2], joint[3]
    moved = [n for n in init if not torch.equal(params[n], init[n])]
    assert any(".policy." in n for n in moved) and any(".critic." in n for n in moved) and "value_head.linear.weight" in moved


@pytest.mark.parametrize("overrides, atol", [((), 1e-5), (("sequential_backward=false",), 1e-5), (("model.quantization=4bit",), 1e-5),
                                             (("layout=separate", "model.lora.enabled=false"), 1e-4)])
def test_kept_prompt_pass_gives_the_same_update(tiny_llama_dir, tmp_path, overrides, atol, monkeypatch):
    """The policy's pass over the prompts kept from sampling and continued by the first training
    forward (`keep_prompt_pass`, the reference then taken in the same split shape) samples the
    same completions and trains as a training forward over the whole rows, to rounding (full models: Adam's first steps, at lr 1e-2, turn gradient
    rounding on a near-zero gradient into differences up to 4e-5 in a parameter); the
    continuation really runs, once, and the rollout lets go of the pass."""
    import policies.actor_critic as ac_mod

    calls = []
    real = ac_mod.continued_hidden_states
    monkeypatch.setattr(ac_mod, "continued_hidden_states", lambda *a: calls.append(1) or real(*a))
    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "ppo_epochs=2", *overrides)
    whole = _one_update(cfg, with_old=False, random_value_head=True)
    assert not calls
    kept = _one_update(cfg, with_old=False, random_value_head=True, keep_prompt_pass=True)
    assert len(calls) == 2 and kept[0].prompt_pass is None  # the policy's continuation and the reference's, once each
    assert torch.equal(kept[0].enc.input_ids, whole[0].enc.input_ids)
    _assert_same_update(whole, kept, atol=atol)
    params, init = kept[2], kept[3]
    assert any(not torch.equal(params[n], init[n]) for n in init)


def test_prompt_pass_is_kept_only_where_the_first_forward_can_take_it():
    from rlhf.ppo import keeps_prompt_pass

    def keeps(*overrides, processes=1):
        return keeps_prompt_pass(load_config(PPOConfig, None, ["reward={type: bt, path: rm}", *overrides]), processes)

    assert keeps()
    assert not keeps("layout=separate", "model.lora.enabled=false")  # full models: off unless asked for
    assert keeps("layout=separate", "model.lora.enabled=false", "keep_prompt_pass=true")
    assert not keeps(processes=2)  # DDP: a training step is one forward of the wrapped module
    assert not keeps("num_minibatches=2") and not keeps("grad_accum_steps=2")  # no fused first step
    assert not keeps("joint_forward=true") and not keeps("keep_prompt_pass=false")


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_reward_adapter_on_the_shared_base_scores_like_the_standalone_model(tiny_llama_dir, tmp_path, amp):
    """A LoRA reward model trained on the policy's base runs as a frozen adapter on that base:
    same scores as the model loaded on its own, the policy is untouched, nothing new trains."""
    from policies.packed import stack_frozen_projections
    from rewards.reward_model import RewardModelProvider, load_reward_model, new_reward_model

    torch.manual_seed(0)
    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4, last_layers=1)), "linear")
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n or n == "head.net.0.weight":  # as trained: adapter and head not at their zero init
                p.normal_()
    rm.save(tmp_path / "rm")
    prompts, completions = ["Hi there", "What is 2+2?", "Tell me a joke"], ["Hello!", "4", "No."]
    mode = "none" if amp is None else "bfloat16"
    alone = RewardModelProvider(load_reward_model(tmp_path / "rm"), autocast_mode=mode).score(prompts, completions).rewards

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    with torch.no_grad():
        for n, p in ac.policy.named_parameters():
            if "lora_B" in n:
                p.normal_()
    trainable = [n for n, _ in ac.trainable_named_parameters()]
    enc = rm.encode(prompts, completions)
    stack_frozen_projections(ac.policy)  # as store_frozen_in below will: the same (factored) pass before and after
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        policy_before = ac(enc.input_ids, enc.attention_mask, enc.prompt_width).logprobs
    shared_rm = ac.attach_reward_model(str(tmp_path / "rm"))
    assert shared_rm is not None
    ac.store_frozen_in(amp)
    shared = RewardModelProvider(shared_rm, autocast_mode=mode).score(prompts, completions).rewards
    torch.testing.assert_close(shared, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shared, torch.zeros_like(shared))
    assert ac.policy.active_adapter == POLICY
    assert [n for n, _ in ac.trainable_named_parameters()] == trainable  # the reward adapter stays frozen
    assert all(p.requires_grad for _, p in ac.trainable_named_parameters())
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        policy_after = ac(enc.input_ids, enc.attention_mask, enc.prompt_width).logprobs
    torch.testing.assert_close(policy_after, policy_before, atol=1e-5, rtol=1e-5)


def test_critic_can_start_as_the_reward_model(tiny_llama_dir, tmp_path):
    """With the reward adapter copied into the critic adapter and the reward head into the value
    head, V(s_t) is the reward model's head on the reward model's own hidden states."""
    from policies.text import encode_completions
    from rewards.reward_model import new_reward_model

    torch.manual_seed(0)
    lora = LoraConfig(enabled=True, r=4)
    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=lora), "linear")
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if "lora_B" in n or n == "head.net.0.weight":  # as trained: adapter and head not at their zero init
                p.normal_()
    rm.save(tmp_path / "rm")
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=lora), "shared_lora")
    shared = ac.attach_reward_model(str(tmp_path / "rm"))
    ac.init_value_head_from_reward_model(str(tmp_path / "rm"))
    assert ac.init_critic_adapter_from_reward() > 0
    enc = encode_completions(ac.tokenizer, ["Hi there", "What is 2+2?"], ["Hello!", "4"])
    with torch.no_grad():
        values = ac(enc.input_ids, enc.attention_mask, enc.prompt_width).values  # V(s_t), t = 0 … C-1
        hidden = shared.hidden_states(enc)
    P = enc.prompt_width
    from_rm = shared.head(hidden[:, P - 1 : -1])  # the reward head on the reward adapter's hidden states
    torch.testing.assert_close(values, from_rm.float(), atol=1e-5, rtol=1e-5)
    assert [n for n, _ in ac.trainable_named_parameters()] == [n for n, _ in ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=lora), "shared_lora").trainable_named_parameters()]


def test_reward_model_on_another_base_is_not_shared(tiny_llama_dir, tmp_path):
    from rewards.reward_model import new_reward_model

    rm = new_reward_model(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=False)), "linear")
    rm.save(tmp_path / "rm_full")  # fully fine-tuned: its own backbone, nothing to share
    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4)), "shared_lora")
    assert ac.attach_reward_model(str(tmp_path / "rm_full")) is None



def test_ppo_update_moves_log_probs_in_the_direction_of_the_reward(tiny_llama_dir, tmp_path):
    """End-to-end direction check: completions the reward likes become more likely, the ones it
    dislikes less likely, after a few PPO epochs on one rollout (sign and plumbing of rewards,
    GAE, whitening, the clipped loss and the optimizer together)."""
    from accelerate import Accelerator

    from policies.text import render_prompt
    from rewards.registry import build_provider
    from rlhf.ppo import RunningMoments, collect_rollout, ppo_update

    cfg = tiny_ppo_cfg(tiny_llama_dir, tmp_path, "reward={type: function, path: 'reward_fns:prompt_sign'}",
                       "kl.coef=0.0", "ppo_epochs=4", "lr=3e-3")
    provider = build_provider(cfg.reward)
    torch.manual_seed(0)
    ac = ActorCritic.build(cfg.model, cfg.layout)
    ac.temperature = cfg.sampling.temperature
    prompts = [(p, render_prompt(ac.tokenizer, p)) for p in ["a good question", "a bad question", "another good one", "another bad one"]]
    ro = collect_rollout(ac, provider, prompts, cfg, 0.0, RunningMoments(), None)
    assert ro.raw_scores.tolist() == [1.0, -1.0, 1.0, -1.0]
    optimizer = torch.optim.AdamW([p for _, p in ac.trainable_named_parameters()], lr=cfg.lr)
    ppo_update(ac, optimizer, Accelerator(cpu=True), ro, cfg, None)
    with torch.no_grad():
        after = ac(ro.enc.input_ids, ro.enc.attention_mask, ro.enc.prompt_width).logprobs
    change = ((after - ro.logprobs) * ro.mask).sum(-1)  # Δ log π(y|x) per sample
    assert change[0] > 0 and change[2] > 0, change
    assert change[1] < 0 and change[3] < 0, change


def test_critic_chunks_default_follows_the_layout():
    from rlhf.ppo import critic_chunks

    def chunks(*overrides):
        return critic_chunks(load_config(PPOConfig, None, ["reward={type: bt, path: rm}", *overrides]))

    assert chunks() == 1  # shared_lora: the critic's small graph fits beside the policy's
    assert chunks("layout=separate", "model.lora.enabled=false") == 4  # full fp32 models: 4 chunks
    assert chunks("layout=separate", "model.lora.enabled=false", "critic_chunks=2") == 2
    with pytest.raises(ValueError, match="critic_chunks"):
        chunks("critic_chunks=0")


@pytest.mark.parametrize("amp, checkpointing, last_layers", [(None, False, None), (torch.bfloat16, False, None), (None, True, None), (None, False, 1)])
def test_joint_pass_of_policy_and_critic_equals_the_two_passes(tiny_llama_dir, amp, checkpointing, last_layers, monkeypatch):
    """The policy and the critic as one batched pass over their shared base (each half of the rows
    with its own adapter, `adapter_sets`) give the log-probs, entropy and values of the two
    passes, and the same gradients for both adapters and the value head, to rounding, also with
    activation checkpointing; the grouped low-rank path and the grouped `_GatedDown` really run
    (counted). With adapters on the top layer only, the layer below runs once, on one copy."""
    import policies.packed as pk
    from policies.models import enable_activation_checkpointing
    from policies.text import encode_completions

    ac = ActorCritic.build(ModelConfig(name=str(tiny_llama_dir), lora=LoraConfig(enabled=True, r=4, last_layers=last_layers)), "shared_lora")
    ac.store_frozen_in(amp)
    if checkpointing:
        assert enable_activation_checkpointing(ac.policy) == 2
    torch.manual_seed(3)
    with torch.no_grad():  # trained-looking adapters that differ, and a value head that reads them
        for n, p in ac.trainable_named_parameters():
            p.normal_(0, 0.2)
    assert ac.can_run_jointly(16)
    enc = encode_completions(ac.tokenizer, ["Hello there", "Hi", "A longer prompt than the others"], ["General Kenobi", "How are you doing today?", "Yes"], add_eos=False)
    m = enc.completion_mask[:, enc.prompt_width :].bool()
    grouped, layer_rows = [], []
    real, real_layer = pk._plus_low_rank, pk._layer_forward

    def counting(y, x, a, b):
        grouped.append(a.dim() == 3)
        return real(y, x, a, b)

    def layer_counting(layer, x, *args):
        layer_rows.append(x.shape[0])
        return real_layer(layer, x, *args)

    monkeypatch.setattr(pk, "_plus_low_rank", counting)
    monkeypatch.setattr(pk, "_layer_forward", layer_counting)

    def run(joint):
        ac.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = ac(enc.input_ids, enc.attention_mask, enc.prompt_width, joint=joint)
        g = torch.Generator().manual_seed(4)
        w1, w2 = torch.randn(m.shape, generator=g), torch.randn(m.shape, generator=g)
        ((out.logprobs.float() * w1)[m].sum() + (out.values.float() * w2)[m].sum()).backward()
        return out, {n: p.grad.clone() for n, p in ac.trainable_named_parameters() if p.grad is not None}

    two, grads_two = run(False)
    assert grouped and not any(grouped)
    n = layer_rows[0]  # the packed rows of one copy
    grouped.clear()
    layer_rows.clear()
    joint, grads_joint = run(True)
    assert grouped and all(grouped)
    adapted = 1 if last_layers else 2  # of the tiny model's 2 layers
    # q/k/v, o, gate/up and down (inside `_GatedDown`) of each adapted layer; recomputed with checkpointing
    assert len(grouped) == 4 * adapted * (2 if checkpointing else 1)
    assert layer_rows[:2] == ([n, 2 * n] if last_layers else [2 * n, 2 * n])
    tol = dict(atol=1e-5, rtol=1e-5) if amp is None else dict(atol=2e-2, rtol=2e-2)
    for field in ("logprobs", "entropy", "values"):
        torch.testing.assert_close(getattr(joint, field)[m].float(), getattr(two, field)[m].float(), **tol)
    assert grads_joint.keys() == grads_two.keys()
    assert any(".critic." in n for n in grads_two) and any(".policy." in n for n in grads_two) and "value_head.linear.weight" in grads_two
    for n in grads_two:
        scale = grads_two[n].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads_joint[n] / scale, grads_two[n] / scale, **tol, msg=n)
