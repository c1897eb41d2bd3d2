"""Public ops (functions and modules only). Each op family lives in its own subpackage, kernels beside their
references: ``logprobs/``, ``grpo/``, ``fpa/``, ``extrapolate/``; ``fused_head/`` is the private engine of the
fused-linear ops. docs/ops-layout.md maps every op to its files."""
from .extrapolate import STAT_NAMES, extrapolate_, stats_to_dict
from .fpa import (FPALogProbs, fpa_dpo_loss, fpa_kto_loss, fpa_logprobs, fpa_offline_pg_loss, fpa_rpo_loss,
                  fpa_simper_loss, linear_fpa_logprobs)
from .grpo import GRPOLoss, LinearGRPOLoss, grpo_loss, linear_grpo_loss
from .logprobs import linear_token_logprobs, token_logprobs

__all__ = [
    "grpo_loss", "GRPOLoss", "token_logprobs",
    "linear_grpo_loss", "LinearGRPOLoss", "linear_token_logprobs",
    "fpa_logprobs", "linear_fpa_logprobs", "FPALogProbs",
    "fpa_dpo_loss", "fpa_rpo_loss", "fpa_simper_loss", "fpa_kto_loss", "fpa_offline_pg_loss",
    "extrapolate_", "stats_to_dict", "STAT_NAMES",
]
