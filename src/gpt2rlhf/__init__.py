"""gpt2rlhf: a from-scratch GPT-2 for SFT, reward modelling and PPO."""

from .model import GPT, GPTConfig, GPTScalar, KVCache

__all__ = ["GPT", "GPTConfig", "GPTScalar", "KVCache"]
__version__ = "0.1.0"
