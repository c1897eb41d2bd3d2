"""gxpo-kernels: fused kernels and update rules for GRPO-family RL of language models.

Ops (Triton on CUDA, PyTorch/C++ on CPU): ``grpo_loss``, ``linear_grpo_loss``, ``token_logprobs``,
``linear_token_logprobs``, ``fpa_logprobs``, ``extrapolate_``. Update rules: ``GXPO``, ``SFPO``.
Loss options: ``GRPOLossOptions`` (the loss math lives in ``gxpo_kernels.losses``). Advantages:
``group_advantages``, ``fade_advantages``, ``FADEController``. Integrations (optional dependencies, imported on
demand): ``gxpo_kernels.integrations.{hf, deepspeed, fsdp, trl}``.
"""
from .advantages import FADEController, fade_advantages, group_advantages, group_stats, sign_ratio
from .losses import GRPOLossOptions
from .ops import (STAT_NAMES, FPALogProbs, GRPOLoss, LinearGRPOLoss, extrapolate_, fpa_dpo_loss, fpa_kto_loss,
                  fpa_logprobs, fpa_offline_pg_loss, fpa_rpo_loss, fpa_simper_loss, grpo_loss,
                  linear_fpa_logprobs, linear_grpo_loss, linear_token_logprobs, stats_to_dict, token_logprobs)
from .update import GXPO, SFPO, EMAGate, EntropyGate, WindowGate

__version__ = "0.1.0"

__all__ = [
    "grpo_loss", "GRPOLoss", "GRPOLossOptions", "token_logprobs",
    "linear_grpo_loss", "LinearGRPOLoss", "linear_token_logprobs",
    "fpa_logprobs", "linear_fpa_logprobs", "FPALogProbs",
    "fpa_dpo_loss", "fpa_rpo_loss", "fpa_simper_loss", "fpa_kto_loss", "fpa_offline_pg_loss",
    "extrapolate_", "stats_to_dict", "STAT_NAMES",
    "GXPO", "SFPO", "EMAGate", "WindowGate", "EntropyGate",
    "group_advantages", "group_stats", "fade_advantages", "FADEController", "sign_ratio",
]
