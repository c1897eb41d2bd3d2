"""Training engines: what differs between plain PyTorch, DeepSpeed ZeRO and FSDP2 under one step loop.

``loop.train`` is the only RL loop. It talks to an :class:`Engine`, which owns

- the process group (rank, world size) and the device; the warm start's broadcast from rank 0;
- the policy wrapped in :class:`PolicyLoss`, so the loss runs inside the engine's forward (ZeRO-3 and FSDP2
  gather parameters in module hooks, and DeepSpeed does its per-micro-batch bookkeeping in ``engine(...)``);
- one gradient pass over the mini-batch (``zero_grad`` / ``forward`` / ``backward`` per micro-batch), the
  optimizer step of the plain GRPO variants (clipping included), and the GXPO / SFPO rule;
- data-parallel means of logged values, and the engine part of a checkpoint (model + optimizer state).

Engines: :class:`PlainEngine` (one process), :class:`DeepSpeedEngine` (``--deepspeed ds.json``; ZeRO 1/2/3 through
``integrations.deepspeed``), :class:`FSDPEngine` (``--fsdp``; FSDP2 ``fully_shard``, GXPO/SFPO through
``integrations.fsdp``). ``make_engine(cfg)`` picks one.

The loss path (``TrainConfig.loss_path``): ``"fused_linear"`` (default) patches the model with
``integrations.hf.patch_causal_lm``, so ``model(..., advantages=...)`` runs the decoder up to its final hidden
states and ``ops.linear_grpo_loss`` on them and the lm_head weight inside the model's own forward (the
(B, T, V) logits never exist; under ZeRO-3 the loss runs as the lm_head's forward); ``"logits"`` materialises
the response logits and calls ``ops.grpo_loss``. Both compute the same loss and gradients.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..integrations.hf import patch_causal_lm
from ..update import GXPO, SFPO
from .config import LOSS_PATHS, TrainConfig, rule_options
from .model import amp
from .rollout import loss_backend, policy_loss, position_ids, response_logits


class PolicyLoss(nn.Module):
    """``forward(prompt_ids, prompt_attn, resp, mask, advantages, old_logp=None, ref_logp=None) -> loss`` of a
    causal LM.

    Shapes: prompt_ids / prompt_attn (b, Lp) left padded; resp (b, T); mask (b, T) bool; advantages (b,);
    old_logp (b, T) fp32 or None (= the current policy, ratio 1); ref_logp (b, T) fp32, the KL penalty's
    reference (needed when the loss options have beta > 0). The loss op's metrics of the last call are
    kept in ``self.metrics`` (detached 0-d tensors).

    Args:
        model: a transformers causal LM (Qwen2, Llama, ...); its parameters become this module's.
        loss_kwargs: GRPO options of the loss op (temperature, eps_low, eps_high, loss_agg_mode, max_length).
        loss_path: "fused_linear" (hidden states + lm_head, no logits) or "logits" (see the module docstring).
        use_amp: run the model under the trainer's autocast (bf16 on CUDA); False where the engine owns the
            precision (DeepSpeed's bf16 config).
    """

    def __init__(self, model: nn.Module, loss_kwargs: dict, loss_path: str = "fused_linear", use_amp: bool = True):
        super().__init__()
        if loss_path not in LOSS_PATHS:
            raise ValueError(f"loss_path must be one of {LOSS_PATHS}, got {loss_path!r}")
        if loss_path == "fused_linear":
            patch_causal_lm(model)   # model(..., advantages=...) computes the fused loss inside its own forward
        self.model = model
        self.loss_kwargs = dict(loss_kwargs)
        self.loss_path = loss_path
        self.use_amp = use_amp
        self.metrics: Dict[str, torch.Tensor] = {}

    def forward(self, prompt_ids, prompt_attn, resp, mask, advantages, old_logp=None, ref_logp=None):
        device = resp.device
        ctx = amp(device) if self.use_amp else contextlib.nullcontext()
        if self.loss_path == "fused_linear":
            full = torch.cat([prompt_ids, resp], 1)
            attn = torch.cat([prompt_attn, mask.long()], 1)
            # under CUDA autocast the decoder's output can be bf16 while the lm_head weight is the fp32 master
            kw = dict(self.loss_kwargs, backend=loss_backend(device), fp32_head=self.use_amp and device.type == "cuda")
            with ctx:   # through the model's __call__, so FSDP / DeepSpeed module hooks see the loss
                out = self.model(input_ids=full, attention_mask=attn, advantages=advantages, completion_mask=mask,
                                 logits_to_keep=resp.shape[1], old_logprobs=old_logp, ref_logprobs=ref_logp,
                                 position_ids=position_ids(attn), grpo_options=kw)
            loss, metrics = out.loss, out.metrics
        else:
            with ctx:
                logits = response_logits(self.model, prompt_ids, prompt_attn, resp, mask)
            loss, metrics = policy_loss(logits, resp, advantages, mask, old_logp, self.loss_kwargs, ref_logp)
        self.metrics = {k: v.detach() for k, v in metrics.items()}
        return loss


def learning_rate(cfg: TrainConfig, step: Optional[int] = None) -> float:
    """The run's learning rate (``lr``, times ``lr_mult`` for grpo_lr), at RL step ``step`` (1-based) of
    ``cfg.steps`` under ``cfg.lr_scheduler_type`` when given. The schedules are transformers' of the same names
    without warm-up, stepped once per RL step (every optimizer step of one RL step uses its rate): linear
    (steps - step + 1) / steps, cosine (1 + cos(pi (step - 1) / steps)) / 2. The rate is a function of the step
    alone, so a resumed run needs no scheduler state."""
    lr = cfg.lr * (cfg.lr_mult if cfg.algo == "grpo_lr" else 1.0)
    if step is None or cfg.lr_scheduler_type == "constant":
        return lr
    progress = (step - 1) / cfg.steps
    if cfg.lr_scheduler_type == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class Engine:
    """The interface of the step loop's back end (see the module docstring). Attributes set by ``setup``:
    ``module`` (the :class:`PolicyLoss`), ``policy`` (the causal LM, for ``generate``), ``optimizer``,
    ``rule`` (GXPO / SFPO or None) and ``static`` (the ``update`` log's fixed fields)."""

    name = "plain"
    rank, world = 0, 1
    micro_batches = 1                      # gradient-accumulation micro-batches per pass (set by __init__)
    gen_kw: dict = {}                      # extra kwargs of rollout / evaluate (synced_gpus, use_amp)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.micro_batches = cfg.gradient_accumulation_steps
        self.device = torch.device("cpu")
        self.module: Optional[PolicyLoss] = None
        self.policy: Optional[nn.Module] = None
        self.optimizer = None
        self.rule = None
        self.static: dict = {}

    @property
    def lead(self) -> bool:
        return self.rank == 0

    # ---- set-up ---------------------------------------------------------------------------------------------
    def share_warm_start(self, model: nn.Module, ws: Optional[dict]) -> dict:
        """Every rank ends with rank 0's warm-start weights and summary (``ws`` is None on other ranks)."""
        return ws

    def setup(self, model: nn.Module, loss_kw: dict) -> None:
        raise NotImplementedError

    # ---- one gradient pass ----------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def forward(self, *batch) -> torch.Tensor:
        return self.module(*batch)

    def loss_weights(self, mask: torch.Tensor, agg_mode: str) -> List[float]:
        """The weight of each micro-batch's loss in the pass's gradient, ``micro_batches`` floats summing to 1;
        ``mask`` (B, T) is the whole batch's. The weighted sum of the micro-batch losses is the whole batch's
        loss: "token-mean" divides by the micro-batch's own token count, so its weight is its share of the
        batch's tokens; the "seq-mean-*" modes (every row counted) and "seq-mean-token-sum-norm" divide by its
        B / micro_batches rows, so 1 / micro_batches. One micro-batch: [1.0]."""
        n = self.micro_batches
        if agg_mode != "token-mean":
            return [1.0 / n] * n
        counts = mask.sum(-1).view(n, -1).sum(-1).double()
        return (counts / counts.sum().clamp(min=1)).tolist()

    def backward(self, loss: torch.Tensor, weight: float, last: bool) -> None:
        """Accumulate the gradient of ``weight * loss`` (``loss_weights``); ``last``: the pass's final
        micro-batch (the accumulation boundary)."""
        (loss * weight).backward()

    def set_lr(self, lr: float) -> None:
        """The learning rate of every param group (the optimizer's, which DeepSpeed's ZeRO wrapper forwards)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def optimizer_step(self) -> Optional[float]:
        """Clip to ``max_grad_norm`` and step (the plain GRPO variants); return the pre-clip gradient norm. A
        non-finite norm skips the step (``step_skipped``), as the GXPO / SFPO rules skip theirs."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        return self._clipped_step(float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)))

    def _clipped_step(self, norm: float) -> float:
        """The optimizer step after a clip that measured ``norm``; none when it is not finite: stepping would write
        NaN into the weights (the run then died at its next rollout's sampling) while GXPO / SFPO, the rules GRPO
        is compared with, skip such a step."""
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm
        self.optimizer.step()
        return norm

    def step_skipped(self, norm: Optional[float]) -> bool:
        """Whether the ``optimizer_step`` just called (which returned ``norm``) skipped the step: a non-finite norm.
        None (an engine that reports no norm) means it stepped."""
        return norm is not None and not math.isfinite(norm)

    def dp_mean(self, vals: List[float]) -> List[float]:
        return [float(v) for v in vals]

    def eval_mode(self):
        return contextlib.nullcontext()

    def config_entries(self) -> dict:
        """What the run's ``config.json`` records about the engine besides the ``TrainConfig``."""
        return {}

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_state(self, path: str) -> None:
        """Write the model and optimizer state into the (shared) checkpoint folder ``path``."""
        if self.lead:
            torch.save({"model": self.policy.state_dict(), "optimizer": self.optimizer.state_dict()},
                       os.path.join(path, "engine.pt"))

    def load_state(self, path: str) -> None:
        sd = torch.load(os.path.join(path, "engine.pt"), map_location=self.device, weights_only=True)
        self.policy.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The policy's full (unsharded) state dict on the lead rank (None elsewhere), for ``save_pretrained``."""
        return self.policy.state_dict() if self.lead else None

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    def close(self) -> None:
        pass


class PlainEngine(Engine):
    """One process: autocast on CUDA, ``torch.optim.AdamW``, ``update.GXPO`` / ``SFPO`` around it."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from .model import pick_device
        self.device = pick_device(cfg.device)

    def setup(self, model: nn.Module, loss_kw: dict) -> None:
        cfg = self.cfg
        self.policy = model
        self.module = PolicyLoss(model, loss_kw, cfg.loss_path, use_amp=True)
        lr = learning_rate(cfg)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        algo, kw, static = rule_options(cfg)
        self.static = dict(algo=cfg.algo, lr=lr, **static)
        if algo is not None:
            self.rule = (GXPO if algo == "gxpo" else SFPO)(self.optimizer, max_grad_norm=cfg.max_grad_norm, **kw)


# ---------------------------------------------------------------------------------------------------------
# Distributed engines
# ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_rank_env() -> None:
    """Without a launcher (torchrun / deepspeed), run as rank 0 of 1."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))


class _DistributedEngine(Engine):
    """Shared by the data-parallel engines: process group ownership, broadcasts, dp means."""

    def _join(self, owned: bool) -> None:
        self._owned = owned
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def share_warm_start(self, model: nn.Module, ws: Optional[dict]) -> dict:
        box = [ws]
        dist.broadcast_object_list(box, src=0)
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)
        return box[0]

    def dp_mean(self, vals: List[float]) -> List[float]:
        t = torch.tensor([float(v) for v in vals], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def barrier(self) -> None:
        dist.barrier()

    def config_entries(self) -> dict:
        return {self.name: True, "world_size": self.world}

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if getattr(self, "_owned", False) and dist.is_initialized():
            dist.destroy_process_group()


def load_ds_config(path: str, cfg: TrainConfig) -> dict:
    """Read and check the DeepSpeed JSON; set the micro-batch size from P * G and the clipping default. A name that
    is not a file here but names a config shipped with the package (``ds_zero2.json``, ``ds_zero3.json``) uses it."""
    from ..examples import find_config
    try:
        path = find_config(path)
    except FileNotFoundError as e:
        raise ValueError(f"--deepspeed: {e}") from None
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path!r}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"--deepspeed {path!r}: the config must be a JSON object")
    def number(where: dict, key: str, default, kind=int):
        # a number, or a clear error: "auto" is a placeholder HF's Trainer / accelerate fill in, which no one does here
        v = where.get(key, default)
        # (json reads Infinity / NaN as floats: int() of them raises a bare error, float() keeps them)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (kind is int and v != int(v)):
            raise ValueError(f"--deepspeed {path!r}: {key} must be {'an int' if kind is int else 'a number'}, got "
                             f"{v!r}" + (" (HF Trainer's 'auto' placeholders are not filled in here: write the value)"
                                         if v == "auto" else ""))
        return kind(v)

    stage = number(d.get("zero_optimization") or {}, "stage", 0)
    bf16 = bool((d.get("bf16") or {}).get("enabled", False))
    if stage not in (1, 2, 3) and not (stage == 0 and bf16):
        raise ValueError(f"--deepspeed {path!r}: needs zero_optimization.stage 1, 2 or 3 (or bf16 at stage 0, the "
                         f"BF16_Optimizer); got stage {stage}")
    if "scheduler" in d and cfg.lr_scheduler_type != "constant":
        raise ValueError(f"--deepspeed {path!r} has its own scheduler and --lr_scheduler_type is "
                         f"{cfg.lr_scheduler_type!r}: choose one")
    B = cfg.prompts * cfg.group
    gas = number(d, "gradient_accumulation_steps", cfg.gradient_accumulation_steps)
    if cfg.gradient_accumulation_steps not in (1, gas):
        raise ValueError(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} conflicts with the "
                         f"gradient_accumulation_steps {gas} of --deepspeed {path!r}: give one of them")
    if gas < 1 or B % gas:
        raise ValueError(f"--deepspeed {path!r}: gradient_accumulation_steps={gas} must divide the per-rank batch "
                         f"prompts * group = {B}")
    d["gradient_accumulation_steps"] = gas
    d["train_micro_batch_size_per_gpu"] = B // gas
    d.pop("train_batch_size", None)                   # DeepSpeed derives it: micro * gas * world
    clip = number(d, "gradient_clipping", None, float) if "gradient_clipping" in d else None
    default_clip = TrainConfig.__dataclass_fields__["max_grad_norm"].default
    if clip is not None and cfg.max_grad_norm != default_clip and clip != cfg.max_grad_norm:
        raise ValueError(f"--max_grad_norm {cfg.max_grad_norm} conflicts with the gradient_clipping {clip} of "
                         f"--deepspeed {path!r} (DeepSpeed clips, with the config's value): give one of them")
    d.setdefault("gradient_clipping", cfg.max_grad_norm)
    d.setdefault("zero_allow_untested_optimizer", True)
    d.setdefault("steps_per_print", 10 ** 9)
    return d


class DeepSpeedEngine(_DistributedEngine):
    """A DeepSpeed ZeRO engine (``--deepspeed ds.json``), one process per rank.

    - the B = P * G rows of a rank go through ``engine(...)`` in ``gradient_accumulation_steps`` micro-batches
      of B / gas rows (``train_micro_batch_size_per_gpu`` is set to that);
    - ``gxpo`` / ``sfpo``: ``integrations.deepspeed.initialize`` builds the engine and the rule, which runs every
      ``engine.step()``; the GRPO variants call ``engine.step()`` per micro-batch (DeepSpeed's bookkeeping on
      non-boundary ones, the optimizer step on the boundary);
    - clipping is DeepSpeed's ``gradient_clipping`` (the config's value, else ``max_grad_norm``; both, differing:
      refused unless ``max_grad_norm`` is the default); precision is
      the config's (``bf16``), no autocast on top;
    - ZeRO-3 gathers parameters collectively inside each forward, so ``generate`` runs with ``synced_gpus``.
    """

    name = "deepspeed"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.ds_config = load_ds_config(cfg.deepspeed, cfg)    # fail before any process-group set-up
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from ..integrations.deepspeed import apply_shm_setting
        apply_shm_setting()         # before DeepSpeed's communication backend is made (here or in initialize)
        owned = not dist.is_initialized()
        if owned:
            _single_rank_env()
            deepspeed.init_distributed()
        self._join(owned)
        acc = get_accelerator()
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device(acc.current_device_name())

    def setup(self, model: nn.Module, loss_kw: dict) -> None:
        import deepspeed
        from ..integrations import deepspeed as gds

        cfg = self.cfg
        lr = learning_rate(cfg)
        wrapped = PolicyLoss(model, loss_kw, cfg.loss_path, use_amp=False)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=lr)
        algo, kw, static = rule_options(cfg)
        if algo is not None:
            self.engine, self.rule = gds.initialize(model=wrapped, config=self.ds_config, optimizer=opt,
                                                    **{algo: kw})
        else:
            self.engine, *_ = deepspeed.initialize(model=wrapped, config=self.ds_config, optimizer=opt)
        self.module, self.policy, self.optimizer = self.engine.module, model, self.engine.optimizer
        self.micro_batches = self.engine.gradient_accumulation_steps()
        stage = self.engine.zero_optimization_stage()
        self.gen_kw = dict(synced_gpus=stage == 3, use_amp=False)
        self.static = dict(algo=cfg.algo, lr=lr, **static, zero_stage=stage, world_size=self.world,
                           gradient_clipping=self.ds_config["gradient_clipping"])

    def config_entries(self) -> dict:
        return {"deepspeed": self.ds_config, "world_size": self.world}   # the config as DeepSpeed received it

    def zero_grad(self) -> None:
        pass                                              # DeepSpeed zeroes after each boundary step

    def forward(self, *batch) -> torch.Tensor:
        return self.engine(*batch)

    def loss_weights(self, mask: torch.Tensor, agg_mode: str) -> List[float]:
        """DeepSpeed divides every micro-batch's loss by gradient_accumulation_steps itself: under "token-mean"
        with micro-batches of different token counts the pass's gradient is the mean of their token-means, not
        the batch's token-mean (the plain and FSDP engines weigh by token share, see ``Engine.loss_weights``)."""
        return [1.0 / self.micro_batches] * self.micro_batches

    def backward(self, loss: torch.Tensor, weight: float, last: bool) -> None:
        self.engine.backward(loss)                        # under a rule, its wrapper also steps non-boundaries
        if self.rule is None and not last:
            self.engine.step()                            # non-boundary micro-step: DeepSpeed's bookkeeping only

    def optimizer_step(self) -> Optional[float]:
        self.engine.step()                                # the boundary: reduce, clip, optimizer step
        gn = self.engine.get_global_grad_norm()
        return None if gn is None else float(gn)

    def step_skipped(self, norm: Optional[float]) -> bool:
        # DeepSpeed's engine.step() decides: it skips an fp16 overflow (its norm then reads inf), and may step a
        # bf16 NaN (ZeRO checks bf16 gradients only with check_grad_overflow)
        return not self.engine.was_step_applied()

    @contextlib.contextmanager
    def eval_mode(self):
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    def save_state(self, path: str) -> None:
        # every rank writes its own ZeRO partition; the module's weights too (gathered 16-bit copy not needed)
        self.engine.save_checkpoint(path, tag="deepspeed", save_latest=False)

    def load_state(self, path: str) -> None:
        load_path, _ = self.engine.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"--resume {path!r}: no DeepSpeed checkpoint in it")

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        if self.engine.zero_optimization_stage() != 3:
            return self.policy.state_dict() if self.lead else None
        import deepspeed
        params = list(self.policy.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()} if self.lead else None


class FSDPEngine(_DistributedEngine):
    """PyTorch FSDP2 (``--fsdp``; ``torchrun``, gloo on CPU, NCCL on CUDA), one process per rank.

    - every decoder layer and then the causal LM itself are ``fully_shard``-ed (the LM is the root unit: its
      embedding, final norm and lm_head, tied or not, are gathered by the root's hooks); parameters are
      DTensors whose local shard lives on this rank, and the AdamW state is sharded alike;
    - the loss runs inside the root's forward (both loss paths call the model), so FSDP gathers the root
      parameters for it and reduce-scatters their gradients;
    - ``gxpo`` / ``sfpo``: ``integrations.fsdp.wrap`` (shard-local extrapolation, globally reduced norm, gate
      and finite checks); the GRPO variants clip with ``clip_grad_norm_`` over the sharded gradients;
    - every forward all-gathers layers collectively, so ``generate`` runs with ``synced_gpus``;
    - checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards).
    """

    name = "fsdp"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        from .model import pick_device
        device = pick_device(cfg.device)
        owned = not dist.is_initialized()
        if owned:
            _single_rank_env()
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self._join(owned)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = device
        self.gen_kw = dict(synced_gpus=True)

    def setup(self, model: nn.Module, loss_kw: dict) -> None:
        from torch.distributed.fsdp import fully_shard

        cfg = self.cfg
        lr = learning_rate(cfg)
        layers = getattr(getattr(model, getattr(model, "base_model_prefix", "model"), None), "layers", None)
        if layers is None:
            raise ValueError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (model.model.layers)")
        self.module = PolicyLoss(model, loss_kw, cfg.loss_path, use_amp=True)   # patches the model before sharding
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        self.policy = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        algo, kw, static = rule_options(cfg)
        if algo is not None:
            from ..integrations import fsdp as gfsdp
            self.rule = gfsdp.wrap(model, self.optimizer, algo, max_grad_norm=cfg.max_grad_norm, **kw)
        self.static = dict(algo=cfg.algo, lr=lr, **static, world_size=self.world)

    def optimizer_step(self) -> Optional[float]:
        norm = torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), self.cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm   # a DTensor over the shards
        return self._clipped_step(float(norm))   # (the norm is global: every rank skips or steps alike)

    def _dcp_state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.policy, self.optimizer)
        return {"model": msd, "optimizer": osd}

    def save_state(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save(self._dcp_state(), checkpoint_id=os.path.join(path, "fsdp"))

    def load_state(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        sd = self._dcp_state()
        dcp.load(sd, checkpoint_id=os.path.join(path, "fsdp"))
        set_state_dict(self.policy, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.lead:
            return None
        owners: Dict[int, List[str]] = {}
        for n, p in self.policy.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(n)
        for names in owners.values():                     # tied weights: one tensor, so save_pretrained dedups
            for n in names[1:]:
                if names[0] in sd and n in sd:
                    sd[n] = sd[names[0]]
        return sd


def make_engine(cfg: TrainConfig) -> Engine:
    """The engine ``cfg`` asks for: DeepSpeed (``cfg.deepspeed``), FSDP2 (``cfg.fsdp``), else plain."""
    if cfg.deepspeed is not None:
        return DeepSpeedEngine(cfg)
    if cfg.fsdp:
        return FSDPEngine(cfg)
    return PlainEngine(cfg)
