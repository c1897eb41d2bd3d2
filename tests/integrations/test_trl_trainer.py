"""``GXPOGRPOTrainer`` / ``GXPOGRPOConfig`` against plain TRL: PPO clipping on off-policy batches (pass 0 keeps
TRL's old log-probs), gradient accumulation (one pass = one full gradient over the window's micro-batches),
the config subclass through ``TrlParser``, no LR-scheduler warning, adaptive entropy and the MoE auxiliary loss
in the loss hook, and the weights_only checkpoint policy (every saved state loads with ``weights_only=True``;
a pickle payload is refused)."""
import copy
import math
import os
import pickle
import shutil
import warnings

import pytest
import torch

pytest.importorskip("trl")

from tests.integrations.test_trl import (GRPOTrainer, check_parity, count_backward, adam_steps, gtrl, make_batch,  # noqa: E402
                      make_model, make_trainer, reward_binary)


def fired_gate():
    """A gate that has already fired: the rule then runs TRL's plain single-pass step through the closure."""
    from gxpo_kernels.update.gates import EMAGate
    g = EMAGate(tau=1.0)
    g.fired, g.fired_step = True, 0
    return g


def params(tr):
    return {n: p.detach().clone() for n, p in tr.model.named_parameters()}


def train_logs(tr):
    tr.train()
    return [h for h in tr.state.log_history if "loss" in h]


OFF_POLICY = {"steps_per_generation=2": dict(steps_per_generation=2, per_device_train_batch_size=8),
              "num_iterations=2": dict(num_iterations=2)}


@pytest.mark.parametrize("cfg", OFF_POLICY.values(), ids=OFF_POLICY.keys())
def test_pass0_clip_ratio_matches_plain_trl(tmp_path, cfg):
    """Step 2 reuses step 1's generation batch: TRL's stored old log-probs make the clip bind. Through the
    rule's closure (gate already fired: one plain pass) the clip ratios and parameters equal plain TRL's."""
    cfg = dict(cfg, loss_type="grpo", learning_rate=3e-2, max_grad_norm=1.0)
    plain = train_logs(make_trainer(tmp_path / "plain", **cfg))
    ours_tr = make_trainer(tmp_path / "ours", cls=gtrl.GXPOGRPOTrainer, **cfg,
                           trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": fired_gate(), "backend": "torch"},
                                               backend="torch"))
    ours = train_logs(ours_tr)
    assert plain[1]["clip_ratio/region_mean"] > 0.05  # the clip really binds at step 2
    for key in ("clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "loss", "entropy"):
        for a, b in zip(plain, ours):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])


@pytest.mark.parametrize("cfg", OFF_POLICY.values(), ids=OFF_POLICY.keys())
def test_active_update_sees_trl_old_logprobs_at_pass0(tmp_path, cfg):
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, loss_type="grpo", learning_rate=3e-2, **cfg,
                      trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                          backend="torch"))
    seen, real = [], tr._compute_loss

    def spy(model, inputs):
        seen.append((tr._gxpo_pass_index, inputs.get("old_per_token_logps")))
        return real(model, inputs)
    tr._compute_loss = spy
    logs = train_logs(tr)
    assert [k for k, _ in seen] == [0, 1, 2, 0, 1, 2]
    assert seen[3][1] is not None                     # step 2, pass 0: TRL's stored old log-probs
    assert seen[4][1] is None and seen[5][1] is None  # later passes: rho = 1 (recompute_old_logp=True)
    assert logs[1]["clip_ratio/region_mean"] > 0      # was 0.000 when pass 0 dropped them


def test_logged_grad_norm_is_the_pre_clip_norm(tmp_path):
    """HF logs the pre-clip gradient norm. The rule clips every pass itself, so the norm of the gradients it
    leaves behind is the clip value: the logged grad_norm is the update's last pass's pre-clip norm instead,
    as plain TRL (gate fired: the same single pass) and as DeepSpeed's engine report it."""
    cfg = dict(loss_type="grpo", learning_rate=3e-2, max_grad_norm=1e-3)   # the clip binds at every pass
    plain = train_logs(make_trainer(tmp_path / "plain", **cfg))
    ours = train_logs(make_trainer(tmp_path / "ours", cls=gtrl.GXPOGRPOTrainer, **cfg,
                                   trainer_kwargs=dict(update="gxpo", backend="torch",
                                                       update_kwargs={"gate": fired_gate(), "backend": "torch"})))
    assert all(h["grad_norm"] > 1e-2 for h in plain), plain
    for a, b in zip(plain, ours):
        assert math.isclose(a["grad_norm"], b["grad_norm"], rel_tol=1e-4), (a["grad_norm"], b["grad_norm"])
    active = train_logs(make_trainer(tmp_path / "active", cls=gtrl.GXPOGRPOTrainer, **cfg,
                                     trainer_kwargs=dict(update="gxpo", backend="torch",
                                                         update_kwargs={"gate": None, "backend": "torch"})))
    for h in active:
        assert h["gxpo/active"] == 1.0 and math.isclose(h["grad_norm"], h["gxpo/grad_norm_corr"], rel_tol=1e-6), h


def test_gradient_accumulation_equals_plain_trl_when_single_pass(tmp_path):
    """gradient_accumulation_steps=2: the window's two micro-batches form one pass (DDP-style accumulation in
    one closure); with the gate fired it is TRL's own step, so parameters and logs match plain TRL."""
    # no clipping (a huge max_grad_norm): the two clip implementations round differently, and Adam's
    # m / sqrt(v) magnifies that for near-zero gradient entries
    cfg = dict(loss_type="dapo", gradient_accumulation_steps=2, per_device_train_batch_size=4, learning_rate=3e-2,
               steps_per_generation=4, max_grad_norm=1e6)
    plain_tr = make_trainer(tmp_path / "plain", **cfg)
    gtrl.enable_gxpo_loss(plain_tr, backend="torch")  # the same loss kernels: only the update path differs
    plain = train_logs(plain_tr)
    ours_tr = make_trainer(tmp_path / "ours", cls=gtrl.GXPOGRPOTrainer, **cfg,
                           trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": fired_gate(), "backend": "torch"},
                                               backend="torch"))
    ours = train_logs(ours_tr)
    for key in ("loss", "clip_ratio/region_mean", "entropy"):
        for a, b in zip(plain, ours):
            assert math.isclose(a[key], b[key], rel_tol=1e-4, abs_tol=1e-6), (key, a[key], b[key])
    p0, p1 = params(plain_tr), params(ours_tr)
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-6, atol=1e-7)
    assert plain[1]["clip_ratio/region_mean"] > 0


def test_gradient_accumulation_passes_and_no_scheduler_warning(tmp_path):
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, loss_type="dapo", gradient_accumulation_steps=2,
                      per_device_train_batch_size=2, learning_rate=5e-3,
                      trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": None, "backend": "torch"},
                                          backend="torch"))
    calls = count_backward(tr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logs = train_logs(tr)
    msgs = [str(w.message) for w in caught]
    assert not any("lr_scheduler" in m or "overridden" in m for m in msgs), msgs
    # 3 passes per update, each one backward per micro-batch of the window (2)
    assert [calls.count(s) for s in range(2)] == [6, 6]
    assert adam_steps(tr) == {6} and tr.state.global_step == 2 and tr.gxpo_backward_passes == 6
    assert [h["gxpo/backward_passes"] for h in logs] == [3, 3]
    assert logs[0]["learning_rate"] > logs[1]["learning_rate"]
    assert all(math.isfinite(h["loss"]) for h in logs), logs


def test_config_subclass_sets_the_options(tmp_path):
    from trl import TrlParser
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text("update: sfpo\nupdate_kwargs: '{\"K\": 2, \"gate\": null, \"backend\": \"torch\"}'\n"
                    "kernel_backend: torch\nrecompute_old_logp: false\n")
    (cfg,) = TrlParser((gtrl.GXPOGRPOConfig,)).parse_args_and_config(
        args=["--config", str(yaml), "--output_dir", str(tmp_path / "out"), "--loss_path", "logits", "--use_cpu", "true", "--bf16", "false"])
    assert (cfg.update, cfg.update_kwargs, cfg.kernel_backend, cfg.loss_path, cfg.recompute_old_logp) == \
        ("sfpo", {"K": 2, "gate": None, "backend": "torch"}, "torch", "logits", False)
    base = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=1,
                report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False)
    args = gtrl.GXPOGRPOConfig(output_dir=str(tmp_path / "o"), update="sfpo",
                               update_kwargs='{"K": 2, "gate": null, "backend": "torch"}', kernel_backend="torch",
                               **base)
    import datasets
    from tests.integrations.test_trl import make_tokenizer, reward_distinct
    ds = datasets.Dataset.from_dict({"prompt": ["ab", "cd"] * 4})
    tr = gtrl.GXPOGRPOTrainer(model=make_model(), reward_funcs=reward_distinct, args=args, train_dataset=ds,
                              processing_class=make_tokenizer())
    assert tr.gxpo_update == "sfpo" and tr._gxpo_backend == "torch"
    logs = train_logs(tr)
    assert logs[0]["sfpo/backward_passes"] == 3  # K + 1
    with pytest.raises(ValueError, match="set it in one place"):
        gtrl.GXPOGRPOTrainer(model=make_model(), reward_funcs=reward_distinct, args=args, train_dataset=ds,
                             processing_class=make_tokenizer(), update="gxpo")


def test_recompute_old_logp_must_be_a_bool(tmp_path):
    """recompute_old_logp="false" (from code, or a config built in code) was truthy and read as True; it now goes
    through check_bool, as the library's other flags, before TRL builds anything (no model needed)."""
    for bad in ("false", 0, 1):
        with pytest.raises(TypeError, match=r"^recompute_old_logp must be a bool \(True or False\)"):
            gtrl.GXPOGRPOTrainer(model=None, recompute_old_logp=bad)
        args = gtrl.GXPOGRPOConfig(output_dir=str(tmp_path / "o"), recompute_old_logp=bad, use_cpu=True, bf16=False,
                                   report_to="none")
        with pytest.raises(TypeError, match=r"^recompute_old_logp must be a bool \(True or False\)"):
            gtrl.GXPOGRPOTrainer(model=None, args=args)


def test_adaptive_entropy_matches_trl(tmp_path):
    """TRL's adaptive entropy controller: same applied coefficient, loss, gradients and controller state over a
    sequence of micro-batches crossing two accumulation windows."""
    cfg = dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.02, entropy_target=10.0,
               entropy_coef_delta=0.01, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    ref, ours = make_trainer(tmp_path, **cfg), make_trainer(tmp_path, **cfg)
    ours.model.load_state_dict(ref.model.state_dict())
    gtrl.enable_gxpo_loss(ours, backend="torch")
    for i, sync in enumerate([False, True, False, True]):
        for tr in (ref, ours):
            tr.accelerator.gradient_state._set_sync_gradients(sync)
            tr.model.train()
        inputs = make_batch(ref, seed=10 + i)
        lr_ = GRPOTrainer._compute_loss(ref, ref.model, copy.deepcopy(inputs))
        lo = ours._compute_loss(ours.model, copy.deepcopy(inputs))
        torch.testing.assert_close(lo, lr_, rtol=2e-4, atol=2e-6)
        assert ours.entropy_coef == pytest.approx(ref.entropy_coef, abs=1e-12)
        assert ours._last_world_entropy == pytest.approx(ref._last_world_entropy, rel=1e-5)
    assert ref.entropy_coef == pytest.approx(0.04)  # the world entropy stayed under the target: +delta twice
    for key in ("entropy_coef", "policy_loss"):
        assert ours._metrics["train"][key] == pytest.approx(ref._metrics["train"][key], rel=1e-4)


def make_moe(seed=0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    from tests.integrations.test_trl import VOCAB
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         router_aux_loss_coef=0.05)
    torch.manual_seed(seed)
    return Qwen2MoeForCausalLM(cfg)


@pytest.mark.parametrize("path", ["hidden", "logits"])
def test_moe_aux_loss_parity(tmp_path, path):
    tr = make_trainer(tmp_path, model=make_moe(), loss_type="bnpo", router_aux_loss_coef=0.05)
    assert tr.aux_loss_enabled
    ref, ours = check_parity(tr, make_batch(tr), path=path)
    assert tr.gxpo_loss_path == path and "aux_loss" in ours[2]
    assert ref[2]["aux_loss"][0] > 0


@pytest.mark.parametrize("engine, fp16, name", [
    ("FSDP", False, "distributed_type=FSDP"),
    ("NO", True, "fp16=True without DeepSpeed"),
    ("DEEPSPEED", True, None),           # DeepSpeed's own fp16 loss scaler is advanced once per update
    ("MULTI_CPU", False, None),
])
def test_update_rule_refusals_name_the_option(engine, fp16, name):
    from types import SimpleNamespace
    fake = SimpleNamespace(loss_type="grpo", args=SimpleNamespace(fp16=fp16),
                           accelerator=SimpleNamespace(distributed_type=SimpleNamespace(name=engine)))
    got = gtrl._unsupported(fake, for_update=True)
    assert (got is None) if name is None else (name in got), got
    assert gtrl._unsupported(fake) is None  # the loss hook alone accepts all of these


# ----------------------------------------------------------------------------------- weights_only policy
class Payload:
    """Unpickling this object would append to RAN: a stand-in for arbitrary code in a crafted checkpoint."""
    def __reduce__(self):
        return (RAN.append, ("payload ran",))


RAN = []


def test_every_saved_state_loads_weights_only(tmp_path):
    from gxpo_kernels.advantages import FADEController
    from gxpo_kernels.update import GXPO, SFPO
    states = {}
    for name, cls, kw in [("gxpo_ema", GXPO, dict(gate="ema")), ("gxpo_window", GXPO, dict(gate="window", window=2)),
                          ("gxpo_none", GXPO, dict(gate=None)), ("sfpo_entropy", SFPO, dict(gate="entropy", window=2)),
                          ("sfpo_ema", SFPO, dict(gate="ema"))]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 3)
        rule = cls(torch.optim.AdamW(lin.parameters(), lr=1e-2), backend="torch", **kw)
        x = torch.randn(7, 5)
        for step in range(3):
            def closure():
                lin.zero_grad()
                loss = lin(x).pow(2).mean()
                loss.backward()
                return loss
            rule.step(closure, entropy=1.0 + 0.1 * step)
        states[name] = rule.state_dict()
    fade = FADEController(p0=0.3)
    fade.update(0.4, 1.2)
    states["fade"] = fade.state_dict()
    for name, st in states.items():
        torch.save(st, tmp_path / f"{name}.pt")
        assert torch.load(tmp_path / f"{name}.pt", weights_only=True) == st, name
    # the TRL trainer's checkpoint file
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, max_steps=2, save_strategy="steps", save_steps=2,
                      trainer_kwargs=dict(update="gxpo", update_kwargs={"gate": "window", "window": 2,
                                                                        "backend": "torch"},
                                          advantage_estimator="fade", backend="torch"))
    tr.reward_funcs = [reward_binary]
    tr.train()
    path = tmp_path / "out" / "checkpoint-2" / "gxpo_update_state.pt"
    assert torch.load(path, weights_only=True) == tr.gxpo_state_dict()


def test_pickle_payload_in_checkpoint_is_refused(tmp_path):
    from gxpo_kernels.integrations._trl_trainer import load_update_state
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    torch.save({"rule": {"gate": Payload()}, "fade": None, "fade_pending_reward": None},
               ckpt / "gxpo_update_state.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_update_state(str(ckpt / "gxpo_update_state.pt"))
    tr = make_trainer(tmp_path, cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=dict(backend="torch"))
    tr.create_optimizer_and_scheduler(num_training_steps=2)
    with pytest.raises(pickle.UnpicklingError):
        tr._load_optimizer_and_scheduler(str(ckpt))
    assert RAN == [] and tr._gxpo_pending_state is None
    assert os.path.exists(ckpt / "gxpo_update_state.pt")


# ------------------------------------------------------------------------------------------ DeepSpeed ZeRO
def _ds_run(tmp_path, stage):
    import subprocess
    import sys
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_trl_ds_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TRITON_INTERPRET="0")
    out = tmp_path / f"z{stage}"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           worker, str(out), str(stage)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in (0, 1)]


@pytest.mark.slow
def test_gxpo_under_deepspeed(tmp_path):
    """2 CPU ranks (gloo), DeepSpeed config through accelerate, gradient_accumulation_steps=2, ZeRO 1, 2, 3: the
    rule is the shard-local DeepSpeed one, 3 passes per update (each over both micro-batches), one engine step
    and scheduler step per update, identical full parameters on both ranks, and the same parameters on every
    stage -- so ZeRO-3's fused hidden path (the head run as the lm_head's forward) gives ZeRO-1's gradients."""
    pytest.importorskip("deepspeed")
    init = torch.cat([p.detach().flatten() for p in make_model().parameters()])
    flats = {}
    for stage in (1, 2, 3):
        r0, r1 = _ds_run(tmp_path, stage)
        assert torch.equal(r0["flat"], r1["flat"]), stage
        assert r0["flat"].shape == init.shape and not torch.allclose(r0["flat"], init)
        assert r0["path"] == "hidden"
        assert r0["steps"] == r0["engine_global_steps"] == 2 and r0["passes"] == 6 and r0["bp"] == [3, 3]
        assert r0["opt_steps"] == 6 and r0["lr"][0] > r0["lr"][1]
        if stage > 1:
            assert 0 < r0["shard_numel"][0] < init.numel()  # the extrapolation ran on this rank's shard only
        flats[stage] = r0["flat"]
    for stage in (2, 3):
        torch.testing.assert_close(flats[stage], flats[1], rtol=1e-4, atol=1e-5)


def test_trl_trainer_resume_continues_the_rule(tmp_path):
    """save_steps=1, then resume_from_checkpoint=checkpoint-1 for the second update: the gate's window and the
    rule's counters continue from the checkpoint, and the end state equals the uninterrupted run's."""
    kw = dict(update="gxpo", update_kwargs={"gate": "window", "window": 2, "tau": 50.0, "backend": "torch"},
              backend="torch")
    full = make_trainer(tmp_path / "full", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw, save_strategy="steps",
                        save_steps=1)
    full.train()
    ckpt = tmp_path / "full" / "out" / "checkpoint-1"
    assert torch.load(ckpt / "gxpo_update_state.pt", weights_only=True)["rule"]["total_backward_passes"] == 3
    resumed = make_trainer(tmp_path / "resumed", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.gxpo_backward_passes == 3          # only the second update ran here
    assert resumed._gxpo_rule.state_dict() == full._gxpo_rule.state_dict()
    assert resumed._gxpo_rule.total_backward_passes == 6 and len(resumed._gxpo_rule.gate.values) == 2
    p0, p1 = params(full), params(resumed)
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-6, atol=1e-7)


# TRL options whose loss inputs come from TRL's own pipeline (old log-probs of num_iterations > 1 and
# steps_per_generation > gradient_accumulation_steps, a real reference model, truncation masks, scaled rewards),
# each run through trainer.train() with and without the hook
TRAIN_CASES = {
    "steps_per_generation=4 grpo epsilon_high delta beta": dict(   # negative-advantage ratios pass delta at steps 2, 3
        steps_per_generation=4, per_device_train_batch_size=4, loss_type="grpo", epsilon_high=0.28, delta=1.3,
        beta=0.04),
    "steps_per_generation=4 GA=2 dapo mask_truncated": dict(
        steps_per_generation=4, gradient_accumulation_steps=2, per_device_train_batch_size=2, loss_type="dapo",
        mask_truncated_completions=True, max_completion_length=5),
    "GA=2 bnpo scale_rewards=batch top_entropy_quantile": dict(
        gradient_accumulation_steps=2, per_device_train_batch_size=2, loss_type="bnpo", scale_rewards="batch",
        top_entropy_quantile=0.5, entropy_coef=0.01),
    "num_iterations=2 dr_grpo scale_rewards=none sync_ref_model": dict(
        num_iterations=2, loss_type="dr_grpo", scale_rewards="none", beta=0.05, sync_ref_model=True,
        ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
    "num_iterations=2 luspo GSPO mask_truncated": dict(
        num_iterations=2, loss_type="luspo", importance_sampling_level="sequence", mask_truncated_completions=True,
        max_completion_length=4),
    "num_iterations=2 bnpo off_policy_mask no bias-corrected KL": dict(
        num_iterations=2, loss_type="bnpo", off_policy_mask_threshold=0.01, beta=0.02, use_bias_correction_kl=False,
        epsilon=0.1),
    "GA=3 grpo GSPO top_entropy_quantile=0": dict(
        gradient_accumulation_steps=3, loss_type="grpo", importance_sampling_level="sequence",
        top_entropy_quantile=0.0, entropy_coef=0.02),
}


@pytest.mark.parametrize("cfg", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_training_parity_with_trl(tmp_path, cfg):
    """Three optimizer steps of ``trainer.train()``, TRL's loss vs the hook, same seed: every step's gradients,
    every logged metric and the final parameters agree within fp32 rounding. SGD (not Adam, whose m / sqrt(v)
    turns rounding-level gradient differences into lr-sized steps) with a large learning rate, so that the
    num_iterations=2 steps are off-policy and the clip binds. A bias towards EOS in generation (generation only;
    the loss scores the sampled tokens without it) gives a mix of truncated and finished completions."""
    from transformers import TrainerCallback

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})

    base = dict(optim="sgd", learning_rate=1.0, max_steps=3, generation_kwargs={"sequence_bias": [[[1], 3.0]]})
    cfg = dict(base, **cfg)
    runs = []
    for hook in (False, True):
        seen = []
        tr = make_trainer(tmp_path / str(hook), **cfg)
        tr.add_callback(Grads())
        if hook:
            gtrl.enable_gxpo_loss(tr, backend="torch")
            assert tr.gxpo_loss_path == "hidden"
        logs = train_logs(tr)
        runs.append((logs, seen, params(tr)))
    (want_logs, want_grads, want_p), (logs, grads, p) = runs
    assert len(logs) == len(want_logs) == len(grads) == len(want_grads) == 3
    for want, got in zip(want_logs, logs):
        assert want.keys() == got.keys()
        for key in want:
            if "time" not in key and "runtime" not in key:
                assert math.isclose(want[key], got[key], rel_tol=1e-4, abs_tol=1e-6), (key, want[key], got[key])
    for want, got in zip(want_grads, grads):
        assert want.keys() == got.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for n in want_p:   # the gradients' rounding differences, times the learning rate
        torch.testing.assert_close(p[n], want_p[n], rtol=1e-5, atol=1e-6 * cfg["learning_rate"])
    # each case exercises what it names
    if cfg.get("num_iterations", 1) > 1 or cfg.get("steps_per_generation", 0) > 2:
        assert any(h["clip_ratio/region_mean"] > 0 for h in want_logs)
    if cfg.get("beta"):
        assert any(h["kl"] > 0 for h in want_logs)
    if cfg.get("mask_truncated_completions"):
        assert any(0 < h["completions/clipped_ratio"] < 1 for h in want_logs if "completions/clipped_ratio" in h)


def _opt_state(tr):
    return copy.deepcopy(tr.optimizer.state_dict()) if tr.optimizer is not None else None


@pytest.mark.parametrize("built", [False, True], ids=["rule-pending", "rule-built"])
def test_refused_rule_state_leaves_optimizer_and_rule_as_they_were(tmp_path, built):
    """A checkpoint whose rule state this trainer refuses (another gate window here): HF's optimizer state used
    to be loaded first and the rule's check came after (at the first training step when the rule was not built
    yet), so the refused resume left the checkpoint's Adam moments in the optimizer. Now the state is checked
    first: optimizer, scheduler and rule are exactly as before; a matching trainer then loads it."""
    kw = dict(update="gxpo", update_kwargs={"gate": "window", "window": 2, "tau": 50.0, "backend": "torch"},
              backend="torch")
    full = make_trainer(tmp_path / "full", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw, save_strategy="steps",
                        save_steps=1, max_steps=1)
    full.train()
    ckpt = str(tmp_path / "full" / "out" / "checkpoint-1")
    other_kw = dict(kw, update_kwargs=dict(kw["update_kwargs"], window=3))
    other = make_trainer(tmp_path / "other", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=other_kw)
    other.create_optimizer_and_scheduler(num_training_steps=2)      # what train() builds before it loads these
    if built:
        rule = other._get_rule(other.model)
        rule.total_backward_passes, rule.outer_steps = 5, 2
    before = (_opt_state(other), other.lr_scheduler.state_dict(),
              None if other._gxpo_rule is None else other._gxpo_rule.state_dict())
    with pytest.raises(ValueError, match=r"gate window: checkpoint 2 vs rule 3"):
        other._load_optimizer_and_scheduler(ckpt)
    after = (_opt_state(other), other.lr_scheduler.state_dict(),
             None if other._gxpo_rule is None else other._gxpo_rule.state_dict())
    assert after == before and other._gxpo_pending_state is None
    same = make_trainer(tmp_path / "same", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw)
    same.create_optimizer_and_scheduler(num_training_steps=2)
    same._load_optimizer_and_scheduler(ckpt)
    assert same._gxpo_pending_state == full._gxpo_rule.state_dict()
    assert same.optimizer.state_dict()["state"]                     # Adam's moments from the checkpoint


def test_refused_resume_in_train_changes_nothing(tmp_path):
    """``train(resume_from_checkpoint=...)`` (a path, or True: the output folder's last checkpoint) with a rule
    state of other settings is refused before HF loads the model's weights or the optimizer (and before any
    generation), naming the setting; the trainer then trains from where it was. It used to fail only at the
    first training step, after both had been overwritten."""
    kw = dict(update="sfpo", update_kwargs={"K": 2, "gate": None, "backend": "torch"}, backend="torch")
    full = make_trainer(tmp_path / "full", cls=gtrl.GXPOGRPOTrainer, trainer_kwargs=kw, save_strategy="steps",
                        save_steps=1, max_steps=1)
    full.train()
    other = make_trainer(tmp_path / "other", cls=gtrl.GXPOGRPOTrainer,
                         trainer_kwargs=dict(kw, update_kwargs=dict(kw["update_kwargs"], alpha=0.5)))
    p0 = params(other)
    generated = []
    real = other._generate_and_score_completions
    other._generate_and_score_completions = lambda inputs: generated.append(1) or real(inputs)
    ckpt = tmp_path / "full" / "out" / "checkpoint-1"
    shutil.copytree(ckpt, tmp_path / "other" / "out" / "checkpoint-1")   # what resume_from_checkpoint=True finds
    for resume in (str(ckpt), True):
        with pytest.raises(ValueError, match=r"alpha: checkpoint 0.8 vs rule 0.5"):
            other.train(resume_from_checkpoint=resume)
    assert generated == [] and other.optimizer is None and other._gxpo_rule is None
    assert other._gxpo_pending_state is None
    for n, p in params(other).items():
        assert torch.equal(p, p0[n]), n
    other.train()                                                    # no stale state: trains from scratch
    assert other._gxpo_rule.total_backward_passes == 2 * 3 and other.state.global_step == 2
