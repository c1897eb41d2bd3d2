"""GXPO and SFPO on PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), shard-local.

    model = MyModel()
    for block in model.layers:
        fully_shard(block)                            # optionally mp_policy=MixedPrecisionPolicy(bfloat16)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rule = gxpo_kernels.integrations.fsdp.wrap(model, opt, "gxpo", K=5, alpha=0.5, tau=0.5)   # or "sfpo"

    def closure():                                    # one pass over this rank's part of the mini-batch
        opt.zero_grad(set_to_none=True)
        loss = compute_loss(model, batch)
        loss.backward()
        return loss

    info = rule.step(closure)                         # 3 passes (GXPO active), K+1 (SFPO), 1 (after the gate)

The rule keeps θ0 (and GXPO's ĝ0) for this rank's local shards only and runs the extrapolation as one fused
``extrapolate_`` launch over them (the C++ op on CPU shards, Triton on CUDA shards); full parameters are never
gathered outside FSDP's own forward. The gradient norm (clipping, finite check, the norm gate), the
extrapolation statistics and the entropy are reduced over the mesh's process group, so every rank takes the
same branch on the same step. Supported: 1-D meshes (``fully_shard``'s default), ``MixedPrecisionPolicy``
(e.g. bf16 compute over fp32 sharded parameters), any torch optimizer. Refused by name: float16 (a
``MixedPrecisionPolicy`` or parameters: fp16 needs a GradScaler, which cannot drive the rule), ``CPUOffloadPolicy``,
HSDP / tensor parallelism (2-D meshes, other placements), parameters not sharded by ``fully_shard``,
``inactive_threshold`` (a per-tensor statistic; a shard is part of a tensor).
Checkpointing: :func:`save_checkpoint` / :func:`load_checkpoint` (``torch.distributed.checkpoint``).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..._utils import check_bool
from ._rule import FSDPGXPO, FSDPSFPO, check_fsdp

__all__ = ["wrap", "FSDPGXPO", "FSDPSFPO", "check_fsdp", "save_checkpoint", "load_checkpoint"]

_ALGOS = {"gxpo": FSDPGXPO, "sfpo": FSDPSFPO}


def wrap(model, optimizer: torch.optim.Optimizer, algo: str = "gxpo", **rule_kwargs) -> Union[FSDPGXPO, FSDPSFPO]:
    """Attach a GXPO/SFPO rule to an FSDP2 model and its optimizer.

    Args:
        model: the root module after ``fully_shard(model)``.
        optimizer: a torch optimizer over ``model.parameters()`` (DTensors), built after ``fully_shard``.
        algo: "gxpo" or "sfpo".
        **rule_kwargs: the keyword arguments of :class:`~gxpo_kernels.update.GXPO` / ``SFPO`` (K, alpha, tau,
            max_grad_norm, gate, transactional_state, optimizer_aware, backend, ...).
    Returns:
        the rule; call ``rule.step(closure, entropy=None)`` once per mini-batch, on every rank.
    """
    if algo not in _ALGOS:
        raise ValueError(f"algo must be 'gxpo' or 'sfpo', got {algo!r}")
    if rule_kwargs.get("inactive_threshold") is not None:
        raise ValueError("inactive_threshold is not supported under FSDP2: it thresholds |g0| against the RMS of "
                         "each parameter tensor, and a rank holds only a shard of it")
    return _ALGOS[algo](model, optimizer, **rule_kwargs)


def _state(model, optimizer, rule, buffers: bool, rule_state: bool = True) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, optimizer)
    out = {"model": msd, "optimizer": osd, "rule": {}}
    if rule_state:
        out["rule"]["state"] = rule.state_dict()
    if buffers:
        out["rule"]["buffers"] = rule.buffer_state_dict()
    if not out["rule"]:
        del out["rule"]
    return out


def save_checkpoint(checkpoint_id, model, optimizer, rule, *, buffers: bool = False,
                    extra: Optional[dict] = None) -> None:
    """``torch.distributed.checkpoint.save`` of the sharded model, the optimizer state and the rule's state
    (gate statistics, fired flag, counters; with ``buffers=True`` also θ0 / ĝ0 of the last step). Collective:
    call it on every rank between ``rule.step`` calls. ``extra``: more entries (e.g. a scheduler's state)."""
    buffers = check_bool(buffers, "buffers")   # before the collective: "no" was truthy (saved the buffers)
    import torch.distributed.checkpoint as dcp
    sd = _state(model, optimizer, rule, buffers)
    if extra:
        sd["extra"] = extra
    dcp.save(sd, checkpoint_id=checkpoint_id)


# entries of the rule's state_dict that a checkpoint of an older version lacks (load_state_dict skips them then)
_NEWER_RULE_ENTRIES = ("rule", "optimizer", "params")


def _rule_template(rule, checkpoint_id) -> dict:
    """``rule.state_dict()`` as the structure ``dcp.load`` fills, without the entries the checkpoint folder lacks
    of ``_NEWER_RULE_ENTRIES`` (DCP refuses a missing key)."""
    template = rule.state_dict()
    if isinstance(checkpoint_id, (str, os.PathLike)) and os.path.isdir(checkpoint_id):
        from torch.distributed.checkpoint import FileSystemReader
        saved = FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
        for k in _NEWER_RULE_ENTRIES:
            if f"rule.state.{k}" not in saved:
                template.pop(k, None)
    return template


def load_checkpoint(checkpoint_id, model, optimizer, rule, *, buffers: bool = False,
                    extra: Optional[dict] = None) -> None:
    """Inverse of :func:`save_checkpoint` into a freshly built model / optimizer / rule, sharded the same way
    (tested on the same world size). Resuming continues bit-exactly where the saved run stopped. ``extra`` is
    filled in place with the saved entries of the same names. The rule's state is read first: a rule built with
    other settings than the checkpoint's (K, alpha, the gate's, ...) raises ValueError before the model, the
    optimizer, the rule or ``extra`` change."""
    buffers = check_bool(buffers, "buffers")   # before anything is read or changed
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    before = rule.state_dict()
    saved = {"rule": {"state": _rule_template(rule, checkpoint_id)}}
    dcp.load(saved, checkpoint_id=checkpoint_id)
    rule.load_state_dict(saved["rule"]["state"])      # checks the settings before it changes anything
    try:
        sd = _state(model, optimizer, rule, buffers, rule_state=False)
        if extra is not None:
            sd["extra"] = extra
        dcp.load(sd, checkpoint_id=checkpoint_id)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    except BaseException:
        rule.load_state_dict(before)
        raise
