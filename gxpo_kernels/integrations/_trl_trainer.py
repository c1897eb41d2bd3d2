"""``GXPOGRPOTrainer`` / ``GXPOGRPOConfig``: TRL's ``GRPOTrainer`` with gxpo-kernels' loss, the GXPO / SFPO
update and FADE.

Built lazily by ``gxpo_kernels.integrations.trl`` (the classes subclass TRL's, so they are created on first
access). This module never imports ``integrations.trl``: the loss hook and the option checks it needs are passed
to :func:`make_trainer_classes`. See the trainer's docstring for how the update rule interacts with HF Trainer's
accumulation, optimizer, scheduler and DeepSpeed.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._utils import check_bool, require

UPDATE_STATE_FILE = "gxpo_update_state.pt"
UPDATES = ("gxpo", "sfpo", "grpo")
ADVANTAGE_ESTIMATORS = ("grpo", "fade")


def load_update_state(path: str) -> dict:
    """The trainer's saved update state (``gxpo_update_state.pt``), loaded with ``weights_only=True``: only
    tensors, numbers, strings and containers of them; a file carrying pickled objects is refused."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _dict_option(name: str, value):
    """``value`` of the dict option ``name`` (None, a dict, or a JSON string of an object) as a dict or None."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} must be a dict or a JSON object string, got {value!r} ({e})") from None
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict or a JSON object string, got {type(value).__name__}")
    return value


def make_trainer_classes(*, enable_loss, unsupported, check_version, engine, entropy_bonus_coef):
    """Build ``(GXPOGRPOConfig, GXPOGRPOTrainer)`` on the installed TRL. The arguments are
    ``integrations.trl``'s ``enable_gxpo_loss``, ``_unsupported``, ``check_trl_version``, ``_engine`` and
    ``_entropy_bonus_coef``."""
    require("trl", "gxpo_kernels.integrations.trl")   # an ImportError naming the [trl] extra when TRL is missing
    from trl import GRPOConfig, GRPOTrainer

    @dataclass
    class GXPOGRPOConfig(GRPOConfig):
        """``GRPOConfig`` plus the GXPO / SFPO / FADE options, so ``TrlParser``, YAML and the command line
        can set them (``--update sfpo --update_kwargs '{"K": 3}'``). The dict options take a dict or a JSON
        string. Field meanings: see ``GXPOGRPOTrainer``."""
        update: str = field(default="gxpo", metadata={"help": "Update rule: 'gxpo', 'sfpo' or 'grpo'."})
        update_kwargs: Optional[Union[dict, str]] = field(
            default=None, metadata={"help": "Keyword arguments of GXPO / SFPO (K, alpha, tau, gate, ...), JSON."})
        recompute_old_logp: bool = field(
            default=True, metadata={"help": "Passes after the first take rho = 1 (their own log-probs as old)."})
        advantage_estimator: str = field(default="grpo", metadata={"help": "'grpo' (TRL's) or 'fade'."})
        fade_kwargs: Optional[Union[dict, str]] = field(
            default=None, metadata={"help": "Keyword arguments of FADEController, JSON."})
        loss_path: str = field(default="auto", metadata={"help": "'auto', 'hidden' (fused head) or 'logits'."})
        kernel_backend: str = field(default="auto", metadata={"help": "Kernel backend: 'auto', 'triton', 'torch'."})

        _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["update_kwargs", "fade_kwargs"]

    _OPTION_DEFAULTS = dict(update="gxpo", update_kwargs=None, recompute_old_logp=True, advantage_estimator="grpo",
                            fade_kwargs=None, loss_path="auto", backend="auto")
    _CONFIG_NAME = {"backend": "kernel_backend"}

    class GXPOGRPOTrainer(GRPOTrainer):
        """TRL ``GRPOTrainer`` with gxpo-kernels' fused loss and an optional GXPO / SFPO update and FADE.

        Options, as constructor keywords or as fields of a ``GXPOGRPOConfig`` passed as ``args`` (not both):
            update: "gxpo" (default), "sfpo" or "grpo" (plain TRL step, with our loss).
            update_kwargs: passed to ``GXPO``/``SFPO`` (K, alpha, tau, gate, ...). ``max_grad_norm`` defaults
                to ``args.max_grad_norm`` (the clip the rule applies at every pass; DeepSpeed's
                ``gradient_clipping`` under DeepSpeed).
            recompute_old_logp: the old log-probs of the passes after the first. Pass 0 always uses TRL's
                stored ``old_per_token_logps`` when TRL has them (off-policy batches: ``steps_per_generation >
                gradient_accumulation_steps``, ``num_iterations > 1``, vLLM's sampling log-probs), so the PPO
                clip binds exactly as in plain TRL. True (paper protocol): later passes take their importance
                ratio against their own parameters (rho = 1); False: against pass 0's old log-probs (TRL's
                if stored, else theta0's).
            advantage_estimator: "grpo" (TRL's) or "fade" (binary rewards; FADE's focal advantages with the
                alpha/delta controllers; the controllers lag one generation batch); fade_kwargs: passed to
                ``FADEController``. FADE scores the ``reward_weights``-weighted sum of the reward functions
                (it must be 0 or 1; ``scale_rewards`` does not apply); a completion that every reward function
                returned None for is left out of its group's mean and gets advantage 0, as in TRL.
            loss_path, backend (``kernel_backend`` in the config): see ``enable_gxpo_loss``.

        One update per optimizer step. HF Trainer calls ``training_step`` once per micro-batch; the trainer
        prepares each micro-batch (TRL generates and scores) and keeps it until the accumulation window's last
        micro-batch, then runs ``rule.step(closure)``: one *pass* is one full gradient over the window's
        ``gradient_accumulation_steps`` micro-batches (forward + backward of each, DDP synchronising on the
        last only), as the papers count backward passes. The rule clips and steps the optimizer itself (3 passes
        and 3 optimizer steps for an active GXPO update, K + 1 for SFPO, 1 after the gate fired). HF's own
        ``optimizer.step()`` that follows is skipped for that update, while the LR scheduler steps once and
        ``model.zero_grad()`` runs as usual: one scheduler step and one ``global_step`` per update.

        DeepSpeed (ZeRO 1/2/3, through accelerate): the rule is ``integrations.deepspeed.wrap(engine)``; it
        runs the engine's micro-steps, extrapolates each rank's fp32 master shard and advances the engine's LR
        scheduler once per update. Under ZeRO-3 the fused head runs as the lm_head's forward.

        The update's diagnostics are logged as ``<update>/<name>`` (e.g. ``gxpo/backward_passes``). The gate,
        counters and FADE state are saved in each checkpoint (``gxpo_update_state.pt``, loaded with
        ``weights_only=True``).
        """

        def __init__(self, *args, update=None, update_kwargs=None, recompute_old_logp=None,
                     advantage_estimator=None, fade_kwargs=None, loss_path=None, backend=None, **kwargs):
            given = dict(update=update, update_kwargs=update_kwargs, recompute_old_logp=recompute_old_logp,
                         advantage_estimator=advantage_estimator, fade_kwargs=fade_kwargs, loss_path=loss_path,
                         backend=backend)
            cfg = kwargs.get("args", args[1] if len(args) > 1 else None)
            opts = {}
            for name, value in given.items():
                from_cfg = getattr(cfg, _CONFIG_NAME.get(name, name), None) if isinstance(cfg, GXPOGRPOConfig) \
                    else None
                if value is not None and from_cfg is not None and value != from_cfg \
                        and from_cfg != _OPTION_DEFAULTS[name]:
                    raise ValueError(f"{name} is set both in GXPOGRPOConfig ({from_cfg!r}) and as a keyword "
                                     f"({value!r}); set it in one place")
                opts[name] = value if value is not None else (from_cfg if from_cfg is not None
                                                              else _OPTION_DEFAULTS[name])
            for name in ("update_kwargs", "fade_kwargs"):   # a dict or a JSON string, as in the config
                opts[name] = _dict_option(name, opts[name])
            if opts["update"] not in UPDATES:
                raise ValueError(f"update must be one of {UPDATES}, got {opts['update']!r}")
            if opts["advantage_estimator"] not in ADVANTAGE_ESTIMATORS:
                raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, "
                                 f"got {opts['advantage_estimator']!r}")
            # (a string from code, such as "false", was truthy: read as True)
            opts["recompute_old_logp"] = check_bool(opts["recompute_old_logp"], "recompute_old_logp")
            check_version()
            super().__init__(*args, **kwargs)
            enable_loss(self, loss_path=opts["loss_path"], backend=opts["backend"])
            if opts["update"] != "grpo":
                problem = unsupported(self, for_update=True)
                if problem:
                    raise ValueError(f"{problem} with update={opts['update']!r}")
            self.gxpo_update = opts["update"]
            self._gxpo_update_kwargs = dict(opts["update_kwargs"] or {})
            if self.gxpo_update != "grpo":
                self._gxpo_check_update_kwargs()
            self._gxpo_recompute_old = opts["recompute_old_logp"]
            self._gxpo_rule = None
            self._gxpo_pending_state = None
            self._gxpo_skip_outer_step = False
            self._gxpo_window = []
            self.gxpo_backward_passes = 0
            self._fade = None
            if opts["advantage_estimator"] == "fade":
                agg = getattr(self.args, "multi_objective_aggregation", "sum_then_normalize")
                if agg != "sum_then_normalize":   # FADE scores the weighted sum of the 0/1 rewards itself
                    raise ValueError(f"advantage_estimator='fade' needs multi_objective_aggregation="
                                     f"'sum_then_normalize' (the weighted sum of binary rewards), got {agg!r}")
                from ..advantages import FADEController
                try:
                    self._fade = FADEController(**(opts["fade_kwargs"] or {}))
                except TypeError as e:   # an unknown keyword: name the option it came through
                    raise TypeError(f"fade_kwargs: {e}") from None
                self._fade_settings = self._fade.settings()   # as configured: a resumed checkpoint must agree
            self._fade_pending_reward = None   # mean reward of the generation batches not yet folded in
            self._fade_pending_n = 0           # ... and how many scored rewards it averages
            self._fade_entropy = []

        # ---- the update rule (the only engine-specific code: the rule's construction and the backward) -------
        def _gxpo_check_update_kwargs(self) -> None:
            """Build the rule once on a stand-in optimizer: a bad ``update_kwargs`` (an unknown name, K=0) fails
            at construction, not at the first training step after generation (the real rule needs the
            optimizer, which the Trainer creates in ``train()``)."""
            from ..update import GXPO, SFPO
            kw = {"max_grad_norm": None, **self._gxpo_update_kwargs}
            stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            try:
                (GXPO if self.gxpo_update == "gxpo" else SFPO)(stand_in, **kw)
            except TypeError as e:   # an unknown keyword: name the option it came through
                raise TypeError(f"update_kwargs: {e}") from None

        def _get_rule(self, model):
            eng = engine(self)
            if eng == "deepspeed":
                if self._gxpo_rule is None or self._gxpo_rule.engine is not model:
                    from .deepspeed import wrap
                    self._gxpo_rule = wrap(model, self.gxpo_update, **self._gxpo_update_kwargs)
                    self._gxpo_apply_pending_state()
                return self._gxpo_rule      # accelerate's DeepSpeed optimizer.step() is already a no-op
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer
            if self._gxpo_rule is None or self._gxpo_rule.optimizer is not inner:
                from ..update import GXPO, SFPO
                kw = dict(self._gxpo_update_kwargs)
                kw.setdefault("max_grad_norm", self.args.max_grad_norm if self.args.max_grad_norm > 0 else None)
                self._gxpo_rule = (GXPO if self.gxpo_update == "gxpo" else SFPO)(inner, **kw)
                self._gxpo_apply_pending_state()
            outer = self.optimizer
            if getattr(outer, "_gxpo_owner", None) is not self:
                real_step = outer.step

                # HF's per-update optimizer.step(): the rule already stepped. functools.wraps keeps the marker
                # torch's LR scheduler put on the step it wrapped, so it does not warn that step was replaced.
                @functools.wraps(real_step)
                def step(*a, **k):
                    if self._gxpo_skip_outer_step:
                        self._gxpo_skip_outer_step = False
                        outer._opt_called = True  # what the scheduler's wrapper records: the step happened
                        return None
                    return real_step(*a, **k)
                outer.step = step
                outer._gxpo_owner = self
            return self._gxpo_rule

        def _gxpo_backward(self, model, loss):
            if engine(self) == "deepspeed":
                # the rule runs the engine's micro-steps itself; TRL already scaled the loss for accumulation
                model.backward(loss, scale_wrt_gas=False)
            else:
                self.accelerator.backward(loss)

        def _gxpo_apply_pending_state(self):
            if self._gxpo_pending_state is not None:  # resumed from a checkpoint before the rule existed
                self._gxpo_rule.load_state_dict(self._gxpo_pending_state)
                self._gxpo_pending_state = None

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.gxpo_update == "grpo":
                self.gxpo_backward_passes += 1
                self._gxpo_pass_index = 0
                out = super().training_step(model, inputs, num_items_in_batch)
                self._fade_observe_entropy()
                return out
            t0 = time.perf_counter()
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            self._gxpo_window.append(self._prepare_inputs(inputs))
            self._step += 1  # GRPOTrainer.training_step's bookkeeping (generation buffer index), per micro-batch
            self._current_train_step_time += time.perf_counter() - t0
            if not self.accelerator.sync_gradients:
                # the update runs once the window's last micro-batch is here; its loss is reported then
                return torch.zeros((), device=self.args.device)
            window, self._gxpo_window = self._gxpo_window, []
            t0 = time.perf_counter()
            info = self._gxpo_update(model, window)
            self._current_train_step_time += time.perf_counter() - t0
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
            store = self._metrics["train"]
            for key, val in info.items():
                if isinstance(val, bool) or (isinstance(val, (int, float)) and val is not None):
                    store[f"{self.gxpo_update}/{key}"].append(float(val))
            store[f"{self.gxpo_update}/total_backward_passes"].append(float(self._gxpo_rule.total_backward_passes))
            loss = info.get("loss", math.nan)
            return torch.tensor(loss if math.isfinite(loss) else math.nan, device=self.args.device)

        def _gxpo_update(self, model, window) -> dict:
            """One GXPO / SFPO update over the accumulation window's micro-batches."""
            rule = self._get_rule(model)
            self._gxpo_skip_outer_step = False  # only HF's step right after this update is skipped
            n, ddp = len(window), engine(self) == "ddp"
            start_old = [None] * n          # pass 0's log-probs, the later passes' old ones (recompute=False)
            entropy = torch.zeros((), dtype=torch.float64)  # filled at pass 0; the entropy gate reads it after
            entropy_sums = torch.zeros(2, dtype=torch.float64)  # pass 0's (entropy sum, token count), all ranks
            self._gxpo_frozen_entropy_coef = None
            self._gxpo_frozen_entropy_coef = entropy_bonus_coef(self, "train")  # one coefficient per update

            def closure():
                k = rule.pass_index
                self._gxpo_pass_index = k
                if engine(self) != "deepspeed":
                    model.zero_grad(set_to_none=True)
                total = torch.zeros((), dtype=torch.float64)
                ent = torch.zeros(2, dtype=torch.float64)
                for i, inputs in enumerate(window):
                    batch = dict(inputs)
                    if k > 0:  # pass 0 keeps TRL's stored old log-probs (the clip binds as in plain TRL)
                        if self._gxpo_recompute_old:
                            batch.pop("old_per_token_logps", None)  # rho = 1 against this pass's parameters
                        elif batch.get("old_per_token_logps") is None:
                            batch["old_per_token_logps"] = start_old[i]
                    self._gxpo_window_end = i == n - 1
                    sync = contextlib.nullcontext() if (i == n - 1 or not ddp) else self.accelerator.no_sync(model)
                    with sync:
                        with self.compute_loss_context_manager():
                            loss = self.compute_loss(model, batch)
                        self._gxpo_backward(model, loss)
                    total += loss.detach().double().cpu()
                    if k == 0:
                        ent += torch.stack(self._gxpo_entropy_stats).double().cpu()
                        start_old[i] = self._gxpo_last_logp
                self.gxpo_backward_passes += 1
                if k == 0:
                    tot = self.accelerator.reduce(ent.to(self.accelerator.device), reduction="sum")
                    entropy.fill_(float(tot[0] / tot[1].clamp(min=1.0)))
                    entropy_sums.copy_(tot)
                return total

            try:
                info = rule.step(closure, entropy=entropy)
            finally:
                self._gxpo_pass_index = 0
                self._gxpo_window_end = None
                self._gxpo_frozen_entropy_coef = None
            if self._fade is not None:
                self._fade_entropy.append(entropy_sums.tolist())  # the window's entropy at theta0 (pass 0)
            self._gxpo_skip_outer_step = engine(self) != "deepspeed"
            return info

        def _clip_grad_norm(self, model):
            # HF's clip before its optimizer step, right after an update by the rule (that step is skipped): the
            # rule clipped every pass itself, and the gradients it left are clipped already. Report the pre-clip
            # norm of the update's last pass, as HF does for its own step (and DeepSpeed's engine does for ours)
            if self._gxpo_skip_outer_step and self._gxpo_rule is not None:
                return torch.tensor(self._gxpo_rule.last_grad_norm)
            return super()._clip_grad_norm(model)

        def _gxpo_global_entropy_sums(self) -> list:
            """[entropy sum, token count] of the last loss call's tokens, summed over all ranks."""
            s, c = self._gxpo_entropy_stats
            return self.accelerator.reduce(torch.stack([s, c]).double(), reduction="sum").tolist()

        # ---- checkpoints: the gate / counters and FADE's controller travel with HF's checkpoint --------------
        def gxpo_state_dict(self) -> dict:
            """The update state saved with each checkpoint (plain numbers, strings and lists only)."""
            return {"rule": None if self._gxpo_rule is None else self._gxpo_rule.state_dict(),
                    "fade": None if self._fade is None else self._fade.state_dict(),
                    "fade_pending_reward": self._fade_pending_reward, "fade_pending_n": self._fade_pending_n,
                    "fade_entropy": list(self._fade_entropy)}

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if not self.args.should_save:
                return
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            torch.save(self.gxpo_state_dict(), os.path.join(folder, UPDATE_STATE_FILE))

        def train(self, resume_from_checkpoint=None, *args, **kwargs):
            # check our saved state before HF loads anything (the model's weights here, DeepSpeed's engine, the
            # optimizer): a refused state leaves the trainer as it was. The optimizer-dependent part of the rule's
            # check runs again in _load_optimizer_and_scheduler, once the optimizer exists.
            ckpt = resume_from_checkpoint
            if isinstance(ckpt, bool):
                from transformers.trainer_utils import get_last_checkpoint
                ckpt = get_last_checkpoint(self.args.output_dir) if ckpt else None   # None: HF raises
            if ckpt is not None:
                self._gxpo_checked_update_state(ckpt)
            return super().train(resume_from_checkpoint, *args, **kwargs)

        def _load_optimizer_and_scheduler(self, checkpoint):
            # validate first, then let HF load the optimizer and scheduler, then apply what was validated: a
            # refused update state leaves the optimizer as it was (it used to be loaded before the rule's check)
            st = None if checkpoint is None else self._gxpo_checked_update_state(checkpoint)
            super()._load_optimizer_and_scheduler(checkpoint)
            if checkpoint is None:
                return
            path = os.path.join(checkpoint, UPDATE_STATE_FILE)
            if st is None:
                if self._fade is not None or self.gxpo_update != "grpo":
                    warnings.warn(f"{checkpoint} has no {UPDATE_STATE_FILE} (not saved by GXPOGRPOTrainer): the "
                                  "update rule's gate and counters and FADE's controller start fresh")
                return
            # a checkpoint of another configuration: say what is dropped or started afresh rather than go on silently
            if st["rule"] is not None and self.gxpo_update == "grpo":
                warnings.warn(f"{path} holds an update rule's state but this trainer runs update='grpo'; it is ignored")
            if (st["fade"] is None) != (self._fade is None):
                warnings.warn(f"{path} " + ("holds FADE's controller state but this trainer does not use FADE; it is "
                                            "ignored" if self._fade is None else
                                            "has no FADE controller state (saved without FADE); the controller "
                                            "starts fresh"))
            if st["rule"] is not None and self.gxpo_update != "grpo":
                if self._gxpo_rule is not None:
                    self._gxpo_rule.load_state_dict(st["rule"])
                else:
                    self._gxpo_pending_state = st["rule"]
            if st["fade"] is not None and self._fade is not None:
                self._fade.load_state_dict(st["fade"])
                self._fade_pending_reward = st["fade_pending_reward"]
                self._fade_pending_n = int(st.get("fade_pending_n", 0))
                # the [entropy sum, token count] pairs the next update folds in
                self._fade_entropy = [list(e) for e in st.get("fade_entropy", [])]

        def _gxpo_checked_update_state(self, checkpoint) -> Optional[dict]:
            """``checkpoint``'s ``gxpo_update_state.pt`` (None when it has none), after checking that this trainer
            can load it: FADE's settings and state, and the rule's (its name, hyper-parameters, gate settings and,
            once the optimizer exists, its optimizer class and trainable parameters). The checks load the state
            into throw-away copies; ValueError, naming the file, changes nothing."""
            path = os.path.join(checkpoint, UPDATE_STATE_FILE)
            if not os.path.exists(path):
                return None
            st = load_update_state(path)
            if st["fade"] is not None and self._fade is not None:
                self._fade_check_settings(st["fade"], path)
            try:
                if st["fade"] is not None and self._fade is not None:
                    copy.deepcopy(self._fade).load_state_dict(st["fade"])
                    int(st.get("fade_pending_n", 0))
                if st["rule"] is not None and self.gxpo_update != "grpo":
                    self._gxpo_check_rule_state(st["rule"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: {e}") from None
            return st

        def _gxpo_check_rule_state(self, sd) -> None:
            """Load ``sd`` into a throw-away rule with this trainer's settings (ValueError if refused): on the real
            optimizer where it exists, else (before ``train()`` built it, or under DeepSpeed, whose rule state
            carries no optimizer signature) on a stand-in, without the optimizer class and parameter counts."""
            from ..update import GXPO, SFPO, Gate
            kw = {"max_grad_norm": None, **self._gxpo_update_kwargs}
            if isinstance(kw.get("gate"), Gate):
                kw["gate"] = copy.deepcopy(kw["gate"])   # the probe must not load into the rule's own gate
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            stand_in = inner is None or engine(self) == "deepspeed"
            if stand_in:
                inner = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            probe = (GXPO if self.gxpo_update == "gxpo" else SFPO)(inner, **kw)
            if stand_in and isinstance(sd, dict):
                sd = {k: v for k, v in sd.items() if k not in probe._model_signature()}
            probe.load_state_dict(sd)

        def _fade_check_settings(self, saved: dict, path: str) -> None:
            """Refuse (ValueError) FADE state saved with other fade_kwargs than this trainer's, as the update rule
            refuses other settings: loading it replaced the configured hyper-parameters with the checkpoint's,
            silently. A target entropy left unset here takes the saved one (the first update set it)."""
            diff = {k: (saved.get(k), v) for k, v in self._fade_settings.items()
                    if not (k == "target_entropy" and v is None) and saved.get(k) != v}
            if diff:
                desc = ", ".join(f"{k}: checkpoint {a!r} vs fade_kwargs {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"{path}: FADE's controller was saved with other settings ({desc}); resume with "
                                 "the checkpoint's fade_kwargs")

        # ---- FADE advantages ---------------------------------------------------------------------------
        def _fade_observe_entropy(self):
            if self._fade is not None and self.model.training:
                self._fade_entropy.append(self._gxpo_global_entropy_sums())

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._gxpo_rewards_per_func = rewards_per_func  # gathered over all processes
            return rewards_per_func

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self._fade is None or not self.model.training:
                return out
            import copy

            from ..advantages import fade_advantages, sign_ratio
            rpf = self._gxpo_rewards_per_func           # (N, num_funcs), gathered over all processes
            rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
            # a completion every reward function returned None for is unscorable (as in TRL): it is left out of
            # its group's mean and of the batch mean, and its advantage is 0 (nansum would score it 0)
            scored = ~torch.isnan(rpf).all(dim=1)
            # the controller lags one generation batch: fold in the previous batch's reward and entropy. The new
            # state is committed only once the advantages are computed (non-binary rewards raise, changing nothing)
            fade = copy.deepcopy(self._fade)
            pending, pending_n = self._fade_pending_reward, self._fade_pending_n
            if pending is not None and self._fade_entropy:
                # the mean token entropy since that batch: token-weighted over micro-batches and updates alike
                ent = sum(e[0] for e in self._fade_entropy) / max(sum(e[1] for e in self._fade_entropy), 1.0)
                fade.update(pending, ent)
                pending, pending_n = None, 0
            # else no update ran since that batch (no entropy yet: several generation batches per update, as with
            # steps_per_generation < gradient_accumulation_steps): the next update folds in all of them
            n_new = int(scored.sum())
            if n_new:
                new_sum = float(rewards[scored].double().sum())
                if pending is None:
                    pending, pending_n = new_sum / n_new, n_new
                else:
                    w = pending_n or n_new   # (a checkpoint without the count: weigh the batches equally)
                    pending, pending_n = (pending * w + new_sum) / (w + n_new), w + n_new
            adv = torch.zeros_like(rewards)
            if n_new:
                group = torch.arange(rewards.numel(), device=rewards.device) // self.num_generations
                adv[scored] = fade_advantages(rewards[scored], group_ids=group[scored], alpha=fade.alpha,
                                              delta=fade.delta)
            self._fade = fade
            self._fade_entropy = []
            self._fade_pending_reward, self._fade_pending_n = pending, pending_n
            B = out["completion_ids"].shape[0]
            i = self.accelerator.process_index
            out["advantages"] = adv[i * B:(i + 1) * B].to(out["advantages"].dtype)
            logged = self._logs["advantages"]            # TRL's completions table: FADE's advantages, not TRL's
            for _ in range(min(adv.numel(), len(logged))):
                logged.pop()
            logged.extend(adv.tolist())
            store = self._metrics["train"]
            for key, val in (("alpha", fade.alpha), ("delta", fade.delta), ("p_hat", fade.p_hat),
                             ("h_hat", fade.h_hat), ("sign_ratio", float(sign_ratio(adv.double())))):
                if val is not None:   # (h_hat: from the first controller update on)
                    store[f"fade/{key}"].append(float(val))
            return out

    return GXPOGRPOConfig, GXPOGRPOTrainer
