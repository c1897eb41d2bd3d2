"""Run a transformers causal LM up to its final hidden states and apply the fused lm_head + GRPO loss.

One call replaces ``logits = model(...).logits`` + a logits-path loss in a training step, so the
(tokens x vocab) logits never exist. Generic over decoder-only models whose head is a plain ``nn.Linear``
(Qwen2/Qwen3, Llama, Mistral, ...): the decoder comes from ``model.get_decoder()`` (or the base model), the
head from ``model.get_output_embeddings()``; tied embeddings work as is.

Alignment (the usual causal shift): with ``input_ids`` (B, L) and ``K = logits_to_keep`` (default L - 1), the
scored tokens are ``input_ids[:, L-K:]`` and token ``L-K+j`` is scored by the hidden state at position
``L-K-1+j``; ``completion_mask`` is (B, K) over those tokens (default ``attention_mask[:, L-K:]``). This is
TRL's ``logits_to_keep`` convention: prompt + completion concatenated, the last K tokens are the completion.

ZeRO-3: the lm_head weight is a (0,)-shaped shard outside its module's forward. When it carries ``ds_id`` the
fused loss runs *as the lm_head module's forward* (the module's ``forward`` is swapped for the loss for one
call). DeepSpeed's module hooks then gather the weight for the forward, release it afterwards, and gather it
again when the backward reaches the loss, so the kernels' backward reads the full weight and the full-size
weight gradient reaches the parameter while it is gathered, where DeepSpeed's hooks reduce-scatter it. Merely
wrapping the loss in ``deepspeed.zero.GatheredParameters`` is not enough: the weight is released before
backward, and even a gradient computed during forward fails when autograd accumulates a (V, H) gradient into
the (0,)-shaped parameter. The no-grad log-prob helper only needs ``GatheredParameters``. With gradient
accumulation, compute the loss inside the DeepSpeed engine's forward (see ``integrations.deepspeed``): ZeRO-3's
per-micro-step bookkeeping happens there.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..ops.grpo.linear import linear_grpo_loss
from ..ops.logprobs.linear import linear_token_logprobs


def _lm_head(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"the model's output embeddings must be a plain torch.nn.Linear, got {type(head).__name__}; "
            "adapters on lm_head (e.g. PEFT LoRA) are not supported by the fused loss")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) is not None or hasattr(model, "logit_scale") \
            or getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
        raise NotImplementedError("models that rescale or soft-cap their logits are not supported by the fused "
                                  "lm_head loss (the head must be exactly logits = hidden @ W.T + b)")
    return head


def _decoder(model: nn.Module) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if dec is None:
        raise TypeError(f"cannot find the decoder of {type(model).__name__} (no get_decoder() / base model)")
    return dec


def _keep(input_ids: torch.Tensor, logits_to_keep: Optional[int]) -> int:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    L = input_ids.shape[1]
    K = L - 1 if logits_to_keep is None else int(logits_to_keep)
    if not 1 <= K <= L - 1:
        raise ValueError(f"logits_to_keep must be in [1, L-1] = [1, {L - 1}] (the first token has no "
                         f"predecessor to score it), got {logits_to_keep}")
    return K


def causal_lm_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                            logits_to_keep: Optional[int] = None, **model_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, K, H), tokens (B, K)): the final hidden states aligned so that ``hidden[:, j]`` scores
    ``tokens[:, j] = input_ids[:, L-K+j]``. ``model_kwargs`` go to the decoder (e.g. ``position_ids``)."""
    K = _keep(input_ids, logits_to_keep)
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    L = input_ids.shape[1]
    return hidden[:, L - K - 1:L - 1], input_ids[:, L - K:]


@contextlib.contextmanager
def gathered_lm_head(head: nn.Linear):
    """Gather a ZeRO-3-partitioned lm_head (read-only) for the duration of the block; no-op otherwise."""
    params = [p for p in (head.weight, head.bias) if p is not None and hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed  # only reached when the parameters are DeepSpeed-managed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    # inside engine.forward DeepSpeed gathers a parameter on access and owns its release: gather only the
    # partitioned ones, or the next forward fails with "Cannot free a ZeRO-3 parameter while it is still active"
    params = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _completion_mask(input_ids, attention_mask, completion_mask, K):
    if completion_mask is not None:
        if tuple(completion_mask.shape) != (input_ids.shape[0], K):
            raise ValueError(f"completion_mask must have shape (B, logits_to_keep) = {(input_ids.shape[0], K)}, "
                             f"got {tuple(completion_mask.shape)}")
        return completion_mask
    return None if attention_mask is None else attention_mask[:, input_ids.shape[1] - K:]


def causal_lm_grpo_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        advantages: torch.Tensor, *, completion_mask: Optional[torch.Tensor] = None,
                        logits_to_keep: Optional[int] = None, old_logprobs: Optional[torch.Tensor] = None,
                        ref_logprobs: Optional[torch.Tensor] = None, model_kwargs: Optional[dict] = None,
                        **loss_opts) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GRPO loss of a causal LM's completions without materialising its logits.

    Args:
        model: a transformers causal LM (e.g. ``Qwen2ForCausalLM``, ``LlamaForCausalLM``), possibly ZeRO-3.
        input_ids: (B, L) prompt + completion ids; attention_mask: (B, L) or None.
        advantages: (B,) or (B, K). completion_mask: (B, K) loss mask (default ``attention_mask[:, -K:]``).
        logits_to_keep: K, the number of trailing tokens scored (default L - 1: every token after the first).
        old_logprobs, ref_logprobs: (B, K) or None. model_kwargs: extra decoder kwargs (e.g. position_ids).
        **loss_opts: keyword options of ``linear_grpo_loss`` (temperature, eps_low, eps_high, beta, ...).
    Returns:
        (loss, metrics) as ``linear_grpo_loss``.

    Example::

        loss, metrics = causal_lm_grpo_loss(model, ids, am, adv, completion_mask=cm, logits_to_keep=cm.shape[1],
                                            old_logprobs=old, temperature=0.7, eps_high=0.28)
        loss.backward()
    """
    head = _lm_head(model)
    K = _keep(input_ids, logits_to_keep)
    hidden, tokens = causal_lm_hidden_states(model, input_ids, attention_mask, K, **(model_kwargs or {}))
    mask = _completion_mask(input_ids, attention_mask, completion_mask, K)
    if not hasattr(head.weight, "ds_id"):
        return linear_grpo_loss(hidden, head.weight, tokens, advantages, mask, old_logprobs, ref_logprobs,
                                bias=head.bias, **loss_opts)
    metrics = {}

    def head_forward(h):  # runs as lm_head.forward: DeepSpeed gathers W now and again for the backward
        loss, m = linear_grpo_loss(h, head.weight, tokens, advantages, mask, old_logprobs, ref_logprobs,
                                   bias=head.bias, **loss_opts)
        metrics.update(m)
        return loss           # only the loss leaves the module, so only it carries DeepSpeed's backward hook

    return _call_as_forward(head, head_forward, hidden), metrics


def _call_as_forward(module: nn.Module, fn, *args):
    """Call ``fn(*args)`` as if it were ``module.forward``, so the module's hooks fire around it."""
    module.forward = fn       # the instance attribute shadows the class's forward for this one call
    try:
        return module(*args)
    finally:
        del module.forward


@torch.no_grad()
def causal_lm_token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                             *, logits_to_keep: Optional[int] = None, completion_mask: Optional[torch.Tensor] = None,
                             temperature: float = 1.0, compute_entropy: bool = False, fp32_head: bool = False,
                             backend: str = "auto", model_kwargs: Optional[dict] = None
                             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """No-grad per-token log-probs (and entropy) of the last K tokens: old / reference log-probs.

    Returns fp32 (logp (B, K), entropy (B, K) or None); positions outside the mask (default
    ``attention_mask[:, -K:]``) are skipped and hold 0.
    """
    head = _lm_head(model)
    K = _keep(input_ids, logits_to_keep)
    hidden, tokens = causal_lm_hidden_states(model, input_ids, attention_mask, K, **(model_kwargs or {}))
    mask = _completion_mask(input_ids, attention_mask, completion_mask, K)
    with gathered_lm_head(head):
        return linear_token_logprobs(hidden, head.weight, tokens, temperature, bias=head.bias, mask=mask,
                                     compute_entropy=compute_entropy, fp32_head=fp32_head, backend=backend)
