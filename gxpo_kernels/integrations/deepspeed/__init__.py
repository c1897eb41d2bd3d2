"""GXPO and SFPO inside DeepSpeed ZeRO (stages 1, 2, 3 and the BF16_Optimizer), shard-local.

    engine, gxpo = gxpo_kernels.integrations.deepspeed.initialize(
        model=model, config=ds_config, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-6),
        gxpo=dict(K=5, alpha=0.5, tau=0.5))            # or sfpo=dict(K=3, alpha=0.8)

    def closure():                                    # one pass over the whole mini-batch
        total = 0.0
        for mb in micro_batches:                      # exactly gradient_accumulation_steps of them
            loss = compute_loss(engine, mb)           # engine forward (+ the fused GRPO loss)
            engine.backward(loss)
            total += float(loss)
        return total / len(micro_batches)

    info = gxpo.step(closure)                         # 3 passes (GXPO active), K+1 (SFPO), 1 (after the gate)

What the closure does: forward and ``engine.backward(loss)`` for each of the ``gradient_accumulation_steps``
micro-batches of the mini-batch, and returns the loss (it must not call ``engine.step()`` or
``engine.zero_grad()``; it may read ``gxpo.pass_index`` e.g. to recompute old log-probs). What the rule does:
the ``engine.step()`` calls (one per micro-batch), the snapshot θ0, the fused extrapolation on each rank's local
fp32 master shard (``ops.extrapolate_``: Triton on GPU shards, the C++ op on CPU / offloaded shards), the
low-precision re-sync, every accept / fallback / gate decision from dp-all-reduced statistics, the fallback
on non-finite gradients or a step DeepSpeed skipped (overflow), and one advance per outer update of the LR
scheduler, ``global_steps``/``global_samples`` and the fp16 loss-scale window (the scale is held within a step).
Full parameters are never gathered. Gradient clipping is DeepSpeed's (``gradient_clipping`` = the rule's
``max_grad_norm``).

Checkpoints: the rule's own state (gate statistics, fired flag, counters) is not part of DeepSpeed's checkpoint;
without it a resumed run silently restarts the gate. :func:`save_checkpoint` / :func:`load_checkpoint` carry it
in ``client_state`` next to DeepSpeed's parameters, optimizer moments and LR scheduler; the resumed run then
continues bit-exactly (tested on ZeRO-2, ZeRO-3, ZeRO-2 fp16 + offload). The rule's state is plain numbers,
strings and lists, so it also loads with ``torch.load(..., weights_only=True)``.

Supported: ZeRO 1/2/3 (fp32, bf16, fp16), BF16_Optimizer, ZeRO-Offload of the optimizer (and params) to CPU,
any torch optimizer (``"zero_allow_untested_optimizer": true``; with CPU offload also
``"zero_force_ds_cpu_optimizer": false``) or DeepSpeed's Adam variants. Refused at start-up: NVMe offload,
partial offload (ratio < 1), MiCS / hpZ, reduced-precision master weights, MoE, tensor/pipeline parallelism,
torch_autocast, ZenFlow, Muon, ``managed_gradient_accumulation: false``, ``inactive_threshold`` (it is a
per-tensor statistic; shards cut across tensors). DeepSpeed range: ``SUPPORTED_DEEPSPEED`` (tested 0.19.8).
"""
from __future__ import annotations

import copy
import importlib
import json
import os
from typing import Optional, Tuple, Union

from ..._utils import require
from ._loss import CausalLMGRPOLoss
from ._rule import DeepSpeedGXPO, DeepSpeedSFPO
from ._zero import SUPPORTED_DEEPSPEED, ZeroShards, check_engine

__all__ = ["initialize", "wrap", "save_checkpoint", "load_checkpoint", "DeepSpeedGXPO", "DeepSpeedSFPO",
           "CausalLMGRPOLoss", "SUPPORTED_DEEPSPEED", "CLIENT_STATE_KEY", "apply_shm_setting"]

CLIENT_STATE_KEY = "gxpo_kernels_update_rule"  # where the rule's state lives in DeepSpeed's client_state

_ALGOS = {"gxpo": DeepSpeedGXPO, "sfpo": DeepSpeedSFPO}
SHM_ENV = "GXPO_DEEPSPEED_SHM"


def apply_shm_setting() -> None:
    """``GXPO_DEEPSPEED_SHM=0``: the next DeepSpeed process group on the CPU accelerator goes without DeepSpeed's
    shared-memory all-reduce op, whose first use is a C++ JIT build (a minute or two; it needs a compiler). That op
    serves only ``inference_all_reduce`` (DeepSpeed inference); training's collectives are torch.distributed's
    (gloo) either way. Unset or ``1``: DeepSpeed's default. :func:`initialize` and ``gxpo-kernels train --deepspeed``
    call it before DeepSpeed sets up its communication backend; a backend set up earlier (your own
    ``deepspeed.init_distributed()``) keeps what it has."""
    value = os.environ.get(SHM_ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{SHM_ENV} must be 0 or 1, got {value!r}")
    if value == "0":
        # the module, not ``deepspeed.comm``'s attribute of that name (which is torch itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def wrap(engine, algo: str = "gxpo", **rule_kwargs) -> Union[DeepSpeedGXPO, DeepSpeedSFPO]:
    """Attach a GXPO/SFPO rule to an existing ``deepspeed`` engine (ZeRO 1/2/3 or BF16_Optimizer).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` with an optimizer. algo: "gxpo" or "sfpo".
        **rule_kwargs: the keyword arguments of :class:`~gxpo_kernels.update.GXPO` / ``SFPO`` (K, alpha, tau,
            gate, transactional_state, optimizer_aware, backend, ...). ``max_grad_norm`` (None = no clipping)
            overrides the engine's ``gradient_clipping``; when omitted the engine's value is used.
    Returns:
        the rule; call ``rule.step(closure)`` once per mini-batch.
    """
    if algo not in _ALGOS:
        raise ValueError(f"algo must be 'gxpo' or 'sfpo', got {algo!r}")
    if rule_kwargs.get("inactive_threshold") is not None:
        raise ValueError("inactive_threshold is not supported under DeepSpeed: it thresholds |g0| against the RMS "
                         "of each parameter tensor, and ZeRO shards are flat slices across tensors")
    kind = check_engine(engine)
    zo = engine.optimizer
    engine_clip = zo.clip_grad
    if "max_grad_norm" in rule_kwargs:
        c = rule_kwargs["max_grad_norm"]
        if c is not None and not (isinstance(c, (int, float)) and c > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {c!r}")
        clip = 0.0 if c is None else float(c)
    else:
        clip = engine_clip
        rule_kwargs["max_grad_norm"] = float(clip) if clip and clip > 0 else None
    rule = _ALGOS[algo](engine, ZeroShards(engine, kind), **rule_kwargs)
    zo.clip_grad = clip                  # only once the rule is built: a refused rule leaves the engine as it was
    rule._engine_clip_grad = engine_clip  # rule.detach() puts the engine's own value back
    return rule


def initialize(*, model, config, optimizer=None, gxpo: Optional[dict] = None, sfpo: Optional[dict] = None,
               **deepspeed_kwargs) -> Tuple[object, Union[DeepSpeedGXPO, DeepSpeedSFPO]]:
    """``deepspeed.initialize`` + :func:`wrap`. Returns ``(engine, rule)``.

    Args:
        model, optimizer, **deepspeed_kwargs: passed to ``deepspeed.initialize`` (e.g. ``lr_scheduler``,
            ``model_parameters``). optimizer may be a torch optimizer, a callable, or None (config "optimizer").
        config: DeepSpeed config dict or JSON path (a bare ``ds_zero2.json`` / ``ds_zero3.json`` that is not a
            file here names the config shipped in ``gxpo_kernels/examples``); a copy is used. Its
            ``gradient_clipping`` and the rule's ``max_grad_norm`` must agree when both are given; either fills in
            the other (default 1.0, the papers' c). ``zero_allow_untested_optimizer`` defaults to true when a
            client optimizer is passed.
        gxpo / sfpo: the rule's keyword arguments (give one of them; ``gxpo={}`` = GXPO defaults).
    """
    deepspeed = require("deepspeed", "gxpo_kernels.integrations.deepspeed.initialize")
    if gxpo is not None and sfpo is not None:
        raise ValueError("give either gxpo=... or sfpo=..., not both")
    algo, kw = ("sfpo", dict(sfpo)) if sfpo is not None else ("gxpo", dict(gxpo or {}))
    if isinstance(config, str):
        from ...examples import find_config
        with open(find_config(config)) as f:
            cfg = json.load(f)
    elif isinstance(config, dict):
        cfg = copy.deepcopy(config)
    else:
        raise TypeError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
    ds_c = cfg.get("gradient_clipping")
    if "max_grad_norm" in kw:
        c = kw["max_grad_norm"]
        if ds_c is not None and float(ds_c) != (0.0 if c is None else float(c)):
            raise ValueError(f"config gradient_clipping={ds_c} disagrees with the rule's max_grad_norm={c}; "
                             "DeepSpeed clips for the rule, so give one value")
    else:
        kw["max_grad_norm"] = 1.0 if ds_c is None else (float(ds_c) if float(ds_c) > 0 else None)
    cfg["gradient_clipping"] = 0.0 if kw["max_grad_norm"] is None else float(kw["max_grad_norm"])
    if optimizer is not None:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    apply_shm_setting()        # deepspeed.initialize sets up DeepSpeed's communication backend
    engine, *_ = deepspeed.initialize(model=model, config=cfg, optimizer=optimizer, **deepspeed_kwargs)
    return engine, wrap(engine, algo, **kw)


def save_checkpoint(engine, rule, save_dir: str, tag=None, client_state: Optional[dict] = None, **kwargs):
    """``engine.save_checkpoint`` with the rule's state (``rule.state_dict()``) added to ``client_state`` under
    ``CLIENT_STATE_KEY``. Call it between ``rule.step`` calls, on every rank (DeepSpeed saves collectively).
    ``kwargs`` go to ``engine.save_checkpoint``. Returns its result."""
    state = dict(client_state or {})
    if CLIENT_STATE_KEY in state:
        raise ValueError(f"client_state already has the key {CLIENT_STATE_KEY!r}, which holds the rule's state")
    state[CLIENT_STATE_KEY] = rule.state_dict()
    rule.sync_weights()   # the module's weights as the fp32 shards, also after a step that raised
    return engine.save_checkpoint(save_dir, tag=tag, client_state=state, **kwargs)


def load_checkpoint(engine, rule, load_dir: str, tag=None, **kwargs) -> Tuple[str, dict]:
    """``engine.load_checkpoint`` (parameters, optimizer state, LR scheduler) plus the rule's state saved by
    :func:`save_checkpoint`. Returns ``(path, client_state)`` without the rule's entry. Raises
    ``FileNotFoundError`` when DeepSpeed finds no checkpoint and ``KeyError`` when the checkpoint carries no rule
    state (saved with ``engine.save_checkpoint`` alone: resuming would silently restart the gate)."""
    path, client = engine.load_checkpoint(load_dir, tag=tag, **kwargs)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {load_dir!r} (tag={tag!r})")
    client = dict(client or {})
    if CLIENT_STATE_KEY not in client:
        raise KeyError(f"the checkpoint at {path!r} has no {CLIENT_STATE_KEY!r} entry in its client_state: it was "
                       "not saved with gxpo_kernels.integrations.deepspeed.save_checkpoint")
    rule.load_state_dict(client.pop(CLIENT_STATE_KEY))
    return path, client
