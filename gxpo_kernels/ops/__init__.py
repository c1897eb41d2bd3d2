"""Public ops (functions and modules only; kernels and references stay in their modules)."""
from .extrapolate import STAT_NAMES, extrapolate_, stats_to_dict
from .fpa_logprobs import fpa_logprobs
from .fpa_objectives import (FPALogProbs, fpa_dpo_loss, fpa_kto_loss, fpa_offline_pg_loss, fpa_rpo_loss,
                             fpa_simper_loss)
from .grpo_loss import GRPOLoss, grpo_loss
from .linear_fpa_logprobs import linear_fpa_logprobs
from .linear_grpo_loss import LinearGRPOLoss, linear_grpo_loss
from .linear_token_logprobs import linear_token_logprobs
from .token_logprobs import token_logprobs

__all__ = [
    "grpo_loss", "GRPOLoss", "token_logprobs",
    "linear_grpo_loss", "LinearGRPOLoss", "linear_token_logprobs",
    "fpa_logprobs", "linear_fpa_logprobs", "FPALogProbs",
    "fpa_dpo_loss", "fpa_rpo_loss", "fpa_simper_loss", "fpa_kto_loss", "fpa_offline_pg_loss",
    "extrapolate_", "stats_to_dict", "STAT_NAMES",
]
