"""GXPO / SFPO over an FSDP2 model: the plain-PyTorch rules with their tensor hooks mapped onto local shards.

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps every parameter as a DTensor sharded on dim 0 over a 1-D
device mesh; its gradient (reduce-scattered in backward) is a DTensor with the same layout, and the optimizer
steps the DTensors shard by shard. The algorithm is ``update.gxpo`` / ``update.sfpo`` unchanged; here:

- ``_param_list()`` is the optimizer's DTensor parameters (so optimizer state and ``.grad`` stay keyed by them);
  ``_grad_list`` returns the LOCAL gradient shards (``p.grad.to_local()``), which clipping scales in place;
- θ0 and ĝ0 are plain tensors of each rank's local shard shapes (a rank holding no rows of a parameter has
  a zero-numel buffer); snapshot / restore / the fused extrapolation only touch ``p.to_local()``;
- ``_global_grad_norm``: the local sum of squares, one all-reduce (SUM) of two float64 (with the count of ranks
  whose checks of the gradients failed: then every rank raises), sqrt: the same global norm, hence the same clip
  coefficient, finite check and gate input, on every rank;
- ``_all_reduce_`` / ``_observe_entropy``: ``integrations._sharded`` over the mesh's process group;
- a GXPO fallback step on the stored ĝ0 wraps the local buffers back into DTensor gradients.
Nothing here gathers a full parameter; FSDP's own all-gather in forward re-reads the edited shards.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ...update.base import _copy_all_, _local
from ...update.gxpo import GXPO
from ...update.sfpo import SFPO
from .._sharded import ShardedReductions


def _locals(ts):
    """Local shards of a list of DTensors (plain tensors and None as they are)."""
    return None if ts is None else [_local(t) for t in ts]


def _param_groups(module) -> list:
    """FSDP2's parameter groups of one module (private state): torch >= 2.11 keeps a list (several with a
    per-parameter mesh from ``shard_placement_fn``, where the singular accessor raises AssertionError), older
    torch one group or None."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(module, FSDPModule):
        return []
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [getattr(state, "_fsdp_param_group", None)]
    return [g for g in groups if g is not None]


_FP16 = ("float16 is not supported by GXPO/SFPO on FSDP2: fp16 needs loss scaling, and torch's GradScaler cannot "
         "drive the rule (it calls optimizer.step() several times per update itself, so scaler.step's unscale and "
         "overflow skip never run, and a loss scaled in the closure reaches clipping, the gates and the "
         "extrapolation scaled); use bfloat16, or DeepSpeed's fp16 (gxpo_kernels.integrations.deepspeed), whose loss "
         "scale the rule advances once per update")


def check_fsdp(model, optimizer) -> "torch.distributed.device_mesh.DeviceMesh":
    """Refuse what the rule does not support, by name; returns the (common, 1-D) device mesh."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
    if not isinstance(model, FSDPModule):
        raise TypeError(f"model must be the root module returned by torch.distributed.fsdp.fully_shard (an "
                        f"FSDPModule), got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for group in (g for mod in model.modules() for g in _param_groups(mod)):   # (the device check below too)
        if isinstance(getattr(group, "offload_policy", None), CPUOffloadPolicy):
            raise ValueError("CPUOffloadPolicy is not supported by GXPO/SFPO on FSDP2 (untested: on a CPU mesh it "
                             "moves nothing, and its real path needs an accelerator); shard without offload_policy")
        mp = getattr(group, "mp_policy", None)
        if mp is not None and torch.float16 in (mp.param_dtype, mp.reduce_dtype, mp.output_dtype):
            raise ValueError(f"MixedPrecisionPolicy with {_FP16}")
    owned = {id(p) for p in model.parameters()}
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not params:
        raise ValueError("the optimizer has no trainable parameters")
    mesh = None
    for p in params:
        if id(p) not in owned:
            raise ValueError("the optimizer holds a parameter that is not the model's: build it from "
                             "model.parameters() after fully_shard")
        if not isinstance(p, DTensor):
            raise ValueError("every trainable parameter must be sharded by fully_shard (a DTensor); found a plain "
                             f"tensor of shape {tuple(p.shape)}")
        if p.dtype == torch.float16:
            raise ValueError(f"a parameter in {_FP16}")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"only FSDP2's 1-D dim-0 sharding is supported (HSDP and tensor parallelism are not); "
                             f"got mesh {tuple(p.device_mesh.shape)} with placements {p.placements}")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError("all parameters must be sharded over the same device mesh")
        if p.device.type == "cpu" and mesh.device_type != "cpu":
            raise ValueError("parameters live on the CPU while the mesh is on the accelerator (CPUOffloadPolicy?): "
                             "CPU offload is not supported by GXPO/SFPO on FSDP2")
    return mesh


class _FSDPRule(ShardedReductions):
    """Mixin over ``GXPO`` / ``SFPO``: first in the MRO, so its hooks replace the single-process ones."""

    def _fsdp_init(self, model, mesh) -> None:
        self.model, self.mesh = model, mesh
        self.last_extrapolation: Optional[dict] = None
        self._shard_groups = [g for m in model.modules() for g in _param_groups(m)]

    def _run_closure(self, closure, pass_index: int):
        loss = super()._run_closure(closure, pass_index)
        if not all(getattr(g, "is_sharded", True) for g in self._shard_groups):
            raise RuntimeError("an FSDP module is still unsharded after the closure (set_reshard_after_backward"
                               "(False) or a forward without backward?): GXPO/SFPO edit the shards between passes and "
                               "the next forward would reuse the stale unsharded copy; leave resharding on for the "
                               "closure's last backward")
        return loss

    def _unreduced_grads_refusal(self) -> Optional[RuntimeError]:
        """The error when the closure left a gradient unreduced in FSDP's unsharded parameters (gradient sync off,
        ``set_requires_gradient_sync(False)``, for its last backward): that pass's gradient then misses it (the
        sharded ``.grad`` is None or partial), and the next backward adds the pending sum into the next pass's."""
        for group in self._shard_groups:
            for fp in getattr(group, "fsdp_params", ()):
                up = getattr(fp, "_unsharded_param", None)
                if getattr(fp, "unsharded_accumulated_grad", None) is not None or (up is not None and
                                                                                    up.grad is not None):
                    return RuntimeError(
                        f"{self._rule_name}.step: an FSDP module kept its gradients unreduced after the closure "
                        "(set_requires_gradient_sync(False) on its last backward?): the pass's gradients would miss "
                        "them and the next backward would add them to the next pass's; turn gradient sync back on "
                        "before the closure's last backward")
        return None

    def _abort_step_(self) -> None:
        """An exception inside the step. Between a forward and its backward FSDP leaves modules unsharded (the root
        always: it keeps its parameters for the backward); the rewind then edits the shards, and the next forward
        would reuse the stale unsharded copy, silently, at the point the aborted pass ran. Reshard first (torch's
        ``reset_iter_state`` also clears FSDP's per-iteration state; older torch: ``reshard`` per module). A closure
        that accumulates micro-batches without gradient sync (``set_requires_gradient_sync(False)``) and raised
        before its last one leaves their sum in the unsharded parameters' ``.grad``, which neither clears and the
        next backward would add to: drop it too."""
        from torch.distributed.fsdp import FSDPModule
        super()._abort_step_()
        reset = getattr(self.model, "reset_iter_state", None)
        if reset is not None:
            reset()
        else:
            for m in self.model.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()
        for group in self._shard_groups:
            for fp in getattr(group, "fsdp_params", ()):
                if getattr(fp, "_unsharded_param", None) is not None:
                    fp._unsharded_param.grad = None
                if getattr(fp, "unsharded_accumulated_grad", None) is not None:   # (reduce_dtype set)
                    fp.unsharded_accumulated_grad = None

    # ---- reductions ---------------------------------------------------------------------------------------------
    def _reduce_group(self):
        return self.mesh.get_group()

    def _reduce_device(self) -> torch.device:
        kind = self.mesh.device_type
        if kind == "cpu":
            return torch.device("cpu")
        return torch.device(kind, torch.get_device_module(kind).current_device())

    def _global_grad_norm(self, grads) -> torch.Tensor:
        return self._reduced_grad_norm(grads, None)

    def _reduced_grad_norm(self, grads, refusal) -> torch.Tensor:
        """sqrt(Σ_ranks ‖local shards‖²) and the count of ranks that refused their gradients (a sparse one, a
        frozen parameter with a grad, gradients left unreduced): one all-reduce of two float64 (NaN/inf anywhere
        -> NaN/inf everywhere; a refusal anywhere -> an error everywhere)."""
        if refusal is None:   # a check of this rank's FSDP state: it rides the same all-reduce
            refusal = self._unreduced_grads_refusal()
        sq = torch.zeros(2, dtype=torch.float64, device=self._reduce_device())
        local = [g for g in grads if g is not None and g.numel()] if refusal is None else []
        if local:
            sq[0] += (torch.nn.utils.get_total_norm(local, 2.0).double() ** 2).to(sq.device)
        sq[1] = float(refusal is not None)
        if self._world() > 1:
            dist.all_reduce(sq, group=self._reduce_group())
        self._raise_refusals(refusal, int(sq[1]), "the gradients of this pass")
        return sq[0].sqrt().reshape(())

    # ---- tensors: the local shards ------------------------------------------------------------------------------
    def _grad_list(self, params):
        return [_local(p.grad) for p in params]

    def _validate_step(self, params) -> None:
        super()._validate_step(_locals(params))            # contiguity, dtypes, no aliasing: of the local shards

    @torch.no_grad()
    def _snapshot_params_(self) -> None:
        local = _locals(self._param_list())
        if self._theta0 is None or [(b.shape, b.dtype, b.device) for b in self._theta0] != [
                (t.shape, self._buffer_dtype(t), t.device) for t in local]:
            self._theta0 = [torch.empty_like(t, dtype=self._buffer_dtype(t), memory_format=torch.contiguous_format)
                            for t in local]
        self._snapshot_copy_(self._theta0, local)

    @torch.no_grad()
    def _restore_params_(self) -> None:
        _copy_all_(_locals(self._param_list()), self._theta0)

    def _extrapolate(self, params, g0, g1, **kw):
        views = _locals(params)
        self._record_extrapolation(views)
        return super()._extrapolate(views, g0, _locals(g1), **kw)

    def _save_first_move_(self, params) -> None:
        super()._save_first_move_(_locals(params))

    def _displacements_(self, params, g1) -> None:
        super()._displacements_(_locals(params), _locals(g1))

    def _group_hparams(self, params) -> List[tuple]:
        return super()._group_hparams(self._param_list())  # by the DTensor params (same order as ``params``)

    def _set_grads_(self, params, bufs, had) -> None:
        # a copy: a grad aliasing the ĝ0 buffer would be zeroed / accumulated into by the next step's closure
        for p, b, h in zip(params, bufs, had):
            p.grad = DTensor.from_local(b.to(p.dtype, copy=True), p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride()) if h else None

    # ---- the outer update ---------------------------------------------------------------------------------------
    def step(self, closure, entropy=None, *, force_plain: bool = False) -> dict:
        """One outer update (see the rule's docstring); ``closure()`` zeroes the grads, runs forward and
        ``loss.backward()`` on the FSDP model and returns the loss. Adds ``shard_numel`` (this rank's element
        count in the extrapolation) and ``extrapolate_backend`` to the diagnostics of an active step.
        ``force_plain`` must be the same on every rank (ValueError on every rank otherwise)."""
        self.last_extrapolation = None
        self._gate_entropy = None
        force_plain = self._agree_step(force_plain, entropy)
        info = super().step(closure, entropy=entropy, force_plain=force_plain)
        if self.last_extrapolation is not None:
            info["shard_numel"] = self.last_extrapolation["numel"]
            info["extrapolate_backend"] = self.last_extrapolation["backend"]
        self._report_gate_entropy(info)
        return info

    # ---- checkpointing ------------------------------------------------------------------------------------------
    def buffer_state_dict(self) -> dict:
        """θ0 (and GXPO's ĝ0) as DTensors over the parameters' layout, aliasing the local buffers (allocated
        here if no step ran yet or a gate that fired for good released them: then the current shards and a zero
        ĝ0), for ``torch.distributed.checkpoint``: saving writes the local shards, loading
        fills them in place. The buffers are re-snapshotted at every active step, so they only matter for
        inspecting the last step; the rule's resumable state is ``state_dict()``."""
        params = self._param_list()
        if self._theta0 is None:
            self._snapshot_params_()
        out = {"theta0": self._theta0}
        if isinstance(self, GXPO):
            if self._g0 is None:
                self._g0 = [torch.zeros_like(b) for b in self._theta0]
                self._had_grad0 = [True] * len(self._g0)
            out["g0"] = self._g0
        return {k: {str(i): DTensor.from_local(b, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                               stride=p.stride()) for i, (p, b) in enumerate(zip(params, bufs))}
                for k, bufs in out.items()}


class FSDPGXPO(_FSDPRule, GXPO):
    """:class:`~gxpo_kernels.update.GXPO` on an FSDP2 model; build it with
    :func:`gxpo_kernels.integrations.fsdp.wrap`."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, **kw):
        mesh = check_fsdp(model, optimizer)
        GXPO.__init__(self, optimizer, **kw)
        self._fsdp_init(model, mesh)


class FSDPSFPO(_FSDPRule, SFPO):
    """:class:`~gxpo_kernels.update.SFPO` on an FSDP2 model; see :class:`FSDPGXPO`."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, **kw):
        mesh = check_fsdp(model, optimizer)
        SFPO.__init__(self, optimizer, **kw)
        self._fsdp_init(model, mesh)
