"""What every sharded GXPO/SFPO integration shares (DeepSpeed ZeRO, FSDP2): the rule's tensors are this rank's
shards, so every quantity a decision depends on is reduced over the data-parallel group first.

``ShardedReductions`` is a mixin placed before ``GXPO`` / ``SFPO`` in the MRO. A subclass names the group and
the device the collectives run on (NCCL reduces accelerator tensors only, gloo CPU tensors):

- ``_all_reduce_(stats)``: the rule's reduction contract ([:-1] SUM, [-1] MAX) in ONE collective: an all-gather
  of the local vector, then a sum / max over the ranks in rank order (bit-identical on every rank);
- ``_observe_entropy(entropy)``: the entropy gate sees the mean of the per-rank entropies (and
  ``_report_gate_entropy(info)`` reports that mean as SFPO's ``entropy_signal``); every rank must pass one;
  an entropy refused on some ranks raises on every rank (``_raise_refusals``, also for the gradient checks);
- ``_agree_step(force_plain, entropy)``: the step's ``force_plain``, refused (on every rank) unless all ranks agree,
  and its entropy argument, refused on every rank where an active step cannot read it on some;
- ``_record_extrapolation(views)``: the ``last_extrapolation`` diagnostics (backend, local element count).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .._utils import check_bool
from ..update.base import _to_float


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # recent torch names it all_gather_single (all_gather_into_tensor warns there)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)


class ShardedReductions:
    """Mixin: decision statistics reduced over ``_reduce_group()`` on ``_reduce_device()``."""

    last_extrapolation: Optional[dict] = None

    def _reduce_group(self):
        """The data-parallel process group (None = the default group)."""
        raise NotImplementedError

    def _reduce_device(self) -> torch.device:
        """The device the group's collectives take tensors on."""
        raise NotImplementedError

    def _world(self) -> int:
        return dist.get_world_size(self._reduce_group()) if dist.is_initialized() else 1

    def _all_reduce_(self, stats: torch.Tensor) -> torch.Tensor:
        """In place: entries [:-1] summed over the ranks, the last one maxed (one all-gather of len(stats))."""
        world = self._world()
        if world == 1:
            return stats
        local = stats.detach().to(self._reduce_device(), torch.float64).reshape(-1).contiguous()
        rows = local.new_empty(world * local.numel())
        _all_gather(rows, local, group=self._reduce_group())
        rows = rows.view(world, -1)
        out = torch.cat([rows[:, :-1].sum(0), rows[:, -1:].amax(0)])
        stats.copy_(out.to(stats.device, stats.dtype).view_as(stats))
        return stats

    def _observe_entropy(self, entropy):
        """The gate sees the dp-mean entropy. Every rank joins the all-reduce, of (entropy, 1, 0), or (0, 0, 0) where
        this rank passed none, or (0, 0, 1) where it refused its entropy (an exception in its place, or a value that
        is no number): a rank that skipped it would pair the other ranks' all-reduce with its next collective (a
        hang, or silently wrong numbers). Passed on some ranks only: ValueError on every rank; refused on some:
        their error there, RuntimeError on the others (the step rewinds)."""
        world = self._world()
        if world > 1:
            value, refusal = 0.0, entropy if isinstance(entropy, BaseException) else None
            if entropy is not None and refusal is None:
                try:
                    value = _to_float(entropy)
                except (TypeError, ValueError, RuntimeError) as e:   # e.g. a tensor of several elements
                    refusal = e
            given = entropy is not None and refusal is None
            t = torch.tensor([value, float(given), float(refusal is not None)], dtype=torch.float64,
                             device=self._reduce_device())
            dist.all_reduce(t, group=self._reduce_group())
            self._raise_refusals(refusal, int(t[2]), "the entropy")
            given = int(t[1])
            if 0 < given < world:
                raise ValueError(f"{self._rule_name}.step: entropy was passed on {given} of {world} ranks; the "
                                 "entropy gate decides on the mean over the ranks: pass it on every rank")
            if given:
                entropy = self._gate_entropy = float(t[0]) / world
        return super()._observe_entropy(entropy)

    def _agree_step(self, force_plain, entropy) -> bool:
        """``force_plain`` as every rank passed it and, where the step is active, this rank's ``_entropy_refusal``
        of the entropy argument, both checked with one all-reduce of two float64 at the start of every step. A
        rank taking a plain step (one pass) while another takes an active one (several) would pair their
        collectives wrongly (a hang, or silently wrong numbers): passed on some ranks only, ValueError on every
        rank, before anything changes (decide it on the whole batch, e.g. from rewards reduced over the ranks). An
        entropy refused on some ranks: their error there, a RuntimeError on the others, before anything changes
        (refused at the step's end, it would leave those ranks rewound and the others stepped)."""
        check_bool(force_plain, "force_plain")   # (the same bad value on every rank raises on every rank)
        refusal = None
        if not force_plain and (not self.gate.fired or self.gate.rearm_due()):   # an active step
            refusal = self._entropy_refusal(entropy)
        world = self._world()
        if world == 1:
            if refusal is not None:
                raise refusal
            return bool(force_plain)
        t = torch.tensor([float(bool(force_plain)), float(refusal is not None)], dtype=torch.float64,
                         device=self._reduce_device())
        dist.all_reduce(t, group=self._reduce_group())
        self._raise_refusals(refusal, int(t[1]), "the entropy")
        n = int(t[0])
        if 0 < n < world:
            raise ValueError(f"{self._rule_name}.step: force_plain=True was passed on {n} of {world} ranks; every "
                             "rank must take the same kind of step: decide it on the whole batch (e.g. from rewards "
                             "reduced over the ranks) and pass the same value on every rank")
        return bool(n)

    def _raise_refusals(self, refusal: Optional[BaseException], n_refused: int, what: str) -> None:
        """After a reduction of the ranks' refusal flags (``n_refused`` ranks refused ``what``): this rank's own
        error where it refused, a RuntimeError naming the count on the other ranks, nothing when none did."""
        if refusal is not None:
            raise refusal
        if n_refused:
            raise RuntimeError(f"{self._rule_name}.step: {n_refused} of {self._world()} ranks refused {what} (their "
                               "error says why); the step raises on every rank and is rewound")

    def _report_gate_entropy(self, info: dict) -> None:
        """SFPO's ``info["entropy_signal"]`` is this rank's entropy; where the gate saw the dp-mean, report that
        (the same number on every rank, the one the gate decided on). Call it after the step; it resets."""
        if getattr(self, "_gate_entropy", None) is not None and "entropy_signal" in info:
            info["entropy_signal"] = self._gate_entropy
        self._gate_entropy = None

    def _record_extrapolation(self, views: List[torch.Tensor]) -> None:
        from ..ops.extrapolate.op import extrapolate_backend
        dev = views[0].device if views else torch.device("cpu")
        self.last_extrapolation = {"backend": extrapolate_backend(self.backend, dev), "device": str(dev),
                                   "numel": sum(v.numel() for v in views), "n_tensors": len(views)}
