"""The fused linear head engine (private; ``engine.py``): hidden @ W.T + b is never materialised. The public
ops built on it are ``linear_token_logprobs``, ``linear_grpo_loss`` and ``linear_fpa_logprobs``."""
