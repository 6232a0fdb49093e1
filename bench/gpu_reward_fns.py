"""A cheap reward for bench/gpu_ppo_update.py (named 'gpu_reward_fns:length_reward' there; the
driver runs from bench/, so this module is importable by that name): the GPU check times the
PPO update on random weights, where no learned reward would mean anything either."""


def length_reward(prompts, completions, scale=0.01, **kwargs):
    """r = scale · len(completion) in characters (TRL's reward-function convention)."""
    return [scale * len(c) for c in completions]
