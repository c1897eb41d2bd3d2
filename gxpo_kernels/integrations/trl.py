"""Use gxpo-kernels from TRL's ``GRPOTrainer`` (optional extra ``[trl]``; tested with TRL 1.16.x).

Two entry points:

* ``enable_gxpo_loss(trainer)`` -- a loss hook: the trainer's ``_compute_loss`` runs on our fused ops. The
  policy's per-token log-probs and entropies come from ``linear_token_logprobs`` (hidden states x lm_head,
  never materialising the (B, T, V) logits) where the model allows it, else from ``token_logprobs`` on the
  model's logits; the loss is ``gxpo_kernels.losses.grpo_token_loss`` with TRL's option names and semantics
  mapped on.
* ``GXPOGRPOTrainer`` -- a ``GRPOTrainer`` subclass using that loss, whose training step can run the GXPO
  or SFPO update rule on each mini-batch, and FADE advantages; ``GXPOGRPOConfig`` -- a ``GRPOConfig`` carrying
  their options (both defined in ``_trl_trainer.py``).

Loss-type mapping (TRL 1.16 ``_compute_loss``; GA = ``current_gradient_accumulation_steps`` in training,
1 in evaluation):

=========  =========================================  ==================================================
loss_type  TRL                                        here
=========  =========================================  ==================================================
grpo       mean_i(sum_t m l / n_i) / GA               ``seq-mean-token-mean`` / GA
bnpo       sum m l / sum m / GA                       ``token-mean`` / GA
dr_grpo    sum m l / (B * max_completion_length) / GA ``seq-mean-token-sum-norm`` (max_length) / GA
luspo      mean_i(sum_t m l) / GA                     ``seq-mean-token-sum`` / GA
dapo       sum m l / (N_global / P * GA / S)          sum m l / that normaliser (as is, even below 1)
=========  =========================================  ==================================================

(N_global = ``num_items_in_batch`` (loss tokens of the whole generation batch over all ranks), P = number
of processes, S = ``steps_per_generation``.) The normaliser is used as TRL computes it, not clamped to >= 1
like a token count: it falls below 1 when the generation batch holds fewer loss tokens than S. TRL's entropy
bonus is the token mean of the entropy over the loss mask (divided by GA) whatever the loss type, so it is
applied outside ``grpo_token_loss`` on the differentiable entropy. Multiplicative per-token weights that TRL applies to the
policy term only (``top_entropy_quantile`` mask, ``off_policy_mask_threshold`` mask) are folded into the
advantages: for w >= 0, w * max(-A r, -A clip(r)) = max(-(wA) r, -(wA) clip(r)); so is vLLM's
importance-sampling correction (``importance_sampling_ratio``, vLLM colocate or server mode).

The KL term follows TRL through the loss options: k3 is not clamped (``kl_clamp=None``; our ops' default
clamps it to [-10, 10]) and, with ``use_bias_correction_kl`` (TRL's default), it is weighted by the
(differentiable) importance ratio.
"""
from __future__ import annotations

import contextlib
import os
import types
import warnings
from dataclasses import replace
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .._utils import BACKENDS, check_bool, check_choice, check_scalar, check_shape, check_tensor, require
from ..losses import GRPOLossOptions, check_token_inputs, grpo_token_loss, kl_k3, masked_mean

TESTED_TRL = ("1.16.0", "1.17.0")  # [min, max) of the TRL versions this module was tested against
ALLOW_UNTESTED_ENV = "GXPO_KERNELS_ALLOW_UNTESTED_TRL"
LOSS_TYPES = {  # TRL loss_type -> our loss_agg_mode (dapo: the sum, divided by TRL's global normaliser)
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
    "dapo": "seq-mean-token-sum",
}
LOSS_PATHS = ("auto", "hidden", "logits")


# ----------------------------------------------------------------------------------------------- version gate
def check_trl_version(version: Optional[str] = None) -> str:
    """Return TRL's version; raise if it lies outside ``TESTED_TRL`` (a warning instead when the environment
    variable ``GXPO_KERNELS_ALLOW_UNTESTED_TRL=1`` is set). This module hooks TRL internals
    (``GRPOTrainer._compute_loss``, its ``inputs`` keys, ``_metrics``), which change between minor releases."""
    if version is None:
        version = require("trl", "gxpo_kernels.integrations.trl").__version__
    from packaging.version import Version   # after TRL, which requires it: without TRL, the error names [trl]
    lo, hi = TESTED_TRL
    if not Version(lo) <= Version(version) < Version(hi):
        msg = (f"gxpo_kernels.integrations.trl was tested with TRL >={lo},<{hi}; found TRL {version}. "
               f"Install a tested version (pip install 'trl>={lo},<{hi}') or set {ALLOW_UNTESTED_ENV}=1 to try "
               "anyway (the parity tests in tests/integrations/test_trl.py tell whether it still matches).")
        if os.environ.get(ALLOW_UNTESTED_ENV, "0") == "1":
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        else:
            raise RuntimeError(msg)
    return version


# ------------------------------------------------------------------------------------------ option checking
def _engine(trainer) -> str:
    """How the trainer's model is distributed: "single", "ddp" or "deepspeed" (accelerate's names otherwise).
    The one place the TRL integration branches on the engine."""
    kind = trainer.accelerator.distributed_type.name
    if kind == "NO":
        return "single"
    if kind in ("MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU", "MULTI_SDAA",
                "MULTI_MUSA"):
        return "ddp"
    return kind.lower()


UPDATE_ENGINES = ("single", "ddp", "deepspeed")


def _unsupported(trainer, for_update: bool = False) -> Optional[str]:
    """The first TRL option this integration cannot honour, as an error message naming it and why, or None."""
    args = trainer.args
    if trainer.loss_type not in LOSS_TYPES:
        return (f"loss_type={trainer.loss_type!r} is not supported by the gxpo-kernels loss "
                f"(supported: {sorted(LOSS_TYPES)})")
    checks = []
    if for_update:
        engine = _engine(trainer)
        checks += [
            (engine == "fsdp",
             "distributed_type=FSDP (untested: accelerate enables FSDP only on accelerators and a CPU run falls "
             "back to DDP; use gxpo_kernels.integrations.fsdp with fully_shard in your own loop)"),
            (engine not in UPDATE_ENGINES,
             f"distributed_type={trainer.accelerator.distributed_type.name} (the update rule runs on a single "
             "process, DDP, or DeepSpeed ZeRO 1/2/3)"),
            (bool(getattr(args, "fp16", False)) and engine != "deepspeed",
             "fp16=True without DeepSpeed (torch's GradScaler cannot follow several optimizer steps per update; "
             "use bf16=True, or DeepSpeed's fp16, whose loss scale the rule advances once per update)"),
        ]
    for bad, name in checks:
        if bad:
            return f"{name} is not supported by gxpo_kernels.integrations.trl"
    return None


def _loss_temperature(trainer) -> float:
    """The temperature TRL's loss uses: TRL 1.16 hands ``temperature`` to its fused LM head (and to generation)
    when the trainer is built (``args.temperature``), so a later change of ``trainer.temperature`` or
    ``args.temperature`` reaches neither; the hook keeps the value it found when it was first enabled (following a
    change would score against old and ref log-probs of another temperature)."""
    fixed = getattr(trainer, "_gxpo_temperature", None)
    return float(trainer.args.temperature) if fixed is None else fixed


def _loss_options(trainer) -> GRPOLossOptions:
    """TRL's loss options as our ``GRPOLossOptions`` (entropy bonus and normaliser handled outside)."""
    if trainer.loss_type not in LOSS_TYPES:  # e.g. set on the trainer after the hook was enabled
        raise ValueError(_unsupported(trainer))
    if trainer.loss_type == "dr_grpo" and trainer.max_completion_length is None:
        # TRL divides by B * max_completion_length (a TypeError at its first loss call); our aggregation would
        # fall back to each micro-batch's completion width, a normaliser that changes from batch to batch
        raise ValueError("loss_type='dr_grpo' with max_completion_length=None is not supported by "
                         "gxpo_kernels.integrations.trl: Dr. GRPO normalises by max_completion_length; set it")
    try:
        return GRPOLossOptions(
            temperature=_loss_temperature(trainer), eps_low=float(trainer.epsilon_low),
            eps_high=float(trainer.epsilon_high), delta=trainer.args.delta, beta=float(trainer.beta),
            entropy_coef=0.0, importance_sampling=trainer.importance_sampling_level,
            loss_agg_mode=LOSS_TYPES[trainer.loss_type],
            max_length=trainer.max_completion_length if trainer.loss_type == "dr_grpo" else None)
    except ValueError as e:  # name TRL's options, not ours (eps_low is TRL's epsilon)
        raise ValueError(f"TRL's epsilon={trainer.epsilon_low}, epsilon_high={trainer.epsilon_high}, "
                         f"delta={trainer.args.delta}, beta={trainer.beta}, importance_sampling_level="
                         f"{trainer.importance_sampling_level!r} or temperature={_loss_temperature(trainer)} "
                         f"is not supported by gxpo_kernels.integrations.trl: {e} (eps_low/eps_high/"
                         "importance_sampling are TRL's epsilon/epsilon_high/importance_sampling_level)") from None


# -------------------------------------------------------------------------------------- the loss, TRL-shaped
def trl_policy_loss(
    logp: torch.Tensor,                  # (B, T) fp32 differentiable log pi_theta(completion token)
    entropy: Optional[torch.Tensor],     # (B, T) differentiable entropy (needed when entropy_coef != 0)
    mask: torch.Tensor,                  # (B, T) bool loss mask (completion_mask * tool_mask)
    advantages: torch.Tensor,            # (B,) or (B, T)
    old_logprobs: Optional[torch.Tensor],
    ref_logprobs: Optional[torch.Tensor],
    opts: GRPOLossOptions,
    *,
    loss_type: str,
    accumulation: float = 1.0,           # TRL's GA normaliser (1 in evaluation)
    dapo_normalizer=None,                # dapo (float or 0-d tensor): num_items_in_batch / P * GA / S, eval / P
    entropy_coef: float = 0.0,
    pg_weight: Optional[torch.Tensor] = None,  # (B, T) or (B, 1) >= 0 multiplies the policy term only
    entropy_mask: Optional[torch.Tensor] = None,  # (B, T) bool: TRL's top-entropy mask (bonus acts on it too)
    kl_ratio_weight: bool = False,       # TRL's use_bias_correction_kl: KL term times the importance ratio
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """TRL 1.16 ``GRPOTrainer._compute_loss`` semantics on our loss math. Returns (loss, metrics).

    ``metrics`` holds our detached metrics plus ``policy_loss`` (the loss before the entropy bonus, before
    GA scaling for the GA-scaled types, as TRL logs it). Shapes are checked (a (1, T) or (B, 1) mask, old or
    ref tensor would otherwise broadcast silently); values are not read (no host sync)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    check_tensor(logp, "logp", ndim=2, floating=True)
    B, T = logp.shape
    check_tensor(mask, "mask", ndim=2, dtypes=(torch.bool,))
    check_shape(mask, "mask", (B, T))
    check_token_inputs(B, T, advantages, old_logprobs, ref_logprobs)
    for name, t in (("entropy", entropy), ("entropy_mask", entropy_mask)):
        check_shape(t, name, (B, T))
    if pg_weight is not None and tuple(pg_weight.shape) not in ((B, T), (B, 1)):
        raise ValueError(f"pg_weight must have shape {(B, T)} or {(B, 1)}, got {tuple(pg_weight.shape)}")
    accumulation = check_scalar(accumulation, "accumulation", "(0, inf)")
    entropy_coef = check_scalar(entropy_coef, "entropy_coef")
    kl_ratio_weight = check_bool(kl_ratio_weight, "kl_ratio_weight")
    adv = advantages.to(logp.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    weight = pg_weight
    if entropy_mask is not None:
        weight = entropy_mask.to(logp.dtype) if weight is None else weight * entropy_mask.to(logp.dtype)
    if weight is not None:
        adv = adv * weight.to(logp.dtype)  # w >= 0: scales the clipped surrogate, leaves the KL term alone
    adv = adv.expand_as(logp)
    if opts.beta != 0.0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs")
    # TRL's KL: k3 not clamped, optionally times the (differentiable) importance ratio
    opts = replace(opts, kl_clamp=None, use_bias_correction_kl=bool(kl_ratio_weight))
    num_items = None
    if loss_type == "dapo":
        if dapo_normalizer is None:
            raise ValueError("loss_type='dapo' needs dapo_normalizer (TRL's num_items_in_batch-based normaliser)")
        if not isinstance(dapo_normalizer, torch.Tensor):
            dapo_normalizer = check_scalar(dapo_normalizer, "dapo_normalizer", "(0, inf)")
        # the masked sum (a token count of 1), divided below by TRL's normaliser as it is: that may be < 1
        # (fewer loss tokens in the generation batch than steps_per_generation), which a token count is not
        opts, num_items = replace(opts, loss_agg_mode="token-mean"), 1
    loss, metrics = grpo_token_loss(logp, entropy, adv, mask, old_logprobs, ref_logprobs if opts.beta else None,
                                    opts, num_items_in_batch=num_items)
    if loss_type == "dapo":  # a tensor normaliser stays on the device (no host sync)
        loss = loss / (dapo_normalizer.detach().to(loss) if torch.is_tensor(dapo_normalizer) else dapo_normalizer)
    metrics["policy_loss"] = loss.detach()
    if loss_type != "dapo":
        loss = loss / accumulation
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef != 0 needs the differentiable entropy")
        eff = mask if entropy_mask is None else mask & entropy_mask.bool()
        loss = loss - entropy_coef * masked_mean(entropy, eff) / accumulation
    return loss, metrics


# ------------------------------------------------------------------------------------ per-token log-probs
def _head_model(trainer) -> nn.Module:
    """The transformers model whose forward TRL patched (the PEFT base model when PEFT is used)."""
    from accelerate.utils import is_peft_model
    return trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model


def _hidden_path_blocker(trainer) -> Optional[str]:
    """Why the fused-linear (hidden-state) path cannot run on this model, or None when it can."""
    from .hf import has_moe_aux_loss, logit_rescaling
    model = _head_model(trainer)
    why = logit_rescaling(model)
    if why:
        return why
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:  # a PEFT adapter on lm_head (TRL #4612) or a custom head
        return f"lm_head is a {type(head).__name__}, not a plain nn.Linear"
    if not hasattr(model, "base_model"):
        return "the model exposes no backbone (base_model)"
    if _engine(trainer) == "fsdp":
        return "FSDP shards the lm_head weight, which the fused head reads whole"
    if getattr(trainer, "aux_loss_enabled", False) and not has_moe_aux_loss(model):
        return "the model's MoE load-balancing loss cannot be computed from its router logits"
    # ZeRO-3 is fine: the fused head runs as the lm_head module's forward (see integrations.hf)
    return None


def _text_only(inputs) -> Optional[str]:
    for key in ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids", "num_images"):
        if inputs.get(key) is not None:
            return key
    return None


@contextlib.contextmanager
def _head_outside_autocast(head: nn.Module, enabled: bool):
    """Run ``head``'s forward with autocast off for the block (when ``enabled`` and autocast is on). With
    ``cast_lm_head_to_fp32`` TRL's loss head projects in fp32 outside autocast; the logits path calls the model's
    own (fp32-cast) lm_head inside the trainer's autocast region, which would round the projection to bf16."""
    dev = head.weight.device.type if enabled else None
    if not enabled or not torch.is_autocast_enabled(dev):
        yield
        return
    own = head.__dict__.get("forward")   # TRL's cast_lm_head_to_fp32 sets an instance forward
    inner = head.forward

    def forward(*args, **kwargs):
        with torch.autocast(dev, enabled=False):
            return inner(*args, **kwargs)
    head.forward = forward
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


def policy_token_logprobs(trainer, model, inputs):
    """fp32 (logp, entropy) (B, T) of the completion tokens under the policy ``model`` (differentiable), and
    the MoE load-balancing loss (0-d) when TRL's ``router_aux_loss_coef`` is in use, else None."""
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    T = completion_ids.shape[1]
    key = _text_only(inputs)
    if key is not None:
        raise ValueError(f"inputs carry {key!r}: multimodal GRPO is not supported by gxpo_kernels.integrations.trl")
    # score every completion position the attention can see; positions outside `mask` are cheap (skipped rows)
    score_mask = completion_mask.bool()
    path = trainer._gxpo_loss_path
    backend = trainer._gxpo_backend
    aux = bool(getattr(trainer, "aux_loss_enabled", False))
    with trainer.accelerator.autocast():
        if path == "hidden":
            out = model(input_ids=input_ids, attention_mask=attention_mask, gxpo_targets=completion_ids,
                        gxpo_mask=score_mask, gxpo_temperature=_loss_temperature(trainer),
                        gxpo_fp32_head=bool(trainer.args.cast_lm_head_to_fp32), gxpo_backend=backend,
                        gxpo_aux_loss=aux)
            return (out[0], out[1], out[2] if aux else None)
        extra = {"output_router_logits": True} if aux else {}
        head = _head_model(trainer).get_output_embeddings()
        with _head_outside_autocast(head, bool(trainer.args.cast_lm_head_to_fp32)):
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1, use_cache=False,
                        **extra)
        logits = out.logits[:, :-1]
    from ..ops.logprobs.op import token_logprobs
    if logits.dtype == torch.float64:  # our kernels take fp32/bf16/fp16
        logits = logits.float()
    logp, ent = token_logprobs(logits, completion_ids, _loss_temperature(trainer), mask=score_mask,
                               backend=backend)
    return logp, ent, (out.aux_loss if aux else None)


# ------------------------------------------------------------------------------ the hooked _compute_loss
def _window_end(trainer) -> bool:
    """Whether this loss call is the last micro-batch of an optimizer step's accumulation window
    (``GXPOGRPOTrainer`` sets it while it replays a window inside the update rule's passes)."""
    end = getattr(trainer, "_gxpo_window_end", None)
    return trainer.accelerator.sync_gradients if end is None else end


def _entropy_bonus_coef(self, mode: str) -> float:
    """The entropy-bonus coefficient TRL applies to this micro-batch (0 when the bonus is off). With
    ``use_adaptive_entropy`` it is the coefficient from the end of the previous optimizer step, gated by that
    step's world entropy; the update rule's later passes reuse the value of the update's first pass."""
    if not self._entropy_bonus_enabled:
        return 0.0
    frozen = getattr(self, "_gxpo_frozen_entropy_coef", None)
    if frozen is not None:
        return frozen
    if self.use_adaptive_entropy:
        return float(self.entropy_coef) if self._last_world_entropy <= self.args.entropy_target else 0.0
    return float(self.entropy_coef)


def _adaptive_entropy_observe(self, entropy, mask, entropy_mask) -> None:
    """TRL's adaptive entropy controller: accumulate the window's entropy sum and token count, and at the window
    end move ``entropy_coef`` one ``entropy_coef_delta`` towards keeping the world entropy above
    ``entropy_target``."""
    eff = mask if entropy_mask is None else mask & entropy_mask.bool()
    m = eff.to(entropy.dtype)
    stats = torch.stack([(entropy * m).sum(), m.sum()]).detach()
    prev = self._entropy_window_stats
    self._entropy_window_stats = stats if prev is None else prev + stats
    if not _window_end(self):
        return
    tot = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
    world = (tot[0] / tot[1].clamp(min=1.0)).item()
    a = self.args
    if world <= a.entropy_target:
        self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
    else:
        self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
    self._last_world_entropy = world
    self._entropy_window_stats = None


def _gxpo_compute_loss(self, model, inputs):
    """Drop-in for ``GRPOTrainer._compute_loss`` (TRL 1.16) computed with gxpo-kernels' fused ops."""
    mode = "train" if self.model.training else "eval"
    first_pass = getattr(self, "_gxpo_pass_index", 0) == 0  # an update's later passes re-score the same batch
    completion_mask = inputs["completion_mask"]
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
    mask = mask.bool()
    logp, entropy, aux_loss = policy_token_logprobs(self, model, inputs)

    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = inputs.get("old_per_token_logps")
    old_d = logp.detach() if old is None else old

    entropy_mask = None
    if self.top_entropy_quantile < 1.0:
        entropy_mask = self.get_high_entropy_mask(entropy.detach(), mask.float(), 1 - self.top_entropy_quantile)
    pg_weight = None
    if self.off_policy_mask_threshold is not None:
        sampling = inputs.get("sampling_per_token_logps", old_d)
        pg_weight = self.get_off_policy_mask(advantages=advantages, per_token_logps=logp, mask=mask.float(),
                                             sampling_per_token_logps=sampling,
                                             off_policy_threshold=self.off_policy_mask_threshold)

    if self.use_vllm and self.vllm_importance_sampling_correction:
        isr = inputs["importance_sampling_ratio"]  # >= 0, policy term only (truncated or masked by TRL)
        pg_weight = isr if pg_weight is None else pg_weight * isr

    opts = _loss_options(self)  # TRL reads these attributes at every call (a callback may schedule them)
    accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
    dapo_normalizer = None
    if self.loss_type == "dapo":
        dapo_normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            ga, spg = self.current_gradient_accumulation_steps, self.args.steps_per_generation
            dapo_normalizer = dapo_normalizer * ga / spg
    coef = _entropy_bonus_coef(self, mode)
    loss, metrics = trl_policy_loss(
        logp, entropy, mask, advantages, old, inputs.get("ref_per_token_logps"), opts, loss_type=self.loss_type,
        accumulation=accumulation, dapo_normalizer=dapo_normalizer, entropy_coef=coef, pg_weight=pg_weight,
        entropy_mask=entropy_mask, kl_ratio_weight=bool(getattr(self.args, "use_bias_correction_kl", False)))
    if self.use_adaptive_entropy and mode == "train" and first_pass:
        _adaptive_entropy_observe(self, entropy.detach(), mask, entropy_mask)
    if aux_loss is not None:  # MoE load balancing, scaled for accumulation like the policy loss (TRL)
        loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

    if first_pass:
        _log_trl_metrics(self, mode, logp.detach(), old_d, entropy.detach(), mask, advantages,
                         inputs.get("ref_per_token_logps"), metrics, aux_loss)
    ent_d = torch.where(mask, entropy.detach(), torch.zeros_like(logp))
    self._gxpo_entropy_stats = (ent_d.sum(), mask.sum().to(ent_d.dtype))  # for entropy gates and FADE
    self._gxpo_last_logp = logp.detach()
    return loss


def _log_trl_metrics(self, mode, logp, old, entropy, mask, advantages, ref, metrics, aux_loss) -> None:
    """The metrics TRL 1.16 logs from ``_compute_loss``, under the same names and reductions."""
    from trl.trainer.utils import nanmax, nanmin
    m = mask.float()
    log_ratio = torch.where(mask, logp - old, torch.zeros_like(logp))
    if self.importance_sampling_level == "sequence":
        log_ratio = (log_ratio.sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)

    def seq_mean(x):
        return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

    def global_mean(x):
        if x.shape[1] == 1:
            s, c = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            s, c = (x * m).sum(), m.sum()
        tot = self.accelerator.reduce(torch.stack([s, c.to(s.dtype)]), reduction="sum")
        return (tot[0] / tot[1].clamp(min=1.0)).item()

    store = self._metrics[mode]
    if self._entropy_bonus_enabled:
        store["policy_loss"].append(self.accelerator.gather(metrics["policy_loss"]).nanmean().item())
        if mode == "train" and _window_end(self):
            store["entropy_coef"].append(self.entropy_coef)
    if aux_loss is not None:
        store["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
    if self.beta != 0.0:
        d = torch.where(mask, ref - logp, torch.zeros_like(logp))
        kl = kl_k3(d)
        if getattr(self.args, "use_bias_correction_kl", False):
            kl = kl * ratio
        store["kl"].append(global_mean(kl))
    store["entropy"].append(global_mean(entropy))
    low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
    store["clip_ratio/low_mean"].append(global_mean(low))
    store["clip_ratio/high_mean"].append(global_mean(high))
    store["clip_ratio/region_mean"].append(global_mean(((low + high) > 0).float()))
    store["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(seq_mean(low))).item())
    store["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(seq_mean(high))).item())


def enable_gxpo_loss(trainer, *, loss_path: str = "auto", backend: str = "auto"):
    """Make ``trainer`` (a TRL ``GRPOTrainer``) compute its loss with gxpo-kernels. Returns the trainer.

    Args:
        loss_path: "hidden" (fused lm_head + log-prob + entropy from the final hidden states; the (B, T, V)
            logits never exist), "logits" (the model's own logits, then ``token_logprobs``), or "auto"
            (hidden where the model allows: a plain ``nn.Linear`` head, no logit soft-capping or scaling;
            logits otherwise). Under DeepSpeed ZeRO-3 the fused head runs as the lm_head's forward. The chosen path is ``trainer.gxpo_loss_path``.
        backend: our kernels' backend ("auto", "triton", "torch").
    Raises ValueError naming the TRL option when the trainer is configured with one we cannot honour.
    """
    check_trl_version()
    from trl import GRPOTrainer
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"trainer must be a trl.GRPOTrainer, got {type(trainer).__name__}")
    if loss_path not in LOSS_PATHS:
        raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {loss_path!r}")
    check_choice(backend, "backend", BACKENDS)        # checked here, not at the first training step
    problem = _unsupported(trainer)
    if problem:
        raise ValueError(problem)
    blocker = _hidden_path_blocker(trainer)
    if loss_path == "hidden" and blocker:
        raise ValueError(f"loss_path='hidden' is not possible: {blocker}; use loss_path='logits' or 'auto'")
    path = "logits" if (loss_path == "logits" or blocker) else "hidden"
    _loss_options(trainer)  # refuse bad values now (before the model is patched); rebuilt at every call, as TRL
    if path == "hidden":    # reads them live
        from .hf import patch_causal_lm
        patch_causal_lm(_head_model(trainer))
    trainer._gxpo_temperature = _loss_temperature(trainer)  # kept when enabled again
    trainer._gxpo_loss_path = path
    trainer._gxpo_backend = backend
    trainer.gxpo_loss_path = path
    trainer._compute_loss = types.MethodType(_gxpo_compute_loss, trainer)
    return trainer


def __getattr__(name):
    # the subclasses need trl at class-creation time; build them on first access so importing this module
    # (e.g. for trl_policy_loss) never imports TRL. They receive this module's hook functions as arguments, so
    # _trl_trainer never imports this module (no import cycle).
    if name in ("GXPOGRPOTrainer", "GXPOGRPOConfig"):
        from ._trl_trainer import make_trainer_classes
        config_cls, trainer_cls = make_trainer_classes(
            enable_loss=enable_gxpo_loss, unsupported=_unsupported, check_version=check_trl_version,
            engine=_engine, entropy_bonus_coef=_entropy_bonus_coef)
        globals().update(GXPOGRPOConfig=config_cls, GXPOGRPOTrainer=trainer_cls)
        return globals()[name]
    raise AttributeError(name)
