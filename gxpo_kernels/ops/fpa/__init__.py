"""FPA (future-policy) log-probs and objectives: ``logprobs.py`` (from logits), ``linear.py``
(fused linear head), ``objectives.py`` (the losses), ``reference.py`` (naive references)."""
from .linear import linear_fpa_logprobs
from .logprobs import fpa_logprobs
from .objectives import FPALogProbs, fpa_dpo_loss, fpa_kto_loss, fpa_offline_pg_loss, fpa_rpo_loss, fpa_simper_loss

__all__ = ["fpa_logprobs", "linear_fpa_logprobs", "FPALogProbs", "fpa_dpo_loss", "fpa_rpo_loss", "fpa_simper_loss",
           "fpa_kto_loss", "fpa_offline_pg_loss"]
