"""Shared machinery of the extrapolating update rules (GXPO, SFPO): a wrapper around any torch.optim.Optimizer.

The rules are driven by a closure (the LBFGS convention: ``closure()`` zeroes the grads, computes the loss,
calls ``backward()`` and returns the loss). Everything that touches tensors goes through a small set of hooks
so that a distributed subclass (e.g. DeepSpeed ZeRO over flat fp32 master shards) can reuse the algorithm:

- ``_param_list()`` / ``_grad_list(params)``: the (param, grad) tensor lists the algorithm works on;
- ``_global_grad_norm(grads)`` and ``_clip_grads_(grads, norm)``: global-norm clipping (torch's
  ``clip_grad_norm_`` semantics: coef = min(1, c / (‖g‖ + 1e-6)));
- ``_reduced_grad_norm(grads, refusal)``: the global norm, or this rank's refusal of the pass's gradients (a
  sparse gradient, a frozen parameter holding a grad) raised; a sharded subclass reduces both in one collective
  so that every rank raises together;
- ``_all_reduce_(stats)``: applied to every diagnostic / non-finite vector before a decision is taken.
  Contract: entries [:-1] are SUM-reduced, the last entry is MAX-reduced (identity here);
- ``_optimizer_step()``, ``_zero_grad()``;
- ``_snapshot_params_()`` / ``_restore_params_()`` and ``_snapshot_optimizer_state_()`` /
  ``_restore_optimizer_state_()``: in-place ``copy_`` into preallocated buffers, never replacing state entries
  (except that state or keys created after the snapshot are removed again, and a key the step removed is put
  back as a copy); the optimizer-state snapshot also holds every param-group entry but 'params' (state such as
  Prodigy's ``d`` lives there), which the restore puts back;
- ``_lowp_targets()``: optional low-precision copies the extrapolation also writes (None here).
Decisions (fallback, gate) only use reduced quantities: norms from ``_global_grad_norm`` and reduced stats; so do
the refusals that depend on a rank's own tensors or arguments (``_reduced_grad_norm``, an entropy refused by
``_observe_entropy`` or, at the step's start, by ``_entropy_refusal``): a check that raised on some ranks only would
leave the others waiting in a collective, or stepping while those ranks rewind.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import math
import operator
import warnings
from typing import Callable, Dict, List, Optional

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from .._utils import check_bool, check_bools, check_choice, check_scalar
from ..ops.extrapolate import _cpp
from ..ops.extrapolate.op import (_DEVICE, _DTYPE, _TL_DTYPES, EXTRAPOLATE_BACKENDS, ExtrapolationPlan,
                                  _record_reader, extrapolate_, extrapolate_backend)

# torch optimizers whose step reads ``p.grad`` without writing into it (not fused, no grad scaler: see
# ``_can_keep_grads``): a rule may keep pass 0's gradients as ĝ0. Not SGD: its foreach path with Nesterov
# momentum adds the momentum buffer into the grads in place.
_KEEPS_GRADS = (torch.optim.AdamW, torch.optim.Adam)

# grad mode switched by the C function itself: ``torch.no_grad()`` / ``enable_grad()`` build a context object per
# use (half a dozen Python frames), which the step's host code would pay about a dozen times per active step
_set_grad_enabled = torch._C._set_grad_enabled


def _no_grad(fn):
    """``@torch.no_grad()`` for the methods an active step calls every time (same effect, a few C calls)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        prev = torch.is_grad_enabled()
        _set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            _set_grad_enabled(prev)
    return wrapper


class ExtrapolationRule:
    """Base class. Subclasses implement ``step(closure, entropy=None) -> dict``.

    Attributes: ``optimizer``, ``pass_index`` (which pass the closure is being called for), counters
    ``total_backward_passes``, ``total_optimizer_steps``, ``outer_steps``, ``fallbacks``, and ``gate``;
    ``last_grad_norm``: the pre-clip global gradient norm of the latest pass (NaN before the first), which is what
    a trainer logs as its ``grad_norm`` (the gradients the rule leaves behind are already clipped).
    """
    _rule_name = "ExtrapolationRule"   # the name errors give (subclasses such as DeepSpeedGXPO keep "GXPO")

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: Optional[float] = 1.0,
                 transactional_state: bool = False, atomic: bool = True, fallback_grad: str = "reuse",
                 fallback_state: Optional[str] = None, backend: str = "auto"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if _step_needs_closure(optimizer):
            raise TypeError(f"optimizer: {type(optimizer).__name__}.step needs a closure (LBFGS-style), but the rule "
                            "takes one optimizer.step() per pass with the gradients it has clipped; use a "
                            "first-order optimizer such as AdamW")
        max_grad_norm = check_scalar(max_grad_norm, "max_grad_norm", "(0, inf)", optional=True)
        check_bools(transactional_state=transactional_state, atomic=atomic)
        check_choice(backend, "backend", EXTRAPOLATE_BACKENDS)
        check_choice(fallback_grad, "fallback_grad", ("reuse", "recompute"))
        if fallback_state not in (None, "restore", "keep"):
            raise ValueError(f"fallback_state must be None, 'restore' or 'keep', got {fallback_state!r}")
        if fallback_state == "restore" and not (atomic or transactional_state):
            raise ValueError("fallback_state='restore' needs a snapshot of the optimizer state: set atomic=True "
                             "or transactional_state=True")
        self.optimizer = optimizer
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.transactional_state = bool(transactional_state)
        self.atomic = bool(atomic)
        self.fallback_grad = fallback_grad
        # a fallback rewinds the optimizer state too whenever a snapshot exists, unless asked to keep it
        self.fallback_state = fallback_state or ("restore" if (atomic or transactional_state) else "keep")
        self.backend = backend
        self.pass_index = 0
        self.total_backward_passes = 0
        self.total_optimizer_steps = 0
        self.outer_steps = 0
        self.fallbacks = 0
        self.last_grad_norm = math.nan
        self._theta0: Optional[List[torch.Tensor]] = None
        self._theta0_sig: Optional[tuple] = None   # (params, (addresses, dtypes)) the θ0 buffers were checked for
        self._opt_snap: Optional[list] = None
        self._opt_snap_pairs: Optional[tuple] = None   # (buffers, state tensors) of the last snapshot
        self._opt_snap_sig: Optional[tuple] = None     # (params, state keys and values) it was taken of
        self._group_snap: Optional[list] = None        # (param group, its entries but 'params') at the snapshot
        self._warned_entropy = False
        self._in_step = False   # state_dict / load_state_dict refuse to run from inside a step (its closure)

    # ---- hooks a distributed subclass overrides -------------------------------------------------------
    def _param_list(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _grad_list(self, params: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """The grads of ``params`` (None where the closure left a param without one)."""
        return [p.grad for p in params]

    def _all_reduce_(self, stats: torch.Tensor) -> torch.Tensor:
        """Reduce a local stats vector across ranks in place ([:-1] SUM, [-1] MAX). Identity here."""
        return stats

    def _global_grad_norm(self, grads: List[torch.Tensor]) -> torch.Tensor:
        """Global L2 norm of ``grads`` over all ranks (a 0-d tensor); torch's ``get_total_norm`` here, bit for bit."""
        grads = _nonempty(grads)
        if not grads:
            return torch.zeros(())
        if _one_foreach_group(grads):   # get_total_norm's own computation for a single (device, dtype) group
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        return torch.nn.utils.get_total_norm(grads, 2.0)

    def _reduced_grad_norm(self, grads: List[torch.Tensor], refusal: Optional[Exception]) -> torch.Tensor:
        """``_global_grad_norm(grads)``, or ``refusal`` (this rank's check of the pass's gradients failed) raised. A
        sharded subclass reduces the refusals together with the norm, so that every rank raises (the ranks
        without one a RuntimeError saying so) instead of some waiting in the next collective."""
        if refusal is not None:
            raise refusal
        return self._global_grad_norm(grads)

    def _clip_grads_(self, grads: List[torch.Tensor], total_norm: torch.Tensor) -> None:
        """grads *= min(1, c / (total_norm + 1e-6)), bit for bit as ``torch.nn.utils.clip_grad_norm_``."""
        coef = torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
        grads = _nonempty(grads)
        if grads and _one_foreach_group(grads):   # (the common case: no grouping loop in Python)
            torch._foreach_mul_(grads, coef.to(grads[0].device))
            return
        groups: Dict[tuple, List[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), gs in groups.items():
            torch._foreach_mul_(gs, coef.to(dev))

    #: snapshot at the first optimizer step rather than at the start of the step (False where an optimizer step
    #: can happen inside the closure, as with DeepSpeed's engine.step())
    _late_snapshot = True
    _snapshot_due = False

    def _optimizer_step(self) -> None:
        if self._snapshot_due or self._snapped_params:
            self._check_param_groups_unchanged()
        if self._snapshot_due:
            self._take_due_snapshot_()
        self.optimizer.step()
        self.total_optimizer_steps += 1

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _lowp_targets(self) -> Optional[List[Optional[torch.Tensor]]]:
        return None

    def _buffer_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _snapshot_param_list(self) -> List[torch.Tensor]:
        """``_param_list()``, read once for both snapshots while ``_take_due_snapshot_`` collects them."""
        batch = self._snap_batch
        return batch[2] if batch is not None else self._param_list()

    @_no_grad
    def _snapshot_params_(self) -> None:
        params = self._snapshot_param_list()
        # the same parameter objects at the same addresses in the same dtypes as when the buffers were last
        # checked: they still fit, so the per-tensor checks are skipped (a reshaped view of the same storage
        # would make a copy fail loudly, never silently)
        sig = (list(map(torch.Tensor.data_ptr, params)), list(map(_DTYPE, params)))
        last = self._theta0_sig
        if last is None or len(last[0]) != len(params) or not all(map(operator.is_, last[0], params)) \
                or last[1] != sig:
            if self._theta0 is None or len(self._theta0) != len(params) or any(
                    b.shape != p.shape or b.dtype != self._buffer_dtype(p) or b.device != p.device
                    for b, p in zip(self._theta0, params)):
                self._theta0 = [torch.empty_like(p, dtype=self._buffer_dtype(p),
                                                 memory_format=torch.contiguous_format) for p in params]
            self._theta0_sig = (params, sig)
        self._snapshot_copy_(self._theta0, params)

    #: (dst, src, params) while ``_take_due_snapshot_`` collects the θ0 and optimizer-state pairs (None: copy now)
    _snap_batch: Optional[tuple] = None

    def _snapshot_copy_(self, dst: List[torch.Tensor], src: List[Optional[torch.Tensor]]) -> None:
        """``_copy_all_`` for the snapshots (θ0, the optimizer state, a copied ĝ0): buffers read again only much
        later, if ever, so where the extrapolation runs the C++ op (the CPU) they are written with its
        non-temporal stores. Inside ``_take_due_snapshot_`` the pairs are only collected: it copies them all at
        once."""
        batch = self._snap_batch
        if batch is not None:
            batch[0].extend(dst)
            batch[1].extend(src)
            return
        _copy_all_(dst, src, stream=bool(dst) and self._backend_on(dst[0]) == "cpp")

    _backend_memo: Optional[tuple] = None

    def _backend_on(self, t: torch.Tensor) -> str:
        """``extrapolate_backend(self.backend, t.device)``, remembered for the last (backend, device): the step
        asks twice per active step (snapshot, extrapolation) and the answer never changes."""
        dev, memo = t.device, self._backend_memo
        if memo is None or memo[0] != self.backend or memo[1] != dev:
            memo = self._backend_memo = (self.backend, dev, extrapolate_backend(self.backend, dev))
        return memo[2]

    @torch.no_grad()
    def _restore_params_(self) -> None:
        # into the parameters θ0 was taken of: a param group added since (inside a closure) has no θ0 entry
        sig = self._theta0_sig
        _copy_all_(self._param_list() if sig is None else sig[0], self._theta0)

    @_no_grad
    def _snapshot_optimizer_state_(self) -> None:
        self._snapshot_group_entries_()
        params = self._snapshot_param_list()
        # the whole state, in order: its keys, each entry's size and every key and value of the entries. When each
        # is the very object of the last snapshot (torch's optimizers update their state tensors in place), the
        # buffers and the copy pairs of that snapshot are still right, and the per-tensor checks below (a third of
        # this call's cost on a small model) are skipped. Read by iterating the state (C-level passes): looking
        # each parameter up would call Tensor.__hash__, a Python function, once per parameter
        state = self.optimizer.state
        entries = list(state.values())
        sig = (list(state), list(map(len, entries)), list(_chain(_chain(map(_ITEMS, entries)))))
        last = self._opt_snap_sig
        if last is not None and len(last[0]) == len(params) and all(map(operator.is_, last[0], params)) \
                and len(last[1][0]) == len(sig[0]) and all(map(operator.is_, last[1][0], sig[0])) \
                and last[1][1] == sig[1] and all(map(operator.is_, last[1][2], sig[2])):
            self._snapshot_copy_(*self._opt_snap_pairs)
            return
        self._opt_snap_sig = None   # until the new snapshot is complete
        states = [state.get(p) for p in params]
        old = {id(e[0]): e for e in self._opt_snap} if self._opt_snap else {}
        snap, dst, src = [], [], []
        nested = False
        for p, st in zip(params, states):
            if not st:
                snap.append((p, None, None))
                continue
            prev = old.get(id(p))
            bufs = prev[1] if prev is not None and prev[1] is not None else {}
            tens, other = {}, {}
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    b = bufs.get(k)
                    if b is None or b.shape != v.shape or b.dtype != v.dtype or b.device != v.device:
                        b = torch.empty_like(v)
                    dst.append(b)
                    src.append(v)
                    tens[k] = b
                elif isinstance(v, _IMMUTABLE):
                    other[k] = v
                else:   # a container or object the step may change in place (e.g. a list of tensors): a deep copy
                    other[k] = copy.deepcopy(v)
                    nested = True
            snap.append((p, tens, other))
        self._snapshot_copy_(dst, src)
        # nested state is copied anew at every snapshot: its object stays the same while its contents change, so
        # the signature's fast path above cannot see that it moved
        self._opt_snap, self._opt_snap_pairs = snap, (dst, src)
        self._opt_snap_sig = None if nested else (params, sig)

    def _snapshot_group_entries_(self) -> None:
        # the param groups' entries (a few per group, copied every time): optimizers such as Prodigy or
        # D-Adaptation keep state there (their step size d, a step count k) that the step advances
        # (a C-level copy of each group; only the entries of another type than a number or a string, such as
        # Adam's betas or a tensor, go through ``_copy_entry``: the others it would keep by reference too)
        snap = []
        for g in self.optimizer.param_groups:
            entries = dict(g)
            entries.pop("params", None)
            if not set(map(type, entries.values())) <= _SCALARS:
                for k, v in entries.items():
                    if type(v) not in _SCALARS:
                        entries[k] = _copy_entry(v)
            snap.append((g, entries))
        self._group_snap = snap

    @torch.no_grad()
    def _restore_optimizer_state_(self) -> None:
        self._restore_group_entries_()
        dst, src = [], []
        for p, tens, other in self._opt_snap:
            if tens is None:
                self.optimizer.state.pop(p, None)  # the state did not exist at the snapshot
                continue
            st = self.optimizer.state[p]
            for k, b in tens.items():
                t = st.get(k)
                if t is None:   # a key the step removed comes back (a copy: the snapshot stays intact)
                    st[k] = b.clone()
                    continue
                dst.append(t)
                src.append(b)
            for k, v in other.items():
                st[k] = _copy_entry(v)   # the snapshot stays intact
            # every snapshot key is back in the state: a longer state gained keys after the snapshot; they go again
            if len(st) != len(tens) + len(other):
                for k in [k for k in st if k not in tens and k not in other]:
                    del st[k]
        _copy_all_(dst, src)

    def _restore_group_entries_(self) -> None:
        """Every param-group entry but 'params' back to its value at the snapshot; an entry added since goes again.
        Within a step only the optimizer's steps write them (an LR scheduler steps between the rule's steps), so
        this undoes exactly what the rewound optimizer steps wrote. A tensor entry (a tensor ``lr``) is copied into
        in place: a scheduler or a captured graph may hold that tensor."""
        for grp, entries in self._group_snap:
            for k, v in entries.items():
                cur = grp.get(k)
                if cur is v:
                    continue
                if isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor) and cur.shape == v.shape \
                        and cur.dtype == v.dtype and cur.device == v.device:
                    cur.copy_(v)
                else:
                    grp[k] = _copy_entry(v)   # a copy: the snapshot stays intact
            if len(grp) != len(entries) + 1:
                for k in [k for k in grp if k != "params" and k not in entries]:
                    del grp[k]

    # ---- building blocks -----------------------------------------------------------------------------
    def _run_closure(self, closure: Callable, pass_index: int):
        self.pass_index = pass_index
        prev = torch.is_grad_enabled()
        _set_grad_enabled(True)
        try:
            loss = closure()
        finally:
            _set_grad_enabled(prev)
        self.total_backward_passes += 1
        self._bp += 1
        return loss

    @_no_grad
    def _clip(self, params) -> tuple:
        """Global-norm clip of the current grads. Returns (grads, pre-clip norm, post-clip norm) as floats."""
        grads = self._grad_list(params)
        refusal = None   # this rank's checks of the pass's gradients; raised on every rank by _reduced_grad_norm
        if not set(map(_LAYOUT, filter(_NOT_NONE, grads))) <= _STRIDED:   # (C-level passes: every pass)
            i = next(i for i, g in enumerate(grads) if g is not None and g.layout != torch.strided)
            refusal = TypeError(f"{self._rule_name}.step: parameter {i} (shape {tuple(params[i].shape)}) has a "
                                f"{grads[i].layout} gradient (e.g. nn.Embedding(sparse=True)); the rule's clip and "
                                "extrapolation need dense gradients")
        elif self._snapshot_due:   # before the step's first optimizer step
            refusal = self._frozen_grad_refusal()
        total = self._reduced_grad_norm(grads, refusal)
        norm = self.last_grad_norm = float(total)
        if not math.isfinite(norm):
            return grads, norm, norm
        if self.max_grad_norm is None:
            return grads, norm, norm
        self._clip_grads_(grads, total)
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6))
        return grads, norm, norm * coef

    def _plain_step(self, closure: Callable) -> dict:
        """One single-pass GRPO step: closure, clip, optimizer step (skipped when the grads are non-finite)."""
        self._bp = 0
        self.pass_index = 0
        params = self._param_list()
        loss = self._run_closure(closure, 0)
        _, norm, _ = self._clip(params)
        skipped = not math.isfinite(norm)
        if skipped:
            self._zero_grad()
        else:
            self._optimizer_step()
        self.outer_steps += 1
        return {"loss": _to_float(loss), "active": False, "fell_back": False, "skipped": skipped,
                "fallback_reason": None, "gate_z": math.nan, "grad_norm_0": norm, "backward_passes": self._bp}

    def _plain_step_snapshot(self, closure) -> bool:
        """Whether a plain step needs the rewind snapshot: not with a single optimizer step at its end (an
        exception before it changes nothing); a rule whose plain step takes several (SFPO with mini-batch
        closures) says so."""
        return False

    def _check_closure(self, closure) -> None:
        if closure is None or not callable(closure):
            raise TypeError(f"{self._rule_name}.step needs a closure: closure() zeroes grads, computes the loss, "
                            "calls backward() and returns the loss")

    def step(self, closure, entropy=None, *, force_plain: bool = False) -> dict:
        """One outer update on the mini-batch the closure evaluates; returns the diagnostics dict.

        ``force_plain=True`` takes a single-pass step without touching the gate (e.g. a degenerate batch whose
        rollouts nearly all scored zero: the authors' "degenerate-batch skip"); it is reported as a fallback
        with reason "forced". Atomic: if anything raises inside an active step (the closure on any pass, a
        check of this library, the optimizer), the parameters, the optimizer state, the counters and the gate
        are restored to where the step began (``atomic=True``, the default) and the exception propagates.
        Everything that can be checked is checked before the first optimizer step.
        """
        check_bool(force_plain, "force_plain")
        self._check_closure(closure)
        self._in_step = True
        try:
            if not self.gate.rearm_due():
                return self._outer_step(closure, entropy, force_plain)
            # the re-arming is part of this step: an exception anywhere in it leaves the gate fired, as it was
            gate_sd = self.gate.state_dict()
            self.gate.rearm()
            try:
                return self._outer_step(closure, entropy, force_plain)
            except BaseException:
                self.gate.load_state_dict(gate_sd)
                raise
        finally:
            self._in_step = False

    def _outer_step(self, closure, entropy, force_plain: bool) -> dict:
        if force_plain or self.gate.fired:
            snapshot = self._plain_step_snapshot(closure)
            if self.gate.fired and self.gate.rearm_after is None and not snapshot:
                self._release_buffers_()   # fired for good: single-pass steps from now on
            info = self._guarded(lambda: self._plain_step(closure), snapshot=snapshot)
            if force_plain:
                self.fallbacks += 1
                info.update(fell_back=True, fallback_reason="forced")
            if self.gate.fired:   # a forced step while fired counts too (the authors re-arm after n steps)
                self.gate.count_plain_step()
            info["gate_fired_step"] = self.gate.fired_step
            return info
        params = self._param_list()
        self._validate_step(params)
        refusal = self._entropy_refusal(entropy)
        if refusal is not None:
            raise refusal
        return self._guarded(lambda: self._active_step(closure, params, entropy), snapshot=True)

    def _entropy_refusal(self, entropy) -> Optional[Exception]:
        """This rank's refusal of the ``entropy`` argument of an active step (an exception, else None), checked
        before anything moves (a sharded subclass reduces the refusals in the all-reduce that begins every step).
        None here: GXPO reads it through the entropy gate only (``_observe_entropy``, which refuses it on every
        rank)."""
        return None

    def _active_step(self, closure, params, entropy) -> dict:
        raise NotImplementedError

    def _release_buffers_(self) -> None:
        """Drop what only active steps use: θ0, the optimizer-state snapshot and the prepared extrapolation (which
        holds θ0). A later active step (a gate state loaded that has not fired) allocates them again."""
        self._theta0 = self._theta0_sig = None
        self._opt_snap = self._opt_snap_pairs = self._opt_snap_sig = self._group_snap = None
        self._xplan = self._xplan_key = None

    def _validate_step(self, params) -> None:
        """Checks of everything an active step needs, before anything changes."""
        if not params:
            raise ValueError(f"{self._rule_name}: the optimizer has no parameter with requires_grad=True")
        # C-level passes first (this runs every step); the loop below only names the offending parameter
        if not (all(map(torch.Tensor.is_contiguous, params)) and set(map(_DTYPE, params)) <= _FLOATS
                and (all(map(_IS_CPU, params)) or len(set(map(_DEVICE, params))) == 1)
                and not any(map(torch.Tensor.is_neg, params))):
            for i, p in enumerate(params):
                if not p.is_contiguous():
                    raise ValueError(f"{self._rule_name}: parameter {i} (shape {tuple(p.shape)}) is not contiguous; "
                                     "the fused extrapolation needs contiguous parameters "
                                     "(p.data = p.data.contiguous())")
                if p.is_neg():   # its memory holds -p: the fused extrapolation writes raw memory
                    raise ValueError(f"{self._rule_name}: parameter {i} is a lazily negated view (is_neg()); the "
                                     "fused extrapolation writes it in place (p.data = p.data.resolve_neg())")
                if p.dtype not in _FLOATS:
                    raise TypeError(f"{self._rule_name}: parameter {i} has dtype {p.dtype}; float dtypes only")
                if p.device != params[0].device:
                    raise ValueError(f"{self._rule_name}: parameters live on {params[0].device} and {p.device}; "
                                     "one device per rule")
        key = tuple(map(torch.Tensor.data_ptr, params))
        if key != getattr(self, "_alias_checked", None):   # once per parameter layout
            from ..ops.extrapolate.op import _check_no_alias
            _check_no_alias(params, [], None, None, None)
            self._alias_checked = key

    def _param_group_sizes(self) -> tuple:
        return tuple(len(g["params"]) for g in self.optimizer.param_groups)

    def _check_param_groups_unchanged(self) -> None:
        """Raise (the step then rewinds) when the optimizer's parameters changed since the step began, e.g.
        ``add_param_group`` inside the closure: θ0 and the state snapshot do not cover the new parameters, so
        the step could neither extrapolate them nor rewind them."""
        if self._param_group_sizes() != self._step_groups:
            raise ValueError(f"{self._rule_name}.step: the optimizer's parameters changed during the step "
                             f"(param group sizes {self._step_groups} -> {self._param_group_sizes()}, e.g. "
                             "add_param_group inside the closure); change them between steps")

    def _guarded(self, body: Callable[[], dict], *, snapshot: bool) -> dict:
        """Run ``body``; on any exception rewind to the start of the step and re-raise."""
        self._step_groups = self._param_group_sizes()
        counters = (self.total_backward_passes, self.total_optimizer_steps, self.outer_steps, self.fallbacks)
        gate_sd = self.gate.state_dict()
        self._snapped_params = self._snapped_opt = False
        self._snapshot_due = snapshot
        if snapshot and not self._late_snapshot:
            self._take_due_snapshot_()
        try:
            return body()
        except BaseException as e:
            self._abort_step_()
            if self._snapped_params:
                with torch.no_grad():
                    self._restore_params_()
                    if self._snapped_opt:
                        self._restore_optimizer_state_()
                if any(n.startswith("extrapolate_") for n in getattr(e, "__notes__", ())):
                    e.add_note("the update rule has since rewound the step: every param is back where the step "
                               "began (the note above describes the extrapolation's own writes)")
            (self.total_backward_passes, self.total_optimizer_steps, self.outer_steps, self.fallbacks) = counters
            self.gate.load_state_dict(gate_sd)
            self._zero_grad()
            raise
        finally:
            self._snapshot_due = False

    @_no_grad
    def _take_due_snapshot_(self) -> None:
        """θ0 (and the optimizer state when atomic or transactional) of an active step, once. With
        ``_late_snapshot`` it runs just before the step's first optimizer step (``_optimizer_step`` calls it):
        nothing changes before that, and the step then reads the same parameters and moments while they are
        still in cache (taken before pass 0 instead, the copies read them cold from memory)."""
        if not self._snapshot_due:
            return
        self._snapshot_due = False
        if not self._late_snapshot:   # (a late snapshot follows pass 0's ``_clip``, which checked it)
            refusal = self._frozen_grad_refusal()
            if refusal is not None:
                raise refusal
        opt = self.atomic or self.transactional_state
        # θ0 and the optimizer state in one copy (one pass of checks, one call into the op): the snapshot methods
        # only collect their pairs here. Nothing has moved yet, so a snapshot that raises leaves nothing to rewind
        self._snap_batch = batch = ([], [], self._param_list())
        try:
            self._snapshot_params_()
            if opt:
                self._snapshot_optimizer_state_()
        finally:
            self._snap_batch = None
        self._snapshot_copy_(batch[0], batch[1])
        self._snapped_params = True
        self._snapped_opt = opt

    def _frozen_grad_refusal(self) -> Optional[ValueError]:
        """The error to raise (before the step's first optimizer step: nothing has moved) when a parameter of the
        optimizer with requires_grad=False has a ``.grad``, else None: torch's optimizers step every parameter with
        a grad, but the rule's θ0, state snapshot, clip and extrapolation cover the trainable ones only, so the step
        would move it outside them (once per optimizer step, several per active step; a rewind would leave it
        moved). A frozen parameter keeps a grad when it was frozen after a backward and the grads are zeroed with
        ``set_to_none=False``. (A subclass whose ``_param_list`` is not the optimizer's parameters skips it.)"""
        if type(self)._param_list is not ExtrapolationRule._param_list:
            return None
        params = list(_chain(map(_PARAMS, self.optimizer.param_groups)))
        if all(map(_REQUIRES_GRAD, params)):   # no frozen parameter (C-level pass: this runs every active step)
            return None
        for i, p in enumerate(params):
            if p.grad is not None and not p.requires_grad:
                return ValueError(f"{self._rule_name}.step: parameter {i} of the optimizer (shape "
                                  f"{tuple(p.shape)}) has requires_grad=False but a .grad, so the optimizer would "
                                  "step it outside the rule's snapshot and extrapolation; set its grad to None "
                                  "(zero_grad with set_to_none=True) or take it out of the optimizer")
        return None

    def _abort_step_(self) -> None:
        """Hook: clear a subclass's per-step bookkeeping after an exception (before the rewind)."""

    def _finish(self, info: dict) -> dict:
        self.outer_steps += 1
        info["backward_passes"] = self._bp
        info["gate_fired_step"] = self.gate.fired_step
        return info

    def _fresh_grads_finite(self, closure: Callable, params) -> bool:
        """Recompute the gradient at the current parameters (a fallback after restoring θ0) and clip it."""
        self._zero_grad()
        self._run_closure(closure, 0)
        return math.isfinite(self._clip(params)[1])

    @torch.no_grad()
    def _rewind_for_fallback(self) -> None:
        """θ0 back into the parameters; the optimizer state back to the step's start unless fallback_state is
        'keep' (the authors' light fallback: the probe steps' moment updates stay)."""
        if not self._snapped_params:   # before the first optimizer step: nothing has moved yet
            return
        self._restore_params_()
        if self.fallback_state == "restore" and self._snapped_opt:
            self._restore_optimizer_state_()

    def _end_fallback(self, ok: bool, reason: str, info: dict) -> dict:
        """Last part of every fallback: a plain optimizer step on the grads in place (none if non-finite)."""
        if ok:
            self._optimizer_step()
        else:
            self._zero_grad()
        self.fallbacks += 1
        info.update(fell_back=True, fallback_reason=reason, skipped=not ok)
        return info

    def _can_keep_grads(self, grads) -> bool:
        """Whether pass 0's gradient tensors can serve as ĝ0 as they are (no copy; ``p.grad`` is then set to None so
        that the next backward allocates new ones): plain ``.grad`` tensors of this process (a sharded subclass
        overrides ``_grad_list``), torch's Adam / AdamW, not fused and without a grad scaler (their step never
        writes into the grads; a wrapper, a custom optimizer or SGD with Nesterov momentum might), every grad
        present, contiguous and not a view (a DDP bucket view is overwritten by the next backward; a negated view
        holds -g in memory: both are copied)."""
        opt = self.optimizer
        return (type(self)._grad_list is ExtrapolationRule._grad_list and type(opt) in _KEEPS_GRADS
                and not any(g.get("fused") for g in opt.param_groups)      # fused kernels may unscale in place
                and getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None
                and not any(map(operator.is_, grads, itertools.repeat(None)))   # (C-level passes: every step)
                and all(map(operator.is_, map(_LAYOUT, grads), itertools.repeat(torch.strided)))
                and all(map(torch.Tensor.is_contiguous, grads)) and not any(map(torch.Tensor._is_view, grads)))

    def _step_keeps_grads(self) -> bool:
        """Whether the optimizer's step leaves the gradients it reads as they were, so that ĝ1 can be read from
        ``.grad`` after pass 1's optimizer step: torch's Adam / AdamW, and SGD without Nesterov momentum, with no grad
        scaler attached (a fused step unscales in place). Anything else gets ĝ1 copied before that step: SGD's
        foreach path with Nesterov momentum adds the momentum buffer into the grads, and a wrapper or a custom
        optimizer might write into them too."""
        opt = self.optimizer
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            return False
        if type(opt) in _KEEPS_GRADS:
            return True
        return type(opt) is torch.optim.SGD and not any(g.get("nesterov") for g in opt.param_groups)

    def _release_grads_(self, params) -> None:
        """Detach the kept ĝ0 tensors from the parameters: nothing (zero_grad without set_to_none, backward
        accumulation) can write into them afterwards."""
        for p in params:
            p.grad = None

    def _extrapolate(self, params, g0, g1, *, alpha, K, scale_formula="horner", inactive_threshold=None,
                     g0_kept: bool = False):
        lowp = self._lowp_targets()
        if lowp is None and self._backend_on(params[0]) in ("triton", "cpp"):
            # a prepared plan: the parameters and the rule's own buffers are validated (and on CUDA tabulated)
            # once; a call only reads the gradients. It is rebuilt when the memory it was built for changes (an
            # address, dtype, numel, ...: see _plan_key), not when the same memory comes in new tensor objects
            # (DeepSpeed's views of its flat shards are new every step). Kept pass-0 gradients (g0_kept) are new
            # tensors every step, so the plan takes g0 per call too. The same memory: the C++ op reads the tensors
            # taken now, not the ones the plan was built with; a Triton plan whose own tensors' storage moved in
            # place (the memory passed now at their old addresses) cannot, and is built again from these
            key = _plan_key(params, self._theta0, None if g0_kept else g0)
            if getattr(self, "_xplan_key", None) != key or \
                    not self._xplan._take_lists_(params, self._theta0, None if g0_kept else g0):
                self._xplan = ExtrapolationPlan(params, self._theta0, "per_call" if g0_kept else g0,
                                                backend=self.backend, grads_are_param_dtype=True)
                self._xplan_key = key
            return self._xplan(g1, g0=g0 if g0_kept else None, alpha=alpha, K=K, scale_formula=scale_formula,
                               inactive_threshold=inactive_threshold)
        return extrapolate_(params, self._theta0, g0, g1, alpha=alpha, K=K, scale_formula=scale_formula,
                            inactive_threshold=inactive_threshold, lowp_out=lowp, backend=self.backend)

    def _observe_gate(self, norm_clipped: float, entropy) -> float:
        """Feed the gate after an active step (the entropy, or the post-clip gradient norm); its z or NaN."""
        if self.gate.needs_entropy:
            z = self._observe_entropy(entropy)
        elif self.gate.name != "none":
            z = self.gate.observe(norm_clipped, step=self.outer_steps)
        else:
            z = math.nan
        return math.nan if z is None else z

    def _observe_entropy(self, entropy) -> None:
        """Feed the entropy gate ``entropy`` (None: not passed; an exception: refused, raised here; a sharded
        subclass raises it on every rank)."""
        if isinstance(entropy, BaseException):
            raise entropy
        if entropy is None:
            if not self._warned_entropy:
                warnings.warn(f"{type(self).__name__}: the entropy gate needs step(closure, entropy=...); "
                              "no value was passed, so the gate is not updated", RuntimeWarning)
                self._warned_entropy = True
            return None
        return self.gate.observe(_to_float(entropy), step=self.outer_steps)

    # ---- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Gate statistics, counters and the fired flag (the optimizer's own state is saved separately), with
        what ``load_state_dict`` checks: the rule's name and hyper-parameters, and ``_model_signature``. Only
        between ``step`` calls: from inside a step (its closure) the counters and the gate are half-updated and
        the step's snapshots are not part of the state, so that raises RuntimeError."""
        self._refuse_in_step("state_dict")
        return {"gate": self.gate.state_dict(), "total_backward_passes": self.total_backward_passes,
                "total_optimizer_steps": self.total_optimizer_steps, "outer_steps": self.outer_steps,
                "fallbacks": self.fallbacks, "rule": self._rule_name, **self._model_signature(), **self._hparams()}

    def _refuse_in_step(self, what: str) -> None:
        if self._in_step:
            raise RuntimeError(f"{self._rule_name}.{what} called during a step (from its closure): the counters and "
                               "the gate are mid-update; call it between step() calls")

    def _model_signature(self) -> dict:
        """What the state belongs to: the optimizer's class and (number of trainable parameter tensors, their
        total element count). A sharded subclass whose parameter list is this rank's shards returns {}."""
        params = self._param_list()
        return {"optimizer": type(self.optimizer).__name__, "params": [len(params), sum(p.numel() for p in params)]}

    def _hparams(self) -> dict:
        """Hyper-parameters a checkpoint must agree on (saved in state_dict, checked by load_state_dict)."""
        return {}

    def load_state_dict(self, sd: dict) -> None:
        """Restore what ``state_dict`` saved. Raises ValueError, changing nothing, when the checkpoint was
        written by a rule with other hyper-parameters (K, alpha, scale formula, ...) or another gate setting
        (tau, window, patience, ...), by another rule (GXPO's state into SFPO), or for another model or optimizer
        (``_model_signature``: the optimizer's class, the trainable parameters' count and total size). Entries a
        state saved by an older version lacks are not checked. RuntimeError from inside a step."""
        self._refuse_in_step("load_state_dict")
        if not isinstance(sd, dict):
            raise ValueError(f"{self._rule_name}.load_state_dict: expected the dict of state_dict(), got "
                             f"{type(sd).__name__}")
        mine = {"rule": self._rule_name, **self._model_signature(), **self._hparams()}
        diff = {k: (sd[k], v) for k, v in mine.items() if k in sd and sd[k] != v}
        gsd = sd.get("gate") if isinstance(sd.get("gate"), dict) else {}
        diff.update({f"gate {k}": (gsd[k], v) for k, v in self.gate.settings().items() if k in gsd and gsd[k] != v})
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs rule {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{self._rule_name}.load_state_dict: the checkpoint was saved with other settings "
                             f"({desc}); build the rule with the checkpoint's settings, model and optimizer")
        try:
            counters = [int(sd[k]) for k in ("total_backward_passes", "total_optimizer_steps", "outer_steps",
                                             "fallbacks")]
        except KeyError as e:
            raise ValueError(f"{self._rule_name}.load_state_dict: the checkpoint misses {e.args[0]!r}") from None
        self.gate.load_state_dict(sd["gate"])             # checks everything before it changes anything
        (self.total_backward_passes, self.total_optimizer_steps, self.outer_steps, self.fallbacks) = counters


def _plan_key(params, theta0, g0) -> object:
    """What the prepared extrapolation plan was built for, as a value to compare with ==: the memory of the
    params, the θ0 buffers and a static g0 (None: per call), i.e. with the C++ extension the addresses, numels,
    dtypes, contiguity, neg bits and devices of all of them from one compiled pass (``tensor_records``, bytes);
    else their addresses, dtypes and numels (Python-level passes). A change to any of them (``model.to(...)``,
    ``p.data = ...``, a reallocated buffer, a new storage at the old address in another dtype or size) gives
    another key. The tensors' ids are left out: the plan reads and writes memory, and the same memory handed
    over in new tensor objects (DeepSpeed's views of its flat shards, new every step) is the same plan. Equal
    records mean the plan writes the memory passed now: on CUDA it launches on the addresses it tabulated (when
    a tensor it was built with has moved, ``_take_lists_`` says so and the rule builds it again); on the CPU the
    caller hands it the call's tensors (``ExtrapolationPlan._take_lists_``), as the storage under the ones it was
    built with may have moved in place (``share_memory_``, a storage ``resize_``) with other memory now at the old
    addresses."""
    ts = [*params, *theta0] if g0 is None else [*params, *theta0, *g0]
    rd = _record_reader()
    rec = rd(ts, False) if rd is not None else None
    if rec is not None:
        return rec
    return tuple(map(torch.Tensor.data_ptr, ts)), tuple(map(_DTYPE, ts)), tuple(map(torch.Tensor.numel, ts))


def _step_needs_closure(optimizer) -> bool:
    """Whether the optimizer class's ``step`` has a required argument after ``self`` (LBFGS's ``step(closure)``):
    the rule would only find out at its first optimizer step, with torch's missing-argument error. The class's
    method, not the instance's attribute: DeepSpeed replaces the latter with a wrapper of its own."""
    try:
        params = list(inspect.signature(type(optimizer).step).parameters.values())[1:]
    except (TypeError, ValueError):   # no signature to read (a builtin): let the step speak for itself
        return False
    return bool(params) and params[0].default is inspect.Parameter.empty and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (FSDP2 parameters and their optimizer state); other tensors as they are."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))
_TENSOR = frozenset((torch.Tensor,))   # the types torch's foreach ops take (``_foreach_supported_types``)
# optimizer-state values a snapshot may keep by reference (anything else but a tensor is deep-copied)
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes)
_SCALARS = frozenset(_IMMUTABLE)   # exactly these types (a subclass goes through ``_copy_entry``, which decides)
_FLOATS = frozenset(_TL_DTYPES)   # the parameter dtypes the extrapolation kernel takes
_IS_CPU = operator.attrgetter("is_cpu")
_LAYOUT = operator.attrgetter("layout")
_PARAMS = operator.itemgetter("params")
_NOT_NONE = functools.partial(operator.is_not, None)
_STRIDED = frozenset((torch.strided,))
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_ITEMS = operator.methodcaller("items")
_chain = itertools.chain.from_iterable


def _nonempty(grads: List[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """The gradients that are not None and hold elements, in order (C-level passes: this runs every pass)."""
    out = list(filter(_NOT_NONE, grads))
    return out if all(map(torch.Tensor.numel, out)) else [g for g in out if g.numel()]


def _one_foreach_group(ts: List[torch.Tensor]) -> bool:
    """Whether torch's clip would treat ``ts`` (not empty) as one foreach group: plain tensors of one dtype on one CPU
    or CUDA device (``_group_tensors_by_device_and_dtype`` then keeps them as they are, in order)."""
    dev = ts[0].device
    return (dev.type in ("cpu", "cuda") and set(map(type, ts)) <= _TENSOR and len(set(map(_DTYPE, ts))) == 1
            and (all(map(_IS_CPU, ts)) if dev.type == "cpu" else len(set(map(_DEVICE, ts))) == 1))


def _copy_all_(dst: List[torch.Tensor], src: List[Optional[torch.Tensor]], stream: bool = False) -> None:
    """dst[i].copy_(src[i]) (zero where src[i] is None) with _foreach_copy_: one call on the CPU, else one per
    (device, dtype) of dst so that CUDA takes its multi-tensor path (AdamW's ``step`` counters live on the CPU);
    torch's C++ grouping, as a Python loop building the groups cost more than the copies of a small model.
    ``stream``: on the CPU, copy through the C++ op's non-temporal stores (``snapshot_copy``), which skip reading
    each destination line into the cache first (a third less memory traffic), for buffers read much later; the
    pairs it cannot take (another dtype, numel or layout) and a missing extension fall back to _foreach_copy_."""
    ds, ss = list(dst), list(src)   # (C-level passes below: this runs several times per step)
    if any(map(operator.is_, ss, itertools.repeat(None))):
        ds, ss = [], []
        for d, s in zip(dst, src):
            if s is None:
                _local(d).zero_()
            else:
                ds.append(d)
                ss.append(s)
    if not set(map(type, ds)) <= _PLAIN or not set(map(type, ss)) <= _PLAIN:
        ds, ss = list(map(_local, ds)), list(map(_local, ss))   # sharded (DTensor) state: shard to shard
    if not ds:
        return
    if stream:   # the op checks every pair itself (CPU, layout, dtype, numel) and returns those it left
        left = _cpp.snapshot_copy_(ds, ss)
        if left is not None:
            if not left:
                return
            ds, ss = [ds[i] for i in left], [ss[i] for i in left]
    if all(map(_IS_CPU, ds)) and all(map(_IS_CPU, ss)):
        torch._foreach_copy_(ds, ss)   # the CPU's foreach ops loop over the tensors anyway: no grouping needed
        return
    for (gd, gs), _ in _group_tensors_by_device_and_dtype([ds, ss]).values():
        torch._foreach_copy_(gd, gs)


def _copy_entry(v):
    """A param-group entry as the snapshot keeps it: numbers and strings (and tuples of them: Adam's betas) as they
    are, a tensor cloned, anything else deep-copied (the step may change it in place)."""
    if isinstance(v, _IMMUTABLE) or (type(v) is tuple and all(isinstance(x, _IMMUTABLE) for x in v)):
        return v
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    try:
        return copy.deepcopy(v)
    except Exception:   # an object that cannot be copied (a process group, a lock) is configuration: by reference
        return v


def _to_float(x) -> float:
    if x is None:
        return math.nan
    if isinstance(x, torch.Tensor):
        return float(x.item())   # item(): no detached alias first (the step reads three losses)
    return float(x)
