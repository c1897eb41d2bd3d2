"""The only code that touches DeepSpeed internals: which ZeRO wrapper an engine has, its local fp32 master
shards, the low-precision re-sync, a direct (out-of-``engine.step``) optimizer step, and the start-up checks.

Tested with DeepSpeed 0.19.x (0.19.8); ``SUPPORTED_DEEPSPEED`` is checked at start-up together with the
presence of every private attribute used here, so a DeepSpeed release that renames one fails loudly at
``wrap()`` time instead of corrupting a run. Notes on the internals: docs/deepspeed.md.

Wrappers (detected by attribute, as DeepSpeed itself builds them):

- ``z12``  ``DeepSpeedZeroOptimizer`` (stage 1/2): shard ``single_partition_of_fp32_groups[i]`` per param group;
- ``z3``   ``DeepSpeedZeroOptimizer_Stage3``: shard ``fp32_partitioned_groups_flat[s]`` per sub-group;
- ``bf16`` ``BF16_Optimizer`` (bf16 + fp32 grad accumulation + stage 1, no offload): ``fp32_groups_flat_partition[i]``.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional

import torch

SUPPORTED_DEEPSPEED = (">=0.19.0", "<0.20")   # tested: 0.19.8
_TESTED = "0.19.x (tested 0.19.8)"

_ENGINE_ATTRS = ("optimizer", "step", "backward", "was_step_applied", "lr_scheduler", "global_steps",
                 "global_samples", "skipped_steps", "micro_steps", "gradient_accumulation_steps",
                 "is_gradient_accumulation_boundary", "train_batch_size", "_step_applied")
_ZO_ATTRS = {
    "z12": ("single_partition_of_fp32_groups", "bit16_groups", "_optimizer_step", "update_lp_params",
            "_global_grad_norm", "dp_process_group", "real_dp_process_group", "_hp_optimizer_states_linked",
            "round_robin_bit16_groups",
            "_lazy_init_hp_params_optimizer_state", "optimizer", "cpu_offload", "compute_grad_norm", "clip_grad"),
    "z3": ("fp32_partitioned_groups_flat", "fp16_groups", "fp16_partitioned_groups_flat", "_optimizer_step",
           "sub_group_to_group_id", "_reassign_or_swap_out_partitioned_parameters", "checkpoint_event_prologue",
           "checkpoint_event_epilogue", "invalidate_secondary_tensor", "_global_grad_norm", "dp_process_group",
           "optimizer", "offload_optimizer", "clip_grad"),
    "bf16": ("fp32_groups_flat_partition", "bf16_groups", "update_lp_params",
             "real_dp_process_group", "_hp_optimizer_states_linked", "_lazy_init_hp_params_optimizer_state",
             "optimizer", "clip_grad"),
}


def _version_ok(version: str) -> bool:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    return Version(version) in SpecifierSet(",".join(SUPPORTED_DEEPSPEED))


def detect_kind(zo) -> Optional[str]:
    if hasattr(zo, "fp32_partitioned_groups_flat"):
        return "z3"
    if hasattr(zo, "single_partition_of_fp32_groups"):
        return "z12"
    if hasattr(zo, "fp32_groups_flat_partition"):
        return "bf16"
    return None


def check_engine(engine) -> str:
    """Refuse unsupported engines/configs with a clear message; returns the wrapper kind."""
    import deepspeed
    ver = getattr(deepspeed, "__version__", "0")
    missing = [a for a in _ENGINE_ATTRS if not hasattr(engine, a)]
    if missing:
        raise RuntimeError(f"gxpo_kernels.integrations.deepspeed: the engine lacks {missing}; this integration "
                           f"supports DeepSpeed {_TESTED} (installed: {ver}) and a plain DeepSpeedEngine")
    if type(engine).__name__ == "PipelineEngine":
        raise ValueError("pipeline-parallel engines are not supported (use a plain DeepSpeedEngine)")
    zo = engine.optimizer
    kind = detect_kind(zo)
    if kind is None:
        raise ValueError(
            f"GXPO/SFPO under DeepSpeed needs ZeRO stage 1, 2 or 3 or the BF16_Optimizer; the engine's optimizer "
            f"is {type(zo).__name__} (ZeRO stage {engine.zero_optimization_stage()}). Enable zero_optimization.")
    missing = [a for a in _ZO_ATTRS[kind] if not hasattr(zo, a)]
    if missing:
        raise RuntimeError(f"gxpo_kernels.integrations.deepspeed: {type(zo).__name__} lacks the internals {missing}; "
                           f"supported DeepSpeed: {_TESTED}, installed: {ver}")
    if not _version_ok(ver):
        warnings.warn(f"gxpo_kernels.integrations.deepspeed was tested with DeepSpeed {_TESTED}; installed {ver} "
                      "has the internals it needs, but results are unverified", RuntimeWarning, stacklevel=3)
    zc = engine._config.zero_config
    off_opt, off_par = zc.offload_optimizer, zc.offload_param
    dev = lambda o: None if o is None else str(getattr(o.device, "value", o.device))  # noqa: E731
    if dev(off_opt) == "nvme" or dev(off_par) == "nvme":
        raise ValueError("NVMe offload (offload_optimizer/offload_param device 'nvme') is not supported by GXPO/SFPO: "
                         "the fp32 master shard is swapped out outside step(); use device 'cpu' or none")
    if off_opt is not None and dev(off_opt) != "none" and float(getattr(off_opt, "ratio", 1.0)) < 1.0:
        raise ValueError(f"partial optimizer offload (offload_optimizer.ratio={off_opt.ratio} < 1) is not supported: "
                         "part of the shards would be stepped by a second optimizer; use ratio 1.0")
    if getattr(off_opt, "super_offload", False):
        raise ValueError("offload_optimizer.super_offload is not supported by GXPO/SFPO")
    if "MiCS" in type(zo).__name__ or (getattr(zc, "mics_shard_size", -1) or -1) > 0:
        raise ValueError("MiCS (mics_shard_size > 0) is not supported by GXPO/SFPO: it changes the partition group")
    if getattr(zc, "zero_hpz_partition_size", 1) > 1:
        raise ValueError("ZeRO++ hpZ (zero_hpz_partition_size > 1) is not supported by GXPO/SFPO")
    if getattr(engine, "zenflow", False):
        raise ValueError("ZenFlow is not supported by GXPO/SFPO")
    if getattr(engine, "has_moe_layers", False):
        raise ValueError("MoE layers (expert-parallel groups) are not supported by GXPO/SFPO")
    if getattr(engine, "mpu", None) is not None:
        raise ValueError("model/tensor parallelism (mpu) is not supported by GXPO/SFPO: the decision statistics "
                         "are reduced over the data-parallel group only")
    if hasattr(engine, "torch_autocast_enabled") and engine.torch_autocast_enabled():
        raise ValueError("torch_autocast is not supported by GXPO/SFPO (use bf16/fp16 mixed precision instead)")
    if hasattr(engine, "managed_gradient_accumulation") and not engine.managed_gradient_accumulation():
        raise ValueError("managed_gradient_accumulation=false is not supported: the rule owns the accumulation "
                         "boundary (one engine.step() per micro-batch)")
    pc = getattr(engine._config, "bfloat16_config", None) or getattr(engine._config, "bf16_config", None)
    for flag in ("bf16_master_weights_and_grads", "bf16_optimizer_states"):
        if getattr(pc, flag, False):
            raise ValueError(f"reduced-precision master weights ({flag}=true) are not supported: GXPO/SFPO need fp32 "
                             "master shards")
    if getattr(getattr(engine._config, "float16_config", None), "fp16_master_weights_and_grads", False):
        raise ValueError("reduced-precision master weights (fp16_master_weights_and_grads=true) are not supported")
    if kind == "z12" and not zo.compute_grad_norm:
        raise ValueError("ZeRO configs without a gradient norm (compute_grad_norm=False, e.g. Muon) are unsupported")
    if getattr(zo, "use_muon", False) or getattr(zo, "_uses_muon", False):
        raise ValueError("the Muon optimizer is not supported by GXPO/SFPO")
    if kind == "z3" and getattr(zo, "backup_optimizer", None) is not None:
        raise ValueError("partial optimizer offload (backup_optimizer) is not supported by GXPO/SFPO")
    shards = ZeroShards(engine, kind).shards()
    bad = [str(s.dtype) for s in shards if s.dtype != torch.float32]
    if bad:
        raise ValueError(f"GXPO/SFPO need fp32 master shards; this engine's are {sorted(set(bad))} "
                         "(reduced-precision master weights are not supported)")
    if any(s.numel() == 0 for s in shards):
        raise ValueError("a master shard is empty outside step() (NVMe swap?); this configuration is not supported")
    return kind


def _add_run(runs: List[tuple], start: int, length: int) -> None:
    """Append the run (start, length) to ``runs``, merged into the last one when adjacent (one view for
    parameters back to back: fewer tensors for the fused extrapolation)."""
    if length <= 0:
        return
    if runs and runs[-1][0] + runs[-1][1] == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + length)
    else:
        runs.append((start, length))


class ZeroShards:
    """Uniform access to a ZeRO wrapper's local fp32 master shards (re-read from DeepSpeed on every call:
    ``engine.offload_states()`` swaps ``.data`` but keeps these tensor objects)."""

    def __init__(self, engine, kind: str):
        self.engine, self.kind = engine, kind
        self.zo = engine.optimizer

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self.zo.optimizer

    def shards(self) -> List[torch.Tensor]:
        zo = self.zo
        if self.kind == "z3":
            return list(zo.fp32_partitioned_groups_flat)
        if self.kind == "z12":
            return list(zo.single_partition_of_fp32_groups)
        return list(zo.fp32_groups_flat_partition)

    def group_index(self) -> List[int]:
        """Base-optimizer param-group index of each shard."""
        if self.kind == "z3":
            return [int(self.zo.sub_group_to_group_id[s]) for s in range(len(self.zo.fp16_groups))]
        return list(range(len(self.shards())))

    def valid_segments(self) -> List[List[tuple]]:
        """Per shard, the (start, length) runs holding real parameter data; the rest is alignment padding that
        DeepSpeed leaves uninitialised under ZeRO-3 (it may hold any bits, NaN included) and zero elsewhere."""
        if getattr(self, "_segments", None) is not None:
            return self._segments
        import torch.distributed as dist
        zo, shards = self.zo, self.shards()
        if self.kind == "z3":
            rank = dist.get_rank(self.dp_group)
            segs = []
            for grp, flat in zip(zo.fp16_groups, shards):
                runs, off = [], 0
                for p in grp:
                    n = int(p.partition_numel())
                    valid = max(0, min(n, int(p.ds_numel) - rank * n))
                    _add_run(runs, off, valid)
                    off += n
                if off != flat.numel():
                    raise RuntimeError(f"internal: ZeRO-3 sub-group layout {off} != shard numel {flat.numel()}")
                segs.append(runs)
        else:
            segs = [self._flat_group_runs(i, flat.numel()) for i, flat in enumerate(shards)]
        self._segments = segs
        return segs

    def _flat_group_runs(self, i: int, shard_numel: int) -> List[tuple]:
        """Z1/2/BF16 group ``i``: (start, length) runs of this rank's shard covered by a parameter. The flat
        group is cut into equal partitions, one per rank; padding sits at its end and, with ZeRO's
        ``parameter_alignment``, between parameters. The last rank's recorded padding is not enough: a group
        smaller than one partition also pads the earlier ranks."""
        import torch.distributed as dist
        zo = self.zo
        rank = dist.get_rank(zo.real_dp_process_group[i])
        if self.kind == "z12":
            metas = getattr(zo, "round_robin_bit16_meta", None)
            numels = [int(t.numel()) for t in (metas[i] if metas else zo.round_robin_bit16_groups[i])]
            offsets = getattr(zo, "round_robin_bit16_offsets", None)
            offsets = list(offsets[i]) if offsets else None
        else:
            numels, offsets = [int(p.numel()) for p in zo.bf16_groups[i]], None
        if offsets is None:                               # parameters back to back
            offsets = [sum(numels[:k]) for k in range(len(numels))]
        lo, hi = rank * shard_numel, (rank + 1) * shard_numel
        runs: List[tuple] = []
        for off, n in zip(offsets, numels):
            a, b = max(off, lo), min(off + n, hi)
            _add_run(runs, a - lo, b - a)
        return runs

    def padding_segments(self) -> List[List[tuple]]:
        """Complement of ``valid_segments`` per shard."""
        out = []
        for s, runs in zip(self.shards(), self.valid_segments()):
            gaps, pos = [], 0
            for a, n in runs:
                if a > pos:
                    gaps.append((pos, a - pos))
                pos = a + n
            if pos < s.numel():
                gaps.append((pos, s.numel() - pos))
            out.append(gaps)
        return out

    @property
    def dp_group(self):
        return getattr(self.zo, "dp_process_group", None) or self.zo.real_dp_process_group[0]

    def global_grad_norm(self) -> float:
        """DeepSpeed's unscaled global grad norm of the current step (already all-reduced over dp)."""
        n = getattr(self.zo, "_global_grad_norm", None)   # BF16_Optimizer sets it in its first step
        if n is None:
            return math.nan
        n = float(n)
        return n if n >= 0 else math.nan   # DeepSpeed's -1 sentinel means inf/NaN

    @torch.no_grad()
    def direct_step(self) -> None:
        """One base-optimizer step on the shards' current ``.grad``, outside ``engine.step()`` (no lp sync)."""
        zo = self.zo
        if self.kind == "z12":
            for i in range(len(zo.single_partition_of_fp32_groups)):
                zo._optimizer_step(i)
        elif self.kind == "z3":
            for s in range(len(zo.fp16_groups)):
                zo._optimizer_step(s)
        else:
            zo.optimizer.step()
            zo._lazy_init_hp_params_optimizer_state()

    def relink_optimizer_views(self) -> None:
        """Keep Z12/BF16's per-param views into the optimizer state (``safe_get_full_optimizer_state``, checkpoints)
        valid. DeepSpeed links them once, after the first group's first step: groups without state yet, or state
        entries the rule removed (transactional restore), would stay linked to nothing. Z3 has no such views."""
        if self.kind not in ("z12", "bf16"):
            return
        st = self.base_optimizer.state
        if any(not st.get(s) for s in self.shards()):
            self.zo._hp_optimizer_states_linked = False   # DeepSpeed relinks after its next step
            self._linked_complete = False
        elif not getattr(self, "_linked_complete", False):
            self.zo._hp_optimizer_states_linked = False
            self.zo._lazy_init_hp_params_optimizer_state()
            self._linked_complete = True

    @torch.no_grad()
    def resync_lp(self) -> None:
        """fp32 master shards -> low-precision model weights on every rank. Collective over the dp group."""
        zo = self.zo
        if self.kind == "z3":
            zo.checkpoint_event_prologue()
            for s in range(len(zo.fp16_groups)):
                zo._reassign_or_swap_out_partitioned_parameters(s)
            zo.checkpoint_event_epilogue()
            zo.invalidate_secondary_tensor()
        else:
            zo.update_lp_params()
