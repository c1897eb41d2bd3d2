"""Per-token log-probs and entropies: ``token_logprobs`` from logits (``op.py`` over the registered op of
``_library.py`` and the kernels of ``kernel.py``) and ``linear_token_logprobs`` from hidden states
(``linear.py``, on the fused linear head engine). Float64 reference: ``reference.py``."""
from .linear import linear_token_logprobs
from .op import token_logprobs

__all__ = ["token_logprobs", "linear_token_logprobs"]
