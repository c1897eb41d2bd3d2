"""Per-token log-probs and entropies from logits: ``op.py`` (Triton kernels, PyTorch path, public function),
``_library.py`` (its ``torch.library`` registration)."""
from .op import token_logprobs

__all__ = ["token_logprobs"]
