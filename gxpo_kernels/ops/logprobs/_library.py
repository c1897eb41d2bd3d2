"""``torch.library`` registrations: schemas, fake (meta) kernels and autograd for every op.

Registering the ops as custom ops makes them opaque, shape-known nodes for ``torch.compile`` (fullgraph works,
with either backend inside), and ``torch.library.opcheck`` verifies the schemas. The in-place backward is a
separate op that declares its mutation of ``logits``; the public functions never use it under compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._utils import check_no_forward_ad, refuse_second_derivative
from .kernel import token_logprobs_bwd, token_logprobs_fwd


@torch.library.custom_op("gxpo::token_logprobs_fwd", mutates_args=())
def _token_logprobs_fwd_op(logits: Tensor, tokens: Tensor, mask: Optional[Tensor], temperature: float,
                           compute_entropy: bool, inplace_backward: bool, backend: str
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, entropy, lse), (B, T): fp32, fp32, float64 (what the backward needs; see kernel.py).
    ``inplace_backward`` only steers the registered backward."""
    return token_logprobs_fwd(logits, tokens, mask, temperature, compute_entropy, backend)


@_token_logprobs_fwd_op.register_fake
def _(logits, tokens, mask, temperature, compute_entropy, inplace_backward, backend):
    B, T, _ = logits.shape
    return tuple(logits.new_empty((B, T), dtype=dt) for dt in (torch.float32, torch.float32, torch.float64))


@torch.library.custom_op("gxpo::token_logprobs_bwd", mutates_args=())
def _token_logprobs_bwd_op(logits: Tensor, tokens: Tensor, mask: Optional[Tensor], lse: Tensor, entropy: Tensor,
                           dlogp: Tensor, dentropy: Optional[Tensor], temperature: float, backend: str) -> Tensor:
    """dlogits (B, T, V) in the logits dtype, freshly allocated."""
    return token_logprobs_bwd(logits, tokens, mask, lse, entropy, dlogp, dentropy, temperature, False, backend)


@_token_logprobs_bwd_op.register_fake
def _(logits, tokens, mask, lse, entropy, dlogp, dentropy, temperature, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("gxpo::token_logprobs_bwd_", mutates_args=("logits",))
def _token_logprobs_bwd_inplace_op(logits: Tensor, tokens: Tensor, mask: Optional[Tensor], lse: Tensor,
                                   entropy: Tensor, dlogp: Tensor, dentropy: Optional[Tensor], temperature: float,
                                   backend: str) -> None:
    """Overwrite ``logits`` with dlogits (in-place backward)."""
    out = token_logprobs_bwd(logits, tokens, mask, lse, entropy, dlogp, dentropy, temperature, True, backend)
    if out.data_ptr() != logits.data_ptr():
        logits.copy_(out)  # only for layouts the kernel had to copy


@_token_logprobs_bwd_inplace_op.register_fake
def _(logits, tokens, mask, lse, entropy, dlogp, dentropy, temperature, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, tokens, mask, temperature, compute_entropy, inplace_backward, backend = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, tokens, mask, lse, entropy)
    ctx.temperature, ctx.compute_entropy = temperature, compute_entropy
    ctx.inplace, ctx.backend = inplace_backward, backend
    # unused outputs arrive as None, so an entropy that feeds nothing skips the entropy term of the backward
    ctx.set_materialize_grads(False)


def _backward(ctx, dlogp, dentropy, _dlse):
    logits, tokens, mask, lse, entropy = ctx.saved_tensors
    if dlogp is None and dentropy is None:
        return (None,) * 7
    if dlogp is None:
        dlogp = torch.zeros_like(lse)
    if not ctx.compute_entropy:
        dentropy = None
    args = (tokens, mask, lse, entropy, dlogp, dentropy, ctx.temperature, ctx.backend)
    # create_graph=True (grad mode on in backward): the in-place result would carry the logits' own autograd
    # history, a wrong second derivative without an error; the out-of-place op raises when differentiated
    if ctx.inplace and not torch.is_grad_enabled():
        torch.ops.gxpo.token_logprobs_bwd_(logits, *args)
        dlogits = logits
    else:
        dlogits = torch.ops.gxpo.token_logprobs_bwd(logits, *args)
    return dlogits, None, None, None, None, None, None


torch.library.register_autograd("gxpo::token_logprobs_fwd", _backward, setup_context=_setup_context)
refuse_second_derivative("gxpo::token_logprobs_bwd", "token_logprobs, grpo_loss and fpa_logprobs")


def token_logprobs_op(logits: Tensor, tokens: Tensor, mask: Optional[Tensor], temperature: float,
                      compute_entropy: bool, inplace_backward: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(logp, entropy) through the registered op (differentiable; nothing saved under no_grad)."""
    check_no_forward_ad("token_logprobs / grpo_loss", logits)
    logp, entropy, _ = torch.ops.gxpo.token_logprobs_fwd(logits, tokens, mask, float(temperature),
                                                         bool(compute_entropy), bool(inplace_backward), backend)
    return logp, entropy
