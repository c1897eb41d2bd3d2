"""The GRPO loss of a causal LM as an ``nn.Module``, so that it runs inside ``engine(...)``.

DeepSpeed's per-forward bookkeeping (ZeRO-3's ``micro_step_id``, which decides whether a micro-batch's
gradient overwrites or accumulates into the partition buffer, and the backward hooks it registers on the
output) only happens in ``engine.forward``. A loss computed on ``engine.module`` directly is therefore wrong
under ZeRO-3 with gradient accumulation. Wrapping the model in this module and passing the wrapper to
``deepspeed.initialize`` keeps the loss inside the engine's forward.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..._utils import check_bool


class CausalLMGRPOLoss(nn.Module):
    """``forward(input_ids, attention_mask, advantages, ...) -> loss`` of a wrapped causal LM.

    Args:
        model: a transformers causal LM (its parameters become this module's parameters).
        fused_linear: True (default) -> ``integrations.hf.causal_lm_grpo_loss`` (fused lm_head + loss, the logits
            never exist; under ZeRO-3 the fused loss runs as the lm_head module's forward, so DeepSpeed's hooks
            gather the weight for the forward and again for the backward, and reduce-scatter its gradient);
            False -> ``model(..., logits_to_keep=K + 1).logits`` + ``ops.grpo_loss`` (the logits of the scored
            positions only).
        **loss_opts: GRPO options (temperature, eps_low, eps_high, beta, loss_agg_mode, ...).
    Forward args: input_ids (B, L), attention_mask (B, L) or None, advantages (B,) or (B, K); completion_mask
    (B, K), logits_to_keep K (default L - 1), old_logprobs / ref_logprobs (B, K). The metrics of the last call
    are kept in ``self.metrics`` (detached).
    """

    def __init__(self, model: nn.Module, *, fused_linear: bool = True, **loss_opts):
        super().__init__()
        self.model = model
        self.fused_linear = check_bool(fused_linear, "fused_linear")   # ("no" was truthy)
        self.loss_opts = loss_opts
        self.metrics: Dict[str, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], advantages: torch.Tensor,
                completion_mask: Optional[torch.Tensor] = None, logits_to_keep: Optional[int] = None,
                old_logprobs: Optional[torch.Tensor] = None, ref_logprobs: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        from ..hf import _keep
        L, K = input_ids.shape[1], _keep(input_ids, logits_to_keep)   # validated, as on the fused path
        if completion_mask is None and attention_mask is not None:
            completion_mask = attention_mask[:, L - K:]
        if self.fused_linear:
            from ..hf import causal_lm_grpo_loss
            loss, metrics = causal_lm_grpo_loss(self.model, input_ids, attention_mask, advantages,
                                                completion_mask=completion_mask, logits_to_keep=K,
                                                old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                                **self.loss_opts)
        else:
            from ...ops.grpo.op import grpo_loss
            # the head runs on the K + 1 positions L-K-1 .. L-1 only, not on the prompt's (B, L-K-1, V) logits
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                logits_to_keep=K + 1).logits
            loss, metrics = grpo_loss(logits[:, :K], input_ids[:, L - K:], advantages,
                                      completion_mask, old_logprobs, ref_logprobs, **self.loss_opts)
        self.metrics = {k: v.detach() for k, v in metrics.items()}
        return loss

