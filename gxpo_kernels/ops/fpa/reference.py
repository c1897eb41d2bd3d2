"""Float64 PyTorch reference for FPA log-probs: the executable reference.

Materialises the extrapolated logits h_hat = (1 + lam) * h_theta - lam * h_ref (h = logits / temperature) and
takes three log-softmaxes. Tests compare ``fpa_logprobs`` / ``linear_fpa_logprobs`` (both backends) against it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def fpa_logprobs_ref(logits: torch.Tensor, ref_logits: torch.Tensor, tokens: torch.Tensor, lam: float = 1.0,
                     temperature: float = 1.0, *, mask: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, ref_logp, fpa_logp), each (*,) float64, for logits/ref_logits (*, V) and tokens (*).

    ``logp`` stays differentiable w.r.t. ``logits`` (float64 autograd); the other two are detached, as in the
    fused op. Masked positions are 0. Conventions of the fused ops: lam = 0 gives ``fpa_logp == logp``; a -inf
    policy logit has probability 0 under pi_hat too; a row where the reference alone has a -inf logit gets a NaN
    ``fpa_logp`` when lam > 0.
    """
    h = logits.double() / temperature
    h_ref = ref_logits.double().detach() / temperature
    h_hat = h.detach()
    if lam != 0:   # lam = 0: pi_hat is pi_theta, whatever h_ref holds (a -inf there included)
        h_hat = torch.where(h_hat == float("-inf"), h_hat, (1 + lam) * h_hat - lam * h_ref)  # -inf policy: p = 0
        # a -inf reference logit under a finite policy one: pi_ref^(-lam) = inf, pi_hat undefined (NaN row)
        h_hat = h_hat.masked_fill((h_hat == float("inf")).any(-1, keepdim=True), float("nan"))
    idx = tokens.long().clamp(0, h.shape[-1] - 1).unsqueeze(-1)
    logp = torch.log_softmax(h, -1).gather(-1, idx).squeeze(-1)
    ref_logp = torch.log_softmax(h_ref, -1).gather(-1, idx).squeeze(-1)
    fpa_logp = torch.log_softmax(h_hat, -1).gather(-1, idx).squeeze(-1)
    if mask is not None:
        m = mask.bool()
        zero = torch.zeros((), dtype=torch.float64, device=logits.device)
        logp, ref_logp, fpa_logp = (torch.where(m, x, zero) for x in (logp, ref_logp, fpa_logp))
    return logp, ref_logp, fpa_logp


def fpa_probs_ref(logits: torch.Tensor, ref_logits: torch.Tensor, lam: float = 1.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """The full future-policy distribution pi_hat ∝ pi_theta^(1+lam) * pi_ref^(-lam), float64, shape (*, V).

    Written from the product form (not the extrapolated logits) so tests check the identity between the two.
    """
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    log_r = torch.log_softmax(ref_logits.double() / temperature, -1)
    return torch.softmax((1 + lam) * log_p - lam * log_r, -1)
