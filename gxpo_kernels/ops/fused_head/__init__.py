"""Fused linear head (hidden @ W.T + b never materialised): ``engine.py`` holds the Triton/PyTorch engine shared
by ``linear_grpo_loss`` and ``linear_fpa_logprobs``, and the public ``linear_token_logprobs`` op."""
from .engine import linear_token_logprobs

__all__ = ["linear_token_logprobs"]
