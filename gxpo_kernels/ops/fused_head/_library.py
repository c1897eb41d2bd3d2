"""``torch.library`` registration of the fused linear head: per-token statistics and their backward.

``gxpo::linear_token_stats_fwd`` gives fp32 (logp, entropy, lse) of every row of ``hidden @ weight.T + bias``
(0 at masked rows, which cost no GEMM work); ``gxpo::linear_token_stats_bwd`` the gradients of hidden, weight
and bias from (dlogp, dentropy). As custom ops they are opaque, shape-known nodes for ``torch.compile``
(fullgraph works; the data-dependent masked-row selection happens inside) and ``torch.library.opcheck`` checks
them. The trailing arguments are the fields of the engine's ``_HeadConfig``. ``linear_token_logprobs``,
``linear_grpo_loss`` and (for its backward) ``linear_fpa_logprobs`` run on them.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..._utils import check_no_forward_ad, refuse_second_derivative
from .engine import MaskedRows, _HeadConfig, linear_token_stats_bwd, linear_token_stats_fwd


def _empty_grad(like: Tensor) -> Tensor:
    return like.new_empty(0)  # "not needed": a custom op cannot return None


@torch.library.custom_op("gxpo::linear_token_stats_fwd", mutates_args=())
def _fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, mask: Tensor, inv_t: float,
            backend: str, fp32_head: bool, deterministic: bool, chunk_size: Optional[int],
            num_splits: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """(N, H), (V, H), (V,)|None, (N,), (N,) bool -> (logp, entropy, lse), fp32 (N,) each, 0 at masked rows."""
    cfg = _HeadConfig(backend, fp32_head, deterministic, chunk_size, num_splits)
    rows = MaskedRows(mask)
    lse, ent, logp = linear_token_stats_fwd(rows.take(hidden), weight.contiguous(),
                                            None if bias is None else bias.contiguous(), rows.take(tokens), inv_t,
                                            cfg)
    return rows.put(logp), rows.put(ent), rows.put(lse)


@_fwd_op.register_fake
def _(hidden, weight, bias, tokens, mask, inv_t, backend, fp32_head, deterministic, chunk_size, num_splits):
    return tuple(hidden.new_empty(hidden.shape[:1], dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("gxpo::linear_token_stats_bwd", mutates_args=())
def _bwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, mask: Tensor, lse: Tensor,
            entropy: Tensor, dlogp: Tensor, dentropy: Optional[Tensor], inv_t: float, need_hidden: bool,
            need_weight: bool, need_bias: bool, backend: str, fp32_head: bool, deterministic: bool,
            chunk_size: Optional[int], num_splits: Optional[int]) -> List[Tensor]:
    """[grad_hidden (N, H), grad_weight (V, H), grad_bias (V,)] in the inputs' dtypes, 0 at masked rows; a
    gradient not asked for (or of a missing bias) is an empty tensor."""
    cfg = _HeadConfig(backend, fp32_head, deterministic, chunk_size, num_splits)
    need = (need_hidden, need_weight, bias is not None and need_bias)
    rows = MaskedRows(mask)
    gh, gw, gb = linear_token_stats_bwd(
        rows.take(hidden), weight.contiguous(), None if bias is None else bias.contiguous(), rows.take(tokens),
        rows.take(lse), rows.take(entropy), rows.take(dlogp), None if dentropy is None else rows.take(dentropy),
        inv_t, cfg, need)
    return [rows.put(gh.to(hidden.dtype)) if need[0] else _empty_grad(hidden),
            gw.to(weight.dtype) if need[1] else _empty_grad(weight),
            gb.to(bias.dtype) if need[2] else _empty_grad(weight)]


@_bwd_op.register_fake
def _(hidden, weight, bias, tokens, mask, lse, entropy, dlogp, dentropy, inv_t, need_hidden, need_weight,
      need_bias, backend, fp32_head, deterministic, chunk_size, num_splits):
    return [torch.empty_like(hidden) if need_hidden else _empty_grad(hidden),
            torch.empty_like(weight) if need_weight else _empty_grad(weight),
            torch.empty_like(bias) if bias is not None and need_bias else _empty_grad(weight)]


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, tokens, mask, inv_t, *cfg = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, bias, tokens, mask, lse, ent)
    ctx.inv_t, ctx.cfg = inv_t, cfg
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dlogp, dentropy, _dlse):
    hidden, weight, bias, tokens, mask, lse, ent = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if (dlogp is None and dentropy is None) or not any(need):
        return (None,) * 11
    if dlogp is None:
        dlogp = torch.zeros_like(lse)
    grads = torch.ops.gxpo.linear_token_stats_bwd(hidden, weight, bias, tokens, mask, lse, ent, dlogp, dentropy,
                                                  ctx.inv_t, need[0], need[1], need[2], *ctx.cfg)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None,) * 8


torch.library.register_autograd("gxpo::linear_token_stats_fwd", _backward, setup_context=_setup_context)
refuse_second_derivative("gxpo::linear_token_stats_bwd",
                         "linear_token_logprobs, linear_grpo_loss and linear_fpa_logprobs")


def cfg_args(cfg: _HeadConfig) -> tuple:
    """The ops' trailing arguments for ``cfg``."""
    return dataclasses.astuple(cfg)


def token_stats_rows(h2: Tensor, weight: Tensor, bias: Optional[Tensor], tokens1: Tensor, m1: Tensor,
                     inv_t: float, cfg: _HeadConfig) -> Tuple[Tensor, Tensor]:
    """Flat (N, H) rows -> fp32 (logp, entropy) (N,), computing only unmasked rows; 0 at masked rows.
    Differentiable w.r.t. hidden, weight and bias; nothing is saved under ``torch.no_grad``."""
    check_no_forward_ad("linear_token_logprobs / linear_grpo_loss", h2, weight, bias)
    logp, ent, _ = torch.ops.gxpo.linear_token_stats_fwd(h2, weight, bias, tokens1, m1, float(inv_t),
                                                         *cfg_args(cfg))
    return logp, ent
