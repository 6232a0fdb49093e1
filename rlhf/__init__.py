"""pluggable-rlhf: PPO and best-of-N over pluggable reward providers (see README.md)."""
