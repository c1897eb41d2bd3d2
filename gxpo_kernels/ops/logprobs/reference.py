"""Float64 PyTorch reference for ``token_logprobs`` (and, on materialised logits, ``linear_token_logprobs``).

Written for clarity, not speed: it materialises log_softmax over the whole vocabulary.
"""
from __future__ import annotations

import torch


def token_logprobs_ref(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """log pi(tokens) and the full-distribution entropy per position, in float64. Shapes (B, T, V) -> (B, T)."""
    z = logits.double() / temperature
    logprobs = torch.log_softmax(z, dim=-1)
    logp = logprobs.gather(-1, tokens.long().clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    # a -inf logit has p = 0 and adds 0 (not 0 * -inf = NaN) to the entropy and its gradient, as in the ops
    entropy = -(logprobs.exp() * logprobs.masked_fill(logprobs == float("-inf"), 0.0)).sum(-1)
    return logp, entropy
