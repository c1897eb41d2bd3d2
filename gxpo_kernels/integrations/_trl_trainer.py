"""``GXPOGRPOTrainer``: TRL's ``GRPOTrainer`` with gxpo-kernels' loss, the GXPO / SFPO update and FADE.

Imported lazily by ``gxpo_kernels.integrations.trl`` (the class subclasses TRL's, so it is built on first
access). See the class docstring for how the update rule interacts with HF Trainer's optimizer, scheduler and
gradient handling.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

from .trl import _unsupported, check_trl_version, enable_gxpo_loss

UPDATE_STATE_FILE = "gxpo_update_state.pt"


def make_trainer_class():
    from trl import GRPOTrainer

    class GXPOGRPOTrainer(GRPOTrainer):
        """TRL ``GRPOTrainer`` with gxpo-kernels' fused loss and an optional GXPO / SFPO update and FADE.

        Extra args (everything else is ``GRPOTrainer``'s):
            update: "gxpo" (default), "sfpo" or "grpo" (plain TRL step, with our loss).
            update_kwargs: passed to ``GXPO``/``SFPO`` (K, alpha, tau, gate, ...). ``max_grad_norm`` defaults
                to ``args.max_grad_norm`` (the clip the rule applies at every pass).
            recompute_old_logp: True (paper protocol): every pass of an update takes its importance ratio
                against its own parameters (rho = 1); False: against the log-probs at the start of the update
                (TRL's stored ``old_per_token_logps`` if any, else theta0's).
            advantage_estimator: "grpo" (TRL's) or "fade" (binary rewards; FADE's focal advantages with the
                alpha/delta controllers; the controllers lag one generation batch: batch k's advantages use
                the EMAs of rewards and first-pass token entropies through batch k-1); fade_kwargs: passed
                to ``FADEController``.
            loss_path, backend: see ``enable_gxpo_loss``.

        How the update runs inside HF Trainer: ``training_step`` (called once per optimizer step, since
        gradient_accumulation_steps must be 1) prepares the batch once (TRL generates and scores it), then
        calls ``rule.step(closure)``; the closure zeroes the grads, runs ``compute_loss`` (our fused loss)
        and ``accelerator.backward``. The rule clips and steps the *inner* torch optimizer itself (3 passes
        and 3 optimizer steps for an active GXPO update, K + 1 for SFPO, 1 after the gate fired). HF's own
        ``optimizer.step()`` that follows is then a no-op for that update (the accelerate-wrapped optimizer's
        ``step`` is wrapped once to skip exactly one call), while the LR scheduler steps once and
        ``model.zero_grad()`` runs as usual: one scheduler step and one ``global_step`` per outer update.
        The update's diagnostics are logged as ``<update>/<name>`` (e.g. ``gxpo/backward_passes``).
        """

        def __init__(self, *args, update: str = "gxpo", update_kwargs: Optional[dict] = None,
                     recompute_old_logp: bool = True, advantage_estimator: str = "grpo",
                     fade_kwargs: Optional[dict] = None, loss_path: str = "auto", backend: str = "auto",
                     **kwargs):
            if update not in ("gxpo", "sfpo", "grpo"):
                raise ValueError(f"update must be one of ('gxpo', 'sfpo', 'grpo'), got {update!r}")
            if advantage_estimator not in ("grpo", "fade"):
                raise ValueError(f"advantage_estimator must be 'grpo' or 'fade', got {advantage_estimator!r}")
            check_trl_version()
            super().__init__(*args, **kwargs)
            enable_gxpo_loss(self, loss_path=loss_path, backend=backend)
            if update != "grpo":
                problem = _unsupported(self, for_update=True)
                if problem:
                    raise ValueError(f"{problem} with update={update!r}")
            self.gxpo_update = update
            self._gxpo_update_kwargs = dict(update_kwargs or {})
            self._gxpo_recompute_old = bool(recompute_old_logp)
            self._gxpo_rule = None
            self._gxpo_pending_state = None
            self._gxpo_skip_outer_step = False
            self.gxpo_backward_passes = 0
            self._fade = None
            if advantage_estimator == "fade":
                from ..advantages import FADEController
                self._fade = FADEController(**(fade_kwargs or {}))
            self._fade_pending_reward = None
            self._fade_entropy = []

        # ---- the update rule ---------------------------------------------------------------------------
        def _get_rule(self):
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer
            if self._gxpo_rule is None or self._gxpo_rule.optimizer is not inner:
                from ..update import GXPO, SFPO
                kw = dict(self._gxpo_update_kwargs)
                kw.setdefault("max_grad_norm", self.args.max_grad_norm if self.args.max_grad_norm > 0 else None)
                self._gxpo_rule = (GXPO if self.gxpo_update == "gxpo" else SFPO)(inner, **kw)
                if self._gxpo_pending_state is not None:  # resumed from a checkpoint before the rule existed
                    self._gxpo_rule.load_state_dict(self._gxpo_pending_state)
                    self._gxpo_pending_state = None
            outer = self.optimizer
            if getattr(outer, "_gxpo_owner", None) is not self:
                real_step = outer.step

                def step(*a, **k):  # HF's per-update optimizer.step(): the rule already stepped
                    if self._gxpo_skip_outer_step:
                        self._gxpo_skip_outer_step = False
                        return None
                    return real_step(*a, **k)
                outer.step = step
                outer._gxpo_owner = self
            return self._gxpo_rule

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
            inputs = self._prepare_inputs(inputs)
            rule = self._get_rule()
            self._gxpo_skip_outer_step = False  # only HF's step right after this update is skipped
            entropy = torch.zeros((), dtype=torch.float64)  # filled at pass 0; the entropy gate reads it after
            start_old = {}

            def closure():
                k = rule.pass_index
                self._gxpo_pass_index = k
                batch = dict(inputs)
                if self._gxpo_recompute_old:
                    batch.pop("old_per_token_logps", None)
                elif k > 0 and "old" in start_old:
                    batch["old_per_token_logps"] = start_old["old"]
                model.zero_grad(set_to_none=True)
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch)
                self.accelerator.backward(loss)
                self.gxpo_backward_passes += 1
                if k == 0:
                    entropy.fill_(self._gxpo_global_entropy())
                    if not self._gxpo_recompute_old and "old_per_token_logps" not in inputs:
                        start_old["old"] = self._gxpo_last_logp
                return loss.detach()

            info = rule.step(closure, entropy=entropy)
            self._gxpo_pass_index = 0
            if self._fade is not None:
                self._fade_entropy.append(float(entropy))  # the batch's entropy at theta0 (pass 0)
            self._gxpo_skip_outer_step = True
            self._step += 1  # GRPOTrainer.training_step's bookkeeping (generation buffer index, step time)
            self._current_train_step_time += time.perf_counter() - t0
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
            store = self._metrics["train"]
            for key, val in info.items():
                if isinstance(val, bool) or (isinstance(val, (int, float)) and val is not None):
                    store[f"{self.gxpo_update}/{key}"].append(float(val))
            store[f"{self.gxpo_update}/total_backward_passes"].append(float(rule.total_backward_passes))
            loss = info.get("loss", math.nan)
            return torch.tensor(loss if math.isfinite(loss) else math.nan, device=self.args.device)

        def _gxpo_global_entropy(self) -> float:
            s, c = self._gxpo_entropy_stats
            tot = self.accelerator.reduce(torch.stack([s, c]).double(), reduction="sum")
            return float(tot[0] / tot[1].clamp(min=1.0))

        # ---- checkpoints: the gate / counters and FADE's controller travel with HF's checkpoint --------------
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if not self.args.should_save:
                return
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            torch.save({"rule": None if self._gxpo_rule is None else self._gxpo_rule.state_dict(),
                        "fade": None if self._fade is None else self._fade.state_dict(),
                        "fade_pending_reward": self._fade_pending_reward},
                       os.path.join(folder, UPDATE_STATE_FILE))

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            path = None if checkpoint is None else os.path.join(checkpoint, UPDATE_STATE_FILE)
            if path is None or not os.path.exists(path):
                return
            st = torch.load(path, weights_only=False)
            if st["rule"] is not None:
                if self._gxpo_rule is not None:
                    self._gxpo_rule.load_state_dict(st["rule"])
                else:
                    self._gxpo_pending_state = st["rule"]
            if st["fade"] is not None and self._fade is not None:
                self._fade.load_state_dict(st["fade"])
                self._fade_pending_reward = st["fade_pending_reward"]

        # ---- FADE advantages ---------------------------------------------------------------------------
        def _fade_observe_entropy(self):
            if self._fade is not None and self.model.training:
                self._fade_entropy.append(self._gxpo_global_entropy())

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._gxpo_rewards_per_func = rewards_per_func  # gathered over all processes
            return rewards_per_func

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if self._fade is None or not self.model.training:
                return out
            from ..advantages import fade_advantages, sign_ratio
            rpf = self._gxpo_rewards_per_func
            rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
            # the controller lags one generation batch: fold in the previous batch's reward and entropy
            if self._fade_pending_reward is not None and self._fade_entropy:
                ent = sum(self._fade_entropy) / len(self._fade_entropy)
                self._fade.update(self._fade_pending_reward, ent)
            self._fade_entropy = []
            adv = fade_advantages(rewards, self.num_generations, alpha=self._fade.alpha, delta=self._fade.delta)
            self._fade_pending_reward = float(rewards.mean())
            B = out["completion_ids"].shape[0]
            i = self.accelerator.process_index
            out["advantages"] = adv[i * B:(i + 1) * B].to(out["advantages"].dtype)
            store = self._metrics["train"]
            for key, val in (("alpha", self._fade.alpha), ("delta", self._fade.delta), ("p_hat", self._fade.p_hat),
                             ("sign_ratio", float(sign_ratio(adv.double())))):
                store[f"fade/{key}"].append(float(val))
            return out

    return GXPOGRPOTrainer
