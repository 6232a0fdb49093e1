"""Reward functions in TRL's convention, imported by dotted path ('reward_fns:length_reward')
in tests/test_rewards_interface.py. pytest puts tests/ on sys.path (rootdir-relative import
mode, no __init__.py), so this module is importable as top-level `reward_fns`."""


def length_reward(prompts, completions, scale=1.0, **kwargs):
    """r = scale · len(completion), in characters."""
    return [scale * len(c) for c in completions]


def none_if_empty(prompts, completions, **kwargs):
    """Can't judge an empty completion: None there, 1.0 elsewhere."""
    return [None if not c else 1.0 for c in completions]


def prompt_sign(prompts, completions, **kwargs):
    """+1 where the prompt says 'good', −1 elsewhere (a reward whose direction is known)."""
    return [1.0 if "good" in str(p) else -1.0 for p in prompts]


NOT_CALLABLE = 42


def none_for_jokes(prompts, completions, **kwargs):
    """Can't judge a completion of a prompt that asks for a joke: None there; its length elsewhere."""
    return [None if "joke" in str(p) else float(len(c)) for p, c in zip(prompts, completions)]


def never(prompts, completions, **kwargs):
    """A judge that never answers."""
    return [None for _ in completions]
