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

Data parallelism (DDP, FSDP, ZeRO-3): a loss computed *outside* the wrapper's forward (on ``ddp.module``)
misses the wrapper's forward bookkeeping, so DDP's gradient all-reduce (and FSDP's / ZeRO-3's gathers) do
not happen as they should. ``patch_causal_lm(model)`` moves the loss into the model's own forward: after it,
``wrapper(input_ids, attention_mask, advantages=..., completion_mask=..., ...)`` returns a ``GRPOLossOutput``
whose ``loss`` every wrapper's hooks have seen. ``causal_lm_grpo_loss`` refuses wrapped models and names the
wrapper and the fix.
"""
from __future__ import annotations

import contextlib
import functools
import operator
import sys
import types
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

try:  # transformers is needed only by the patched forward's output type
    from transformers.utils import ModelOutput as ModelOutputBase
except ImportError:  # pragma: no cover - depends on the environment
    ModelOutputBase = object

from .._utils import check_bools
from ..ops.grpo.linear import linear_grpo_loss
from ..ops.logprobs.linear import linear_token_logprobs


def _wrapper_name(model: nn.Module) -> Optional[str]:
    """The name of the wrapper around a causal LM (DDP, FSDP, a DeepSpeed engine, PEFT, torch.compile), or None."""
    names = {c.__name__ for c in type(model).__mro__}
    for name in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine", "PeftModel",
                 "OptimizedModule"):
        if name in names:
            return name
    return None


def check_unwrapped(model: nn.Module, fn: str = "causal_lm_grpo_loss") -> None:
    """Raise a TypeError naming the wrapper (and what to do) when ``model`` is DDP / FSDP / DeepSpeed / PEFT or a
    ``torch.compile`` wrapper."""
    name = _wrapper_name(model)
    if name is None:
        return
    if name == "OptimizedModule":       # torch.compile's wrapper: its forward runs the module it compiled
        raise TypeError(f"{fn} got a torch.compile wrapper ({type(model).__name__}): call it on the model before "
                        "compiling it, or on compiled._orig_mod; calling the compiled module then runs the patched "
                        "forward")
    if name == "PeftModel":
        raise TypeError(f"{fn} got a PEFT model ({type(model).__name__}): pass peft_model.get_base_model() (the "
                        "adapters live inside it and are trained as usual; adapters on lm_head are not supported)")
    raise TypeError(
        f"{fn} got a {name} wrapper ({type(model).__name__}). A loss computed on wrapper.module runs outside the "
        f"wrapper's forward, so its gradient synchronisation / parameter gathering is skipped. Instead call "
        "gxpo_kernels.integrations.hf.patch_causal_lm(model) on the unwrapped model (before or after wrapping), "
        "then wrapper(input_ids, attention_mask, advantages=..., completion_mask=..., ...).loss")


def _lm_head(model: nn.Module) -> nn.Linear:
    check_unwrapped(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a subclass that overrides forward (a quantized or rescaling head) is not ``hidden @ W.T + b``
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        kind = type(head).__name__ if head is None else f"{type(head).__module__}.{type(head).__qualname__}"
        raise TypeError(
            "the model's output embeddings must be a plain torch.nn.Linear (the fused loss computes "
            f"hidden @ W.T + b itself), got {kind}; adapters on lm_head (e.g. PEFT LoRA) and heads with their "
            "own forward are not supported by the fused loss")
    why = logit_rescaling(model)
    if why:
        raise NotImplementedError(f"the fused lm_head loss cannot run {type(model).__name__} (its logits must be "
                                  f"exactly hidden @ W.T + b of the decoder's final hidden states): {why}")
    return head


# config names of a final-logit soft cap (Gemma 2/3, RecurrentGemma, xLSTM) and of a logit scale / multiplier
# (Cohere, FalconH1, muP-style heads, Granite, Inkling); None (and 1 for a scale) means "not applied"
_SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                 "logits_mup_width_multiplier")


def logit_rescaling(model: nn.Module) -> Optional[str]:
    """Why ``model``'s logits are not exactly ``hidden @ W.T + b`` of its decoder's final hidden states (a soft
    cap, a logit scale or multiplier in its config, or in the text config of a composite model; logits cut to
    ``unpadded_vocab_size``; an encoder-decoder; a head nested after a transform or beside another weighted
    module; ProphetNet's n-gram stream), or None. The fused head cannot run such a model."""
    cfg = getattr(model, "config", None)
    cfgs = [cfg] if cfg is not None else []
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
    if text is not None and text is not cfg:
        cfgs.append(text)        # composite (multimodal) models keep the language model's settings there
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):   # T5, BART: the decoder needs the encoder
        return "the model is an encoder-decoder; the fused head runs a decoder-only causal LM"
    if isinstance(head, nn.Module) and all(head is not m for m in model.children()):
        # a head nested in another module (BERT's cls.predictions.decoder) follows a transform of the hidden states
        name = next((n for n, m in model.named_modules() if m is head), type(head).__name__)
        return f"the output embeddings ({name}) are not the model's own submodule but follow another transform"
    if cfg is not None and getattr(cfg, "model_type", None) == "prophetnet":
        return "ProphetNet's logits come from its decoder's n-gram predicting stream, not its last hidden state"
    dec = _find_decoder(model)
    for name, child in model.named_children():
        # a module with weights beside the decoder and the head (Electra's generator_predictions) transforms the
        # hidden states before the head
        holds_decoder = dec is not None and any(m is dec for m in child.modules())
        if child is not head and not holds_decoder and any(True for _ in child.parameters()):
            return f"the model has a module with weights ({name}) outside its decoder and lm_head"
    rows = getattr(head, "out_features", None)   # the head's vocabulary rows (a ZeRO-3 shard keeps out_features)
    for c in cfgs:
        for name in _SOFT_CAPS:
            if getattr(c, name, None) is not None:
                return f"the model soft-caps its logits ({name})"
        unpadded = getattr(c, "unpadded_vocab_size", None)
        if unpadded is not None and rows is not None and unpadded < rows:
            return "the model cuts its logits to the first unpadded_vocab_size entries"
        for name in _LOGIT_SCALES:
            if getattr(c, name, None) not in (None, 1, 1.0):
                return f"the model scales its logits ({name})"
    if hasattr(model, "logit_scale"):
        return "the model scales its logits (logit_scale)"
    return None


def _find_decoder(model: nn.Module) -> Optional[nn.Module]:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or dec is model:
        dec = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    return dec


def _decoder(model: nn.Module) -> nn.Module:
    dec = _find_decoder(model)
    if dec is None:
        raise TypeError(f"cannot find the decoder of {type(model).__name__} (no get_decoder() / base model)")
    return dec


def _keep(input_ids: torch.Tensor, logits_to_keep: Optional[int]) -> int:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
    L = input_ids.shape[1]
    # a count only: transformers reads a tensor logits_to_keep as the positions to keep, which cannot be scored
    if isinstance(logits_to_keep, torch.Tensor) and (logits_to_keep.dim() != 0 or logits_to_keep.is_floating_point()):
        raise ValueError(f"logits_to_keep must be an int count of trailing tokens, got a {logits_to_keep.dtype} "
                         f"tensor of shape {tuple(logits_to_keep.shape)} (index tensors are not supported)")
    try:
        K = L - 1 if logits_to_keep is None else operator.index(logits_to_keep)
    except TypeError:
        raise ValueError(f"logits_to_keep must be an int count of trailing tokens, got {logits_to_keep!r}") from None
    if not 1 <= K <= L - 1:
        raise ValueError(f"logits_to_keep must be in [1, L-1] = [1, {L - 1}] (the first token has no "
                         f"predecessor to score it), got {logits_to_keep}")
    return K


def causal_lm_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                            logits_to_keep: Optional[int] = None, **model_kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, K, H), tokens (B, K)): the final hidden states aligned so that ``hidden[:, j]`` scores
    ``tokens[:, j] = input_ids[:, L-K+j]``. ``model_kwargs`` go to the decoder (e.g. ``position_ids``)."""
    K = _keep(input_ids, logits_to_keep)
    # no KV cache for a loss; a caller's use_cache (the logits path's calls often pass it) is overridden
    model_kwargs = {**model_kwargs, "use_cache": False}
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
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
    """Call ``fn(*args)`` as if it were ``module.forward``, so the module's hooks fire around it. An
    instance-level forward the module had (accelerate's hooks install one) is put back afterwards."""
    own = module.__dict__.get("forward")
    module.forward = fn       # the instance attribute shadows the class's (or that) forward for this one call
    try:
        return module(*args)
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


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
    check_bools(compute_entropy=compute_entropy, fp32_head=fp32_head)   # before the model's forward
    head = _lm_head(model)
    K = _keep(input_ids, logits_to_keep)
    hidden, tokens = causal_lm_hidden_states(model, input_ids, attention_mask, K, **(model_kwargs or {}))
    mask = _completion_mask(input_ids, attention_mask, completion_mask, K)
    with gathered_lm_head(head):
        return linear_token_logprobs(hidden, head.weight, tokens, temperature, bias=head.bias, mask=mask,
                                     compute_entropy=compute_entropy, fp32_head=fp32_head, backend=backend)


# ------------------------------------------------------------------------------------------ patch_causal_lm
@dataclass
class GRPOLossOutput(ModelOutputBase):
    """What a patched model returns when called with GRPO targets: ``loss`` (0-d) and ``metrics`` (detached)."""
    loss: Optional[torch.Tensor] = None
    metrics: Optional[Dict[str, torch.Tensor]] = None


def patch_causal_lm(model: nn.Module, **loss_opts) -> nn.Module:
    """Make ``model(...)`` compute the fused GRPO loss inside its own forward when given GRPO targets.

    After ``patch_causal_lm(model)``, a call with ``advantages=`` returns a :class:`GRPOLossOutput`::

        out = model(input_ids, attention_mask, advantages=adv, completion_mask=cm, logits_to_keep=K,
                    old_logprobs=old, ref_logprobs=ref)        # or ddp_model(...), fsdp_model(...), engine(...)
        out.loss.backward()

    Args (of the patched forward, besides the model's own ``input_ids`` (B, L), ``attention_mask`` (B, L) and
    decoder kwargs): ``advantages`` (B,) or (B, K); ``completion_mask`` (B, K) (default
    ``attention_mask[:, -K:]``); ``logits_to_keep`` K (default L - 1); ``old_logprobs``, ``ref_logprobs`` (B, K)
    or None; ``grpo_options`` (dict) overriding the options given here. Without ``advantages`` the model's
    previous forward runs unchanged (generation and ordinary training keep working).

    Args (of this function): ``model``: an unwrapped transformers causal LM with a plain ``nn.Linear`` head
    (patch before wrapping it, or patch ``wrapper.module``: the wrapper calls the patched forward);
    ``**loss_opts``: default options of ``linear_grpo_loss`` (temperature, eps_low, eps_high, beta, ...).
    Returns ``model`` (patched in place; patching again only replaces the default options).
    """
    check_unwrapped(model, "patch_causal_lm")
    _lm_head(model)                        # refuse unsupported heads now, not at the first training step
    _decoder(model)
    model._gxpo_loss_opts = dict(loss_opts)
    if getattr(model, "_gxpo_patched", False):
        return model
    previous = model.forward
    # what ``unpatch_causal_lm`` restores: an instance-level forward (e.g. accelerate's), or None for the class's
    model._gxpo_previous_forward = model.__dict__.get("forward")
    # call the previous forward unbound, on ``self``: a deep copy of the patched model (a reference model) must run
    # its own weights, not those of the model that ``previous`` is bound to
    unbound = previous.__func__ if getattr(previous, "__self__", None) is model else None

    def run_previous(self, *args, **kwargs):
        return unbound(self, *args, **kwargs) if unbound is not None else previous(*args, **kwargs)

    @functools.wraps(type(model).forward)  # keeps the signature ``generate`` validates its kwargs against
    def forward(self, input_ids=None, attention_mask=None, *args, advantages=None, completion_mask=None,
                logits_to_keep=None, old_logprobs=None, ref_logprobs=None, grpo_options=None,
                gxpo_targets=None, gxpo_mask=None, gxpo_temperature=1.0, gxpo_fp32_head=False,
                gxpo_backend="auto", gxpo_aux_loss=False, **kwargs):
        if gxpo_targets is not None:       # TRL's hook: fused per-token log-probs and entropies
            return _token_logprobs_forward(self, input_ids, attention_mask, gxpo_targets, gxpo_mask,
                                           gxpo_temperature, gxpo_fp32_head, gxpo_backend, gxpo_aux_loss, kwargs)
        if advantages is None:
            if logits_to_keep is not None:
                kwargs["logits_to_keep"] = logits_to_keep
            if args:                       # 3+ positional arguments: hand them on in the caller's order
                return run_previous(self, input_ids, attention_mask, *args, **kwargs)
            for key, val in (("input_ids", input_ids), ("attention_mask", attention_mask)):
                if val is not None:
                    kwargs[key] = val
            return run_previous(self, **kwargs)
        if args:
            raise TypeError("pass the decoder's extra inputs by keyword when computing the GRPO loss")
        opts = {**self._gxpo_loss_opts, **(grpo_options or {})}
        loss, metrics = causal_lm_grpo_loss(self, input_ids, attention_mask, advantages,
                                            completion_mask=completion_mask, logits_to_keep=logits_to_keep,
                                            old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                                            model_kwargs=kwargs, **opts)
        return GRPOLossOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})

    model.forward = types.MethodType(forward, model)
    model._gxpo_patched = True
    model._gxpo_forward_fn = forward      # how unpatch_causal_lm recognises the forward it installed
    return model


def unpatch_causal_lm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_causal_lm`: ``model.forward`` is again the forward it had before the patch.

    Refuses (``ValueError``) a model that is not patched, and a model whose forward was replaced after the patch
    (e.g. by ``accelerator.prepare``): restoring the pre-patch forward would silently drop that wrapper too.
    Returns ``model``.
    """
    check_unwrapped(model, "unpatch_causal_lm")
    if not getattr(model, "_gxpo_patched", False):
        raise ValueError("unpatch_causal_lm: the model is not patched (patch_causal_lm was not called on it)")
    current = model.__dict__.get("forward")
    # the very function patch_causal_lm installed, bound to this model (a deep copy binds it to itself); not a
    # comparison with the class's forward, which another library may have replaced since (Liger's patches do)
    if getattr(current, "__self__", None) is not model or getattr(current, "__func__", None) is None \
            or current.__func__ is not model.__dict__.get("_gxpo_forward_fn"):
        raise ValueError("unpatch_causal_lm: model.forward was replaced after patch_causal_lm (e.g. by "
                         "accelerate's prepare); undo that wrapper first")
    previous = model.__dict__.pop("_gxpo_previous_forward")
    if previous is None:
        del model.forward                  # back to the class's forward
    else:
        model.forward = previous
    del model._gxpo_patched, model._gxpo_loss_opts, model._gxpo_forward_fn
    return model


def _token_logprobs_forward(model, input_ids, attention_mask, targets, mask, temperature, fp32_head, backend,
                            aux, kwargs):
    """(logp, entropy[, aux_loss]) (B, T) of ``targets``, the last T tokens of ``input_ids``, from the final
    hidden states through the fused head (TRL's per-token log-prob contract; used by ``integrations.trl``)."""
    kwargs["use_cache"] = False
    if aux:
        kwargs["output_router_logits"] = True
    out = _decoder(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    T = targets.shape[1]
    hidden = out.last_hidden_state[:, -T - 1:-1]   # position t predicts token t+1
    head = model.get_output_embeddings()
    dev = hidden.device.type
    autocast_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None

    def head_forward(h):
        weight, bias = head.weight, head.bias
        h = h.to(weight.device)
        if fp32_head:                     # TRL's cast_lm_head_to_fp32: fp32 operands, outside autocast
            h, fp32 = h.float(), True
        elif autocast_dtype is not None:  # as TRL's head: GEMM operands in the autocast dtype (fp32 accumulate)
            h, weight = h.to(autocast_dtype), weight.to(autocast_dtype)
            bias = None if bias is None else bias.to(autocast_dtype)
            fp32 = False
        else:
            fp32 = h.dtype != weight.dtype
        with torch.autocast(dev, enabled=False):
            logp, ent = linear_token_logprobs(h, weight, targets.to(h.device), temperature, bias=bias,
                                              mask=mask.to(h.device), fp32_head=fp32, backend=backend)
        return torch.stack([logp, ent])   # one output tensor: one ZeRO-3 backward hook

    if hasattr(head.weight, "ds_id"):     # ZeRO-3: gathered for the head's forward and again for its backward
        logp, ent = _call_as_forward(head, head_forward, hidden).unbind(0)
    else:
        logp, ent = head_forward(hidden).unbind(0)
    if not aux:
        return logp, ent
    return logp, ent, moe_aux_loss(model, out, attention_mask)


def moe_aux_loss(model: nn.Module, decoder_out, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss the model's own forward would compute (transformers' per-architecture
    ``load_balancing_loss_func`` on the router logits), without the coefficient."""
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    if fn is None or not hasattr(model, "num_experts") or getattr(decoder_out, "router_logits", None) is None:
        raise NotImplementedError(f"{type(model).__name__}: no load_balancing_loss_func / router logits to compute "
                                  "the MoE auxiliary loss from")
    return fn(decoder_out.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)


def has_moe_aux_loss(model: nn.Module) -> bool:
    """Whether :func:`moe_aux_loss` can compute this model's load-balancing loss."""
    mod = sys.modules.get(type(model).__module__)
    return hasattr(mod, "load_balancing_loss_func") and hasattr(model, "num_experts") \
        and hasattr(model, "num_experts_per_tok")
