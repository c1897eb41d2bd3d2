"""Public ops (functions and modules only; kernels and references stay in their modules)."""
from .grpo_loss import GRPOLoss, grpo_loss
from .token_logprobs import token_logprobs

__all__ = ["grpo_loss", "GRPOLoss", "token_logprobs"]
