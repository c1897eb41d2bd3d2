"""GXPO / SFPO over a DeepSpeed engine: the plain-PyTorch rules with their hooks mapped onto ZeRO shards.

How one pass maps onto DeepSpeed (the algorithm itself is ``update.gxpo`` / ``update.sfpo``, unchanged):

1. ``_run_closure``: re-sync the low-precision weights if a shard was edited, run the user's closure (forward +
   ``engine.backward`` for each of the ``gradient_accumulation_steps`` micro-batches; the rule calls the
   non-boundary ``engine.step()`` after each backward), then the boundary ``engine.step()``.
2. Inside that ``engine.step()`` DeepSpeed reduce-scatters, unscales, computes the global norm, clips (its
   ``clip_grad`` is the rule's ``max_grad_norm``) and calls the base optimizer per shard. The wrapped
   ``base_optimizer.step`` stashes each shard's final fp32 gradient and applies the optimizer step iff the
   (already all-reduced) global norm is finite, which is exactly the branch every caller in ``update/``
   takes after ``_clip`` (finite -> ``_optimizer_step``; not finite -> no step). The step is then "pending" and
   the next ``_optimizer_step()`` consumes it; an ``_optimizer_step()`` with nothing pending (a fallback)
   steps directly on the shards with the rule-provided ``.grad``.
3. ``_grad_list`` returns the stashed shard gradients, ``_global_grad_norm`` DeepSpeed's reduced norm (NaN when
   DeepSpeed skipped the step: overflow / ``was_step_applied() == False``), ``_clip_grads_`` is a no-op
   (already clipped), ``_all_reduce_`` reduces over the dp group. Every decision is therefore rank-consistent.
4. Edits of the shards outside ``engine.step`` (θ0 restore, extrapolation, direct steps) mark the low-precision
   copy dirty; it is re-synced (a collective) before the next forward and at the end of ``step()``.
Side effects of the internal ``engine.step()`` calls are undone once per outer update: the LR scheduler is
detached during them and stepped once at the end (if any optimizer step was applied), ``global_steps`` /
``global_samples`` advance by one update, and a dynamic fp16 loss scaler makes one update per outer step. The
scaler is held during the internal ``engine.step()`` calls: DeepSpeed updates the scale before it unscales the
gradients, so a pass on which the scale grew would be unscaled by twice the scale its backward used (a halved
gradient), and every pass of an outer update must see the scale it began with.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, List, Optional

import torch

from ...update.gxpo import GXPO
from ...update.sfpo import SFPO
from .._sharded import ShardedReductions
from ._zero import ZeroShards


class _DeepSpeedRule(ShardedReductions):
    """Mixin over ``GXPO`` / ``SFPO``: first in the MRO, so its hooks replace the single-process ones."""

    # ---- set-up ----------------------------------------------------------------------------------------------
    def _ds_init(self, engine, zero: ZeroShards) -> None:
        self.engine, self.zero = engine, zero
        self._capturing = False
        self._capture_norm: Optional[float] = None
        self._applied_in_ds = False
        self._pending = False
        self._pass_norm = math.nan
        self._lp_dirty = False
        self._lp_stale = False   # a step raised and left the module's weights behind the master (ZeRO-1/2)
        self._stash = {}
        self._any_applied = False
        self._overflow_seen = False
        self._broken_accumulation: Optional[int] = None   # backward calls of a pass that stopped midway
        self._scaler = None                               # the dynamic fp16 loss scaler, held during step()
        self.last_extrapolation: Optional[dict] = None
        self._pad_by_id = {id(sh): gaps for sh, gaps in zip(zero.shards(), zero.padding_segments())}
        # DeepSpeed-owned persistent .grad buffers (CPU offload); restored after the rule borrows .grad
        self._ds_grads = [s.grad for s in zero.shards()]
        opt = zero.base_optimizer
        if getattr(opt, "_gxpo_rule_attached", False):
            raise ValueError("this engine already has a GXPO/SFPO rule attached; call rule.detach() first")
        self._instance_step = vars(opt).get("step")     # e.g. an LR scheduler's step-tracking wrapper
        orig = opt.step

        def step(*args, **kwargs):
            return self._wrapped_base_step(orig, *args, **kwargs)
        if hasattr(orig, "_wrapped_by_lr_sched"):        # a torch LR scheduler's call tracker, which orig still
            step._wrapped_by_lr_sched = True              # runs: else its first step warns "overridden after ..."
        opt.step = step                                   # instance attribute: DeepSpeed calls optimizer.step()
        opt._gxpo_rule_attached = True
        # stale weights must not be read silently (see step's except branch); a weak reference: the module must
        # not keep a detached rule alive
        check = _StaleWeightsCheck(weakref.ref(self))
        self._stale_hooks = (engine.module.register_forward_pre_hook(check),
                             engine.module.register_state_dict_pre_hook(check))

    def detach(self) -> None:
        """Remove the base-optimizer wrapper and restore the engine's gradient clipping where ``wrap``'s
        ``max_grad_norm`` changed it (the engine then trains as plain DeepSpeed again)."""
        if self._lp_stale:   # the hook goes with the rule: stale weights would then be read silently
            raise RuntimeError("a rule.step raised and left the module's weights behind the fp32 master shards: "
                               "call rule.sync_weights() on every rank before detach()")
        opt = self.zero.base_optimizer
        if self._instance_step is not None:
            opt.step = self._instance_step
        else:
            vars(opt).pop("step", None)
        opt._gxpo_rule_attached = False
        for h in self._stale_hooks:
            h.remove()
        if getattr(self, "_engine_clip_grad", None) is not None:
            self.engine.optimizer.clip_grad = self._engine_clip_grad

    # ---- DeepSpeed's call into the base optimizer ----------------------------------------------------------
    def _wrapped_base_step(self, orig, *args, **kwargs):
        if not self._capturing:
            return orig(*args, **kwargs)
        if self._capture_norm is None:
            self._capture_norm = self.zero.global_grad_norm()
        for grp in self.zero.base_optimizer.param_groups:
            for p in grp["params"]:
                if p.grad is not None:
                    buf = self._stash.get(id(p))
                    if buf is None or buf.shape != p.grad.shape or buf.device != p.grad.device:
                        buf = torch.empty_like(p.grad, dtype=torch.float32, memory_format=torch.contiguous_format)
                        self._stash[id(p)] = buf
                    buf.copy_(p.grad)
                    for a, n in self._pad_by_id.get(id(p), ()):   # keep padding out of dot products
                        buf.narrow(0, a, n).zero_()
        if math.isfinite(self._capture_norm):
            self._applied_in_ds = True
            return orig(*args, **kwargs)
        return None

    @contextlib.contextmanager
    def _loss_scale_held(self):
        """Keep the dynamic fp16 loss scale fixed inside one internal ``engine.step()``. DeepSpeed updates the scale
        before it unscales: on a pass where the scale grew, the gradient would be divided by twice the scale its
        backward used. Overflow is still detected (the pass falls back), and the scaler's own update still raises
        where DeepSpeed's would (scale at its minimum); ``step()`` makes the one update of the outer step."""
        scaler = self._scaler
        if scaler is None:
            yield
            return
        own, real = vars(scaler).get("update_scale"), scaler.update_scale

        def hold(overflow):
            kept = dict(vars(scaler))
            real(overflow)
            vars(scaler).update(kept)
        scaler.update_scale = hold
        try:
            yield
        finally:
            if own is None:
                del scaler.update_scale
            else:
                scaler.update_scale = own

    def _ds_boundary_step(self) -> None:
        eng = self.engine
        if not eng.is_gradient_accumulation_boundary():
            raise RuntimeError("internal: the rule's engine.step() is not on a gradient-accumulation boundary")
        self._capturing, self._capture_norm, self._applied_in_ds = True, None, False
        sched, eng.lr_scheduler = eng.lr_scheduler, None
        try:
            with self._loss_scale_held():
                eng.step()
        finally:
            self._capturing = False
            eng.lr_scheduler = sched
        if eng.was_step_applied() and self._capture_norm is not None:
            self._pass_norm = self._capture_norm
        else:                                             # DeepSpeed skipped the step (overflow): fall back
            self._pass_norm = math.nan
            self._applied_in_ds = False
        if not math.isfinite(self._pass_norm):
            self._overflow_seen = True
        self._pending = self._applied_in_ds
        self.zero.relink_optimizer_views()

    # ---- hooks of ExtrapolationRule ----------------------------------------------------------------------------
    def _param_list(self) -> List[torch.Tensor]:
        return self.zero.shards()

    def _grad_list(self, params):
        return [self._stash.get(id(p)) for p in params]

    def _model_signature(self) -> dict:
        return {}   # the shards differ per rank (and rank 0's client_state is every rank's); DeepSpeed checks shapes

    def _global_grad_norm(self, grads) -> torch.Tensor:
        return torch.tensor(self._pass_norm, dtype=torch.float64)

    def _step_keeps_grads(self) -> bool:
        return True                                       # the grads are the rule's own stash: no step writes them

    def _clip_grads_(self, grads, total_norm) -> None:
        return None                                       # DeepSpeed clipped (clip_grad = max_grad_norm)

    def _reduce_group(self):
        return self.zero.dp_group

    def _reduce_device(self) -> torch.device:
        """The accelerator (NCCL cannot reduce CPU tensors; DeepSpeed's CPU accelerator reduces over gloo)."""
        from deepspeed.accelerator import get_accelerator
        return torch.device(get_accelerator().current_device_name())

    _late_snapshot = False   # engine.step() inside the closure may apply the first optimizer step

    def _optimizer_step(self) -> None:
        if self._pending:                                 # already applied inside engine.step()
            self._pending = False
        else:
            self.zero.direct_step()
            self._restore_ds_grads()
            self._lp_dirty = True
        self._any_applied = True
        self.total_optimizer_steps += 1

    def _zero_grad(self) -> None:
        if self._pending:
            raise RuntimeError("internal: DeepSpeed applied an optimizer step the update rule then discarded")
        self._restore_ds_grads()

    def _restore_ds_grads(self) -> None:
        for s, g in zip(self.zero.shards(), self._ds_grads):
            s.grad = g

    @torch.no_grad()
    def _restore_params_(self) -> None:
        super()._restore_params_()
        self._lp_dirty = True

    @torch.no_grad()
    def _rewind_for_fallback(self) -> None:
        if self._pending:
            # pass 0's engine.step() applied a step the single-process rule never takes (it falls back before its
            # first optimizer step: ‖g0‖ <= min_grad_norm with fallback_grad="recompute"): undo all of it, the
            # optimizer state too whatever fallback_state says ("keep" keeps the steps the rule took, not this one)
            self._pending = False
            if self._snapped_params:
                self._restore_params_()
                if self._snapped_opt:
                    self._restore_optimizer_state_()
            return
        super()._rewind_for_fallback()

    @torch.no_grad()
    def _restore_optimizer_state_(self) -> None:
        super()._restore_optimizer_state_()
        self.zero.relink_optimizer_views()

    def _extrapolate(self, params, g0, g1, **kw):
        """The fused op on the shards' real data only: contiguous views that skip ZeRO's alignment padding
        (uninitialised under ZeRO-3), so statistics and the non-finite check see parameters only."""
        segs = self.zero.valid_segments()

        def cut(ts):
            if ts is None:
                return None
            views = [t.reshape(-1).narrow(0, a, n) for t, runs in zip(ts, segs) for a, n in runs]
            # a rank whose shards are all padding (a model smaller than the alignment of a wide dp group) still
            # returns the statistics vector the all-reduce expects: an empty view, not an empty list
            return views or [ts[0].reshape(-1)[:0]]
        t0_full, self._theta0 = self._theta0, cut(self._theta0)
        try:
            views = cut(params)
            self._record_extrapolation(views)
            out = super()._extrapolate(views, cut(g0), cut(g1), **kw)
        finally:
            self._theta0 = t0_full
        self._lp_dirty = True
        return out

    def _group_hparams(self, params) -> List[tuple]:
        groups = self.zero.base_optimizer.param_groups
        return [(float(groups[g].get("lr", 0.0)), float(groups[g].get("weight_decay", 0.0)))
                for g in self.zero.group_index()]

    def _sync_lp(self) -> None:
        if self._lp_dirty:
            self.zero.resync_lp()
            self._lp_dirty = False
        self._lp_stale = False

    def sync_weights(self) -> None:
        """Bring the module's (low-precision) weights up to the fp32 master shards where a step that raised left
        them behind (ZeRO-1/2 and the BF16_Optimizer re-gather them at the next ``step`` or ``save_checkpoint``
        only, see ``step``); nothing when they are current. A collective: call it on every rank, e.g. before an
        evaluation forward after an exception from ``step`` that every rank caught (until then a forward of the
        module or its ``state_dict()`` raises RuntimeError rather than read the stale weights)."""
        self._sync_lp()

    def _run_closure(self, closure: Callable, pass_index: int):
        if self._pending:
            raise RuntimeError("internal: a DeepSpeed-applied optimizer step was not consumed by the update rule")
        self._sync_lp()
        eng = self.engine
        gas = eng.gradient_accumulation_steps()
        count = [0]
        orig_backward = eng.backward

        def backward(*args, **kwargs):
            if count[0] >= gas:
                raise RuntimeError(f"the closure called engine.backward more than gradient_accumulation_steps="
                                   f"{gas} times in one pass")
            out = orig_backward(*args, **kwargs)
            count[0] += 1
            if count[0] < gas:
                eng.step()                                # non-boundary micro-step: bookkeeping only
            return out

        eng.backward = backward
        done = False
        try:
            loss = super()._run_closure(closure, pass_index)
            done = count[0] == gas
        finally:
            del eng.backward
            if gas > 1 and count[0] and not done:      # DeepSpeed is left in the middle of an accumulation
                self._broken_accumulation = count[0]
        if count[0] != gas:
            raise RuntimeError(f"the closure must call engine.backward once per micro-batch "
                               f"(gradient_accumulation_steps={gas}); it called it {count[0]} times")
        self._ds_boundary_step()
        return loss

    # ---- the outer update -------------------------------------------------------------------------------------
    def _abort_step_(self) -> None:
        """An exception inside the step: drop a DeepSpeed-applied step that was not consumed (the rewind of the
        shards and the optimizer state follows), drop the gradients a closure that raised after
        ``engine.backward`` left in ZeRO's accumulation buffers, and mark the low-precision copy stale (``step``
        re-syncs it after the rewind: at once under ZeRO-3, lazily where that is a collective). No collective here:
        the exception may have been raised on this rank only."""
        self._pending = False
        self._lp_dirty = True
        if self.engine.micro_steps % self.engine.gradient_accumulation_steps() == 0:
            # on the boundary: nothing is mid-accumulation, so this is exactly the state after an engine.step().
            # Without it ZeRO-3 (micro_step_id) and the BF16_Optimizer (fp32 grads) ADD the aborted pass's
            # gradient to the next pass's: the retried step silently used g + g_aborted
            self.engine.optimizer.zero_grad(set_to_none=True)

    def step(self, closure: Callable, entropy=None, *, force_plain: bool = False) -> dict:
        """One outer update (see the rule's docstring); ``closure()`` runs forward + ``engine.backward(loss)`` for
        every micro-batch and returns the loss. The rule calls ``engine.step()``. Returns the diagnostics dict.
        ``force_plain`` must be the same on every rank (ValueError on every rank otherwise)."""
        eng = self.engine
        gas = eng.gradient_accumulation_steps()
        if eng.micro_steps % gas:
            if self._broken_accumulation is not None:
                raise RuntimeError(f"an earlier rule.step stopped inside a pass after {self._broken_accumulation} "
                                   f"engine.backward call(s) (gradient_accumulation_steps={gas}): its closure raised, "
                                   "or called engine.backward a wrong number of times. DeepSpeed's partial gradient "
                                   "accumulation cannot be rewound, so this engine cannot continue; load a checkpoint "
                                   "into a fresh engine (an exception before the pass's first engine.backward, or "
                                   "with gradient_accumulation_steps=1, is rewound)")
            raise RuntimeError(f"engine.micro_steps={eng.micro_steps} is not on a gradient-accumulation boundary "
                               f"(gas={gas}): do not call engine.step() yourself between rule.step() calls")
        force_plain = self._agree_step(force_plain, entropy)
        g_steps, g_samples, skipped = eng.global_steps, eng.global_samples, eng.skipped_steps
        scaler = getattr(eng.optimizer, "loss_scaler", None)
        scaler_snap = dict(vars(scaler)) if getattr(scaler, "dynamic", False) else None
        self._scaler = scaler if scaler_snap is not None else None
        self._any_applied = self._overflow_seen = False
        self.last_extrapolation = None                    # report shard_numel / backend only for this step's
        self._gate_entropy = None
        try:
            info = super().step(closure, entropy=entropy, force_plain=force_plain)
        except BaseException:
            # the rewound shards reach the module's weights here only where that is local (ZeRO-3). ZeRO-1/2 and the
            # BF16_Optimizer re-gather them with an all-gather, which an exception raised on some ranks only (their
            # closure) would pair with the other ranks' collectives: every rank hung. There they stay marked stale
            # and are re-gathered by the next step before its first forward, by save_checkpoint or sync_weights();
            # until then a forward or state_dict() of the module raises (_StaleWeightsCheck)
            if self.zero.kind == "z3":
                self._sync_lp()
            else:
                self._lp_stale = self._lp_dirty
            # the step was rewound: so are the counters its internal engine.step() calls advanced
            eng.global_steps, eng.global_samples, eng.skipped_steps = g_steps, g_samples, skipped
            if scaler_snap is not None:
                vars(scaler).update(scaler_snap)
            raise
        if self._pending:
            raise RuntimeError("internal: a DeepSpeed-applied optimizer step was not consumed by the update rule")
        self._sync_lp()
        eng.global_steps = g_steps + 1
        eng.global_samples = g_samples + eng.train_batch_size()
        eng.skipped_steps = skipped + (0 if self._any_applied else 1)
        eng._step_applied = self._any_applied
        if scaler_snap is not None:
            vars(scaler).update(scaler_snap)
            scaler.update_scale(self._overflow_seen)
        if eng.lr_scheduler is not None and self._any_applied:
            try:
                eng.lr_scheduler.step()
            except TypeError:                             # DeepSpeed's own fallback for Megatron-style schedulers
                eng.lr_scheduler.step(eng.train_batch_size())
        if self.last_extrapolation is not None:
            info["shard_numel"] = self.last_extrapolation["numel"]
            info["extrapolate_backend"] = self.last_extrapolation["backend"]
        self._report_gate_entropy(info)
        return info


class _StaleWeightsCheck:
    """Forward and state-dict pre-hook of the engine's module: refuses to let the module's weights be read while
    a ``rule.step`` that raised has left them behind the fp32 master shards (ZeRO-1/2, BF16_Optimizer)."""

    def __init__(self, rule_ref):
        self.rule_ref = rule_ref

    def __call__(self, module, *args, **kwargs):
        rule = self.rule_ref()
        if rule is not None and rule._lp_stale:
            raise RuntimeError("the module's weights are behind the fp32 master shards: a rule.step raised, and "
                               "re-gathering them (ZeRO-1/2, BF16_Optimizer) is a collective the step could not "
                               "run then (the exception may have been raised on this rank only). Call "
                               "rule.sync_weights() on every rank first (rule.step and gds.save_checkpoint do it)")


class DeepSpeedGXPO(_DeepSpeedRule, GXPO):
    """:class:`~gxpo_kernels.update.GXPO` on a DeepSpeed engine (ZeRO 1/2/3, BF16_Optimizer); build it with
    :func:`gxpo_kernels.integrations.deepspeed.initialize` or :func:`~gxpo_kernels.integrations.deepspeed.wrap`."""

    def __init__(self, engine, zero: ZeroShards, **kw):
        GXPO.__init__(self, zero.base_optimizer, **kw)
        self._ds_init(engine, zero)


class DeepSpeedSFPO(_DeepSpeedRule, SFPO):
    """:class:`~gxpo_kernels.update.SFPO` on a DeepSpeed engine; see :class:`DeepSpeedGXPO`."""

    def __init__(self, engine, zero: ZeroShards, **kw):
        SFPO.__init__(self, zero.base_optimizer, **kw)
        self._ds_init(engine, zero)
