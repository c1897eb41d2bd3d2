"""``torch.library`` registration of ``fpa_logprobs``: schema, fake (meta) kernel and autograd.

As a custom op the FPA forward is an opaque, shape-known node for ``torch.compile`` (fullgraph works) and
``torch.library.opcheck`` verifies it. The backward is the registered ``gxpo::token_logprobs_bwd`` op: ``logp``
is token_logprobs' log-softmax, so its gradient is that op's without the entropy term.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._utils import check_no_forward_ad
from ..logprobs import _library as _token_logprobs_library  # noqa: F401  (registers gxpo::token_logprobs_bwd)
from .kernel import _OUT_DTYPES, fpa_logprobs_fwd


@torch.library.custom_op("gxpo::fpa_logprobs_fwd", mutates_args=())
def _fpa_logprobs_fwd_op(logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Optional[Tensor], lam: float,
                         temperature: float, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B, T, V), (B, T, V) (any layouts; a time slice such as ``logits[:, :-1]`` is read in place), (N,), (N,)
    bool or None with N = B * T -> (logp, ref_logp, fpa_logp, lse), (N,) each: fp32, and lse float64
    (token_logprobs' backward reads it)."""
    return fpa_logprobs_fwd(logits, ref_logits, tokens, mask, lam, temperature, backend)


@_fpa_logprobs_fwd_op.register_fake
def _(logits, ref_logits, tokens, mask, lam, temperature, backend):
    return tuple(logits.new_empty((logits.shape[0] * logits.shape[1],), dtype=dt) for dt in _OUT_DTYPES)


def _setup_context(ctx, inputs, output):
    logits, _, tokens, mask, _, temperature, backend = inputs
    _, ref_logp, fpa_logp, lse = output
    ctx.save_for_backward(logits, tokens, mask, lse)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.mark_non_differentiable(ref_logp, fpa_logp, lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dlogp, _dref, _dfpa, _dlse):
    logits, tokens, mask, lse = ctx.saved_tensors
    if dlogp is None or not ctx.needs_input_grad[0]:
        return (None,) * 7
    bt = lambda t: None if t is None else t.reshape(logits.shape[:2])  # noqa: E731  (N,) -> (B, T)
    # the entropy argument is read only with a dentropy: dlogp stands in for it, fp32 like an entropy (the
    # float64 lse would compile the backward kernel a second time, for a pointer type nothing reads)
    dlogits = torch.ops.gxpo.token_logprobs_bwd(logits, bt(tokens), bt(mask), bt(lse), bt(dlogp), bt(dlogp), None,
                                                ctx.temperature, ctx.backend)
    return dlogits, None, None, None, None, None, None


torch.library.register_autograd("gxpo::fpa_logprobs_fwd", _backward, setup_context=_setup_context)


def fpa_logprobs_op(logits: Tensor, ref_logits: Tensor, tokens: Tensor, mask: Optional[Tensor], lam: float,
                    temperature: float, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, ref_logp, fpa_logp) through the registered op; only ``logp`` is differentiable."""
    check_no_forward_ad("fpa_logprobs", logits)
    logp, ref_logp, fpa_logp, _ = torch.ops.gxpo.fpa_logprobs_fwd(logits, ref_logits, tokens, mask, float(lam),
                                                                  float(temperature), backend)
    return logp, ref_logp, fpa_logp
