"""The GRPO-family loss: ``op.py`` (from logits), ``linear.py`` (fused linear head), ``reference.py`` (naive
float64-capable references)."""
from .linear import LinearGRPOLoss, linear_grpo_loss
from .op import GRPOLoss, grpo_loss

__all__ = ["grpo_loss", "GRPOLoss", "linear_grpo_loss", "LinearGRPOLoss"]
